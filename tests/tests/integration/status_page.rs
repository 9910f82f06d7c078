//! The coordinator's status page (`GET /` on `metrics_listen`) of a real federation — the
//! `fedpool-server` and three `fedpool-client` binaries on the tiny model over QUIC, plus a
//! hostile peer whose software string is markup — loaded over plain HTTP and in a real headless
//! Chromium: the rendered DOM shows the round, the phase, the clients, every committed round's
//! accuracy from `rounds.jsonl` and one chart point per committed round; the hostile string is
//! text, not markup; a screenshot is a non-empty PNG.
//!
//! Chromium (`/usr/bin/chromium`, or `FEDPOOL_CHROMIUM`) is required: without it the test fails
//! saying so, unless `FEDPOOL_SKIP_BROWSER=1`, which checks the HTML over plain HTTP only and
//! prints that the browser part was skipped. `FEDPOOL_STATUS_SCREENSHOT=PATH` keeps the
//! screenshot there (README's docs/status/status-page.png came from such a run).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedpool_client::session::connection::{Dialer, Faults};
use fedpool_common::wire::{ClientMessage, Enroll, RejectReason, ServerMessage, PROTOCOL_VERSION};
use fedpool_common::BackboneFingerprint;
use fedpool_tests::{binary, Federation, Proc};

const LONG: Duration = Duration::from_secs(120);

/// What the hostile peer says it runs: markup and a script, which must stay text.
const HOSTILE: &str = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";

/// `GET path` over plain HTTP/1.1: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (code, body)
}

/// The rounds of the `data-round` attributes of the chart's markers (`class="point…"`), in
/// document order.
fn chart_points(html: &str) -> Vec<u64> {
    html.split("<circle class=\"point")
        .skip(1)
        .map(|p| {
            let at = p.find("data-round=\"").expect("a marker without data-round") + "data-round=\"".len();
            p[at..].split('"').next().and_then(|n| n.parse().ok()).expect("a round number")
        })
        .collect()
}

/// The `<tr>` of the rounds table for `round`.
fn round_row(html: &str, round: u64) -> &str {
    let start = html
        .find(&format!("<tr class=\"round\" data-round=\"{round}\">"))
        .unwrap_or_else(|| panic!("no table row for round {round}:\n{html}"));
    let row = &html[start..];
    &row[..row.find("</tr>").expect("the row ends")]
}

/// The Chromium binary: `FEDPOOL_CHROMIUM` (none if it names no file), else `/usr/bin/chromium`,
/// else `chromium` on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FEDPOOL_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let fixed = PathBuf::from("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("chromium")).find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `extra` arguments (its own fresh profile folder under
/// `dir`), at most 90 s; returns its stdout.
fn run_chromium(bin: &Path, dir: &Path, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir_in(dir).expect("a profile folder");
    let stderr = dir.join("chromium.log");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("chromium log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if t.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s:\n{}", std::fs::read_to_string(&stderr).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("stdout reader");
    assert!(status.success(), "chromium failed ({status}):\n{}", std::fs::read_to_string(&stderr).unwrap_or_default());
    out
}

/// A peer with a valid certificate that enrolls for another pool spec, saying it runs
/// [`HOSTILE`]: the server refuses it (`SpecMismatch`), and its words reach the status page.
fn hostile_peer(fed: &Federation, server: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dialer = Dialer::new(
            &fed.path("certs/ca.pem"),
            &fed.path("certs/clients/mallory.pem"),
            &fed.path("certs/clients/mallory.key"),
            "localhost",
            Duration::from_secs(10),
        )
        .expect("dialer");
        let conn = dialer.connect(server, None, Faults::default()).await.expect("connect");
        let mut spec = fed.spec.clone();
        spec.top_k = 1;
        let enroll = Enroll {
            protocol_version: PROTOCOL_VERSION,
            backbone: BackboneFingerprint::of_model_dir(&fed.path("model")).expect("fingerprint"),
            spec_hash: spec.hash(),
            declared_upload_bps: None,
            declared_download_bps: None,
            examples: 10,
            software: HOSTILE.into(),
        };
        match conn.exchange(&ClientMessage::Enroll(enroll)).await {
            Ok(ServerMessage::Reject(r)) => assert_eq!(r.reason, RejectReason::SpecMismatch, "{r:?}"),
            other => panic!("expected a SpecMismatch refusal, got {other:?}"),
        }
    });
}

#[test]
fn the_status_page_of_a_real_federation_renders_in_headless_chromium() {
    let skip_browser = std::env::var("FEDPOOL_SKIP_BROWSER").is_ok_and(|v| v == "1");
    let browser = chromium();
    assert!(
        browser.is_some() || skip_browser,
        "chromium is not installed: this test loads the status page in a real headless browser. Install it \
         (`apt-get install -y --no-install-recommends chromium`; .ci/run does), point FEDPOOL_CHROMIUM at one, \
         or set FEDPOOL_SKIP_BROWSER=1 to check the HTML over plain HTTP only"
    );

    let names = ["alpha", "beta", "gamma"];
    let fed = Federation::new(&names);
    fed.add_client("mallory", 9);
    // Round after round until gamma stops: then no round can start (min_clients_to_start 3), and
    // the page stands still for the checks.
    fed.write_server_config(
        20,
        3,
        3,
        "5s",
        "min_clients_to_start = 3\neval_deadline = \"5s\"\nmetrics_listen = \"127.0.0.1:0\"",
    );
    for n in names {
        fed.write_client_config(n, "model", "quantization = \"int8\"\ntop_k = 0.5");
    }
    let server = Proc::start(
        &binary("fedpool-server"),
        &["run", "--config", "server.toml"],
        fed.dir.path(),
        fed.path("server.log"),
        &[],
    );
    let read_addr = |file: &str| -> SocketAddr {
        let t = Instant::now();
        loop {
            if let Some(a) = std::fs::read_to_string(fed.state().join(file)).ok().and_then(|s| s.trim().parse().ok()) {
                return a;
            }
            assert!(t.elapsed() < LONG, "no {file}:\n{}", server.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let quic = read_addr("listen.addr");
    let status = read_addr("metrics.addr");

    // Before any client: the page of an empty federation.
    let (code, empty) = http_get(status, "/");
    assert_eq!(code, 200, "{empty}");
    assert!(empty.contains("round 1 of 20") && empty.contains("No round committed yet."), "{empty}");
    assert_eq!(chart_points(&empty), Vec::<u64>::new());
    assert_eq!(http_get(status, "/nothing-here").0, 404);
    assert!(http_get(status, "/metrics").1.contains("\nfedpool_round 0\n"), "GET /metrics is unchanged");

    hostile_peer(&fed, quic);
    let mut clients: Vec<Proc> = names
        .iter()
        .map(|n| {
            let config = format!("{n}.toml");
            let log = fed.path(&format!("{n}.log"));
            Proc::start(&binary("fedpool-client"), &["run", "--config", &config], fed.dir.path(), log, &[])
        })
        .collect();
    fed.wait_rounds(2, true, LONG);

    // Stop gamma (SIGTERM: it closes its connection), then wait for the federation to stand still.
    let gamma = &mut clients[2];
    let term = Command::new("kill").args(["-TERM", &gamma.child.id().to_string()]).status();
    assert!(term.is_ok_and(|s| s.success()), "kill -TERM gamma");
    assert!(gamma.wait_exit(Duration::from_secs(30)), "gamma stops on SIGTERM:\n{}", gamma.log_text());
    let t = Instant::now();
    let html = loop {
        let (code, html) = http_get(status, "/");
        assert_eq!(code, 200);
        let gamma_gone = html.contains(
            "<td class=\"name\">gamma</td><td><span class=\"state state-lost\">enrolled, disconnected</span>",
        );
        if gamma_gone && html.contains("<span class=\"phase phase-waiting-to-train\" id=\"phase\">") {
            break html;
        }
        assert!(t.elapsed() < LONG, "the federation did not come to wait for gamma:\n{html}\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    let rounds = fed.rounds();
    assert_eq!(fed.rounds(), rounds, "the round log stands still");
    let committed: Vec<u64> = rounds.iter().map(|r| r["round"].as_u64().expect("round")).collect();
    assert!(committed.len() >= 2, "{rounds:?}");
    let next = committed.len() as u64 + 1;

    // Over plain HTTP: one chart point per committed round of rounds.jsonl, each round's accuracy.
    let check = |html: &str, how: &str| {
        assert_eq!(chart_points(html), committed, "{how}: one chart point per committed round, in order");
        assert_eq!(html.matches("class=\"point pending\"").count(), 0, "{how}: every round is evaluated");
        for r in &rounds {
            let round = r["round"].as_u64().expect("round");
            let accuracy = r["eval"]["accuracy"].as_f64().expect("an evaluated round has an accuracy");
            let f1 = r["eval"]["macro_f1"].as_f64().expect("macro-F1");
            let row = round_row(html, round);
            assert!(row.contains(&format!("{:.2}%", 100.0 * accuracy)), "{how}: round {round}'s accuracy in {row}");
            assert!(row.contains(&format!("{:.2}%", 100.0 * f1)), "{how}: round {round}'s macro-F1 in {row}");
            assert!(
                html.contains(&format!("data-round=\"{round}\" data-accuracy=\"{accuracy:.4}\"")),
                "{how}: round {round}'s chart point sits at its accuracy"
            );
        }
        assert!(html.contains(&format!("round {next} of 20")), "{how}: the current round:\n{html}");
        assert!(html.contains("waiting to train (needs 3 connected clients)"), "{how}: the phase:\n{html}");
        for n in ["alpha", "beta"] {
            assert!(
                html.contains(&format!(
                    "<td class=\"name\">{n}</td><td><span class=\"state state-connected\">connected</span></td>\
                     <td class=\"software\">fedpool-client "
                )),
                "{how}: {n} is connected, with its software:\n{html}"
            );
        }
        assert!(html.contains("<td class=\"name\">mallory</td>"), "{how}: the refused peer is listed");
        assert!(html.contains("data-reason=\"spec_mismatch\""), "{how}: its refusal is counted");
        assert!(html.contains(" s ago</td>"), "{how}: last-heard times are relative");
        // The hostile software string is text: escaped, and nothing of it became an element.
        assert!(html.contains("&lt;script&gt;document.title="), "{how}: the software string is shown as text");
        assert!(!html.contains("<script") && !html.contains("<img"), "{how}: markup from a peer on the page:\n{html}");
        assert!(html.contains("<title>fedpool · round"), "{how}: the title is the page's own");
    };
    check(&html, "HTTP");

    let Some(browser) = browser else {
        println!("FEDPOOL_SKIP_BROWSER=1: the browser part was skipped (the HTML was checked over plain HTTP)");
        return;
    };
    let url = format!("http://{status}/");
    let dom = run_chromium(&browser, fed.dir.path(), &url, &["--dump-dom".to_string()]);
    assert!(dom.contains("<svg class=\"chart\""), "the DOM Chromium rendered:\n{dom}");
    check(&dom, "Chromium's DOM");

    let shot = fed.path("status-page.png");
    run_chromium(
        &browser,
        fed.dir.path(),
        &url,
        &[format!("--screenshot={}", shot.display()), "--window-size=1200,1400".into(), "--hide-scrollbars".into()],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    assert!(png.len() > 20_000, "a screenshot of a whole page, not a blank one: {} bytes", png.len());
    let width = u32::from_be_bytes(png[16..20].try_into().expect("IHDR width"));
    let height = u32::from_be_bytes(png[20..24].try_into().expect("IHDR height"));
    assert_eq!((width, height), (1200, 1400), "the window size");
    if let Some(keep) = std::env::var_os("FEDPOOL_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, &keep).expect("copy the screenshot");
        println!("screenshot kept at {}", Path::new(&keep).display());
    }
    println!("status page of {} committed rounds checked over HTTP and in {}", committed.len(), browser.display());
}
