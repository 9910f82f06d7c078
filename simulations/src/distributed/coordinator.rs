//! The coordinator's side: [`RemoteClients`], the [`ClientSide`] whose clients live on workers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedpool_client::train::EvalMetrics;
use fedpool_common::adapter::AdapterPool;
use fedpool_common::wire::{Enroll, EvalReport, EvalTask};
use fedpool_server::certs;
use fedpool_transport::{close, tls};
use quinn::{Connection, RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::link::{self, read_reply, send_request};
use super::wire::{eval_batch, task_batch, Reply, Request, Setup};
use super::DistributedError;
use crate::clients::{Answer, ClientSide, OnTrained, PopulationInfo, TrainStats, Work};
use crate::error::SimError;
use crate::experiment::Experiment;

/// How the clients are dealt to the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Sharding {
    /// Worker k of n holds clients ⌊k·N/n⌋ .. ⌊(k+1)·N/n⌋ (contiguous, sizes within one).
    #[default]
    Blocks,
    /// Worker k of n holds the clients c with c mod n = k.
    RoundRobin,
}

impl Sharding {
    /// The clients (of `clients`) that worker `index` of `workers` holds.
    pub fn shard(self, clients: usize, workers: usize, index: usize) -> Vec<usize> {
        match self {
            Sharding::Blocks => (index * clients / workers..(index + 1) * clients / workers).collect(),
            Sharding::RoundRobin => (index..clients).step_by(workers.max(1)).collect(),
        }
    }
}

impl std::str::FromStr for Sharding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blocks" => Ok(Sharding::Blocks),
            "round-robin" => Ok(Sharding::RoundRobin),
            other => Err(format!("{other:?} is not a sharding (blocks, round-robin)")),
        }
    }
}

/// Where the coordinator listens and whom it waits for.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// The UDP address workers connect to.
    pub listen: SocketAddr,
    /// The certificate folder (made if it holds no CA; see [`link::prepare_certs`]).
    pub certs: PathBuf,
    /// Workers to wait for before the first round.
    pub workers: usize,
    /// Extra names for the coordinator's certificate (the host name workers dial).
    pub sans: Vec<String>,
    /// How long to wait for the workers.
    pub wait: Duration,
    /// How the clients are dealt.
    pub sharding: Sharding,
}

/// A worker that connected and said hello.
struct Joined {
    name: String,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
}

/// A worker's place: its name and shard, and its link while it lives.
struct Slot {
    name: String,
    index: usize,
    shard: Vec<usize>,
    link: Option<Live>,
    /// Answers for its clients, sent before its next request.
    answers: Vec<(u32, Answer)>,
}

struct Live {
    id: u64,
    conn: Connection,
    send: SendStream,
}

type ReplyFrom = (u64, Result<Reply, String>);

/// The coordinator's links to its workers (listening from [`Listening::listen`] on).
struct Links {
    rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    options: CoordinatorOptions,
    joins: mpsc::Receiver<Joined>,
    replies_tx: mpsc::Sender<ReplyFrom>,
    replies: mpsc::Receiver<ReplyFrom>,
    slots: Vec<Slot>,
    /// The first worker's population: every other must match it.
    reference: Option<PopulationInfo>,
    setup: Option<Setup>,
    next_link: u64,
}

/// A coordinator listening for its workers; [`Listening::start`] makes it a [`RemoteClients`].
pub struct Listening {
    links: Links,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening").field("addr", &self.links.addr).finish()
    }
}

/// What one worker did in a run, as it reported at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Its name.
    pub name: String,
    /// Clients it held.
    pub clients: usize,
    /// False for a worker lost before the end (its numbers are then unknown: zero).
    pub finished: bool,
    /// Its local training.
    pub stats: TrainStats,
    /// Its peak resident memory, MiB.
    pub peak_rss_mib: Option<f64>,
}

/// The clients of a simulation on worker processes (module documentation).
pub struct RemoteClients {
    links: Links,
    info: PopulationInfo,
    /// Client → its slot.
    owner: Vec<usize>,
    stats: TrainStats,
    reports: Vec<WorkerReport>,
}

impl std::fmt::Debug for RemoteClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteClients")
            .field("addr", &self.links.addr)
            .field("workers", &self.links.slots.len())
            .finish()
    }
}

impl Listening {
    /// Prepares the certificates and listens for workers (they may connect from now on).
    pub fn listen(options: CoordinatorOptions) -> Result<Self, DistributedError> {
        let issued = link::prepare_certs(&options.certs, options.workers, &options.sans)?;
        if !issued.is_empty() {
            tracing::info!("issued worker certificates {} in {}", issued.join(", "), options.certs.display());
        }
        let rt = link::runtime()?;
        let endpoint = {
            let _context = rt.enter();
            link::server_endpoint(&options.certs, options.listen)?
        };
        let addr = endpoint.local_addr().map_err(|source| DistributedError::Bind { addr: options.listen, source })?;
        let (joins_tx, joins) = mpsc::channel(64);
        rt.spawn(accept_loop(endpoint.clone(), joins_tx));
        let (replies_tx, replies) = mpsc::channel(64);
        tracing::info!("waiting for {} workers on {addr}", options.workers);
        let links = Links {
            rt,
            endpoint,
            addr,
            options,
            joins,
            replies_tx,
            replies,
            slots: Vec::new(),
            reference: None,
            setup: None,
            next_link: 0,
        };
        Ok(Listening { links })
    }

    /// The address workers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.links.addr
    }

    /// Waits for the workers, deals them the clients of `exp`, has each load the population and
    /// checks they all loaded the same one.
    pub fn start(mut self, exp: &Experiment) -> Result<RemoteClients, DistributedError> {
        let info = self.links.start(exp)?;
        let mut owner = vec![usize::MAX; info.names.len()];
        for (s, slot) in self.links.slots.iter().enumerate() {
            for &c in &slot.shard {
                if let Some(o) = owner.get_mut(c) {
                    *o = s;
                }
            }
        }
        if let Some(c) = owner.iter().position(|&s| s == usize::MAX) {
            return Err(DistributedError::Protocol {
                peer: "the workers".into(),
                problem: format!("no worker holds client {c}"),
            });
        }
        let shards: Vec<String> =
            self.links.slots.iter().map(|s| format!("{} holds {}", s.name, s.shard.len())).collect();
        tracing::info!("{} clients on {} workers: {}", info.names.len(), self.links.slots.len(), shards.join(", "));
        Ok(RemoteClients { links: self.links, info, owner, stats: TrainStats::default(), reports: Vec::new() })
    }
}

impl RemoteClients {
    /// The population the workers loaded (its description names the first worker's device).
    pub fn population(&self) -> &PopulationInfo {
        &self.info
    }

    fn live(&self, s: usize) -> bool {
        self.links.slots[s].link.is_some()
    }

    /// Each worker's report, once the run is over (empty before).
    pub fn reports(&self) -> &[WorkerReport] {
        &self.reports
    }
}

impl Links {
    fn start(&mut self, exp: &Experiment) -> Result<PopulationInfo, DistributedError> {
        let deadline = tokio::time::Instant::now() + self.options.wait;
        let mut joined: BTreeMap<String, Joined> = BTreeMap::new();
        while joined.len() < self.options.workers {
            let next = self.rt.block_on(async { tokio::time::timeout_at(deadline, self.joins.recv()).await });
            match next {
                Ok(Some(j)) if joined.contains_key(&j.name) => {
                    tracing::warn!(worker = %j.name, "a second worker of the same name: refused");
                    j.conn.close(close::REPLACED.into(), b"a worker of this name is connected");
                }
                Ok(Some(j)) => {
                    tracing::info!(worker = %j.name, from = %j.conn.remote_address(), "worker connected");
                    joined.insert(j.name.clone(), j);
                }
                Ok(None) | Err(_) => {
                    return Err(DistributedError::TooFewWorkers {
                        connected: joined.len(),
                        expected: self.options.workers,
                        seconds: self.options.wait.as_secs(),
                        listen: self.addr,
                    })
                }
            }
        }
        let mut names: Vec<String> = joined.keys().cloned().collect();
        names.sort_by_key(|n| natural_key(n));
        let base_dir = std::path::absolute(&exp.base_dir)
            .map_err(|source| DistributedError::Io { path: exp.base_dir.clone(), source })?;
        let text = exp.to_toml().map_err(|e| DistributedError::from(SimError::from(e)))?;
        self.setup = Some(Setup {
            experiment: text,
            origin: exp.origin.clone(),
            base_dir,
            workers: names.len() as u32,
            index: 0,
            sharding: self.options.sharding,
        });
        for (index, name) in names.iter().enumerate() {
            let Some(j) = joined.remove(name) else { continue };
            self.slots.push(Slot { name: name.clone(), index, shard: Vec::new(), link: None, answers: Vec::new() });
            self.attach(self.slots.len() - 1, j)?;
        }
        self.reference.clone().ok_or(DistributedError::NoWorkers)
    }

    /// Links slot `s` to a worker that just joined: its reader, its setup, its population checked
    /// against the first worker's.
    fn attach(&mut self, s: usize, j: Joined) -> Result<(), DistributedError> {
        let id = self.next_link;
        self.next_link += 1;
        let tx = self.replies_tx.clone();
        self.rt.spawn(read_replies(id, j.recv, tx));
        self.slots[s].link = Some(Live { id, conn: j.conn, send: j.send });
        let mut setup = self.setup.clone().ok_or(DistributedError::NoWorkers)?;
        setup.index = self.slots[s].index as u32;
        let name = self.slots[s].name.clone();
        if !self.send(s, &Request::Setup(setup)) {
            return Err(DistributedError::Protocol { peer: name, problem: "the link failed during setup".into() });
        }
        let (info, held) = match self.reply_of(s)? {
            Reply::Ready { info, held } => (info, held),
            other => return Err(unexpected(&name, &other, "Ready")),
        };
        match &self.reference {
            Some(reference) if !reference.same_clients(&info) => {
                return Err(DistributedError::Mismatch {
                    worker: name,
                    reference: self.slots[0].name.clone(),
                    what: describe_difference(reference, &info),
                });
            }
            Some(_) => {}
            None => self.reference = Some(info),
        }
        self.slots[s].shard = held.into_iter().map(|c| c as usize).collect();
        Ok(())
    }

    /// The next reply of slot `s`, which alone has a request outstanding (a reply of another
    /// slot would be dropped).
    fn reply_of(&mut self, s: usize) -> Result<Reply, DistributedError> {
        loop {
            let (from, reply) = self.next_reply()?;
            if from != s {
                continue;
            }
            return match reply {
                Ok(Reply::Failed(message)) => {
                    Err(DistributedError::WorkerFailed { worker: self.slots[s].name.clone(), message })
                }
                Ok(reply) => Ok(reply),
                Err(why) => {
                    let name = self.slots[s].name.clone();
                    self.lose(s, &why);
                    Err(DistributedError::Protocol { peer: name, problem: format!("the link failed: {why}") })
                }
            };
        }
    }

    /// The next reply of a live link, with its slot (replies of links already lost are dropped).
    fn next_reply(&mut self) -> Result<(usize, Result<Reply, String>), DistributedError> {
        loop {
            let (id, reply) = self.rt.block_on(self.replies.recv()).ok_or(DistributedError::NoWorkers)?;
            if let Some(s) = self.slots.iter().position(|slot| slot.link.as_ref().is_some_and(|l| l.id == id)) {
                return Ok((s, reply));
            }
        }
    }

    /// Sends `request` to slot `s`; false (and the worker lost) if its link failed.
    fn send(&mut self, s: usize, request: &Request) -> bool {
        let Some(live) = self.slots[s].link.as_mut() else { return false };
        match self.rt.block_on(send_request(&mut live.send, request)) {
            Ok(()) => true,
            Err(e) => {
                self.lose(s, &e.to_string());
                false
            }
        }
    }

    /// Slot `s`'s worker is gone: its clients answer nothing until a worker of its name returns.
    fn lose(&mut self, s: usize, why: &str) {
        let slot = &mut self.slots[s];
        if let Some(live) = slot.link.take() {
            live.conn.close(close::DROPPED.into(), b"lost");
            tracing::warn!(
                worker = %slot.name,
                "worker lost ({why}): its {} clients count as dropped from now on",
                slot.shard.len()
            );
        }
        slot.answers.clear();
    }

    /// Workers that connected since the last request: one whose name is a lost slot's takes it
    /// over (fresh participants); any other is refused.
    fn adopt_joins(&mut self) -> Result<(), DistributedError> {
        while let Ok(j) = self.joins.try_recv() {
            match self.slots.iter().position(|s| s.name == j.name) {
                Some(s) if self.slots[s].link.is_none() => {
                    tracing::info!(worker = %j.name, "worker back: it takes its {} clients over", self.slots[s].shard.len());
                    let shard = self.slots[s].shard.clone();
                    self.attach(s, j)?;
                    if self.slots[s].shard != shard {
                        return Err(DistributedError::Protocol {
                            peer: self.slots[s].name.clone(),
                            problem: "came back holding other clients".into(),
                        });
                    }
                }
                Some(_) => j.conn.close(close::REPLACED.into(), b"a worker of this name is connected"),
                None => {
                    tracing::warn!(worker = %j.name, "a worker this run does not know: refused");
                    j.conn.close(close::PROTOCOL.into(), b"not a worker of this run");
                }
            }
        }
        Ok(())
    }

    /// Sends each live worker the answers waiting for its clients.
    fn flush_answers(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s].answers.is_empty() {
                continue;
            }
            let answers = std::mem::take(&mut self.slots[s].answers);
            self.send(s, &Request::Answers(answers));
        }
    }

    /// Before a request: adopt returning workers, deliver answers.
    fn prepare(&mut self) -> Result<(), SimError> {
        self.adopt_joins()?;
        self.flush_answers();
        if self.slots.iter().all(|s| s.link.is_none()) {
            return Err(DistributedError::NoWorkers.into());
        }
        Ok(())
    }

    /// Waits for `Done` from every slot in `pending`, handing each other reply to `each`.
    fn gather(
        &mut self,
        mut pending: BTreeSet<usize>,
        mut each: impl FnMut(usize, Reply, &str) -> Result<(), SimError>,
    ) -> Result<(), SimError> {
        while !pending.is_empty() {
            let (s, reply) = self.next_reply()?;
            if !pending.contains(&s) {
                continue;
            }
            match reply {
                Ok(Reply::Done) => {
                    pending.remove(&s);
                }
                Ok(Reply::Failed(message)) => {
                    return Err(DistributedError::WorkerFailed { worker: self.slots[s].name.clone(), message }.into())
                }
                Ok(reply) => each(s, reply, &self.slots[s].name)?,
                Err(why) => {
                    self.lose(s, &why);
                    pending.remove(&s);
                }
            }
        }
        Ok(())
    }
}

impl ClientSide for RemoteClients {
    fn info(&self) -> &PopulationInfo {
        &self.info
    }

    fn enroll(&mut self) -> Result<Vec<(usize, Enroll)>, SimError> {
        // One worker at a time: `reply_of` expects the only request outstanding.
        let mut all = Vec::new();
        for s in 0..self.links.slots.len() {
            if !self.links.send(s, &Request::Enroll) {
                continue;
            }
            match self.links.reply_of(s)? {
                Reply::Enrolled(list) => all.extend(list.into_iter().map(|(c, e)| (c as usize, e))),
                other => return Err(unexpected(&self.links.slots[s].name, &other, "Enrolled").into()),
            }
        }
        all.sort_by_key(|(c, _)| *c);
        Ok(all)
    }

    fn train(&mut self, work: &[Work], done: &mut OnTrained<'_>) -> Result<(), SimError> {
        self.links.prepare()?;
        let t = Instant::now();
        let mut by_slot: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, w) in work.iter().enumerate() {
            let s = *self.owner.get(w.client).ok_or(SimError::UnknownClientIndex(w.client))?;
            if self.live(s) {
                by_slot.entry(s).or_default().push(i);
            }
        }
        let mut pending = BTreeSet::new();
        for (s, items) in by_slot {
            let batch = task_batch(items.iter().map(|&i| (i, work[i].client, work[i].task.as_ref())));
            if self.links.send(s, &Request::Train(batch)) {
                pending.insert(s);
            }
        }
        let owner = self.owner.clone();
        let mut samples = 0u64;
        self.links.gather(pending, |s, reply, name| match reply {
            Reply::Trained { index, trained } => {
                let i = index as usize;
                if work.get(i).is_none_or(|w| owner[w.client] != s) {
                    return Err(DistributedError::Protocol {
                        peer: name.to_string(),
                        problem: format!("answered work item {i}, which it was not given"),
                    }
                    .into());
                }
                samples += trained.samples;
                done(i, trained)
            }
            other => Err(unexpected(name, &other, "Trained").into()),
        })?;
        self.stats.samples += samples;
        self.stats.wall_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn answer(&mut self, client: usize, answer: Answer) -> Result<(), SimError> {
        let s = *self.owner.get(client).ok_or(SimError::UnknownClientIndex(client))?;
        if self.live(s) {
            self.links.slots[s].answers.push((client as u32, answer));
        }
        Ok(())
    }

    fn evaluate(&mut self, evals: &[(usize, Box<EvalTask>)]) -> Result<Vec<Option<EvalReport>>, SimError> {
        self.links.prepare()?;
        let mut by_slot: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, (c, _)) in evals.iter().enumerate() {
            let s = *self.owner.get(*c).ok_or(SimError::UnknownClientIndex(*c))?;
            if self.live(s) {
                by_slot.entry(s).or_default().push(i);
            }
        }
        let mut pending = BTreeSet::new();
        for (s, items) in by_slot {
            let batch = eval_batch(items.iter().map(|&i| (i, evals[i].0, evals[i].1.as_ref())));
            if self.links.send(s, &Request::Evaluate(batch)) {
                pending.insert(s);
            }
        }
        let mut reports: Vec<Option<EvalReport>> = vec![None; evals.len()];
        self.links.gather(pending, |_, reply, name| match reply {
            Reply::Evaluated { index, report } => match reports.get_mut(index as usize) {
                Some(slot) => {
                    *slot = Some(report);
                    Ok(())
                }
                None => Err(DistributedError::Protocol {
                    peer: name.to_string(),
                    problem: format!("answered evaluation {index}, which it was not given"),
                }
                .into()),
            },
            other => Err(unexpected(name, &other, "Evaluated").into()),
        })?;
        Ok(reports)
    }

    fn evaluate_global(&mut self, pool: &AdapterPool) -> Result<Option<EvalMetrics>, SimError> {
        self.links.prepare()?;
        let request = Request::EvaluateGlobal(pool.into());
        for s in 0..self.links.slots.len() {
            if !self.links.send(s, &request) {
                continue;
            }
            match self.links.reply_of(s) {
                Ok(Reply::GlobalMetrics(m)) => return Ok(m),
                Ok(other) => return Err(unexpected(&self.links.slots[s].name, &other, "GlobalMetrics").into()),
                // The worker died on it: the next one scores the pool.
                Err(DistributedError::Protocol { .. }) if !self.live(s) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DistributedError::NoWorkers.into())
    }

    fn residual_norms(&mut self) -> Result<Vec<f64>, SimError> {
        self.links.flush_answers();
        let mut norms = vec![0.0; self.owner.len()];
        self.reports.clear();
        for s in 0..self.links.slots.len() {
            let slot = &self.links.slots[s];
            let mut report = WorkerReport {
                name: slot.name.clone(),
                clients: slot.shard.len(),
                finished: false,
                stats: TrainStats::default(),
                peak_rss_mib: None,
            };
            if self.links.send(s, &Request::Finish) {
                match self.links.reply_of(s) {
                    Ok(Reply::Finished { residuals, stats, peak_rss_mib }) => {
                        for (c, norm) in residuals {
                            if let Some(n) = norms.get_mut(c as usize) {
                                *n = norm;
                            }
                        }
                        report = WorkerReport { finished: true, stats, peak_rss_mib, ..report };
                    }
                    Ok(other) => return Err(unexpected(&self.links.slots[s].name, &other, "Finished").into()),
                    Err(DistributedError::Protocol { .. }) if !self.live(s) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(live) = self.links.slots[s].link.take() {
                live.conn.close(close::FINISHED.into(), b"the run is over");
            }
            self.reports.push(report);
        }
        Ok(norms)
    }

    fn stats(&self) -> TrainStats {
        self.stats
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.endpoint.close(close::SHUTDOWN.into(), b"the coordinator stops");
        let endpoint = self.endpoint.clone();
        // Let the close frames go out before the runtime stops.
        let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await });
    }
}

fn unexpected(worker: &str, reply: &Reply, wanted: &str) -> DistributedError {
    let got = format!("{reply:?}");
    let got: String = got.chars().take(60).collect();
    DistributedError::Protocol { peer: worker.to_string(), problem: format!("sent {got}… where {wanted} was due") }
}

fn describe_difference(a: &PopulationInfo, b: &PopulationInfo) -> String {
    if a.fingerprint != b.fingerprint {
        "another backbone (its fingerprint differs)".into()
    } else if a.spec != b.spec {
        "another adapter layout".into()
    } else if a.names.len() != b.names.len() {
        format!("{} clients, not {}", b.names.len(), a.names.len())
    } else {
        "other client names (another partition)".into()
    }
}

/// Sorts `worker-2` before `worker-10`.
fn natural_key(name: &str) -> (String, u64) {
    let digits = name.chars().rev().take_while(char::is_ascii_digit).count();
    let (stem, number) = name.split_at(name.len() - digits);
    (stem.to_string(), number.parse().unwrap_or(0))
}

async fn accept_loop(endpoint: quinn::Endpoint, joins: mpsc::Sender<Joined>) {
    while let Some(incoming) = endpoint.accept().await {
        let joins = joins.clone();
        tokio::spawn(async move {
            match admit(incoming).await {
                Ok(joined) => {
                    let _ = joins.send(joined).await;
                }
                Err(e) => tracing::warn!("a worker connection refused: {e}"),
            }
        });
    }
}

/// The handshake (mutual TLS: the worker's certificate names it), its stream, its hello.
async fn admit(incoming: quinn::Incoming) -> Result<Joined, DistributedError> {
    let conn = incoming.await?;
    let peer = conn.remote_address().to_string();
    let protocol = |problem: String| DistributedError::Protocol { peer: peer.clone(), problem };
    let der = tls::peer_certificate(&conn).map_err(|e| protocol(e.to_string()))?;
    let name = certs::subject_common_name(&der)?;
    let hello = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let hello = read_reply(&mut recv).await?;
        Ok::<_, DistributedError>((send, recv, hello))
    };
    let (send, recv, hello) =
        tokio::time::timeout(link::IDLE_TIMEOUT, hello).await.map_err(|_| protocol("no hello in time".into()))??;
    match hello {
        Some(Reply::Hello { software }) => {
            tracing::debug!(worker = %name, %software, "hello");
            Ok(Joined { name, conn, send, recv })
        }
        other => Err(protocol(format!("its first frame was {other:?}, not a hello"))),
    }
}

async fn read_replies(id: u64, mut recv: RecvStream, tx: mpsc::Sender<ReplyFrom>) {
    loop {
        let item = match read_reply(&mut recv).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err("the worker closed its stream".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let end = item.is_err();
        if tx.send((id, item)).await.is_err() || end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sharding_deals_each_client_to_exactly_one_worker() {
        for sharding in [Sharding::Blocks, Sharding::RoundRobin] {
            for (clients, workers) in [(7, 1), (7, 2), (7, 3), (2, 3), (256, 3)] {
                let mut all: Vec<usize> = (0..workers).flat_map(|k| sharding.shard(clients, workers, k)).collect();
                all.sort_unstable();
                assert_eq!(all, (0..clients).collect::<Vec<_>>(), "{sharding:?} {clients}/{workers}");
            }
        }
        assert_eq!(Sharding::Blocks.shard(7, 3, 0), vec![0, 1]);
        assert_eq!(Sharding::RoundRobin.shard(7, 3, 0), vec![0, 3, 6]);
        assert_eq!(natural_key("worker-10").1, 10);
        assert!(natural_key("worker-2") < natural_key("worker-10"));
    }
}
