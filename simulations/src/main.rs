//! `fedpool-sim`: runs simulated federations (one experiment, or several compared on the same
//! axes) and the centralised reference, writing tables and plots.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedpool_sim::centralised::{run_centralised, CentralisedOptions};
use fedpool_sim::device_check::DeviceCheckPlan;
use fedpool_sim::distributed::{run_worker, CoordinatorOptions, Listening, WorkerOptions};
use fedpool_sim::driver::{self, Progress, RunOutput};
use fedpool_sim::experiment::{Experiment, Mode, DEFAULT_EXPERIMENT};
use fedpool_sim::outputs::write_run;
use fedpool_sim::population::Population;
use fedpool_sim::report::{plot_runs, plot_seed_curves, read_rounds_csv, RoundRow, Summary};
use fedpool_sim::seeds;
use indicatif::{ProgressBar, ProgressStyle};

const EXPERIMENT_HELP: &str = "\
An experiment file (TOML; `fedpool-sim default-config` prints the default one to start from):
  name, seed                 the run's name (plots, summary.json) and the seed of everything
  model                      backbone folder (default: assets/minilm), or a decoder's .gguf file
                             (causal-LM fine-tuning judged by generation; its base shared quantized)
  data                       vader | vader:tweets,movieReviewSnippets | trec | sms | a CSV/TSV/JSONL file
                             (a decoder reads a file's prompt and response columns)
  [data_options]             text_column, label_column, group_column, labels (for files)
  device                     cpu | cuda:N | auto
  clients                    virtual clients
  max_examples_per_client    keep a seeded random subset of each client's examples
  test_fraction              held out per client for federated evaluation (0.2)
  eval_max_examples          held-out examples per client to evaluate on
  global_test                also score each round's global pool on one test set (rounds.csv global_*):
                             \"unused:N\" (N seeded random examples no client holds) or a JSON file of
                             example ids (none in a client's training set)
  mode                       lockstep (one batched pass per step) | sequential
  max_rows_per_pass          rows per lockstep forward/backward (default: one client's batch on a CPU,
                             256 on a GPU)
  [partition]  scheme = iid | dirichlet (alpha, min_size) | groups (groups_per_client) | file (file:
               {\"client\": [ids]} split by test_fraction, or {\"client\": {\"train\": [ids], \"test\": [ids]}};
               every run writes the split it used as split.json, the second form)
  [federation] rounds, clients_per_round, quorum, over_selection, deadline_s, local_steps,
               seconds_per_sample (simulated compute per training example at speed 1)
  [adapter]    kind = ssf-pool | ssf | lora (PEFT's B·A) | adalora (SVD form) | linear-probe,
               pool_size, top_k, rank, alpha, lora_modules, pooling = mean | cls-pooler (HF's head)
  [train]      batch_size, lr, head_lr, max_len, lambda_match, dropout (default: the model's
               hidden_dropout_prob), weight_decay (LoRA and its head; 0.01), lora_variant = both |
               ffa (B only) | rolora (B in odd rounds, A in even ones) | fedsa (A and the head
               shared, B kept per client: evaluation is personalised)
  [upload_codec] / [download_codec]  quantization = fp32|int8|int4, top_k, block_size, zstd_level,
               dense_small, rounding = stochastic|nearest; uploads also warmup_rounds
  [aggregate]  strategy = fedavg | trimmed-mean | median | krum | fedadam, clip_norm, lora_merge =
               fedavg (A, B averaged) | exact (FlexLoRA) | fair (LoRA-FAIR), lora_fair_lambda,
               norm_bound = median | absolute | off (norm_factor, max_update_norm), max_abs_value, ...
  [budget]     LoRA rank budgets: policy = none | fixed (rank) | classes (classes) | importance
               (safety_margin, init_rank, target_rank, ...), merge = exact | zero-pad
               (every field: fedpool-server run --help)
  [network]    upload / download = { kind = \"fixed\", bytes_per_sec } | { kind = \"lognormal\",
               median_bytes_per_sec, p90_over_p10 } | { kind = \"trace\", file, column },
               latency_ms, availability, dropout, compute = { kind = \"fixed\", speed } | lognormal, seed
Relative paths are relative to the experiment file's folder.";

/// Simulated federations: many virtual clients on one machine, one shared frozen backbone, the
/// server's own round engine on a virtual clock.
#[derive(Debug, Parser)]
#[command(name = "fedpool-sim", version, about, after_help = EXPERIMENT_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an experiment (or several with --compare): DIR/rounds.csv, summary.json, rounds.jsonl,
    /// config.toml and plots (PNG and SVG).
    #[command(after_help = EXPERIMENT_HELP)]
    Run(RunArgs),
    /// Train the experiment's adapter on the union of its clients' data (the centralised
    /// reference) and score it on the union of their held-out data: DIR/centralised.json.
    Centralised(CentralisedArgs),
    /// Print the embedded default experiment (a starting point for your own).
    DefaultConfig,
    /// Draw finished runs on the same axes again (from their rounds.csv), without re-running.
    Plot(PlotArgs),
    /// Summarise a study's arms over seeds (runs of `run`, grouped by experiment name):
    /// DIR/seeds.md (final accuracy mean ± std, the gap to --reference paired by seed, upload
    /// share, time to the reference's final accuracy) and charts with ±1 std bands.
    Seeds(SeedsArgs),
    /// Serve a distributed run's coordinator (`run --workers N`): connect, load the experiment's
    /// backbone and data on this worker's device, train the shard of clients it is dealt, until
    /// the run is over.
    Worker(WorkerArgs),
    /// Make a distributed run's certificates ahead of time (the coordinator otherwise makes them
    /// at start): DIR/ca.pem, server.pem/.key, clients/worker-K.pem/.key — for a Kubernetes Secret.
    Certs(CertsArgs),
    /// Measure a device on the experiment's backbone and data: every kernel against the CPU, the
    /// training step of LoRA r=8, SSF and an SSF pool (batch 32), and lockstep against one client
    /// at a time for 32 and 256 clients. Prints markdown tables; exits 1 if a kernel disagrees.
    DeviceCheck(DeviceCheckArgs),
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// The coordinator's HOST:PORT (`run --workers N --listen ...`).
    #[arg(long)]
    coordinator: String,
    /// The certificate folder: ca.pem, clients/NAME.pem and clients/NAME.key.
    #[arg(long)]
    certs: PathBuf,
    /// This worker's name: its certificate's subject (worker-0 … worker-(N-1)).
    #[arg(long)]
    name: String,
    /// The device to train on (cpu, cuda:N, auto) [default: the experiment's].
    #[arg(long)]
    device: Option<String>,
    /// The name on the coordinator's certificate [default: the HOST of --coordinator].
    #[arg(long)]
    server_name: Option<String>,
    /// Seconds to wait for the certificates to appear and the coordinator to answer.
    #[arg(long, default_value_t = 300)]
    wait_s: u64,
}

#[derive(Debug, Args)]
struct CertsArgs {
    /// The certificate folder to make (what exists is kept).
    #[arg(long)]
    out: PathBuf,
    /// Workers to issue certificates for (worker-0 … worker-(N-1)).
    #[arg(long)]
    workers: usize,
    /// Extra names for the coordinator's certificate (the host name or address workers dial).
    #[arg(long)]
    san: Vec<String>,
}

#[derive(Debug, Args)]
struct DeviceCheckArgs {
    /// The experiment whose backbone and data are used (default: the embedded one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The device to measure (cpu, cuda:N, auto).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Client counts of the lockstep table.
    #[arg(long, num_args = 1.., default_values_t = [32, 256])]
    clients: Vec<usize>,
    /// Rows of the timed training step.
    #[arg(long, default_value_t = 32)]
    step_batch: usize,
    /// Timed local steps per adapter (after a warm-up run of 2).
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Rows per lockstep pass.
    #[arg(long, default_value_t = 256)]
    rows_per_pass: usize,
    /// Also write the tables to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SeedsArgs {
    /// Where seeds.md and the charts go.
    #[arg(long)]
    out: PathBuf,
    /// The arm the others are compared with [default: the first run's].
    #[arg(long)]
    reference: Option<String>,
    /// Run folders (each with summary.json, config.toml and rounds.csv).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// Where the plots go.
    #[arg(long)]
    out: PathBuf,
    /// Run folders (each with rounds.csv; the run's name from its summary.json, else the folder).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The experiment file (default: the embedded default experiment).
    #[arg(long, conflicts_with = "compare")]
    config: Option<PathBuf>,
    /// Run each of these experiments and plot them on the same axes: DIR/<name>/ per run,
    /// DIR/comparison.md and the shared plots in DIR.
    #[arg(long, num_args = 1..)]
    compare: Vec<PathBuf>,
    /// Where the results go.
    #[arg(long)]
    out: PathBuf,
    /// Train the selected clients one after another (as Flower and OpenFedLLM run virtual
    /// clients) instead of in lockstep, to measure the speed-up on the same work.
    #[arg(long)]
    sequential: bool,
    /// Override the experiment's device (cpu, cuda:N, auto).
    #[arg(long)]
    device: Option<String>,
    /// Override the experiment's number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Place the clients on N worker processes (`fedpool-sim worker`), each with its own copy
    /// of the backbone on its own device; the same rounds as one process (README, "Distributed
    /// simulation").
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Where the coordinator listens for its workers (UDP, QUIC + mutual TLS).
    #[arg(long, default_value = "0.0.0.0:7600", requires = "workers")]
    listen: std::net::SocketAddr,
    /// The certificate folder [default: OUT/certs]; a CA, the coordinator's and the workers'
    /// certificates are made there when it holds no CA.
    #[arg(long, requires = "workers")]
    certs: Option<PathBuf>,
    /// Extra names for the coordinator's certificate (the host name or address workers dial;
    /// localhost, the loopback addresses and this host's name are always on it).
    #[arg(long, requires = "workers")]
    san: Vec<String>,
    /// Start the N workers on this host as child processes (the local launcher); otherwise wait
    /// for N workers to connect (Slurm, Kubernetes: deploy/).
    #[arg(long, requires = "workers")]
    spawn_workers: bool,
    /// How clients are dealt to workers: blocks (contiguous) or round-robin.
    #[arg(long, default_value = "blocks", requires = "workers")]
    sharding: fedpool_sim::distributed::Sharding,
    /// Seconds to wait for the workers to connect.
    #[arg(long, default_value_t = 600, requires = "workers")]
    wait_s: u64,
}

#[derive(Debug, Args)]
struct CentralisedArgs {
    /// The experiment file (default: the embedded default experiment).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where centralised.json goes.
    #[arg(long)]
    out: PathBuf,
    /// Override the experiment's device.
    #[arg(long)]
    device: Option<String>,
    /// Seed of the adapter's initialisation, batch order and dropout [default: the experiment's
    /// seed]; the data and its split stay the experiment's (repeat with several for a spread)
    #[arg(long)]
    init_seed: Option<u64>,
    /// Also evaluate every N steps (a learning curve in centralised.json)
    #[arg(long, value_name = "N")]
    eval_every: Option<usize>,
}

fn main() {
    fedpool_client::malloc::tune_for_training();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fedpool_server=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) if args.compare.is_empty() => {
            let exp = experiment(args.config.as_deref(), &args)?;
            let out = match args.workers {
                Some(n) => simulate_distributed(&exp, &args, n)?,
                None => simulate(&exp, &args.out)?,
            };
            print_table(&[(exp.name.clone(), out)]);
            Ok(())
        }
        Command::Run(args) => {
            if args.workers.is_some() {
                anyhow::bail!("--workers runs one experiment (--config), not --compare");
            }
            let mut runs = Vec::new();
            for path in &args.compare {
                let exp = experiment(Some(path), &args)?;
                if runs.iter().any(|(name, _)| name == &exp.name) {
                    anyhow::bail!("{}: another compared experiment is also named {:?}", path.display(), exp.name);
                }
                let out = simulate(&exp, &args.out.join(&exp.name))?;
                runs.push((exp.name.clone(), out));
            }
            let series: Vec<(String, Vec<RoundRow>)> = runs.iter().map(|(n, o)| (n.clone(), o.rows.clone())).collect();
            let plots = plot_runs(&args.out, &series)?;
            let table = table(&runs);
            let path = args.out.join("comparison.md");
            std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
            println!("{table}");
            eprintln!("wrote {} and {} plots in {}", path.display(), plots.len(), args.out.display());
            Ok(())
        }
        Command::Centralised(args) => {
            let mut exp = load(args.config.as_deref())?;
            if let Some(d) = &args.device {
                exp.device = d.clone();
            }
            let pop = Population::load(&exp)?;
            tracing::info!("{}", pop.description);
            let spinner = ProgressBar::new_spinner().with_message("training on the union of the clients' data");
            spinner.enable_steady_tick(std::time::Duration::from_millis(200));
            let options = CentralisedOptions { init_seed: args.init_seed, eval_every: args.eval_every };
            let result = run_centralised(&exp, &pop, &options)?;
            spinner.finish_and_clear();
            std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
            let path = args.out.join("centralised.json");
            std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!(
                "{}: accuracy {:.2}%, macro-F1 {:.2}% on {} held-out examples ({} steps over {} training examples, {:.0} s); wrote {}",
                result.name,
                100.0 * result.accuracy,
                100.0 * result.macro_f1,
                result.examples,
                result.steps,
                result.train_examples,
                result.wall_seconds,
                path.display()
            );
            Ok(())
        }
        Command::DeviceCheck(args) => device_check(&args),
        Command::Worker(args) => {
            let options = WorkerOptions {
                coordinator: args.coordinator,
                server_name: args.server_name,
                certs: args.certs,
                name: args.name,
                device: args.device,
                wait: std::time::Duration::from_secs(args.wait_s),
            };
            let summary = run_worker(&options)?;
            eprintln!(
                "{}: trained {} clients, {} examples in {:.1} s of local training",
                options.name, summary.clients, summary.stats.samples, summary.stats.wall_seconds
            );
            Ok(())
        }
        Command::Certs(args) => {
            let issued = fedpool_sim::distributed::link::prepare_certs(&args.out, args.workers, &args.san)?;
            eprintln!(
                "{}: CA, coordinator and {} worker certificates ({} made now)",
                args.out.display(),
                args.workers,
                issued.len()
            );
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{DEFAULT_EXPERIMENT}");
            Ok(())
        }
        Command::Seeds(args) => {
            let runs = args.runs.iter().map(|d| seeds::load_run(d)).collect::<Result<Vec<_>, _>>()?;
            let arms = seeds::group(runs)?;
            let reference = args.reference.clone().or_else(|| arms.first().map(|a| a.name.clone()));
            let summaries = seeds::summarise(&arms, reference.as_deref())?;
            let table = seeds::table(&summaries, reference.as_deref());
            std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
            let path = args.out.join("seeds.md");
            std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
            let plots = plot_seed_curves(&args.out, &seeds::curves(&arms))?;
            println!("{table}");
            eprintln!("wrote {} and {} plots in {}", path.display(), plots.len(), args.out.display());
            Ok(())
        }
        Command::Plot(args) => {
            let mut series = Vec::new();
            for dir in &args.runs {
                let rows = read_rounds_csv(&dir.join("rounds.csv"))?;
                let name = std::fs::read_to_string(dir.join("summary.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<Summary>(&t).ok())
                    .map(|s| s.name)
                    .unwrap_or_else(|| dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned()));
                series.push((name, rows));
            }
            let written = plot_runs(&args.out, &series)?;
            eprintln!("wrote {} plots in {}", written.len(), args.out.display());
            Ok(())
        }
    }
}

/// `fedpool-sim device-check`: runs the plan with a spinner naming each finished part.
fn device_check(args: &DeviceCheckArgs) -> anyhow::Result<()> {
    let mut base = load(args.config.as_deref())?;
    base.device = args.device.clone();
    let plan = DeviceCheckPlan {
        clients: args.clients.clone(),
        step_batch: args.step_batch,
        steps: args.steps,
        rows_per_pass: args.rows_per_pass,
    };
    let spinner = ProgressBar::new_spinner().with_message("checking the kernels");
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = fedpool_sim::device_check::run(&base, &plan, &mut |done| {
        spinner.println(done);
        spinner.set_message("measuring");
    })?;
    spinner.finish_and_clear();
    let table = report.to_markdown();
    println!("{table}");
    if let Some(path) = &args.out {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.kernels_passed() {
        anyhow::bail!("a kernel's device result differs from the CPU's (table above)");
    }
    Ok(())
}

fn load(config: Option<&Path>) -> anyhow::Result<Experiment> {
    Ok(match config {
        Some(path) => Experiment::load(path)?,
        None => Experiment::default_experiment()?,
    })
}

/// The experiment with the command line's overrides applied (and checked again).
fn experiment(config: Option<&Path>, args: &RunArgs) -> anyhow::Result<Experiment> {
    let mut exp = load(config)?;
    if args.sequential {
        exp.mode = Mode::Sequential;
    }
    if let Some(d) = &args.device {
        exp.device = d.clone();
    }
    if let Some(r) = args.rounds {
        exp.federation.rounds = r;
    }
    exp.validate()?;
    Ok(exp)
}

/// Runs one experiment with a progress bar and writes its folder.
fn simulate(exp: &Experiment, dir: &Path) -> anyhow::Result<RunOutput> {
    tracing::info!("{}: loading the backbone and the clients' data", exp.name);
    let pop = Population::load(exp)?;
    tracing::info!("{}", pop.description);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fedpool_sim::partition::to_split_file(&dir.join("split.json"), &pop.split())?;
    let mut bar = RoundBar::new(exp.federation.rounds, &exp.name);
    let out = driver::run(exp, &pop, &mut bar)?;
    bar.bar.finish_and_clear();
    let files = write_run(dir, exp, &out)?;
    tracing::info!(
        "{}: {} training examples in {:.1} s of local training ({:.2} samples/s, {:?}); peak memory (RSS) {}; wrote {} files in {}",
        exp.name,
        out.trained_samples,
        out.train_wall_seconds,
        out.trained_samples as f64 / out.train_wall_seconds.max(1e-9),
        exp.mode,
        fedpool_client::malloc::peak_rss_mib().map_or("unknown".to_string(), |m| format!("{m:.0} MiB")),
        files.len(),
        dir.display()
    );
    Ok(out)
}

/// Runs one experiment with its clients on `workers` worker processes (spawned here with
/// `--spawn-workers`, else waited for) and writes its folder.
fn simulate_distributed(exp: &Experiment, args: &RunArgs, workers: usize) -> anyhow::Result<RunOutput> {
    anyhow::ensure!(workers >= 1, "--workers must be at least 1");
    let dir = &args.out;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = args.certs.clone().unwrap_or_else(|| dir.join("certs"));
    let listening = Listening::listen(CoordinatorOptions {
        listen: args.listen,
        certs: certs.clone(),
        workers,
        sans: args.san.clone(),
        wait: std::time::Duration::from_secs(args.wait_s),
        sharding: args.sharding,
    })?;
    let addr = listening.local_addr();
    let _children = if args.spawn_workers {
        Some(Children::spawn(workers, addr, &certs, args.device.as_deref())?)
    } else {
        eprintln!("{}: waiting for {workers} workers on {addr} (certificates in {})", exp.name, certs.display());
        None
    };
    let mut clients = listening.start(exp)?;
    tracing::info!("{}", clients.population().description);
    let mut bar = RoundBar::new(exp.federation.rounds, &exp.name);
    let out = driver::run_with(exp, &mut clients, &mut bar)?;
    bar.bar.finish_and_clear();
    let reports = clients.reports().to_vec();
    drop(clients);
    let mut files = write_run(dir, exp, &out)?;
    let path = dir.join("workers.json");
    let coordinator = fedpool_client::malloc::peak_rss_mib();
    let json = serde_json::json!({ "coordinator_peak_rss_mib": coordinator, "workers": reports });
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    files.push(path);
    for r in &reports {
        let rss = r.peak_rss_mib.map_or("unknown".to_string(), |m| format!("{m:.0} MiB"));
        match r.finished {
            true => tracing::info!(
                "{}: {} clients, {} training examples in {:.1} s, peak memory (RSS) {rss}",
                r.name,
                r.clients,
                r.stats.samples,
                r.stats.wall_seconds
            ),
            false => tracing::warn!("{}: lost before the end ({} clients)", r.name, r.clients),
        }
    }
    tracing::info!(
        "{}: {} training examples on {workers} workers in {:.1} s of local training; coordinator peak memory (RSS) {}; wrote {} files in {}",
        exp.name,
        out.trained_samples,
        out.train_wall_seconds,
        fedpool_client::malloc::peak_rss_mib().map_or("unknown".to_string(), |m| format!("{m:.0} MiB")),
        files.len(),
        dir.display()
    );
    Ok(out)
}

/// Worker processes started on this host (`--spawn-workers`): waited for at the end, killed if
/// the coordinator stops early.
struct Children {
    children: Vec<std::process::Child>,
}

impl Children {
    fn spawn(workers: usize, addr: std::net::SocketAddr, certs: &Path, device: Option<&str>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program to start its workers")?;
        let coordinator = format!("127.0.0.1:{}", addr.port());
        let mut children = Children { children: Vec::new() };
        for i in 0..workers {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("worker").arg("--coordinator").arg(&coordinator).arg("--certs").arg(certs);
            cmd.arg("--name").arg(fedpool_sim::distributed::link::worker_name(i));
            if let Some(d) = device {
                cmd.arg("--device").arg(d);
            }
            let child = cmd.spawn().with_context(|| format!("starting worker {i} ({})", exe.display()))?;
            children.children.push(child);
        }
        Ok(children)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.children {
            // A worker exits once the coordinator closes its link; one that does not is stopped.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A progress bar over rounds, with the phase of the current round as its message and one line
/// per finished round.
struct RoundBar {
    bar: ProgressBar,
    name: String,
}

impl RoundBar {
    fn new(rounds: u64, name: &str) -> Self {
        let bar = ProgressBar::new(rounds);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} rounds, {elapsed}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Self { bar, name: name.to_string() }
    }
}

impl Progress for RoundBar {
    fn phase(&mut self, round: u64, what: &str) {
        self.bar.set_message(format!("round {round}: {what}"));
    }

    fn round_done(&mut self, row: &RoundRow) {
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        let line = format!(
            "{} round {}: accuracy {}, macro-F1 {}, {:.2} MB up, {:.2} MB down, {:.1} simulated s, {:.1} wall s",
            self.name,
            row.round,
            pct(row.accuracy),
            pct(row.macro_f1),
            row.bytes_up as f64 / 1e6,
            row.bytes_down as f64 / 1e6,
            row.sim_seconds,
            row.wall_seconds
        );
        self.bar.suspend(|| eprintln!("{line}"));
        self.bar.inc(1);
    }
}

/// The runs as a markdown table: final accuracy and macro-F1 (and accuracy on the global test
/// set, when a run has one), bytes, simulated and wall time, missed deadlines.
fn table(runs: &[(String, RunOutput)]) -> String {
    let global = runs.iter().any(|(_, out)| out.summary.final_global_accuracy.is_some());
    let (global_head, global_rule) = if global { (" global acc |", " ---: |") } else { ("", "") };
    let mut s = format!(
        "| run | rounds | accuracy | macro-F1 |{global_head} MB up | MB down | simulated s | missed deadline | train samples/s |\n\
         | --- | ---: | ---: | ---: |{global_rule} ---: | ---: | ---: | ---: | ---: |\n",
    );
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", 100.0 * v));
    for (name, out) in runs {
        let m = &out.summary;
        let global_cell = if global { format!(" {} |", pct(m.final_global_accuracy)) } else { String::new() };
        s.push_str(&format!(
            "| {name} | {} | {} | {} |{global_cell} {:.2} | {:.2} | {:.0} | {} | {:.2} |\n",
            m.rounds,
            pct(m.accuracy),
            pct(m.macro_f1),
            m.bytes_up as f64 / 1e6,
            m.bytes_down as f64 / 1e6,
            m.sim_seconds,
            m.missed_deadline,
            out.trained_samples as f64 / out.train_wall_seconds.max(1e-9),
        ));
    }
    s
}

fn print_table(runs: &[(String, RunOutput)]) {
    println!("{}", table(runs));
}
