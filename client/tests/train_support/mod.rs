//! Helpers for the training tests: a tiny random model with a word-level tokenizer, and a small
//! synthetic dataset whose two classes use disjoint words (separable).
#![allow(dead_code)]

use std::path::Path;

use candle_core::Device;
use fedpool_client::model::{write_random_model, BertConfig, BertEncoder};
use fedpool_client::train::Encoded;
use tempfile::TempDir;

/// Words in the tiny tokenizer's vocabulary (`w0` … `w99`), after 4 special tokens.
pub const WORDS: usize = 100;
/// Id of `[CLS]` and `[SEP]` in the tiny tokenizer.
pub const CLS: u32 = 2;
/// Id of `[SEP]`.
pub const SEP: u32 = 3;

/// A random tiny BERT (vocabulary 128) with a word-level `tokenizer.json`, in a temp folder.
pub fn tiny_model_dir(seed: u64) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &BertConfig::tiny(), seed).unwrap();
    write_word_tokenizer(dir.path());
    dir
}

/// Loads the model of [`tiny_model_dir`].
pub fn load(dir: &Path) -> BertEncoder {
    BertEncoder::load(dir, &Device::Cpu).unwrap()
}

/// A whitespace word-level tokenizer: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `w0` … `w99`
/// 4 … 103; adds `[CLS]` … `[SEP]` around each text.
pub fn write_word_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for w in 0..WORDS {
        vocab.insert(format!("w{w}"), (w + 4).into());
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// SplitMix64 step.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` examples of `classes` classes; class c uses only the 8 words `[c·W/classes, c·W/classes + 8)`
/// of the tiny vocabulary (W = [`WORDS`]), 3 to 12 of them; labels alternate. Returns
/// `(id, words, label)`.
pub fn separable_texts(n: usize, classes: usize, seed: u64) -> Vec<(u64, String, usize)> {
    let mut state = seed;
    let span = WORDS / classes;
    (0..n)
        .map(|i| {
            let label = i % classes;
            let len = 3 + (mix(&mut state) % 10) as usize;
            let words: Vec<String> = (0..len)
                .map(|_| format!("w{}", label * span + (mix(&mut state) % span.min(8) as u64) as usize))
                .collect();
            (i as u64, words.join(" "), label)
        })
        .collect()
}

/// [`separable_texts`] as token ids (`[CLS] words [SEP]`), no tokenizer needed.
pub fn separable(n: usize, classes: usize, seed: u64) -> Vec<Encoded> {
    separable_texts(n, classes, seed)
        .into_iter()
        .map(|(id, text, label)| {
            let mut tokens = vec![CLS];
            tokens.extend(text.split(' ').map(|w| w[1..].parse::<u32>().unwrap() + 4));
            tokens.push(SEP);
            Encoded { id, tokens, label }
        })
        .collect()
}
