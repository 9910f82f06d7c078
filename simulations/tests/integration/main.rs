//! The simulator's integration tests: partitions, network model, lockstep tenancy, the driver, reports, the CLI.
//!
//! One test binary for the crate (each binary links the whole dependency tree, so one per file
//! cost gigabytes of disk: 8.1 GB of target/ on a clean clone, 1.6 GB now). Run one module with
//! `cargo test -p fedpool-sim --test integration <module>::`.

mod cli;
mod decoder;
mod distributed;
mod docs_experiments;
mod driver;
mod network;
mod partition;
mod report;
mod tenancy;
