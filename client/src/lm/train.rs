//! The causal-LM training loop (loss on response tokens only) and evaluation by generation.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use fedpool_common::adapter::{AdapterKind, AdapterPool, PoolSpec, SlotUsage};

use super::format::{LmExample, LmTokenizer};
use crate::model::{Hooks, LlamaModel};
use crate::select::{cosine_similarity, matched_cosine, top_k, Selection, SlotCounter};
use crate::train::{
    weight_decays, AdapterTensors, BatchOrder, LoraTrain, Observer, Phase, SlotReport, TrainConfig, TrainError,
    TrainOutcome, TrainReport, TrainableParams,
};

/// The most tokens generated for one answer in evaluation (answers are words or short phrases;
/// the longest gold answer of the set, plus its end token, bounds it first).
pub const MAX_ANSWER_TOKENS: usize = 32;

/// Held-out numbers of a decoder with adapters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct LmEval {
    /// Fraction of examples whose generated answer is the response exactly (case and surrounding
    /// space aside).
    pub exact_match: f64,
    /// Macro-F1 of the generated answers over the task's answers (an answer outside them counts as
    /// wrong for every class).
    pub macro_f1: f64,
    /// Mean NLL per response token, teacher-forced (the end token included).
    pub loss: f64,
    /// `e^loss`.
    pub perplexity: f64,
    /// Examples evaluated.
    pub examples: usize,
}

/// The frozen queries of FedIns selection: the mean of the base model's last hidden state over
/// each example's prompt, cached by example id.
#[derive(Default)]
struct Queries {
    by_id: HashMap<u64, Vec<f32>>,
}

impl Queries {
    /// `[B, hidden]` for `rows`, computing the missing ones in one pass without adapters.
    fn batch(&mut self, model: &LlamaModel, rows: &[&LmExample]) -> Result<Tensor, TrainError> {
        let missing: Vec<&LmExample> = rows.iter().copied().filter(|e| !self.by_id.contains_key(&e.id)).collect();
        if !missing.is_empty() {
            let prompts: Vec<Vec<u32>> = missing.iter().map(|e| e.prompt().to_vec()).collect();
            let (x, offsets) = model.hidden(&prompts, &Hooks::new())?;
            for (b, e) in missing.iter().enumerate() {
                let mean = x.narrow(0, offsets[b], offsets[b + 1] - offsets[b])?.mean(0)?;
                self.by_id.insert(e.id, mean.to_vec1::<f32>()?);
            }
        }
        let hidden = model.config().hidden_size;
        let mut flat = Vec::with_capacity(rows.len() * hidden);
        for e in rows {
            let query = self.by_id.get(&e.id).ok_or(TrainError::MissingQuery(e.id))?;
            flat.extend_from_slice(query);
        }
        Ok(Tensor::from_vec(flat, (rows.len(), hidden), model.device())?)
    }
}

/// Each row's slots (top-k by cosine of its query with the keys) and the matched cosines, or the
/// single slot of a pool without keys.
fn select(
    model: &LlamaModel,
    adapters: &AdapterTensors<'_>,
    rows: &[&LmExample],
    queries: &mut Queries,
) -> Result<(Selection, Option<Tensor>), TrainError> {
    let spec = adapters.spec();
    if !spec.has_keys() {
        return Ok((Selection::single(rows.len()), None));
    }
    let similarity = cosine_similarity(&queries.batch(model, rows)?, adapters.keys()?)?;
    let selection = top_k(&similarity, spec.top_k)?;
    let matched = matched_cosine(&similarity, &selection)?;
    Ok((selection, Some(matched)))
}

/// The mean NLL per response token of `rows` with `hooks` (a scalar tensor, tracked when the
/// hooks are), and the number of response tokens.
fn response_loss(model: &LlamaModel, rows: &[&LmExample], hooks: &Hooks) -> Result<(Tensor, usize), TrainError> {
    let ids: Vec<Vec<u32>> = rows.iter().map(|e| e.ids.clone()).collect();
    let (x, offsets) = model.hidden(&ids, hooks)?;
    head_loss(model, &x, &offsets, rows)
}

/// The loss of the final hidden states `x` (packed by `offsets`) on the rows' responses.
fn head_loss(
    model: &LlamaModel,
    x: &Tensor,
    offsets: &[usize],
    rows: &[&LmExample],
) -> Result<(Tensor, usize), TrainError> {
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for (b, e) in rows.iter().enumerate() {
        // The state at position t predicts token t + 1: the response's tokens from the prompt's last.
        for t in e.prompt_len..e.ids.len() {
            positions.push((offsets[b] + t - 1) as u32);
            targets.push(e.ids[t]);
        }
    }
    let n = positions.len();
    let states = x.index_select(&Tensor::from_vec(positions, n, model.device())?, 0)?;
    let targets = Tensor::from_vec(targets, n, model.device())?;
    Ok((candle_nn::loss::cross_entropy(&model.logits(&states)?, &targets)?, n))
}

/// The gradients of `weight · (response loss)` for `vars` with gradient checkpointing: a forward
/// pass without a graph keeps each layer's input; then, from the top, each segment is run again
/// from its input (a fresh leaf) and back-propagated on its own, its input's gradient carried
/// to the segment below. Layers below the lowest adapted one are not revisited. Returns the loss
/// (unweighted) and the gradients.
fn checkpointed_gradients(
    model: &LlamaModel,
    rows: &[&LmExample],
    hooks: &Hooks,
    vars: &[Var],
    weight: f64,
) -> Result<(f32, GradStore), TrainError> {
    let ids: Vec<Vec<u32>> = rows.iter().map(|e| e.ids.clone()).collect();
    let (x0, segments) = model.begin(&ids, hooks)?;
    let layers = model.num_layers();
    let mut inputs = Vec::with_capacity(layers + 1);
    inputs.push(x0);
    for l in 0..layers {
        // Detached: the layer's intermediate tensors are freed as soon as its output exists.
        let next = model.layer_forward(l, &inputs[l], &segments)?.detach();
        inputs.push(next);
    }
    let lowest = (0..layers).find(|&l| model.layer_adapted(l, hooks)).unwrap_or(layers);
    let mut total = GradStore::default();
    let top = Var::from_tensor(&inputs[layers])?;
    let (loss, _) = head_loss(model, &model.final_norm(top.as_tensor(), &segments)?, segments.offsets(), rows)?;
    let value = loss.to_scalar::<f32>()?;
    let grads = (loss * weight)?.backward()?;
    accumulate(&mut total, &grads, vars)?;
    let mut upstream = grads.get(top.as_tensor()).cloned();
    for l in (lowest..layers).rev() {
        let Some(g) = upstream.take() else { break };
        let input = Var::from_tensor(&inputs[l])?;
        let output = model.layer_forward(l, input.as_tensor(), &segments)?;
        let grads = (output * g)?.sum_all()?.backward()?;
        accumulate(&mut total, &grads, vars)?;
        upstream = grads.get(input.as_tensor()).cloned();
    }
    Ok((value, total))
}

/// Adds `part`'s gradients of `vars` into `total`.
fn accumulate(total: &mut GradStore, part: &GradStore, vars: &[Var]) -> Result<(), TrainError> {
    for var in vars {
        if let Some(g) = part.get(var.as_tensor()) {
            let sum = match total.remove(var.as_tensor()) {
                Some(t) => (t + g)?,
                None => g.clone(),
            };
            total.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Checks that every example has a prompt and a response within the context.
fn check_examples(model: &LlamaModel, examples: &[LmExample]) -> Result<(), TrainError> {
    let context = model.config().max_position_embeddings;
    for e in examples {
        if e.prompt_len == 0 || e.prompt_len >= e.ids.len() || e.ids.len() > context {
            return Err(TrainError::Input(format!(
                "example {}: {} prompt and {} response tokens; expected both non-empty, {context} at most in all",
                e.id,
                e.prompt_len,
                e.ids.len().saturating_sub(e.prompt_len)
            )));
        }
    }
    Ok(())
}

/// Trains the adapters of `start` (which follows `spec`: standard LoRA, AdaLoRA, or an SSF pool,
/// without a head) on `train` for `config.steps` steps, the loss on response tokens only, and
/// evaluates `eval` by generation (answers decoded with `tokenizer`). Of `config` the decoder uses the steps, batch size, learning
/// rate and schedule, weight decay, seed, FedIns' λ, the evaluation batch size and `lora_train`.
#[allow(clippy::too_many_arguments)]
pub fn train_lm(
    model: &LlamaModel,
    spec: &PoolSpec,
    start: &AdapterPool,
    train: &[LmExample],
    eval: &[LmExample],
    tokenizer: &LmTokenizer,
    config: &TrainConfig,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome, TrainError> {
    let t0 = Instant::now();
    start.validate(spec)?;
    if spec.head.is_some() {
        return Err(TrainError::Input("a causal LM trains no classification head: the spec has one".into()));
    }
    if train.is_empty() {
        return Err(TrainError::EmptyData("training"));
    }
    if config.steps == 0 || config.batch_size == 0 || !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(TrainError::Input(format!(
            "steps ({}), batch size ({}) and learning rate ({}) must be positive",
            config.steps, config.batch_size, config.lr
        )));
    }
    if config.head_only {
        return Err(TrainError::Input("a causal LM has no linear probe (head_only)".into()));
    }
    if config.lora_train != LoraTrain::Both && spec.kind != AdapterKind::Lora {
        return Err(TrainError::Input("training one LoRA factor (ffa, rolora) needs standard LoRA".into()));
    }
    check_examples(model, train)?;
    check_examples(model, eval)?;
    let device = model.device();
    let params = TrainableParams::with_frozen(start, false, config.lora_train, device)?;
    let (decay, _) = weight_decays(spec, config)?;
    let (adapter_vars, _) = params.trainable_vars_by_group();
    let vars = params.trainable_vars();
    let mut optimizer =
        AdamW::new(adapter_vars, ParamsAdamW { lr: config.lr, weight_decay: decay, ..Default::default() })?;
    let mut order = BatchOrder::new(train.len(), config.batch_size, config.seed);
    let mut queries = Queries::default();
    let mut counter = SlotCounter::new(spec.pool_size);
    let mut last_selection: HashMap<u64, Vec<u32>> = HashMap::new();
    let (mut loss_sum, mut seen) = (0.0f64, 0usize);

    let t_train = Instant::now();
    observer.phase(Phase::Train, config.steps);
    for step in 0..config.steps {
        optimizer.set_learning_rate(config.schedule.lr(config.lr, step, config.warmup_steps, config.steps));
        let rows: Vec<&LmExample> = order.next_batch().into_iter().map(|i| &train[i]).collect();
        let adapters = params.tracked(spec, false);
        let (selection, matched) = select(model, &adapters, &rows, &mut queries)?;
        let hooks = adapters.hooks(&selection)?;
        // FedIns: (1 − λ)·CE + λ·mean(1 − cos(query, matched keys)); CE alone without keys.
        let lambda = if matched.is_some() { config.lambda_match } else { 0.0 };
        let matching = matched.map(|m| m.affine(-1.0, 1.0)?.mean_all()? * lambda).transpose()?;
        let (value, grads) = if config.checkpoint_layers {
            let (ce, mut grads) = checkpointed_gradients(model, &rows, &hooks, &vars, 1.0 - lambda)?;
            let mut value = (1.0 - lambda as f32) * ce;
            if let Some(m) = matching {
                value += m.to_scalar::<f32>()?;
                accumulate(&mut grads, &m.backward()?, &vars)?;
            }
            (value, grads)
        } else {
            let (ce, _) = response_loss(model, &rows, &hooks)?;
            let loss = match matching {
                Some(m) => ((ce * (1.0 - lambda))? + m)?,
                None => ce,
            };
            (loss.to_scalar::<f32>()?, loss.backward()?)
        };
        if !value.is_finite() {
            return Err(TrainError::Diverged(step));
        }
        optimizer.step(&grads)?;
        for (i, e) in rows.iter().enumerate() {
            last_selection.insert(e.id, selection.row(i).to_vec());
        }
        loss_sum += f64::from(value);
        seen += rows.len();
        observer.progress(step + 1, Some(value));
    }
    observer.finish();
    let train_seconds = t_train.elapsed().as_secs_f64();

    let t_eval = Instant::now();
    let detached = params.detached(spec, false);
    let result = if eval.is_empty() {
        LmEval::default()
    } else {
        evaluate_inner(model, &detached, eval, tokenizer, config.eval_batch_size, &mut queries, observer)?
    };
    let eval_seconds = t_eval.elapsed().as_secs_f64();

    for slots in last_selection.values() {
        counter.record_row(slots);
    }
    let pool = params.to_pool()?;
    let full = pool.delta_from(start)?;
    let usage = match spec.kind {
        AdapterKind::SsfPool if spec.pool_size == 1 => {
            Some(SlotUsage { slots: vec![0], counts: vec![last_selection.len() as u64] })
        }
        AdapterKind::SsfPool => Some(counter.usage().ok_or_else(|| TrainError::Input("no slot was selected".into()))?),
        AdapterKind::Lora | AdapterKind::AdaLora => None,
    };
    let mut delta = match &usage {
        Some(u) => full.restrict_to_slots(u.clone())?,
        None => full,
    };
    config.lora_train.drop_frozen(&mut delta);
    let slot_usage = spec.has_keys().then(|| SlotReport::new(&counter, spec.pool_size, vec![0; spec.pool_size]));
    let metrics = TrainReport {
        accuracy: result.exact_match,
        macro_f1: result.macro_f1,
        eval_loss: result.loss,
        eval_examples: result.examples,
        examples: train.len(),
        train_loss: loss_sum / config.steps as f64,
        train_accuracy: 0.0,
        steps: config.steps,
        samples_seen: seen,
        wall_seconds: t0.elapsed().as_secs_f64(),
        query_seconds: 0.0,
        train_seconds,
        eval_seconds,
        samples_per_second: seen as f64 / train_seconds.max(1e-9),
        curve: Vec::new(),
    };
    Ok(TrainOutcome { pool, delta, metrics, importance: Vec::new(), slot_usage, usage })
}

/// Exact match and macro-F1 of greedy answers, and the teacher-forced perplexity of the
/// responses, of `adapters` (detached) on `examples`, in batches of `batch_size`; answers are
/// decoded (and generation stopped) with `tokenizer`.
pub fn evaluate_lm(
    model: &LlamaModel,
    adapters: &AdapterTensors<'_>,
    examples: &[LmExample],
    tokenizer: &LmTokenizer,
    batch_size: usize,
    observer: &mut dyn Observer,
) -> Result<LmEval, TrainError> {
    check_examples(model, examples)?;
    evaluate_inner(model, adapters, examples, tokenizer, batch_size, &mut Queries::default(), observer)
}

fn evaluate_inner(
    model: &LlamaModel,
    adapters: &AdapterTensors<'_>,
    examples: &[LmExample],
    tokenizer: &LmTokenizer,
    batch_size: usize,
    queries: &mut Queries,
    observer: &mut dyn Observer,
) -> Result<LmEval, TrainError> {
    if examples.is_empty() {
        return Err(TrainError::EmptyData("evaluation"));
    }
    observer.phase(Phase::Eval, examples.len());
    let max_new = examples.iter().map(|e| e.ids.len() - e.prompt_len).max().unwrap_or(1).min(MAX_ANSWER_TOKENS);
    // The task's answers by text; a generated text that is none of them is class `num_answers`.
    let mut answers: HashMap<String, usize> = HashMap::new();
    for e in examples {
        answers.entry(normalise(&e.response)).or_insert(e.answer);
    }
    let num_answers = examples.iter().map(|e| e.answer + 1).max().unwrap_or(0);
    let (mut nll_sum, mut tokens) = (0.0f64, 0usize);
    let (mut predicted, mut gold) = (Vec::with_capacity(examples.len()), Vec::with_capacity(examples.len()));
    for chunk in examples.chunks(batch_size.max(1)) {
        let rows: Vec<&LmExample> = chunk.iter().collect();
        let (selection, _) = select(model, adapters, &rows, queries)?;
        let hooks = adapters.hooks(&selection)?;
        let (loss, n) = response_loss(model, &rows, &hooks)?;
        nll_sum += f64::from(loss.to_scalar::<f32>()?) * n as f64;
        tokens += n;
        let prompts: Vec<Vec<u32>> = rows.iter().map(|e| e.prompt().to_vec()).collect();
        for (e, ids) in rows.iter().zip(model.generate(&prompts, &hooks, max_new, tokenizer.stop_tokens())?) {
            let text = normalise(&tokenizer.decode_answer(&ids)?);
            predicted.push(answers.get(&text).copied().unwrap_or(num_answers));
            gold.push(e.answer);
        }
        observer.progress(predicted.len(), None);
    }
    observer.finish();
    let exact = predicted.iter().zip(&gold).filter(|(p, g)| p == g).count();
    let loss = nll_sum / tokens.max(1) as f64;
    Ok(LmEval {
        exact_match: exact as f64 / examples.len() as f64,
        macro_f1: macro_f1_over(&predicted, &gold),
        loss,
        perplexity: loss.exp(),
        examples: examples.len(),
    })
}

/// Macro-F1 over the gold answers' classes only (a prediction outside them is wrong, never a
/// class of its own).
fn macro_f1_over(predicted: &[usize], gold: &[usize]) -> f64 {
    let present: std::collections::BTreeSet<usize> = gold.iter().copied().collect();
    let f1s: Vec<f64> = present
        .iter()
        .map(|&c| {
            let tp = predicted.iter().zip(gold).filter(|(p, g)| **p == c && **g == c).count() as f64;
            let fp = predicted.iter().zip(gold).filter(|(p, g)| **p == c && **g != c).count() as f64;
            let fnn = predicted.iter().zip(gold).filter(|(p, g)| **p != c && **g == c).count() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fnn)
            }
        })
        .collect();
    f1s.iter().sum::<f64>() / f1s.len().max(1) as f64
}

/// An answer as compared: lower case, surrounding space and a final full stop removed.
fn normalise(text: &str) -> String {
    text.trim().trim_end_matches('.').trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_compare_without_case_space_or_a_full_stop() {
        assert_eq!(normalise(" Positive.\n"), "positive");
        // Two classes; one prediction outside both.
        let f1 = macro_f1_over(&[0, 2, 1, 1], &[0, 0, 1, 1]);
        // Class 0: tp 1, fn 1 → 2/3; class 1: tp 2, fp 0 → 1.
        assert!((f1 - (2.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
    }
}
