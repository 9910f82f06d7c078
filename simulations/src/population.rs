//! The simulated population: one frozen backbone loaded once, and each virtual client's private
//! data (its partition share, split into training and held-out examples, tokenized once), and
//! the experiment's global test set if it names one (`global_test`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use fedpool_client::data::{load_spec, DataError, Dataset};
use fedpool_client::device::{DeviceChoice, DeviceError};
use fedpool_client::learner::{Examples, Learner};
use fedpool_client::setup::SetupError;
use fedpool_client::spec::UnknownAdapter;
use fedpool_common::adapter::PoolSpec;
use fedpool_common::BackboneFingerprint;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::experiment::{Experiment, GlobalTest, PartitionScheme};
use crate::partition::{self, Item, NamedPartition, Partition};

/// Why the population could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PopulationError {
    /// The model, the tokenizer or the spec could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The experiment's `device` names no device.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// `[adapter] kind` names no adapter.
    #[error("adapter.kind: {0}")]
    Adapter(#[from] UnknownAdapter),
    /// The data, or a client's share of it, could not be loaded.
    #[error("data: {0}")]
    Data(#[from] DataError),
    /// `global_test` is malformed.
    #[error(transparent)]
    Experiment(#[from] crate::experiment::ExperimentError),
    /// The experiment's settings contradict each other or its split file.
    #[error("{0}")]
    Inconsistent(String),
    /// The partition could not be made.
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
    /// The global test set (`global_test`) cannot be made.
    #[error(transparent)]
    GlobalTest(#[from] GlobalTestError),
    /// A client holds too little data to train and evaluate.
    #[error("client {client} holds {examples} examples: too few to train and evaluate (split {test_fraction}); use fewer clients or another partition")]
    TooLittleData {
        /// The client's name.
        client: String,
        /// Its examples.
        examples: usize,
        /// The held-out fraction.
        test_fraction: f64,
    },
}

/// Why the experiment's global test set (`global_test`) cannot be made; each names the field or
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum GlobalTestError {
    /// `"unused:N"` asks for more examples than no client holds.
    #[error("global_test = \"unused:{wanted}\": only {unused} examples of the data are held by no client")]
    TooFewUnused {
        /// N.
        wanted: usize,
        /// Examples no client holds.
        unused: usize,
    },
    /// The file could not be read.
    #[error("global_test file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a JSON array of example ids.
    #[error("global_test file {}: not a JSON array of example ids: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error, with its line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The file's array is empty.
    #[error("global_test file {}: holds no example ids", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// An id is named twice.
    #[error("global_test file {}: example id {id} is named twice", path.display())]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// The repeated id.
        id: u64,
    },
    /// An id is not an example of the experiment's data.
    #[error("global_test file {}: example id {id} is not in the data ({data})", path.display())]
    UnknownId {
        /// The file.
        path: PathBuf,
        /// The first unknown id, in file order.
        id: u64,
        /// The data's source.
        data: String,
    },
    /// An id is in a client's training set: scoring on it would leak training data.
    #[error("global_test file {}: example id {id} is in client {client}'s training set (the global test set must not hold training data)", path.display())]
    Leak {
        /// The file.
        path: PathBuf,
        /// The first such id, in file order.
        id: u64,
        /// The client that trains on it.
        client: String,
    },
}

/// One virtual client's private data.
#[derive(Debug, Clone)]
pub struct ClientData {
    /// Its name (its identity to the round engine).
    pub name: String,
    /// Training examples, tokenized.
    pub train: Examples,
    /// Held-out examples for federated evaluation, tokenized.
    pub eval: Examples,
}

/// The backbone, once, and every client's data.
pub struct Population {
    /// The frozen backbone every client shares (an encoder, or a decoder's quantized base).
    pub learner: Learner,
    /// The backbone's fingerprint (what clients enroll with).
    pub fingerprint: BackboneFingerprint,
    /// The adapter layout every client trains.
    pub spec: PoolSpec,
    /// The clients, in partition order.
    pub clients: Vec<ClientData>,
    /// The experiment's global test set (`global_test`), tokenized like the clients' data (in
    /// the data's order); the driver scores every committed global pool on it.
    pub global_test: Option<Examples>,
    /// A line for the log: device, data and partition sizes.
    pub description: String,
}

impl Population {
    /// The clients' training and held-out ids as a split file ([`partition::to_split_file`]
    /// writes it; a run's `split.json`): fed back as `scheme = "file"` it reproduces this
    /// population exactly, and other tools (the PEFT reference) can train on the same data.
    pub fn split(&self) -> NamedPartition {
        let ids = |rows: &Examples| {
            let mut ids = rows.ids();
            ids.sort_unstable();
            ids
        };
        NamedPartition {
            names: self.clients.iter().map(|c| c.name.clone()).collect(),
            partition: Partition { clients: self.clients.iter().map(|c| ids(&c.train)).collect() },
            tests: Some(self.clients.iter().map(|c| ids(&c.eval)).collect()),
        }
    }
}

impl std::fmt::Debug for Population {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Population").field("clients", &self.clients.len()).finish_non_exhaustive()
    }
}

impl Population {
    /// Loads the backbone and the data of `exp`, deals the data to its clients, splits and
    /// tokenizes each client's share.
    pub fn load(exp: &Experiment) -> Result<Self, PopulationError> {
        let choice: DeviceChoice = exp.device.parse()?;
        let data_spec = fedpool_client::data::parse_spec(&exp.data_spec())?;
        let learner = Learner::load(&exp.model_dir(), &data_spec, choice, exp.train.max_len)?;
        let dataset = load_spec(&exp.data_spec(), &learner.data_options(&exp.data_options))?;
        let options = exp.adapter.to_options()?;
        let spec = learner.pool_spec(&options, dataset.num_labels())?;
        let split = deal(exp, &dataset)?;
        let encode = |set: &Dataset| learner.encode(set);
        let mut clients = Vec::with_capacity(split.names.len());
        // Every example some client holds: its share, training and held-out.
        let mut held: HashSet<u64> = HashSet::new();
        if split.tests.is_some() && exp.max_examples_per_client.is_some() {
            return Err(PopulationError::Inconsistent(
                "the split file gives each client's training and held-out ids: max_examples_per_client would cut them"
                    .into(),
            ));
        }
        for (c, (name, ids)) in split.names.iter().zip(&split.partition.clients).enumerate() {
            let mut ids = ids.clone();
            if let Some(max) = exp.max_examples_per_client {
                ids.shuffle(&mut ChaCha8Rng::seed_from_u64(exp.seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
                ids.truncate(max);
            }
            let share = dataset.subset(&ids)?;
            let test_ids = split.tests.as_ref().and_then(|t| t.get(c));
            held.extend(ids.iter().chain(test_ids.into_iter().flatten()));
            let (train_set, mut test_set) = match test_ids {
                Some(test_ids) => (share.clone(), dataset.subset(test_ids)?),
                None => share.split(exp.test_fraction, exp.seed.wrapping_add(c as u64)),
            };
            if let Some(max) = exp.eval_max_examples {
                test_set.examples.truncate(max);
            }
            if train_set.is_empty() || test_set.is_empty() {
                return Err(PopulationError::TooLittleData {
                    client: name.clone(),
                    examples: share.len(),
                    test_fraction: exp.test_fraction,
                });
            }
            clients.push(ClientData { name: name.clone(), train: encode(&train_set)?, eval: encode(&test_set)? });
        }
        let global_test = match global_test_set(exp, &dataset, &held, &clients)? {
            Some(set) => Some(encode(&set)?),
            None => None,
        };
        let train: usize = clients.iter().map(|c| c.train.len()).sum();
        let eval: usize = clients.iter().map(|c| c.eval.len()).sum();
        let global = global_test.as_ref().map_or(String::new(), |g| format!(", a global test set of {}", g.len()));
        let description = format!(
            "{}; {}: {} clients, {train} training and {eval} held-out examples{global}, {} labels; {} adapter, {} trainable values per client",
            learner.device_name(),
            exp.data,
            clients.len(),
            dataset.num_labels(),
            exp.adapter.kind,
            spec.num_params()
        );
        let fingerprint = learner.fingerprint();
        Ok(Population { learner, fingerprint, spec, clients, global_test, description })
    }
}

/// Mixed into the experiment's seed for the draw of `"unused:N"`, so it is not another draw's.
const GLOBAL_TEST_MIX: u64 = 0x6c62_272e_07bb_0142;

/// The examples of the experiment's global test set, if it names one. `"unused:N"`: a seeded
/// random N of the examples not in `held` (every client's share, training and held-out). A file:
/// its ids, each an example of the data and in no client's training set (held-out ids are
/// allowed).
fn global_test_set(
    exp: &Experiment,
    dataset: &Dataset,
    held: &HashSet<u64>,
    clients: &[ClientData],
) -> Result<Option<Dataset>, PopulationError> {
    let ids = match exp.global_test_set()? {
        None => return Ok(None),
        Some(GlobalTest::Unused(wanted)) => {
            let mut unused: Vec<u64> = dataset.examples.iter().map(|e| e.id).filter(|id| !held.contains(id)).collect();
            if unused.len() < wanted {
                return Err(GlobalTestError::TooFewUnused { wanted, unused: unused.len() }.into());
            }
            unused.shuffle(&mut ChaCha8Rng::seed_from_u64(exp.seed ^ GLOBAL_TEST_MIX));
            unused.truncate(wanted);
            unused
        }
        Some(GlobalTest::File(path)) => read_global_test_file(&path, dataset, clients)?,
    };
    Ok(Some(dataset.subset(&ids)?))
}

/// Reads and checks a global test file: a non-empty JSON array of distinct ids of `dataset`'s
/// examples, none in a client's training set.
fn read_global_test_file(path: &Path, dataset: &Dataset, clients: &[ClientData]) -> Result<Vec<u64>, GlobalTestError> {
    let bytes = std::fs::read(path).map_err(|source| GlobalTestError::Io { path: path.into(), source })?;
    let ids: Vec<u64> =
        serde_json::from_slice(&bytes).map_err(|source| GlobalTestError::Json { path: path.into(), source })?;
    if ids.is_empty() {
        return Err(GlobalTestError::Empty { path: path.into() });
    }
    let known: HashSet<u64> = dataset.examples.iter().map(|e| e.id).collect();
    let trained_by: HashMap<u64, &str> =
        clients.iter().flat_map(|c| c.train.ids().into_iter().map(|id| (id, c.name.as_str()))).collect();
    let mut seen = HashSet::with_capacity(ids.len());
    for &id in &ids {
        if !seen.insert(id) {
            return Err(GlobalTestError::Duplicate { path: path.into(), id });
        }
        if !known.contains(&id) {
            return Err(GlobalTestError::UnknownId { path: path.into(), id, data: dataset.source.clone() });
        }
        if let Some(client) = trained_by.get(&id) {
            return Err(GlobalTestError::Leak { path: path.into(), id, client: client.to_string() });
        }
    }
    Ok(ids)
}

/// Deals `dataset` to the experiment's clients with its partition scheme.
fn deal(exp: &Experiment, dataset: &Dataset) -> Result<NamedPartition, PopulationError> {
    let items: Vec<Item> = dataset.examples.iter().map(|e| Item { id: e.id, label: e.label, group: e.group }).collect();
    let named = |partition: Partition| NamedPartition {
        names: partition::default_client_names(exp.clients),
        partition,
        tests: None,
    };
    Ok(match &exp.partition {
        PartitionScheme::Iid => named(partition::iid(&items, exp.clients, exp.seed)?),
        PartitionScheme::Dirichlet { alpha, min_size } => {
            named(partition::dirichlet(&items, exp.clients, *alpha, exp.seed, *min_size)?)
        }
        PartitionScheme::Groups { groups_per_client } => {
            named(partition::groups(&items, exp.clients, *groups_per_client, exp.seed)?)
        }
        PartitionScheme::File { file } => {
            let split = partition::from_split_file(&exp.base_dir.join(file), &items)?;
            if split.names.len() != exp.clients {
                return Err(PopulationError::Inconsistent(format!(
                    "split file {} names {} clients but the experiment has clients = {}",
                    exp.base_dir.join(file).display(),
                    split.names.len(),
                    exp.clients
                )));
            }
            split
        }
    })
}
