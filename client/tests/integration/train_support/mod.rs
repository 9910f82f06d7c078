//! Helpers for the training tests: a tiny random model with a word-level tokenizer, and a small
//! synthetic dataset whose two classes use disjoint words (separable).

use std::path::Path;

use candle_core::Device;
use fedpool_client::model::{write_random_model, BertConfig, BertEncoder};
use fedpool_client::train::Encoded;
use tempfile::TempDir;

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

/// The word-level tokenizer of [`fedpool_client::testkit`].
pub fn write_word_tokenizer(dir: &Path) {
    fedpool_client::testkit::write_word_tokenizer(dir).unwrap();
}

pub use fedpool_client::testkit::separable_texts;

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
