//! Fused elementwise activations on the CPU, each a candle custom op with its own backward:
//! [`gelu_erf`] (BERT's exact GELU), [`bias_gelu_erf`] (a linear layer's frozen bias add and the
//! GELU in one pass), [`gelu_tanh`] (HF `gelu_new` / `gelu_pytorch_tanh`) and [`silu_mul`]
//! (SwiGLU's `silu(gate) · up`, Llama's MLP).
//!
//! Why: candle's `gelu_erf` calls a scalar `erf` element by element, and each of its ops is a
//! pass over memory into a new tensor; its backward builds the derivative from five to eight more
//! such ops. Here the forward is one pass over the input and the backward one pass over the input
//! and the incoming gradient (the derivative is recomputed from the input), both vectorised
//! ([`simd::with_fast_isa`]) and split in chunks over rayon's global pool (the one candle's matmul
//! uses; candle 0.11's elementwise maps use a pool of their own).
//!
//! Each op has a `*_composed` twin built from candle-core ops: the reference the tests compare
//! against, and the path taken when an input is not on the CPU. Inputs must be f32; a
//! non-contiguous input is copied to a contiguous one first. The fused forward is used whether or
//! not a gradient is tracked; the fused backward is not itself differentiable (no second
//! derivatives).

use std::f32::consts::FRAC_1_SQRT_2;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::simd::{self, with_fast_isa};

/// Elements per rayon task (64 KiB of f32): enough work to pay for the task, small enough to
/// spread a [2048, 1536] activation over every core.
const CHUNK: usize = 1 << 14;

/// `0.5 · x · (1 + erf(x / √2))`, with candle's `gelu_erf` (and its backward) as the composed
/// version. On the CPU one fused pass; elsewhere the composed ops.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return gelu_erf_composed(x);
    }
    expect_f32("gelu_erf", "x", x)?;
    x.contiguous()?.apply_op1(ActivationOp(Activation::GeluErf))
}

/// The reference for [`gelu_erf`]: candle's `x.gelu_erf()`.
pub fn gelu_erf_composed(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// `gelu_erf(x + bias)` for `x` `[..., d]` and a FROZEN `bias` `[d]`: a linear layer's bias add
/// and its activation in one pass. Only `x` gets a gradient, even when `bias` is a `Var`. On the
/// CPU one fused pass; elsewhere the composed ops.
pub fn bias_gelu_erf(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = x.dims().last().copied();
    if bias.rank() != 1 || d != Some(bias.dim(0)?) {
        bail!(
            "bias_gelu_erf: x has shape {:?} and bias {:?}, expected bias [d] with d the last dim of x",
            x.dims(),
            bias.dims()
        );
    }
    if !x.device().is_cpu() || !bias.device().is_cpu() {
        return bias_gelu_erf_composed(x, bias);
    }
    expect_f32("bias_gelu_erf", "x", x)?;
    expect_f32("bias_gelu_erf", "bias", bias)?;
    x.contiguous()?.apply_op2(&bias.detach().contiguous()?, BiasGeluErf)
}

/// The reference for [`bias_gelu_erf`]: `x.broadcast_add(bias)` (bias detached) then `gelu_erf`.
pub fn bias_gelu_erf_composed(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(&bias.detach())?.gelu_erf()
}

/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`, HF's `gelu_new` / `gelu_pytorch_tanh`
/// and candle's `gelu`, computed as the equal `x · σ(2u)` (`u` the tanh argument). On the CPU one
/// fused pass; elsewhere the composed ops.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return gelu_tanh_composed(x);
    }
    expect_f32("gelu_tanh", "x", x)?;
    x.contiguous()?.apply_op1(ActivationOp(Activation::GeluTanh))
}

/// The reference for [`gelu_tanh`]: candle's `x.gelu()` (the tanh approximation).
pub fn gelu_tanh_composed(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// SwiGLU's `silu(gate) · up` (Llama's MLP) for two tensors of the same shape, with gradients
/// for both. On the CPU one fused pass; elsewhere the composed ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!("silu_mul: gate has shape {:?} and up {:?}, expected the same", gate.dims(), up.dims());
    }
    if !gate.device().is_cpu() || !up.device().is_cpu() {
        return silu_mul_composed(gate, up);
    }
    expect_f32("silu_mul", "gate", gate)?;
    expect_f32("silu_mul", "up", up)?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// The reference for [`silu_mul`]: `gate.silu() * up` (silu = `gate · sigmoid(gate)`).
pub fn silu_mul_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

// ---------------------------------------------------------------------------------------------
// The scalar math, `#[inline(always)]` so that it is built into the AVX2 loops.

/// 1/√(2π), the normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
/// √(2/π), the scale of the tanh argument of `gelu_tanh`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of `gelu_tanh` (Hendrycks & Gimpel 2016).
const GELU_TANH_CUBIC: f32 = 0.044_715;

/// Where f32 `erf` rounds to ±1: `erfc(3.923) < 2^-25`, half an ulp below 1.
const ERF_SATURATES: f32 = 3.923;

/// [`simd::erf`], exactly ±1 where f32 `erf` rounds to ±1 (`simd::erf` stays at ±(1 − 2^-23)
/// there), so that `gelu_erf(x) = x` and `gelu_erf(−x) = 0` for `x > 5.55` as with libm.
#[inline(always)]
fn erf(z: f32) -> f32 {
    if z.abs() >= ERF_SATURATES {
        1f32.copysign(z)
    } else {
        simd::erf(z)
    }
}

#[inline(always)]
fn gelu_erf_value(x: f32) -> f32 {
    // candle's order of operations, so the two agree to the erf approximation.
    (erf(x * FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// `Φ(x) + x · φ(x)`.
#[inline(always)]
fn gelu_erf_slope(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * simd::exp(-0.5 * x * x)
}

#[inline(always)]
fn gelu_erf_grad(x: f32, g: f32) -> f32 {
    g * gelu_erf_slope(x)
}

/// `σ(z)` and `σ'(z) = σ(z) · (1 − σ(z))` from one `e^(−|z|)`: no overflow, and no cancellation
/// in `1 − σ` for large `z`.
#[inline(always)]
fn sigmoid_and_slope(z: f32) -> (f32, f32) {
    let e = simd::exp(-z.abs());
    let r = 1.0 / (1.0 + e);
    let s = if z >= 0.0 { r } else { e * r };
    (s, e * r * r)
}

/// `0.5 · x · (1 + tanh(u)) = x · σ(2u)`.
#[inline(always)]
fn gelu_tanh_value(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * x * (1.0 + GELU_TANH_CUBIC * x * x);
    x * sigmoid_and_slope(2.0 * u).0
}

/// `σ(2u) + x · σ'(2u) · 2u'`.
#[inline(always)]
fn gelu_tanh_slope(x: f32) -> f32 {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * x * (1.0 + GELU_TANH_CUBIC * x2);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * x2);
    let (s, ds) = sigmoid_and_slope(2.0 * u);
    s + 2.0 * x * ds * du
}

#[inline(always)]
fn gelu_tanh_grad(x: f32, g: f32) -> f32 {
    g * gelu_tanh_slope(x)
}

#[inline(always)]
fn silu_mul_value(gate: f32, up: f32) -> f32 {
    gate * sigmoid_and_slope(gate).0 * up
}

// ---------------------------------------------------------------------------------------------
// The ops.

/// The unary activations.
#[derive(Clone, Copy, Debug)]
enum Activation {
    GeluErf,
    GeluTanh,
}

/// A unary activation as a candle op.
struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::GeluErf => "fused-gelu-erf",
            Activation::GeluTanh => "fused-gelu-tanh",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name(), "x")?;
        let y = match self.0 {
            Activation::GeluErf => map1(x, gelu_erf_value),
            Activation::GeluTanh => map1(x, gelu_tanh_value),
        };
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = tensor_f32(&xs, xl, self.name(), "x")?;
        let gv = tensor_f32(&gs, gl, self.name(), "gradient")?;
        expect_same_len(self.name(), xv, gv)?;
        let dx = match self.0 {
            Activation::GeluErf => map2(xv, gv, gelu_erf_grad),
            Activation::GeluTanh => map2(xv, gv, gelu_tanh_grad),
        };
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `gelu_erf(x + bias)`, bias frozen.
struct BiasGeluErf;

impl CustomOp2 for BiasGeluErf {
    fn name(&self) -> &'static str {
        "fused-bias-gelu-erf"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name(), "x")?;
        let bias = f32_slice(s2, l2, self.name(), "bias")?;
        if l1.dims().last() != Some(&bias.len()) {
            bail!("{}: x has shape {:?} and bias {:?}, expected bias [d]", self.name(), l1.dims(), l2.dims());
        }
        Ok((CpuStorage::F32(map_rows_bias(x, bias)), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, bias, grad) = (x.contiguous()?, bias.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = tensor_f32(&xs, xl, self.name(), "x")?;
        let bv = tensor_f32(&bs, bl, self.name(), "bias")?;
        let gv = tensor_f32(&gs, gl, self.name(), "gradient")?;
        expect_same_len(self.name(), xv, gv)?;
        let dx = map_rows_bias_grad(xv, bv, gv);
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None))
    }
}

/// `silu(gate) · up`.
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let gate = f32_slice(s1, l1, self.name(), "gate")?;
        let up = f32_slice(s2, l2, self.name(), "up")?;
        if l1.dims() != l2.dims() {
            bail!("{}: gate has shape {:?} and up {:?}, expected the same", self.name(), l1.dims(), l2.dims());
        }
        Ok((CpuStorage::F32(map2(gate, up, silu_mul_value)), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gate, up, grad) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
        let (ws, wl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let wv = tensor_f32(&ws, wl, self.name(), "gate")?;
        let uv = tensor_f32(&us, ul, self.name(), "up")?;
        let gv = tensor_f32(&gs, gl, self.name(), "gradient")?;
        expect_same_len(self.name(), wv, uv)?;
        expect_same_len(self.name(), wv, gv)?;
        let (dgate, dup) = silu_mul_grads(wv, uv, gv);
        let dgate = Tensor::from_vec(dgate, gate.shape(), gate.device())?;
        let dup = Tensor::from_vec(dup, up.shape(), up.device())?;
        Ok((Some(dgate), Some(dup)))
    }
}

// ---------------------------------------------------------------------------------------------
// The loops: parallel over chunks, each chunk a plain slice loop built for AVX2 + FMA. The
// closure given to `with_fast_isa` only calls one flat `#[inline(always)]` loop: LLVM did not
// inline closures holding nested row loops into the AVX2 function (checked in the disassembly),
// and those ran as SSE2.

/// `f` over `x`.
fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Copy) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    par_pieces(&mut out, CHUNK, |start, out| {
        let x = &x[start..start + out.len()];
        with_fast_isa(|| map1_loop(out, x, f))
    });
    out
}

#[inline(always)]
fn map1_loop(out: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(v);
    }
}

/// `f` over `a` and `b` (of the same length).
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Copy) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    par_pieces(&mut out, CHUNK, |start, out| {
        let range = start..start + out.len();
        let (a, b) = (&a[range.clone()], &b[range]);
        with_fast_isa(|| map2_loop(out, a, b, f))
    });
    out
}

#[inline(always)]
fn map2_loop(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &u), &v) in out.iter_mut().zip(a).zip(b) {
        *o = f(u, v);
    }
}

/// `gelu_erf(x + bias)` row by row (`bias` one row of `d`).
fn map_rows_bias(x: &[f32], bias: &[f32]) -> Vec<f32> {
    let d = bias.len();
    let mut out = vec![0f32; x.len()];
    if d == 0 {
        return out;
    }
    par_pieces(&mut out, rows_chunk(d, CHUNK), |start, out| {
        let x = &x[start..start + out.len()];
        for (orow, xrow) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            // One row per call: a closure holding the nested row loop is not inlined into the
            // AVX2 build (and would run as SSE2); `fast_isa` is one cached load.
            with_fast_isa(|| map2_loop(orow, xrow, bias, gelu_erf_of_sum));
        }
    });
    out
}

/// `gelu_erf(x + b)`.
#[inline(always)]
fn gelu_erf_of_sum(x: f32, b: f32) -> f32 {
    gelu_erf_value(x + b)
}

/// `∂x = g · gelu_erf'(x + bias)` row by row.
fn map_rows_bias_grad(x: &[f32], bias: &[f32], grad: &[f32]) -> Vec<f32> {
    let d = bias.len();
    let mut out = vec![0f32; x.len()];
    if d == 0 {
        return out;
    }
    par_pieces(&mut out, rows_chunk(d, CHUNK), |start, out| {
        let range = start..start + out.len();
        let (x, grad) = (&x[range.clone()], &grad[range]);
        for ((orow, xrow), grow) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(grad.chunks_exact(d)) {
            with_fast_isa(|| rows_bias_grad_loop(orow, xrow, bias, grow));
        }
    });
    out
}

/// One row of [`map_rows_bias_grad`].
#[inline(always)]
fn rows_bias_grad_loop(out: &mut [f32], x: &[f32], bias: &[f32], grad: &[f32]) {
    for (((o, &v), &b), &g) in out.iter_mut().zip(x).zip(bias).zip(grad) {
        *o = gelu_erf_grad(v + b, g);
    }
}

/// `∂gate = g · up · silu'(gate)` and `∂up = g · silu(gate)` in one pass.
fn silu_mul_grads(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dgate = vec![0f32; gate.len()];
    let mut dup = vec![0f32; gate.len()];
    let kernel = |start: usize, dgate: &mut [f32], dup: &mut [f32]| {
        let range = start..start + dgate.len();
        let (gate, up, grad) = (&gate[range.clone()], &up[range.clone()], &grad[range]);
        with_fast_isa(|| silu_mul_grads_loop(dgate, dup, gate, up, grad))
    };
    if gate.len() <= CHUNK {
        kernel(0, &mut dgate, &mut dup);
    } else {
        dgate
            .par_chunks_mut(CHUNK)
            .zip(dup.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, (dw, du))| kernel(i * CHUNK, dw, du));
    }
    (dgate, dup)
}

#[inline(always)]
fn silu_mul_grads_loop(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], grad: &[f32]) {
    for ((((dw, du), &w), &u), &g) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(grad) {
        let (s, ds) = sigmoid_and_slope(w);
        *dw = g * u * (s + w * ds);
        *du = g * w * s;
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with `ssf`.

/// Runs `f(offset, piece)` on consecutive pieces of `out` of `chunk` elements (the last may be
/// shorter), on rayon's pool when there is more than one piece. `chunk` must not be 0 unless
/// `out` is empty.
pub(crate) fn par_pieces(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() <= chunk {
        f(0, out);
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, piece)| f(i * chunk, piece));
    }
}

/// Whole rows of `d` elements (`d > 0`) making about `chunk` elements, at least one row.
pub(crate) fn rows_chunk(d: usize, chunk: usize) -> usize {
    (chunk / d).max(1) * d
}

/// An error unless `t` is f32.
pub(crate) fn expect_f32(op: &str, what: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("{op}: {what} has dtype {:?}, expected f32", t.dtype());
    }
    Ok(())
}

/// The f32 data of a contiguous CPU storage.
pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: {what} has dtype {:?}, expected f32", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: {what} of shape {:?} is not contiguous (strides {:?})", layout.dims(), layout.stride()),
    }
}

/// The f32 data of a contiguous tensor's storage, which must be on the CPU (the backward passes
/// get tensors, not storages).
pub(crate) fn tensor_f32<'a>(storage: &'a Storage, layout: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => f32_slice(s, layout, op, what),
        _ => bail!("{op}: {what} is not on the CPU"),
    }
}

/// An error unless the gradient (or second input) has as many elements as the input.
fn expect_same_len(op: &str, x: &[f32], other: &[f32]) -> Result<()> {
    if x.len() != other.len() {
        bail!("{op}: backward got {} elements against {} of the input", other.len(), x.len());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    use super::*;

    /// Deterministic inputs uniform in `[lo, hi]` (a 64-bit LCG keyed by `seed`), with the
    /// saturating values ±10, ±6, ±4 and 0 in front when there is room.
    pub(crate) fn uniform(dims: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                lo + (hi - lo) * ((state >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        let specials = [10.0, -10.0, 6.0, -6.0, 4.0, -4.0, 0.0];
        if lo <= -10.0 && hi >= 10.0 {
            for (x, s) in v.iter_mut().zip(specials) {
                *x = s;
            }
        }
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// Asserts `|got − want| ≤ atol + rtol · |want|` elementwise, naming the worst element.
    pub(crate) fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = (0.0f32, 0usize);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.is_finite(), "{what}: element {i} is {g}");
            let excess = (g - w).abs() / (atol + rtol * w.abs());
            if excess > worst.0 {
                worst = (excess, i);
            }
        }
        let i = worst.1;
        assert!(worst.0 <= 1.0, "{what}: element {i}: {} vs {} ({}× the tolerance)", got[i], want[i], worst.0);
    }

    /// `Σ upstream ⊙ (y + y²/2)`: nonlinear, so each gradient depends on the value (`∂y =
    /// upstream ⊙ (1 + y)`), and well conditioned: the rounding of `y` moves `∂y` relatively as
    /// little as `y` (unlike `1 − tanh²(y)` past |y| ≈ 4, or `cos(y)` for |y| ≫ 1).
    pub(crate) fn loss(y: &Tensor, seed: u64) -> Tensor {
        let upstream = uniform(y.dims(), -1.0, 1.0, seed).to_dtype(y.dtype()).unwrap();
        let quadratic = (y + (y.sqr().unwrap() * 0.5).unwrap()).unwrap();
        (quadratic * upstream).unwrap().sum_all().unwrap()
    }

    pub(crate) fn grad(grads: &GradStore, v: &Var) -> Tensor {
        grads.get(v.as_tensor()).expect("a gradient").clone()
    }

    const SHAPES: [&[usize]; 4] = [&[1], &[7], &[3, 5, 33], &[4, 9, 1536]];

    // Tolerances `((value atol, rtol), (gradient atol, rtol))` for inputs in [−10, 10], about
    // twice the worst seen. GELU (erf): `simd::erf` is within 4.5e-7 of erf (libm: ~1e-7), which
    // `0.5·x·(1 + erf)` turns into up to 1.3e-6 absolute where the value is ≈ 0 (x ≈ −5);
    // elsewhere both are within ~5e-7 relative. silu·up: candle's `σ·(1 − y) + y` slope cancels
    // for large gates (worst 9.4e-7 relative against 3.4e-7 for the fused one).
    const GELU_ERF_VS_CANDLE: (Tol, Tol) = ((2e-6, 1e-6), (2e-6, 1e-6));
    const GELU_ERF_VS_F64: (Tol, Tol) = ((2e-6, 1e-6), (2e-6, 1e-6));
    const GELU_TANH_VS_CANDLE: (Tol, Tol) = ((1e-6, 1e-6), (1e-6, 1e-6));
    const GELU_TANH_VS_F64: (Tol, Tol) = ((1e-6, 1e-6), (1e-6, 1e-6));
    const SILU_MUL_VS_CANDLE: (Tol, Tol) = ((1e-6, 1e-6), (1e-6, 2e-6));
    const SILU_MUL_VS_F64: (Tol, Tol) = ((1e-6, 1e-6), (1e-6, 1e-6));

    /// An op under test, on its inputs.
    type Op = fn(&[&Tensor]) -> Result<Tensor>;
    /// `(atol, rtol)`.
    type Tol = (f32, f32);

    /// Runs `op` on `inputs` as `Var`s of `dtype` (the first seen through `view`) under [`loss`]:
    /// the value and each input's gradient, as f32.
    fn run(op: Op, inputs: &[Tensor], view: fn(&Tensor) -> Tensor, dtype: DType) -> (Tensor, Vec<Option<Tensor>>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()).collect();
        let mut seen: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        seen[0] = view(&seen[0]);
        let y = op(&seen.iter().collect::<Vec<_>>()).unwrap();
        let grads = loss(&y, 99).backward().unwrap();
        let to_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        (to_f32(&y), vars.iter().map(|v| grads.get(v.as_tensor()).map(to_f32)).collect())
    }

    /// `fused` against `composed`: the value and every input's gradient within `vs_candle`
    /// (value, gradient) of candle's f32 and within `vs_f64` of the composed graph in f64. An
    /// input has a gradient from `fused` exactly when it has one from `composed`.
    fn check(
        what: &str,
        inputs: &[Tensor],
        view: fn(&Tensor) -> Tensor,
        fused: Op,
        composed: Op,
        vs_candle: (Tol, Tol),
        vs_f64: (Tol, Tol),
    ) {
        let (yf, gf) = run(fused, inputs, view, DType::F32);
        let (yc, gc) = run(composed, inputs, view, DType::F32);
        let (y64, g64) = run(composed, inputs, view, DType::F64);
        let ((va, vr), (ga, gr)) = vs_candle;
        let ((wa, wr), (ha, hr)) = vs_f64;
        assert_close(&format!("{what}: value vs candle"), &yf, &yc, va, vr);
        assert_close(&format!("{what}: value vs f64"), &yf, &y64, wa, wr);
        for (i, ((f, c), t)) in gf.iter().zip(&gc).zip(&g64).enumerate() {
            match (f, c, t) {
                (Some(f), Some(c), Some(t)) => {
                    assert_close(&format!("{what}: ∂input {i} vs candle"), f, c, ga, gr);
                    assert_close(&format!("{what}: ∂input {i} vs f64"), f, t, ha, hr);
                }
                (None, None, None) => {}
                _ => panic!("{what}: input {i} has a gradient from one op and not the other"),
            }
        }
    }

    fn same(x: &Tensor) -> Tensor {
        x.clone()
    }

    #[test]
    fn gelu_erf_value_and_gradient_match_candles_and_f64_within_2e_6_plus_1e_6_relative() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            let x = uniform(dims, -10.0, 10.0, seed as u64);
            let (fused, composed): (Op, Op) = (|t| gelu_erf(t[0]), |t| gelu_erf_composed(t[0]));
            check(&format!("{dims:?}"), &[x], same, fused, composed, GELU_ERF_VS_CANDLE, GELU_ERF_VS_F64);
        }
    }

    #[test]
    fn gelu_tanh_value_and_gradient_match_candles_gelu_and_f64_within_1e_6_plus_1e_6_relative() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            let x = uniform(dims, -10.0, 10.0, seed as u64);
            let (fused, composed): (Op, Op) = (|t| gelu_tanh(t[0]), |t| gelu_tanh_composed(t[0]));
            check(&format!("{dims:?}"), &[x], same, fused, composed, GELU_TANH_VS_CANDLE, GELU_TANH_VS_F64);
        }
    }

    #[test]
    fn gelu_tanh_is_hf_gelu_new_in_f64_within_1e_6() {
        // HF `NewGELUActivation`, in f64: the definition, not candle's reading of it.
        let x = uniform(&[4001], -10.0, 10.0, 3);
        let want: Vec<f32> = x
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| {
                let x = f64::from(x);
                let c = (2.0 / std::f64::consts::PI).sqrt();
                (0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())) as f32
            })
            .collect();
        assert_close("gelu_new", &gelu_tanh(&x).unwrap(), &Tensor::new(want, &Device::Cpu).unwrap(), 1e-6, 1e-6);
    }

    #[test]
    fn gelu_saturates_to_x_and_0_with_slopes_1_and_0_at_large_inputs() {
        // The true values differ from these by under 1e-20 (e.g. gelu_tanh(−10) ≈ −1.4e−37).
        let x = Var::new(&[-100f32, -10.0, 10.0, 100.0], &Device::Cpu).unwrap();
        let at = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        for (name, op) in [("gelu_erf", gelu_erf as fn(&Tensor) -> Result<Tensor>), ("gelu_tanh", gelu_tanh)] {
            let y = op(x.as_tensor()).unwrap();
            assert_close(name, &y, &at(&[0.0, 0.0, 10.0, 100.0]), 1e-20, 0.0);
            let g = grad(&y.sum_all().unwrap().backward().unwrap(), &x);
            assert_close(name, &g, &at(&[0.0, 0.0, 1.0, 1.0]), 1e-20, 0.0);
        }
    }

    #[test]
    fn bias_gelu_erf_matches_composed_and_gives_the_frozen_bias_no_gradient() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            let x = uniform(dims, -10.0, 10.0, seed as u64);
            let bias = uniform(&dims[dims.len() - 1..], -2.0, 2.0, 50 + seed as u64);
            let (fused, composed): (Op, Op) = (|t| bias_gelu_erf(t[0], t[1]), |t| bias_gelu_erf_composed(t[0], t[1]));
            let inputs = [x, bias];
            check(&format!("{dims:?}"), &inputs, same, fused, composed, GELU_ERF_VS_CANDLE, GELU_ERF_VS_F64);
            let (_, grads) = run(fused, &inputs, same, DType::F32);
            assert!(grads[0].is_some() && grads[1].is_none(), "only x has a gradient");
        }
    }

    #[test]
    fn bias_gelu_erf_rejects_a_bias_of_the_wrong_length() {
        let x = uniform(&[3, 4], -1.0, 1.0, 0);
        let err = bias_gelu_erf(&x, &uniform(&[5], -1.0, 1.0, 1)).unwrap_err().to_string();
        assert!(err.contains("[3, 4]") && err.contains("[5]"), "{err}");
        let err = bias_gelu_erf(&x, &uniform(&[1, 4], -1.0, 1.0, 1)).unwrap_err().to_string();
        assert!(err.contains("[1, 4]"), "{err}");
    }

    #[test]
    fn silu_mul_value_and_both_gradients_match_composed_and_f64_within_2e_6_relative() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            let gate = uniform(dims, -10.0, 10.0, seed as u64);
            let up = uniform(dims, -3.0, 3.0, 20 + seed as u64);
            let (fused, composed): (Op, Op) = (|t| silu_mul(t[0], t[1]), |t| silu_mul_composed(t[0], t[1]));
            check(&format!("{dims:?}"), &[gate, up], same, fused, composed, SILU_MUL_VS_CANDLE, SILU_MUL_VS_F64);
        }
    }

    #[test]
    fn silu_mul_rejects_gate_and_up_of_different_shapes() {
        let err = silu_mul(&uniform(&[2, 3], -1.0, 1.0, 0), &uniform(&[3, 2], -1.0, 1.0, 1)).unwrap_err();
        assert!(err.to_string().contains("[2, 3]") && err.to_string().contains("[3, 2]"), "{err}");
    }

    #[test]
    fn a_non_contiguous_input_gives_the_composed_values_and_gradients() {
        let x = uniform(&[33, 17], -10.0, 10.0, 4);
        let transpose = |x: &Tensor| x.t().unwrap(); // [17, 33], not contiguous
        assert!(!transpose(&x).is_contiguous());
        let (up, bias) = (uniform(&[17, 33], -3.0, 3.0, 5), uniform(&[33], -2.0, 2.0, 6));
        type Case = (&'static str, Vec<Tensor>, Op, Op, (Tol, Tol), (Tol, Tol));
        let cases: [Case; 4] = [
            (
                "gelu_erf",
                vec![x.clone()],
                |t| gelu_erf(t[0]),
                |t| gelu_erf_composed(t[0]),
                GELU_ERF_VS_CANDLE,
                GELU_ERF_VS_F64,
            ),
            (
                "gelu_tanh",
                vec![x.clone()],
                |t| gelu_tanh(t[0]),
                |t| gelu_tanh_composed(t[0]),
                GELU_TANH_VS_CANDLE,
                GELU_TANH_VS_F64,
            ),
            (
                "bias_gelu_erf",
                vec![x.clone(), bias],
                |t| bias_gelu_erf(t[0], t[1]),
                |t| bias_gelu_erf_composed(t[0], t[1]),
                GELU_ERF_VS_CANDLE,
                GELU_ERF_VS_F64,
            ),
            (
                "silu_mul",
                vec![x.clone(), up],
                |t| silu_mul(t[0], t[1]),
                |t| silu_mul_composed(t[0], t[1]),
                SILU_MUL_VS_CANDLE,
                SILU_MUL_VS_F64,
            ),
        ];
        for (name, inputs, fused, composed, vs_candle, vs_f64) in cases {
            check(name, &inputs, transpose, fused, composed, vs_candle, vs_f64);
        }
    }

    #[test]
    fn without_a_gradient_the_fused_kernel_runs_and_nothing_is_tracked() {
        let x = uniform(&[5, 40], -10.0, 10.0, 6);
        let y = gelu_erf(&x).unwrap();
        assert!(!y.track_op());
        // Bitwise the scalar kernel, so not candle's gelu_erf.
        let want: Vec<f32> =
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(gelu_erf_value).collect();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    #[test]
    fn a_non_f32_input_is_an_error_naming_its_dtype() {
        let x = uniform(&[3], -1.0, 1.0, 0).to_dtype(DType::F64).unwrap();
        let err = gelu_erf(&x).unwrap_err().to_string();
        assert!(err.contains("F64") && err.contains("f32"), "{err}");
    }

    /// The median wall time of `f` over `runs` runs after one warm-up, in milliseconds. The
    /// median, not the best: candle's ops often (not always) write into freshly mapped pages, and
    /// the page faults are part of their cost (3 M faults in 2000 composed SSF calls, 2 k fused).
    fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
        f();
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[runs / 2]
    }

    /// Prints one row of the table: forward and forward + backward, composed vs fused.
    fn time_row(
        name: &str,
        shape: &str,
        vars: &[Var],
        fused: &dyn Fn(&[&Tensor]) -> Tensor,
        composed: &dyn Fn(&[&Tensor]) -> Tensor,
    ) {
        let ts: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
        let detached: Vec<Tensor> = ts.iter().map(|t| t.detach()).collect();
        let dts: Vec<&Tensor> = detached.iter().collect();
        let fwd_c = median_ms(21, || drop(composed(&dts)));
        let fwd_f = median_ms(21, || drop(fused(&dts)));
        let bwd_c = median_ms(21, || drop(composed(&ts).backward().unwrap()));
        let bwd_f = median_ms(21, || drop(fused(&ts).backward().unwrap()));
        println!(
            "{name:<14} {shape:<20} {fwd_c:>9.3} {fwd_f:>9.3} {:>6.1}× {bwd_c:>9.3} {bwd_f:>9.3} {:>6.1}×",
            fwd_c / fwd_f,
            bwd_c / bwd_f
        );
    }

    /// Fused vs composed, forward and forward + backward (`y.backward()`, seeded with ones), all
    /// five ops including `ssf::scale_shift`. Run:
    /// `cargo test --release -p fedpool-kernels activation -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    fn activation_timing_fused_vs_composed() {
        let var = |dims: &[usize], seed| Var::from_tensor(&uniform(dims, -4.0, 4.0, seed)).unwrap();
        println!(
            "\n{} rayon threads, AVX2+FMA: {}; median of 21 runs, ms",
            rayon::current_num_threads(),
            simd::fast_isa()
        );
        println!(
            "{:<14} {:<20} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7}",
            "op", "shape", "fwd cand", "fwd fused", "ratio", "f+b cand", "f+b fused", "ratio"
        );
        let act = [2048, 1536];
        let x = [var(&act, 1)];
        time_row("gelu_erf", "[2048, 1536]", &x, &|t| gelu_erf(t[0]).unwrap(), &|t| gelu_erf_composed(t[0]).unwrap());
        time_row("gelu_tanh", "[2048, 1536]", &x, &|t| gelu_tanh(t[0]).unwrap(), &|t| {
            gelu_tanh_composed(t[0]).unwrap()
        });
        let xb = [var(&act, 1), var(&[1536], 2)];
        time_row("bias_gelu_erf", "[2048, 1536]", &xb, &|t| bias_gelu_erf(t[0], t[1]).unwrap(), &|t| {
            bias_gelu_erf_composed(t[0], t[1]).unwrap()
        });
        let gu = [var(&act, 1), var(&act, 3)];
        time_row("silu_mul", "[2048, 1536]", &gu, &|t| silu_mul(t[0], t[1]).unwrap(), &|t| {
            silu_mul_composed(t[0], t[1]).unwrap()
        });
        for (rows, label) in [(32, "[32,64,384] γ[32,d]"), (1, "[32,64,384] γ[1,d]")] {
            let v = [var(&[32, 64, 384], 1), var(&[rows, 384], 2), var(&[rows, 384], 3)];
            time_row("scale_shift", label, &v, &|t| crate::ssf::scale_shift(t[0], t[1], t[2]).unwrap(), &|t| {
                crate::ssf::scale_shift_composed(t[0], t[1], t[2]).unwrap()
            });
        }
    }
}
