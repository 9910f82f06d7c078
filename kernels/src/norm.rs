//! Fused CPU normalisation layers with their own backward: LayerNorm ([`layer_norm`]), LayerNorm
//! followed by an SSF scale-shift ([`layer_norm_scale_shift`]) and Llama's RMSNorm ([`rms_norm`]).
//!
//! Composed from candle ops, a LayerNorm is seven passes over `[rows, d]` forward (sum, subtract,
//! square, sum, divide, multiply, add; five of them write a new `[rows, d]` tensor) and more than
//! twice that backward. The fused forward reads each row once into cache, computes its statistics there and
//! writes `y` once; the backward reads `x` and the upstream gradient once and writes the
//! gradient once, recomputing `x̂` from `x` (the op's input) and the per-row mean and `1/std`
//! that the forward kept (two floats a row; nothing of size `[rows, d]` is kept).
//!
//! The statistics have the composed version's semantics: the variance is the biased mean of the
//! squared deviations (two passes over the cached row, not `E[x²] − E[x]²`), `eps` is added
//! inside the square root. Rows are split over rayon's global pool (candle's own), the inner
//! loops are plain slice loops, built for AVX2 + FMA when the CPU has them (see `fast_isa_fn!`).
//!
//! `weight` and `bias` are the frozen backbone's: the fused ops give them no gradient. When one
//! of them does track a gradient, or when any input is not on the CPU, the functions run the
//! composed candle ops instead (the `*_composed` functions, which are also the reference of the
//! tests), so that no gradient is dropped silently.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::simd::fast_isa_fn;

/// LayerNorm over the last dimension of `x` (f32, any rank ≥ 1) with a frozen `weight` and
/// `bias` (`[d]`): `(x − mean) / sqrt(var + eps) · weight + bias`. In a backward pass only `x`
/// gets a gradient. Fused on the CPU; the composed candle ops on other devices, or when `weight`
/// or `bias` tracks a gradient.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer-norm";
    check_vectors(OP, x, &[("weight", weight), ("bias", bias)])?;
    if !on_cpu(&[x, weight, bias]) || weight.track_op() || bias.track_op() {
        return layer_norm_composed(x, weight, bias, eps);
    }
    check_f32(OP, &[("x", x), ("weight", weight), ("bias", bias)])?;
    let x = x.contiguous()?;
    let op = LayerNorm {
        weight: weight.to_vec1()?,
        bias: bias.to_vec1()?,
        eps: eps as f32,
        keep_stats: x.track_op(),
        stats: OnceLock::new(),
    };
    x.apply_op1(op)
}

/// [`layer_norm`] composed from candle ops (the reference; any device and float dtype).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// LayerNorm followed by SSF in one pass: `y = (x̂·weight + bias) ⊙ scale[b] + shift[b]` for
/// `x: [B, T, d]` (f32), a frozen `weight`/`bias` (`[d]`), and a trainable `scale`/`shift` each
/// `[B, d]` (one row per batch row, broadcast over `T`) or `[1, d]` (shared by all rows). In a
/// backward pass `x`, `scale` and `shift` get gradients. Fused on the CPU; the composed candle
/// ops on other devices, or when `weight` or `bias` tracks a gradient.
pub fn layer_norm_scale_shift(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "layer-norm-scale-shift";
    let &[batch, _, d] = x.dims() else {
        bail!("{OP}: x has shape {:?}, expected [B, T, d]", x.dims());
    };
    check_vectors(OP, x, &[("weight", weight), ("bias", bias)])?;
    for (name, t) in [("scale", scale), ("shift", shift)] {
        if t.dims() != [batch, d] && t.dims() != [1, d] {
            bail!(
                "{OP}: {name} has shape {:?}, expected [{batch}, {d}] or [1, {d}] (x has shape {:?})",
                t.dims(),
                x.dims()
            );
        }
    }
    if !on_cpu(&[x, weight, bias, scale, shift]) || weight.track_op() || bias.track_op() {
        return layer_norm_scale_shift_composed(x, weight, bias, eps, scale, shift);
    }
    check_f32(OP, &[("x", x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)])?;
    let (x, scale, shift) = (x.contiguous()?, scale.contiguous()?, shift.contiguous()?);
    let op = LayerNormScaleShift {
        weight: weight.to_vec1()?,
        bias: bias.to_vec1()?,
        eps: eps as f32,
        keep_stats: x.track_op() || scale.track_op() || shift.track_op(),
        stats: OnceLock::new(),
    };
    x.apply_op3(&scale, &shift, op)
}

/// [`layer_norm_scale_shift`] composed from candle ops (the reference; any device and float dtype).
pub fn layer_norm_scale_shift_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<Tensor> {
    let y = layer_norm_composed(x, weight, bias, eps)?;
    y.broadcast_mul(&scale.unsqueeze(1)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// Llama's RMSNorm over the last dimension of `x` (f32, any rank ≥ 1) with a frozen `weight`
/// (`[d]`): `x / sqrt(mean(x²) + eps) · weight`. In a backward pass only `x` gets a gradient.
/// Fused on the CPU; the composed candle ops on other devices, or when `weight` tracks a gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "rms-norm";
    check_vectors(OP, x, &[("weight", weight)])?;
    if !on_cpu(&[x, weight]) || weight.track_op() {
        return rms_norm_composed(x, weight, eps);
    }
    check_f32(OP, &[("x", x), ("weight", weight)])?;
    let x = x.contiguous()?;
    let op = RmsNorm { weight: weight.to_vec1()?, eps: eps as f32, keep_stats: x.track_op(), stats: OnceLock::new() };
    x.apply_op1(op)
}

/// [`rms_norm`] composed from candle ops (the reference; any device and float dtype).
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Checks that `x` has at least one dimension and each of `params` has shape `[d]`, `d` the last
/// dimension of `x`.
fn check_vectors(op: &str, x: &Tensor, params: &[(&str, &Tensor)]) -> Result<()> {
    let Some(&d) = x.dims().last() else {
        bail!("{op}: x is a scalar, expected at least one dimension");
    };
    for (name, p) in params {
        if p.dims() != [d] {
            bail!("{op}: {name} has shape {:?}, expected [{d}] (x has shape {:?})", p.dims(), x.dims());
        }
    }
    Ok(())
}

/// Checks that every tensor is f32 (the fused CPU kernels' only dtype).
fn check_f32(op: &str, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if t.dtype() != DType::F32 {
            bail!("{op}: {name} is {:?}, the fused CPU op takes f32", t.dtype());
        }
    }
    Ok(())
}

/// True when every tensor lives on the CPU.
fn on_cpu(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu())
}

/// The f32 elements a contiguous layout covers.
fn cpu_slice<'a>(op: &str, what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: {what} is {:?}, expected f32", candle_core::backend::BackendStorage::dtype(storage));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: {what} is not contiguous (shape {:?}, stride {:?})", layout.dims(), layout.stride());
    };
    match data.get(start..end) {
        Some(s) => Ok(s),
        None => bail!("{op}: {what}'s layout reaches past its storage"),
    }
}

/// Runs `f` on the f32 elements of `t` (a CPU tensor), made contiguous first.
fn with_slice<R>(op: &str, what: &str, t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: {what} is on {:?}, expected the CPU", t.device().location());
    };
    f(cpu_slice(op, what, cpu, layout)?)
}

/// Keeps the forward's per-row statistics for the backward (set once, by the forward).
fn keep(op: &str, cell: &OnceLock<Vec<f32>>, stats: Vec<f32>) -> Result<()> {
    if cell.set(stats).is_err() {
        bail!("{op}: the forward ran twice on one op");
    }
    Ok(())
}

/// The statistics the forward kept.
fn kept<'a>(op: &str, cell: &'a OnceLock<Vec<f32>>) -> Result<&'a [f32]> {
    match cell.get() {
        Some(s) => Ok(s),
        None => bail!("{op}: backward without the forward's statistics (no input tracked a gradient)"),
    }
}

/// The LayerNorm op: the frozen parameters, and the per-row `[mean, 1/std]` for the backward.
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
    keep_stats: bool,
    stats: OnceLock<Vec<f32>>,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(self.name(), "x", storage, layout)?;
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![0f32; 2 * (x.len() / d.max(1))];
        let (rows, len) = row_tasks(x.len(), d);
        let (w, b, eps) = (&self.weight[..], &self.bias[..], self.eps);
        (y.par_chunks_mut(len), x.par_chunks(len), stats.par_chunks_mut(2 * rows))
            .into_par_iter()
            .for_each(|(y, x, st)| ln_fwd(y, x, st, w, b, eps));
        if self.keep_stats {
            keep(self.name(), &self.stats, stats)?;
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.name();
        let stats = kept(op, &self.stats)?;
        let d = self.weight.len();
        let dx = with_slice(op, "x", x, |xs| {
            with_slice(op, "the gradient", grad, |gs| {
                if gs.len() != xs.len() || stats.len() != 2 * (xs.len() / d.max(1)) {
                    bail!("{op}: gradient {:?} does not fit x {:?}", grad.dims(), x.dims());
                }
                let mut dx = vec![0f32; xs.len()];
                let (rows, len) = row_tasks(xs.len(), d);
                let w = &self.weight[..];
                (dx.par_chunks_mut(len), xs.par_chunks(len), gs.par_chunks(len), stats.par_chunks(2 * rows))
                    .into_par_iter()
                    .for_each(|(dx, x, g, st)| ln_bwd(dx, x, g, st, w));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The LayerNorm + scale-shift op: the frozen parameters, and the per-row `[mean, 1/std]`.
struct LayerNormScaleShift {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
    keep_stats: bool,
    stats: OnceLock<Vec<f32>>,
}

/// The shape of a scale-shift problem: `x: [batch, t, d]`, and whether the scale and the shift
/// have one row per batch row (else one row for all).
#[derive(Clone, Copy)]
struct SsfShape {
    batch: usize,
    t: usize,
    d: usize,
    scale_rows: bool,
    shift_rows: bool,
}

impl SsfShape {
    /// Reads the shape from the layouts, checking that they fit together.
    fn new(op: &str, x: &Layout, scale: &Layout, shift: &Layout) -> Result<Self> {
        let &[batch, t, d] = x.dims() else {
            bail!("{op}: x has shape {:?}, expected [B, T, d]", x.dims());
        };
        let rows = |what: &str, l: &Layout| match l.dims() {
            [1, n] if *n == d => Ok(false),
            [b, n] if *b == batch && *n == d => Ok(true),
            dims => bail!("{op}: {what} has shape {dims:?}, expected [{batch}, {d}] or [1, {d}]"),
        };
        Ok(Self { batch, t, d, scale_rows: rows("scale", scale)?, shift_rows: rows("shift", shift)? })
    }

    /// The scale (or shift) row of batch row `b`.
    #[inline(always)]
    fn row<'a>(&self, v: &'a [f32], per_batch: bool, b: usize) -> &'a [f32] {
        let b = if per_batch { b } else { 0 };
        &v[b * self.d..(b + 1) * self.d]
    }
}

/// The scale and shift of a scale-shift forward, with their shape.
#[derive(Clone, Copy)]
struct Ssf<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    shape: SsfShape,
}

impl CustomOp3 for LayerNormScaleShift {
    fn name(&self) -> &'static str {
        "layer-norm-scale-shift"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let shape = SsfShape::new(op, l1, l2, l3)?;
        let x = cpu_slice(op, "x", s1, l1)?;
        let ssf = Ssf { scale: cpu_slice(op, "scale", s2, l2)?, shift: cpu_slice(op, "shift", s3, l3)?, shape };
        let d = shape.d;
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![0f32; 2 * shape.batch * shape.t];
        let (rows, len) = row_tasks(x.len(), d);
        let (w, b, eps) = (&self.weight[..], &self.bias[..], self.eps);
        (y.par_chunks_mut(len), x.par_chunks(len), stats.par_chunks_mut(2 * rows))
            .into_par_iter()
            .enumerate()
            .for_each(|(task, (y, x, st))| ssf_fwd(y, x, st, (w, b, eps), ssf, task * rows));
        if self.keep_stats {
            keep(op, &self.stats, stats)?;
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let stats = kept(op, &self.stats)?;
        let sh = SsfShape::new(op, x.layout(), scale.layout(), shift.layout())?;
        let (d, t) = (sh.d, sh.t);
        let (dx, dscale, dshift) = with_slice(op, "x", x, |xs| {
            with_slice(op, "the gradient", grad, |gs| {
                with_slice(op, "scale", scale, |gamma_all| {
                    if gs.len() != xs.len() || stats.len() != 2 * sh.batch * t {
                        bail!("{op}: gradient {:?} does not fit x {:?}", grad.dims(), x.dims());
                    }
                    let mut dx = vec![0f32; xs.len()];
                    // Chunks of rows inside one batch row, each with its partial Σ ∂y·z and Σ ∂y.
                    let per_batch = rayon::current_num_threads().saturating_mul(4).div_ceil(sh.batch.max(1));
                    let chunk = t.div_ceil(per_batch).max(MIN_TASK_ELEMS.div_ceil(d.max(1))).max(1);
                    let (w, b) = (&self.weight[..], &self.bias[..]);
                    let partials: Vec<(usize, Vec<f32>)> = if xs.is_empty() {
                        Vec::new()
                    } else {
                        (dx.par_chunks_mut(t * d), xs.par_chunks(t * d), gs.par_chunks(t * d), stats.par_chunks(2 * t))
                            .into_par_iter()
                            .enumerate()
                            .flat_map(|(bi, (dx, x, g, st))| {
                                let gamma = sh.row(gamma_all, sh.scale_rows, bi);
                                let len = chunk * d;
                                (dx.par_chunks_mut(len), x.par_chunks(len), g.par_chunks(len), st.par_chunks(2 * chunk))
                                    .into_par_iter()
                                    .map(move |(dx, x, g, st)| {
                                        let mut part = vec![0f32; 2 * d];
                                        ssf_bwd(dx, &mut part, x, g, st, gamma, (w, b));
                                        (bi, part)
                                    })
                            })
                            .collect()
                    };
                    // Adding the partials up: one pass over a few rows of d.
                    let mut dscale = vec![0f32; if sh.scale_rows { sh.batch * d } else { d }];
                    let mut dshift = vec![0f32; if sh.shift_rows { sh.batch * d } else { d }];
                    for (bi, part) in &partials {
                        let (pg, pb) = part.split_at(d);
                        let gi = if sh.scale_rows { *bi } else { 0 };
                        let bi = if sh.shift_rows { *bi } else { 0 };
                        for (acc, p) in dscale[gi * d..(gi + 1) * d].iter_mut().zip(pg) {
                            *acc += p;
                        }
                        for (acc, p) in dshift[bi * d..(bi + 1) * d].iter_mut().zip(pb) {
                            *acc += p;
                        }
                    }
                    Ok((dx, dscale, dshift))
                })
            })
        })?;
        let grad_of = |track: bool, v: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            Ok(if track { Some(Tensor::from_vec(v, like.shape(), like.device())?) } else { None })
        };
        Ok((
            grad_of(x.track_op(), dx, x)?,
            grad_of(scale.track_op(), dscale, scale)?,
            grad_of(shift.track_op(), dshift, shift)?,
        ))
    }
}

/// The RMSNorm op: the frozen weight, and the per-row `1/rms` for the backward.
struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
    keep_stats: bool,
    stats: OnceLock<Vec<f32>>,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(self.name(), "x", storage, layout)?;
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![0f32; x.len() / d.max(1)];
        let (rows, len) = row_tasks(x.len(), d);
        let (w, eps) = (&self.weight[..], self.eps);
        (y.par_chunks_mut(len), x.par_chunks(len), stats.par_chunks_mut(rows))
            .into_par_iter()
            .for_each(|(y, x, st)| rms_fwd(y, x, st, w, eps));
        if self.keep_stats {
            keep(self.name(), &self.stats, stats)?;
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.name();
        let stats = kept(op, &self.stats)?;
        let d = self.weight.len();
        let dx = with_slice(op, "x", x, |xs| {
            with_slice(op, "the gradient", grad, |gs| {
                if gs.len() != xs.len() || stats.len() != xs.len() / d.max(1) {
                    bail!("{op}: gradient {:?} does not fit x {:?}", grad.dims(), x.dims());
                }
                let mut dx = vec![0f32; xs.len()];
                let (rows, len) = row_tasks(xs.len(), d);
                let w = &self.weight[..];
                (dx.par_chunks_mut(len), xs.par_chunks(len), gs.par_chunks(len), stats.par_chunks(rows))
                    .into_par_iter()
                    .for_each(|(dx, x, g, st)| rms_bwd(dx, x, g, st, w));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Elements below which a rayon task is not worth its overhead.
const MIN_TASK_ELEMS: usize = 8192;

/// Rows per rayon task, and elements, for `len` elements in rows of `d`: about four tasks a
/// thread, none smaller than [`MIN_TASK_ELEMS`]. Never 0 (chunk sizes must not be, even for d = 0).
fn row_tasks(len: usize, d: usize) -> (usize, usize) {
    let d = d.max(1);
    let wanted = rayon::current_num_threads().saturating_mul(4).max(1);
    let rows = (len / d).div_ceil(wanted).max(MIN_TASK_ELEMS.div_ceil(d)).max(1);
    (rows, rows * d)
}

fast_isa_fn! {
    /// [`ln_fwd_rows`], AVX2 + FMA when the CPU has them.
    fn ln_fwd => ln_fwd_rows(y: &mut [f32], x: &[f32], st: &mut [f32], w: &[f32], b: &[f32], eps: f32)
}

/// The LayerNorm forward of whole rows: writes `y` and `[mean, 1/std]` per row into `st`.
#[inline(always)]
fn ln_fwd_rows(y: &mut [f32], x: &[f32], st: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let d = w.len();
    for ((y, x), st) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(st.chunks_exact_mut(2)) {
        let (mean, rstd) = row_stats(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * rstd * w + b;
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

fast_isa_fn! {
    /// [`ln_bwd_rows`], AVX2 + FMA when the CPU has them.
    fn ln_bwd => ln_bwd_rows(dx: &mut [f32], x: &[f32], g: &[f32], st: &[f32], w: &[f32])
}

/// The LayerNorm backward of whole rows: `dx` from `x`, the upstream `g` and the kept `st`.
#[inline(always)]
fn ln_bwd_rows(dx: &mut [f32], x: &[f32], g: &[f32], st: &[f32], w: &[f32]) {
    let d = w.len();
    let rows = dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g.chunks_exact(d));
    for (((dx, x), g), st) in rows.zip(st.chunks_exact(2)) {
        // dx holds ∂y·w (the gradient of x̂) until `norm_bwd_row` overwrites it.
        for ((dx, &g), &w) in dx.iter_mut().zip(g).zip(w) {
            *dx = g * w;
        }
        norm_bwd_row(dx, x, st[0], st[1]);
    }
}

fast_isa_fn! {
    /// [`ssf_fwd_rows`], AVX2 + FMA when the CPU has them.
    fn ssf_fwd => ssf_fwd_rows(
        y: &mut [f32],
        x: &[f32],
        st: &mut [f32],
        ln: (&[f32], &[f32], f32),
        ssf: Ssf<'_>,
        first_row: usize,
    )
}

/// The LayerNorm + scale-shift forward of whole rows, the first of them row `first_row` of
/// `[B·T, d]`: writes `y` and `[mean, 1/std]` per row. `ln` is `(weight, bias, eps)`.
#[inline(always)]
fn ssf_fwd_rows(y: &mut [f32], x: &[f32], st: &mut [f32], ln: (&[f32], &[f32], f32), ssf: Ssf<'_>, first_row: usize) {
    let (w, b, eps) = ln;
    let sh = ssf.shape;
    let d = w.len();
    for (i, ((y, x), st)) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(st.chunks_exact_mut(2)).enumerate() {
        let batch_row = (first_row + i) / sh.t;
        let gamma = sh.row(ssf.scale, sh.scale_rows, batch_row);
        let beta = sh.row(ssf.shift, sh.shift_rows, batch_row);
        let (mean, rstd) = row_stats(x, eps);
        for (((y, &x), (&w, &b)), (&g, &s)) in y.iter_mut().zip(x).zip(w.iter().zip(b)).zip(gamma.iter().zip(beta)) {
            *y = ((x - mean) * rstd * w + b) * g + s;
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

fast_isa_fn! {
    /// [`ssf_bwd_rows`], AVX2 + FMA when the CPU has them.
    fn ssf_bwd => ssf_bwd_rows(
        dx: &mut [f32],
        part: &mut [f32],
        x: &[f32],
        g: &[f32],
        st: &[f32],
        gamma: &[f32],
        ln: (&[f32], &[f32]),
    )
}

/// The scale-shift backward of whole rows of one batch row (scale row `gamma`): writes their
/// `dx`, and adds their `[Σ ∂y·(x̂·w + b), Σ ∂y]` into `part` (2·d: the scale's and the shift's
/// gradient). `ln` is `(weight, bias)`.
#[inline(always)]
fn ssf_bwd_rows(
    dx: &mut [f32],
    part: &mut [f32],
    x: &[f32],
    g: &[f32],
    st: &[f32],
    gamma: &[f32],
    ln: (&[f32], &[f32]),
) {
    let (w, b) = ln;
    let d = w.len();
    let (dgamma, dbeta) = part.split_at_mut(d);
    let rows = dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g.chunks_exact(d));
    for (((dx, x), g), st) in rows.zip(st.chunks_exact(2)) {
        let (mean, rstd) = (st[0], st[1]);
        // dx holds ∂y·γ·w (the gradient of x̂) until `norm_bwd_row` overwrites it.
        let params = gamma.iter().zip(w).zip(b);
        let accs = dx.iter_mut().zip(dgamma.iter_mut()).zip(dbeta.iter_mut());
        for ((((dx, dg), db), (&x, &g)), ((&gamma, &w), &b)) in accs.zip(x.iter().zip(g)).zip(params) {
            let z = (x - mean) * rstd * w + b;
            *dg += g * z;
            *db += g;
            *dx = g * gamma * w;
        }
        norm_bwd_row(dx, x, mean, rstd);
    }
}

fast_isa_fn! {
    /// [`rms_fwd_rows`], AVX2 + FMA when the CPU has them.
    fn rms_fwd => rms_fwd_rows(y: &mut [f32], x: &[f32], st: &mut [f32], w: &[f32], eps: f32)
}

/// The RMSNorm forward of whole rows: writes `y` and `1/rms` per row into `st`.
#[inline(always)]
fn rms_fwd_rows(y: &mut [f32], x: &[f32], st: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for ((y, x), st) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(st.iter_mut()) {
        let rstd = 1.0 / (sum_of(x, |v| v * v) / d as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * rstd * w;
        }
        *st = rstd;
    }
}

fast_isa_fn! {
    /// [`rms_bwd_rows`], AVX2 + FMA when the CPU has them.
    fn rms_bwd => rms_bwd_rows(dx: &mut [f32], x: &[f32], g: &[f32], st: &[f32], w: &[f32])
}

/// The RMSNorm backward of whole rows: `dx = r · (∂y·w − x̂ · mean(∂y·w·x̂))`, `x̂ = x·r`, `r` the
/// kept `1/rms` (the LayerNorm backward without the mean terms).
#[inline(always)]
fn rms_bwd_rows(dx: &mut [f32], x: &[f32], g: &[f32], st: &[f32], w: &[f32]) {
    let d = w.len();
    let rows = dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g.chunks_exact(d));
    for (((dx, x), g), &rstd) in rows.zip(st) {
        for ((dx, &g), &w) in dx.iter_mut().zip(g).zip(w) {
            *dx = g * w;
        }
        let c = sum2_of(dx, x, |gw, x| (gw * x * rstd, 0.0)).0 / d as f32;
        for (dx, &x) in dx.iter_mut().zip(x) {
            *dx = rstd * (*dx - x * rstd * c);
        }
    }
}

/// A row's mean and `1 / sqrt(var + eps)`, the variance the biased mean of squared deviations
/// (two passes over the row, which is in cache).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_of(x, |v| v) / n;
    let var = sum_of(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The normalisation backward of one row, in place: `dx` holds `∂x̂ = ∂y·w` (times the scale for
/// SSF) on entry and `rstd · (∂x̂ − mean(∂x̂) − x̂ · mean(∂x̂ · x̂))` on return, `x̂ = (x − mean)·rstd`.
#[inline(always)]
fn norm_bwd_row(dx: &mut [f32], x: &[f32], mean: f32, rstd: f32) {
    let n = dx.len() as f32;
    let (a, c) = sum2_of(dx, x, |gx, x| (gx, gx * (x - mean) * rstd));
    let (a, c) = (a / n, c / n);
    for (dx, &x) in dx.iter_mut().zip(x) {
        *dx = rstd * (*dx - a - (x - mean) * rstd * c);
    }
}

/// Independent partial sums per reduction: enough to fill two AVX registers and break the
/// dependency chain of a sequential sum (and LLVM may then vectorise without reassociating).
const LANES: usize = 16;

/// `Σ f(x)` over a slice, in [`LANES`] partial sums.
#[inline(always)]
fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (s, &v) in acc.iter_mut().zip(c) {
            *s += f(v);
        }
    }
    for (s, &v) in acc.iter_mut().zip(rest) {
        *s += f(v);
    }
    acc.iter().sum()
}

/// `(Σ f(a, b).0, Σ f(a, b).1)` over two slices of one length, in [`LANES`] partial sums each.
#[inline(always)]
fn sum2_of(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> (f32, f32) {
    let (mut acc0, mut acc1) = ([0f32; LANES], [0f32; LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for (((s0, s1), &u), &v) in acc0.iter_mut().zip(acc1.iter_mut()).zip(ca).zip(cb) {
            let (p, q) = f(u, v);
            *s0 += p;
            *s1 += q;
        }
    }
    for (((s0, s1), &u), &v) in acc0.iter_mut().zip(acc1.iter_mut()).zip(ra).zip(rb) {
        let (p, q) = f(u, v);
        *s0 += p;
        *s1 += q;
    }
    (acc0.iter().sum(), acc1.iter().sum())
}

#[cfg(test)]
mod tests {
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    use super::*;

    /// Fused against composed: `max |fused − composed| ≤ TOL · max(1, max |composed|)`, f32 (the
    /// two differ by rounding only: reassociated sums, `· 1/std` for `/ std`). Seen: 3e-7 at most.
    const TOL: f32 = 2e-6;

    const EPS: f64 = 1e-5;

    /// The shapes `[B, T, d]` every op is tried on: odd sizes, one-element rows, MiniLM's width, and
    /// one split in several rayon tasks, a batch row too (`[2, 48, 200]`: 41 rows a task).
    const SHAPES: [&[usize]; 7] =
        [&[1, 1, 1], &[3, 5, 7], &[2, 17, 33], &[4, 9, 384], &[2, 3, 1], &[1, 64, 17], &[2, 48, 200]];

    /// Deterministic noise in [−1, 1) (splitmix64), so that a failure reproduces.
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `offset + spread · noise` of the given shape.
    fn tensor(seed: u64, dims: &[usize], offset: f32, spread: f32) -> Tensor {
        let n = dims.iter().product();
        let v = noise(seed, n).into_iter().map(|u| offset + spread * u).collect::<Vec<_>>();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn var(t: Tensor) -> Var {
        Var::from_tensor(&t).unwrap()
    }

    /// A nonlinear loss downstream, so that the gradient depends on the values too.
    fn loss(y: &Tensor, upstream: &Tensor) -> Tensor {
        (y.tanh().unwrap() * upstream).unwrap().sum_all().unwrap()
    }

    fn assert_close(what: &str, fused: &Tensor, composed: &Tensor) {
        assert_eq!(fused.dims(), composed.dims(), "{what}: shapes");
        let a = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = composed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = b.iter().map(|v| v.abs()).fold(1f32, f32::max);
        assert!(diff <= TOL * scale, "{what}: max difference {diff:e}, max magnitude {scale}");
    }

    fn grad<'a>(g: &'a GradStore, v: &Var) -> &'a Tensor {
        g.get(v.as_tensor()).unwrap()
    }

    /// Frozen LayerNorm parameters of width `d`, far from the identity.
    fn ln_params(d: usize) -> (Tensor, Tensor) {
        (tensor(11, &[d], 1.0, 0.5), tensor(12, &[d], 0.0, 0.3))
    }

    #[test]
    fn layer_norm_values_match_the_composed_ops() {
        for (i, &dims) in SHAPES.iter().chain([&[7usize][..], &[0, 8]].iter()).enumerate() {
            let x = tensor(i as u64, dims, 0.5, 2.0);
            let (w, b) = ln_params(dims[dims.len() - 1]);
            let fused = layer_norm(&x, &w, &b, EPS).unwrap();
            assert_close(&format!("{dims:?}"), &fused, &layer_norm_composed(&x, &w, &b, EPS).unwrap());
        }
    }

    #[test]
    fn layer_norm_gradients_match_the_composed_ops() {
        for (i, &dims) in SHAPES.iter().enumerate() {
            let x = var(tensor(i as u64, dims, 0.5, 2.0));
            let (w, b) = ln_params(dims[dims.len() - 1]);
            let up = tensor(100 + i as u64, dims, 0.0, 1.0);
            let fused = layer_norm(x.as_tensor(), &w, &b, EPS).unwrap();
            let composed = layer_norm_composed(x.as_tensor(), &w, &b, EPS).unwrap();
            let (gf, gc) = (loss(&fused, &up).backward().unwrap(), loss(&composed, &up).backward().unwrap());
            assert_close(&format!("dx {dims:?}"), grad(&gf, &x), grad(&gc, &x));
        }
    }

    /// Values and the gradients of x, scale and shift, for scale/shift of `rows` rows (B or 1).
    fn check_scale_shift(per_batch: bool) {
        for (i, &dims) in SHAPES.iter().enumerate() {
            let (bsz, d) = (dims[0], dims[2]);
            let rows = if per_batch { bsz } else { 1 };
            let x = var(tensor(i as u64, dims, -0.5, 3.0));
            let (w, b) = ln_params(d);
            let scale = var(tensor(20 + i as u64, &[rows, d], 1.0, 0.5));
            let shift = var(tensor(40 + i as u64, &[rows, d], 0.0, 0.2));
            let up = tensor(100 + i as u64, dims, 0.0, 1.0);
            let (xs, g, s) = (x.as_tensor(), scale.as_tensor(), shift.as_tensor());
            let fused = layer_norm_scale_shift(xs, &w, &b, EPS, g, s).unwrap();
            let composed = layer_norm_scale_shift_composed(xs, &w, &b, EPS, g, s).unwrap();
            assert_close(&format!("y {dims:?}"), &fused, &composed);
            let (gf, gc) = (loss(&fused, &up).backward().unwrap(), loss(&composed, &up).backward().unwrap());
            assert_close(&format!("dx {dims:?}"), grad(&gf, &x), grad(&gc, &x));
            assert_close(&format!("dscale {dims:?}"), grad(&gf, &scale), grad(&gc, &scale));
            assert_close(&format!("dshift {dims:?}"), grad(&gf, &shift), grad(&gc, &shift));
        }
    }

    #[test]
    fn scale_shift_with_one_row_per_batch_row_matches_the_composed_ops() {
        check_scale_shift(true);
    }

    #[test]
    fn scale_shift_with_one_shared_row_matches_the_composed_ops() {
        check_scale_shift(false);
    }

    #[test]
    fn scale_shift_with_a_frozen_x_gives_scale_and_shift_gradients_only() {
        let x = tensor(1, &[3, 5, 7], 0.0, 1.0);
        let (w, b) = ln_params(7);
        let scale = var(tensor(2, &[3, 7], 1.0, 0.5));
        let shift = tensor(3, &[1, 7], 0.0, 0.2);
        let up = tensor(4, &[3, 5, 7], 0.0, 1.0);
        let fused = layer_norm_scale_shift(&x, &w, &b, EPS, scale.as_tensor(), &shift).unwrap();
        let composed = layer_norm_scale_shift_composed(&x, &w, &b, EPS, scale.as_tensor(), &shift).unwrap();
        let (gf, gc) = (loss(&fused, &up).backward().unwrap(), loss(&composed, &up).backward().unwrap());
        assert_close("dscale", grad(&gf, &scale), grad(&gc, &scale));
        assert!(gf.get(&x).is_none() && gf.get(&shift).is_none());
    }

    #[test]
    fn rms_norm_values_match_the_composed_ops() {
        for (i, &dims) in SHAPES.iter().chain([&[7usize][..], &[0, 8]].iter()).enumerate() {
            let x = tensor(i as u64, dims, 0.5, 2.0);
            let w = tensor(11, &[dims[dims.len() - 1]], 1.0, 0.5);
            assert_close(
                &format!("{dims:?}"),
                &rms_norm(&x, &w, EPS).unwrap(),
                &rms_norm_composed(&x, &w, EPS).unwrap(),
            );
        }
    }

    #[test]
    fn rms_norm_gradients_match_the_composed_ops() {
        for (i, &dims) in SHAPES.iter().enumerate() {
            let x = var(tensor(i as u64, dims, 0.5, 2.0));
            let w = tensor(11, &[dims[dims.len() - 1]], 1.0, 0.5);
            let up = tensor(100 + i as u64, dims, 0.0, 1.0);
            let fused = rms_norm(x.as_tensor(), &w, EPS).unwrap();
            let composed = rms_norm_composed(x.as_tensor(), &w, EPS).unwrap();
            let (gf, gc) = (loss(&fused, &up).backward().unwrap(), loss(&composed, &up).backward().unwrap());
            assert_close(&format!("dx {dims:?}"), grad(&gf, &x), grad(&gc, &x));
        }
    }

    #[test]
    fn non_contiguous_inputs_give_the_composed_values_and_gradients() {
        let (w, b) = ln_params(33);
        // A transposed view ([33, 6] read as [6, 33]) and a narrowed one ([2, 5, 40] → [2, 5, 33]).
        let base_t = var(tensor(1, &[33, 6], 0.5, 2.0));
        let base_n = var(tensor(2, &[2, 5, 40], 0.5, 2.0));
        let xt = base_t.as_tensor().t().unwrap();
        let xn = base_n.as_tensor().narrow(2, 4, 33).unwrap();
        assert!(!xt.is_contiguous() && !xn.is_contiguous());
        // A scale taken as a column slice of a wider parameter, a shift read transposed.
        let scale_base = var(tensor(3, &[2, 40], 1.0, 0.5));
        let shift_base = var(tensor(4, &[33, 2], 0.0, 0.2));
        let scale = scale_base.as_tensor().narrow(1, 7, 33).unwrap();
        let shift = shift_base.as_tensor().t().unwrap();
        let up_t = tensor(5, &[6, 33], 0.0, 1.0);
        let up_n = tensor(6, &[2, 5, 33], 0.0, 1.0);

        type Run<'a> = &'a dyn Fn(bool) -> Tensor;
        let ln: Run = &|fused| {
            let f = if fused { layer_norm } else { layer_norm_composed };
            loss(&f(&xt, &w, &b, EPS).unwrap(), &up_t)
        };
        let ssf: Run = &|fused| {
            let f = if fused { layer_norm_scale_shift } else { layer_norm_scale_shift_composed };
            loss(&f(&xn, &w, &b, EPS, &scale, &shift).unwrap(), &up_n)
        };
        let rms: Run = &|fused| {
            let f = if fused { rms_norm } else { rms_norm_composed };
            loss(&f(&xn, &w, EPS).unwrap(), &up_n)
        };
        for (name, run, vars) in [
            ("layer-norm", ln, vec![&base_t]),
            ("scale-shift", ssf, vec![&base_n, &scale_base, &shift_base]),
            ("rms-norm", rms, vec![&base_n]),
        ] {
            let (lf, lc) = (run(true), run(false));
            assert_close(&format!("{name} loss"), &lf, &lc);
            let (gf, gc) = (lf.backward().unwrap(), lc.backward().unwrap());
            for v in vars {
                assert_close(&format!("{name} gradient"), grad(&gf, v), grad(&gc, v));
            }
        }
    }

    #[test]
    fn wrong_shapes_and_dtypes_are_refused_with_the_shapes_named() {
        let x = tensor(1, &[2, 3, 8], 0.0, 1.0);
        let (w, b) = ln_params(8);
        let refusal = |r: Result<Tensor>| r.map(|_| ()).unwrap_err().to_string();

        let e = refusal(layer_norm(&x, &tensor(2, &[7], 1.0, 0.1), &b, EPS));
        assert!(e.contains("layer-norm: weight has shape [7], expected [8] (x has shape [2, 3, 8])"), "{e}");
        let e = refusal(rms_norm(&x, &b.unsqueeze(0).unwrap(), EPS));
        assert!(e.contains("rms-norm: weight has shape [1, 8], expected [8]"), "{e}");
        let e = refusal(layer_norm(&x.to_dtype(DType::F64).unwrap(), &w, &b, EPS));
        assert!(e.contains("layer-norm: x is F64"), "{e}");
        let e = refusal(layer_norm(&Tensor::new(1f32, &Device::Cpu).unwrap(), &w, &b, EPS));
        assert!(e.contains("x is a scalar"), "{e}");

        let row = tensor(3, &[2, 8], 1.0, 0.1);
        let e = refusal(layer_norm_scale_shift(&x, &w, &b, EPS, &tensor(3, &[3, 8], 1.0, 0.1), &row));
        assert!(e.contains("scale has shape [3, 8], expected [2, 8] or [1, 8] (x has shape [2, 3, 8])"), "{e}");
        let e = refusal(layer_norm_scale_shift(&x, &w, &b, EPS, &row, &tensor(3, &[2, 9], 0.0, 0.1)));
        assert!(e.contains("shift has shape [2, 9]"), "{e}");
        let e = refusal(layer_norm_scale_shift(&x.flatten_to(1).unwrap(), &w, &b, EPS, &row, &row));
        assert!(e.contains("x has shape [6, 8], expected [B, T, d]"), "{e}");
    }

    #[test]
    fn with_all_inputs_frozen_no_graph_is_built() {
        let x = tensor(1, &[2, 3, 8], 0.0, 1.0);
        let (w, b) = ln_params(8);
        let (scale, shift) = (tensor(2, &[2, 8], 1.0, 0.5), tensor(3, &[1, 8], 0.0, 0.2));
        let ln = layer_norm(&x, &w, &b, EPS).unwrap();
        let ssf = layer_norm_scale_shift(&x, &w, &b, EPS, &scale, &shift).unwrap();
        let rms = rms_norm(&x, &w, EPS).unwrap();
        assert!(!ln.track_op() && !ssf.track_op() && !rms.track_op());
        assert_close("layer-norm", &ln, &layer_norm_composed(&x, &w, &b, EPS).unwrap());
        assert_close("scale-shift", &ssf, &layer_norm_scale_shift_composed(&x, &w, &b, EPS, &scale, &shift).unwrap());
        assert_close("rms-norm", &rms, &rms_norm_composed(&x, &w, EPS).unwrap());
    }

    #[test]
    fn a_trainable_weight_still_gets_its_gradient() {
        // Not the frozen case the fused op is for: the composed ops run, and nothing is dropped.
        let x = var(tensor(1, &[3, 8], 0.0, 1.0));
        let w = var(tensor(2, &[8], 1.0, 0.5));
        let b = tensor(3, &[8], 0.0, 0.2);
        let up = tensor(4, &[3, 8], 0.0, 1.0);
        let g = loss(&layer_norm(x.as_tensor(), w.as_tensor(), &b, EPS).unwrap(), &up).backward().unwrap();
        assert!(g.get(w.as_tensor()).is_some() && g.get(x.as_tensor()).is_some());
        let g = loss(&rms_norm(x.as_tensor(), w.as_tensor(), EPS).unwrap(), &up).backward().unwrap();
        assert!(g.get(w.as_tensor()).is_some());
    }

    /// The loss `Σ y·upstream` (for contiguous f32 `y`), whose backward hands `upstream` over as the
    /// gradient of `y` without computing anything: for timing the ops' own backward.
    struct DotWith(Tensor);

    impl CustomOp1 for DotWith {
        fn name(&self) -> &'static str {
            "dot-with"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
            let y = cpu_slice("dot-with", "y", storage, layout)?;
            let dot = with_slice("dot-with", "upstream", &self.0, |u| Ok(sum2_of(y, u, |y, u| (y * u, 0.0)).0))?;
            Ok((CpuStorage::F32(vec![dot]), Shape::from(())))
        }

        fn bwd(&self, _y: &Tensor, _loss: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(self.0.clone()))
        }
    }

    /// Timings, fused against composed, on one shape. Run with
    /// `cargo test --release -p fedpool-kernels norm::tests::timings -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check: run by hand with --release"]
    fn timings_of_the_fused_ops_against_the_composed_ones() {
        use std::time::Instant;
        let (bsz, t, d) = (16, 128, 384);
        let x = var(tensor(1, &[bsz, t, d], 0.5, 2.0));
        let (w, b) = ln_params(d);
        let (scale, shift) = (var(tensor(2, &[bsz, d], 1.0, 0.5)), var(tensor(3, &[bsz, d], 0.0, 0.2)));
        let up = tensor(4, &[bsz, t, d], 0.0, 1.0);
        let (xs, g, s) = (x.as_tensor(), scale.as_tensor(), shift.as_tensor());
        // The fastest of 31 runs after 5 warm-up ones: the least disturbed by other load.
        let best = |f: &dyn Fn()| {
            for _ in 0..5 {
                f();
            }
            (0..31)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let pairs: [(&str, Op, Op); 3] = [
            (
                "layer_norm",
                Box::new(|x| layer_norm(x, &w, &b, EPS).unwrap()),
                Box::new(|x| layer_norm_composed(x, &w, &b, EPS).unwrap()),
            ),
            (
                "layer_norm_scale_shift",
                Box::new(|x| layer_norm_scale_shift(x, &w, &b, EPS, g, s).unwrap()),
                Box::new(|x| layer_norm_scale_shift_composed(x, &w, &b, EPS, g, s).unwrap()),
            ),
            (
                "rms_norm",
                Box::new(|x| rms_norm(x, &w, EPS).unwrap()),
                Box::new(|x| rms_norm_composed(x, &w, EPS).unwrap()),
            ),
        ];
        let frozen = xs.detach();
        // Forward, then `backward()` from `Σ y·upstream`, a loss whose backward costs nothing (candle's
        // `(y * up).sum_all()` backward goes through strided broadcasts and costs more than the op).
        let train = |op: &dyn Fn(&Tensor) -> Tensor| {
            best(&|| drop(op(xs).apply_op1(DotWith(up.clone())).unwrap().backward().unwrap()))
        };
        println!("x [{bsz}, {t}, {d}] f32, {} rayon threads, best of 31, ms", rayon::current_num_threads());
        println!(
            "{:<24} {:>9} {:>9} {:>6}   {:>9} {:>9} {:>6}",
            "op", "fused fwd", "composed", "ratio", "fused f+b", "composed", "ratio"
        );
        // Two rounds, the first one unprinted: the first op timed pays for the allocator's warm-up.
        for round in 0..2 {
            for (name, fused, composed) in &pairs {
                let fwd = |op: &Op| best(&|| drop(op(&frozen)));
                let (ff, fc) = (fwd(fused), fwd(composed));
                let (tf, tc) = (train(fused), train(composed));
                if round == 1 {
                    println!(
                        "{name:<24} {ff:>9.3} {fc:>9.3} {:>5.1}x   {tf:>9.3} {tc:>9.3} {:>5.1}x",
                        fc / ff,
                        tc / tf
                    );
                }
            }
        }
        let loss_alone = train(&|x| x.copy().unwrap());
        println!("f+b: forward, then backward through candle (the loss alone, on x.copy(): {loss_alone:.3} ms)");
    }
}
