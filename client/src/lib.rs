//! fedpool-client: frozen backbones with adapter hooks, datasets, local training, the daemon.
//!
//! Not built yet (issue "Local training engine"): this crate holds its doc comment only.
