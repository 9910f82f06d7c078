//! Multi-head attention as one fused CPU op with its own backward (flash-attention style).
//!
//! The composed form (reshape to `[B, H, T, hd]`, transposed copies, `Q·Kᵀ`, a mask bias,
//! softmax, `P·V`, transpose back) allocates a dozen tensors, runs small batched matmuls and keeps
//! the `[B, H, T, T]` probabilities alive for the backward. [`attention`] instead runs one task
//! per (batch row, query head) on rayon's pool: it reads the head's rows straight from the
//! (possibly strided) `[B, T, H·hd]` projections, computes only the `len × len` block of real
//! tokens (padding costs nothing), and writes the context into the token-major output. For the
//! backward it saves one log-sum-exp per (batch row, head, query row) and recomputes the
//! probabilities from `q`, `k` and those statistics.
//!
//! [`attention_composed`] is the same function from candle's ops: the reference the tests compare
//! against, and the path on other devices and dtypes.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Error, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::packed;
use crate::simd;

/// Shape of an attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key / value heads; divides `num_heads` (grouped-query attention when smaller).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Query row `i` attends to keys `j <= i` only (decoders).
    pub causal: bool,
    /// Factor on `q·k` before the softmax, usually `1/√head_dim`.
    pub scale: f32,
}

/// Softmax attention of `q` over `k`, `v`, fused (CPU, f32) with a backward that keeps only the
/// softmax statistics (4 bytes per batch row, head and query row).
///
/// q: `[B, T, num_heads·head_dim]`, k, v: `[B, T, num_kv_heads·head_dim]` (f32; the last dim must
/// have stride 1, the other two strides are free: narrow views of one fused QKV projection output
/// go in without copies). `lengths[b]` = real tokens of row `b` (`1..=T`): keys `j >= lengths[b]`
/// are masked out; with `causal`, keys `j > i` too. Query rows `i >= lengths[b]` (padding) output
/// zeros and get zero gradient. Query head `h` uses kv head `h / (num_heads / num_kv_heads)`.
///
/// Returns the context `[B, T, num_heads·head_dim]`, contiguous, token-major (what the output
/// projection takes). On other devices or dtypes this is [`attention_composed`]. When none of
/// `q`, `k`, `v` tracks a gradient nothing is saved for a backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, lengths: &[usize], shape: &AttentionShape) -> Result<Tensor> {
    let dims = check(q, k, v, lengths, shape)?;
    let fused = [q, k, v].iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32);
    if !fused {
        return attention_composed(q, k, v, lengths, shape);
    }
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if x.dim(2)? > 1 && x.stride()[2] != 1 {
            return Err(Error::Msg(format!(
                "attention: {name} has strides {:?}, the last dim must have stride 1",
                x.stride()
            )));
        }
    }
    run_fused(q, k, v, dims, lengths.to_vec(), None, shape)
}

/// The fused op on checked inputs (`offsets`: packed tokens).
fn run_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    lengths: Vec<usize>,
    offsets: Option<Vec<usize>>,
    shape: &AttentionShape,
) -> Result<Tensor> {
    let train = q.track_op() || k.track_op() || v.track_op();
    let op = FusedAttention {
        dims,
        causal: shape.causal,
        scale: shape.scale,
        lengths,
        offsets,
        save_stats: train,
        stats: Mutex::new(None),
    };
    if train {
        q.apply_op3(k, v, op)
    } else {
        q.apply_op3_no_bwd(k, v, &op)
    }
}

/// [`attention`] over packed tokens: `q: [N, num_heads·head_dim]`, `k`, `v`:
/// `[N, num_kv_heads·head_dim]` hold batch row `b`'s tokens at rows `offsets[b]..offsets[b + 1]`
/// (`offsets`: `B + 1` rising entries from 0 to N, every row at least one token), each row
/// attending only to its own tokens. Returns `[N, num_heads·head_dim]`. No padding exists, so none
/// is computed; rows must have unit stride in their last dim. On other devices or dtypes, or as
/// the reference: [`attention_packed_composed`].
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offsets: &[usize],
    shape: &AttentionShape,
) -> Result<Tensor> {
    let (dims, lengths) = check_packed(q, k, v, offsets, shape)?;
    let fused = [q, k, v].iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32);
    if !fused {
        return attention_packed_composed(q, k, v, offsets, shape);
    }
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if x.dim(1)? > 1 && x.stride()[1] != 1 {
            return Err(Error::Msg(format!(
                "attention: {name} has strides {:?}, the last dim must have stride 1",
                x.stride()
            )));
        }
    }
    run_fused(q, k, v, dims, lengths, Some(offsets.to_vec()), shape)
}

/// [`attention_packed`] from candle's composed ops: each input padded to `[B, T_max, ·]`,
/// [`attention_composed`], and the real rows gathered back.
pub fn attention_packed_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offsets: &[usize],
    shape: &AttentionShape,
) -> Result<Tensor> {
    let (_, lengths) = check_packed(q, k, v, offsets, shape)?;
    let out = attention_composed(
        &packed::pad(q, offsets)?,
        &packed::pad(k, offsets)?,
        &packed::pad(v, offsets)?,
        &lengths,
        shape,
    )?;
    packed::unpad(&out, offsets)
}

/// Checks packed inputs; returns the dims of the padded equivalent (T = the longest row) and the
/// rows' lengths.
fn check_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offsets: &[usize],
    shape: &AttentionShape,
) -> Result<(Dims, Vec<usize>)> {
    let n = q.dims2().map_err(|_| {
        Error::Msg(format!("attention: packed q has shape {:?}, expected [N, num_heads·head_dim]", q.dims()))
    })?;
    let n = n.0;
    if offsets.len() < 2
        || offsets[0] != 0
        || offsets[offsets.len() - 1] != n
        || offsets.windows(2).any(|w| w[1] <= w[0])
    {
        return Err(Error::Msg(format!(
            "attention: offsets {offsets:?} must rise strictly from 0 to the {n} packed rows (every batch row at \
             least one token)"
        )));
    }
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let tokens = lengths.iter().copied().max().unwrap_or(0);
    // The padded shapes these packed tensors stand for, for the shared checks.
    let as_padded = |name: &str, x: &Tensor| -> Result<[usize; 3]> {
        match x.dims() {
            &[rows, width] if rows == n => Ok([lengths.len(), tokens, width]),
            dims => Err(Error::Msg(format!("attention: packed {name} has shape {dims:?}, expected [{n}, ·]"))),
        }
    };
    let dims = check_dims(&as_padded("q", q)?, &as_padded("k", k)?, &as_padded("v", v)?, &lengths, shape)?;
    Ok((dims, lengths))
}

/// [`attention`] from candle's composed ops (reshape, transpose, matmul, mask bias, softmax as
/// max-shift / exp / sum, matmul, padded query rows zeroed): the reference, and the path on
/// non-CPU devices. Same arguments, same result; materialises the `[B, H, T, T]` probabilities.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
    shape: &AttentionShape,
) -> Result<Tensor> {
    let Dims { batch, tokens, heads, kv_heads, head_dim, group } = check(q, k, v, lengths, shape)?;
    let (dev, dtype) = (q.device(), q.dtype());
    let split = |x: &Tensor, n: usize| x.reshape((batch, tokens, n, head_dim))?.transpose(1, 2)?.contiguous();
    // Each kv head repeated for its group of query heads.
    let repeat = |x: Tensor| -> Result<Tensor> {
        if group == 1 {
            return Ok(x);
        }
        x.unsqueeze(2)?.expand((batch, kv_heads, group, tokens, head_dim))?.reshape((batch, heads, tokens, head_dim))
    };
    let (qh, kh, vh) = (split(q, heads)?, repeat(split(k, kv_heads)?)?, repeat(split(v, kv_heads)?)?);
    let scores = (qh.matmul(&kh.t()?)? * f64::from(shape.scale))?;

    let bias = if shape.causal {
        let bias: Vec<f32> = (0..batch * tokens * tokens)
            .map(|n| {
                let (b, i, j) = (n / (tokens * tokens), n / tokens % tokens, n % tokens);
                if j < lengths[b] && j <= i {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        Tensor::from_vec(bias, (batch, 1, tokens, tokens), dev)?
    } else {
        let bias: Vec<f32> =
            (0..batch * tokens).map(|n| if n % tokens < lengths[n / tokens] { 0.0 } else { f32::MIN }).collect();
        Tensor::from_vec(bias, (batch, 1, 1, tokens), dev)?
    };
    let scores = scores.broadcast_add(&bias.to_dtype(dtype)?)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
    let context = probs.matmul(&vh)?;

    let real: Vec<f32> = (0..batch * tokens).map(|n| f32::from(u8::from(n % tokens < lengths[n / tokens]))).collect();
    let real = Tensor::from_vec(real, (batch, 1, tokens, 1), dev)?.to_dtype(dtype)?;
    context.broadcast_mul(&real)?.transpose(1, 2)?.reshape((batch, tokens, heads * head_dim))
}

/// The sizes of a checked call.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dims {
    batch: usize,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Query heads per kv head.
    group: usize,
}

/// Checks the heads, the tensors' shapes and the lengths against each other.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, lengths: &[usize], shape: &AttentionShape) -> Result<Dims> {
    check_dims(q.dims(), k.dims(), v.dims(), lengths, shape)
}

/// [`check`] on the shapes.
fn check_dims(q: &[usize], k: &[usize], v: &[usize], lengths: &[usize], shape: &AttentionShape) -> Result<Dims> {
    let AttentionShape { num_heads: heads, num_kv_heads: kv_heads, head_dim, .. } = *shape;
    if heads == 0 || kv_heads == 0 || head_dim == 0 {
        return Err(Error::Msg(format!(
            "attention: num_heads {heads}, num_kv_heads {kv_heads}, head_dim {head_dim}: all must be positive"
        )));
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(Error::Msg(format!("attention: num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")));
    }
    let &[batch, tokens, width] = q else {
        return Err(Error::Msg(format!(
            "attention: q has shape {q:?}, expected [B, T, num_heads·head_dim = {}]",
            heads * head_dim
        )));
    };
    if width != heads * head_dim {
        return Err(Error::Msg(format!(
            "attention: q has shape {q:?}, expected [B, T, num_heads·head_dim = {heads}·{head_dim}]"
        )));
    }
    for (name, x) in [("k", k), ("v", v)] {
        if x != [batch, tokens, kv_heads * head_dim] {
            return Err(Error::Msg(format!(
                "attention: {name} has shape {x:?}, expected [{batch}, {tokens}, {}] ([B, T] of q, \
                 num_kv_heads·head_dim = {kv_heads}·{head_dim})",
                kv_heads * head_dim
            )));
        }
    }
    if lengths.len() != batch {
        return Err(Error::Msg(format!("attention: {} lengths for a batch of {batch}", lengths.len())));
    }
    if let Some((b, len)) = lengths.iter().enumerate().find(|(_, &len)| len == 0 || len > tokens) {
        return Err(Error::Msg(format!("attention: lengths[{b}] = {len}, expected 1..={tokens} (T)")));
    }
    Ok(Dims { batch, tokens, heads, kv_heads, head_dim, group: heads / kv_heads })
}

/// The fused op. Its forward fills `stats` (when `save_stats`) with the log-sum-exp of each
/// (batch row, head, query row), `[B, H, T]`; its backward reads them.
struct FusedAttention {
    dims: Dims,
    causal: bool,
    scale: f32,
    lengths: Vec<usize>,
    /// Packed tokens: batch row b's at rows `offsets[b]..offsets[b + 1]` of `[N, width]` inputs.
    offsets: Option<Vec<usize>>,
    save_stats: bool,
    stats: Mutex<Option<Vec<f32>>>,
}

impl FusedAttention {
    /// Token rows of an input or output: `B·T` padded, N packed.
    fn rows(&self) -> usize {
        match &self.offsets {
            Some(o) => o[o.len() - 1],
            None => self.dims.batch * self.dims.tokens,
        }
    }

    /// The shape of an input or output of `width`.
    fn shape(&self, width: usize) -> Shape {
        match &self.offsets {
            Some(_) => Shape::from((self.rows(), width)),
            None => Shape::from((self.dims.batch, self.dims.tokens, width)),
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let packed = self.offsets.as_deref();
        let q = Rows::new("q", q, q_layout, d.heads * d.head_dim, packed)?;
        let k = Rows::new("k", k, k_layout, d.kv_heads * d.head_dim, packed)?;
        let v = Rows::new("v", v, v_layout, d.kv_heads * d.head_dim, packed)?;
        let mut out = vec![0f32; self.rows() * d.heads * d.head_dim];
        let out_rows = SharedRows::new(&mut out, d.tokens, d.heads * d.head_dim, packed);
        let task = |n: usize, lse: &mut [f32], scratch: &mut Scratch| {
            let (b, h) = (n / d.heads, n % d.heads);
            let args = Forward { d, causal: self.causal, scale: self.scale, len: self.lengths[b], b, h };
            forward(&args, q, k, v, &out_rows, lse, scratch);
        };
        let tasks = d.batch * d.heads;
        if self.save_stats {
            let mut stats = vec![0f32; tasks * d.tokens];
            stats
                .par_chunks_mut(d.tokens.max(1))
                .enumerate()
                .for_each_init(Scratch::default, |s, (n, lse)| task(n, lse, s));
            *self.stats.lock().map_err(|_| Error::Msg("fused-attention: lock poisoned".into()))? = Some(stats);
        } else {
            (0..tasks)
                .into_par_iter()
                .for_each_init(|| (Scratch::default(), vec![0f32; d.tokens]), |(s, lse), n| task(n, lse, s));
        }
        Ok((CpuStorage::F32(out), self.shape(d.heads * d.head_dim)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let stats = self.stats.lock().map_err(|_| Error::Msg("fused-attention: lock poisoned".into()))?;
        let lse = stats
            .as_deref()
            .ok_or_else(|| Error::Msg("fused-attention: backward without the forward's statistics".into()))?;
        let last = grad.rank() - 1;
        let grad = if grad.dim(last)? > 1 && grad.stride()[last] != 1 { grad.contiguous()? } else { grad.clone() };
        let packed = self.offsets.as_deref();
        let (q_store, q_layout) = q.storage_and_layout();
        let (k_store, k_layout) = k.storage_and_layout();
        let (v_store, v_layout) = v.storage_and_layout();
        let (o_store, o_layout) = out.storage_and_layout();
        let (g_store, g_layout) = grad.storage_and_layout();
        let (q_width, kv_width) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let q_rows = Rows::new("q", cpu(&q_store, "q")?, q_layout, q_width, packed)?;
        let k_rows = Rows::new("k", cpu(&k_store, "k")?, k_layout, kv_width, packed)?;
        let v_rows = Rows::new("v", cpu(&v_store, "v")?, v_layout, kv_width, packed)?;
        let o_rows = Rows::new("the output", cpu(&o_store, "the output")?, o_layout, q_width, packed)?;
        let g_rows =
            Rows::new("the output gradient", cpu(&g_store, "the output gradient")?, g_layout, q_width, packed)?;

        let rows = self.rows();
        let mut dq = vec![0f32; rows * q_width];
        let mut dk = vec![0f32; rows * kv_width];
        let mut dv = vec![0f32; rows * kv_width];
        let grads = Grads {
            dq: SharedRows::new(&mut dq, d.tokens, q_width, packed),
            dk: SharedRows::new(&mut dk, d.tokens, kv_width, packed),
            dv: SharedRows::new(&mut dv, d.tokens, kv_width, packed),
        };
        (0..d.batch * d.kv_heads).into_par_iter().for_each_init(Scratch::default, |scratch, n| {
            let (b, g) = (n / d.kv_heads, n % d.kv_heads);
            let args = Backward { d, causal: self.causal, scale: self.scale, len: self.lengths[b], b, g };
            let inputs = [q_rows, k_rows, v_rows, o_rows, g_rows];
            backward(&args, inputs, lse, &grads, scratch);
        });
        let back = |x: &Tensor, data: Vec<f32>, width: usize| -> Result<Option<Tensor>> {
            x.track_op().then(|| Tensor::from_vec(data, self.shape(width), &Device::Cpu)).transpose()
        };
        Ok((back(q, dq, q_width)?, back(k, dk, kv_width)?, back(v, dv, kv_width)?))
    }
}

/// The f32 data of a CPU storage.
fn cpu<'a>(storage: &'a Storage, name: &str) -> Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(s) => Ok(s),
        _ => Err(Error::Msg(format!("fused-attention: {name} is not on the CPU"))),
    }
}

/// A `[B, T, width]` f32 tensor read row by row: any batch and token stride, unit stride within
/// a row; or packed tokens, `[N, width]` with batch row b's tokens from row `packed[b]`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    batch_stride: usize,
    token_stride: usize,
    packed: Option<&'a [usize]>,
}

impl<'a> Rows<'a> {
    fn new(
        name: &str,
        storage: &'a CpuStorage,
        layout: &Layout,
        width: usize,
        packed: Option<&'a [usize]>,
    ) -> Result<Self> {
        let data = storage.as_slice::<f32>()?;
        let (dims, stride) = (layout.dims(), layout.stride());
        if packed.is_some() {
            if dims.len() != 2 || dims[1] != width || (width > 1 && stride[1] != 1) {
                return Err(Error::Msg(format!(
                    "fused-attention: packed {name} has shape {dims:?}, strides {stride:?}; expected [N, {width}] \
                     with a unit last stride"
                )));
            }
            let last = layout.start_offset() + (dims[0].max(1) - 1) * stride[0] + width;
            if dims[0] > 0 && last > data.len() {
                return Err(Error::Msg(format!("fused-attention: {name}'s layout overruns its storage")));
            }
            return Ok(Self { data, start: layout.start_offset(), batch_stride: 0, token_stride: stride[0], packed });
        }
        if dims.len() != 3 || dims[2] != width || (width > 1 && stride[2] != 1) {
            return Err(Error::Msg(format!(
                "fused-attention: {name} has shape {dims:?}, strides {stride:?}; expected [B, T, {width}] with a \
                 unit last stride"
            )));
        }
        let last = layout.start_offset() + (dims[0].max(1) - 1) * stride[0] + (dims[1].max(1) - 1) * stride[1] + width;
        if dims[0] * dims[1] > 0 && last > data.len() {
            return Err(Error::Msg(format!("fused-attention: {name}'s layout overruns its storage")));
        }
        Ok(Self { data, start: layout.start_offset(), batch_stride: stride[0], token_stride: stride[1], packed: None })
    }

    /// `n` values of row (b, i) from column `col`.
    #[inline(always)]
    fn row(&self, b: usize, i: usize, col: usize, n: usize) -> &'a [f32] {
        let at = match self.packed {
            Some(offsets) => self.start + (offsets[b] + i) * self.token_stride + col,
            None => self.start + b * self.batch_stride + i * self.token_stride + col,
        };
        &self.data[at..at + n]
    }
}

/// A contiguous `[B, T, width]` output that parallel tasks write through: each task owns a
/// disjoint set of (row, column range) pieces.
struct SharedRows<'a> {
    ptr: *mut f32,
    len: usize,
    tokens: usize,
    width: usize,
    packed: Option<&'a [usize]>,
    _data: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the tasks that share it write disjoint pieces (see `piece`).
unsafe impl Send for SharedRows<'_> {}
unsafe impl Sync for SharedRows<'_> {}

impl<'a> SharedRows<'a> {
    fn new(data: &'a mut [f32], tokens: usize, width: usize, packed: Option<&'a [usize]>) -> Self {
        Self { ptr: data.as_mut_ptr(), len: data.len(), tokens, width, packed, _data: std::marker::PhantomData }
    }

    /// `n` values of row (b, i) from column `col`.
    ///
    /// # Safety
    /// No other live slice from this `SharedRows` may overlap the piece.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    unsafe fn piece(&self, b: usize, i: usize, col: usize, n: usize) -> &mut [f32] {
        let row = match self.packed {
            Some(offsets) => offsets[b] + i,
            None => b * self.tokens + i,
        };
        let at = row * self.width + col;
        assert!(at + n <= self.len && col + n <= self.width, "fused-attention: output piece out of range");
        // SAFETY: in bounds (checked above); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) }
    }
}

/// The three input gradients the backward writes.
struct Grads<'a> {
    dq: SharedRows<'a>,
    dk: SharedRows<'a>,
    dv: SharedRows<'a>,
}

/// Per-task work buffers, reused across a rayon worker's tasks: the head's operands packed
/// contiguous and zero-padded to whole register tiles, and the products. `lr`, `lc`: the head's
/// length rounded up to [`TR`], [`TC`]; `dc`: `head_dim` rounded up to [`TC`].
#[derive(Default)]
struct Scratch {
    /// Q (forward: `[lr, hd]`; backward: `[lr, dc]`).
    q: Vec<f32>,
    /// Kᵀ, `[hd, lc]`.
    kt: Vec<f32>,
    /// K (backward), `[lr, dc]`.
    k: Vec<f32>,
    /// V (forward), `[len, dc]`; Vᵀ (backward), `[hd, lc]`.
    v: Vec<f32>,
    /// dO (backward), `[lr, dc]`.
    d_out: Vec<f32>,
    /// Scores, then probabilities, `[lr, lc]`.
    p: Vec<f32>,
    /// dP, then dS (backward), `[lr, lc]`.
    ds: Vec<f32>,
    /// The context (forward) or dQ (backward) of the head, `[lr, dc]`.
    o: Vec<f32>,
    /// dK and dV accumulators (backward), `[lr, dc]`.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// `v` resized to hold `n` (contents unspecified).
fn buffer(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `n` rounded up to a multiple of `m`.
fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Rows of a register tile of a product.
const TR: usize = 4;
/// Columns of a register tile (two AVX registers).
const TC: usize = 16;

/// Rows `0..len` of `x` at batch row `b`, columns `col..col + width`, as a `[rows, ld]` buffer
/// (zero elsewhere).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack<'s>(
    buf: &'s mut Vec<f32>,
    x: Rows,
    b: usize,
    col: usize,
    width: usize,
    len: usize,
    rows: usize,
    ld: usize,
) -> &'s mut [f32] {
    let out = buffer(buf, rows * ld);
    out.fill(0.0);
    for i in 0..len {
        out[i * ld..][..width].copy_from_slice(x.row(b, i, col, width));
    }
    out
}

/// The same transposed: `[width, ld]` with `out[p·ld + i] = x[i][col + p]` (zero for `i >= len`).
#[inline(always)]
fn pack_t<'s>(
    buf: &'s mut Vec<f32>,
    x: Rows,
    b: usize,
    col: usize,
    width: usize,
    len: usize,
    ld: usize,
) -> &'s mut [f32] {
    let out = buffer(buf, width * ld);
    out.fill(0.0);
    for i in 0..len {
        for (p, &v) in x.row(b, i, col, width).iter().enumerate() {
            out[p * ld + i] = v;
        }
    }
    out
}

/// The left operand of [`matmul`]: row `r`, inner index `p` at `a[r·ld + p]` (`Rows`) or at
/// `a[p·ld + r]` (`Cols`, a transposed matrix read in place).
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Rows(&'a [f32], usize),
    Cols(&'a [f32], usize),
}

/// `c = alpha·(a·b)`, or `c += alpha·(a·b)` when `add`, by `TR × TC` register tiles, for row
/// blocks `r0 = 0, TR, .. < m`: `b` rows have stride `ldb`, `c` rows `ldc`. `span(r0)` gives
/// the block's range of the inner index and its number of columns (a multiple of `TC`): the
/// causal products skip what is zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matmul<const FMA: bool>(
    c: &mut [f32],
    ldc: usize,
    a: Lhs,
    b: &[f32],
    ldb: usize,
    m: usize,
    alpha: f32,
    add: bool,
    span: impl Fn(usize) -> (std::ops::Range<usize>, usize),
) {
    for r0 in (0..m).step_by(TR) {
        let (inner, n) = span(r0);
        let b = &b[inner.start * ldb..];
        for c0 in (0..n).step_by(TC) {
            let b = &b[c0..];
            let acc = match a {
                Lhs::Rows(a, lda) => {
                    let rows: [&[f32]; TR] = std::array::from_fn(|r| &a[(r0 + r) * lda..][inner.clone()]);
                    let k = inner.len();
                    let rows = rows.map(|row| &row[..k]);
                    tile::<FMA>((0..k).map(|p| std::array::from_fn(|r| rows[r][p])), b, ldb)
                }
                Lhs::Cols(a, lda) => {
                    let cols = a[inner.start * lda + r0..].chunks(lda).take(inner.len());
                    tile::<FMA>(cols.map(|c| c.first_chunk().copied().unwrap_or([0.0; TR])), b, ldb)
                }
            };
            for (r, acc) in acc.iter().enumerate() {
                let out = &mut c[(r0 + r) * ldc + c0..][..TC];
                if add {
                    for (o, &x) in out.iter_mut().zip(acc) {
                        *o = madd::<FMA>(alpha, x, *o);
                    }
                } else {
                    for (o, &x) in out.iter_mut().zip(acc) {
                        *o = alpha * x;
                    }
                }
            }
        }
    }
}

/// One `TR × TC` tile: `Σ_p a[p][r] · b[p·ldb + c]` over the `a` items, kept in registers.
#[inline(always)]
fn tile<const FMA: bool>(a: impl Iterator<Item = [f32; TR]>, b: &[f32], ldb: usize) -> [[f32; TC]; TR] {
    let mut acc = [[0f32; TC]; TR];
    for (ap, b) in a.zip(b.chunks(ldb)) {
        let Some(bp) = b.first_chunk::<TC>() else { break };
        for (acc, &x) in acc.iter_mut().zip(&ap) {
            for (acc, &y) in acc.iter_mut().zip(bp) {
                *acc = madd::<FMA>(x, y, *acc);
            }
        }
    }
    acc
}

/// `a·b + c`: one fused instruction in the AVX2 + FMA build, a multiply and an add in the
/// baseline one (where `mul_add` would be a libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// One forward task: batch row `b`, query head `h`.
struct Forward {
    d: Dims,
    causal: bool,
    scale: f32,
    len: usize,
    b: usize,
    h: usize,
}

/// The forward of one task, built for AVX2 + FMA when the CPU has them, else for the baseline.
/// (Not `simd::with_fast_isa` with a closure: LLVM kept a closure this large out of line, built
/// for the baseline: SSE in the disassembly, half the speed.)
fn forward(a: &Forward, q: Rows, k: Rows, v: Rows, out: &SharedRows, lse: &mut [f32], scratch: &mut Scratch) {
    #[cfg(target_arch = "x86_64")]
    if simd::fast_isa() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(a: &Forward, q: Rows, k: Rows, v: Rows, out: &SharedRows, lse: &mut [f32], s: &mut Scratch) {
            forward_task::<true>(a, q, k, v, out, lse, s)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked by `fast_isa`).
        return unsafe { avx2(a, q, k, v, out, lse, scratch) };
    }
    forward_task::<false>(a, q, k, v, out, lse, scratch)
}

/// The forward of one (batch row, query head) on the real `len` rows and keys only:
/// S = scale·Q Kᵀ, row softmax (causal: keys `j <= i`), O = P V into the output rows, and each
/// row's log-sum-exp into `lse`.
#[inline(always)]
fn forward_task<const FMA: bool>(
    a: &Forward,
    q: Rows,
    k: Rows,
    v: Rows,
    out: &SharedRows,
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    let (hd, len, causal) = (a.d.head_dim, a.len, a.causal);
    let (lr, lc, dc) = (round_up(len, TR), round_up(len, TC), round_up(hd, TC));
    let (q_col, kv_col) = (a.h * hd, a.h / a.d.group * hd);
    let qs = pack(&mut sc.q, q, a.b, q_col, hd, len, lr, hd);
    let kt = pack_t(&mut sc.kt, k, a.b, kv_col, hd, len, lc);
    let vs = pack(&mut sc.v, v, a.b, kv_col, hd, len, len, dc);
    let p = buffer(&mut sc.p, lr * lc);
    let keys_of_block = |r0: usize| if causal { (r0 + TR).min(len) } else { len };
    matmul::<FMA>(p, lc, Lhs::Rows(qs, hd), kt, lc, lr, a.scale, false, |r0| (0..hd, round_up(keys_of_block(r0), TC)));
    for (i, row) in p.chunks_exact_mut(lc).enumerate() {
        if i >= len {
            row.fill(0.0);
            continue;
        }
        let keys = if causal { i + 1 } else { len };
        let (s, masked) = row.split_at_mut(keys);
        masked.fill(0.0);
        let max = max(s);
        let sum = exp_shifted(s, max);
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|x| *x *= inv);
        lse[i] = max + sum.ln();
    }
    let o = buffer(&mut sc.o, lr * dc);
    matmul::<FMA>(o, dc, Lhs::Rows(p, lc), vs, dc, lr, 1.0, false, |r0| (0..keys_of_block(r0), dc));
    for (i, row) in o.chunks_exact(dc).take(len).enumerate() {
        // SAFETY: row (b, i), columns of head h: written by this task only.
        unsafe { out.piece(a.b, i, q_col, hd) }.copy_from_slice(&row[..hd]);
    }
}

/// One backward task: batch row `b`, kv head `g` and its group of query heads.
struct Backward {
    d: Dims,
    causal: bool,
    scale: f32,
    len: usize,
    b: usize,
    g: usize,
}

/// The backward of one task, built for AVX2 + FMA when the CPU has them (as [`forward`]).
fn backward(a: &Backward, inputs: [Rows; 5], lse: &[f32], grads: &Grads, scratch: &mut Scratch) {
    #[cfg(target_arch = "x86_64")]
    if simd::fast_isa() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(a: &Backward, inputs: [Rows; 5], lse: &[f32], grads: &Grads, scratch: &mut Scratch) {
            backward_task::<true>(a, inputs, lse, grads, scratch)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked by `fast_isa`).
        return unsafe { avx2(a, inputs, lse, grads, scratch) };
    }
    backward_task::<false>(a, inputs, lse, grads, scratch)
}

/// The backward of one (batch row, kv head) over its group of query heads, on the real rows:
/// P recomputed as exp(scale·Q Kᵀ − lse); dV = Pᵀ dO, dP = dO Vᵀ, Dᵢ = rowsum(dO ⊙ O),
/// dS = P ⊙ (dP − D), dQ = scale·dS K, dK = scale·dSᵀ Q. dK and dV accumulate over the group in
/// the task's scratch, so no two tasks write the same rows. `inputs`: q, k, v, the output, its
/// gradient.
#[inline(always)]
fn backward_task<const FMA: bool>(a: &Backward, inputs: [Rows; 5], lse: &[f32], grads: &Grads, sc: &mut Scratch) {
    let [q, k, v, o, d_out] = inputs;
    let (hd, len, causal, t) = (a.d.head_dim, a.len, a.causal, a.d.tokens);
    let (lr, lc, dc) = (round_up(len, TR), round_up(len, TC), round_up(hd, TC));
    let kv_col = a.g * hd;
    let kt = pack_t(&mut sc.kt, k, a.b, kv_col, hd, len, lc);
    let ks = pack(&mut sc.k, k, a.b, kv_col, hd, len, lr, dc);
    let vt = pack_t(&mut sc.v, v, a.b, kv_col, hd, len, lc);
    let dk = buffer(&mut sc.dk, lr * dc);
    let dv = buffer(&mut sc.dv, lr * dc);
    dk.fill(0.0);
    dv.fill(0.0);
    let keys_of_block = |r0: usize| if causal { (r0 + TR).min(len) } else { len };
    // Pᵀ and dSᵀ rows are keys: with the causal mask only queries i >= j are nonzero.
    let queries_of_block = |r0: usize| if causal { r0..len } else { 0..len };
    for h in a.g * a.d.group..(a.g + 1) * a.d.group {
        let q_col = h * hd;
        let lse = &lse[(a.b * a.d.heads + h) * t..][..len];
        let qs = pack(&mut sc.q, q, a.b, q_col, hd, len, lr, dc);
        let gs = pack(&mut sc.d_out, d_out, a.b, q_col, hd, len, lr, dc);
        let p = buffer(&mut sc.p, lr * lc);
        let ds = buffer(&mut sc.ds, lr * lc);
        let cols = |r0: usize| (0..hd, round_up(keys_of_block(r0), TC));
        matmul::<FMA>(p, lc, Lhs::Rows(qs, dc), kt, lc, lr, a.scale, false, cols);
        matmul::<FMA>(ds, lc, Lhs::Rows(gs, dc), vt, lc, lr, 1.0, false, cols);
        for (i, (p, ds)) in p.chunks_exact_mut(lc).zip(ds.chunks_exact_mut(lc)).enumerate() {
            if i >= len {
                p.fill(0.0);
                ds.fill(0.0);
                continue;
            }
            let keys = if causal { i + 1 } else { len };
            let (shift, di) = (lse[i], dot(&gs[i * dc..][..hd], o.row(a.b, i, q_col, hd)));
            for (pj, dsj) in p[..keys].iter_mut().zip(&mut ds[..keys]) {
                *pj = simd::exp(*pj - shift);
                *dsj = *pj * (*dsj - di);
            }
            p[keys..].fill(0.0);
            ds[keys..].fill(0.0);
        }
        matmul::<FMA>(dv, dc, Lhs::Cols(p, lc), gs, dc, lr, 1.0, true, |r0| (queries_of_block(r0), dc));
        matmul::<FMA>(dk, dc, Lhs::Cols(ds, lc), qs, dc, lr, a.scale, true, |r0| (queries_of_block(r0), dc));
        let dq = buffer(&mut sc.o, lr * dc);
        matmul::<FMA>(dq, dc, Lhs::Rows(ds, lc), ks, dc, lr, a.scale, false, |r0| (0..keys_of_block(r0), dc));
        for (i, row) in dq.chunks_exact(dc).take(len).enumerate() {
            // SAFETY: row (b, i), columns of query head h (in kv head g's group): this task only.
            unsafe { grads.dq.piece(a.b, i, q_col, hd) }.copy_from_slice(&row[..hd]);
        }
    }
    for (j, (dk, dv)) in dk.chunks_exact(dc).zip(dv.chunks_exact(dc)).take(len).enumerate() {
        // SAFETY: row (b, j), columns of kv head g: written by this task only.
        unsafe {
            grads.dk.piece(a.b, j, kv_col, hd).copy_from_slice(&dk[..hd]);
            grads.dv.piece(a.b, j, kv_col, hd).copy_from_slice(&dv[..hd]);
        }
    }
}

/// Lanes of the blocked reductions (one AVX register).
const LANES: usize = 8;

/// Σ x·y, in `LANES` partial sums so that it vectorises.
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest value (−∞ for none), in `LANES` partial maxima.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// `x[j] = e^(x[j] − shift)`; returns the sum.
#[inline(always)]
fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    x.iter_mut().for_each(|v| *v = simd::exp(*v - shift));
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::{backprop::GradStore, Var};

    use super::*;

    /// Relative tolerance of fused against composed: max |fused − composed| / max |composed|, per
    /// tensor (values and gradients). Both are f32 with different summation orders and exp.
    const TOL: f32 = 1e-5;

    /// Deterministic values in [−2, 2) (xorshift), so failures reproduce.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    fn tensor(dims: impl Into<Shape>, seed: u64) -> Tensor {
        let shape: Shape = dims.into();
        Tensor::from_vec(values(shape.elem_count(), seed), shape, &Device::Cpu).unwrap()
    }

    fn shape(num_heads: usize, num_kv_heads: usize, head_dim: usize, causal: bool) -> AttentionShape {
        AttentionShape { num_heads, num_kv_heads, head_dim, causal, scale: 1.0 / (head_dim as f32).sqrt() }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let (got, want) = (flat(got), flat(want));
        let norm = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
        let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= TOL * norm, "{what}: max diff {diff:e}, max |reference| {norm:e}");
    }

    /// The op under test, for `compare`.
    type Op = fn(&Tensor, &Tensor, &Tensor, &[usize], &AttentionShape) -> Result<Tensor>;

    /// The output and the gradients of a nonlinear loss of it w.r.t. `vars`.
    fn run(op: Op, qkv: [&Tensor; 3], lengths: &[usize], s: &AttentionShape, vars: &[&Var]) -> (Tensor, Vec<Tensor>) {
        let out = op(qkv[0], qkv[1], qkv[2], lengths, s).unwrap();
        let upstream = tensor(out.dims(), 99);
        let loss = (out.tanh().unwrap() * upstream).unwrap().sum_all().unwrap();
        let grads: GradStore = loss.backward().unwrap();
        let g = vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
        (out, g)
    }

    /// Fused and composed agree on the output and on the gradients of q, k and v (separate `Var`s).
    fn compare(batch: usize, tokens: usize, lengths: &[usize], s: &AttentionShape) -> (Tensor, Vec<Tensor>) {
        let q = Var::from_tensor(&tensor((batch, tokens, s.num_heads * s.head_dim), 1)).unwrap();
        let k = Var::from_tensor(&tensor((batch, tokens, s.num_kv_heads * s.head_dim), 2)).unwrap();
        let v = Var::from_tensor(&tensor((batch, tokens, s.num_kv_heads * s.head_dim), 3)).unwrap();
        let qkv = [q.as_tensor(), k.as_tensor(), v.as_tensor()];
        let (out, grads) = run(attention, qkv, lengths, s, &[&q, &k, &v]);
        let (want, want_grads) = run(attention_composed, qkv, lengths, s, &[&q, &k, &v]);
        assert_close("output", &out, &want);
        for ((name, g), w) in ["dq", "dk", "dv"].iter().zip(&grads).zip(&want_grads) {
            assert_close(name, g, w);
        }
        (out, grads)
    }

    #[test]
    fn fused_equals_composed_on_odd_shapes_and_mixed_lengths() {
        for (batch, tokens, heads, head_dim) in
            [(1usize, 1usize, 1, 1), (2, 5, 3, 8), (3, 17, 2, 32), (1, 17, 4, 1), (3, 5, 1, 32)]
        {
            let lengths: Vec<usize> = [tokens, 1, tokens.div_ceil(2usize)][..batch].to_vec();
            for causal in [false, true] {
                compare(batch, tokens, &lengths, &shape(heads, heads, head_dim, causal));
            }
        }
    }

    #[test]
    fn packed_tokens_equal_the_composed_ops_and_the_padded_rows() {
        for (offsets, s) in [
            (vec![0usize, 5, 6, 23], shape(4, 4, 8, false)),
            (vec![0, 17, 26], shape(6, 2, 8, true)),
            (vec![0, 1], shape(1, 1, 1, false)),
        ] {
            let n = offsets[offsets.len() - 1];
            let q = Var::from_tensor(&tensor((n, s.num_heads * s.head_dim), 1)).unwrap();
            let k = Var::from_tensor(&tensor((n, s.num_kv_heads * s.head_dim), 2)).unwrap();
            let v = Var::from_tensor(&tensor((n, s.num_kv_heads * s.head_dim), 3)).unwrap();
            let qkv = [q.as_tensor(), k.as_tensor(), v.as_tensor()];
            let (out, grads) = run(attention_packed, qkv, &offsets, &s, &[&q, &k, &v]);
            let (want, want_grads) = run(attention_packed_composed, qkv, &offsets, &s, &[&q, &k, &v]);
            assert_close("packed output", &out, &want);
            for ((name, g), w) in ["dq", "dk", "dv"].iter().zip(&grads).zip(&want_grads) {
                assert_close(name, g, w);
            }
            // Row b of the packed output is row b of the padded call, token for token.
            let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
            let longest = *lengths.iter().max().unwrap();
            let pad = |x: &Tensor| {
                let rows: Vec<Tensor> = offsets
                    .windows(2)
                    .map(|w| {
                        x.narrow(0, w[0], w[1] - w[0]).unwrap().pad_with_zeros(0, 0, longest - (w[1] - w[0])).unwrap()
                    })
                    .collect();
                Tensor::stack(&rows, 0).unwrap()
            };
            let padded = attention(&pad(qkv[0]), &pad(qkv[1]), &pad(qkv[2]), &lengths, &s).unwrap();
            for (b, w) in offsets.windows(2).enumerate() {
                let row = padded.get(b).unwrap().narrow(0, 0, w[1] - w[0]).unwrap();
                assert_close("packed vs padded", &out.narrow(0, w[0], w[1] - w[0]).unwrap(), &row);
            }
        }
        let s = shape(1, 1, 4, false);
        let x = tensor((5, 4), 1);
        let err = attention_packed(&x, &x, &x, &[0, 3, 3, 5], &s).unwrap_err().to_string();
        assert!(err.contains("offsets") && err.contains("[0, 3, 3, 5]"), "{err}");
        let err = attention_packed(&x, &x, &x, &[0, 4], &s).unwrap_err().to_string();
        assert!(err.contains("5 packed rows"), "{err}");
    }

    #[test]
    fn padded_query_rows_are_zero_with_zero_gradient() {
        let (batch, tokens, lengths) = (3, 17, [17, 1, 6]);
        for causal in [false, true] {
            let s = shape(2, 1, 8, causal);
            let (out, grads) = compare(batch, tokens, &lengths, &s);
            let out = out.to_vec3::<f32>().unwrap();
            let grads: Vec<Vec<Vec<Vec<f32>>>> = grads.iter().map(|g| g.to_vec3().unwrap()).collect();
            for (b, &len) in lengths.iter().enumerate() {
                for i in len..tokens {
                    assert!(out[b][i].iter().all(|&x| x == 0.0), "output row {b}, {i}");
                    // Padding rows are neither queries nor keys: no gradient for q, k or v.
                    for (name, g) in ["dq", "dk", "dv"].iter().zip(&grads) {
                        assert!(g[b][i].iter().all(|&x| x == 0.0), "{name} row {b}, {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn grouped_query_attention_with_causal_mask_equals_composed() {
        compare(2, 17, &[17, 9], &shape(6, 2, 8, true));
        compare(3, 5, &[1, 5, 3], &shape(6, 3, 32, false));
        compare(1, 17, &[17], &shape(4, 1, 1, true));
    }

    #[test]
    fn narrow_views_of_one_fused_projection_go_in_without_copies() {
        let s = shape(6, 2, 8, true);
        let (batch, tokens, lengths) = (2, 17, [13, 17]);
        let (qw, kw) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        let qkv = Var::from_tensor(&tensor((batch, tokens, qw + 2 * kw), 5)).unwrap();
        let views = |x: &Tensor| {
            let (q, k, v) =
                (x.narrow(2, 0, qw).unwrap(), x.narrow(2, qw, kw).unwrap(), x.narrow(2, qw + kw, kw).unwrap());
            assert!(!q.is_contiguous() && !k.is_contiguous());
            (q, k, v)
        };
        let (q, k, v) = views(qkv.as_tensor());
        let (out, grad) = run(attention, [&q, &k, &v], &lengths, &s, &[&qkv]);
        let (want, want_grad) = run(attention_composed, [&q, &k, &v], &lengths, &s, &[&qkv]);
        assert_close("output", &out, &want);
        assert_close("d qkv", &grad[0], &want_grad[0]);
        assert!(out.is_contiguous());
    }

    #[test]
    fn without_gradients_the_result_is_detached_and_the_same() {
        let s = shape(3, 3, 8, false);
        let (q, k, v) = (tensor((2, 5, 24), 1), tensor((2, 5, 24), 2), tensor((2, 5, 24), 3));
        let out = attention(&q, &k, &v, &[5, 2], &s).unwrap();
        assert!(!out.track_op());
        assert_close("output", &out, &attention_composed(&q, &k, &v, &[5, 2], &s).unwrap());
    }

    #[test]
    fn a_backward_can_run_twice_on_the_same_graph() {
        let s = shape(2, 2, 8, false);
        let q = Var::from_tensor(&tensor((1, 5, 16), 1)).unwrap();
        let (k, v) = (tensor((1, 5, 16), 2), tensor((1, 5, 16), 3));
        let loss = attention(q.as_tensor(), &k, &v, &[4], &s).unwrap().sqr().unwrap().sum_all().unwrap();
        let first = flat(loss.backward().unwrap().get(q.as_tensor()).unwrap());
        let second = flat(loss.backward().unwrap().get(q.as_tensor()).unwrap());
        assert_eq!(first, second);
    }

    #[test]
    fn inference_saves_no_statistics() {
        let s = shape(2, 1, 8, true);
        let (q, k, v) = (tensor((2, 5, 16), 1), tensor((2, 5, 8), 2), tensor((2, 5, 8), 3));
        let op = |save_stats| FusedAttention {
            dims: check(&q, &k, &v, &[5, 3], &s).unwrap(),
            causal: true,
            scale: s.scale,
            lengths: vec![5, 3],
            offsets: None,
            save_stats,
            stats: Mutex::new(None),
        };
        let (inference, training) = (op(false), op(true));
        let a = q.apply_op3_no_bwd(&k, &v, &inference).unwrap();
        let b = q.apply_op3_no_bwd(&k, &v, &training).unwrap();
        assert_eq!(flat(&a), flat(&b));
        assert!(inference.stats.lock().unwrap().is_none());
        // B·H·T log-sum-exps, nothing of size T².
        assert_eq!(training.stats.lock().unwrap().as_ref().map(Vec::len), Some(2 * 2 * 5));
    }

    #[test]
    fn a_broadcast_output_gradient_gives_the_composed_gradients() {
        // `sum_all` hands the op a gradient with all strides 0.
        let s = shape(3, 3, 8, false);
        let q = Var::from_tensor(&tensor((2, 5, 24), 1)).unwrap();
        let (k, v) = (tensor((2, 5, 24), 2), tensor((2, 5, 24), 3));
        let grad = |op: Op| {
            let loss = op(q.as_tensor(), &k, &v, &[5, 2], &s).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(q.as_tensor()).unwrap().clone()
        };
        assert_close("dq", &grad(attention), &grad(attention_composed));
    }

    #[test]
    fn the_baseline_and_the_fma_builds_of_the_tasks_agree() {
        // This CPU runs the AVX2 + FMA build; the baseline one (for CPUs without) is called here.
        let s = shape(4, 2, 8, true);
        let (batch, tokens, lengths) = (2, 17, [17, 9]);
        let d = Dims { batch, tokens, heads: 4, kv_heads: 2, head_dim: 8, group: 2 };
        let x = [(32, 1), (16, 2), (16, 3), (32, 4), (32, 5)].map(|(w, seed)| tensor((batch, tokens, w), seed));
        let stores = x.each_ref().map(|x| x.storage_and_layout());
        let rows: Vec<Rows> =
            stores.iter().map(|(st, l)| Rows::new("x", cpu(st, "x").unwrap(), l, l.dims()[2], None).unwrap()).collect();
        let [q, k, v, o, g] = [rows[0], rows[1], rows[2], rows[3], rows[4]];
        let run = |fma: bool| {
            let (mut out, mut lse) = (vec![0f32; batch * tokens * 32], vec![0f32; batch * 4 * tokens]);
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; out.len()], vec![0f32; out.len() / 2], vec![0f32; out.len() / 2]);
            let shared = SharedRows::new(&mut out, tokens, 32, None);
            let mut scratch = Scratch::default();
            for (n, lse) in lse.chunks_mut(tokens).enumerate() {
                let a = Forward { d, causal: true, scale: s.scale, len: lengths[n / 4], b: n / 4, h: n % 4 };
                match fma {
                    true => forward_task::<true>(&a, q, k, v, &shared, lse, &mut scratch),
                    false => forward_task::<false>(&a, q, k, v, &shared, lse, &mut scratch),
                }
            }
            let grads = Grads {
                dq: SharedRows::new(&mut dq, tokens, 32, None),
                dk: SharedRows::new(&mut dk, tokens, 16, None),
                dv: SharedRows::new(&mut dv, tokens, 16, None),
            };
            for n in 0..batch * 2 {
                let a = Backward { d, causal: true, scale: s.scale, len: lengths[n / 2], b: n / 2, g: n % 2 };
                match fma {
                    true => backward_task::<true>(&a, [q, k, v, o, g], &lse, &grads, &mut scratch),
                    false => backward_task::<false>(&a, [q, k, v, o, g], &lse, &grads, &mut scratch),
                }
            }
            [out, lse, dq, dk, dv]
        };
        let (fast, base) = (run(true), run(false));
        for (name, (f, b)) in ["out", "lse", "dq", "dk", "dv"].iter().zip(fast.iter().zip(&base)) {
            let (f, b) =
                (Tensor::new(f.as_slice(), &Device::Cpu).unwrap(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap());
            assert_close(name, &f, &b);
        }
    }

    fn error(q: (usize, usize, usize), kv: (usize, usize, usize), lengths: &[usize], s: &AttentionShape) -> String {
        let (q, k, v) = (tensor(q, 1), tensor(kv, 2), tensor(kv, 3));
        let fused = attention(&q, &k, &v, lengths, s).unwrap_err().to_string();
        let composed = attention_composed(&q, &k, &v, lengths, s).unwrap_err().to_string();
        assert_eq!(fused, composed);
        fused
    }

    #[test]
    fn shape_and_length_errors_name_what_is_wrong() {
        let s = shape(4, 2, 8, false);
        let e = error((2, 5, 32), (2, 5, 16), &[5], &s);
        assert!(e.contains("1 lengths for a batch of 2"), "{e}");
        let e = error((2, 5, 32), (2, 5, 16), &[5, 0], &s);
        assert!(e.contains("lengths[1] = 0, expected 1..=5"), "{e}");
        let e = error((2, 5, 32), (2, 5, 16), &[6, 5], &s);
        assert!(e.contains("lengths[0] = 6, expected 1..=5"), "{e}");
        let e = error((2, 5, 32), (2, 5, 16), &[5, 5], &shape(4, 3, 8, false));
        assert!(e.contains("num_heads 4 is not a multiple of num_kv_heads 3"), "{e}");
        let e = error((2, 5, 24), (2, 5, 16), &[5, 5], &s);
        assert!(e.contains("q has shape [2, 5, 24]"), "{e}");
        let e = error((2, 5, 32), (2, 4, 16), &[4, 4], &s);
        assert!(e.contains("k has shape [2, 4, 16], expected [2, 5, 16]"), "{e}");
    }

    #[test]
    fn a_transposed_last_dim_is_refused() {
        let s = shape(1, 1, 4, false);
        let q = tensor((1, 4, 4), 1).transpose(1, 2).unwrap();
        let k = tensor((1, 4, 4), 2);
        let e = attention(&q, &k, &k, &[4], &s).unwrap_err().to_string();
        assert!(e.contains("q has strides [16, 1, 4], the last dim must have stride 1"), "{e}");
    }

    /// Milliseconds per call of `f`: the best of 10 after a warm-up call (other builds share the
    /// machine; the minimum is the least disturbed).
    fn millis(mut f: impl FnMut()) -> f64 {
        f();
        (0..10)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Fused against composed for MiniLM's attention (a batch of 32 × 64 tokens, 12 heads of 32;
    /// full rows, and lengths drawn from 8..=64) and a SmolLM2-like causal GQA layer. Prints a
    /// table; asserts nothing about time.
    /// `cargo test --release -p fedpool-kernels attention -- --nocapture --ignored`
    #[test]
    #[ignore = "timing: run in release with --ignored --nocapture"]
    fn attention_timing_fused_vs_composed() {
        let mixed: Vec<usize> = values(32, 7).iter().map(|x| 8 + ((x + 2.0) / 4.0 * 57.0) as usize).collect();
        let cases = [
            ("MiniLM, B 32, T 64, 12×32, full", 32, 64, vec![64; 32], shape(12, 12, 32, false)),
            ("MiniLM, B 32, T 64, 12×32, lengths 8..=64", 32, 64, mixed, shape(12, 12, 32, false)),
            ("SmolLM2-like, B 8, T 64, 9/3×64, causal", 8, 64, vec![64; 8], shape(9, 3, 64, true)),
        ];
        let threads = rayon::current_num_threads();
        println!("\n{threads} threads, AVX2+FMA: {}", simd::fast_isa());
        println!("| case | composed fwd ms | fused fwd ms | × | composed fwd+bwd ms | fused fwd+bwd ms | × |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (name, batch, tokens, lengths, s) in cases {
            let (qw, kw) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
            let q = Var::from_tensor(&tensor((batch, tokens, qw), 1)).unwrap();
            let k = Var::from_tensor(&tensor((batch, tokens, kw), 2)).unwrap();
            let v = Var::from_tensor(&tensor((batch, tokens, kw), 3)).unwrap();
            let upstream = tensor((batch, tokens, qw), 4);
            let fwd = |op: Op| {
                let (q, k, v) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
                millis(|| drop(op(&q, &k, &v, &lengths, &s).unwrap()))
            };
            let step = |op: Op| {
                millis(|| {
                    let out = op(q.as_tensor(), k.as_tensor(), v.as_tensor(), &lengths, &s).unwrap();
                    let grads = (out * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(grads.get(q.as_tensor()).is_some());
                })
            };
            let (cf, ff) = (fwd(attention_composed), fwd(attention));
            let (cs, fs) = (step(attention_composed), step(attention));
            println!("| {name} | {cf:.2} | {ff:.2} | {:.2} | {cs:.2} | {fs:.2} | {:.2} |", cf / ff, cs / fs);
        }
    }
}
