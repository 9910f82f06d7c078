//! SSF, scaling and shifting features (Lian et al. 2022, "Scaling & Shifting Your Features"):
//! `y = x ⊙ γ + β` with a scale and a shift per batch row (fedpool's per-row adapters) or one
//! shared row, as one candle custom op on the CPU whose backward gives all three gradients in one
//! pass.
//!
//! Why: composed, SSF is a broadcast multiply and a broadcast add (two passes and a tensor in
//! between), and their backward adds a multiply and two reductions, each a tensor more; the model
//! applies it at 49 points. [`scale_shift_composed`] is the reference the tests compare against and the
//! path taken when an input is not on the CPU.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::{expect_f32, f32_slice, par_pieces, rows_chunk, tensor_f32};
use crate::packed;
use crate::simd::with_fast_isa;

/// Elements per rayon task (128 KiB of f32): a whole [64, 384] batch row of MiniLM is one task.
const CHUNK: usize = 1 << 15;

/// `y[b, t, :] = x[b, t, :] ⊙ scale[b, :] + shift[b, :]` for `x` `[B, T, d]` and `scale`, `shift`
/// both `[B, d]` (one row per batch row, broadcast over `T`) or both `[1, d]` (one row for all).
/// All three are trainable: `∂x = g ⊙ γ`, `∂γ = Σ g ⊙ x`, `∂β = Σ g`, summed over `T` (`[B, d]`) or
/// over every row (`[1, d]`). On the CPU one fused pass each way; elsewhere the composed ops.
pub fn scale_shift(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    check_shapes(x.dims(), scale.dims(), shift.dims())?;
    if ![x, scale, shift].iter().all(|t| t.device().is_cpu()) {
        return scale_shift_composed(x, scale, shift);
    }
    for (what, t) in [("x", x), ("scale", scale), ("shift", shift)] {
        expect_f32("scale_shift", what, t)?;
    }
    x.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, ScaleShift { offsets: None })
}

/// [`scale_shift`] for packed tokens: `x` `[N, d]` holds batch row `b`'s tokens at rows
/// `offsets[b]..offsets[b + 1]` (`offsets`: `B + 1` non-decreasing entries from 0 to N), and row
/// `b` of `scale` / `shift` (`[B, d]`, or `[1, d]` for all) applies to them.
pub fn scale_shift_packed(x: &Tensor, scale: &Tensor, shift: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    check_packed(x.dims(), scale.dims(), shift.dims(), offsets)?;
    if ![x, scale, shift].iter().all(|t| t.device().is_cpu()) {
        return scale_shift_composed(&packed::pad(x, offsets)?, scale, shift).and_then(|y| packed::unpad(&y, offsets));
    }
    for (what, t) in [("x", x), ("scale", scale), ("shift", shift)] {
        expect_f32("scale_shift", what, t)?;
    }
    let op = ScaleShift { offsets: Some(offsets.to_vec()) };
    x.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, op)
}

/// The reference for [`scale_shift_packed`]: each batch row's tokens through
/// [`scale_shift_composed`] with that row's scale and shift, concatenated.
pub fn scale_shift_packed_composed(x: &Tensor, scale: &Tensor, shift: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    check_packed(x.dims(), scale.dims(), shift.dims(), offsets)?;
    scale_shift_composed(&packed::pad(x, offsets)?, scale, shift).and_then(|y| packed::unpad(&y, offsets))
}

/// `x` `[N, d]`, `scale` `[B, d]` or `[1, d]` with `B + 1` offsets from 0 to N; returns `(N, d)`.
fn check_packed(x: &[usize], scale: &[usize], shift: &[usize], offsets: &[usize]) -> Result<(usize, usize)> {
    let &[n, d] = x else {
        bail!("scale_shift_packed: x has shape {x:?}, expected [tokens, d]");
    };
    let b = offsets.len().saturating_sub(1);
    if offsets.first() != Some(&0) || offsets.last() != Some(&n) || offsets.windows(2).any(|w| w[0] > w[1]) {
        bail!("scale_shift_packed: offsets {offsets:?} must rise from 0 to the {n} rows of x");
    }
    if !matches!(scale, &[rows, sd] if (rows == b || rows == 1) && sd == d) {
        bail!("scale_shift_packed: scale has shape {scale:?} for {b} batch rows of width {d}, expected [{b}, {d}] or [1, {d}]");
    }
    if shift != scale {
        bail!("scale_shift_packed: shift has shape {shift:?} and scale {scale:?}, expected the same");
    }
    Ok((n, d))
}

/// The reference for [`scale_shift`]: `x.broadcast_mul(scale[:, None]).broadcast_add(shift[:, None])`.
pub fn scale_shift_composed(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&scale.unsqueeze(1)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// `x` `[B, T, d]`, `scale` `[B, d]` or `[1, d]`, `shift` the shape of `scale`; returns `(B, T, d)`.
fn check_shapes(x: &[usize], scale: &[usize], shift: &[usize]) -> Result<(usize, usize, usize)> {
    let &[b, t, d] = x else {
        bail!("scale_shift: x has shape {x:?}, expected [batch, tokens, d]");
    };
    if !matches!(scale, &[rows, sd] if (rows == b || rows == 1) && sd == d) {
        bail!("scale_shift: scale has shape {scale:?} for x of shape {x:?}, expected [{b}, {d}] or [1, {d}]");
    }
    if shift != scale {
        bail!("scale_shift: shift has shape {shift:?} and scale {scale:?}, expected the same");
    }
    Ok((b, t, d))
}

/// The op; shapes come from the layouts, and packed tokens' batch rows from `offsets`.
struct ScaleShift {
    offsets: Option<Vec<usize>>,
}

impl ScaleShift {
    /// `(rows of x, d)` and the row bounds of the groups of x's rows that share one row of
    /// `scale`: group `g` is rows `bounds[g]..bounds[g + 1]` (one group for a `[1, d]` scale).
    fn groups(&self, x: &[usize], scale: &[usize], shift: &[usize]) -> Result<(usize, Vec<usize>)> {
        let (rows, d, per_batch_row) = match &self.offsets {
            Some(offsets) => {
                let (n, d) = check_packed(x, scale, shift, offsets)?;
                (n, d, offsets.clone())
            }
            None => {
                let (b, t, d) = check_shapes(x, scale, shift)?;
                (b * t, d, (0..=b).map(|i| i * t).collect())
            }
        };
        let bounds = if scale[0] == 1 { vec![0, rows] } else { per_batch_row };
        Ok((d, bounds))
    }
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "fused-scale-shift"
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
        let (d, bounds) = self.groups(l1.dims(), l2.dims(), l3.dims())?;
        let x = f32_slice(s1, l1, self.name(), "x")?;
        let scale = f32_slice(s2, l2, self.name(), "scale")?;
        let shift = f32_slice(s3, l3, self.name(), "shift")?;
        let y = forward(x, scale, shift, &bounds, d);
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
        let (d, bounds) = self.groups(x.dims(), scale.dims(), shift.dims())?;
        if grad.dims() != x.dims() {
            bail!("{}: gradient has shape {:?}, expected {:?} (of x)", self.name(), grad.dims(), x.dims());
        }
        let (x, scale, grad) = (x.contiguous()?, scale.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ss, sl) = scale.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = tensor_f32(&xs, xl, self.name(), "x")?;
        let sv = tensor_f32(&ss, sl, self.name(), "scale")?;
        let gv = tensor_f32(&gs, gl, self.name(), "gradient")?;
        let (dx, dscale, dshift) = backward(xv, sv, gv, &bounds, d);
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dscale, scale.shape(), scale.device())?),
            Some(Tensor::from_vec(dshift, scale.shape(), scale.device())?),
        ))
    }
}

/// `y = x ⊙ scale[g] + shift[g]` for row `r` in group `g` (`bounds[g] <= r < bounds[g + 1]`).
fn forward(x: &[f32], scale: &[f32], shift: &[f32], bounds: &[usize], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    par_pieces(&mut out, rows_chunk(d, CHUNK), |start, out| {
        let x = &x[start..start + out.len()];
        for (i, (orow, xrow)) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
            let g = bounds.partition_point(|&b| b <= start / d + i) - 1;
            let (scale, shift) = (&scale[g * d..(g + 1) * d], &shift[g * d..(g + 1) * d]);
            // One row per call (see `activation`: nested loops are not inlined into AVX2).
            with_fast_isa(|| forward_row(orow, xrow, scale, shift));
        }
    });
    out
}

/// One row of [`forward`].
#[inline(always)]
fn forward_row(out: &mut [f32], x: &[f32], scale: &[f32], shift: &[f32]) {
    for (((o, &x), &s), &b) in out.iter_mut().zip(x).zip(scale).zip(shift) {
        *o = x * s + b;
    }
}

/// `(∂x, ∂scale, ∂shift)`: one pass over `x` and `grad`, in parallel over the groups of rows that
/// share a scale row, and within a group over chunks whose partial sums are then added in order
/// (the same order every run, whatever the number of threads).
fn backward(x: &[f32], scale: &[f32], grad: &[f32], bounds: &[usize], d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let mut dscale = vec![0f32; scale.len()];
    let mut dshift = vec![0f32; scale.len()];
    if x.is_empty() {
        return (dx, dscale, dshift);
    }
    let chunk = rows_chunk(d, CHUNK);
    // Each group's rows of dx, in order.
    let mut groups = Vec::with_capacity(bounds.len() - 1);
    let mut rest = dx.as_mut_slice();
    for w in bounds.windows(2) {
        let (group, tail) = rest.split_at_mut((w[1] - w[0]) * d);
        groups.push(group);
        rest = tail;
    }
    groups.into_par_iter().zip(dscale.par_chunks_mut(d)).zip(dshift.par_chunks_mut(d)).enumerate().for_each(
        |(g, ((dx, dscale), dshift))| {
            let group_len = dx.len();
            let start = bounds[g] * d;
            let range = start..start + group_len;
            let (x, grad, scale) = (&x[range.clone()], &grad[range], &scale[g * d..(g + 1) * d]);
            if group_len <= chunk {
                accumulate(dx, x, grad, scale, dscale, dshift);
                return;
            }
            let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
                .par_chunks_mut(chunk)
                .enumerate()
                .map(|(c, dx)| {
                    let range = c * chunk..c * chunk + dx.len();
                    let (mut ps, mut pb) = (vec![0f32; d], vec![0f32; d]);
                    accumulate(dx, &x[range.clone()], &grad[range], scale, &mut ps, &mut pb);
                    (ps, pb)
                })
                .collect();
            for (ps, pb) in &partials {
                for (((s, &p), b), &q) in dscale.iter_mut().zip(ps).zip(dshift.iter_mut()).zip(pb) {
                    *s += p;
                    *b += q;
                }
            }
        },
    );
    (dx, dscale, dshift)
}

/// For the rows of `x` and `grad` (all sharing `scale`): `∂x = g ⊙ scale`, and adds `Σ g ⊙ x` to
/// `dscale` and `Σ g` to `dshift`. One row per `with_fast_isa` call (see [`forward`]).
fn accumulate(dx: &mut [f32], x: &[f32], grad: &[f32], scale: &[f32], dscale: &mut [f32], dshift: &mut [f32]) {
    let d = scale.len();
    for ((dxrow, xrow), grow) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(grad.chunks_exact(d)) {
        with_fast_isa(|| accumulate_row(dxrow, xrow, grow, scale, dscale, dshift));
    }
}

#[inline(always)]
fn accumulate_row(dx: &mut [f32], x: &[f32], grad: &[f32], scale: &[f32], dscale: &mut [f32], dshift: &mut [f32]) {
    let rows = dx.iter_mut().zip(x).zip(grad);
    for ((((dx, &x), &g), &s), (ds, db)) in rows.zip(scale).zip(dscale.iter_mut().zip(dshift.iter_mut())) {
        *dx = g * s;
        *ds += g * x;
        *db += g;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Var};

    use super::*;
    use crate::activation::tests::{assert_close, grad, loss, uniform};

    /// `[B, T, d]`: odd sizes, a batch row larger than one chunk (`[2, 30, 1536]`), and MiniLM's.
    const SHAPES: [[usize; 3]; 6] = [[1, 1, 1], [1, 7, 1], [3, 5, 33], [4, 9, 1536], [2, 30, 1536], [32, 64, 384]];

    /// Fused vs composed for `x = view(var)` and scale/shift with `scale_rows` rows: the value and
    /// `∂x` are the same arithmetic as candle's, so bitwise. `∂γ`, `∂β` sum up to 2048 rows in
    /// another order than candle's, so they are held to the f64 graph: within 1e-6 of the largest
    /// sum (worst seen 4e-7; candle's own f32 sums: 1e-6), and to candle within 2e-6 of it.
    fn check(var: &Var, view: fn(&Tensor) -> Tensor, scale_rows: usize, seed: u64) {
        let x = &view(var.as_tensor());
        let d = x.dim(2).unwrap();
        let scale = Var::from_tensor(&uniform(&[scale_rows, d], 0.5, 1.5, seed + 1)).unwrap();
        let shift = Var::from_tensor(&uniform(&[scale_rows, d], -1.0, 1.0, seed + 2)).unwrap();
        let what = format!("x {:?}, scale {:?}", x.dims(), scale.dims());
        let yf = scale_shift(x, &scale, &shift).unwrap();
        let yc = scale_shift_composed(x, &scale, &shift).unwrap();
        assert_close(&format!("value, {what}"), &yf, &yc, 0.0, 0.0);
        let gf = loss(&yf, seed + 3).backward().unwrap();
        let gc = loss(&yc, seed + 3).backward().unwrap();
        assert_close(&format!("∂x, {what}"), &grad(&gf, var), &grad(&gc, var), 0.0, 0.0);

        let f64_var = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let (x64, scale64, shift64) = (f64_var(var), f64_var(&scale), f64_var(&shift));
        let y64 = scale_shift_composed(&view(x64.as_tensor()), &scale64, &shift64).unwrap();
        let g64 = loss(&y64, seed + 3).backward().unwrap();
        for (name, v, v64) in [("∂scale", &scale, &scale64), ("∂shift", &shift, &shift64)] {
            let want = grad(&g64, v64).to_dtype(DType::F32).unwrap();
            let largest = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_close(&format!("{name} vs f64, {what}"), &grad(&gf, v), &want, 1e-6 * largest, 0.0);
            assert_close(&format!("{name} vs candle, {what}"), &grad(&gf, v), &grad(&gc, v), 2e-6 * largest, 0.0);
        }
    }

    #[test]
    fn per_batch_row_scale_shift_matches_composed_bitwise_and_its_sums_within_1e_6_of_f64() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            let x = Var::from_tensor(&uniform(dims, -10.0, 10.0, seed as u64)).unwrap();
            check(&x, Tensor::clone, dims[0], 10 * seed as u64);
        }
    }

    #[test]
    fn shared_row_scale_shift_matches_composed_bitwise_and_its_sums_within_1e_6_of_f64() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            let x = Var::from_tensor(&uniform(dims, -10.0, 10.0, seed as u64)).unwrap();
            check(&x, Tensor::clone, 1, 10 * seed as u64);
        }
    }

    #[test]
    fn a_non_contiguous_x_gives_the_composed_values_and_gradients() {
        let x = Var::from_tensor(&uniform(&[3, 33, 5], -10.0, 10.0, 1)).unwrap();
        let view = |x: &Tensor| x.transpose(1, 2).unwrap(); // [3, 5, 33]
        assert!(!view(x.as_tensor()).is_contiguous());
        check(&x, view, 3, 1);
        check(&x, view, 1, 2);
    }

    #[test]
    fn packed_scale_shift_equals_each_batch_rows_tokens_through_the_composed_ops() {
        // Batch rows of 3, 1, 0 and 5 tokens, one row of 7 × 1536, rows of one token; per-row and
        // shared scales.
        for (offsets, d) in [(vec![0usize, 3, 4, 4, 9], 33usize), (vec![0, 7], 1536), (vec![0, 1, 2], 1)] {
            let n = *offsets.last().unwrap();
            for rows in [offsets.len() - 1, 1] {
                let x = Var::from_tensor(&uniform(&[n, d], -10.0, 10.0, 3)).unwrap();
                let scale = Var::from_tensor(&uniform(&[rows, d], 0.5, 1.5, 4)).unwrap();
                let shift = Var::from_tensor(&uniform(&[rows, d], -1.0, 1.0, 5)).unwrap();
                let what = format!("offsets {offsets:?}, d {d}, scale rows {rows}");
                let yf = scale_shift_packed(&x, &scale, &shift, &offsets).unwrap();
                let yc = scale_shift_packed_composed(&x, &scale, &shift, &offsets).unwrap();
                assert_close(&format!("value, {what}"), &yf, &yc, 0.0, 0.0);
                let gf = loss(&yf, 6).backward().unwrap();
                let gc = loss(&yc, 6).backward().unwrap();
                assert_close(&format!("∂x, {what}"), &grad(&gf, &x), &grad(&gc, &x), 0.0, 0.0);
                for (name, v) in [("∂γ", &scale), ("∂β", &shift)] {
                    assert_close(&format!("{name}, {what}"), &grad(&gf, v), &grad(&gc, v), 1e-5, 1e-5);
                }
            }
        }
        let x = uniform(&[4, 2], -1.0, 1.0, 0);
        let err = scale_shift_packed(&x, &uniform(&[2, 2], 0.0, 1.0, 1), &uniform(&[2, 2], 0.0, 1.0, 2), &[0, 3, 5])
            .unwrap_err()
            .to_string();
        assert!(err.contains("offsets") && err.contains("[0, 3, 5]"), "{err}");
    }

    #[test]
    fn without_a_gradient_nothing_is_tracked() {
        let x = uniform(&[2, 3, 4], -1.0, 1.0, 0);
        let y = scale_shift(&x, &uniform(&[2, 4], -1.0, 1.0, 1), &uniform(&[2, 4], -1.0, 1.0, 2)).unwrap();
        assert!(!y.track_op());
    }

    #[test]
    fn wrong_shapes_are_errors_naming_the_shapes() {
        let x = uniform(&[4, 3, 8], -1.0, 1.0, 0);
        let row = |dims: &[usize]| uniform(dims, -1.0, 1.0, 1);
        let err = |x: &Tensor, s: &Tensor, b: &Tensor| scale_shift(x, s, b).unwrap_err().to_string();
        let e = err(&x, &row(&[3, 8]), &row(&[3, 8]));
        assert!(e.contains("[3, 8]") && e.contains("[4, 8] or [1, 8]"), "{e}");
        let e = err(&x, &row(&[4, 7]), &row(&[4, 7]));
        assert!(e.contains("[4, 7]"), "{e}");
        let e = err(&x, &row(&[4, 8]), &row(&[1, 8]));
        assert!(e.contains("shift has shape [1, 8]"), "{e}");
        let e = err(&row(&[12, 8]), &row(&[1, 8]), &row(&[1, 8]));
        assert!(e.contains("x has shape [12, 8]"), "{e}");
    }
}
