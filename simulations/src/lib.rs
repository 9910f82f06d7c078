//! fedpool-sim: many virtual clients on one machine or GPU, sharing one frozen backbone, driven
//! by the same round engine, aggregation, codec and model code as a deployment.
//!
//! Built so far (issue "Simulator"): client data partitions ([`partition`]) and lockstep training
//! of virtual clients (FedIns SSF pools and LoRA) over one shared backbone ([`tenancy`]), the
//! network and device model ([`network`]), and reports and plots ([`report`]). Not yet: the
//! `fedpool-sim` binary that drives the round engine with them.

pub mod network;
pub mod partition;
pub mod report;
pub mod tenancy;
