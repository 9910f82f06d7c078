//! Labelled text datasets for local training: [`Example`]s with a label and an optional group
//! (a domain, a user), loaded from a data SPEC (docs/design.md, "The command line"):
//!
//! - a path to a CSV, TSV or JSONL file with named text and label columns and an optional group
//!   column ([`DataOptions`]);
//! - or a built-in name over the fetched assets ([`assets_dir`]): `vader`, `vader:DOMAIN[,DOMAIN...]`,
//!   `trec`, `trec-fine`, `sms` (see [`DataSpec`] for what each holds and how the source files are
//!   cleaned).
//!
//! ```no_run
//! use fedpool_client::data::{load_spec, DataOptions};
//!
//! let data = load_spec("vader:tweets,amazonReviewSnippets", &DataOptions::default())?;
//! let (train, test) = data.split(0.2, 42);
//! println!("{}\n{}", train.summary(), test.summary());
//! # Ok::<(), fedpool_client::data::DataError>(())
//! ```
//!
//! Everything here is deterministic: the same files, options and seed give the same examples,
//! ids and splits, on every machine.

mod builtin;
mod error;
mod file;
mod spec;

use crate::rng::SplitMix64;
use std::collections::HashSet;
use std::fmt;

pub use builtin::VaderDomain;
pub use error::DataError;
pub use file::{load_file, DataOptions, FileFormat};
pub use spec::{assets_dir, load, load_spec, parse_spec, DataSpec, BUILTIN_NAMES};

/// One labelled text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Stable identity: the example's index among the records of its source (for a file, the
    /// 0-based data record; see [`DataSpec`] for the built-ins). Ids survive filtering, splits
    /// and subsets, so they can name examples across runs.
    pub id: u64,
    /// The text, as in the source.
    pub text: String,
    /// Index into [`Dataset::label_names`].
    pub label: usize,
    /// Index into [`Dataset::group_names`], if the example has a group.
    pub group: Option<usize>,
}

/// Labelled examples with the names of their labels and groups.
///
/// Invariants that the loaders guarantee (and that code building a `Dataset` by hand must keep):
/// ids are unique, every `label < label_names.len()`, every group `< group_names.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The examples, in source order.
    pub examples: Vec<Example>,
    /// Label names; an example's `label` indexes this.
    pub label_names: Vec<String>,
    /// Group names (empty when the data has no groups); an example's `group` indexes this.
    pub group_names: Vec<String>,
    /// Where the data came from: the file path or the built-in spec.
    pub source: String,
}

impl Dataset {
    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples (loaders never return an empty dataset; splits may).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The number of labels (classes), including those with no example here.
    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }

    /// Examples per label, indexed like [`Dataset::label_names`].
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.label_names.len()];
        for example in &self.examples {
            bump(&mut counts, example.label);
        }
        counts
    }

    /// Examples per group, indexed like [`Dataset::group_names`]; examples without a group are
    /// not counted (see [`Summary::ungrouped`]).
    pub fn group_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.group_names.len()];
        for group in self.examples.iter().filter_map(|e| e.group) {
            bump(&mut counts, group);
        }
        counts
    }

    /// Examples per (group, label): `counts[group][label]`, for logging how skewed the groups are.
    pub fn label_counts_by_group(&self) -> Vec<Vec<usize>> {
        let mut counts = vec![vec![0; self.label_names.len()]; self.group_names.len()];
        for example in &self.examples {
            if let Some(group) = example.group {
                if counts.len() <= group {
                    counts.resize(group + 1, vec![0; self.label_names.len()]);
                }
                bump(&mut counts[group], example.label);
            }
        }
        counts
    }

    /// Counts per label and per group, ready to log (`Display`).
    pub fn summary(&self) -> Summary {
        let named = |names: &[String], counts: Vec<usize>| -> Vec<(String, usize)> {
            counts
                .into_iter()
                .enumerate()
                .map(|(i, n)| (names.get(i).cloned().unwrap_or_else(|| format!("#{i}")), n))
                .collect()
        };
        Summary {
            source: self.source.clone(),
            examples: self.len(),
            labels: named(&self.label_names, self.label_counts()),
            groups: named(&self.group_names, self.group_counts()),
            ungrouped: self.examples.iter().filter(|e| e.group.is_none()).count(),
        }
    }

    /// The examples whose id is in `ids`, in this dataset's order (the order and repeats of `ids`
    /// do not matter), with the same label and group names.
    ///
    /// # Errors
    /// [`DataError::UnknownIds`] if some id is not in the dataset.
    pub fn subset(&self, ids: &[u64]) -> Result<Dataset, DataError> {
        let wanted: HashSet<u64> = ids.iter().copied().collect();
        let present: HashSet<u64> = self.examples.iter().map(|e| e.id).collect();
        let mut missing = ids.iter().filter(|id| !present.contains(id));
        if let Some(&first) = missing.next() {
            let mut unknown: HashSet<u64> = missing.copied().collect();
            unknown.insert(first);
            return Err(DataError::UnknownIds { dataset: self.source.clone(), count: unknown.len(), first });
        }
        Ok(self.with_examples(self.examples.iter().filter(|e| wanted.contains(&e.id)).cloned().collect()))
    }

    /// Shard `index` of `count` disjoint shards: each example belongs to exactly one shard,
    /// chosen by a hash of its id and `seed`, so clients that load the same source and pick
    /// different indices hold disjoint data (about `1/count` of it each). `None` if
    /// `index >= count`.
    pub fn shard(&self, index: usize, count: usize, seed: u64) -> Option<Dataset> {
        if index >= count {
            return None;
        }
        let salt = SplitMix64::new(seed).next_u64();
        let keep = |e: &&Example| SplitMix64::new(e.id ^ salt).below(count) == index;
        Some(self.with_examples(self.examples.iter().filter(keep).cloned().collect()))
    }

    /// A deterministic train/test split, stratified by label: `(train, test)`.
    ///
    /// Within each label, the examples are shuffled by a generator seeded with `seed` and the
    /// first `round(n · test_fraction)` go to test — but when `0 < test_fraction < 1`, a label
    /// with at least two examples always puts at least one in each part, so small classes are
    /// tested and trained on. Both parts keep this dataset's order and names. The same dataset
    /// and seed give the same split on every machine and with any dependency version (the
    /// generator is SplitMix64, written here). The test size is `test_fraction` of the total up
    /// to rounding per label.
    ///
    /// # Panics
    /// If `test_fraction` is not within `0.0..=1.0` (a caller's bug: validate user input first).
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        assert!((0.0..=1.0).contains(&test_fraction), "test_fraction must be within 0..=1, got {test_fraction}");
        let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); self.label_names.len()];
        for (i, example) in self.examples.iter().enumerate() {
            if by_label.len() <= example.label {
                by_label.resize(example.label + 1, Vec::new());
            }
            by_label[example.label].push(i);
        }
        let mut rng = SplitMix64::new(seed);
        let mut in_test = vec![false; self.examples.len()];
        for mut members in by_label {
            rng.shuffle(&mut members);
            for &i in &members[..test_count(members.len(), test_fraction)] {
                in_test[i] = true;
            }
        }
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (example, &is_test) in self.examples.iter().zip(&in_test) {
            let part = if is_test { &mut test } else { &mut train };
            part.push(example.clone());
        }
        (self.with_examples(train), self.with_examples(test))
    }

    /// The same names and source with other examples.
    fn with_examples(&self, examples: Vec<Example>) -> Dataset {
        Dataset {
            examples,
            label_names: self.label_names.clone(),
            group_names: self.group_names.clone(),
            source: self.source.clone(),
        }
    }
}

/// How many of a label's `n` examples go to test (see [`Dataset::split`]).
fn test_count(n: usize, fraction: f64) -> usize {
    // n is far below 2^52, so the f64 round trip is exact.
    let rounded = ((n as f64) * fraction).round() as usize;
    if n >= 2 && fraction > 0.0 && fraction < 1.0 {
        rounded.clamp(1, n - 1)
    } else {
        rounded.min(n)
    }
}

/// `counts[i] += 1`, growing `counts` if a hand-built dataset breaks the index invariant.
fn bump(counts: &mut Vec<usize>, i: usize) {
    if counts.len() <= i {
        counts.resize(i + 1, 0);
    }
    counts[i] += 1;
}

/// Counts of a dataset, for logs: `Display` gives one line such as
/// `vader: 23320 examples; labels: negative 10849, positive 12471; groups: tweets 4196, ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The dataset's source.
    pub source: String,
    /// The number of examples.
    pub examples: usize,
    /// `(label name, examples)` for every label, in label order.
    pub labels: Vec<(String, usize)>,
    /// `(group name, examples)` for every group, in group order (empty without groups).
    pub groups: Vec<(String, usize)>,
    /// Examples without a group.
    pub ungrouped: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join =
            |pairs: &[(String, usize)]| pairs.iter().map(|(n, c)| format!("{n} {c}")).collect::<Vec<_>>().join(", ");
        write!(f, "{}: {} examples; labels: {}", self.source, self.examples, join(&self.labels))?;
        if !self.groups.is_empty() {
            write!(f, "; groups: {}", join(&self.groups))?;
            if self.ungrouped > 0 {
                write!(f, ", (none) {}", self.ungrouped)?;
            }
        }
        Ok(())
    }
}

/// Maps raw label (or group) values to indices: the given list's order, or the distinct values
/// sorted (numerically when every value is an integer, so `2` comes before `10`; else by string).
pub(crate) fn sorted_names<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> =
        values.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().map(str::to_owned).collect();
    let numbers: Option<Vec<i128>> = names.iter().map(|n| n.parse::<i128>().ok()).collect();
    if let Some(numbers) = numbers {
        let mut pairs: Vec<(i128, String)> = numbers.into_iter().zip(names).collect();
        pairs.sort();
        names = pairs.into_iter().map(|(_, n)| n).collect();
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_count_keeps_both_parts_non_empty() {
        assert_eq!(test_count(2, 0.1), 1);
        assert_eq!(test_count(2, 0.9), 1);
        assert_eq!(test_count(10, 0.2), 2);
        assert_eq!(test_count(1, 0.2), 0);
        assert_eq!(test_count(1, 0.5), 1);
        assert_eq!(test_count(5, 0.0), 0);
        assert_eq!(test_count(5, 1.0), 5);
    }

    #[test]
    fn splitmix_matches_reference_values() {
        // Reference output of SplitMix64 seeded with 1234567 (Vigna's splitmix64.c).
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

    #[test]
    fn shards_are_disjoint_cover_everything_and_depend_on_the_seed() {
        let examples = (0..1000u64)
            .map(|id| Example { id: id * 7 + 3, text: format!("t{id}"), label: (id % 2) as usize, group: None })
            .collect();
        let d = Dataset {
            examples,
            label_names: vec!["a".into(), "b".into()],
            group_names: vec![],
            source: "synthetic".into(),
        };
        let shards: Vec<Dataset> = (0..4).map(|i| d.shard(i, 4, 9).unwrap()).collect();
        let mut ids: Vec<u64> = shards.iter().flat_map(|s| s.examples.iter().map(|e| e.id)).collect();
        ids.sort_unstable();
        assert_eq!(ids, d.examples.iter().map(|e| e.id).collect::<Vec<_>>(), "each example in exactly one shard");
        assert!(shards.iter().all(|s| (180..320).contains(&s.len())), "about a quarter each");
        assert_ne!(d.shard(0, 4, 10).unwrap().examples, shards[0].examples, "another seed, another shard");
        assert!(d.shard(4, 4, 9).is_none());
    }

    #[test]
    fn integer_names_sort_numerically() {
        assert_eq!(sorted_names(["10", "2", "1", "2"]), ["1", "2", "10"]);
        assert_eq!(sorted_names(["b", "10", "a"]), ["10", "a", "b"]);
    }
}
