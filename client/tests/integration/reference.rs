//! The encoder and tokenizer against Hugging Face's own output for all-MiniLM-L6-v2
//! (tests/fixtures/minilm_reference.json, made with transformers in float32 on CPU).

use crate::support;

use std::path::PathBuf;

use candle_core::Device;
use fedpool_client::model::{BertEncoder, Hooks};
use fedpool_client::tokenize::{Padding, TextTokenizer};
use serde::Deserialize;
use support::{max_abs_diff, values};

#[derive(Deserialize)]
struct Reference {
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    input_ids: Vec<u32>,
    cls_hidden_first8: Vec<f32>,
    mean_pooled: Vec<f32>,
    normalized: Vec<f32>,
}

/// `$FEDPOOL_ASSETS/minilm`, else `<workspace>/assets/minilm`; fails (never skips) when absent.
fn minilm_dir() -> PathBuf {
    let dir = match std::env::var_os("FEDPOOL_ASSETS") {
        Some(assets) => PathBuf::from(assets).join("minilm"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/minilm"),
    };
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(
            dir.join(file).is_file(),
            "MiniLM is not at {} ({file} missing): run scripts/fetch-assets.sh first \
             (or point FEDPOOL_ASSETS at the assets folder)",
            dir.display()
        );
    }
    dir
}

fn reference() -> Reference {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minilm_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn reference_embeddings_match_hf() {
    let dir = minilm_dir();
    let tokenizer =
        TextTokenizer::from_file(dir.join("tokenizer.json"), 128, Padding::Longest).expect("tokenizer loads");
    let model = BertEncoder::load(&dir, &Device::Cpu).expect("model loads");
    let reference = reference();
    assert_eq!(reference.sentences.len(), 5);

    let mut worst: f32 = 0.0;
    for sentence in &reference.sentences {
        let batch = tokenizer.encode_batch(&[&sentence.text]).unwrap();
        assert_eq!(batch.ids, sentence.input_ids, "ids of {:?}", sentence.text);
        assert!(batch.mask.iter().all(|&m| m == 1), "a batch of one is not padded");

        let (ids, mask) = batch.to_tensors(&Device::Cpu).unwrap();
        let hidden = model.forward(&ids, &mask, &Hooks::new()).unwrap();
        let cls = values(&hidden.get(0).unwrap().get(0).unwrap().narrow(0, 0, 8).unwrap());
        let pooled = values(&fedpool_client::model::mean_pool(&hidden, &mask).unwrap());
        let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt();
        let normalized: Vec<f32> = pooled.iter().map(|x| x / norm).collect();

        let diffs = [
            max_diff(&cls, &sentence.cls_hidden_first8),
            max_diff(&pooled, &sentence.mean_pooled),
            max_diff(&normalized, &sentence.normalized),
        ];
        eprintln!(
            "{:?}: max |diff| cls {:.2e}, mean {:.2e}, normalized {:.2e}",
            sentence.text, diffs[0], diffs[1], diffs[2]
        );
        for d in diffs {
            assert!(d < 1e-4, "{:?}: max |diff| {d} ≥ 1e-4", sentence.text);
            worst = worst.max(d);
        }
    }
    eprintln!("max |diff| over all sentences: {worst:.2e}");
}

#[derive(Deserialize)]
struct PoolerReference {
    sentences: Vec<PoolerSentence>,
}

#[derive(Deserialize)]
struct PoolerSentence {
    text: String,
    pooler_output: Vec<f32>,
}

#[test]
fn the_cls_pooler_feature_is_hf_pooler_output_batched_and_with_either_kernels() {
    let dir = minilm_dir();
    let tokenizer = TextTokenizer::from_file(dir.join("tokenizer.json"), 128, Padding::Longest).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minilm_pooler.json");
    let reference: PoolerReference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let texts: Vec<&str> = reference.sentences.iter().map(|s| s.text.as_str()).collect();
    let batch = tokenizer.encode_batch(&texts).unwrap();
    assert!(batch.mask.contains(&0), "padded");
    let (ids, mask) = batch.to_tensors(&Device::Cpu).unwrap();
    for kernels in [fedpool_client::model::Kernels::Fused, fedpool_client::model::Kernels::Composed] {
        let model = BertEncoder::load(&dir, &Device::Cpu).unwrap().with_kernels(kernels);
        assert!(model.has_pooler());
        let pooled = model.pooled_cls(&ids, &mask, &Hooks::new()).unwrap();
        for (row, sentence) in reference.sentences.iter().enumerate() {
            let got = values(&pooled.get(row).unwrap());
            let d = max_diff(&got, &sentence.pooler_output);
            assert!(d < 1e-4, "{kernels:?} {:?}: max |diff| {d}", sentence.text);
        }
    }
}

#[test]
fn batched_forward_with_padding_equals_each_alone() {
    let dir = minilm_dir();
    let tokenizer = TextTokenizer::from_file(dir.join("tokenizer.json"), 128, Padding::Longest).unwrap();
    let model = BertEncoder::load(&dir, &Device::Cpu).unwrap();
    let texts = ["Federated learning keeps the data where it is.", "What is it?"];

    let batch = tokenizer.encode_batch(&texts).unwrap();
    assert_eq!(batch.batch, 2);
    assert!(batch.mask.contains(&0), "the shorter sentence is padded");
    let (ids, mask) = batch.to_tensors(&Device::Cpu).unwrap();
    let hidden = model.forward(&ids, &mask, &Hooks::new()).unwrap();
    let pooled = fedpool_client::model::mean_pool(&hidden, &mask).unwrap();

    for (row, text) in texts.iter().enumerate() {
        let alone = tokenizer.encode_batch(&[text]).unwrap();
        let (ids1, mask1) = alone.to_tensors(&Device::Cpu).unwrap();
        let hidden1 = model.forward(&ids1, &mask1, &Hooks::new()).unwrap();
        let pooled1 = model.pooled(&ids1, &mask1, &Hooks::new()).unwrap();

        let pooled_row = pooled.narrow(0, row, 1).unwrap();
        let d = max_abs_diff(&pooled_row, &pooled1);
        assert!(d < 1e-5, "{text:?}: pooled differs by {d} batched vs alone");
        let tokens = alone.len;
        let hidden_row = hidden.narrow(0, row, 1).unwrap().narrow(1, 0, tokens).unwrap();
        let d = max_abs_diff(&hidden_row, &hidden1);
        assert!(d < 1e-5, "{text:?}: hidden states differ by {d} batched vs alone");
    }
}

#[test]
fn tokenizer_truncates_and_pads_as_asked() {
    let path = minilm_dir().join("tokenizer.json");
    let text = "Federated learning keeps the data where it is.";

    let short = TextTokenizer::from_file(&path, 6, Padding::Longest).unwrap();
    let batch = short.encode_batch(&[text]).unwrap();
    assert_eq!(batch.ids, [101, 7349, 16848, 4083, 7906, 102]);

    let fixed = TextTokenizer::from_file(&path, 16, Padding::ToMaxLength).unwrap();
    let batch = fixed.encode_batch(&[text, "a"]).unwrap();
    assert_eq!((batch.batch, batch.len), (2, 16));
    assert_eq!(batch.mask.iter().sum::<u32>(), 12 + 3);
    assert_eq!(batch.row_ids(1), [101, 1037, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let (ids, mask) = batch.to_tensors(&Device::Cpu).unwrap();
    assert_eq!((ids.dims(), mask.dims()), (&[2, 16][..], &[2, 16][..]));
}

#[test]
fn missing_tokenizer_file_error_names_it() {
    let err = TextTokenizer::from_file("/nonexistent/tok.json", 8, Padding::Longest).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/tok.json"), "{err}");
}
