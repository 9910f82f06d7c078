//! Load over real QUIC with mutual TLS on loopback (issue 16, finding 11): 100 lightweight
//! protocol clients, each its own certificate and connection, against the `fedpool-server`
//! binary through 3 rounds of the tiny model (`fedpool_tests::load`). Every client enrolls, every
//! round commits at its first attempt with at least the quorum, every committed update is
//! acknowledged, nothing is refused, and the server's peak RSS stays under a bound that does not
//! depend on the client count. Timings are printed, not asserted (the benchmark
//! `cargo bench -p fedpool-tests --bench load` tabulates them for 50, 200 and 500 clients).

use fedpool_tests::load::{self, LoadConfig};

/// The server's peak RSS bound. The server holds per client a connection's state and the
/// round's bookkeeping; its peak at 500 clients (README benchmark) is well under this too.
const SERVER_PEAK_RSS_BOUND: u64 = 256 << 20;

#[test]
fn a_hundred_quic_clients_enroll_and_every_round_commits_with_bounded_server_memory() {
    let config = LoadConfig::new(100, 3);
    let (run, _fed) = load::run(&config);
    eprintln!("load: {}", run.summary());
    let report = &run.report;
    assert_eq!(report.enrolled, 100, "every client enrolled: {:?}", report.enroll_failures);
    assert_eq!(run.rounds.len(), 3, "every round committed: {:?}\n{}", run.rounds, run.server_log);
    for round in &run.rounds {
        let clients = round["clients"].as_array().map_or(0, Vec::len);
        assert!(clients >= config.quorum, "round {} with {clients} clients < quorum {}", round["round"], config.quorum);
    }
    assert_eq!(report.tasks, run.committed_updates() + report.rejects.values().sum::<usize>(), "{report:?}");
    assert_eq!(report.updates_acked, run.committed_updates(), "every committed update acknowledged: {report:?}");
    assert!(report.rejects.is_empty(), "no honest update refused: {:?}", report.rejects);
    assert!(report.update_errors.is_empty(), "no exchange lost: {:?}", report.update_errors);
    assert_eq!(report.evals_acked, report.eval_tasks, "every evaluation report acknowledged: {report:?}");
    assert!(report.heartbeats > 0, "heartbeats answered");
    assert!(run.server_finished, "the server finished its rounds:\n{}", run.server_log);
    assert!(run.server_peak_rss > 0, "the server's VmHWM was read");
    assert!(
        run.server_peak_rss < SERVER_PEAK_RSS_BOUND,
        "server peak RSS {} MiB ≥ {} MiB",
        run.server_peak_rss >> 20,
        SERVER_PEAK_RSS_BOUND >> 20
    );
}
