//! The exact LoRA merge (docs/design.md, principle 4): merge the products, not the factors.
//!
//! A LoRA target holds AdaLoRA's SVD-form triplets: `A` `[r, d_in]` (Q), `E` `[r, 1]` (Λ), `B`
//! `[d_out, r]` (P), with `ΔW = B diag(E) A · α / max_rank` (the scale uses the spec's `max_rank`
//! for every client, as PEFT AdaLoRA does, so it passes through the merge untouched). Client `k`
//! trains the global's first `r_k` triplets ([`truncate_lora`]) and sends the difference, so its
//! factors are `A_k = A[:r_k] + ΔA_k`, `E_k = E[:r_k] + ΔE_k`, `B_k = B[:, :r_k] + ΔB_k`.
//! Averaging factors separately would be wrong (avg(B)·avg(A) ≠ avg(B·A)); the merged target is
//!
//! ```text
//! M = Σ_k w_k B_k diag(E_k) A_k / Σ_k w_k          (w_k: examples)
//! ```
//!
//! written as a product of stacked factors, `M · Σw = L Rᵀ` with `L = [w_1 B_1 diag(E_1) … w_n B_n
//! diag(E_n)]` (`d_out × R`) and `R = [A_1; …; A_n]ᵀ` (`d_in × R`), `R = Σ r_k` columns.
//!
//! **Streaming, bounded, exact.** Columns are appended as updates arrive. The rank of `M` is at
//! most `m = min(d_in, d_out)`, so when the stack grows past `LORA_STACK_SLACK · m` columns it is
//! compressed without any truncation: a thin QR of the stack on the side of dimension `m` (say
//! `L = Q T`, `Q` `d_out × m`) gives `L Rᵀ = Q (R Tᵀ)ᵀ`, an `m`-column stack of the same product.
//! Memory per target is thus at most `(LORA_STACK_SLACK · m + max_rank) · (d_in + d_out)` `f64`s
//! whatever the number of clients — the size of a few dense `ΔW`s for square targets, which is
//! the least an exact merge can keep once the sum has full rank. Letting the stack grow to twice
//! `m` before compressing amortises each QR over `m / r` updates instead of paying one per update.
//!
//! **Re-factorisation.** At the end of the round: thin QRs `L = Q_b T_b`, `R = Q_a T_a`, the SVD of
//! the small core `T_b T_aᵀ = U Σ Vᵀ` (at most `R × R`), and the new global triplets
//!
//! ```text
//! B = Q_b U[:, :r]      E = σ[:r] / Σ_k w_k      A = (Q_a V[:, :r])ᵀ      r = max_rank
//! ```
//!
//! sorted by descending singular value, so `B diag(E) A` is the best rank-`max_rank` approximation
//! of `M` (Eckart–Young) and `ΔW = B diag(E) A · α / max_rank` keeps its scale. Conventions: B's
//! columns and A's rows are orthonormal (what AdaLoRA's orthogonality regulariser asks for); E is
//! non-negative; each triplet's sign is fixed by making the entry of largest magnitude of its B
//! column positive (the first such entry on a tie), A's row flipping with it. When `M` has fewer
//! than `max_rank` singular values (fewer stacked columns, or a small target), the remaining
//! triplets get `E = 0` and unit vectors orthogonal to the others (from a full QR), so they add
//! nothing to `ΔW` but can still be trained; past `min(d_in, d_out)` there are no such vectors and
//! they are zero. Nothing here forms a `d_out × d_in` matrix. QR and SVD are faer's.

use std::collections::BTreeMap;

use faer::linalg::solvers::Solve;
use faer::{Mat, MatRef};
use fedpool_common::{AdapterPool, PoolDelta, PoolSpec};

use super::AggregateError;

/// A LoRA target's stack is compressed once it holds more than this many times
/// `min(d_in, d_out)` columns (a QR every `min(d_in, d_out) / r` updates instead of every update).
pub const LORA_STACK_SLACK: usize = 2;

/// One update's factor deltas for one target (checked shapes: A `[rank, d_in]`, E `[rank, 1]`,
/// B `[d_out, rank]`, row-major). Standard LoRA has no E: its E is 1 and does not move.
#[derive(Debug, Clone, Copy)]
pub(super) struct LoraTriplet<'a> {
    pub a: &'a [f32],
    pub e: Option<&'a [f32]>,
    pub b: &'a [f32],
    pub rank: usize,
}

/// New global factors of one target, row-major, full shapes.
#[derive(Debug)]
pub(super) struct LoraFactors {
    pub a: Vec<f32>,
    pub e: Vec<f32>,
    pub b: Vec<f32>,
}

impl LoraFactors {
    /// The same product as standard LoRA's two factors: `B·√E` and `√E·A` (E ≥ 0), E left at 1.
    /// A pair with E = 0 (the merged product has fewer directions than the rank) keeps its unit A
    /// row and gets B = 0, as PEFT initialises a pair: it adds nothing and can still learn (both
    /// factors zero would never get a gradient).
    pub(super) fn balanced(mut self) -> Self {
        let r = self.e.len();
        let d_in = self.a.len() / r.max(1);
        for (j, e) in self.e.iter_mut().enumerate() {
            let s = e.max(0.0).sqrt();
            if s > 0.0 {
                self.a[j * d_in..(j + 1) * d_in].iter_mut().for_each(|x| *x *= s);
            }
            self.b.iter_mut().skip(j).step_by(r).for_each(|x| *x *= s);
            *e = 1.0;
        }
        self
    }
}

/// The running, exactly compressed stack of one LoRA target.
#[derive(Debug)]
pub(super) struct LoraStack {
    d_in: usize,
    d_out: usize,
    max_rank: usize,
    /// The round's global factors (A `[max_rank, d_in]`, E, B `[d_out, max_rank]`, row-major).
    global_a: Vec<f32>,
    global_e: Vec<f32>,
    global_b: Vec<f32>,
    /// `L`, column-major `d_out × rank`.
    left: Vec<f64>,
    /// `R` (the A side, transposed), column-major `d_in × rank`.
    right: Vec<f64>,
    rank: usize,
    weight: f64,
}

/// Copies a matrix into a column-major vector (reusing its allocation).
fn store_col_major(m: MatRef<'_, f64>, out: &mut Vec<f64>) {
    out.clear();
    out.reserve(m.nrows() * m.ncols());
    for j in 0..m.ncols() {
        out.extend(m.col(j).iter().copied());
    }
}

impl LoraStack {
    pub(super) fn new(d_in: usize, d_out: usize, max_rank: usize) -> Self {
        Self {
            d_in,
            d_out,
            max_rank,
            global_a: Vec::new(),
            global_e: Vec::new(),
            global_b: Vec::new(),
            left: Vec::new(),
            right: Vec::new(),
            rank: 0,
            weight: 0.0,
        }
    }

    /// Empties the stack for a round starting from these global factors.
    pub(super) fn reset(&mut self, a: &[f32], e: &[f32], b: &[f32]) {
        for (dst, src) in [(&mut self.global_a, a), (&mut self.global_e, e), (&mut self.global_b, b)] {
            dst.clear();
            dst.extend_from_slice(src);
        }
        self.left.clear();
        self.right.clear();
        self.rank = 0;
        self.weight = 0.0;
    }

    /// The round's global factors (A, E, B).
    pub(super) fn global(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.global_a, &self.global_e, &self.global_b)
    }

    /// The number of stacked columns.
    pub(super) fn rank(&self) -> usize {
        self.rank
    }

    /// Appends one client's triplets: its factors are the global's first `rank` triplets plus
    /// `scale ·` the deltas; its B columns are weighted by `weight · E`.
    pub(super) fn fold(&mut self, t: &LoraTriplet<'_>, scale: f32, weight: f64) {
        let (d_in, d_out, r, s) = (self.d_in, self.d_out, t.rank, f64::from(scale));
        self.right.reserve(r * d_in);
        self.left.reserve(r * d_out);
        for j in 0..r {
            let e = f64::from(self.global_e[j]) + s * t.e.map_or(0.0, |e| f64::from(e[j]));
            let a_row = (0..d_in).map(|i| f64::from(self.global_a[j * d_in + i]) + s * f64::from(t.a[j * d_in + i]));
            self.right.extend(a_row);
            let we = weight * e;
            let b_col = (0..d_out)
                .map(|i| we * (f64::from(self.global_b[i * self.max_rank + j]) + s * f64::from(t.b[i * r + j])));
            self.left.extend(b_col);
        }
        self.rank += r;
        self.weight += weight;
        if self.rank > LORA_STACK_SLACK * d_in.min(d_out) {
            self.compress();
        }
    }

    /// Replaces the stack by one of `min(d_in, d_out)` columns with exactly the same product.
    fn compress(&mut self) {
        let (d_in, d_out, n) = (self.d_in, self.d_out, self.rank);
        if n <= d_in.min(d_out) {
            return;
        }
        let left = MatRef::from_column_major_slice(&self.left, d_out, n);
        let right = MatRef::from_column_major_slice(&self.right, d_in, n);
        let (new_left, new_right): (Mat<f64>, Mat<f64>) = if d_out <= d_in {
            // L = Q T  ⇒  L Rᵀ = Q (R Tᵀ)ᵀ.
            let qr = left.qr();
            let t = qr.thin_R();
            (qr.compute_thin_Q(), right * t.transpose())
        } else {
            // R = Q T  ⇒  L Rᵀ = (L Tᵀ) Qᵀ.
            let qr = right.qr();
            let t = qr.thin_R();
            (left * t.transpose(), qr.compute_thin_Q())
        };
        store_col_major(new_left.as_ref(), &mut self.left);
        store_col_major(new_right.as_ref(), &mut self.right);
        self.rank = new_left.ncols();
    }

    /// LoRA-FAIR's refined B for the merged factor means `a_bar` (`[max_rank, d_in]`) and `b_bar`
    /// (`[d_out, max_rank]`, row-major): `(M Āᵀ + λ' B̄)(Ā Āᵀ + λ' I)⁻¹` with `M` the stack's mean
    /// product (never formed: `M Āᵀ = L (Rᵀ Āᵀ) / Σw`) and `λ' = lambda · tr(Ā Āᵀ) / r`. `None`
    /// when no update carried this target, or when the system is singular.
    pub(super) fn fair_b(&self, a_bar: &[f32], b_bar: &[f32], lambda: f64) -> Option<Vec<f32>> {
        let (d_in, d_out, n, r) = (self.d_in, self.d_out, self.rank, self.max_rank);
        if n == 0 || self.weight <= 0.0 || a_bar.len() != r * d_in || b_bar.len() != d_out * r {
            return None;
        }
        let left = MatRef::from_column_major_slice(&self.left, d_out, n);
        let right = MatRef::from_column_major_slice(&self.right, d_in, n);
        let a = Mat::<f64>::from_fn(r, d_in, |i, j| f64::from(a_bar[i * d_in + j]));
        let b = Mat::<f64>::from_fn(d_out, r, |i, j| f64::from(b_bar[i * r + j]));
        let gram: Mat<f64> = a.as_ref() * a.transpose();
        let trace: f64 = (0..r).map(|i| gram[(i, i)]).sum();
        let ridge = lambda * trace / r as f64;
        let m_at: Mat<f64> = (left * (right.transpose() * a.transpose())) * (1.0 / self.weight);
        let rhs: Mat<f64> = m_at + b.as_ref() * ridge;
        let system = Mat::<f64>::from_fn(r, r, |i, j| gram[(i, j)] + if i == j { ridge } else { 0.0 });
        // B (ĀĀᵀ + λI) = rhs; the system is symmetric positive definite for λ > 0.
        let solved: Mat<f64> = system.llt(faer::Side::Lower).ok()?.solve(rhs.transpose()).transpose().to_owned();
        let mut out = vec![0.0f32; d_out * r];
        for i in 0..d_out {
            for j in 0..r {
                out[i * r + j] = solved[(i, j)] as f32;
            }
        }
        Some(out)
    }

    /// The merged target re-factorised to `max_rank` triplets, or `None` when no update carried
    /// this target (it then stays as it was).
    /// Refused, with the core's `[rows, cols]`, when its SVD does not converge.
    pub(super) fn refactor(&self) -> Result<Option<LoraFactors>, [usize; 2]> {
        let (d_in, d_out, n, max_rank) = (self.d_in, self.d_out, self.rank, self.max_rank);
        if n == 0 || self.weight <= 0.0 {
            return Ok(None);
        }
        let left = MatRef::from_column_major_slice(&self.left, d_out, n);
        let right = MatRef::from_column_major_slice(&self.right, d_in, n);
        let (qr_b, qr_a) = (left.qr(), right.qr());
        let (q_b, q_a) = (qr_b.compute_thin_Q(), qr_a.compute_thin_Q());
        let core: Mat<f64> = qr_b.thin_R() * qr_a.thin_R().transpose();
        // faer's only SVD error is `NoConvergence`.
        let svd = core.thin_svd().map_err(|_| [core.nrows(), core.ncols()])?;
        let k = svd.S().column_vector().nrows();
        let r = max_rank.min(k);
        let sigma = svd.S().column_vector();
        let mut b: Mat<f64> = q_b.as_ref() * svd.U().subcols(0, r);
        let mut a_t: Mat<f64> = q_a.as_ref() * svd.V().subcols(0, r);
        for j in 0..r {
            orient(&mut b, &mut a_t, j);
        }
        let mut e = vec![0.0f32; max_rank];
        for (j, e) in e.iter_mut().enumerate().take(r) {
            *e = (sigma[j] / self.weight) as f32;
        }
        let pad_b = complement(b.as_ref(), max_rank);
        let pad_a = complement(a_t.as_ref(), max_rank);
        // Row-major outputs: B [d_out, max_rank], A [max_rank, d_in].
        let mut out_b = vec![0.0f32; d_out * max_rank];
        let mut out_a = vec![0.0f32; max_rank * d_in];
        for j in 0..max_rank {
            let (bcol, acol) = if j < r {
                (Some(b.col(j)), Some(a_t.col(j)))
            } else {
                (pad_b.as_ref().and_then(|p| col_if(p, j - r)), pad_a.as_ref().and_then(|p| col_if(p, j - r)))
            };
            if let Some(c) = bcol {
                for i in 0..d_out {
                    out_b[i * max_rank + j] = c[i] as f32;
                }
            }
            if let Some(c) = acol {
                for i in 0..d_in {
                    out_a[j * d_in + i] = c[i] as f32;
                }
            }
        }
        Ok(Some(LoraFactors { a: out_a, e, b: out_b }))
    }
}

/// Column `j` of `m`, if it has one.
fn col_if(m: &Mat<f64>, j: usize) -> Option<faer::ColRef<'_, f64>> {
    (j < m.ncols()).then(|| m.col(j))
}

/// Flips column `j` of `b` and of `a_t` together so that `b`'s entry of largest magnitude in that
/// column is positive (the first one on a tie). The product is unchanged.
fn orient(b: &mut Mat<f64>, a_t: &mut Mat<f64>, j: usize) {
    if sign_of_largest(b.as_ref(), j) < 0.0 {
        b.col_mut(j).iter_mut().for_each(|x| *x = -*x);
        a_t.col_mut(j).iter_mut().for_each(|x| *x = -*x);
    }
}

fn sign_of_largest(m: MatRef<'_, f64>, j: usize) -> f64 {
    let mut best = 0.0f64;
    for &x in m.col(j).iter() {
        if x.abs() > best.abs() {
            best = x;
        }
    }
    if best < 0.0 {
        -1.0
    } else {
        1.0
    }
}

/// Up to `max_rank − ncols` unit columns orthogonal to the orthonormal columns of `m` (each
/// oriented as in [`orient`]), or `None` when none are needed.
fn complement(m: MatRef<'_, f64>, max_rank: usize) -> Option<Mat<f64>> {
    let (d, r) = (m.nrows(), m.ncols());
    if r >= max_rank || r >= d {
        return None;
    }
    let full = m.qr().compute_Q();
    let take = (max_rank - r).min(d - r);
    let mut out = full.as_ref().subcols(r, take).to_owned();
    for j in 0..take {
        if sign_of_largest(out.as_ref(), j) < 0.0 {
            out.col_mut(j).iter_mut().for_each(|x| *x = -*x);
        }
    }
    Some(out)
}

/// The global adapter as client `k` receives it: every LoRA target truncated to the rank granted
/// in `ranks` (its first `r` triplets — the global keeps them sorted by descending singular value,
/// so these are the best rank-`r` part), plain tensors (the head) whole. A target missing from
/// `ranks` keeps `max_rank`; a rank of 0 leaves the target out (the client then sends nothing for
/// it). The result is a "delta from zero" that passes `PoolDelta::validate(spec)`: what
/// `RoundTask::global` encodes, and what the client adds its trained difference to.
pub fn truncate_lora(
    pool: &AdapterPool,
    spec: &PoolSpec,
    ranks: &BTreeMap<String, usize>,
) -> Result<PoolDelta, AggregateError> {
    if !spec.kind.is_lora() {
        return Err(AggregateError::Unsupported("truncate_lora needs a LoRA spec"));
    }
    pool.validate(spec).map_err(AggregateError::Global)?;
    if let Some(t) = ranks.keys().find(|t| !spec.targets.iter().any(|s| &s.name == *t)) {
        return Err(AggregateError::UnknownTarget(t.clone()));
    }
    if let Some((t, r)) = ranks.iter().find(|(_, &r)| r > spec.max_rank) {
        return Err(AggregateError::RankAboveMax { target: t.clone(), rank: *r, max_rank: spec.max_rank });
    }
    let whole = pool.to_transfer(spec).map_err(AggregateError::Global)?;
    whole.truncate_lora(spec, ranks).map_err(AggregateError::Global)
}
