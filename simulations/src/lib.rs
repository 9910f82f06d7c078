//! fedpool-sim: many virtual clients on one machine or GPU, sharing one frozen backbone, driven
//! by the same round engine, aggregation, codec and model code as a deployment.
//!
//! An [`experiment`] (TOML) names the data, its [`partition`] over clients, the adapter, the
//! codecs, the aggregation and the [`network`]; a [`population`] loads the backbone once and each
//! client's data; the [`driver`] runs the server's round engine on a virtual clock with the
//! clients training in lockstep ([`tenancy`]) or one after another; [`outputs`] and [`report`]
//! write `rounds.csv`, `summary.json` and the plots; [`centralised`] gives the reference number
//! of training on the union of the clients' data; [`error`] says why a run stopped.

pub mod centralised;
pub mod clients;
pub mod device_check;
pub mod distributed;
pub mod driver;
pub mod error;
pub mod experiment;
pub mod network;
pub mod outputs;
pub mod partition;
pub mod population;
pub mod report;
pub mod seeds;
pub mod spill;
pub mod tenancy;
