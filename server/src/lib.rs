//! fedpool-server: the coordinator of a federation.
//!
//! Not built yet (issue "Aggregation server"): this crate holds its module skeleton only. It will
//! never depend on `fedpool-client`: the coordinator needs no training code.

pub mod aggregate;
pub mod budget;
pub mod certs;
pub mod net;
pub mod round;
pub mod store;
