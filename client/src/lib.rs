//! fedpool's client library: frozen backbones with explicit adapter hooks ([`model`]), text
//! tokenization ([`tokenize`]), datasets ([`data`]), pool specs for a backbone ([`spec`]), FedIns
//! instance-adaptive selection ([`select`]), local training ([`train`]; a decoder's causal-LM
//! fine-tuning and evaluation by generation, [`lm`]), device choice
//! ([`device`]), a client's model, tokenizer and encoded data in one step ([`setup`]; an encoder
//! or a decoder behind one interface, [`learner`]), the daemon
//! that joins a federation ([`session`]) and test fixtures ([`testkit`]). The `fedpool-client`
//! command line (argument parsing, the commands, the progress bar, the query-cache file) lives in
//! the binary, `src/bin/fedpool-client/`, and calls this library.

pub mod data;
pub mod device;
pub mod learner;
pub mod lm;
pub mod malloc;
pub mod model;
pub mod participant;
pub mod peft;
mod rng;
pub mod select;
pub mod session;
pub mod setup;
pub mod spec;
pub mod testkit;
pub mod tokenize;
pub mod train;
