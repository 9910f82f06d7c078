//! A simulation spread over worker processes (the real `fedpool-sim worker` binary, real QUIC
//! with mutual TLS on loopback) against the same experiment in one process:
//!
//! - 1, 2 and 3 workers, sharded in blocks or round-robin, give the same `rounds.csv` (wall time
//!   aside) and the same `rounds.jsonl` as one process — with a lossy upload codec (error
//!   feedback: acks reach the right participant) and a global test set (scored on a worker);
//! - a worker killed mid-run: its clients answer nothing (stragglers in `rounds.jsonl`), every
//!   round still commits with the other worker's clients, and a worker started again under the
//!   same name takes its clients back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use fedpool_server::round::RoundRecord;
use fedpool_sim::distributed::{CoordinatorOptions, Listening, Sharding};
use fedpool_sim::driver::{self, Progress, Quiet};
use fedpool_sim::experiment::Experiment;
use fedpool_sim::outputs::write_run;
use fedpool_sim::population::Population;

const SIM: &str = env!("CARGO_BIN_EXE_fedpool-sim");

/// A tiny model and a CSV of separable texts, in `dir`.
fn fixture(dir: &Path) {
    fedpool_client::testkit::write_tiny_model(&dir.join("model"), 5).unwrap();
    let mut csv = String::from("text,label\n");
    for (_, text, label) in fedpool_client::testkit::separable_texts(240, 2, 9) {
        csv.push_str(&format!("{text},{label}\n"));
    }
    std::fs::write(dir.join("data.csv"), csv).unwrap();
}

/// Six clients, int8 top-k uploads (residuals), a global test set; `federation` is the table.
fn experiment(dir: &Path, federation: &str) -> PathBuf {
    let text = format!(
        r#"name = "spread"
seed = 11
model = "model"
data = "data.csv"
clients = 6
test_fraction = 0.25
global_test = "unused:30"
max_examples_per_client = 30
[federation]
{federation}
[adapter]
kind = "ssf-pool"
pool_size = 4
top_k = 2
[train]
batch_size = 4
max_len = 32
lr = 0.01
[upload_codec]
quantization = "int8"
top_k = 0.25
"#
    );
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const FEDERATION: &str =
    "rounds = 3\nlocal_steps = 3\ndeadline_s = 60.0\nseconds_per_sample = 0.01\nclients_per_round = 4";

/// `rounds.csv` without its wall-clock seconds column.
fn without_wall_clock(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let wall = text.lines().next().unwrap().split(',').position(|c| c == "wall_seconds").unwrap();
    text.lines()
        .map(|l| l.split(',').enumerate().filter(|&(i, _)| i != wall).map(|(_, f)| f).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join("\n")
}

fn records(dir: &Path) -> Vec<RoundRecord> {
    std::fs::read_to_string(dir.join("rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn one_two_and_three_workers_give_the_rounds_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let config = experiment(dir.path(), FEDERATION);
    let exp = Experiment::load(&config).unwrap();
    let pop = Population::load(&exp).unwrap();
    let local = driver::run(&exp, &pop, &mut Quiet).unwrap();
    write_run(&dir.path().join("local"), &exp, &local).unwrap();
    let expected = without_wall_clock(&dir.path().join("local/rounds.csv"));
    assert_eq!(expected.lines().count(), 4, "{expected}");
    assert!(local.residual_norms.iter().any(|&n| n > 0.0), "the lossy codec leaves residuals");

    for (workers, sharding) in [(1, "blocks"), (2, "blocks"), (3, "round-robin")] {
        let out = dir.path().join(format!("w{workers}"));
        let status = Command::new(SIM)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .args(["--workers", &workers.to_string(), "--listen", "127.0.0.1:0", "--spawn-workers"])
            .args(["--sharding", sharding, "--wait-s", "60"])
            .status()
            .unwrap();
        assert!(status.success(), "{workers} workers: {status}");
        assert_eq!(without_wall_clock(&out.join("rounds.csv")), expected, "{workers} workers ({sharding})");
        assert_eq!(records(&out), records(&dir.path().join("local")), "{workers} workers: rounds.jsonl");
    }
}

/// Kills worker-1 when round `kill` starts training and starts it again when round `back` does.
struct Chaos {
    certs: PathBuf,
    addr: String,
    kill: u64,
    back: u64,
    victim: Option<Child>,
    revived: Option<Child>,
}

impl Progress for Chaos {
    fn phase(&mut self, round: u64, what: &str) {
        if !what.starts_with("training") {
            return;
        }
        if round == self.kill {
            if let Some(mut child) = self.victim.take() {
                child.kill().unwrap();
                child.wait().unwrap();
            }
        }
        if round == self.back && self.revived.is_none() {
            self.revived = Some(worker(&self.addr, &self.certs, "worker-1"));
            // Its handshake and setup are done before the next request to the workers.
            std::thread::sleep(Duration::from_secs(3));
        }
    }
}

fn worker(addr: &str, certs: &Path, name: &str) -> Child {
    Command::new(SIM)
        .args(["worker", "--coordinator", addr, "--certs"])
        .arg(certs)
        .args(["--name", name, "--wait-s", "60"])
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_worker_s_clients_are_dropped_the_rounds_commit_and_a_restarted_worker_takes_them_back() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let federation =
        "rounds = 5\nlocal_steps = 2\ndeadline_s = 60.0\nseconds_per_sample = 0.01\nclients_per_round = 6\nquorum = 2";
    let exp = Experiment::load(&experiment(dir.path(), federation)).unwrap();
    let certs = dir.path().join("certs");
    let listening = Listening::listen(CoordinatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        certs: certs.clone(),
        workers: 2,
        sans: Vec::new(),
        wait: Duration::from_secs(60),
        sharding: Sharding::Blocks,
    })
    .unwrap();
    let addr = format!("127.0.0.1:{}", listening.local_addr().port());
    let mut survivor = worker(&addr, &certs, "worker-0");
    let victim = worker(&addr, &certs, "worker-1");
    let mut clients = listening.start(&exp).unwrap();
    let names = clients.population().names.clone();
    // Blocks: worker-1 holds the second half.
    let victims: Vec<String> = names[3..].to_vec();
    let mut chaos = Chaos { certs, addr, kill: 2, back: 4, victim: Some(victim), revived: None };
    let out = driver::run_with(&exp, &mut clients, &mut chaos).unwrap();
    drop(clients);
    assert!(survivor.wait().unwrap().success());
    if let Some(mut revived) = chaos.revived.take() {
        assert!(revived.wait().unwrap().success());
    }

    let rounds: Vec<u64> = out.records.iter().map(|r| r.round).collect();
    assert_eq!(rounds, vec![1, 2, 3, 4, 5], "every round commits");
    for r in &out.records {
        let theirs = r.clients.iter().filter(|c| victims.contains(c)).count();
        let dropped = r.stragglers.iter().filter(|c| victims.contains(c)).count();
        match r.round {
            1 => assert_eq!((theirs, dropped), (3, 0), "round 1: {r:?}"),
            // Killed before round 2 trained, back before round 4 did.
            2 | 3 => assert_eq!((theirs, dropped), (0, 3), "round {}: {r:?}", r.round),
            _ => assert_eq!((theirs, dropped), (3, 0), "round {}: {r:?}", r.round),
        }
        assert!(r.clients.len() >= 3, "the survivor's clients count in round {}", r.round);
    }
    // The run's folder says so too.
    write_run(&dir.path().join("out"), &exp, &out).unwrap();
    let logged = records(&dir.path().join("out"));
    assert!(logged[1].stragglers.iter().filter(|c| victims.contains(c)).count() == 3, "{:?}", logged[1]);
}

fn listen(dir: &Path, workers: usize) -> Listening {
    Listening::listen(CoordinatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        certs: dir.join("certs"),
        workers,
        sans: Vec::new(),
        wait: Duration::from_secs(60),
        sharding: Sharding::Blocks,
    })
    .unwrap()
}

#[test]
fn a_worker_that_cannot_load_the_experiment_stops_the_start_naming_itself_and_why() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let exp = Experiment::load(&experiment(dir.path(), FEDERATION)).unwrap();
    let listening = listen(dir.path(), 1);
    let addr = format!("127.0.0.1:{}", listening.local_addr().port());
    let mut child = Command::new(SIM)
        .args(["worker", "--coordinator", &addr, "--certs"])
        .arg(dir.path().join("certs"))
        .args(["--name", "worker-0", "--device", "no-such-device", "--wait-s", "60"])
        .spawn()
        .unwrap();
    let e = listening.start(&exp).unwrap_err().to_string();
    assert!(e.contains("worker-0") && e.contains("no-such-device"), "{e}");
    assert!(!child.wait().unwrap().success(), "the worker says it failed");
}

#[test]
fn a_worker_that_loaded_another_population_is_refused_naming_what_differs() {
    use fedpool_sim::clients::PopulationInfo;
    use fedpool_sim::distributed::link;
    use fedpool_sim::distributed::wire::{Reply, Request};

    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let exp = Experiment::load(&experiment(dir.path(), FEDERATION)).unwrap();
    let listening = listen(dir.path(), 2);
    let port = listening.local_addr().port();
    let honest = worker(&format!("127.0.0.1:{port}"), &dir.path().join("certs"), "worker-0");
    // worker-1 speaks the protocol but claims clients of another partition.
    let mut info = PopulationInfo::of(&Population::load(&exp).unwrap());
    info.names.reverse();
    let certs = dir.path().join("certs");
    let liar = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let endpoint = link::client_endpoint(&certs, "worker-1", addr).unwrap();
            let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            link::send_reply(&mut send, &Reply::Hello { software: "liar".into() }).await.unwrap();
            let Some(Request::Setup(setup)) = link::read_request(&mut recv).await.unwrap() else { panic!("no setup") };
            let held = (3..6).collect();
            assert_eq!(setup.index, 1);
            link::send_reply(&mut send, &Reply::Ready { info, held }).await.unwrap();
            let _ = conn.closed().await;
        });
    });
    let e = listening.start(&exp).unwrap_err().to_string();
    assert!(e.contains("worker-1") && e.contains("other client names"), "{e}");
    liar.join().unwrap();
    let mut honest = honest;
    let _ = honest.kill();
    let _ = honest.wait();
}
