//! `fedpool-client`: parses the command line (`cli::Cli`), runs the command and prints what it
//! returns; errors go to stderr as one line and exit with status 1.

mod cli;
mod keygen;
mod lm;

use clap::Parser;
use cli::{
    run_eval, run_peft_export, run_peft_import, run_spec, run_train, spec_json, Cli, Command, PeftCommand,
    ProgressObserver,
};
use tracing_subscriber::EnvFilter;

fn main() {
    fedpool_client::malloc::tune_for_training();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => {
            let metrics = run_train(&args, &mut ProgressObserver::new())?;
            let r = &metrics.report;
            println!(
                "{}: accuracy {:.4}, macro-F1 {:.4} on {} held-out examples; {} steps in {:.1} s \
                 ({:.1} samples/s); wrote {}",
                metrics.adapter,
                r.accuracy,
                r.macro_f1,
                r.eval_examples,
                r.steps,
                r.wall_seconds,
                r.samples_per_second,
                args.out.display()
            );
            Ok(())
        }
        Command::Eval(args) => {
            let eval = run_eval(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&eval)?);
            } else {
                println!("{}", eval.table());
            }
            Ok(())
        }
        Command::Run(args) => run_daemon(&args.config),
        Command::Lm(args) => {
            let metrics = lm::run_lm(&args)?;
            println!("{}\nwrote {}", metrics.table(), args.out.display());
            Ok(())
        }
        Command::Peft(PeftCommand::Import(args)) => {
            let spec = run_peft_import(&args)?;
            eprintln!(
                "wrote {} ({:?}, rank {}, {} targets)",
                args.out.display(),
                spec.kind,
                spec.max_rank,
                spec.targets.len()
            );
            Ok(())
        }
        Command::Peft(PeftCommand::Export(args)) => {
            run_peft_export(&args)?;
            eprintln!("wrote {}/adapter_config.json and adapter_model.safetensors", args.out.display());
            Ok(())
        }
        Command::Keygen(args) => {
            let k = keygen::run_keygen(&args)?;
            println!("key {} (mode 0600: keep it here), request {}", k.key.display(), k.csr.display());
            println!(
                "send the request to the coordinator: fedpool-server certs sign --dir CERTS --csr {}",
                k.csr.display()
            );
            Ok(())
        }
        Command::Spec(args) => {
            let spec = run_spec(&args)?;
            match &args.out {
                Some(path) => eprintln!("wrote {} (spec hash {})", path.display(), spec.hash()),
                None => print!("{}", spec_json(&spec)?),
            }
            Ok(())
        }
    }
}

/// `fedpool-client run`: the daemon on a tokio runtime, stopped cleanly by SIGINT or SIGTERM.
fn run_daemon(config: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use fedpool_client::session::{self, DaemonConfig, DaemonOptions};

    let config = DaemonConfig::load(config)?;
    let options = DaemonOptions { tap: None, faults: faults_from_env()? };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: stopping");
            let _ = stop_tx.send(true);
        });
        match session::run(config, options, stop).await? {
            session::Outcome::Finished => tracing::info!("the federation has finished; exiting"),
            session::Outcome::Stopped => tracing::info!("stopped"),
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

/// Faults for the fault tests, from `FEDPOOL_FAULT_STALL_UPLOAD` (a duration) and
/// `FEDPOOL_FAULT_STALL_ROUND` (the round from which uploads stall). Unset: none.
fn faults_from_env() -> anyhow::Result<fedpool_client::session::Faults> {
    let mut f = fedpool_client::session::Faults::default();
    if let Ok(v) = std::env::var("FEDPOOL_FAULT_STALL_UPLOAD") {
        f.stall_upload =
            Some(humantime::parse_duration(&v).map_err(|e| anyhow::anyhow!("FEDPOOL_FAULT_STALL_UPLOAD={v:?}: {e}"))?);
    }
    if let Ok(v) = std::env::var("FEDPOOL_FAULT_STALL_ROUND") {
        f.stall_from_round = v.parse().map_err(|e| anyhow::anyhow!("FEDPOOL_FAULT_STALL_ROUND={v:?}: {e}"))?;
    }
    Ok(f)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
