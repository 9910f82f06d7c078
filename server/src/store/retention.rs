//! Which checkpoints a store keeps: [`Retention`], applied after every commit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fedpool_common::checkpoint::{checkpoint_path, list_checkpoints};
use fedpool_common::Round;

use super::server_state_path;

/// Prefix and suffix of a server-state file's name (`server-state-000007.safetensors`).
const STATE_PREFIX: &str = "server-state-";
const STATE_SUFFIX: &str = ".safetensors";

/// Which round checkpoints (and their server-state files) a store keeps once a round commits.
///
/// Kept: the newest `keep_last` checkpoints, every round that is a multiple of `keep_every`,
/// round 0 (the initial pool) and, always, the newest (the one just committed, which a restart
/// resumes from). Everything else at or below the newest round is deleted. Files of rounds above
/// the newest (checkpoints that did not verify at open, to be overwritten when their round is
/// committed again) are left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How many of the newest checkpoints to keep (0 keeps only the newest, as 1 does).
    pub keep_last: usize,
    /// Keep every round that is a multiple of this (0: none beyond the others).
    pub keep_every: u64,
}

impl Retention {
    /// Default of [`Retention::keep_last`]: the last five rounds.
    pub const DEFAULT_KEEP_LAST: usize = 5;
    /// Default of [`Retention::keep_every`]: every tenth round.
    pub const DEFAULT_KEEP_EVERY: u64 = 10;

    /// Keeps every checkpoint (the behaviour before retention existed).
    pub fn keep_all() -> Self {
        Self { keep_last: usize::MAX, keep_every: 0 }
    }

    /// Of the checkpoint rounds `on_disk` (any order), those to delete now that `newest` is
    /// committed, oldest first.
    pub fn to_delete(&self, on_disk: &[Round], newest: Round) -> Vec<Round> {
        let candidates: BTreeSet<Round> = on_disk.iter().copied().filter(|r| *r <= newest).collect();
        let recent: BTreeSet<Round> = candidates.iter().rev().take(self.keep_last.max(1)).copied().collect();
        candidates
            .into_iter()
            .filter(|&r| {
                let every = self.keep_every > 0 && r.0.is_multiple_of(self.keep_every);
                !(r == newest || r == Round(0) || every || recent.contains(&r))
            })
            .collect()
    }
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep_last: Self::DEFAULT_KEEP_LAST, keep_every: Self::DEFAULT_KEEP_EVERY }
    }
}

/// Deletes what `retention` does not keep in `dir` now that `newest` is committed: checkpoints
/// first, then the server-state files of every round at or below `newest` whose checkpoint is
/// gone (a state file without its checkpoint is never read). A deletion that fails is logged and
/// skipped: the store stays usable, only larger. Returns how many files were deleted.
pub(super) fn prune(dir: &Path, retention: &Retention, newest: Round) -> usize {
    let checkpoints = match list_checkpoints(dir) {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot list checkpoints to prune; keeping them all");
            return 0;
        }
    };
    let rounds: Vec<Round> = checkpoints.iter().map(|(r, _)| *r).collect();
    let doomed = retention.to_delete(&rounds, newest);
    let mut kept: BTreeSet<Round> = rounds.into_iter().collect();
    let mut deleted = 0;
    for round in doomed {
        if remove(&checkpoint_path(dir, round)) {
            kept.remove(&round);
            deleted += 1;
        }
    }
    match list_server_states(dir) {
        Ok(states) => {
            for (round, path) in states {
                if round <= newest && !kept.contains(&round) && remove(&path) {
                    deleted += 1;
                }
            }
        }
        Err(error) => tracing::warn!(dir = %dir.display(), %error, "cannot list server-state files to prune"),
    }
    if deleted > 0 {
        tracing::debug!(dir = %dir.display(), deleted, %newest, "pruned old checkpoints");
    }
    deleted
}

/// Deletes one file; a failure is logged. True if it is gone.
fn remove(path: &Path) -> bool {
    match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "cannot delete an old checkpoint file; keeping it");
            false
        }
    }
}

/// The server-state files in `dir`, oldest first (anything else is ignored).
fn list_server_states(dir: &Path) -> std::io::Result<Vec<(Round, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let round =
            name.strip_prefix(STATE_PREFIX).and_then(|r| r.strip_suffix(STATE_SUFFIX)).and_then(|r| r.parse().ok());
        if let Some(r) = round {
            out.push((Round(r), server_state_path(dir, Round(r))));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(range: std::ops::RangeInclusive<u64>) -> Vec<Round> {
        range.map(Round).collect()
    }

    fn kept(retention: Retention, on_disk: &[Round], newest: u64) -> Vec<u64> {
        let doomed = retention.to_delete(on_disk, Round(newest));
        on_disk.iter().filter(|r| !doomed.contains(r)).map(|r| r.0).collect()
    }

    #[test]
    fn the_default_keeps_the_last_five_every_tenth_and_round_0() {
        assert_eq!(kept(Retention::default(), &rounds(0..=23), 23), [0, 10, 19, 20, 21, 22, 23]);
        assert_eq!(kept(Retention::default(), &rounds(0..=3), 3), [0, 1, 2, 3], "nothing to prune yet");
    }

    #[test]
    fn keep_every_0_keeps_no_multiples_and_keep_last_0_still_keeps_the_newest_and_round_0() {
        let r = Retention { keep_last: 2, keep_every: 0 };
        assert_eq!(kept(r, &rounds(0..=12), 12), [0, 11, 12]);
        let r = Retention { keep_last: 0, keep_every: 0 };
        assert_eq!(kept(r, &rounds(0..=12), 12), [0, 12]);
        assert_eq!(
            kept(Retention::keep_all(), &rounds(0..=12), 12),
            rounds(0..=12).iter().map(|r| r.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn checkpoints_above_the_newest_are_left_alone_and_do_not_count_as_recent() {
        // Rounds 8 and 9 did not verify at open; the store resumed at 6 and has committed 7.
        let on_disk = [rounds(0..=7), vec![Round(8), Round(9)]].concat();
        let r = Retention { keep_last: 2, keep_every: 0 };
        assert_eq!(kept(r, &on_disk, 7), [0, 6, 7, 8, 9]);
    }

    #[test]
    fn gaps_left_by_earlier_pruning_count_files_not_round_numbers() {
        let on_disk = [Round(0), Round(10), Round(17), Round(18), Round(19), Round(20), Round(21)];
        let r = Retention { keep_last: 3, keep_every: 10 };
        assert_eq!(kept(r, &on_disk, 21), [0, 10, 19, 20, 21]);
    }
}
