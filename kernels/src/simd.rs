//! Branch-free scalar math that LLVM vectorises, and a switch that compiles a loop for AVX2 + FMA
//! when the CPU has them.
//!
//! The kernels write their inner loops over slices with these functions and run them inside
//! [`with_fast_isa`]: the same source is then built twice, once for the baseline x86-64 (SSE2) and
//! once with AVX2 + FMA, and the CPU picks at run time (checked once). No `unsafe` arithmetic, no
//! intrinsics: the tests compare the results against libm.

use std::sync::OnceLock;

/// True when this CPU has AVX2 and FMA (checked once).
pub fn fast_isa() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Runs `f`, compiled with AVX2 + FMA enabled when the CPU has them. `f` must be a small closure
/// around one flat loop of `#[inline(always)]` helpers (as this module's): LLVM inlines those into
/// the AVX2 build, but leaves a larger closure (nested loops) out of line, built for the baseline
/// (seen in the disassembly) — name such a loop with `fast_isa_fn!` instead.
#[inline(always)]
pub fn with_fast_isa<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if fast_isa() {
            // SAFETY: the CPU has AVX2 and FMA (checked by `fast_isa`).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Defines `$name`, which runs the `#[inline(always)]` function `$body` built for AVX2 + FMA
/// when the CPU has them ([`fast_isa`](crate::simd::fast_isa)), else for the baseline.
///
/// Use it rather than [`with_fast_isa`] for anything but a flat loop: with a closure: the closure is called from two places there
/// (its AVX2 function and the baseline path), so LLVM does not inline a closure as large as these
/// loops and builds it once, for the baseline (objdump: no ymm register in them, and half the
/// speed). A named `#[inline(always)]` function is inlined into both.
macro_rules! fast_isa_fn {
    ($(#[$doc:meta])* fn $name:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::simd::fast_isa() {
                    // SAFETY: the CPU has AVX2 and FMA (checked by `fast_isa`).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use fast_isa_fn;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cephes): the high part has few bits, so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for f32 (Cephes `expf`: range reduction by ln 2, degree-6 polynomial): within 2 ulp of
/// libm on [−87.3, 88.37]; 0 below −87.3 (also for −∞), +∞ above 88.37 (the true value overflows
/// f32 at 88.72); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(-87.3, 88.37);
    let n = (clamped * LOG2_E + 0.5).floor();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of n + 1.5·2^23 (n is a small whole number): a vector-friendly `n as i32`.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    let out = y * scale;
    let out = if x < -87.3 { 0.0 } else { out };
    let out = if x > 88.37 { f32::INFINITY } else { out };
    if x.is_nan() {
        x
    } else {
        out
    }
}

/// `erf(x)` for f32: the rational approximation of Eigen / XLA (odd degree-13 over even degree-8
/// polynomial on [−4, 4], ±1 outside). Within 1e-7 of erf in exact arithmetic; evaluated in f32
/// the error is at most 5e-7 absolute (≈ 8 ulp, near |x| ≈ 3.9 where erf rounds toward ±1).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.9546e-3;
    p = p * x2 - 1.609_603_3e-2;
    let p = p * x;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32s.
    fn ulps(a: f32, b: f32) -> u32 {
        let key = |v: f32| {
            let bits = v.to_bits() as i32;
            if bits < 0 {
                i32::MIN - bits
            } else {
                bits
            }
        };
        key(a).abs_diff(key(b))
    }

    fn grid(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let worst = grid(-87.0, 88.3, 200_001).map(|x| ulps(exp(x), x.exp())).max().unwrap();
        assert!(worst <= 2, "worst {worst} ulp");
    }

    #[test]
    fn exp_limits() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_is_within_5e_7_of_the_exact_value() {
        let worst =
            grid(-6.0, 6.0, 200_001).map(|x| (f64::from(erf(x)) - libm_erf(f64::from(x))).abs()).fold(0.0, f64::max);
        assert!(worst < 5e-7, "worst absolute error {worst:e}");
        // Where it matters most (the bulk of GELU's inputs) it is much closer.
        let core =
            grid(-2.0, 2.0, 100_001).map(|x| (f64::from(erf(x)) - libm_erf(f64::from(x))).abs()).fold(0.0, f64::max);
        assert!(core < 3e-7, "worst absolute error on [-2, 2]: {core:e}");
    }

    /// erf in f64 by its Taylor series / continued fraction, as the reference.
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.5; the series cancels badly past 4, where erf rounds to ±1 in f32.
        if x.abs() > 4.0 {
            return x.signum();
        }
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0f64;
        while term.abs() > 1e-20 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
