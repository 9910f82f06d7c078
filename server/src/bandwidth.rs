//! Per-client bandwidth estimates from the transfers the server saw (rank budgets need each
//! client's upload speed before its next round).
//!
//! Each direction keeps an exponentially weighted moving average of observed throughput,
//! `estimate ← α · bytes/seconds + (1 − α) · estimate`, started by the first observation. Until a
//! direction has been observed, the value the client declared at enrollment (`client.toml`'s
//! `declared_upload_bps`) stands in as the prior. Transfers smaller than `min_bytes` are ignored:
//! their time is latency and handshakes, not bandwidth.
//!
//! Pure and synchronous: the QUIC server reports what its streams took, the simulator reports what
//! its network model says; both drive the same estimator through the round engine.

use std::collections::BTreeMap;

/// One direction's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Direction {
    /// The moving average, bytes per second (None until observed).
    observed: Option<f64>,
    /// What the client declared, bytes per second.
    declared: Option<f64>,
    /// Observations folded in.
    samples: u32,
}

impl Direction {
    fn estimate(&self) -> Option<f64> {
        self.observed.or(self.declared)
    }

    fn observe(&mut self, bps: f64, alpha: f64) {
        self.observed = Some(match self.observed {
            Some(old) => alpha * bps + (1.0 - alpha) * old,
            None => bps,
        });
        self.samples = self.samples.saturating_add(1);
    }
}

/// A client's current estimate in both directions, bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimate {
    /// Client → server (None: never observed and nothing declared).
    pub upload_bps: Option<f64>,
    /// Server → client.
    pub download_bps: Option<f64>,
    /// Uploads observed so far (0: the upload figure is the declared prior).
    pub upload_samples: u32,
}

/// Throughput estimates of every client the server has heard of.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthEstimator {
    alpha: f64,
    min_bytes: u64,
    clients: BTreeMap<String, [Direction; 2]>,
}

/// Weight of the newest observation (a half-life of about two transfers).
pub const DEFAULT_ALPHA: f64 = 0.3;

/// Transfers below this many bytes say nothing about bandwidth.
pub const DEFAULT_MIN_BYTES: u64 = 16 * 1024;

const UP: usize = 0;
const DOWN: usize = 1;

impl Default for BandwidthEstimator {
    fn default() -> Self {
        Self::new(DEFAULT_ALPHA, DEFAULT_MIN_BYTES)
    }
}

impl BandwidthEstimator {
    /// An estimator with EWMA weight `alpha` (clamped into (0, 1]) that ignores transfers below
    /// `min_bytes`.
    pub fn new(alpha: f64, min_bytes: u64) -> Self {
        let alpha = if alpha.is_finite() { alpha.clamp(f64::MIN_POSITIVE, 1.0) } else { DEFAULT_ALPHA };
        Self { alpha, min_bytes, clients: BTreeMap::new() }
    }

    /// Records what a client declared at enrollment (bytes per second; 0 or absent: nothing).
    pub fn declare(&mut self, client: &str, upload_bps: Option<u64>, download_bps: Option<u64>) {
        let d = self.clients.entry(client.to_string()).or_default();
        d[UP].declared = upload_bps.filter(|&b| b > 0).map(|b| b as f64);
        d[DOWN].declared = download_bps.filter(|&b| b > 0).map(|b| b as f64);
    }

    /// Folds in an upload of `bytes` that took `seconds` (ignored when too small, or when the
    /// time is not a positive finite number).
    pub fn observe_upload(&mut self, client: &str, bytes: u64, seconds: f64) {
        self.observe(client, UP, bytes, seconds);
    }

    /// Folds in a download (a task sent to the client).
    pub fn observe_download(&mut self, client: &str, bytes: u64, seconds: f64) {
        self.observe(client, DOWN, bytes, seconds);
    }

    fn observe(&mut self, client: &str, direction: usize, bytes: u64, seconds: f64) {
        if bytes < self.min_bytes || !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        let bps = bytes as f64 / seconds;
        if bps.is_finite() {
            self.clients.entry(client.to_string()).or_default()[direction].observe(bps, self.alpha);
        }
    }

    /// The client's estimate (both `None` for a client never heard of).
    pub fn estimate(&self, client: &str) -> LinkEstimate {
        let d = self.clients.get(client).copied().unwrap_or_default();
        LinkEstimate { upload_bps: d[UP].estimate(), download_bps: d[DOWN].estimate(), upload_samples: d[UP].samples }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_value_is_the_prior_until_an_observation() {
        let mut e = BandwidthEstimator::default();
        assert_eq!(e.estimate("a").upload_bps, None);
        e.declare("a", Some(1_000_000), None);
        assert_eq!(e.estimate("a").upload_bps, Some(1e6));
        assert_eq!(e.estimate("a").download_bps, None);
        e.observe_upload("a", 4_000_000, 2.0);
        let est = e.estimate("a");
        assert_eq!((est.upload_bps, est.upload_samples), (Some(2e6), 1));
    }

    #[test]
    fn observations_are_averaged_with_more_weight_on_the_newest() {
        let mut e = BandwidthEstimator::new(0.5, 0);
        e.observe_upload("a", 1000, 1.0);
        e.observe_upload("a", 3000, 1.0);
        assert_eq!(e.estimate("a").upload_bps, Some(2000.0));
        e.observe_upload("a", 6000, 1.0);
        assert_eq!(e.estimate("a").upload_bps, Some(4000.0));
        // Directions and clients are separate.
        e.observe_download("a", 10, 1.0);
        assert_eq!(e.estimate("a").download_bps, Some(10.0));
        assert_eq!(e.estimate("b").upload_bps, None);
    }

    #[test]
    fn tiny_and_impossible_transfers_are_ignored() {
        let mut e = BandwidthEstimator::new(0.5, 1024);
        e.declare("a", Some(500), Some(0));
        e.observe_upload("a", 100, 0.001);
        e.observe_upload("a", 1 << 20, 0.0);
        e.observe_upload("a", 1 << 20, f64::NAN);
        e.observe_upload("a", 1 << 20, -1.0);
        let est = e.estimate("a");
        assert_eq!((est.upload_bps, est.download_bps, est.upload_samples), (Some(500.0), None, 0));
    }
}
