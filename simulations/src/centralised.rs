//! The centralised reference: the same adapter fine-tuned on the union of every client's training
//! data (what a federation could at best hope to match), scored on the union of their held-out
//! examples. It sees as many training examples as the whole federation does over all its rounds
//! (`rounds × clients_per_round × local_steps` steps of the same batch size).

use std::time::Instant;

use fedpool_client::learner::{Examples, Learner};
use fedpool_client::train::{self, CurvePoint, EvalMetrics, QueryCache, Silent, TrainConfig};
use fedpool_common::adapter::AdapterPool;
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::experiment::Experiment;
use crate::population::Population;

/// The centralised run's numbers (`centralised.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralisedResult {
    /// `<experiment name>-centralised`.
    pub name: String,
    /// Accuracy on the union of the clients' held-out examples.
    pub accuracy: f64,
    /// Macro-F1 on the same examples (of the union, not a mean over clients).
    pub macro_f1: f64,
    /// Mean loss on the same examples.
    pub loss: f64,
    /// Held-out examples.
    pub examples: u64,
    /// Training examples available (the union of the clients' training sets).
    pub train_examples: u64,
    /// Optimisation steps taken.
    pub steps: u64,
    /// Wall-clock seconds of training and evaluation.
    pub wall_seconds: f64,
    /// The seed of the initialisation, batch order and dropout.
    pub init_seed: u64,
    /// Held-out metrics every `eval_every` steps (empty without it).
    pub curve: Vec<CurvePoint>,
}

/// What a centralised run may change of the experiment.
#[derive(Debug, Clone, Copy, Default)]
pub struct CentralisedOptions {
    /// Seed of the initialisation, batch order and dropout (None: the experiment's seed).
    pub init_seed: Option<u64>,
    /// Evaluate every this many steps as well as at the end.
    pub eval_every: Option<usize>,
}

/// Trains the experiment's adapter on the union of the clients' training data and evaluates it on
/// the union of their held-out data.
pub fn run_centralised(
    exp: &Experiment,
    pop: &Population,
    options: &CentralisedOptions,
) -> Result<CentralisedResult, SimError> {
    let t = Instant::now();
    let train_rows = Examples::concat(pop.clients.iter().map(|c| &c.train))?;
    let eval_rows = Examples::concat(pop.clients.iter().map(|c| &c.eval))?;
    let steps = exp.federation.rounds as usize * exp.clients_per_round() * exp.federation.local_steps as usize;
    let seed = options.init_seed.unwrap_or(exp.seed);
    let config = TrainConfig { steps, seed, eval_every: options.eval_every, ..exp.train_config()? };
    let start = AdapterPool::init(&pop.spec, seed)?;
    let mut queries = QueryCache::new(pop.learner.hidden_size());
    let (m, curve) = match &pop.learner {
        Learner::Encoder(b) => {
            let data = train::TrainData { train: train_rows.encoded()?, eval: eval_rows.encoded()?, pad_id: b.pad_id };
            let m = train::train(&b.model, &pop.spec, &start, data, &mut queries, &config, &mut Silent)?.metrics;
            (
                EvalMetrics {
                    accuracy: m.accuracy,
                    macro_f1: m.macro_f1,
                    loss: m.eval_loss,
                    examples: m.eval_examples,
                },
                m.curve,
            )
        }
        // A decoder: trained, then its pool evaluated by generation (no curve).
        Learner::Decoder(_) => {
            let pool = pop.learner.train(&pop.spec, &start, &train_rows, &mut queries, &config)?.pool;
            (pop.learner.evaluate(&pop.spec, &pool, &eval_rows, &mut queries, &config)?, Vec::new())
        }
    };
    Ok(CentralisedResult {
        name: format!("{}-centralised", exp.name),
        accuracy: m.accuracy,
        macro_f1: m.macro_f1,
        loss: m.loss,
        examples: m.examples as u64,
        train_examples: train_rows.len() as u64,
        steps: steps as u64,
        wall_seconds: t.elapsed().as_secs_f64(),
        init_seed: seed,
        curve,
    })
}
