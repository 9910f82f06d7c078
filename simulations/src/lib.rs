//! fedpool-sim: many virtual clients on one machine or GPU, sharing one frozen backbone, driven
//! by the same round engine, aggregation, codec and model code as a deployment.
//!
//! Not built yet (issue "Simulator"): this crate holds its module skeleton only.

pub mod network;
pub mod partition;
pub mod report;
pub mod tenancy;
