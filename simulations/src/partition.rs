//! Client data partitions for the simulator: which examples each virtual client holds.
//!
//! The simulator maps each dataset to a slice of lightweight [`Item`]s (id, label, optional
//! natural group) and asks one of the schemes below for a [`Partition`]:
//!
//! - [`iid`]: shuffled and dealt round-robin; client sizes differ by at most one.
//! - [`dirichlet`]: label skew, each label split over clients by proportions drawn from
//!   Dir(α) (Hsu et al. 2019, as implemented by FedML and Flower).
//! - [`groups`]: natural groups (e.g. VADER domains), a fixed number of groups per client.
//! - [`from_split_file`] / [`to_split_file`]: an explicit JSON split, honoured exactly.
//!
//! Every scheme is deterministic in its seed (a [`ChaCha8Rng`]) and its input order, and never
//! puts one example in two clients. [`Partition::label_skew`] measures how far the clients'
//! label distributions are from the global one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// One example of a dataset, as far as partitioning is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Item {
    /// The example's id, unique within the dataset.
    pub id: u64,
    /// The example's class label, `0..num_labels`.
    pub label: usize,
    /// The example's natural group (domain, author, site), if the dataset has one.
    pub group: Option<usize>,
}

/// Which examples each client holds: `clients[c]` is client `c`'s example ids, sorted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Partition {
    /// Example ids per client, each list sorted ascending; no id appears twice.
    pub clients: Vec<Vec<u64>>,
}

/// A partition whose clients have names, as read from or written to a split file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamedPartition {
    /// Client names, in the split file's order; `names[c]` names `partition.clients[c]`.
    pub names: Vec<String>,
    /// The example ids per client (with `tests`: their training ids).
    pub partition: Partition,
    /// Each client's held-out ids when the split file gives them (`{"train": [...], "test":
    /// [...]}` per client), sorted; `None`: held-out examples are drawn by `test_fraction`.
    pub tests: Option<Vec<Vec<u64>>>,
}

/// Everything that can go wrong while building, reading or writing a partition.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// A scheme was asked for zero clients.
    #[error("{scheme} partition: number of clients must be at least 1")]
    NoClients {
        /// The scheme that was asked.
        scheme: &'static str,
    },
    /// Two input items share one id.
    #[error("{scheme} partition: item id {id} appears twice in the input")]
    DuplicateItem {
        /// The scheme that was asked.
        scheme: &'static str,
        /// The repeated id.
        id: u64,
    },
    /// The Dirichlet concentration is not a positive finite number.
    #[error("dirichlet partition: alpha must be positive and finite, got {alpha}")]
    InvalidAlpha {
        /// The rejected concentration.
        alpha: f64,
    },
    /// There are too few items to give every client `min_size` of them.
    #[error("dirichlet partition: {items} items cannot give each of {clients} clients at least {min_size}")]
    TooFewItems {
        /// Number of input items.
        items: usize,
        /// Number of clients.
        clients: usize,
        /// Required examples per client.
        min_size: usize,
    },
    /// Resampling never gave every client `min_size` examples.
    #[error(
        "dirichlet partition: after {attempts} draws (alpha {alpha}, {clients} clients) the smallest client still had \
         {smallest} examples, fewer than min_size {min_size}; raise alpha or lower min_size"
    )]
    MinSizeNotReached {
        /// Draws made.
        attempts: usize,
        /// The concentration used.
        alpha: f64,
        /// Number of clients.
        clients: usize,
        /// Required examples per client.
        min_size: usize,
        /// Smallest client in the last draw.
        smallest: usize,
    },
    /// An item has no group but the groups scheme needs one.
    #[error("groups partition: item {id} has no group")]
    MissingGroup {
        /// The item without a group.
        id: u64,
    },
    /// A client was asked to draw more distinct groups than exist (or none at all).
    #[error("groups partition: each client must draw between 1 and {groups} distinct groups, got {groups_per_client}")]
    GroupsPerClient {
        /// Requested groups per client.
        groups_per_client: usize,
        /// Distinct groups in the input.
        groups: usize,
    },
    /// Fewer client slots than groups: some group would be held by nobody.
    #[error(
        "groups partition: {groups} groups but only {clients} clients x {groups_per_client} groups each; \
         group {unassigned} would be held by no client"
    )]
    UnassignedGroup {
        /// Distinct groups in the input.
        groups: usize,
        /// Number of clients.
        clients: usize,
        /// Groups per client.
        groups_per_client: usize,
        /// One group that no client would draw.
        unassigned: usize,
    },
    /// A partition names an id that is not among the items.
    #[error("{context}: client {client:?} holds id {id}, which is not an item of the dataset")]
    UnknownId {
        /// Where (file path or operation).
        context: String,
        /// The client's name (or index).
        client: String,
        /// The unknown id.
        id: u64,
    },
    /// One id is held twice (by two clients, or twice by one).
    #[error("{context}: id {id} is held by client {first:?} and again by client {second:?}")]
    DuplicateId {
        /// Where (file path or operation).
        context: String,
        /// The id held twice.
        id: u64,
        /// The first client holding it.
        first: String,
        /// The second client holding it.
        second: String,
    },
    /// A split file names one client twice.
    #[error("split file {path}: client {name:?} appears twice")]
    DuplicateClient {
        /// The split file.
        path: PathBuf,
        /// The repeated name.
        name: String,
    },
    /// Names given for writing a split file do not fit the partition, or a file mixes the
    /// plain and the train/test forms.
    #[error("split file {path}: {reason}")]
    BadNames {
        /// The split file.
        path: PathBuf,
        /// What is wrong with the names.
        reason: String,
    },
    /// An item's label is not below `num_labels`.
    #[error("label histogram: item {id} has label {label}, but num_labels is {num_labels}")]
    LabelOutOfRange {
        /// The item.
        id: u64,
        /// Its label.
        label: usize,
        /// The label count given.
        num_labels: usize,
    },
    /// Reading or writing a split file failed.
    #[error("split file {path}: {source}")]
    Io {
        /// The split file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A split file is not a JSON object of id arrays.
    #[error("split file {path}: expected a JSON object {{\"client\": [ids...]}}: {source}")]
    Json {
        /// The split file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// Most Dirichlet draws [`dirichlet`] makes before giving up on `min_size`.
pub const DIRICHLET_MAX_ATTEMPTS: usize = 1000;

impl Partition {
    /// Number of clients.
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// Examples per client.
    pub fn sizes(&self) -> Vec<usize> {
        self.clients.iter().map(Vec::len).collect()
    }

    /// Total examples over all clients.
    pub fn total(&self) -> usize {
        self.clients.iter().map(Vec::len).sum()
    }

    /// Checks the partition against `items`: every id is an item, and no id is held twice.
    pub fn validate(&self, items: &[Item]) -> Result<(), PartitionError> {
        let known: HashSet<u64> = items.iter().map(|it| it.id).collect();
        let names: Vec<String> = (0..self.clients.len()).map(|c| format!("#{c}")).collect();
        check_ids(&self.clients, &names, &known, "partition")
    }

    /// `hist[c][l]`: how many of client `c`'s examples have label `l`.
    ///
    /// Errors when a client holds an id that is not in `items`, or an item's label is not below
    /// `num_labels`.
    pub fn label_histogram(&self, items: &[Item], num_labels: usize) -> Result<Vec<Vec<usize>>, PartitionError> {
        let mut label_of = HashMap::with_capacity(items.len());
        for it in items {
            if it.label >= num_labels {
                return Err(PartitionError::LabelOutOfRange { id: it.id, label: it.label, num_labels });
            }
            label_of.insert(it.id, it.label);
        }
        self.clients
            .iter()
            .enumerate()
            .map(|(c, ids)| {
                let mut hist = vec![0usize; num_labels];
                for id in ids {
                    let label = *label_of.get(id).ok_or_else(|| PartitionError::UnknownId {
                        context: "label histogram".into(),
                        client: format!("#{c}"),
                        id: *id,
                    })?;
                    hist[label] += 1;
                }
                Ok(hist)
            })
            .collect()
    }

    /// Label skew: the mean, over clients with at least one example, of the total-variation
    /// distance `½ Σ_l |p_c(l) − p(l)|` between the client's label distribution and the
    /// distribution over all of `items`. 0 for a perfectly IID split; at most 1.
    pub fn label_skew(&self, items: &[Item], num_labels: usize) -> Result<f64, PartitionError> {
        let hist = self.label_histogram(items, num_labels)?;
        let mut global = vec![0f64; num_labels];
        for it in items {
            global[it.label] += 1.0;
        }
        let n = items.len().max(1) as f64;
        global.iter_mut().for_each(|g| *g /= n);
        let (mut sum, mut count) = (0f64, 0usize);
        for h in &hist {
            let size: usize = h.iter().sum();
            if size == 0 {
                continue;
            }
            let tv: f64 = h.iter().zip(&global).map(|(&k, &g)| (k as f64 / size as f64 - g).abs()).sum::<f64>() / 2.0;
            sum += tv;
            count += 1;
        }
        Ok(if count == 0 { 0.0 } else { sum / count as f64 })
    }

    fn from_unsorted(mut clients: Vec<Vec<u64>>) -> Self {
        clients.iter_mut().for_each(|c| c.sort_unstable());
        Partition { clients }
    }
}

fn check_inputs(scheme: &'static str, items: &[Item], num_clients: usize) -> Result<(), PartitionError> {
    if num_clients == 0 {
        return Err(PartitionError::NoClients { scheme });
    }
    let mut seen = HashSet::with_capacity(items.len());
    for it in items {
        if !seen.insert(it.id) {
            return Err(PartitionError::DuplicateItem { scheme, id: it.id });
        }
    }
    Ok(())
}

/// IID partition: shuffles the items with a [`ChaCha8Rng`] seeded by `seed` and deals them
/// round-robin, so client sizes differ by at most one.
pub fn iid(items: &[Item], num_clients: usize, seed: u64) -> Result<Partition, PartitionError> {
    check_inputs("iid", items, num_clients)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids: Vec<u64> = items.iter().map(|it| it.id).collect();
    ids.shuffle(&mut rng);
    let mut clients = vec![Vec::with_capacity(ids.len() / num_clients + 1); num_clients];
    for (i, id) in ids.into_iter().enumerate() {
        clients[i % num_clients].push(id);
    }
    Ok(Partition::from_unsorted(clients))
}

/// Dirichlet label-skew partition (Hsu, Qi & Brown 2019, "Measuring the Effects of
/// Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335),
/// following the common implementation in FedML (`non_iid_partition_with_dirichlet_distribution`)
/// and Flower (`DirichletPartitioner` with `self_balancing`):
///
/// for each label (ascending), shuffle that label's examples, draw proportions p ~ Dir(α·1) over
/// clients, zero the share of every client that already holds at least `items / num_clients`
/// examples and renormalise, then cut the label's examples at `floor(cumsum(p) · n_label)`.
/// The whole draw is repeated, up to [`DIRICHLET_MAX_ATTEMPTS`] times, until every client holds
/// at least `min_size` examples; otherwise [`PartitionError::MinSizeNotReached`].
///
/// Dir(α·1) is sampled as normalised Gamma(α, 1) draws. Small α concentrates each label on few
/// clients (strong skew); large α approaches an IID split.
pub fn dirichlet(
    items: &[Item],
    num_clients: usize,
    alpha: f64,
    seed: u64,
    min_size: usize,
) -> Result<Partition, PartitionError> {
    check_inputs("dirichlet", items, num_clients)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::InvalidAlpha { alpha });
    }
    if min_size.saturating_mul(num_clients) > items.len() {
        return Err(PartitionError::TooFewItems { items: items.len(), clients: num_clients, min_size });
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::InvalidAlpha { alpha })?;
    let mut by_label: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for it in items {
        by_label.entry(it.label).or_default().push(it.id);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fair_share = items.len() as f64 / num_clients as f64;
    let mut smallest = 0;
    for _ in 0..DIRICHLET_MAX_ATTEMPTS {
        let mut clients: Vec<Vec<u64>> = vec![Vec::new(); num_clients];
        for ids in by_label.values() {
            let mut ids = ids.clone();
            ids.shuffle(&mut rng);
            let mut p: Vec<f64> = (0..num_clients).map(|_| gamma.sample(&mut rng)).collect();
            normalise_or_pick_one(&mut p, &mut rng);
            // Balancing (FedML; Flower's `self_balancing`): no more for clients at their fair share.
            let mut balanced: Vec<f64> =
                p.iter().zip(&clients).map(|(&q, c)| if (c.len() as f64) < fair_share { q } else { 0.0 }).collect();
            if balanced.iter().sum::<f64>() > 0.0 {
                normalise_or_pick_one(&mut balanced, &mut rng);
                p = balanced;
            }
            let n = ids.len();
            let mut start = 0;
            let mut cum = 0.0;
            for (c, q) in p.iter().enumerate() {
                cum += q;
                let end = if c + 1 == num_clients { n } else { ((cum * n as f64).floor() as usize).clamp(start, n) };
                clients[c].extend_from_slice(&ids[start..end]);
                start = end;
            }
        }
        smallest = clients.iter().map(Vec::len).min().unwrap_or(0);
        if smallest >= min_size {
            return Ok(Partition::from_unsorted(clients));
        }
    }
    Err(PartitionError::MinSizeNotReached {
        attempts: DIRICHLET_MAX_ATTEMPTS,
        alpha,
        clients: num_clients,
        min_size,
        smallest,
    })
}

/// Scales `p` to sum to one; if every entry underflowed to zero (tiny α), puts all the mass on
/// one uniformly chosen client, the α → 0 limit of the Dirichlet.
fn normalise_or_pick_one(p: &mut [f64], rng: &mut ChaCha8Rng) {
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|q| *q /= sum);
    } else {
        let pick = rng.random_range(0..p.len());
        p.iter_mut().enumerate().for_each(|(i, q)| *q = if i == pick { 1.0 } else { 0.0 });
    }
}

/// Natural-group partition (e.g. VADER domains): each client holds `groups_per_client` distinct
/// groups, and each group's examples are split evenly (sizes differ by at most one) among the
/// clients holding it.
///
/// Groups are spread evenly: the distinct groups are shuffled with the seed, then client `c`
/// takes the groups at positions `c·k, c·k+1, …, c·k+k−1` (mod the number of groups), so each
/// group is held by ⌊n·k/G⌋ or ⌈n·k/G⌉ clients. Every item must have a group, and every group
/// must be held by some client (`num_clients · groups_per_client ≥ groups`).
pub fn groups(
    items: &[Item],
    num_clients: usize,
    groups_per_client: usize,
    seed: u64,
) -> Result<Partition, PartitionError> {
    check_inputs("groups", items, num_clients)?;
    let mut by_group: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for it in items {
        let g = it.group.ok_or(PartitionError::MissingGroup { id: it.id })?;
        by_group.entry(g).or_default().push(it.id);
    }
    let num_groups = by_group.len();
    if groups_per_client == 0 || groups_per_client > num_groups {
        return Err(PartitionError::GroupsPerClient { groups_per_client, groups: num_groups });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = by_group.keys().copied().collect();
    order.shuffle(&mut rng);
    let slots = num_clients * groups_per_client;
    if slots < num_groups {
        return Err(PartitionError::UnassignedGroup {
            groups: num_groups,
            clients: num_clients,
            groups_per_client,
            unassigned: order[slots],
        });
    }
    let mut holders: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for c in 0..num_clients {
        for j in 0..groups_per_client {
            holders.entry(order[(c * groups_per_client + j) % num_groups]).or_default().push(c);
        }
    }
    let mut clients: Vec<Vec<u64>> = vec![Vec::new(); num_clients];
    for (g, mut ids) in by_group {
        ids.shuffle(&mut rng);
        let hs = &holders[&g];
        for (i, id) in ids.into_iter().enumerate() {
            clients[hs[i % hs.len()]].push(id);
        }
    }
    Ok(Partition::from_unsorted(clients))
}

/// Checks that every id is known and held once; `names[c]` names client `c` in errors.
fn check_ids(
    clients: &[Vec<u64>],
    names: &[String],
    known: &HashSet<u64>,
    context: &str,
) -> Result<(), PartitionError> {
    let mut holder: HashMap<u64, usize> = HashMap::new();
    for (c, ids) in clients.iter().enumerate() {
        for &id in ids {
            if !known.contains(&id) {
                return Err(PartitionError::UnknownId { context: context.into(), client: names[c].clone(), id });
            }
            if let Some(&first) = holder.get(&id) {
                return Err(PartitionError::DuplicateId {
                    context: context.into(),
                    id,
                    first: names[first].clone(),
                    second: names[c].clone(),
                });
            }
            holder.insert(id, c);
        }
    }
    Ok(())
}

/// One client's entry in a split file: its ids, or its training and held-out ids.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
enum SplitEntry {
    /// The plain form: held-out examples are drawn from these by `test_fraction`.
    Ids(Vec<u64>),
    /// The explicit form.
    TrainTest {
        /// Training ids.
        train: Vec<u64>,
        /// Held-out ids.
        test: Vec<u64>,
    },
}

/// A JSON object read in file order, keeping repeated keys so they can be refused.
struct OrderedSplit(Vec<(String, SplitEntry)>);

impl<'de> Deserialize<'de> for OrderedSplit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedSplit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an object mapping client names to arrays of example ids or to {\"train\": [...], \"test\": [...]}",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedSplit, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, SplitEntry>()? {
                    out.push(entry);
                }
                Ok(OrderedSplit(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads a split file, a JSON object `{"client-name": [ids...], ...}` or `{"client-name":
/// {"train": [ids...], "test": [ids...]}, ...}` (one form per file), and honours it exactly.
///
/// Clients keep the file's key order (not sorted by name); each client's ids are sorted. Items
/// the file does not mention belong to no client. Errors name the file, client and id: an id
/// that is not among `items`, an id held twice (in two clients, or in a client's training and
/// held-out lists), a client named twice, mixed forms, or malformed JSON.
pub fn from_split_file(path: &Path, items: &[Item]) -> Result<NamedPartition, PartitionError> {
    let bytes = std::fs::read(path).map_err(|source| PartitionError::Io { path: path.into(), source })?;
    let OrderedSplit(entries) =
        serde_json::from_slice(&bytes).map_err(|source| PartitionError::Json { path: path.into(), source })?;
    let mut seen = HashSet::new();
    for (name, _) in &entries {
        if !seen.insert(name.as_str()) {
            return Err(PartitionError::DuplicateClient { path: path.into(), name: name.clone() });
        }
    }
    let explicit = entries.iter().filter(|(_, e)| matches!(e, SplitEntry::TrainTest { .. })).count();
    if explicit != 0 && explicit != entries.len() {
        return Err(PartitionError::BadNames {
            path: path.into(),
            reason: format!(
                "{explicit} of {} clients give {{\"train\", \"test\"}} and the others a plain list: use one form",
                entries.len()
            ),
        });
    }
    let (mut names, mut clients, mut tests) = (Vec::new(), Vec::new(), Vec::new());
    for (name, entry) in entries {
        names.push(name);
        match entry {
            SplitEntry::Ids(ids) => clients.push(ids),
            SplitEntry::TrainTest { train, test } => {
                clients.push(train);
                tests.push(test);
            }
        }
    }
    let known: HashSet<u64> = items.iter().map(|it| it.id).collect();
    let context = format!("split file {}", path.display());
    if explicit == 0 {
        check_ids(&clients, &names, &known, &context)?;
        return Ok(NamedPartition { names, partition: Partition::from_unsorted(clients), tests: None });
    }
    let all: Vec<Vec<u64>> = clients.iter().chain(&tests).cloned().collect();
    let all_names: Vec<String> =
        names.iter().map(|n| format!("{n} (train)")).chain(names.iter().map(|n| format!("{n} (test)"))).collect();
    check_ids(&all, &all_names, &known, &context)?;
    let tests = Partition::from_unsorted(tests).clients;
    Ok(NamedPartition { names, partition: Partition::from_unsorted(clients), tests: Some(tests) })
}

/// Default client names for `n` clients: `client-000`, `client-001`, … (zero-padded to at least
/// three digits, so name order is index order).
pub fn default_client_names(n: usize) -> Vec<String> {
    let width = n.saturating_sub(1).to_string().len().max(3);
    (0..n).map(|i| format!("client-{i:0width$}")).collect()
}

/// Writes `split` as a split file that [`from_split_file`] reads back unchanged: a pretty JSON
/// object in client order, written atomically with
/// [`fedpool_common::checkpoint::atomic_write`]. Names must be unique and one per client.
pub fn to_split_file(path: &Path, split: &NamedPartition) -> Result<(), PartitionError> {
    let clients = &split.partition.clients;
    if split.names.len() != clients.len() {
        return Err(PartitionError::BadNames {
            path: path.into(),
            reason: format!("{} names for {} clients", split.names.len(), clients.len()),
        });
    }
    let mut seen = HashSet::new();
    for name in &split.names {
        if !seen.insert(name.as_str()) {
            return Err(PartitionError::DuplicateClient { path: path.into(), name: name.clone() });
        }
    }
    let entries: Vec<SplitEntry> = match &split.tests {
        None => clients.iter().map(|ids| SplitEntry::Ids(ids.clone())).collect(),
        Some(tests) if tests.len() == clients.len() => clients
            .iter()
            .zip(tests)
            .map(|(train, test)| SplitEntry::TrainTest { train: train.clone(), test: test.clone() })
            .collect(),
        Some(tests) => {
            return Err(PartitionError::BadNames {
                path: path.into(),
                reason: format!("{} held-out lists for {} clients", tests.len(), clients.len()),
            })
        }
    };
    let mut bytes = Vec::new();
    let mut ser = serde_json::Serializer::pretty(&mut bytes);
    serde::Serializer::collect_map(&mut ser, split.names.iter().zip(&entries))
        .map_err(|source| PartitionError::Json { path: path.into(), source })?;
    bytes.push(b'\n');
    fedpool_common::checkpoint::atomic_write(path, &bytes)
        .map_err(|source| PartitionError::Io { path: path.into(), source })
}
