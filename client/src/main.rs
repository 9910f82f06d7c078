//! `fedpool-client`: parses the command line and calls the library (`fedpool_client::cli`).

use clap::Parser;
use fedpool_client::cli::{run_train, Cli, Command, ProgressObserver};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
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
    }
}
