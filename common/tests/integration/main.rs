//! The common crate's integration tests: checkpoints, codec properties, wire messages (the allocation test is its own binary: it installs a global allocator).
//!
//! One test binary for the crate (each binary links the whole dependency tree, so one per file
//! cost gigabytes of disk: 8.1 GB of target/ on a clean clone, 1.6 GB now). Run one module with
//! `cargo test -p fedpool-common --test integration <module>::`.

mod checkpoints;
mod codec_properties;
mod wire_messages;
