//! The common crate's integration tests: checkpoints, codec properties, wire messages (the allocation test is its own binary: it installs a global allocator).
//!
//! One test binary for the crate (each binary links the whole dependency tree, so one per file
//! cost minutes of linking and gigabytes of disk). Run one module with
//! `cargo test -p fedpool-common --test integration <module>::`.

mod checkpoints;
mod codec_properties;
mod wire_messages;
