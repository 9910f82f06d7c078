//! The client daemon (`fedpool-client run --config client.toml`): a QUIC session to the server
//! that enrolls, trains and evaluates on the server's tasks, and uploads compressed deltas with
//! error feedback, surviving network losses and restarts of either side.
//!
//! - [`config`] — `client.toml`;
//! - [`local`] — the model, the private data, training and evaluation as library calls;
//! - [`residual`] — the error-feedback residual on disk;
//! - [`connection`] — one QUIC connection, one stream per request;
//! - [`daemon`] — the loop with reconnection.

pub mod config;
pub mod connection;
pub mod daemon;
pub mod local;
pub mod residual;

pub use config::{DaemonConfig, CONFIG_HELP};
pub use connection::{Faults, FrameTap};
pub use daemon::{run, DaemonError, DaemonOptions, Outcome};
