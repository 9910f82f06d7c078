//! fedpool's client library: frozen backbones with explicit adapter hooks ([`model`]) and text
//! tokenization ([`tokenize`]). Local training, instance-adaptive selection and the daemon build
//! on these.

pub mod model;
pub mod tokenize;
