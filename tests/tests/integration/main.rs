//! Whole-system tests: real QUIC on loopback, real processes, injected faults, rank budgets.
//!
//! One test binary for the crate (each binary links the whole dependency tree, so one per file
//! cost gigabytes of disk: 8.1 GB of target/ on a clean clone, 1.6 GB now). Run one module with
//! `cargo test -p fedpool-tests --test integration <module>::`.

mod attacks;
mod bad_peers;
mod budgets;
mod decoder;
mod faults;
mod federation;
mod load;
mod pair;
mod revocation;
mod status_page;
