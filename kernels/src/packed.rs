//! Packed tokens ↔ padded rows, for the composed (reference) versions of the packed kernels.
//!
//! Packed: `[N, d]` with batch row `b`'s tokens at rows `offsets[b]..offsets[b + 1]`. Padded:
//! `[B, T, d]` with `T` the longest row and zeros after each row's tokens.

use candle_core::{Result, Tensor};

/// Packed `[N, d]` → padded `[B, T_max, d]` (zeros after each row's tokens).
pub(crate) fn pad(x: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let rows = offsets
        .windows(2)
        .map(|w| x.narrow(0, w[0], w[1] - w[0])?.pad_with_zeros(0, 0, longest - (w[1] - w[0])))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}

/// Padded `[B, T, d]` → packed `[N, d]`: the first `offsets[b + 1] − offsets[b]` rows of each `b`.
pub(crate) fn unpad(y: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let rows =
        offsets.windows(2).enumerate().map(|(b, w)| y.get(b)?.narrow(0, 0, w[1] - w[0])).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}
