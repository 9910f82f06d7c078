//! The link between a simulation's coordinator and a worker: the project's own QUIC + mutual TLS
//! ([`fedpool_transport`]), certificates from the project's own CA ([`fedpool_server::certs`]),
//! one bidirectional stream per worker (opened by the worker), frames of [`super::wire`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpool_server::certs::{self, InitOptions, CA_CERT, SERVER_CERT, SERVER_KEY};
use fedpool_transport::framing;
use fedpool_transport::tls;
use quinn::{RecvStream, SendStream};

use super::wire::{Reply, Request, LIMITS};
use super::DistributedError;

/// A silent peer is taken for dead after this long (a killed worker, a lost host).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Each end sends a keep-alive this often, so a busy but live peer is never idle.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Days a worker certificate made at start is valid.
const WORKER_DAYS: u32 = 30;

/// The name of worker `i`'s certificate (its subject CN).
pub fn worker_name(i: usize) -> String {
    format!("worker-{i}")
}

/// A worker's certificate and key in the certificate folder `dir`.
pub fn worker_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let clients = dir.join("clients");
    (clients.join(format!("{name}.pem")), clients.join(format!("{name}.key")))
}

/// Makes what is missing in `dir`: the CA and the coordinator's certificate (names: localhost,
/// the loopback addresses, this host's name and `sans`), and certificates for workers
/// `worker-0` … `worker-(workers-1)`. What exists is kept (certificates given by an operator).
/// Returns the names issued now.
pub fn prepare_certs(dir: &Path, workers: usize, sans: &[String]) -> Result<Vec<String>, DistributedError> {
    if !dir.join(CA_CERT).is_file() {
        let mut names: Vec<String> = sans.to_vec();
        if let Some(host) = host_name() {
            names.push(host);
        }
        certs::init(dir, &InitOptions { sans: names, ca_name: "fedpool-sim CA".into(), ..InitOptions::default() })?;
    }
    let mut issued = Vec::new();
    for i in 0..workers {
        let name = worker_name(i);
        if !worker_files(dir, &name).0.is_file() {
            certs::issue(dir, &name, WORKER_DAYS, false)?;
            issued.push(name);
        }
    }
    Ok(issued)
}

/// This machine's host name, if it has one.
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The runtime a link's I/O runs on (two threads of its own, so keep-alives go out while the
/// caller's thread trains or merges).
pub fn runtime() -> Result<tokio::runtime::Runtime, DistributedError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fedpool-sim-link")
        .enable_all()
        .build()
        .map_err(|source| DistributedError::Io { path: "the link's runtime".into(), source })
}

/// The coordinator's endpoint on `listen`, admitting only certificates of the CA in `dir`.
pub fn server_endpoint(dir: &Path, listen: SocketAddr) -> Result<quinn::Endpoint, DistributedError> {
    let transport = tls::transport(IDLE_TIMEOUT, KEEP_ALIVE, true)?;
    let config = tls::server_config(&dir.join(CA_CERT), &dir.join(SERVER_CERT), &dir.join(SERVER_KEY), transport)?;
    quinn::Endpoint::server(config, listen).map_err(|source| DistributedError::Bind { addr: listen, source })
}

/// A worker's endpoint, presenting the certificate `name` from `dir`.
pub fn client_endpoint(dir: &Path, name: &str, remote: SocketAddr) -> Result<quinn::Endpoint, DistributedError> {
    let (cert, key) = worker_files(dir, name);
    let transport = tls::transport(IDLE_TIMEOUT, KEEP_ALIVE, false)?;
    let config = tls::client_config_from_files(&dir.join(CA_CERT), &cert, &key, transport)?;
    let local: SocketAddr = if remote.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| DistributedError::Protocol { peer: "this host".into(), problem: "no local address".into() })?;
    let mut endpoint =
        quinn::Endpoint::client(local).map_err(|source| DistributedError::Bind { addr: local, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Writes one request.
pub async fn send_request(send: &mut SendStream, request: &Request) -> Result<(), DistributedError> {
    let bytes = request.to_frame()?;
    framing::write_frame(send, &bytes).await.map_err(DistributedError::Link)
}

/// Writes one reply.
pub async fn send_reply(send: &mut SendStream, reply: &Reply) -> Result<(), DistributedError> {
    let bytes = reply.to_frame()?;
    framing::write_frame(send, &bytes).await.map_err(DistributedError::Link)
}

/// Reads one request; `None` when the coordinator closed the stream.
pub async fn read_request(recv: &mut RecvStream) -> Result<Option<Request>, DistributedError> {
    let Some(frame) = framing::read_frame(recv, &LIMITS).await? else { return Ok(None) };
    Ok(Some(Request::decode(frame.kind, &frame.body)?))
}

/// Reads one reply; `None` when the worker closed the stream.
pub async fn read_reply(recv: &mut RecvStream) -> Result<Option<Reply>, DistributedError> {
    let Some(frame) = framing::read_frame(recv, &LIMITS).await? else { return Ok(None) };
    Ok(Some(Reply::decode(frame.kind, &frame.body)?))
}
