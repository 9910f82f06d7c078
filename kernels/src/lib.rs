//! fedpool-kernels: numeric hot paths, each with a CPU reference implementation and a CUDA one
//! behind the `cuda` feature: per-row adapter gather (SSF, LoRA), block quantization, weighted
//! streaming accumulate, top-k.
//!
//! Not built yet: this crate holds its doc comment only. The CPU reference versions of block
//! quantization and top-k live in `fedpool_common::codec` today.
