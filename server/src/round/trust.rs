//! What the coordinator believes of a client ([`TrustConfig`]): how much its updates may weigh
//! (the roster and `max_examples_per_update`: the client's own claim is capped and frozen), how far
//! an update may move the global pool (a norm bound and a value range, on by default), and what
//! bad updates cost (strikes, then quarantine for the rest of the run).
//!
//! The weight of an update is decided here, never by the client: without a roster entry it is
//! the example count the client declared at its **first** enrollment, capped at
//! `max_examples_per_update` (a later enrollment cannot raise it); a roster entry replaces the cap
//! (`max_examples`) or fixes the weight outright (`weight`). The federated evaluation's weights
//! take the same cap.

use std::collections::BTreeMap;

use fedpool_common::wire::RejectReason;

/// The default cap on the examples one update (or evaluation report) may weigh.
pub const DEFAULT_MAX_EXAMPLES_PER_UPDATE: u64 = 1_000_000;
/// The default norm bound: an update is scaled down to this multiple of the median L2 norm of the
/// previous committed round's accepted updates.
pub const DEFAULT_NORM_FACTOR: f64 = 3.0;
/// The default largest magnitude of one value of an update (adapter deltas are O(1); a value of
/// 10⁴ is an attack or a broken client, and 10³⁰ would overflow the merge's `f32` sums).
pub const DEFAULT_MAX_ABS_VALUE: f32 = 1e4;
/// The default number of refusals that quarantine a client.
pub const DEFAULT_STRIKES: u32 = 3;
/// The default window of the strike count, in rounds.
pub const DEFAULT_STRIKE_WINDOW: u64 = 10;

/// A roster entry: what one named client's updates weigh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RosterEntry {
    /// The client's claimed examples count up to this many.
    MaxExamples(u64),
    /// Every update of the client weighs this many examples, whatever it claims.
    Weight(u64),
}

/// How large an update may be, in L2 norm, before it is scaled down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormBound {
    /// No bound (the value range still applies).
    Off,
    /// Scale every update to at most this L2 norm.
    Absolute(f64),
    /// Scale every update to at most `factor` × the median norm of the previous committed round's
    /// accepted updates (the round log keeps it, so a restart goes on with it). The first round
    /// of a federation has no median yet: `first_round` bounds it when set, else only the value
    /// range does.
    Median {
        /// The multiple of the median (> 1).
        factor: f64,
        /// The absolute bound of the first round.
        first_round: Option<f64>,
    },
}

/// What the coordinator believes of clients and how it bounds their updates.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustConfig {
    /// The most examples any update or evaluation report weighs (clients without a roster entry).
    pub max_examples_per_update: u64,
    /// Per-client weights by certificate name (`[clients]` of `server.toml`).
    pub roster: BTreeMap<String, RosterEntry>,
    /// Only clients on the roster may enroll.
    pub roster_only: bool,
    /// The L2 bound on an update.
    pub norm_bound: NormBound,
    /// The largest magnitude of any value of an update; a larger one refuses the update.
    pub max_abs_value: f32,
    /// Refusals (of updates that fail their checks, or protocol errors) within `strike_window`
    /// rounds that quarantine a client for the rest of the run (0: never).
    pub strikes: u32,
    /// The window of the strike count, in rounds (≥ 1).
    pub strike_window: u64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            max_examples_per_update: DEFAULT_MAX_EXAMPLES_PER_UPDATE,
            roster: BTreeMap::new(),
            roster_only: false,
            norm_bound: NormBound::Median { factor: DEFAULT_NORM_FACTOR, first_round: None },
            max_abs_value: DEFAULT_MAX_ABS_VALUE,
            strikes: DEFAULT_STRIKES,
            strike_window: DEFAULT_STRIKE_WINDOW,
        }
    }
}

impl TrustConfig {
    /// Why the settings cannot be used, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.max_examples_per_update == 0 {
            return Some("max_examples_per_update must be at least 1".into());
        }
        if let Some((name, _)) =
            self.roster.iter().find(|(_, e)| matches!(e, RosterEntry::MaxExamples(0) | RosterEntry::Weight(0)))
        {
            return Some(format!("roster entry {name:?}: a weight or max_examples of 0 gives the client no weight"));
        }
        match self.norm_bound {
            NormBound::Absolute(b) if !(b.is_finite() && b > 0.0) => {
                return Some(format!("norm bound {b} must be positive and finite"))
            }
            NormBound::Median { factor, first_round } => {
                if !(factor.is_finite() && factor >= 1.0) {
                    return Some(format!("norm bound factor {factor} must be a finite number ≥ 1"));
                }
                if first_round.is_some_and(|b| !(b.is_finite() && b > 0.0)) {
                    return Some(format!("first-round norm bound {first_round:?} must be positive and finite"));
                }
            }
            _ => {}
        }
        if !(self.max_abs_value.is_finite() && self.max_abs_value > 0.0) {
            return Some(format!("max_abs_value {} must be positive and finite", self.max_abs_value));
        }
        if self.strike_window == 0 {
            return Some("strike_window must be at least 1 round".into());
        }
        None
    }

    /// The frozen example count of a client that declares `declared` at its first enrollment.
    pub fn frozen_examples(&self, client: &str, declared: u64) -> u64 {
        match self.roster.get(client) {
            Some(RosterEntry::MaxExamples(max)) => declared.min(*max),
            Some(RosterEntry::Weight(w)) => *w,
            None => declared.min(self.max_examples_per_update),
        }
    }

    /// The weight of an evaluation report of `examples` held-out examples from `client`.
    pub fn eval_weight(&self, client: &str, examples: u64) -> u64 {
        match self.roster.get(client) {
            Some(RosterEntry::MaxExamples(max)) => examples.min(*max),
            Some(RosterEntry::Weight(w)) => *w,
            None => examples.min(self.max_examples_per_update),
        }
    }

    /// The L2 norm an update is scaled down to, given the previous round's median (if known).
    pub fn norm_limit(&self, median: Option<f64>) -> Option<f64> {
        match self.norm_bound {
            NormBound::Off => None,
            NormBound::Absolute(b) => Some(b),
            NormBound::Median { factor, first_round } => {
                median.filter(|m| *m > 0.0).map(|m| factor * m).or(first_round)
            }
        }
    }
}

/// Whether a refusal for `reason` counts as a strike: the update failed a check an honest client
/// passes (a broken or forged delta, a replayed nonce, a protocol error), unlike being late or a
/// duplicate, which network faults cause.
pub fn is_strike(reason: RejectReason) -> bool {
    matches!(
        reason,
        RejectReason::InvalidDelta
            | RejectReason::NonFinite
            | RejectReason::Corrupt
            | RejectReason::WrongNonce
            | RejectReason::Protocol
    )
}

/// The strikes of every client, by the round they happened in, and the quarantined clients.
#[derive(Debug, Clone, Default)]
pub struct StrikeBook {
    strikes: BTreeMap<String, Vec<u64>>,
    quarantined: BTreeMap<String, String>,
}

impl StrikeBook {
    /// Records a strike for `client` in `round`; true when it brings the client to `limit` strikes
    /// within the last `window` rounds (the caller quarantines it; `why` is kept for the log).
    pub fn strike(&mut self, client: &str, round: u64, limit: u32, window: u64, why: &str) -> bool {
        if limit == 0 || self.is_quarantined(client) {
            return false;
        }
        let list = self.strikes.entry(client.to_string()).or_default();
        list.push(round);
        list.retain(|&r| r + window > round);
        if list.len() >= limit as usize {
            self.quarantined.insert(client.to_string(), why.to_string());
            true
        } else {
            false
        }
    }

    /// Strikes of `client` still inside the window as of `round`.
    #[cfg(test)]
    pub fn count(&self, client: &str, round: u64, window: u64) -> usize {
        self.strikes.get(client).map_or(0, |l| l.iter().filter(|&&r| r + window > round).count())
    }

    /// True when `client` is quarantined.
    pub fn is_quarantined(&self, client: &str) -> bool {
        self.quarantined.contains_key(client)
    }

    /// The quarantined clients and the last refusal that put each there.
    pub fn quarantined(&self) -> &BTreeMap<String, String> {
        &self.quarantined
    }
}

/// The median of `norms` (`None` when empty); `norms` is reordered.
pub fn median(norms: &mut [f64]) -> Option<f64> {
    if norms.is_empty() {
        return None;
    }
    norms.sort_by(f64::total_cmp);
    let n = norms.len();
    Some(if n % 2 == 1 { norms[n / 2] } else { 0.5 * (norms[n / 2 - 1] + norms[n / 2]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_declaration_is_capped_and_a_roster_entry_overrides_it() {
        let mut t = TrustConfig { max_examples_per_update: 1000, ..TrustConfig::default() };
        assert_eq!(t.frozen_examples("a", 10u64.pow(15)), 1000);
        assert_eq!(t.frozen_examples("a", 20), 20);
        t.roster.insert("b".into(), RosterEntry::MaxExamples(50));
        t.roster.insert("c".into(), RosterEntry::Weight(7));
        assert_eq!(t.frozen_examples("b", 10_000), 50);
        assert_eq!(t.frozen_examples("c", 10_000), 7);
        assert_eq!(t.eval_weight("a", u64::MAX), 1000);
        assert_eq!(t.eval_weight("c", 3), 7);
    }

    #[test]
    fn strikes_outside_the_window_are_forgotten() {
        let mut b = StrikeBook::default();
        assert!(!b.strike("x", 1, 3, 2, "bad"));
        assert!(!b.strike("x", 2, 3, 2, "bad"));
        // Round 1's strike left the 2-round window at round 3.
        assert!(!b.strike("x", 3, 3, 2, "bad"));
        assert_eq!(b.count("x", 3, 2), 2);
        assert!(b.strike("x", 3, 3, 2, "bad"));
        assert!(b.is_quarantined("x"));
        assert!(!b.strike("x", 3, 3, 2, "again"), "a quarantined client is not struck twice");
        assert!(!b.is_quarantined("y"));
    }

    #[test]
    fn the_median_bound_needs_a_median_or_a_first_round_bound() {
        let t = TrustConfig::default();
        assert_eq!(t.norm_limit(None), None);
        assert_eq!(t.norm_limit(Some(2.0)), Some(6.0));
        let t = TrustConfig { norm_bound: NormBound::Median { factor: 2.0, first_round: Some(5.0) }, ..t };
        assert_eq!(t.norm_limit(None), Some(5.0));
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn unusable_settings_are_named() {
        let bad = [
            TrustConfig { max_examples_per_update: 0, ..TrustConfig::default() },
            TrustConfig { norm_bound: NormBound::Absolute(f64::NAN), ..TrustConfig::default() },
            TrustConfig { norm_bound: NormBound::Median { factor: 0.5, first_round: None }, ..TrustConfig::default() },
            TrustConfig { max_abs_value: 0.0, ..TrustConfig::default() },
            TrustConfig { strike_window: 0, ..TrustConfig::default() },
        ];
        for t in bad {
            assert!(t.problem().is_some(), "{t:?}");
        }
        assert_eq!(TrustConfig::default().problem(), None);
    }
}
