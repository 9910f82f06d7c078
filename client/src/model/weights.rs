//! Checked access to HF weights: a missing tensor or a wrong shape is an error that names the
//! tensor, the shapes and the files.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{ModelError, Result};

/// A view of safetensors files at a module path (`encoder.layer.0.attention`), like
/// [`VarBuilder`], that also knows the adapter-hook name of the path and the files it reads.
#[derive(Clone)]
pub(crate) struct Weights<'a> {
    vb: VarBuilder<'a>,
    /// The module path without the checkpoint's model prefix: the adapter-hook name.
    path: String,
    /// The files, for error messages.
    files: String,
}

impl Weights<'_> {
    /// Memory-maps the safetensors `files`; tensors are read as f32 onto `device`.
    ///
    /// If `probe` is absent at the root but present under `prefix` (HF task checkpoints store
    /// `bert.embeddings...`), every name is read under `prefix`.
    pub(crate) fn open(files: &[PathBuf], device: &Device, probe: &str, prefix: &str) -> Result<Self> {
        for file in files {
            if !file.is_file() {
                return Err(ModelError::NotFound { what: "weights file", path: file.clone() });
            }
        }
        let names = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        // SAFETY: the files must not change while mapped. They are mapped only while the model
        // loads: every tensor is copied out of the mapping, which is dropped with this builder.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, DType::F32, device) }
            .map_err(|e| ModelError::Weights { files: names.clone(), message: e.to_string() })?;
        let vb = if !vb.contains_tensor(probe) && vb.pp(prefix).contains_tensor(probe) { vb.pp(prefix) } else { vb };
        Ok(Self { vb, path: String::new(), files: names })
    }

    /// The view one module down (`pp("attention")`).
    pub(crate) fn pp(&self, name: impl std::fmt::Display) -> Self {
        let name = name.to_string();
        let path = if self.path.is_empty() { name.clone() } else { format!("{}.{name}", self.path) };
        Self { vb: self.vb.pp(name), path, files: self.files.clone() }
    }

    /// The module path without the checkpoint prefix: the name adapter hooks use.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// True when the files hold a tensor `name` under this path.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// The tensor `name` under this path, which must have shape `shape`. A plain tensor, never a
    /// `Var`: backbone weights are frozen.
    pub(crate) fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full_name = || {
            let prefix = self.vb.prefix();
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        if !self.vb.contains_tensor(name) {
            return Err(ModelError::MissingTensor { name: full_name(), files: self.files.clone() });
        }
        let tensor = self.vb.get_unchecked(name)?;
        if tensor.dims() != shape {
            return Err(ModelError::TensorShape {
                name: full_name(),
                expected: shape.to_vec(),
                got: tensor.dims().to_vec(),
                files: self.files.clone(),
            });
        }
        Ok(tensor)
    }
}
