//! fedpool-server: the coordinator of a federation.
//!
//! A sans-IO round engine ([`round`]) fed by a QUIC endpoint with mutual TLS ([`net`]), streaming
//! aggregation ([`aggregate`]), crash-safe checkpoints and the round log ([`store`]), the round
//! log as a table for `fedpool-server report` ([`report`]), the federation's certificates
//! ([`certs`]), configuration ([`config`]), Prometheus metrics ([`metrics`]) and the status page
//! served beside them ([`status`]). Per-client LoRA
//! rank budgets: bandwidth estimates ([`bandwidth`]), the allocator ([`budget`]) and the policies
//! with the global triplet importance ([`ranks`]). This crate never depends on `fedpool-client`:
//! the coordinator needs no training code.

pub mod aggregate;
pub mod bandwidth;
pub mod budget;
pub mod certs;
pub mod config;
pub mod metrics;
pub mod net;
pub mod ranks;
pub mod report;
pub mod round;
pub mod status;
pub mod store;
