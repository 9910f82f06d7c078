//! A worker's side (`fedpool-sim worker`): connect, load the coordinator's experiment, hold a
//! shard of its clients as [`LocalClients`] and serve the coordinator's requests until the run
//! is over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedpool_transport::close;
use quinn::{Connection, RecvStream, SendStream};

use super::link::{self, read_request, send_reply};
use super::wire::{Reply, Request, Setup};
use super::DistributedError;
use crate::clients::{ClientSide, LocalClients, PopulationInfo, TrainStats, Work};
use crate::error::SimError;
use crate::experiment::Experiment;
use crate::population::Population;

/// Who a worker is and where its coordinator is.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's `HOST:PORT`.
    pub coordinator: String,
    /// The name on the coordinator's certificate (default: `HOST`).
    pub server_name: Option<String>,
    /// The certificate folder: `ca.pem`, `clients/NAME.pem`, `clients/NAME.key`.
    pub certs: PathBuf,
    /// This worker's name (its certificate's subject).
    pub name: String,
    /// The device to train on, over the experiment's.
    pub device: Option<String>,
    /// How long to wait for the certificates and the coordinator.
    pub wait: Duration,
}

/// What a worker did.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSummary {
    /// Clients it held.
    pub clients: usize,
    /// Its local training.
    pub stats: TrainStats,
    /// The population it loaded (its description names the device).
    pub description: String,
}

/// Runs a worker to the end of the run.
pub fn run_worker(options: &WorkerOptions) -> Result<WorkerSummary, DistributedError> {
    let rt = link::runtime()?;
    let deadline = std::time::Instant::now() + options.wait;
    wait_for_certificates(options, deadline)?;
    let (conn, mut send, mut recv) = rt.block_on(connect(options, deadline))?;
    tracing::info!(worker = %options.name, coordinator = %options.coordinator, "connected");
    let software = format!("fedpool-sim {}", env!("CARGO_PKG_VERSION"));
    rt.block_on(send_reply(&mut send, &Reply::Hello { software }))?;
    let setup = match rt.block_on(read_request(&mut recv))? {
        Some(Request::Setup(setup)) => setup,
        other => {
            return Err(DistributedError::Protocol {
                peer: "the coordinator".into(),
                problem: format!("its first request was {:?}, not a setup", other.map(|r| kind(&r))),
            })
        }
    };
    let mut link = Link { rt: &rt, send: &mut send };
    let exp_pop = load(&setup, options);
    let (exp, pop) = match exp_pop {
        Ok(v) => v,
        Err(e) => {
            link.reply(&Reply::Failed(e.to_string()))?;
            link.wait_closed(&conn);
            return Err(e);
        }
    };
    tracing::info!(worker = %options.name, "{}", pop.description);
    let shard = setup.sharding.shard(pop.clients.len(), setup.workers as usize, setup.index as usize);
    let mut clients = LocalClients::new(&exp, &pop, Some(&shard))?;
    let held: Vec<u32> = shard.iter().map(|&c| c as u32).collect();
    link.reply(&Reply::Ready { info: PopulationInfo::of(&pop), held })?;
    loop {
        let request = match rt.block_on(read_request(&mut recv)) {
            Ok(Some(r)) => r,
            // The coordinator is gone (or closed the link): nothing more to do.
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(worker = %options.name, "the link to the coordinator ended: {e}");
                return Err(e);
            }
        };
        match serve(&mut link, &mut clients, request) {
            Ok(Served::More) => {}
            Ok(Served::Finished) => {
                link.wait_closed(&conn);
                break;
            }
            Err(e) => {
                let _ = link.reply(&Reply::Failed(e.to_string()));
                link.wait_closed(&conn);
                return Err(e.into());
            }
        }
    }
    Ok(WorkerSummary { clients: shard.len(), stats: clients.stats(), description: pop.description.clone() })
}

/// The experiment as the coordinator sent it (this worker's device over its own), and its
/// population.
fn load(setup: &Setup, options: &WorkerOptions) -> Result<(Experiment, Population), DistributedError> {
    let mut exp = Experiment::parse(&setup.experiment, &setup.base_dir, &setup.origin).map_err(SimError::from)?;
    if let Some(device) = &options.device {
        exp.device = device.clone();
    }
    let pop = Population::load(&exp).map_err(SimError::from)?;
    Ok((exp, pop))
}

/// The send side of the link, from synchronous code.
struct Link<'r> {
    rt: &'r tokio::runtime::Runtime,
    send: &'r mut SendStream,
}

impl Link<'_> {
    fn reply(&mut self, reply: &Reply) -> Result<(), DistributedError> {
        self.rt.block_on(send_reply(self.send, reply))
    }

    /// Ends this side's stream and waits (briefly) for the coordinator to close the connection,
    /// so the last replies are read before the connection goes.
    fn wait_closed(&mut self, conn: &Connection) {
        let _ = self.send.finish();
        let _ = self.rt.block_on(async { tokio::time::timeout(2 * link::IDLE_TIMEOUT, conn.closed()).await });
    }
}

enum Served {
    More,
    Finished,
}

fn serve(link: &mut Link<'_>, clients: &mut LocalClients<'_>, request: Request) -> Result<Served, SimError> {
    match request {
        Request::Setup(_) => {
            return Err(DistributedError::Protocol {
                peer: "the coordinator".into(),
                problem: "a second setup on one link".into(),
            }
            .into())
        }
        Request::Enroll => {
            let list = clients.enroll()?.into_iter().map(|(c, e)| (c as u32, e)).collect();
            link.reply(&Reply::Enrolled(list))?;
        }
        Request::Answers(answers) => {
            for (c, answer) in answers {
                clients.answer(c as usize, answer)?;
            }
        }
        Request::Train(batch) => {
            let tasks = batch.into_tasks().map_err(|e| bad_request(e.to_string()))?;
            let indices: Vec<u32> = tasks.iter().map(|(i, _, _)| *i as u32).collect();
            let work: Vec<Work> =
                tasks.into_iter().map(|(_, client, task)| Work { client, task: Box::new(task) }).collect();
            clients.train(&work, &mut |i, trained| {
                link.reply(&Reply::Trained { index: indices[i], trained })?;
                Ok(())
            })?;
            link.reply(&Reply::Done)?;
        }
        Request::Evaluate(batch) => {
            let tasks = batch.into_tasks().map_err(|e| bad_request(e.to_string()))?;
            let indices: Vec<u32> = tasks.iter().map(|(i, _, _)| *i as u32).collect();
            let evals: Vec<_> = tasks.into_iter().map(|(_, client, task)| (client, Box::new(task))).collect();
            let reports = clients.evaluate(&evals)?;
            for (index, report) in indices.into_iter().zip(reports) {
                if let Some(report) = report {
                    link.reply(&Reply::Evaluated { index, report })?;
                }
            }
            link.reply(&Reply::Done)?;
        }
        Request::EvaluateGlobal(pool) => {
            let metrics = clients.evaluate_global(&pool.into())?;
            link.reply(&Reply::GlobalMetrics(metrics))?;
        }
        Request::Finish => {
            let norms = clients.residual_norms()?;
            let residuals = clients.held().into_iter().map(|c| (c as u32, norms[c])).collect();
            let peak_rss_mib = fedpool_client::malloc::peak_rss_mib();
            link.reply(&Reply::Finished { residuals, stats: clients.stats(), peak_rss_mib })?;
            return Ok(Served::Finished);
        }
    }
    Ok(Served::More)
}

fn bad_request(problem: String) -> SimError {
    DistributedError::Protocol { peer: "the coordinator".into(), problem }.into()
}

fn kind(request: &Request) -> &'static str {
    match request {
        Request::Setup(_) => "Setup",
        Request::Enroll => "Enroll",
        Request::Answers(_) => "Answers",
        Request::Train(_) => "Train",
        Request::Evaluate(_) => "Evaluate",
        Request::EvaluateGlobal(_) => "EvaluateGlobal",
        Request::Finish => "Finish",
    }
}

/// Waits until the CA and this worker's certificate and key exist (the coordinator may be
/// making them on a shared filesystem right now).
fn wait_for_certificates(options: &WorkerOptions, deadline: std::time::Instant) -> Result<(), DistributedError> {
    let (cert, key) = link::worker_files(&options.certs, &options.name);
    let ca = options.certs.join(fedpool_server::certs::CA_CERT);
    loop {
        let missing = [&ca, &cert, &key].into_iter().find(|p| !p.is_file());
        let Some(missing) = missing else { return Ok(()) };
        if std::time::Instant::now() >= deadline {
            return Err(DistributedError::Io {
                path: missing.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "not there after {} s (the coordinator makes it at start, or `fedpool-sim certs` ahead of time)",
                        options.wait.as_secs()
                    ),
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Dials the coordinator until it answers or the deadline passes.
async fn connect(
    options: &WorkerOptions,
    deadline: std::time::Instant,
) -> Result<(Connection, SendStream, RecvStream), DistributedError> {
    let failed = |problem: String| DistributedError::Connect { addr: options.coordinator.clone(), problem };
    let host = options.coordinator.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or("");
    let server_name = options.server_name.clone().unwrap_or_else(|| host.to_string());
    let mut last = String::from("no attempt");
    loop {
        if std::time::Instant::now() >= deadline {
            return Err(failed(format!("gave up after {} s: {last}", options.wait.as_secs())));
        }
        match attempt(options, &server_name).await {
            Ok(v) => return Ok(v),
            Err(e @ (DistributedError::Tls(_) | DistributedError::Certs(_))) => return Err(e),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn attempt(
    options: &WorkerOptions,
    server_name: &str,
) -> Result<(Connection, SendStream, RecvStream), DistributedError> {
    let failed = |problem: String| DistributedError::Connect { addr: options.coordinator.clone(), problem };
    let addr: SocketAddr = tokio::net::lookup_host(&options.coordinator)
        .await
        .map_err(|e| failed(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| failed("resolves to no address".into()))?;
    let endpoint = link::client_endpoint(&options.certs, &options.name, addr)?;
    let connecting = endpoint.connect(addr, server_name).map_err(|e| failed(e.to_string()))?;
    let conn = tokio::time::timeout(link::IDLE_TIMEOUT, connecting)
        .await
        .map_err(|_| failed("no answer".into()))?
        .map_err(|e| match e {
            quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::REPLACED.into() => {
                failed("a worker of this name is already connected".into())
            }
            e => failed(e.to_string()),
        })?;
    let (send, recv) = conn.open_bi().await?;
    Ok((conn, send, recv))
}
