//! How the engine runs rounds ([`EngineConfig`]) and why it could not ([`EngineError`]).

use std::sync::Arc;
use std::time::Duration;

use fedpool_common::adapter::{PoolError, SpecError};
use fedpool_common::codec::{CodecConfig, CodecError, DecodeLimits};
use fedpool_common::{BackboneFingerprint, Round};

use super::TrustConfig;
use crate::aggregate::AggregateError;

/// How the engine runs rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Rounds to train in all; after the commit of this round the engine finishes.
    pub total_rounds: u64,
    /// Updates a round wants; with over-selection the round commits once this many are in.
    pub clients_per_round: usize,
    /// Fewest accepted updates a round may commit with (1 ≤ quorum ≤ `clients_per_round`).
    pub quorum: usize,
    /// Factor ≥ 1 of extra clients sampled against stragglers: ⌈`clients_per_round` × this⌉ get a
    /// task (Bonawitz et al. 2019, "Towards federated learning at scale", use 1.3).
    pub over_selection: f64,
    /// Connected clients needed before a round starts (≥ `quorum`).
    pub min_clients_to_start: usize,
    /// How long a round attempt waits for updates, from the moment its tasks are sent.
    pub deadline: Duration,
    /// Local optimisation steps each task asks for.
    pub local_steps: u32,
    /// Seed of the client sampling (with the round and attempt numbers).
    pub seed: u64,
    /// How the global pool is encoded in tasks.
    pub download_codec: CodecConfig,
    /// Limits applied when decoding updates.
    pub decode_limits: DecodeLimits,
    /// The frozen backbone every client must run.
    pub backbone: BackboneFingerprint,
    /// How often clients are asked to send a heartbeat (told to them in the welcome).
    pub heartbeat: Duration,
    /// A connected client not heard from for this long is dropped (> `heartbeat`).
    pub idle_timeout: Duration,
    /// Federated evaluation: after each commit every connected client evaluates the new global
    /// pool on its held-out data and has this long to report (`None`: no evaluation).
    pub eval_deadline: Option<Duration>,
    /// What the coordinator believes of clients: weights, update bounds, strikes.
    pub trust: TrustConfig,
}

impl EngineConfig {
    /// Checks the settings can run rounds that finish.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.total_rounds == 0 {
            return bad("total_rounds must be at least 1".into());
        }
        if self.clients_per_round == 0 {
            return bad("clients_per_round must be at least 1".into());
        }
        if self.quorum == 0 || self.quorum > self.clients_per_round {
            return bad(format!(
                "quorum {} must be in 1..={} (clients_per_round)",
                self.quorum, self.clients_per_round
            ));
        }
        if !(self.over_selection.is_finite() && self.over_selection >= 1.0) {
            return bad(format!("over_selection {} must be a finite number ≥ 1", self.over_selection));
        }
        if self.min_clients_to_start < self.quorum {
            return bad(format!(
                "min_clients_to_start {} is below the quorum {}: such a round could never commit",
                self.min_clients_to_start, self.quorum
            ));
        }
        if self.deadline.is_zero() || self.deadline.as_millis() > u128::from(u64::MAX) {
            return bad(format!("deadline {:?} must be positive", self.deadline));
        }
        if self.local_steps == 0 {
            return bad("local_steps must be at least 1".into());
        }
        if self.heartbeat.is_zero() || self.heartbeat.as_secs() > u64::from(u32::MAX) {
            return bad(format!("heartbeat {:?} must be positive and fit in u32 seconds", self.heartbeat));
        }
        if self.idle_timeout <= self.heartbeat {
            return bad(format!(
                "idle_timeout {:?} must be longer than the heartbeat {:?}",
                self.idle_timeout, self.heartbeat
            ));
        }
        if self.eval_deadline.is_some_and(|d| d.is_zero()) {
            return bad("eval_deadline must be positive".into());
        }
        if let Some(problem) = self.trust.problem() {
            return bad(problem);
        }
        self.download_codec.validate().map_err(|e| EngineError::DownloadCodec(Arc::new(e)))?;
        Ok(())
    }

    /// Clients sampled per round attempt: ⌈`clients_per_round` × `over_selection`⌉.
    pub fn selected_per_round(&self) -> usize {
        let n = (self.clients_per_round as f64 * self.over_selection).ceil();
        if n >= usize::MAX as f64 {
            usize::MAX
        } else {
            (n as usize).max(self.clients_per_round)
        }
    }
}

/// Why an engine could not be built or run.
///
/// Codec errors are shared ([`Arc`]) so that an [`Action::Fatal`](super::Action::Fatal) can be
/// cloned; as they may carry an `io::Error`, which has no equality, two errors compare equal when
/// they are of the same kind and say the same.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot run rounds.
    #[error("engine config: {0}")]
    Config(String),
    /// The download codec's settings are unusable.
    #[error("engine config: download codec: {0}")]
    DownloadCodec(#[source] Arc<CodecError>),
    /// The pool spec is unusable.
    #[error("pool: {0}")]
    Spec(#[from] SpecError),
    /// The starting global pool does not fit the spec.
    #[error("pool: the global pool does not fit the spec: {0}")]
    Global(#[source] PoolError),
    /// The global pool could not be put in its transfer form for a task.
    #[error("encoding the global pool of round {round}: {source}")]
    Transfer {
        /// The round.
        round: Round,
        /// Why the pool does not fit its spec.
        source: PoolError,
    },
    /// The global pool could not be truncated to a client's granted ranks.
    #[error("encoding the global pool of round {round}: {source}")]
    Truncate {
        /// The round.
        round: Round,
        /// Why the truncation was refused.
        source: AggregateError,
    },
    /// The download codec could not encode the global pool.
    #[error("encoding the global pool of round {round}: {source}")]
    Encode {
        /// The round.
        round: Round,
        /// The codec's error.
        source: Arc<CodecError>,
    },
    /// The merge failed.
    #[error("round {round}: {source}")]
    Merge {
        /// The round.
        round: Round,
        /// The merge's error.
        source: AggregateError,
    },
}

impl PartialEq for EngineError {
    fn eq(&self, other: &Self) -> bool {
        use EngineError::*;
        // Codec errors have no equality of their own: they are equal when they say the same.
        let same_codec = |a: &CodecError, b: &CodecError| a.to_string() == b.to_string();
        match (self, other) {
            (Config(a), Config(b)) => a == b,
            (DownloadCodec(a), DownloadCodec(b)) => same_codec(a, b),
            (Spec(a), Spec(b)) => a == b,
            (Global(a), Global(b)) => a == b,
            (Transfer { round: r, source: a }, Transfer { round: s, source: b }) => r == s && a == b,
            (Truncate { round: r, source: a }, Truncate { round: s, source: b }) => r == s && a == b,
            (Encode { round: r, source: a }, Encode { round: s, source: b }) => r == s && same_codec(a, b),
            (Merge { round: r, source: a }, Merge { round: s, source: b }) => r == s && a == b,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EngineConfig {
        EngineConfig {
            total_rounds: 1,
            clients_per_round: 10,
            quorum: 8,
            over_selection: 1.3,
            min_clients_to_start: 8,
            deadline: Duration::from_secs(1),
            local_steps: 1,
            seed: 0,
            download_codec: CodecConfig::default(),
            decode_limits: DecodeLimits::default(),
            backbone: BackboneFingerprint(fedpool_common::Sha256::of(b"m")),
            heartbeat: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
            eval_deadline: None,
            trust: TrustConfig::default(),
        }
    }

    #[test]
    fn over_selection_rounds_up() {
        let mut c = config();
        assert_eq!(c.selected_per_round(), 13);
        c.over_selection = 1.0;
        assert_eq!(c.selected_per_round(), 10);
        c.over_selection = 1.01;
        assert_eq!(c.selected_per_round(), 11);
        c.validate().unwrap();
        c.min_clients_to_start = 2;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_bad_download_codec_is_refused_with_the_codecs_own_error() {
        let mut c = config();
        c.download_codec.top_k = Some(2.0);
        let e = c.validate().unwrap_err();
        assert!(matches!(e, EngineError::DownloadCodec(_)), "{e:?}");
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert!(e.to_string().starts_with("engine config: download codec: "), "{e}");
        assert_eq!(source, Some(c.download_codec.validate().unwrap_err().to_string()));
        assert_eq!(e, c.validate().unwrap_err(), "equal when they say the same");
    }
}
