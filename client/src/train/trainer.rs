//! The training loop and evaluation.

use std::time::Instant;

use candle_core::D;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolSpec, SlotUsage};

use super::batches::{length_sorted_chunks, Batch, BatchOrder, Encoded};
use super::forward::forward;
use super::importance::{orthogonality, ImportanceTracker};
use super::metrics::{accuracy, macro_f1, EvalMetrics};
use super::params::{AdapterTensors, TrainableParams};
use super::queries::QueryCache;
use super::{
    CurvePoint, LoraTrain, Observer, Phase, SlotReport, TrainConfig, TrainData, TrainError, TrainOutcome, TrainReport,
};
use crate::model::{BertEncoder, Dropout};
use crate::select::SlotCounter;

/// Checks labels and lengths of `examples` against the head and the configuration.
fn check_examples(examples: &[Encoded], num_labels: usize, max_len: usize) -> Result<(), TrainError> {
    for e in examples {
        if e.label >= num_labels {
            return Err(TrainError::UnknownLabel { id: e.id, label: e.label, num_labels });
        }
        if e.tokens.is_empty() || e.tokens.len() > max_len {
            return Err(TrainError::Input(format!(
                "example {} has {} tokens, expected 1..={max_len}",
                e.id,
                e.tokens.len()
            )));
        }
    }
    Ok(())
}

/// The dropout probability of a run: the configuration's, else the model's `hidden_dropout_prob`.
pub fn dropout_probability(model: &BertEncoder, config: &TrainConfig) -> Result<f64, TrainError> {
    let p = config.dropout.unwrap_or(model.config().hidden_dropout_prob);
    if !(0.0..1.0).contains(&p) {
        return Err(TrainError::Input(format!("dropout {p} must be in [0, 1)")));
    }
    Ok(p)
}

/// AdamW's weight decay for (adapter, head) tensors: in LoRA specs the factors and the head decay
/// by `config.weight_decay` (as a PEFT run with PyTorch's AdamW); SSF specs never decay (it pulls
/// γ toward 0, and a pooled head's unused slots would move without being trained).
pub fn weight_decays(spec: &PoolSpec, config: &TrainConfig) -> Result<(f64, f64), TrainError> {
    let wd = config.weight_decay;
    if !(wd.is_finite() && wd >= 0.0) {
        return Err(TrainError::Input(format!("weight decay {wd} must be finite and at least 0")));
    }
    Ok(if spec.kind.is_lora() { (wd, wd) } else { (0.0, 0.0) })
}

/// Trains the adapters of `start` (which follows `spec`) on `data.train` for `config.steps`
/// steps and evaluates on `data.eval`. `queries` is filled with any frozen features the run needs
/// (SSF pools with selection, the linear probe) that it does not hold yet.
pub fn train(
    model: &BertEncoder,
    spec: &PoolSpec,
    start: &AdapterPool,
    data: TrainData<'_>,
    queries: &mut QueryCache,
    config: &TrainConfig,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome, TrainError> {
    let t0 = Instant::now();
    start.validate(spec)?;
    let head = spec.head.ok_or_else(|| TrainError::Input("the pool spec has no classification head".into()))?;
    if data.train.is_empty() {
        return Err(TrainError::EmptyData("training"));
    }
    if config.steps == 0 || config.batch_size == 0 || !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(TrainError::Input(format!(
            "steps ({}), batch size ({}) and learning rate ({}) must be positive",
            config.steps, config.batch_size, config.lr
        )));
    }
    let max_len = config.max_len.min(model.config().max_position_embeddings);
    check_examples(data.train, head.num_labels, max_len)?;
    check_examples(data.eval, head.num_labels, max_len)?;
    if config.head_only && spec.kind != AdapterKind::SsfPool {
        return Err(TrainError::Input("the linear probe uses an SSF spec left at the identity".into()));
    }
    let device = model.device();

    // Queries are computed lazily, only for the examples a run touches: the held-out set now, each
    // training batch's new rows when it comes.
    let need_queries = spec.has_keys() || config.head_only;
    let mut query_seconds = 0.0;
    if need_queries && !data.eval.is_empty() {
        let t = Instant::now();
        observer.phase(Phase::Queries, data.eval.len());
        queries.fill(model, data.eval, config.eval_batch_size, data.pad_id)?;
        observer.progress(data.eval.len(), None);
        observer.finish();
        query_seconds += t.elapsed().as_secs_f64();
    }

    if config.lora_train != LoraTrain::Both && spec.kind != AdapterKind::Lora {
        return Err(TrainError::Input(
            "training one LoRA factor (ffa, rolora) needs standard LoRA (adapter lora)".into(),
        ));
    }
    let params = TrainableParams::with_frozen(start, config.head_only, config.lora_train, device)?;
    let head_lr = config.head_lr.unwrap_or(config.lr);
    if !(head_lr.is_finite() && head_lr > 0.0) {
        return Err(TrainError::Input(format!("head learning rate {head_lr} must be positive")));
    }
    let dropout = dropout_probability(model, config)?;
    let (adapter_vars, head_vars) = params.trainable_vars_by_group();
    let (adapter_decay, head_decay) = weight_decays(spec, config)?;
    let adamw = |lr, weight_decay| ParamsAdamW { lr, weight_decay, ..Default::default() };
    let mut optimizer = AdamW::new(adapter_vars, adamw(config.lr, adapter_decay))?;
    let mut head_optimizer = AdamW::new(head_vars, adamw(head_lr, head_decay))?;
    let mut order = BatchOrder::new(data.train.len(), config.batch_size, config.seed);
    let mut counter = SlotCounter::new(spec.pool_size);
    let mut last_selection: std::collections::HashMap<u64, Vec<u32>> = std::collections::HashMap::new();
    let mut tracker = ImportanceTracker::new(spec);
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
    let mut curve = Vec::new();

    let t_train = Instant::now();
    observer.phase(Phase::Train, config.steps);
    for step in 0..config.steps {
        optimizer.set_learning_rate(config.schedule.lr(config.lr, step, config.warmup_steps, config.steps));
        head_optimizer.set_learning_rate(config.schedule.lr(head_lr, step, config.warmup_steps, config.steps));
        let rows: Vec<&Encoded> = order.next_batch().into_iter().map(|i| &data.train[i]).collect();
        let batch = Batch::pad(&rows, data.pad_id, device)?;
        let q = if need_queries {
            let t = Instant::now();
            queries.fill(model, rows.iter().copied(), config.batch_size, data.pad_id)?;
            query_seconds += t.elapsed().as_secs_f64();
            Some(queries.batch(&batch.example_ids, device)?)
        } else {
            None
        };
        let row_keys = batch.example_ids.iter().map(|&id| Dropout::row_key(config.seed, step, id)).collect();
        let adapters = params.tracked(spec, config.head_only).with_dropout(Dropout { p: dropout, row_keys });
        let out = forward(model, &adapters, &batch, q.as_ref(), config.lambda_match)?;
        let mut loss = out.loss()?;
        if spec.kind == AdapterKind::AdaLora && config.orth_reg_weight > 0.0 {
            loss = (loss + (orthogonality(&adapters)? * config.orth_reg_weight)?)?;
        }
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged(step));
        }
        let grads = loss.backward()?;
        if let Some(t) = tracker.as_mut() {
            t.update(&params, &grads)?;
        }
        optimizer.step(&grads)?;
        head_optimizer.step(&grads)?;

        for (i, &id) in batch.example_ids.iter().enumerate() {
            last_selection.insert(id, out.selection.row(i).to_vec());
        }
        let predictions = out.predictions()?;
        correct += predictions.iter().zip(&batch.label_values).filter(|(p, l)| p == l).count();
        seen += batch.len();
        loss_sum += f64::from(loss_value);
        observer.progress(step + 1, Some(loss_value));
        let due = config.eval_every.is_some_and(|n| n > 0 && (step + 1).is_multiple_of(n) && step + 1 < config.steps);
        if due && !data.eval.is_empty() {
            let detached = params.detached(spec, config.head_only);
            let m = evaluate(model, &detached, data.eval, queries, config, data.pad_id)?;
            curve.push(CurvePoint { step: step + 1, accuracy: m.accuracy, macro_f1: m.macro_f1, loss: m.loss });
        }
    }
    observer.finish();
    let train_seconds = t_train.elapsed().as_secs_f64();

    let t_eval = Instant::now();
    let detached = params.detached(spec, config.head_only);
    let (eval, eval_counts) = if data.eval.is_empty() {
        (EvalMetrics::default(), vec![0; spec.pool_size])
    } else {
        observer.phase(Phase::Eval, data.eval.len());
        let r = evaluate_with_usage(model, &detached, data.eval, queries, config, data.pad_id, observer)?;
        observer.finish();
        r
    };
    let eval_seconds = t_eval.elapsed().as_secs_f64();
    if config.eval_every.is_some() && !data.eval.is_empty() {
        curve.push(CurvePoint {
            step: config.steps,
            accuracy: eval.accuracy,
            macro_f1: eval.macro_f1,
            loss: eval.loss,
        });
    }

    // Usage counts what each distinct example selected at its last visit: a count is a number of
    // examples (the server refuses counts above the example count), whatever the number of epochs.
    for slots in last_selection.values() {
        counter.record_row(slots);
    }
    let pool = params.to_pool()?;
    let full_delta = pool.delta_from(start)?;
    let usage = match spec.kind {
        AdapterKind::SsfPool => Some(if spec.pool_size == 1 {
            SlotUsage { slots: vec![0], counts: vec![last_selection.len() as u64] }
        } else {
            counter.usage().ok_or_else(|| TrainError::Input("no slot was selected".into()))?
        }),
        AdapterKind::Lora | AdapterKind::AdaLora => None,
    };
    let mut delta = match &usage {
        Some(u) => full_delta.restrict_to_slots(u.clone())?,
        None => full_delta,
    };
    config.lora_train.drop_frozen(&mut delta);
    let slot_usage = spec.has_keys().then(|| SlotReport::new(&counter, spec.pool_size, eval_counts));
    let metrics = TrainReport {
        accuracy: eval.accuracy,
        macro_f1: eval.macro_f1,
        eval_loss: eval.loss,
        eval_examples: eval.examples,
        examples: data.train.len(),
        train_loss: loss_sum / config.steps as f64,
        train_accuracy: correct as f64 / seen.max(1) as f64,
        steps: config.steps,
        samples_seen: seen,
        wall_seconds: t0.elapsed().as_secs_f64(),
        query_seconds,
        train_seconds,
        eval_seconds,
        samples_per_second: seen as f64 / train_seconds.max(1e-9),
        curve,
    };
    let importance = tracker.map(|t| t.scores()).unwrap_or_default();
    Ok(TrainOutcome { pool, delta, metrics, importance, slot_usage, usage })
}

/// Accuracy, macro-F1 and mean loss of `adapters` on `examples`, in length-sorted batches with
/// no gradient. `queries` must hold the examples' queries when the adapter needs them.
pub fn evaluate(
    model: &BertEncoder,
    adapters: &AdapterTensors<'_>,
    examples: &[Encoded],
    queries: &QueryCache,
    config: &TrainConfig,
    pad_id: u32,
) -> Result<EvalMetrics, TrainError> {
    Ok(evaluate_with_usage(model, adapters, examples, queries, config, pad_id, &mut super::Silent)?.0)
}

/// Accuracy, macro-F1 and mean loss of a finished `pool` on `examples`: checks the pool against
/// `spec` and the examples against its head and `config.max_len`, computes the frozen queries the
/// spec needs (those not in `queries` yet), and runs [`evaluate`].
pub fn evaluate_pool(
    model: &BertEncoder,
    spec: &PoolSpec,
    pool: &AdapterPool,
    examples: &[Encoded],
    queries: &mut QueryCache,
    config: &TrainConfig,
    pad_id: u32,
) -> Result<EvalMetrics, TrainError> {
    pool.validate(spec)?;
    let head = spec.head.ok_or_else(|| TrainError::Input("the pool spec has no classification head".into()))?;
    if examples.is_empty() {
        return Err(TrainError::EmptyData("evaluation"));
    }
    if config.eval_batch_size == 0 {
        return Err(TrainError::Input("the evaluation batch size must be positive".into()));
    }
    check_examples(examples, head.num_labels, config.max_len.min(model.config().max_position_embeddings))?;
    if config.head_only && spec.kind != AdapterKind::SsfPool {
        return Err(TrainError::Input("the linear probe uses an SSF spec left at the identity".into()));
    }
    if spec.has_keys() || config.head_only {
        queries.fill(model, examples, config.eval_batch_size, pad_id)?;
    }
    let adapters = AdapterTensors::from_pool(spec, pool, config.head_only, model.device())?;
    evaluate(model, &adapters, examples, queries, config, pad_id)
}

/// [`evaluate`], also counting the slots the examples select.
fn evaluate_with_usage(
    model: &BertEncoder,
    adapters: &AdapterTensors<'_>,
    examples: &[Encoded],
    queries: &QueryCache,
    config: &TrainConfig,
    pad_id: u32,
    observer: &mut dyn Observer,
) -> Result<(EvalMetrics, Vec<u64>), TrainError> {
    if examples.is_empty() {
        return Err(TrainError::EmptyData("evaluation"));
    }
    let spec = adapters.spec();
    let need_queries = spec.has_keys() || adapters.head_only();
    let mut counter = SlotCounter::new(spec.pool_size);
    let (mut predictions, mut labels, mut loss_sum) = (Vec::new(), Vec::new(), 0.0f64);
    for chunk in length_sorted_chunks(examples, config.eval_batch_size) {
        let rows: Vec<&Encoded> = chunk.iter().map(|&i| &examples[i]).collect();
        let batch = Batch::pad(&rows, pad_id, adapters.device())?;
        let q = if need_queries { Some(queries.batch(&batch.example_ids, adapters.device())?) } else { None };
        let out = forward(model, adapters, &batch, q.as_ref(), config.lambda_match)?;
        loss_sum += f64::from(out.cross_entropy.sum_all()?.to_scalar::<f32>()?);
        predictions.extend(out.logits.argmax(D::Minus1)?.to_vec1::<u32>()?.into_iter().map(|p| p as usize));
        labels.extend_from_slice(&batch.label_values);
        counter.record(&out.selection);
        observer.progress(labels.len(), None);
    }
    let num_labels = spec.head.map_or(0, |h| h.num_labels);
    let metrics = EvalMetrics {
        accuracy: accuracy(&predictions, &labels),
        macro_f1: macro_f1(&predictions, &labels, num_labels),
        loss: loss_sum / labels.len() as f64,
        examples: labels.len(),
    };
    Ok((metrics, counter.counts().to_vec()))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::{write_random_model, BertConfig};
    use crate::rng::SplitMix64;
    use crate::spec::{pool_spec, AdapterChoice, AdapterOptions};
    use crate::train::Silent;

    /// `n` examples of 2 classes: `[CLS]`, 3 to 9 tokens from a range of the tiny vocabulary that
    /// only its class uses, `[SEP]`; labels alternate.
    fn separable(n: usize, seed: u64) -> Vec<Encoded> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let label = i % 2;
                let mut tokens = vec![2];
                for _ in 0..3 + rng.below(7) {
                    tokens.push((4 + 50 * label + rng.below(8)) as u32);
                }
                tokens.push(3);
                Encoded { id: i as u64, tokens, label }
            })
            .collect()
    }

    #[test]
    fn evaluate_pool_on_the_trained_pool_equals_the_training_report() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &BertConfig::tiny(), 3).unwrap();
        let model = BertEncoder::load(dir.path(), &Device::Cpu).unwrap();
        let examples = separable(40, 7);
        let (train_rows, eval_rows) = examples.split_at(28);
        for choice in [AdapterChoice::SsfPool, AdapterChoice::Lora, AdapterChoice::LinearProbe] {
            let options = AdapterOptions { choice, pool_size: 4, top_k: 2, rank: 2, ..AdapterOptions::default() };
            let spec = pool_spec(model.config(), &options, 2).unwrap();
            let start = AdapterPool::init(&spec, 1).unwrap();
            let config = TrainConfig {
                steps: 4,
                batch_size: 8,
                warmup_steps: 1,
                lr: 2e-2,
                eval_batch_size: 5,
                head_only: choice.head_only(),
                ..TrainConfig::default()
            };
            let data = TrainData { train: train_rows, eval: eval_rows, pad_id: 0 };
            let mut train_queries = QueryCache::new(model.config().hidden_size);
            let outcome = train(&model, &spec, &start, data, &mut train_queries, &config, &mut Silent).unwrap();

            let mut queries = QueryCache::new(model.config().hidden_size);
            let got = evaluate_pool(&model, &spec, &outcome.pool, eval_rows, &mut queries, &config, 0).unwrap();
            let report = &outcome.metrics;
            assert_eq!(
                (got.accuracy, got.macro_f1, got.loss, got.examples),
                (report.accuracy, report.macro_f1, report.eval_loss, report.eval_examples),
                "{choice}"
            );
            let untrained = evaluate_pool(&model, &spec, &start, eval_rows, &mut queries, &config, 0).unwrap();
            assert_ne!(untrained.loss, got.loss, "{choice}: the metrics depend on the pool evaluated");
        }
    }

    #[test]
    fn evaluate_pool_refuses_a_pool_of_another_spec() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &BertConfig::tiny(), 3).unwrap();
        let model = BertEncoder::load(dir.path(), &Device::Cpu).unwrap();
        let options = AdapterOptions { pool_size: 4, top_k: 2, ..AdapterOptions::default() };
        let spec = pool_spec(model.config(), &options, 2).unwrap();
        let other = pool_spec(model.config(), &AdapterOptions { pool_size: 5, ..options }, 2).unwrap();
        let pool = AdapterPool::init(&other, 1).unwrap();
        let mut queries = QueryCache::new(model.config().hidden_size);
        let config = TrainConfig::default();
        let err = evaluate_pool(&model, &spec, &pool, &separable(6, 1), &mut queries, &config, 0).unwrap_err();
        assert!(matches!(err, TrainError::Pool(_)), "{err}");
        assert!(queries.is_empty(), "nothing is computed for a refused pool");
    }
}
