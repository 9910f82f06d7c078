//! A plain host tensor: a shape and its `f32` values in row-major order.
//!
//! This is the form tensors take on the wire, in checkpoints and in aggregation: the server
//! folds updates into running sums of these without any ML framework.

use serde::{Deserialize, Serialize};

/// Why a tensor operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// The number of values does not match the product of the shape.
    #[error("shape {shape:?} holds {expected} values, got {got}")]
    LengthMismatch {
        /// The shape that was asked for.
        shape: Vec<usize>,
        /// The product of the shape.
        expected: usize,
        /// The number of values given.
        got: usize,
    },
    /// Two tensors that must have one shape do not.
    #[error("shape mismatch: {left:?} vs {right:?}")]
    ShapeMismatch {
        /// The shape of the tensor operated on.
        left: Vec<usize>,
        /// The shape of the other operand.
        right: Vec<usize>,
    },
    /// The candle tensor could not be converted.
    #[error("candle tensor conversion: {0}")]
    Candle(String),
}

/// A dense `f32` tensor in host memory, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`; refused when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, TensorError> {
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(TensorError::LengthMismatch { shape, expected, got: data.len() });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of `shape` filled with zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    /// A tensor of `shape` filled with `value`.
    pub fn full(shape: &[usize], value: f32) -> Self {
        Self { shape: shape.to_vec(), data: vec![value; shape.iter().product()] }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, for in-place updates.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Takes the values out.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The number of values.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The values of row `i` along the first axis (a pool slot, for pooled tensors).
    pub fn row(&self, i: usize) -> &[f32] {
        let width = self.row_len();
        &self.data[i * width..(i + 1) * width]
    }

    /// The values of row `i` along the first axis, for in-place updates.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        let width = self.row_len();
        &mut self.data[i * width..(i + 1) * width]
    }

    /// The number of values in one row along the first axis (1 for a scalar).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    fn check_same_shape(&self, other: &HostTensor) -> Result<(), TensorError> {
        if self.shape != other.shape {
            return Err(TensorError::ShapeMismatch { left: self.shape.clone(), right: other.shape.clone() });
        }
        Ok(())
    }

    /// `self += alpha * x` (BLAS axpy): the step of a streaming weighted sum.
    pub fn axpy(&mut self, alpha: f32, x: &HostTensor) -> Result<(), TensorError> {
        self.check_same_shape(x)?;
        for (y, &xv) in self.data.iter_mut().zip(&x.data) {
            *y += alpha * xv;
        }
        Ok(())
    }

    /// `self *= alpha`.
    pub fn scale(&mut self, alpha: f32) {
        self.data.iter_mut().for_each(|v| *v *= alpha);
    }

    /// The inner product, accumulated in `f64`.
    pub fn dot(&self, other: &HostTensor) -> Result<f64, TensorError> {
        self.check_same_shape(other)?;
        Ok(self.data.iter().zip(&other.data).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum())
    }

    /// The Euclidean norm, accumulated in `f64`.
    pub fn l2_norm(&self) -> f64 {
        self.data.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
    }

    /// True when no value is NaN or infinite.
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// Copies to a candle tensor on `device`.
    #[cfg(feature = "candle")]
    pub fn to_candle(&self, device: &candle_core::Device) -> Result<candle_core::Tensor, TensorError> {
        candle_core::Tensor::from_slice(&self.data, self.shape.as_slice(), device)
            .map_err(|e| TensorError::Candle(e.to_string()))
    }

    /// Copies a candle tensor (any float dtype, any device) to the host as `f32`.
    #[cfg(feature = "candle")]
    pub fn from_candle(t: &candle_core::Tensor) -> Result<Self, TensorError> {
        let shape = t.dims().to_vec();
        let data = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| TensorError::Candle(e.to_string()))?;
        Self::new(shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_refuses_wrong_length() {
        let err = HostTensor::new(vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(err, TensorError::LengthMismatch { shape: vec![2, 3], expected: 6, got: 5 });
    }

    #[test]
    fn axpy_scale_dot_norm() {
        let mut y = HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let x = HostTensor::full(&[2, 2], 1.0);
        y.axpy(2.0, &x).unwrap();
        assert_eq!(y.data(), &[3.0, 4.0, 5.0, 6.0]);
        y.scale(0.5);
        assert_eq!(y.data(), &[1.5, 2.0, 2.5, 3.0]);
        assert_eq!(y.dot(&x).unwrap(), 9.0);
        let n = HostTensor::new(vec![2], vec![3.0, 4.0]).unwrap();
        assert_eq!(n.l2_norm(), 5.0);
        assert_eq!(y.row(1), &[2.5, 3.0]);
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let mut y = HostTensor::zeros(&[2, 2]);
        let x = HostTensor::zeros(&[4]);
        assert!(matches!(y.axpy(1.0, &x), Err(TensorError::ShapeMismatch { .. })));
        assert!(y.dot(&x).is_err());
    }

    #[test]
    fn all_finite_catches_nan_and_inf() {
        let mut t = HostTensor::zeros(&[3]);
        assert!(t.all_finite());
        t.data_mut()[1] = f32::NAN;
        assert!(!t.all_finite());
        t.data_mut()[1] = f32::INFINITY;
        assert!(!t.all_finite());
    }

    #[cfg(feature = "candle")]
    #[test]
    fn candle_round_trip() {
        let t = HostTensor::new(vec![2, 3], (0..6).map(|i| i as f32 * 0.5).collect()).unwrap();
        let c = t.to_candle(&candle_core::Device::Cpu).unwrap();
        assert_eq!(c.dims(), &[2, 3]);
        assert_eq!(HostTensor::from_candle(&c).unwrap(), t);
    }
}
