//! Fixtures for tests and demos that must run in seconds: a tiny random BERT with a word-level
//! tokenizer, and synthetic texts whose classes use disjoint words (so a few steps learn them).
//! Used by this crate's tests and by the whole-system tests in `tests/`.

use std::path::Path;

use crate::model::{write_random_model, BertConfig, ModelError};
use crate::rng::SplitMix64;

/// Words in the tiny tokenizer's vocabulary (`w0` … `w99`), after 4 special tokens.
pub const WORDS: usize = 100;

/// Writes a random [`BertConfig::tiny`] model (seeded) and a word-level `tokenizer.json` to `dir`.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<(), ModelError> {
    write_random_model(dir, &BertConfig::tiny(), seed)?;
    write_word_tokenizer(dir)
}

/// A whitespace word-level tokenizer: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `w0` … `w99`
/// 4 … 103; adds `[CLS]` … `[SEP]` around each text; any other word is `[UNK]`.
pub fn write_word_tokenizer(dir: &Path) -> Result<(), ModelError> {
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
    let path = dir.join("tokenizer.json");
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| ModelError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
    std::fs::write(&path, text).map_err(|source| ModelError::Io { path, source })
}

/// `n` examples of `classes` classes; class c uses only the 8 words `[c·W/classes, c·W/classes + 8)`
/// of the tiny vocabulary (W = [`WORDS`]), 3 to 12 of them; labels alternate. Returns
/// `(id, words, label)`.
pub fn separable_texts(n: usize, classes: usize, seed: u64) -> Vec<(u64, String, usize)> {
    let mut rng = SplitMix64::new(seed);
    let span = WORDS / classes.max(1);
    (0..n)
        .map(|i| {
            let label = i % classes.max(1);
            let len = 3 + (rng.next_u64() % 10) as usize;
            let words: Vec<String> = (0..len)
                .map(|_| format!("w{}", label * span + (rng.next_u64() % span.min(8) as u64) as usize))
                .collect();
            (i as u64, words.join(" "), label)
        })
        .collect()
}
