//! Causal-LM fine-tuning of a decoder ([`LlamaModel`](crate::model::LlamaModel)): prompt/response
//! pairs, the loss on response tokens only, evaluation by generation.
//!
//! ```text
//! Dataset ─ LmTask::pairs ─▶ PromptResponse ─ ChatFormat::encode ─▶ LmExample (ids, prompt_len)
//! train_lm(model, spec, start pool, examples, TrainConfig, observer) → TrainOutcome
//! evaluate_lm(model, adapters, examples, answers) → LmEval { exact match, macro-F1, perplexity }
//! ```
//! The pool, delta, slot usage and report are the classifier trainer's types
//! ([`crate::train::TrainOutcome`]): the codec, wire, merges and rank budgets treat a decoder's
//! adapters as any other. In a [`TrainReport`](crate::train::TrainReport) of a causal-LM run,
//! `accuracy` is the exact match of the generated answers, `macro_f1` their macro-F1 over the
//! answer set, and `eval_loss` the mean NLL per response token (perplexity = e^loss).

mod format;
mod task;
mod train;

pub use format::{ChatFormat, LmExample, LmTokenizer};
pub use task::{LmTask, PromptResponse};
pub use train::{evaluate_lm, train_lm, LmEval, MAX_ANSWER_TOKENS};
