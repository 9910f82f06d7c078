//! `x · Wᵀ` for a frozen, block-quantized `W` (GGUF's Q4_0, Q4_1, Q8_0, …): a decoder's 4-bit
//! base under adapters, with a backward that computes only the gradient of `x`.
//!
//! On the CPU both directions dequantize the weight on the fly, a band of rows at a time
//! ([`BAND`] values, 16 MiB of f32 at most), and multiply in f32 with faer ([`crate::dense`]):
//! the forward `x · W_bandᵀ` band by band, the backward `∂x = Σ ∂y_band · W_band`. No f32 copy of
//! a weight, let alone of the model, stays in memory, and the product is the f32 product of the
//! stored weights (what transformers computes after loading with `gguf_file=`). candle's CPU
//! quantized product is not used: it rounds the activations to 8 bits, and for Q4_1 it is scalar
//! code (`vec_dot_unopt`, 88% of a SmolLM2 training step in a `perf` profile). On other devices (CUDA)
//! each product dequantizes the whole weight to f32 on the device and frees it after, as QLoRA's
//! kernels do; `check` compares that path with the CPU's.
//! The weight never gets a gradient.
//!
//! [`quantized_linear_reference`] is the same function on the dequantized weight, in f32 through
//! candle's matmul (the reference the tests compare with).
//!
//! [`permute_rows`] reorders a quantized matrix's rows without dequantizing it (llama.cpp stores
//! the query and key projections with their rotary halves interleaved; HF does not).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Error, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use crate::dense;
use crate::frozen::Handover;

/// Largest number of weight values dequantized at once on the CPU (4 Mi f32 = 16 MiB).
pub const BAND: usize = 4 << 20;

/// `x · Wᵀ` for `x: [N, d_in]` (f32) and a frozen quantized `w: [d_out, d_in]`; in a backward
/// pass only `x` gets a gradient (`∂y · W`). On the CPU `W` is dequantized a band of rows at a
/// time for both. When `x` carries no gradient (inference) this is the plain product.
pub fn quantized_linear(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let (_, d_in) = x.dims2()?;
    let (_, w_in) = w.shape().dims2()?;
    if w_in != d_in {
        candle_core::bail!(
            "quantized-linear: x {:?} and weight {:?} do not fit (expected [N, d_in], [d_out, d_in])",
            x.dims(),
            w.shape()
        );
    }
    let product = if x.device().is_cpu() && x.dtype() == DType::F32 {
        banded_product(&x.detach(), w)?
    } else {
        // Other devices: the whole weight dequantized for the one product, freed right after
        // (as QLoRA's kernels do), so every device computes the same f32 product.
        x.detach().matmul(&w.dequantize(x.device())?.t()?)?
    };
    if !x.track_op() {
        return Ok(product);
    }
    x.apply_op1(QuantizedLinear { product: Handover::new("quantized-linear", product), w: w.clone() })
}

/// `x · Wᵀ` on the CPU, `W` dequantized a band of rows at a time.
fn banded_product(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    let (d_out, d_in) = w.shape().dims2()?;
    let band = (BAND / d_in.max(1)).clamp(1, d_out.max(1));
    let mut parts = Vec::with_capacity(d_out.div_ceil(band));
    for start in (0..d_out).step_by(band) {
        let count = band.min(d_out - start);
        let rows = dequantize_rows(w, start, count)?;
        parts.push(dense::matmul(x, &rows.t()?, None)?);
    }
    if parts.len() == 1 {
        return parts.pop().ok_or_else(|| Error::Msg("quantized-linear: no rows".into()));
    }
    Tensor::cat(&parts, 1)
}

/// [`quantized_linear`]'s reference: `x · Wᵀ` with `W` dequantized to f32 (candle's matmul and
/// its backward, which also computes the weight's gradient).
pub fn quantized_linear_reference(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    x.matmul(&w.dequantize(x.device())?.t()?)
}

/// The rows of `w: [rows, d]` in the order `order` (row `i` of the result is row `order[i]` of
/// `w`), moving the packed blocks as they are: bitwise the same values, no requantization.
pub fn permute_rows(w: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (rows, d) = w.shape().dims2()?;
    let mut seen = vec![false; rows];
    if order.len() != rows || order.iter().any(|&r| r >= rows || std::mem::replace(&mut seen[r], true)) {
        candle_core::bail!("permute-rows: the order is not a permutation of the {rows} rows");
    }
    let row_bytes = row_bytes(w, d)?;
    let data = w.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &w.device(), w.dtype())?;
    QTensor::new(storage, (rows, d))
}

/// Bytes of one row of `d` values of `w`'s type (whole blocks only).
fn row_bytes(w: &QTensor, d: usize) -> Result<usize> {
    let block = w.dtype().block_size();
    if !d.is_multiple_of(block) {
        candle_core::bail!("a row of {d} values is not a whole number of {block}-value blocks");
    }
    Ok(d / block * w.dtype().type_size())
}

/// `w`'s rows `start..start + count`, dequantized to f32 on the CPU: Q4_0, Q4_1 and Q8_0 by
/// [`block_decoder`], rows in parallel; other types through candle's `dequantize`.
fn dequantize_rows(w: &QTensor, start: usize, count: usize) -> Result<Tensor> {
    let (_, d) = w.shape().dims2()?;
    let row_bytes = row_bytes(w, d)?;
    let data = w.data()?;
    let band = &data[start * row_bytes..(start + count) * row_bytes];
    let Some((block_bytes, decode)) = block_decoder(w.dtype()) else {
        let storage = QStorage::from_data(Cow::Borrowed(band), &Device::Cpu, w.dtype())?;
        return QTensor::new(storage, (count, d))?.dequantize(&Device::Cpu);
    };
    let mut out = vec![0f32; count * d];
    out.par_chunks_mut(d).zip(band.par_chunks(row_bytes)).for_each(|(values, row)| {
        for (y, block) in values.chunks_exact_mut(32).zip(row.chunks_exact(block_bytes)) {
            decode(block, y);
        }
    });
    Tensor::from_vec(out, (count, d), &Device::Cpu)
}

/// The f32 of a little-endian f16 at `bytes[0..2]` (software conversion: inlined, unlike a call
/// per block through the run-time F16C dispatch).
fn f16_at(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32_const()
}

/// Writes the 32 values of one quantized block (its bytes) into a slice.
type BlockDecoder = fn(&[u8], &mut [f32]);

/// The decoder of one 32-value block of `dtype` (ggml's layouts) and the block's size in bytes,
/// for the types decoded here. Each computes exactly what ggml's (and candle's) `to_float` does.
fn block_decoder(dtype: GgmlDType) -> Option<(usize, BlockDecoder)> {
    fn q4_0(b: &[u8], y: &mut [f32]) {
        // d: f16, then 16 bytes of two 4-bit values each: low nibbles first, value = (q − 8)·d.
        let d = f16_at(b);
        for (j, &q) in b[2..18].iter().enumerate() {
            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
    fn q4_1(b: &[u8], y: &mut [f32]) {
        // d, m: f16, then 16 bytes: value = q·d + m.
        let (d, m) = (f16_at(b), f16_at(&b[2..]));
        for (j, &q) in b[4..20].iter().enumerate() {
            y[j] = (q & 0x0F) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
    fn q8_0(b: &[u8], y: &mut [f32]) {
        // d: f16, then 32 signed bytes: value = q·d.
        let d = f16_at(b);
        for (y, &q) in y.iter_mut().zip(&b[2..34]) {
            *y = (q as i8) as f32 * d;
        }
    }
    match dtype {
        GgmlDType::Q4_0 => Some((18, q4_0)),
        GgmlDType::Q4_1 => Some((20, q4_1)),
        GgmlDType::Q8_0 => Some((34, q8_0)),
        _ => None,
    }
}

/// The op: holds the product until its forward hands it over, and the weight for the backward.
struct QuantizedLinear {
    product: Handover,
    w: Arc<QTensor>,
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.product.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _x: &candle_core::CudaStorage, _layout: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.product.cuda()
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (d_out, d_in) = self.w.shape().dims2()?;
        if !grad.device().is_cpu() || grad.dtype() != DType::F32 {
            // Other devices: the whole weight for the one product, freed right after.
            let w = self.w.dequantize(grad.device())?;
            return Ok(Some(grad.matmul(&w)?));
        }
        let grad = grad.contiguous()?;
        let band = (BAND / d_in.max(1)).clamp(1, d_out.max(1));
        let mut total: Option<Tensor> = None;
        for start in (0..d_out).step_by(band) {
            let count = band.min(d_out - start);
            let w = dequantize_rows(&self.w, start, count)?;
            let part = dense::matmul(&grad.narrow(1, start, count)?, &w, None)?;
            total = Some(match total {
                Some(t) => (t + part)?,
                None => part,
            });
        }
        total.map(Some).ok_or_else(|| Error::Msg("quantized-linear: a weight with no rows".into()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    fn relative(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn weight(dtype: GgmlDType, d_out: usize, d_in: usize) -> Arc<QTensor> {
        let w = Tensor::randn(0f32, 1.0, (d_out, d_in), &Device::Cpu).unwrap();
        Arc::new(QTensor::quantize(&w, dtype).unwrap())
    }

    #[test]
    fn value_and_input_gradient_match_the_dequantized_weight() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = weight(dtype, 48, 64);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap()).unwrap();
            let up = Tensor::randn(0f32, 1.0, (5, 48), &Device::Cpu).unwrap();
            let (ours, reference) =
                (quantized_linear(x.as_tensor(), &w).unwrap(), quantized_linear_reference(x.as_tensor(), &w).unwrap());
            // The same f32 product of the stored weights, up to summation order.
            assert!(relative(&ours, &reference) < 1e-5, "{dtype:?}: value {}", relative(&ours, &reference));
            // The same upstream gradient for both, so the backward is compared exactly.
            let g_ours = (&ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g_ours.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
            assert!(relative(a, b) < 1e-5, "{dtype:?}: gradient {}", relative(a, b));
        }
    }

    #[test]
    fn products_in_bands_are_products_in_one_piece() {
        // More rows than one band holds: 4 Mi / 64 = 65,536 rows per band; 3 bands here.
        let (d_out, d_in) = (2 * (BAND / 64) + 5, 64);
        let w = weight(GgmlDType::Q8_0, d_out, d_in);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, d_in), &Device::Cpu).unwrap()).unwrap();
        let y = quantized_linear(x.as_tensor(), &w).unwrap();
        let reference = quantized_linear_reference(x.as_tensor(), &w).unwrap();
        assert!(relative(&y, &reference) < 1e-5);
        let g = y.sum_all().unwrap().backward().unwrap();
        let whole = w.dequantize(&Device::Cpu).unwrap().sum_keepdim(0).unwrap().broadcast_as((2, d_in)).unwrap();
        let e = relative(g.get(x.as_tensor()).unwrap(), &whole);
        // A sum of 131,077 rows: f32 summation order alone is ~1e-5 of the result.
        assert!(e < 1e-4, "{e}");
    }

    #[test]
    fn inference_is_the_plain_product_and_shapes_are_checked() {
        let w = weight(GgmlDType::Q4_1, 8, 64);
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let y = quantized_linear(&x, &w).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.dims(), &[3, 8]);
        let err = quantized_linear(&Tensor::zeros((3, 63), DType::F32, &Device::Cpu).unwrap(), &w).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // An odd number of Q4_1 blocks per row (candle's kernels refuse it) is fine here.
        let odd = weight(GgmlDType::Q4_1, 8, 96);
        let x = Tensor::randn(0f32, 1.0, (3, 96), &Device::Cpu).unwrap();
        let (a, b) = (quantized_linear(&x, &odd).unwrap(), quantized_linear_reference(&x, &odd).unwrap());
        assert!(relative(&a, &b) < 1e-5);
    }

    #[test]
    fn our_block_decoders_are_candles_dequantize_bitwise() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let w = weight(dtype, 7, 96);
            let ours = dequantize_rows(&w, 2, 4).unwrap().to_vec2::<f32>().unwrap();
            let candle = w.dequantize(&Device::Cpu).unwrap().narrow(0, 2, 4).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(ours, candle, "{dtype:?}");
        }
    }

    #[test]
    fn permuted_rows_are_the_same_blocks() {
        let w = weight(GgmlDType::Q4_1, 6, 64);
        let order = [5, 0, 4, 1, 3, 2];
        let permuted = permute_rows(&w, &order).unwrap().dequantize(&Device::Cpu).unwrap();
        let original = w.dequantize(&Device::Cpu).unwrap();
        for (i, &r) in order.iter().enumerate() {
            assert_eq!(
                permuted.get(i).unwrap().to_vec1::<f32>().unwrap(),
                original.get(r).unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert!(permute_rows(&w, &[0, 0, 1, 2, 3, 4]).is_err());
    }
}
