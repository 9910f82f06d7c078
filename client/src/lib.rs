//! fedpool's client library: frozen backbones with explicit adapter hooks ([`model`]), text
//! tokenization ([`tokenize`]), datasets ([`data`]), pool specs for a backbone ([`spec`]), FedIns
//! instance-adaptive selection ([`select`]), local training ([`train`]), device choice
//! ([`device`]), the daemon that joins a federation ([`session`]), test fixtures ([`testkit`]) and
//! the `fedpool-client` command line ([`cli`]).

pub mod cli;
pub mod data;
pub mod device;
pub mod malloc;
pub mod model;
pub mod peft;
mod rng;
pub mod select;
pub mod session;
pub mod spec;
pub mod testkit;
pub mod tokenize;
pub mod train;
