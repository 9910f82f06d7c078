//! Loading fails loudly and precisely: the error names the missing path, or the tensor and both
//! shapes. Checkpoints with a `bert.` prefix load like unprefixed ones.

use crate::support;

use std::path::Path;

use candle_core::{Device, Tensor};
use fedpool_client::model::{write_random_model, BertConfig, BertEncoder, Hooks, ModelError};
use support::{random_tensor, tiny_inputs, values};

/// Writes a tiny random model to `dir`, then rewrites its weights with `edit`.
fn tiny_model_with(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    write_random_model(dir, &BertConfig::tiny(), 5).unwrap();
    let file = dir.join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    edit(&mut weights);
    candle_core::safetensors::save(&weights, &file).unwrap();
}

#[test]
fn missing_model_folder_error_names_the_path() {
    let err = BertEncoder::load("/no/such/minilm", &Device::Cpu).err().unwrap();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("/no/such/minilm"), "{err}");
}

#[test]
fn missing_weights_file_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &BertConfig::tiny(), 5).unwrap();
    let weights = dir.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let err = BertEncoder::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&weights.display().to_string()), "{err}");
}

#[test]
fn tensor_with_wrong_shape_error_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let name = "encoder.layer.1.intermediate.dense.weight";
    tiny_model_with(dir.path(), |w| {
        w.insert(name.into(), random_tensor(&[64, 31], 1, 0.0, 0.1));
    });
    let err = BertEncoder::load(dir.path(), &Device::Cpu).err().unwrap();
    match &err {
        ModelError::TensorShape { name: got_name, expected, got, .. } => {
            assert_eq!(got_name, name);
            assert_eq!((expected.as_slice(), got.as_slice()), (&[64, 32][..], &[64, 31][..]));
        }
        other => panic!("expected a shape error, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains(name) && message.contains("[64, 31]") && message.contains("[64, 32]"), "{message}");
}

#[test]
fn missing_tensor_error_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let name = "encoder.layer.0.attention.self.value.bias";
    tiny_model_with(dir.path(), |w| {
        w.remove(name);
    });
    let err = BertEncoder::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains(name), "{err}");
}

#[test]
fn bert_prefixed_checkpoint_loads_like_unprefixed() {
    let plain = tempfile::tempdir().unwrap();
    write_random_model(plain.path(), &BertConfig::tiny(), 5).unwrap();
    let prefixed = tempfile::tempdir().unwrap();
    tiny_model_with(prefixed.path(), |w| {
        *w = w.drain().map(|(k, v)| (format!("bert.{k}"), v)).collect();
        w.insert("classifier.weight".into(), random_tensor(&[2, 32], 1, 0.0, 0.1));
    });

    let (ids, mask) = tiny_inputs();
    let out = |dir: &Path| {
        let model = BertEncoder::load(dir, &Device::Cpu).unwrap();
        values(&model.pooled(&ids, &mask, &Hooks::new()).unwrap())
    };
    assert_eq!(out(prefixed.path()), out(plain.path()));
}

#[test]
fn prefixed_checkpoint_errors_use_the_names_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model_with(dir.path(), |w| {
        *w = w.drain().map(|(k, v)| (format!("bert.{k}"), v)).collect();
        w.remove("bert.embeddings.LayerNorm.bias");
    });
    let err = BertEncoder::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("\"bert.embeddings.LayerNorm.bias\""), "{err}");
}

#[test]
fn token_id_outside_vocabulary_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &BertConfig::tiny(), 5).unwrap();
    let model = BertEncoder::load(dir.path(), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 128]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
    let err = model.forward(&ids, &mask, &Hooks::new()).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    assert!(err.to_string().contains("128"), "{err}");
}
