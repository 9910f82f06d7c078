//! fedpool-server: the coordinator of a federation.
//!
//! A sans-IO round engine ([`round`]) fed by a QUIC endpoint with mutual TLS ([`net`]), streaming
//! aggregation ([`aggregate`]), crash-safe checkpoints and the round log ([`store`]), the
//! federation's certificates ([`certs`]), configuration ([`config`]) and Prometheus metrics
//! ([`metrics`]). Rank budgets ([`budget`]) are not built yet. This crate never depends on
//! `fedpool-client`: the coordinator needs no training code.

pub mod aggregate;
pub mod budget;
pub mod certs;
pub mod config;
pub mod metrics;
pub mod net;
pub mod round;
pub mod store;
