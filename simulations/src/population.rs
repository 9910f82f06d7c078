//! The simulated population: one frozen backbone loaded once, and each virtual client's private
//! data (its partition share, split into training and held-out examples, tokenized once).

use fedpool_client::data::{load_spec, Dataset};
use fedpool_client::device::{self, DeviceChoice};
use fedpool_client::model::BertEncoder;
use fedpool_client::spec::pool_spec;
use fedpool_client::train::{encode_examples, tokenizer_for_training, Encoded};
use fedpool_common::adapter::PoolSpec;
use fedpool_common::BackboneFingerprint;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::experiment::{Experiment, PartitionScheme};
use crate::partition::{self, Item, NamedPartition, Partition};

/// Why the population could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PopulationError {
    /// The model, the data, the device or the spec could not be set up.
    #[error("{0}")]
    Setup(String),
    /// The partition could not be made.
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
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

/// One virtual client's private data.
#[derive(Debug, Clone)]
pub struct ClientData {
    /// Its name (its identity to the round engine).
    pub name: String,
    /// Training examples, tokenized.
    pub train: Vec<Encoded>,
    /// Held-out examples for federated evaluation, tokenized.
    pub eval: Vec<Encoded>,
}

/// The backbone, once, and every client's data.
pub struct Population {
    /// The frozen backbone every client shares.
    pub model: BertEncoder,
    /// The backbone's fingerprint (what clients enroll with).
    pub fingerprint: BackboneFingerprint,
    /// The adapter layout every client trains.
    pub spec: PoolSpec,
    /// The tokenizer's padding id.
    pub pad_id: u32,
    /// The clients, in partition order.
    pub clients: Vec<ClientData>,
    /// A line for the log: device, data and partition sizes.
    pub description: String,
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
        let setup = |what: &str, e: &dyn std::fmt::Display| PopulationError::Setup(format!("{what}: {e}"));
        let model_dir = exp.model_dir();
        if !model_dir.is_dir() {
            return Err(PopulationError::Setup(format!(
                "model folder {} not found (run scripts/fetch-assets.sh, or set `model` in the experiment)",
                model_dir.display()
            )));
        }
        let choice: DeviceChoice = exp.device.parse().map_err(|e| setup("device", &e))?;
        let (device, said) = device::open(choice).map_err(|e| setup("device", &e))?;
        let model = BertEncoder::load(&model_dir, &device).map_err(|e| setup(&model_dir.display().to_string(), &e))?;
        let fingerprint =
            BackboneFingerprint::of_model_dir(&model_dir).map_err(|e| setup(&model_dir.display().to_string(), &e))?;
        let dataset = load_spec(&exp.data_spec(), &exp.data_options).map_err(|e| setup("data", &e))?;
        let options = exp.adapter.to_options().map_err(|e| setup("adapter.kind", &e))?;
        let spec = pool_spec(model.config(), &options, dataset.num_labels()).map_err(|e| setup("adapter", &e))?;
        let split = deal(exp, &dataset)?;

        let max_len = exp.train.max_len;
        let tokenizer =
            tokenizer_for_training(&model_dir.join("tokenizer.json"), max_len).map_err(|e| setup("tokenizer", &e))?;
        let pad_id = tokenizer.inner().get_padding().map_or(0, |p| p.pad_id);
        let encode = |set: &Dataset| {
            encode_examples(&tokenizer, set.examples.iter().map(|e| (e.id, e.text.as_str(), e.label)))
                .map_err(|e| setup("tokenizing", &e))
        };
        let mut clients = Vec::with_capacity(split.names.len());
        for (c, (name, ids)) in split.names.iter().zip(&split.partition.clients).enumerate() {
            let mut ids = ids.clone();
            if let Some(max) = exp.max_examples_per_client {
                ids.shuffle(&mut ChaCha8Rng::seed_from_u64(exp.seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
                ids.truncate(max);
            }
            let share = dataset.subset(&ids).map_err(|e| setup(name, &e))?;
            let (train_set, mut test_set) = share.split(exp.test_fraction, exp.seed.wrapping_add(c as u64));
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
        let train: usize = clients.iter().map(|c| c.train.len()).sum();
        let eval: usize = clients.iter().map(|c| c.eval.len()).sum();
        let description = format!(
            "{said}; {}: {} clients, {train} training and {eval} held-out examples, {} labels; {} adapter, {} trainable values per client",
            exp.data,
            clients.len(),
            dataset.num_labels(),
            exp.adapter.kind,
            spec.num_params()
        );
        Ok(Population { model, fingerprint, spec, pad_id, clients, description })
    }
}

/// Deals `dataset` to the experiment's clients with its partition scheme.
fn deal(exp: &Experiment, dataset: &Dataset) -> Result<NamedPartition, PopulationError> {
    let items: Vec<Item> = dataset.examples.iter().map(|e| Item { id: e.id, label: e.label, group: e.group }).collect();
    let named =
        |partition: Partition| NamedPartition { names: partition::default_client_names(exp.clients), partition };
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
                return Err(PopulationError::Setup(format!(
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
