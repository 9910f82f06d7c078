//! PEFT adapters written by PEFT itself (tests/fixtures/peft, `make_peft_fixtures.py`) load as
//! fedpool pools whose logits are PEFT's — the same model — and fedpool's export reads back.

use std::path::PathBuf;

use candle_core::Device;
use fedpool_client::model::BertEncoder;
use fedpool_client::peft;
use fedpool_client::train::{encode_examples, forward, tokenizer_for_training, AdapterTensors, Batch, Encoded};
use fedpool_common::{AdapterKind, Pooling};
use serde::Deserialize;

#[derive(Deserialize)]
struct Logits {
    sentences: Vec<String>,
    logits: Vec<Vec<f32>>,
}

fn minilm_dir() -> PathBuf {
    let dir = match std::env::var_os("FEDPOOL_ASSETS") {
        Some(assets) => PathBuf::from(assets).join("minilm"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/minilm"),
    };
    assert!(dir.join("model.safetensors").is_file(), "MiniLM is not at {}: run scripts/fetch-assets.sh", dir.display());
    dir
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft").join(name)
}

/// fedpool's logits for the fixture's sentences with the pool `(spec, pool)`.
fn logits(
    model: &BertEncoder,
    spec: &fedpool_common::PoolSpec,
    pool: &fedpool_common::AdapterPool,
    sentences: &[String],
) -> Vec<Vec<f32>> {
    let tokenizer = tokenizer_for_training(&minilm_dir().join("tokenizer.json"), 64).unwrap();
    let rows: Vec<Encoded> =
        encode_examples(&tokenizer, sentences.iter().enumerate().map(|(i, s)| (i as u64, s.as_str(), 0))).unwrap();
    let refs: Vec<&Encoded> = rows.iter().collect();
    let batch = Batch::pad(&refs, 0, &Device::Cpu).unwrap();
    let adapters = AdapterTensors::from_pool(spec, pool, false, &Device::Cpu).unwrap();
    forward(model, &adapters, &batch, None, 0.0).unwrap().logits.to_vec2().unwrap()
}

#[test]
fn peft_lora_and_adalora_adapters_give_peft_logits_and_export_round_trips() {
    let model = BertEncoder::load(minilm_dir(), &Device::Cpu).unwrap();
    for (name, kind) in [("minilm-lora-seqcls", AdapterKind::Lora), ("minilm-adalora-seqcls", AdapterKind::AdaLora)] {
        let dir = fixture(name);
        let (spec, pool) = peft::import(&dir, model.config()).unwrap();
        assert_eq!(spec.kind, kind, "{name}");
        assert_eq!((spec.max_rank, spec.lora_alpha, spec.targets.len()), (8, 16.0, 12), "{name}");
        assert_eq!(spec.head.map(|h| h.pooling), Some(Pooling::ClsPooler));
        let want: Logits = serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
        let got = logits(&model, &spec, &pool, &want.sentences);
        let worst =
            got.iter().flatten().zip(want.logits.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        eprintln!("{name}: max |fedpool − PEFT| logit {worst:.2e}");
        assert!(worst < 2e-5, "{name}: logits differ by {worst}: {got:?} vs {:?}", want.logits);

        let out = tempfile::tempdir().unwrap();
        peft::export(out.path(), &spec, &pool, "all-MiniLM-L6-v2").unwrap();
        let (spec2, pool2) = peft::import(out.path(), model.config()).unwrap();
        assert_eq!((spec2, pool2), (spec.clone(), pool.clone()), "{name}: export then import is the identity");
    }
}

#[test]
fn unsupported_peft_adapters_and_exports_are_refused_by_name() {
    let model = BertEncoder::load(minilm_dir(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("minilm-lora-seqcls");
    std::fs::copy(src.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    for (from, to, word) in [
        ("\"bias\": \"none\"", "\"bias\": \"all\"", "bias"),
        ("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", "peft_type"),
        ("\"task_type\": \"SEQ_CLS\"", "\"task_type\": \"CAUSAL_LM\"", "task_type"),
    ] {
        assert!(config.contains(from), "fixture has {from}");
        std::fs::write(dir.path().join("adapter_config.json"), config.replace(from, to)).unwrap();
        let err = peft::import(dir.path(), model.config()).unwrap_err().to_string();
        assert!(err.contains(word) && err.contains("adapter_config.json"), "{err}");
    }
    // A mean-pooled head is not BertForSequenceClassification's.
    let (mut spec, pool) = peft::import(&src, model.config()).unwrap();
    spec.head = spec.head.map(|h| fedpool_common::HeadSpec { pooling: Pooling::Mean, ..h });
    let pool = fedpool_common::AdapterPool { spec_hash: spec.hash(), ..pool };
    let err = peft::export(dir.path(), &spec, &pool, "m").unwrap_err().to_string();
    assert!(err.contains("cls-pooler"), "{err}");
}

#[test]
fn the_cli_imports_a_peft_adapter_as_a_checkpoint_and_exports_it_back() {
    let work = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_fedpool-client");
    let checkpoint = work.path().join("adapter.safetensors");
    let status = std::process::Command::new(bin)
        .args(["peft", "import", "--peft"])
        .arg(fixture("minilm-lora-seqcls"))
        .arg("--model")
        .arg(minilm_dir())
        .arg("--out")
        .arg(&checkpoint)
        .status()
        .unwrap();
    assert!(status.success());
    let (pool, meta) = fedpool_common::checkpoint::read_pool(&checkpoint).unwrap();
    assert_eq!(meta.spec.kind, AdapterKind::Lora);
    assert_eq!(meta.backbone, fedpool_common::BackboneFingerprint::of_model_dir(&minilm_dir()).unwrap());
    let out = work.path().join("peft");
    let status = std::process::Command::new(bin)
        .args(["peft", "export", "--adapter"])
        .arg(&checkpoint)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let model = BertEncoder::load(minilm_dir(), &Device::Cpu).unwrap();
    let (_, back) = peft::import(&out, model.config()).unwrap();
    assert_eq!(back.tensors, pool.tensors);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(8)));
}
