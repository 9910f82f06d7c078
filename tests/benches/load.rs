//! Whole-system load benchmark over real QUIC with mutual TLS on loopback (issue 16, finding
//! 11): for each client count, a fresh federation of the tiny model, the `fedpool-server` binary
//! as a process, and that many lightweight protocol clients in this process
//! (`fedpool_tests::load`) through the rounds; prints a markdown table of the round seconds, the
//! server's peak RSS (`VmHWM`) and the clients' enrollment latencies (connect + `Enroll` →
//! `Welcome`).
//!
//! ```text
//! cargo bench -p fedpool-tests --bench load                 # 50, 200, 500 clients, 3 rounds
//! cargo bench -p fedpool-tests --bench load -- 1000         # other client counts
//! FEDPOOL_LOAD_ROUNDS=5 cargo bench -p fedpool-tests --bench load
//! ```

use fedpool_tests::load::{self, LoadConfig};

fn main() {
    // `cargo bench` passes `--bench`; numbers are client counts.
    let mut counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if counts.is_empty() {
        counts = vec![50, 200, 500];
    }
    let rounds = std::env::var("FEDPOOL_LOAD_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let limit = std::process::Command::new("sh").args(["-c", "ulimit -n"]).output().ok();
    let fds = limit.map_or("?".to_string(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    println!("machine: {} (ulimit -n {fds})", load::machine());
    println!(
        "command: cargo bench -p fedpool-tests --bench load -- {} (rounds {rounds})",
        counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
    );
    println!("server: fedpool-server as a process; clients: one process, one connection and UDP socket each\n");
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &n in &counts {
        let config = LoadConfig::new(n, rounds);
        eprintln!("load: {n} clients, {rounds} rounds…");
        let (run, _fed) = load::run(&config);
        eprintln!("load: {}", run.summary());
        let secs = run.round_seconds();
        let ms = |p: f64| run.report.enroll_percentile(p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        let mean = if secs.is_empty() { f64::NAN } else { secs.iter().sum::<f64>() / secs.len() as f64 };
        let max = secs.iter().copied().fold(f64::NAN, f64::max);
        let problems = run.problems();
        let retries: usize = run.report.connect_retries.values().sum();
        let drops = run.udp_receive_buffer_drops.map_or("?".to_string(), |d| d.to_string());
        rows.push(format!(
            "| {n} | {}/{rounds} | {mean:.2} | {max:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} | {retries} | {drops} | {} |",
            run.rounds.len(),
            run.server_peak_rss as f64 / (1024.0 * 1024.0),
            ms(50.0),
            ms(99.0),
            ms(100.0),
            run.report.updates_acked,
            run.report.tasks,
            if problems.is_empty() { "ok".to_string() } else { format!("{} problem(s), see below", problems.len()) },
        ));
        for (why, count) in &run.report.connect_retries {
            notes.push(format!("- N = {n}: {count} failed connect/enroll attempt(s): {why}"));
        }
        if !problems.is_empty() {
            for w in run.server_warnings(10) {
                notes.push(format!("- N = {n}: server log: {w}"));
            }
        }
        for p in problems {
            notes.push(format!("- N = {n}: {p}"));
        }
    }
    println!(
        "| N | rounds committed | round s (mean) | round s (max) | server peak RSS MiB | enroll p50 ms | enroll p99 ms \
         | enroll max ms | updates acked/tasks | failed connect attempts | UDP rcvbuf drops | status |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    if !notes.is_empty() {
        println!();
        for n in notes {
            println!("{n}");
        }
    }
}
