//! The client crate's integration tests: model loading, adapters, data, training, the CLI.
//!
//! One test binary for the crate (each binary links the whole dependency tree, so one per file
//! cost gigabytes of disk: 8.1 GB of target/ on a clean clone, 1.6 GB now). Run one module with
//! `cargo test -p fedpool-client --test integration <module>::`.

mod adapters;
mod cli_eval;
mod cli_train;
mod data_builtin;
mod data_files;
mod kernels;
mod lm_train;
mod load_errors;
mod peft_interop;
mod reference;
mod select_usage;
mod smollm2;
mod support;
mod train_gradients;
mod train_importance;
mod train_learning;
mod train_lora_forms;
mod train_selection;
mod train_support;
mod ungranted_triplets;
