//! The server crate's integration tests: aggregation, budgets, certificates, the round engine, the store, QUIC.
//!
//! One test binary for the crate (each binary links the whole dependency tree, so one per file
//! cost gigabytes of disk: 8.1 GB of target/ on a clean clone, 1.6 GB now). Run one module with
//! `cargo test -p fedpool-server --test integration <module>::`.

mod aggregate_fedavg;
mod aggregate_lora;
mod aggregate_lora_standard;
mod aggregate_pool;
mod aggregate_robust;
mod budget;
mod certs;
mod crash_resume;
mod net_bounds;
mod net_refusals;
mod net_round;
mod net_support;
mod rank_grants;
mod revocation;
mod round_engine;
mod server_state;
mod store;
mod store_disk;
