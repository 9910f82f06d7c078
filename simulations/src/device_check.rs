//! `fedpool-sim device-check`: what one device does for fedpool, measured on the real backbone
//! and data of an experiment (issue 12, "the GPU path measured"):
//!
//! 1. every kernel of `fedpool-kernels` on the device against the CPU ([`fedpool_kernels::check`]);
//! 2. the local training step (one client, batch `step_batch` × `max_len`) for LoRA r=8, one SSF
//!    adapter and a FedIns SSF pool: seconds per step after a warm-up run;
//! 3. the lockstep speed-up: for each client count, a FedIns SSF pool and LoRA r=8 trained one
//!    round (batch 8, 3 local steps) in lockstep passes of up to 256 rows, and one client at a
//!    time (`mode = "sequential"`), samples/s of each.
//!
//! Each run is a whole simulated federation through [`driver::run`], so the numbers are what an
//! experiment sees.

use fedpool_client::session::config::AdapterSection;
use fedpool_kernels::check::{check_device, KernelCheck};

use crate::driver::{self, Quiet};
use crate::error::SimError;
use crate::experiment::{Experiment, Mode, PartitionScheme};
use crate::population::Population;

/// What to measure.
#[derive(Debug, Clone)]
pub struct DeviceCheckPlan {
    /// Client counts of the lockstep table.
    pub clients: Vec<usize>,
    /// Rows of the timed training step.
    pub step_batch: usize,
    /// Timed local steps of the step table (after a warm-up run of 2).
    pub steps: u32,
    /// Rows per lockstep pass.
    pub rows_per_pass: usize,
}

impl Default for DeviceCheckPlan {
    fn default() -> Self {
        Self { clients: vec![32, 256], step_batch: 32, steps: 10, rows_per_pass: 256 }
    }
}

/// The training step of one adapter on the device.
#[derive(Debug, Clone)]
pub struct StepTime {
    /// `lora r=8`, `ssf` or `ssf-pool`.
    pub adapter: String,
    /// Seconds per forward + backward + AdamW step.
    pub seconds_per_step: f64,
}

/// Lockstep against one client at a time, for one adapter and client count.
#[derive(Debug, Clone)]
pub struct LockstepSpeed {
    /// `ssf-pool` or `lora r=8`.
    pub adapter: String,
    /// Virtual clients.
    pub clients: usize,
    /// Training samples/s in lockstep.
    pub lockstep: f64,
    /// Training samples/s one client after another.
    pub sequential: f64,
}

/// Everything `device-check` measured.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// The device, as `fedpool_client::device::open` describes it.
    pub device: String,
    /// One row per kernel.
    pub kernels: Vec<KernelCheck>,
    /// One row per adapter.
    pub steps: Vec<StepTime>,
    /// One row per adapter and client count.
    pub lockstep: Vec<LockstepSpeed>,
}

/// The adapters of the step table: (label, `[adapter]` table).
fn adapters(base: &AdapterSection) -> Vec<(&'static str, AdapterSection)> {
    let with = |kind: &str| AdapterSection { kind: kind.into(), ..base.clone() };
    vec![
        ("lora r=8", AdapterSection { rank: 8, alpha: 16.0, ..with("lora") }),
        ("ssf", with("ssf")),
        ("ssf-pool", AdapterSection { pool_size: 25, top_k: 3, ..with("ssf-pool") }),
    ]
}

/// `base` reduced to one round of `clients` IID clients training `adapter` for `steps` steps.
fn one_round(base: &Experiment, adapter: &AdapterSection, clients: usize, batch: usize, steps: u32) -> Experiment {
    let mut e = base.clone();
    e.name = format!("device-check-{}-{clients}", adapter.kind);
    e.clients = clients;
    e.max_examples_per_client = Some((batch * steps as usize * 2).max(8));
    e.test_fraction = 0.2;
    e.eval_max_examples = Some(1);
    e.partition = PartitionScheme::Iid;
    e.federation.rounds = 1;
    e.federation.local_steps = steps;
    e.federation.clients_per_round = None;
    e.federation.quorum = None;
    e.federation.deadline_s = 1e8;
    e.adapter = adapter.clone();
    e.train.batch_size = batch;
    e
}

/// Runs `exp` and returns (training samples, training seconds).
fn train_time(exp: &Experiment) -> Result<(u64, f64), DeviceCheckError> {
    exp.validate()?;
    let pop = Population::load(exp)?;
    let out = driver::run(exp, &pop, &mut Quiet)?;
    Ok((out.trained_samples, out.train_wall_seconds))
}

/// Why the check could not run.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCheckError {
    /// A kernel failed on the device (not a mismatch: an error).
    #[error("kernel check: {0}")]
    Kernel(#[from] candle_core::Error),
    /// An experiment derived from the base is invalid.
    #[error(transparent)]
    Experiment(#[from] crate::experiment::ExperimentError),
    /// The backbone or data did not load.
    #[error(transparent)]
    Population(#[from] crate::population::PopulationError),
    /// A simulated round failed.
    #[error(transparent)]
    Run(#[from] SimError),
}

/// Measures `plan` on `base`'s device, backbone and data; `report` is told each finished part.
pub fn run(
    base: &Experiment,
    plan: &DeviceCheckPlan,
    report: &mut dyn FnMut(&str),
) -> Result<DeviceReport, DeviceCheckError> {
    let choice: fedpool_client::device::DeviceChoice = base.device.parse().map_err(SimError::Device)?;
    let (device, said) = fedpool_client::device::open(choice).map_err(SimError::Device)?;
    let kernels = check_device(&device)?;
    report(&format!(
        "kernels checked: {} of {} within tolerance",
        kernels.iter().filter(|k| k.passed()).count(),
        kernels.len()
    ));

    let mut steps = Vec::new();
    for (label, adapter) in adapters(&base.adapter) {
        let warm = one_round(base, &adapter, 1, plan.step_batch, 2);
        train_time(&warm)?;
        let timed = one_round(base, &adapter, 1, plan.step_batch, plan.steps);
        let (_, seconds) = train_time(&timed)?;
        let seconds_per_step = seconds / f64::from(plan.steps.max(1));
        report(&format!("step {label}: {:.1} ms", seconds_per_step * 1e3));
        steps.push(StepTime { adapter: label.into(), seconds_per_step });
    }

    let mut lockstep = Vec::new();
    for &clients in &plan.clients {
        for (label, adapter) in adapters(&base.adapter).into_iter().filter(|(l, _)| *l != "ssf") {
            let mut exp = one_round(base, &adapter, clients, 8, 3);
            exp.mode = Mode::Lockstep;
            exp.max_rows_per_pass = Some(plan.rows_per_pass);
            let (n, t) = train_time(&exp)?;
            exp.mode = Mode::Sequential;
            let (m, s) = train_time(&exp)?;
            let row = LockstepSpeed {
                adapter: label.into(),
                clients,
                lockstep: n as f64 / t.max(1e-9),
                sequential: m as f64 / s.max(1e-9),
            };
            report(&format!(
                "{label}, {clients} clients: lockstep {:.1} samples/s, one at a time {:.1}",
                row.lockstep, row.sequential
            ));
            lockstep.push(row);
        }
    }
    Ok(DeviceReport { device: said.to_string(), kernels, steps, lockstep })
}

impl DeviceReport {
    /// The three tables, markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = format!("## Device check on {}\n\n", self.device);
        s += &format!(
            "### Kernels against the CPU (relative error, tolerance {:.0e})\n\n",
            fedpool_kernels::check::TOLERANCE
        );
        s += "| kernel | inputs | values | gradients | |\n| --- | --- | ---: | ---: | --- |\n";
        for k in &self.kernels {
            let verdict = if k.passed() { "ok" } else { "**FAILED**" };
            s += &format!(
                "| {} | {} | {:.1e} | {:.1e} | {verdict} |\n",
                k.kernel, k.shapes, k.value_error, k.gradient_error
            );
        }
        s +=
            "\n### Training step (one client, forward + backward + AdamW)\n\n| adapter | ms / step |\n| --- | ---: |\n";
        for st in &self.steps {
            s += &format!("| {} | {:.1} |\n", st.adapter, st.seconds_per_step * 1e3);
        }
        s += "\n### Lockstep vs one client at a time (batch 8, 3 local steps, one round)\n\n";
        s += "| adapter | clients | lockstep samples/s | one at a time samples/s | speed-up |\n| --- | ---: | ---: | ---: | ---: |\n";
        for l in &self.lockstep {
            s += &format!(
                "| {} | {} | {:.1} | {:.1} | {:.2}× |\n",
                l.adapter,
                l.clients,
                l.lockstep,
                l.sequential,
                l.lockstep / l.sequential.max(1e-9)
            );
        }
        s
    }

    /// True when every kernel passed.
    pub fn kernels_passed(&self) -> bool {
        self.kernels.iter().all(KernelCheck::passed)
    }
}
