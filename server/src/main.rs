//! `fedpool-server`: the coordinator's command line. Parses arguments and calls the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedpool_server::certs;
use fedpool_server::config::{ServerConfig, CONFIG_REFERENCE, LISTEN_ADDR_FILE, METRICS_ADDR_FILE};
use fedpool_server::metrics::Metrics;
use fedpool_server::net::{Outcome, Server};
use tracing::{info, warn};

/// fedpool's coordinator: runs federated rounds over QUIC with mutual TLS, and manages the
/// federation's certificates.
#[derive(Parser)]
#[command(name = "fedpool-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the federation's CA and certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the server.
    #[command(after_long_help = CONFIG_REFERENCE)]
    Run {
        /// The configuration file (TOML). `--help` lists every field.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the round log of a state folder as a table: per round the global model's federated
    /// evaluation (accuracy, macro-F1), clients, bytes up/down and seconds.
    Report {
        /// The server's state folder (holding rounds.jsonl).
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the federation CA (ca.pem, ca.key) and the server certificate (server.pem,
    /// server.key; names localhost, 127.0.0.1, ::1 and every --san) in DIR.
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Another name (DNS name or IP address) clients use to reach the server; repeatable.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Overwrite an existing CA (every client certificate issued so far stops working).
        #[arg(long)]
        force: bool,
        /// Validity of the server certificate, in days.
        #[arg(long, default_value_t = certs::LEAF_VALIDITY_DAYS)]
        days: u32,
    },
    /// Issue a client certificate and key (DIR/clients/NAME.pem, NAME.key), subject CN = NAME,
    /// a random serial, signed by the CA in DIR, recorded in DIR/issued.jsonl. Prefer `certs
    /// sign` (the key made on the client by `fedpool-client keygen`).
    Issue {
        #[command(flatten)]
        dir: DirArg,
        /// The client's name: its identity in the federation ([A-Za-z0-9._-], at most 64).
        #[arg(long)]
        name: String,
        /// Validity in days (1 to 3650).
        #[arg(long, default_value_t = certs::LEAF_VALIDITY_DAYS)]
        days: u32,
        /// Overwrite an existing certificate of that name; its earlier certificates are revoked.
        #[arg(long)]
        force: bool,
    },
    /// Sign a client's certificate signing request (from `fedpool-client keygen`): subject CN
    /// from the request, a random serial, written to DIR/clients/NAME.pem and recorded in
    /// DIR/issued.jsonl. The client's private key never leaves the client.
    Sign {
        #[command(flatten)]
        dir: DirArg,
        /// The request (PEM), e.g. the client's `client.csr`.
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        /// Validity in days (1 to 3650).
        #[arg(long, default_value_t = certs::LEAF_VALIDITY_DAYS)]
        days: u32,
        /// Replace an existing certificate of that name; its earlier certificates are revoked.
        #[arg(long)]
        force: bool,
    },
    /// Revoke client certificates: every one issued to --name, or the one with --serial; their
    /// serials go into DIR/revoked.txt. A running server closes their live connections within
    /// half a second and refuses them from then on.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["name", "serial"])))]
    Revoke {
        #[command(flatten)]
        dir: DirArg,
        /// The client's name: every certificate issued to it.
        #[arg(long)]
        name: Option<String>,
        /// One certificate's serial (hexadecimal, as `certs issue`/`sign` print it).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
    },
}

#[derive(Args)]
struct DirArg {
    /// The certificate folder.
    #[arg(long)]
    dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedpool-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Certs(c) => certs_command(c),
        Command::Report { state } => report(&state),
        Command::Run { config } => {
            init_logging();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run(&config))
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn certs_command(c: CertsCommand) -> anyhow::Result<()> {
    match c {
        CertsCommand::Init { dir, sans, force, days } => {
            let opts = certs::InitOptions { sans, force, server_days: days, ..Default::default() };
            let r = certs::init(&dir.dir, &opts)?;
            println!("CA:     {} (key {})", r.ca_cert.display(), r.ca_key.display());
            println!(
                "server: {} (key {}), names {}",
                r.server_cert.display(),
                r.server_key.display(),
                r.server_sans.join(", ")
            );
        }
        CertsCommand::Issue { dir, name, days, force } => {
            let r = certs::issue(&dir.dir, &name, days, force)?;
            let key = r.key.as_ref().map(|k| format!(" (key {})", k.display())).unwrap_or_default();
            println!(
                "client {:?}: {}{key}, serial {}, valid until {}",
                r.name,
                r.cert.display(),
                r.serial,
                r.not_after
            );
            print_revoked_previous(&r);
            println!("give it these and {}", dir.dir.join(certs::CA_CERT).display());
        }
        CertsCommand::Sign { dir, csr, days, force } => {
            let r = certs::sign(&dir.dir, &csr, days, force)?;
            println!("client {:?}: {}, serial {}, valid until {}", r.name, r.cert.display(), r.serial, r.not_after);
            print_revoked_previous(&r);
            println!("give it this and {}", dir.dir.join(certs::CA_CERT).display());
        }
        CertsCommand::Revoke { dir, name, serial } => {
            let (r, what) = match (name, serial) {
                (Some(name), _) => (certs::revoke(&dir.dir, &name)?, format!("client {name:?}")),
                (None, Some(hex)) => {
                    let serial: certs::Serial = hex.parse()?;
                    (certs::revoke_serial(&dir.dir, &serial)?, format!("serial {serial}"))
                }
                (None, None) => anyhow::bail!("give --name or --serial"),
            };
            for s in &r.serials {
                println!("revoked serial {s} ({what}) in {}", r.path.display());
            }
            for s in &r.already {
                println!("serial {s} ({what}) was already revoked in {}", r.path.display());
            }
            if !r.was_issued {
                println!("note: {what} is not recorded in {} (revoked anyway)", dir.dir.join(certs::ISSUED).display());
            }
        }
    }
    Ok(())
}

fn print_revoked_previous(r: &certs::IssuedClient) {
    for s in &r.revoked_previous {
        println!("revoked its earlier certificate, serial {s}");
    }
}

async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = ServerConfig::load(config_path)?;
    let prepared = config.prepare()?;
    match &prepared.resumed_from {
        Some(path) => info!("resumed at round {} from {}", prepared.start_round, path.display()),
        None => info!("fresh federation in {}: initial pool written as round 0", config.state_dir.display()),
    }
    let server = Server::start(prepared.net, prepared.engine, prepared.store, Metrics::new()).await?;
    write_addr(&config.state_dir.join(LISTEN_ADDR_FILE), &server.local_addr().to_string())?;
    if let Some(m) = server.metrics_addr() {
        write_addr(&config.state_dir.join(METRICS_ADDR_FILE), &m.to_string())?;
    }
    let stop = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received: shutting down");
        stop.shutdown();
    });
    match server.wait().await? {
        Outcome::Finished(r) => info!("finished: {r} rounds committed"),
        Outcome::ShutDown(r) => info!("stopped in round {r}"),
    }
    Ok(())
}

fn write_addr(path: &Path, addr: &str) -> anyhow::Result<()> {
    fedpool_common::checkpoint::atomic_write(path, format!("{addr}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Resolves on SIGINT or SIGTERM. A signal that cannot be listened for is logged and ignored
/// (never mistaken for a request to stop).
async fn wait_for_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

/// `fedpool-server report`: the round log as a table on stdout.
fn report(state: &Path) -> anyhow::Result<()> {
    let path = state.join(fedpool_server::store::ROUND_LOG);
    let records = fedpool_server::store::read_round_log(&path)?;
    print!("{}", fedpool_server::report::round_table(&records));
    Ok(())
}
