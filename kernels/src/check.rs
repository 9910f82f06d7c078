//! Every kernel run on a device and compared with the CPU path: the same inputs (random, odd
//! sizes, copied from the host), the values and every input gradient of `Σ y ⊙ u` for a fixed `u`
//! (`cos` of the last index), as relative errors (`max |device − cpu| / max |cpu|`). On a GPU this checks the device path (the
//! composed candle ops in the `cuda` build) against the fused CPU kernels; on the CPU it checks the
//! kernels against themselves (`fedpool-sim device-check --device cpu`, and the tests).

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::attention::{attention, attention_packed, AttentionShape};
use crate::quantized::quantized_linear;
use crate::{activation, frozen_linear, frozen_matmul, norm, ssf};
use candle_core::quantized::{GgmlDType, QTensor};

/// Largest relative error a kernel may show on another device (f32, different reduction orders).
pub const TOLERANCE: f64 = 1e-4;

/// One kernel's check on one device.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    /// The kernel (its function name).
    pub kernel: &'static str,
    /// The input shapes, as printed.
    pub shapes: String,
    /// Relative error of the output.
    pub value_error: f64,
    /// Largest relative error of the trainable inputs' gradients (infinite where one got none).
    pub gradient_error: f64,
}

impl KernelCheck {
    /// True when both errors are within [`TOLERANCE`].
    pub fn passed(&self) -> bool {
        self.value_error <= TOLERANCE && self.gradient_error <= TOLERANCE
    }
}

/// An input of a checked kernel: its shape, and whether it gets a gradient.
struct Input {
    dims: Vec<usize>,
    trainable: bool,
}

fn train(dims: &[usize]) -> Input {
    Input { dims: dims.to_vec(), trainable: true }
}

fn frozen(dims: &[usize]) -> Input {
    Input { dims: dims.to_vec(), trainable: false }
}

type Kernel = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// Checks every kernel of the crate on `device` against the CPU.
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let bert = AttentionShape { num_heads: 3, num_kv_heads: 3, head_dim: 8, causal: false, scale: 0.35 };
    let llama = AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 8, causal: true, scale: 0.35 };
    let lengths = vec![7, 3, 5];
    let offsets = vec![0, 7, 10, 15];
    let (l1, l2, o1, o2) = (lengths.clone(), lengths.clone(), offsets.clone(), offsets.clone());
    let cases: Vec<(&'static str, Vec<Input>, Kernel)> = vec![
        ("frozen_linear", vec![train(&[37, 48]), frozen(&[40, 48]), frozen(&[40])], {
            Box::new(|t| frozen_linear(&t[0], &t[1], Some(&t[2])))
        }),
        ("frozen_matmul", vec![train(&[37, 48]), frozen(&[48, 40])], Box::new(|t| frozen_matmul(&t[0], &t[1]))),
        ("quantized_linear (Q4_1)", vec![train(&[37, 64]), frozen(&[40, 64])], {
            Box::new(|t| {
                // The weight quantized on the host (the same blocks everywhere), then moved.
                let host = t[1].to_device(&Device::Cpu)?;
                let w = QTensor::quantize_onto(&host, GgmlDType::Q4_1, t[1].device())?;
                quantized_linear(&t[0], &std::sync::Arc::new(w))
            })
        }),
        ("layer_norm", vec![train(&[3, 7, 40]), frozen(&[40]), frozen(&[40])], {
            Box::new(|t| norm::layer_norm(&t[0], &t[1], &t[2], 1e-12))
        }),
        (
            "layer_norm_scale_shift",
            vec![train(&[3, 7, 40]), frozen(&[40]), frozen(&[40]), train(&[3, 40]), train(&[3, 40])],
            Box::new(|t| norm::layer_norm_scale_shift(&t[0], &t[1], &t[2], 1e-12, &t[3], &t[4])),
        ),
        ("rms_norm", vec![train(&[3, 7, 40]), frozen(&[40])], Box::new(|t| norm::rms_norm(&t[0], &t[1], 1e-6))),
        ("gelu_erf", vec![train(&[5, 77])], Box::new(|t| activation::gelu_erf(&t[0]))),
        ("bias_gelu_erf", vec![train(&[5, 77]), frozen(&[77])], {
            Box::new(|t| activation::bias_gelu_erf(&t[0], &t[1]))
        }),
        ("gelu_tanh", vec![train(&[5, 77])], Box::new(|t| activation::gelu_tanh(&t[0]))),
        ("silu_mul", vec![train(&[5, 77]), train(&[5, 77])], Box::new(|t| activation::silu_mul(&t[0], &t[1]))),
        ("scale_shift", vec![train(&[3, 7, 40]), train(&[3, 40]), train(&[3, 40])], {
            Box::new(|t| ssf::scale_shift(&t[0], &t[1], &t[2]))
        }),
        ("scale_shift_packed", vec![train(&[15, 40]), train(&[3, 40]), train(&[3, 40])], {
            Box::new(move |t| ssf::scale_shift_packed(&t[0], &t[1], &t[2], &o1))
        }),
        ("attention (BERT)", vec![train(&[3, 7, 24]), train(&[3, 7, 24]), train(&[3, 7, 24])], {
            Box::new(move |t| attention(&t[0], &t[1], &t[2], &l1, &bert))
        }),
        ("attention (GQA, causal)", vec![train(&[3, 7, 32]), train(&[3, 7, 16]), train(&[3, 7, 16])], {
            Box::new(move |t| attention(&t[0], &t[1], &t[2], &l2, &llama))
        }),
        ("attention_packed", vec![train(&[15, 24]), train(&[15, 24]), train(&[15, 24])], {
            Box::new(move |t| attention_packed(&t[0], &t[1], &t[2], &o2, &bert))
        }),
    ];
    cases.into_iter().map(|(name, inputs, kernel)| check_one(name, &inputs, kernel.as_ref(), device)).collect()
}

/// Runs `kernel` on the CPU and on `device` over the same inputs and compares.
fn check_one(
    kernel_name: &'static str,
    inputs: &[Input],
    kernel: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    device: &Device,
) -> Result<KernelCheck> {
    let host: Vec<Tensor> =
        inputs.iter().map(|i| Tensor::randn(0f32, 1f32, i.dims.as_slice(), &Device::Cpu)).collect::<Result<_>>()?;
    let run = |on: &Device| -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let mut vars = Vec::new();
        let mut tensors = Vec::new();
        for (t, input) in host.iter().zip(inputs) {
            let t = t.to_device(on)?;
            if input.trainable {
                let v = Var::from_tensor(&t)?;
                tensors.push(v.as_tensor().clone());
                vars.push(v);
            } else {
                tensors.push(t);
            }
        }
        let y = kernel(&tensors)?;
        let upstream = Tensor::ones(y.dims(), DType::F32, &Device::Cpu)?
            .broadcast_mul(&Tensor::arange(0f32, y.dim(y.rank() - 1)? as f32, &Device::Cpu)?.cos()?)?
            .to_device(on)?;
        let grads = (&y * upstream)?.sum_all()?.backward()?;
        // A trainable input without a gradient is a failure (None), not a zero.
        let gradients = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).map(|g| g.to_device(&Device::Cpu)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok((y.to_device(&Device::Cpu)?, gradients))
    };
    let (want, want_grads) = run(&Device::Cpu)?;
    let (got, got_grads) = run(device)?;
    let mut gradient_error = 0.0f64;
    for (g, w) in got_grads.iter().zip(&want_grads) {
        gradient_error = gradient_error.max(match (g, w) {
            (Some(g), Some(w)) => relative(g, w)?,
            _ => f64::INFINITY,
        });
    }
    let shapes = inputs.iter().map(|i| format!("{:?}", i.dims)).collect::<Vec<_>>().join(" ");
    Ok(KernelCheck { kernel: kernel_name, shapes, value_error: relative(&got, &want)?, gradient_error })
}

/// `max |a − b| / max |b|` (f64).
fn relative(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
    if a.len() != b.len() {
        candle_core::bail!("device check: {} values against {}", a.len(), b.len());
    }
    let diff = a.iter().zip(&b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max);
    let scale = b.iter().map(|y| f64::from(y.abs())).fold(0.0, f64::max).max(1e-30);
    Ok(if diff.is_nan() { f64::INFINITY } else { diff / scale })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_passes_on_the_cpu_and_gets_gradients() {
        let checks = check_device(&Device::Cpu).unwrap();
        assert_eq!(checks.len(), 15);
        for c in &checks {
            assert!(c.passed(), "{c:?}");
        }
    }

    #[test]
    fn the_composed_path_against_the_fused_kernels_is_within_tolerance() {
        // What a GPU runs is the composed ops: compare them with the fused CPU kernels here.
        let host = Tensor::randn(0f32, 1f32, (3, 7, 40), &Device::Cpu).unwrap();
        let (w, b) =
            (Tensor::ones(40, DType::F32, &Device::Cpu).unwrap(), Tensor::zeros(40, DType::F32, &Device::Cpu).unwrap());
        let fused = norm::layer_norm(&host, &w, &b, 1e-12).unwrap();
        let composed = norm::layer_norm_composed(&host, &w, &b, 1e-12).unwrap();
        assert!(relative(&composed, &fused).unwrap() <= TOLERANCE);
        // And a wrong result is seen as one.
        let off = (&composed * 1.01).unwrap();
        assert!(relative(&off, &fused).unwrap() > TOLERANCE);
    }
}
