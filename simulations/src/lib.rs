//! fedpool-sim: many virtual clients on one machine or GPU, sharing one frozen backbone, driven
//! by the same round engine, aggregation, codec and model code as a deployment.
//!
//! Built so far (issue "Simulator"): client data partitions ([`partition`]) and lockstep training
//! of virtual FedIns SSF-pool clients over one shared backbone ([`tenancy`]). Not yet: LoRA in
//! lockstep, the network model, reports, the `fedpool-sim` binary.

pub mod network;
pub mod partition;
pub mod report;
pub mod tenancy;
