//! `x · W` for a frozen `W` (the backbone's linear layers under adapters), with a backward that
//! computes only the gradient of `x`.
//!
//! candle's matmul backward computes the gradient of both operands, whether or not the right one
//! is trainable: for a frozen backbone that is a third of a training step's matmul work (and a
//! gradient the size of every weight) thrown away. [`frozen_matmul`] computes the product with
//! `x` detached and attaches it to `x` through a [`CustomOp1`] whose backward is `∂y · Wᵀ` only,
//! the same expression candle uses for the left operand, so gradients are bitwise the same.
//!
//! Device-neutral: the product is candle's own matmul on whatever device `x` lives; the op's
//! forward only hands that result over (CPU, and CUDA with the `cuda` feature).
//!
//! [`frozen_linear`] is the whole linear layer `x·Wᵀ + b`: on the CPU one faer product
//! ([`crate::dense`]) writes onto rows pre-filled with the bias (no zeroing pass, no separate
//! broadcast add and its output tensor), and its backward `∂y·W` is one more; elsewhere candle's
//! matmul and add.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Error, Layout, Result, Shape, Storage, Tensor};

use crate::dense;

/// `x.matmul(w)` where `w` is frozen: the same value, and in a backward pass only `x` gets a
/// gradient. When `x` carries no gradient (inference) this is a plain matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(w);
    }
    let y = x.detach().matmul(w)?.contiguous()?;
    x.apply_op1(FrozenMatmul { product: Handover::new("frozen-matmul", y), w: w.clone(), dense_backward: false })
}

/// The linear layer `x·Wᵀ + b` for `x: [N, d_in]`, a frozen `weight: [d_out, d_in]` and an
/// optional frozen `bias: [d_out]`: the value of `x.matmul(&weight.t())` plus the bias, and in a
/// backward pass only `x` gets a gradient (`∂y·W`).
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_, d_in) = x.dims2()?;
    let (d_out, w_in) = weight.dims2()?;
    if w_in != d_in || bias.is_some_and(|b| b.dims() != [d_out]) {
        candle_core::bail!(
            "frozen-linear: x {:?}, weight {:?}, bias {:?} do not fit (expected [N, d_in], [d_out, d_in], [d_out])",
            x.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let product = match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) if weight.dtype() == DType::F32 => cpu_linear(&x.detach(), weight, bias)?,
        _ => {
            let y = x.detach().matmul(&weight.t()?)?;
            match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        }
    };
    if !x.track_op() {
        return Ok(product);
    }
    let op = FrozenMatmul { product: Handover::new("frozen-matmul", product), w: weight.t()?, dense_backward: true };
    x.apply_op1(op)
}

/// `x·Wᵀ + b` on the CPU: one product onto rows pre-filled with the bias ([`dense::matmul`]).
fn cpu_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias.map(Tensor::to_vec1::<f32>).transpose()?;
    dense::matmul(x, &weight.t()?, bias.as_deref())
}

/// The op: holds the product until its forward hands it over, and `w` for the backward (on the
/// CPU through [`dense`] for `frozen_linear`; candle's matmul for `frozen_matmul`, bitwise its
/// gradient).
struct FrozenMatmul {
    product: Handover,
    w: Tensor,
    dense_backward: bool,
}

/// A product computed before its op is attached (with `x` detached), handed to the op's forward
/// once, so it is not kept alive twice by the graph: the frozen and quantized linear ops.
pub(crate) struct Handover {
    op: &'static str,
    product: Mutex<Option<Tensor>>,
}

impl Handover {
    /// `product` for the op named `op` (in error messages).
    pub(crate) fn new(op: &'static str, product: Tensor) -> Self {
        Self { op, product: Mutex::new(Some(product)) }
    }

    fn take(&self) -> Result<Tensor> {
        self.product
            .lock()
            .map_err(|_| Error::Msg(format!("{}: lock poisoned", self.op)))?
            .take()
            .ok_or_else(|| Error::Msg(format!("{}: forward run twice", self.op)))
    }

    /// The product's CPU storage (contiguous), for `cpu_fwd`.
    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) if layout.start_offset() == 0 => Ok((s.clone(), y.shape().clone())),
            _ => Err(Error::Msg(format!("{}: the product is not a contiguous CPU tensor", self.op))),
        }
    }

    /// The product's CUDA storage, for `cuda_fwd`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => Err(Error::Msg(format!("{}: the product is not a CUDA tensor", self.op))),
        }
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.product.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _x: &candle_core::CudaStorage, _layout: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.product.cuda()
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let wt = self.w.t()?;
        let cpu_2d = |t: &Tensor| t.rank() == 2 && t.device().is_cpu() && t.dtype() == DType::F32;
        if self.dense_backward && cpu_2d(grad) && cpu_2d(&wt) {
            return Ok(Some(dense::matmul(grad, &wt, None)?));
        }
        Ok(Some(grad.matmul(&wt)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn inputs() -> (Var, Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap(); // [out, in], used as wᵀ
        let upstream = Tensor::randn(0f32, 1.0, (6, 3), &dev).unwrap();
        (x, w, upstream)
    }

    #[test]
    fn value_and_input_gradient_are_bitwise_candles() {
        let (x, w, upstream) = inputs();
        let wt = w.t().unwrap();
        let plain = x.as_tensor().matmul(&wt).unwrap();
        let frozen = frozen_matmul(x.as_tensor(), &wt).unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), frozen.to_vec2::<f32>().unwrap());

        // A nonlinear loss downstream, so the gradient depends on the product too.
        let loss = |y: &Tensor| (y.tanh().unwrap() * &upstream).unwrap().sum_all().unwrap();
        let g_plain = loss(&plain).backward().unwrap();
        let g_frozen = loss(&frozen).backward().unwrap();
        let gx = |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gx(&g_plain), gx(&g_frozen));
        // candle's matmul also computed the frozen weight's gradient; the frozen op did not.
        assert!(g_plain.get(&wt).is_some());
        assert!(g_frozen.get(&wt).is_none());
    }

    #[test]
    fn linear_value_and_input_gradient_match_candles_matmul_and_add() {
        let (x, w, upstream) = inputs();
        let dev = Device::Cpu;
        let b = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        let fused = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let m = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-6 * m.max(1.0), "max difference {d}");
        };
        close(&plain, &fused);
        let loss = |y: &Tensor| (y.tanh().unwrap() * &upstream).unwrap().sum_all().unwrap();
        let (g_plain, g_fused) = (loss(&plain).backward().unwrap(), loss(&fused).backward().unwrap());
        close(g_plain.get(x.as_tensor()).unwrap(), g_fused.get(x.as_tensor()).unwrap());
        // No bias, a strided x (a transposed view), and no gradient: the same product.
        let xt = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap().t().unwrap();
        close(&xt.matmul(&w.t().unwrap()).unwrap(), &frozen_linear(&xt, &w, None).unwrap());
        assert!(!frozen_linear(&xt, &w, None).unwrap().track_op());
        let err = frozen_linear(&xt, &w.t().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
    }

    #[test]
    fn without_a_gradient_it_is_a_plain_matmul() {
        let (x, w, _) = inputs();
        let x = x.as_tensor().detach();
        let y = frozen_matmul(&x, &w.t().unwrap()).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.to_vec2::<f32>().unwrap(), x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap());
    }
}
