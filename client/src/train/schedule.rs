//! Learning-rate schedules: linear warmup from 0, then a linear or cosine decay to 0 at the last
//! step (the schedules of HF `transformers`' `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup`), or constant.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to 0.
    #[default]
    Linear,
    /// Half-cosine decay to 0.
    Cosine,
    /// No decay.
    Constant,
}

impl Schedule {
    /// The learning rate at `step` (0-based) of `total` steps with `warmup` warmup steps.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return base * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
        match self {
            Self::Linear => base * (1.0 - progress),
            Self::Cosine => base * 0.5 * (1.0 + (PI * progress).cos()),
            Self::Constant => base,
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::Constant => "constant",
        })
    }
}

/// A schedule name other than `linear`, `cosine` or `constant`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown schedule {0:?}: expected linear, cosine or constant")]
pub struct UnknownSchedule(pub String);

impl FromStr for Schedule {
    type Err = UnknownSchedule;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            _ => Err(UnknownSchedule(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_to_zero() {
        let lr = |s, i| Schedule::lr(s, 1.0, i, 2, 12);
        assert_eq!(lr(Schedule::Linear, 0), 0.5);
        assert_eq!(lr(Schedule::Linear, 1), 1.0);
        assert_eq!(lr(Schedule::Linear, 2), 1.0);
        assert!((lr(Schedule::Linear, 7) - 0.5).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 7) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 11) < 0.03);
        assert_eq!(lr(Schedule::Constant, 11), 1.0);
    }
}
