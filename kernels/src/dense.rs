//! Dense f32 products on the CPU through faer's matmul, for the backbone's big linear layers.
//!
//! candle's CPU matmul is the `gemm` crate, which uses AVX-512 only when built on nightly Rust;
//! faer (same author) dispatches at run time to its AVX-512 or AVX2 kernels on stable. On MiniLM's
//! linear shapes (2,048 rows) on the dev machine that is 1.4–2.1× the rate
//! (`cargo bench -p fedpool-kernels --bench frozen`, matmul table, two runs). Every operand may be
//! a strided view: no copies for transposes.

use candle_core::{CpuStorage, Device, Layout, Result, Storage, Tensor};

/// Fewer rows than this per thread are not worth a thread of their own.
const MIN_ROWS_PER_THREAD: usize = 64;

/// `a · b` for 2-D f32 CPU tensors `a: [m, k]`, `b: [k, n]` (any strides), as a new contiguous
/// `[m, n]` tensor without autograd (the kernels attach their own backward); with `row`, every
/// output row starts as a copy of it (`[n]`, e.g. a bias) and the product is added onto it.
pub fn matmul(a: &Tensor, b: &Tensor, row: Option<&[f32]>) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 || row.is_some_and(|r| r.len() != n) {
        candle_core::bail!(
            "dense matmul: {:?} · {:?} (row {:?}) do not fit",
            a.dims(),
            b.dims(),
            row.map(<[f32]>::len)
        );
    }
    let mut dst = match row {
        Some(r) => r.repeat(m),
        None => vec![0f32; m * n],
    };
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(a_data)), Storage::Cpu(CpuStorage::F32(b_data))) = (&*a_storage, &*b_storage)
    else {
        candle_core::bail!("dense matmul: both operands must be f32 CPU tensors");
    };
    if m > 0 && n > 0 && k > 0 {
        let a_view = view(a_data, a_layout, m, k)?;
        let b_view = view(b_data, b_layout, k, n)?;
        let accum = if row.is_some() { faer::Accum::Add } else { faer::Accum::Replace };
        // One sequential product per thread over its own block of rows (in a scratch comparison on
        // these shapes it beat faer's own split of the same product; not kept as a benchmark).
        let threads = candle_core::utils::get_num_threads().max(1);
        let block = m.div_ceil(threads).max(MIN_ROWS_PER_THREAD);
        use rayon::prelude::*;
        dst.par_chunks_mut(block * n).enumerate().for_each(|(i, out)| {
            let rows = out.len() / n;
            let out = faer::MatMut::from_row_major_slice_mut(out, rows, n);
            let a_rows = a_view.subrows(i * block, rows);
            faer::linalg::matmul::matmul(out, accum, a_rows, b_view, 1.0f32, faer::Par::Seq);
        });
    }
    drop((a_storage, b_storage));
    Tensor::from_vec(dst, (m, n), &Device::Cpu)
}

/// A faer view of a 2-D layout over `data`, checked to stay inside it.
fn view<'a>(data: &'a [f32], layout: &Layout, rows: usize, cols: usize) -> Result<faer::MatRef<'a, f32>> {
    let (rs, cs) = (layout.stride()[0], layout.stride()[1]);
    let data = &data[layout.start_offset()..];
    let last = (rows - 1) * rs + (cols - 1) * cs;
    if last >= data.len() {
        candle_core::bail!("dense matmul: a layout reaches past its storage ({layout:?})");
    }
    // SAFETY: every element (i, j), i < rows, j < cols, is at i·rs + j·cs ≤ `last` < data.len()
    // (checked above); the view borrows `data` for its lifetime and faer only reads through it.
    Ok(unsafe { faer::MatRef::from_raw_parts(data.as_ptr(), rows, cols, rs as isize, cs as isize) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_with_and_without_a_row_match_candle() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (37, 19), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (23, 19), &dev).unwrap();
        let b = bt.t().unwrap(); // strided [19, 23]
        let row: Vec<f32> = (0..23).map(|i| i as f32 * 0.5).collect();
        let want = a.matmul(&b).unwrap();
        let close = |got: &Tensor, want: &Tensor| {
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-5, "max difference {d}");
        };
        close(&matmul(&a, &b, None).unwrap(), &want);
        let r = Tensor::from_slice(&row, 23, &dev).unwrap();
        close(&matmul(&a, &b, Some(&row)).unwrap(), &want.broadcast_add(&r).unwrap());
        // A transposed left operand, and a narrowed one (start offset).
        let at = Tensor::randn(0f32, 1.0, (19, 37), &dev).unwrap().t().unwrap();
        close(&matmul(&at, &b, None).unwrap(), &at.matmul(&b).unwrap());
        let wide = Tensor::randn(0f32, 1.0, (37, 30), &dev).unwrap().narrow(1, 5, 19).unwrap();
        close(&matmul(&wide, &b, None).unwrap(), &wide.matmul(&b).unwrap());
        // Enough rows for one block per thread.
        let tall = Tensor::randn(0f32, 1.0, (301, 19), &dev).unwrap();
        close(&matmul(&tall, &b, Some(&row)).unwrap(), &tall.matmul(&b).unwrap().broadcast_add(&r).unwrap());
        assert!(matmul(&a, &a, None).unwrap_err().to_string().contains("do not fit"));
    }
}
