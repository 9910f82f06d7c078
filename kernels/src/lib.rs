//! fedpool-kernels: the training step's numeric hot paths, each a candle custom op with its own
//! backward on the CPU and a `*_composed` twin built from candle's ops (the reference the tests
//! compare against, and the path on other devices: no CUDA kernel of our own yet).
//!
//! Built: [`frozen`] (the backbone's linear layers, gradient for the input only) on [`dense`],
//! [`quantized`] (the same for a block-quantized GGUF weight: a 4-bit decoder base)
//! (faer's products, AVX-512 at run time on stable), [`norm`]
//! (LayerNorm with the SSF folded in, RMSNorm), [`activation`] (GELU, SwiGLU), [`ssf`] (scale and
//! shift per batch row), [`attention`] (by real length or over packed tokens; GQA, causal), and
//! [`simd`] (vectorisable `exp`/`erf`, AVX2 + FMA builds chosen at run time); [`check`] runs them
//! all on a device against the CPU. Planned:
//! block quantization, weighted streaming accumulate, top-k; their CPU versions live in
//! `fedpool_common::codec` today.

pub mod frozen;

pub use frozen::{frozen_linear, frozen_matmul};
pub mod activation;
pub mod attention;
pub mod check;
pub mod dense;
pub mod norm;
mod packed;
pub mod quantized;
pub mod simd;
pub mod ssf;
