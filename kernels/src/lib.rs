//! fedpool-kernels: numeric hot paths, each with a CPU path and a CUDA one behind the `cuda`
//! feature.
//!
//! Built: [`frozen::frozen_matmul`], the backbone's linear layers with a backward that skips the
//! frozen weights' gradients (a third of a training step's matmul work). Planned (DESIGN.md):
//! per-row adapter gather, block quantization, weighted streaming accumulate, top-k; the CPU
//! versions of quantization and top-k live in `fedpool_common::codec` today.

pub mod frozen;

pub use frozen::{frozen_linear, frozen_matmul};
pub mod activation;
pub mod attention;
pub mod norm;
pub mod simd;
pub mod ssf;
