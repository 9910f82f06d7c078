//! The status page's HTML: a pure function of a [`StatusSnapshot`] and the time. One document
//! with its style inline, an inline SVG chart, no script and no external asset; it reloads itself
//! every [`REFRESH_SECS`] seconds (`<meta http-equiv="refresh">`).
//!
//! Every string that came from outside the server's configuration — client names, software
//! strings, quarantine reasons, target names — goes through [`escape`] before it is written,
//! in text and in attributes alike.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::{RoundRow, StatusSnapshot};

/// Seconds between the page's reloads.
pub const REFRESH_SECS: u32 = 5;

/// The chart's size in SVG user units (it scales to the page's width).
const CHART_W: f64 = 760.0;
const CHART_H: f64 = 260.0;
/// Space left of, right of, above and below the plot area (axis labels).
const LEFT: f64 = 52.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 40.0;

/// `s` with `&`, `<`, `>`, `"` and `'` replaced by character references: safe in HTML text and
/// in quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A byte count in decimal units (as the operator's log: MB = 10⁶ bytes).
fn bytes(n: u64) -> String {
    let v = n as f64;
    match n {
        0..=999 => format!("{n} B"),
        1_000..=999_999 => format!("{:.1} kB", v / 1e3),
        1_000_000..=999_999_999 => format!("{:.2} MB", v / 1e6),
        _ => format!("{:.2} GB", v / 1e9),
    }
}

/// A fraction as a percentage with two decimals, `–` when unknown.
fn pct(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or("–".to_string(), |v| format!("{:.2}%", 100.0 * v))
}

/// A length of time, coarsely: `42 s`, `3 min`, `2 h 5 min`.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Seconds of a round: one decimal.
fn seconds(s: f64) -> String {
    if s.is_finite() {
        format!("{s:.1} s")
    } else {
        "–".into()
    }
}

/// The page for `s` as it stands at `now`.
pub fn render(s: &StatusSnapshot, now: Instant) -> String {
    let mut h = String::with_capacity(16 << 10);
    let round = s.current_round();
    let title = match s.phase {
        "finished" => format!("finished · {} rounds", s.committed),
        phase => format!("round {round} · {phase}"),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>fedpool · {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    header(&mut h, s, now);
    chart(&mut h, s);
    rounds(&mut h, s);
    clients(&mut h, s, now);
    rejections(&mut h, s);
    grants(&mut h, s);
    let _ = write!(
        h,
        "<footer>fedpool-server · this page reloads every {REFRESH_SECS} s · \
         Prometheus text at <a href=\"/metrics\">/metrics</a></footer>\n</body>\n</html>\n"
    );
    h
}

/// The phase, the round and the totals.
fn header(h: &mut String, s: &StatusSnapshot, now: Instant) {
    let round = s.current_round();
    let phase_class = s.phase.replace(' ', "-");
    let what = match s.phase {
        "training" => {
            let attempt = s.running.map_or(1, |(_, a)| a);
            format!("training{}", if attempt > 1 { format!(" (attempt {attempt})") } else { String::new() })
        }
        "waiting to train" | "waiting to evaluate" => {
            format!("{} (needs {} connected clients)", s.phase, s.min_clients_to_start)
        }
        "failed" => "failed: see the server's log".to_string(),
        phase => phase.to_string(),
    };
    let _ = write!(h, "<header>\n<h1>fedpool coordinator</h1>\n<p class=\"status\">");
    if s.phase == "finished" {
        let _ = write!(
            h,
            "<span class=\"phase phase-finished\" id=\"phase\">finished</span> \
             <span id=\"round\" data-round=\"{}\">{} of {} rounds committed</span>",
            s.committed, s.committed, s.total_rounds
        );
    } else {
        let _ = write!(
            h,
            "<span class=\"phase phase-{phase_class}\" id=\"phase\">{}</span> \
             <span id=\"round\" data-round=\"{round}\">round {round} of {}</span>",
            escape(&what),
            s.total_rounds
        );
    }
    let _ = writeln!(h, "</p>");
    let _ = writeln!(
        h,
        "<dl class=\"totals\">\
         <div><dt>committed</dt><dd id=\"committed\">{}</dd></div>\
         <div><dt>connected</dt><dd id=\"connected\">{}</dd></div>\
         <div><dt>enrolled</dt><dd id=\"enrolled\">{}</dd></div>\
         <div><dt>quarantined</dt><dd>{}</dd></div>\
         <div><dt>bytes in</dt><dd>{}</dd></div>\
         <div><dt>bytes out</dt><dd>{}</dd></div>\
         <div><dt>up</dt><dd>{}</dd></div>\
         </dl>\n</header>",
        s.committed,
        s.connected(),
        s.enrolled(),
        s.quarantined.len(),
        bytes(s.bytes_in),
        bytes(s.bytes_out),
        span(now.saturating_duration_since(s.started)),
    );
}

/// Space between the plot area's sides and the first and last markers.
const INSET: f64 = 18.0;

/// Where a round's marker goes along the x axis.
fn x_of(round: u64, first: u64, last: u64) -> f64 {
    let w = CHART_W - LEFT - RIGHT - 2.0 * INSET;
    if last <= first {
        return LEFT + INSET + w / 2.0;
    }
    LEFT + INSET + w * (round - first) as f64 / (last - first) as f64
}

/// The accuracy axis: from `lo` to `hi` (fractions, multiples of 0.05) with a tick every `step`.
fn y_axis(rows: &[&RoundRow]) -> (f64, f64, f64) {
    let accs: Vec<f64> = rows.iter().filter_map(|r| r.accuracy()).collect();
    if accs.is_empty() {
        return (0.0, 1.0, 0.2);
    }
    let min = accs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = accs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut lo = ((min - 0.05) * 10.0).floor() / 10.0;
    let mut hi = ((max + 0.05) * 10.0).ceil() / 10.0;
    lo = lo.clamp(0.0, 0.9);
    hi = hi.clamp(lo + 0.1, 1.0);
    if hi - lo < 0.1 {
        lo = hi - 0.1;
    }
    let range = hi - lo;
    let step = if range <= 0.31 {
        0.05
    } else if range <= 0.61 {
        0.1
    } else {
        0.2
    };
    (lo, hi, step)
}

/// The accuracy-by-round chart: one marker (`class="point"`, `data-round`) per committed round;
/// an evaluated round's at its accuracy, joined by a line, one not evaluated (yet) hollow on the
/// x axis.
fn chart(h: &mut String, s: &StatusSnapshot) {
    let rows: Vec<&RoundRow> = s.rounds.values().collect();
    let _ = writeln!(h, "<section id=\"chart\">\n<h2>Accuracy by round</h2>");
    let _ = writeln!(
        h,
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {CHART_H}\" role=\"img\" \
         aria-label=\"federated accuracy of the global model by round\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    let (x0, x1, y0, y1) = (LEFT, CHART_W - RIGHT, TOP, CHART_H - BOTTOM);
    let (lo, hi, step) = y_axis(&rows);
    let y_of = |a: f64| y1 - (y1 - y0) * (a.clamp(lo, hi) - lo) / (hi - lo);
    // Horizontal grid and accuracy labels.
    let ticks = ((hi - lo) / step).round() as usize;
    for i in 0..=ticks {
        let a = lo + step * i as f64;
        let y = y_of(a);
        let _ = writeln!(
            h,
            "<line class=\"grid\" x1=\"{x0}\" x2=\"{x1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}%</text>",
            x0 - 6.0,
            y + 4.0,
            100.0 * a
        );
    }
    let _ = writeln!(h, "<line class=\"axis\" x1=\"{x0}\" x2=\"{x1}\" y1=\"{y1}\" y2=\"{y1}\"/>");
    let _ = writeln!(
        h,
        "<text class=\"label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">round</text>",
        (x0 + x1) / 2.0,
        CHART_H - 4.0
    );
    if rows.is_empty() {
        let _ = writeln!(
            h,
            "<text class=\"empty\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no round committed yet</text>",
            (x0 + x1) / 2.0,
            (y0 + y1) / 2.0
        );
        let _ = writeln!(h, "</svg>\n</section>");
        return;
    }
    let (first, last) = (rows[0].round.0, rows[rows.len() - 1].round.0);
    // Round labels: every round up to 20, else about ten of them.
    let every = (rows.len() as u64).div_ceil(10).max(1);
    let every = if rows.len() <= 20 { 1 } else { every };
    for (i, r) in rows.iter().enumerate() {
        if (i as u64).is_multiple_of(every) || i + 1 == rows.len() {
            let _ = writeln!(
                h,
                "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x_of(r.round.0, first, last),
                y1 + 16.0,
                r.round
            );
        }
    }
    let line: Vec<String> = rows
        .iter()
        .filter_map(|r| r.accuracy().map(|a| format!("{:.1},{:.1}", x_of(r.round.0, first, last), y_of(a))))
        .collect();
    if line.len() > 1 {
        let _ = writeln!(h, "<polyline class=\"line\" points=\"{}\"/>", line.join(" "));
    }
    for r in &rows {
        let x = x_of(r.round.0, first, last);
        match r.accuracy() {
            Some(a) => {
                let f1 = r.eval.and_then(|e| e.macro_f1);
                let _ = writeln!(
                    h,
                    "<circle class=\"point\" data-round=\"{}\" data-accuracy=\"{a:.4}\" cx=\"{x:.1}\" cy=\"{:.1}\" r=\"5\">\
                     <title>round {}: accuracy {}, macro-F1 {}</title></circle>",
                    r.round,
                    y_of(a),
                    r.round,
                    pct(Some(a)),
                    pct(f1)
                );
            }
            None => {
                let why = if r.recovered { "recovered after a crash, no record" } else { "not evaluated (yet)" };
                let _ = writeln!(
                    h,
                    "<circle class=\"point pending\" data-round=\"{}\" cx=\"{x:.1}\" cy=\"{y1:.1}\" r=\"5\">\
                     <title>round {}: {why}</title></circle>",
                    r.round, r.round
                );
            }
        }
    }
    let _ = writeln!(h, "</svg>");
    let pending = rows.iter().filter(|r| r.accuracy().is_none()).count();
    if pending > 0 {
        let _ = writeln!(
            h,
            "<p class=\"note\">Hollow markers on the axis: {pending} committed round{} without a federated \
             accuracy yet.</p>",
            if pending == 1 { "" } else { "s" }
        );
    }
    let _ = writeln!(h, "</section>");
}

/// The committed rounds, newest first.
fn rounds(h: &mut String, s: &StatusSnapshot) {
    let _ = writeln!(h, "<section id=\"rounds\">\n<h2>Committed rounds</h2>");
    if s.rounds.is_empty() {
        let _ = writeln!(h, "<p class=\"none\">No round committed yet.</p>\n</section>");
        return;
    }
    let _ = writeln!(
        h,
        "<table>\n<thead><tr><th>round</th><th>attempt</th><th>clients</th><th>examples</th>\
         <th>accuracy</th><th>macro-F1</th><th>eval examples</th><th>bytes up</th><th>bytes down</th>\
         <th>duration</th></tr></thead>\n<tbody>"
    );
    for r in s.rounds.values().rev() {
        let e = r.eval;
        let _ = writeln!(
            h,
            "<tr class=\"round\" data-round=\"{}\"><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"accuracy\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.round,
            r.round,
            if r.recovered { " <small>(recovered)</small>" } else { "" },
            r.attempt,
            r.clients,
            r.examples,
            pct(r.accuracy()),
            pct(e.and_then(|e| e.macro_f1)),
            e.map_or("–".to_string(), |e| e.examples.to_string()),
            bytes(r.total_bytes_up()),
            bytes(r.total_bytes_down()),
            seconds(r.total_seconds()),
        );
    }
    let _ = writeln!(
        h,
        "</tbody>\n</table>\n<p class=\"note\">Accuracy and macro-F1: the global model, evaluated by the \
         clients on their held-out data (example-weighted). Bytes and duration include the evaluation.</p>\n\
         </section>"
    );
}

/// "3 s ago", "never".
fn ago(at: Option<Instant>, now: Instant) -> String {
    at.map_or("never".to_string(), |t| format!("{} ago", span(now.saturating_duration_since(t))))
}

/// Every client seen this run.
fn clients(h: &mut String, s: &StatusSnapshot, now: Instant) {
    let _ = writeln!(h, "<section id=\"clients\">\n<h2>Clients</h2>");
    if s.clients.is_empty() && s.quarantined.is_empty() {
        let _ = writeln!(h, "<p class=\"none\">No client has connected yet.</p>\n</section>");
        return;
    }
    let _ = writeln!(
        h,
        "<table>\n<thead><tr><th>client</th><th>state</th><th>software</th><th>last heard</th></tr></thead>\n<tbody>"
    );
    for (name, c) in &s.clients {
        let (class, state) = match (s.quarantined.contains_key(name), c.connected, c.enrolled) {
            (true, _, _) => ("quarantined", "quarantined"),
            (false, true, true) => ("connected", "connected"),
            (false, true, false) => ("pending", "connected, not enrolled"),
            (false, false, true) => ("lost", "enrolled, disconnected"),
            (false, false, false) => ("lost", "disconnected, never enrolled"),
        };
        let _ = writeln!(
            h,
            "<tr class=\"client\" data-client=\"{n}\"><td class=\"name\">{n}</td>\
             <td><span class=\"state state-{class}\">{state}</span></td><td class=\"software\">{}</td>\
             <td class=\"heard\">{}</td></tr>",
            c.software.as_deref().map_or("–".to_string(), escape),
            ago(c.last_heard, now),
            n = escape(name),
        );
    }
    let _ = writeln!(h, "</tbody>\n</table>");
    if !s.quarantined.is_empty() {
        let _ = writeln!(h, "<h3>Quarantined</h3>\n<ul class=\"quarantined\">");
        for (name, why) in &s.quarantined {
            let _ = writeln!(h, "<li><b>{}</b>: {}</li>", escape(name), escape(why));
        }
        let _ = writeln!(h, "</ul>");
    }
    let _ = writeln!(h, "</section>");
}

/// Refusals sent, by reason.
fn rejections(h: &mut String, s: &StatusSnapshot) {
    let _ = writeln!(h, "<section id=\"rejections\">\n<h2>Rejections</h2>");
    if s.rejections.values().all(|&n| n == 0) {
        let _ = writeln!(h, "<p class=\"none\">No refusal sent.</p>\n</section>");
        return;
    }
    let _ = writeln!(h, "<table class=\"narrow\">\n<thead><tr><th>reason</th><th>count</th></tr></thead>\n<tbody>");
    for (reason, n) in s.rejections.iter().filter(|(_, &n)| n > 0) {
        let _ = writeln!(
            h,
            "<tr class=\"rejection\" data-reason=\"{r}\"><td>{r}</td><td>{n}</td></tr>",
            r = escape(reason)
        );
    }
    let _ = writeln!(h, "</tbody>\n</table>\n</section>");
}

/// The latest rank grant of each client, with rank budgets on.
fn grants(h: &mut String, s: &StatusSnapshot) {
    let _ = writeln!(h, "<section id=\"grants\">\n<h2>Rank grants</h2>");
    let Some(policy) = &s.rank_policy else {
        let _ =
            writeln!(h, "<p class=\"none\">Rank budgets are off: every client trains every triplet.</p>\n</section>");
        return;
    };
    let _ = writeln!(h, "<p>Policy: {}.</p>", escape(policy));
    let granted: Vec<_> = s.clients.iter().filter_map(|(n, c)| c.grant.as_ref().map(|g| (n, g))).collect();
    if granted.is_empty() {
        let _ = writeln!(h, "<p class=\"none\">No task with a grant sent yet.</p>\n</section>");
        return;
    }
    let _ = writeln!(
        h,
        "<table>\n<thead><tr><th>client</th><th>round</th><th>upload estimate</th><th>total rank</th>\
         <th>rank per target</th></tr></thead>\n<tbody>"
    );
    for (name, g) in granted {
        let total: u64 = g.ranks.iter().map(|(_, r)| u64::from(*r)).sum();
        let targets: Vec<&str> = g.ranks.iter().map(|(t, _)| t.as_str()).collect();
        let per: Vec<String> = short_targets(&targets)
            .iter()
            .zip(&g.ranks)
            .map(|(short, (target, r))| {
                format!("<span class=\"rank\" title=\"{}\">{}&nbsp;<b>{r}</b></span>", escape(target), escape(short))
            })
            .collect();
        let bps =
            g.upload_bps.filter(|b| b.is_finite()).map_or("–".to_string(), |b| format!("{}/s", bytes(b as u64)));
        let _ = writeln!(
            h,
            "<tr class=\"grant\" data-client=\"{n}\"><td>{n}</td><td>{}</td><td>{bps}</td><td>{total}</td>\
             <td class=\"targets\">{}</td></tr>",
            g.round,
            per.join(" "),
            n = escape(name),
        );
    }
    let _ = writeln!(h, "</tbody>\n</table>\n</section>");
}

/// Short labels for LoRA target names: the dot-separated parts that every name has at the same
/// place are left out (`encoder.layer.3.attention.self.query` → `3.query` among BERT's), unless
/// that leaves nothing or the names have different numbers of parts (then they stay whole).
fn short_targets(targets: &[&str]) -> Vec<String> {
    let parts: Vec<Vec<&str>> = targets.iter().map(|t| t.split('.').collect()).collect();
    let n = parts.first().map_or(0, Vec::len);
    if targets.len() < 2 || parts.iter().any(|p| p.len() != n) {
        return targets.iter().map(|t| t.to_string()).collect();
    }
    let varies: Vec<bool> = (0..n).map(|i| parts.iter().any(|p| p[i] != parts[0][i])).collect();
    parts
        .iter()
        .map(|p| p.iter().zip(&varies).filter(|(_, &v)| v).map(|(s, _)| *s).collect::<Vec<_>>().join("."))
        .collect()
}

/// The page's style: system fonts, one column, readable tables.
const STYLE: &str = "
:root{color-scheme:light;--fg:#1d2330;--muted:#5b6475;--line:#d9dee7;--accent:#2457c5;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1100px;padding:20px 28px;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:15px;margin:14px 0 6px}
header,section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:0 0 16px}
.status{font-size:17px;margin:0 0 10px}
.phase{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff;background:var(--muted)}
.phase-training{background:#2457c5}.phase-evaluating{background:#7a3fc0}.phase-finished{background:#1e7d45}
.phase-waiting-to-train,.phase-waiting-to-evaluate{background:#b7791f}.phase-failed{background:#b42318}
.totals{display:flex;flex-wrap:wrap;gap:8px 28px;margin:0}
.totals div{min-width:90px}.totals dt{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.totals dd{margin:0;font-size:18px;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
table.narrow{width:auto;min-width:280px}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{color:var(--muted);font-weight:600;font-size:13px}
th:first-child,td:first-child{text-align:left}
#clients td,#clients th,#grants td,#grants th,#rejections td,#rejections th{text-align:left}
td.software{white-space:normal;word-break:break-all;color:var(--muted)}
td.targets{white-space:normal;font-size:12px;color:var(--muted)}
.rank{display:inline-block;margin:0 10px 0 0}.rank b{color:var(--fg)}
tbody tr:nth-child(even){background:#fafbfc}
.state{padding:1px 8px;border-radius:10px;font-size:13px}
.state-connected{background:#dcf3e5;color:#14532d}.state-lost{background:#eceef2;color:var(--muted)}
.state-pending{background:#fdf0d5;color:#7a4a00}.state-quarantined{background:#fde2e1;color:#8a1c14}
svg.chart{width:100%;height:auto;display:block}
.chart .grid{stroke:var(--line);stroke-width:1}
.chart .axis{stroke:var(--muted);stroke-width:1.2}
.chart .tick{fill:var(--muted);font-size:12px}
.chart .label{fill:var(--muted);font-size:12px}
.chart .empty{fill:var(--muted);font-size:15px}
.chart .line{fill:none;stroke:var(--accent);stroke-width:2}
.chart .point{fill:var(--accent);stroke:#fff;stroke-width:1.5}
.chart .point.pending{fill:#fff;stroke:var(--muted);stroke-width:1.5}
.note,.none{color:var(--muted);font-size:13px;margin:8px 0 0}
footer{color:var(--muted);font-size:12px;text-align:center;margin:8px 0 20px}
a{color:var(--accent)}
";

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedpool_common::Round;

    use super::*;
    use crate::status::{ClientRow, EvalRow, Grant};

    fn row(round: u64, accuracy: Option<f64>) -> RoundRow {
        RoundRow {
            round: Round(round),
            attempt: 1,
            clients: 2,
            examples: 120,
            bytes_up: 2_500,
            bytes_down: 40_000,
            seconds: 3.0,
            recovered: false,
            eval: accuracy.map(|a| EvalRow {
                accuracy: Some(a),
                macro_f1: Some(a - 0.1),
                examples: 24,
                bytes_up: 100,
                bytes_down: 20_000,
                seconds: 1.0,
            }),
        }
    }

    fn snapshot(rounds: &[RoundRow]) -> (StatusSnapshot, Instant) {
        let start = Instant::now();
        let mut s = StatusSnapshot::new(start, 10);
        s.rounds = rounds.iter().map(|r| (r.round, r.clone())).collect();
        s.committed = rounds.last().map_or(Round(0), |r| r.round);
        (s, start + Duration::from_secs(90))
    }

    /// The number of `class="point…"` markers and their rounds, in document order.
    fn points(html: &str) -> Vec<u64> {
        html.split("<circle class=\"point")
            .skip(1)
            .map(|p| {
                let at = p.find("data-round=\"").expect("data-round") + "data-round=\"".len();
                p[at..].split('"').next().and_then(|n| n.parse().ok()).expect("a round number")
            })
            .collect()
    }

    #[test]
    fn an_empty_federation_renders_a_page_with_no_points() {
        let (s, now) = snapshot(&[]);
        let html = render(&s, now);
        assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
        assert!(html.ends_with("</html>\n"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(html.contains("round 1 of 10"), "{html}");
        assert!(html.contains("waiting to train (needs 1 connected clients)"), "{html}");
        assert!(html.contains("No round committed yet."));
        assert!(html.contains("No client has connected yet."));
        assert!(html.contains("No refusal sent."));
        assert!(html.contains("Rank budgets are off"));
        assert!(html.contains("no round committed yet</text>"));
        assert_eq!(points(&html), Vec::<u64>::new());
        assert!(!html.contains("<script"), "no script on the page");
        for external in ["src=", "<link", "@import", "url("] {
            assert!(!html.contains(external), "no external asset ({external})");
        }
    }

    #[test]
    fn the_chart_has_one_point_per_committed_round() {
        let rows = [row(1, Some(0.61)), row(2, Some(0.68)), row(3, Some(0.7325)), row(4, None)];
        let (mut s, now) = snapshot(&rows);
        s.phase = "evaluating";
        s.evaluating = Some(Round(4));
        let html = render(&s, now);
        assert_eq!(points(&html), [1, 2, 3, 4], "one marker per committed round, in order");
        assert_eq!(html.matches("class=\"point pending\"").count(), 1, "round 4 is not evaluated yet");
        assert!(html.contains("data-round=\"3\" data-accuracy=\"0.7325\""), "{html}");
        assert_eq!(html.matches("<polyline class=\"line\"").count(), 1);
        assert!(html.contains("round 4 of 10"), "{html}");
        // The rounds table: newest first, with accuracy, macro-F1, bytes (with the evaluation's)
        // and duration.
        let table = &html[html.find("<section id=\"rounds\">").expect("rounds")..];
        assert!(table.find("data-round=\"4\"") < table.find("data-round=\"1\""), "newest first");
        assert!(table.contains("<td class=\"accuracy\">73.25%</td><td>63.25%</td><td>24</td><td>2.6 kB</td>"));
        assert!(table.contains("<td>60.0 kB</td><td>4.0 s</td>"), "{table}");
    }

    #[test]
    fn a_single_round_is_one_point_in_the_middle() {
        let (s, now) = snapshot(&[row(7, Some(0.5))]);
        let html = render(&s, now);
        assert_eq!(points(&html), [7]);
        assert!(html.contains(&format!("cx=\"{:.1}\"", (LEFT + CHART_W - RIGHT) / 2.0)), "{html}");
    }

    #[test]
    fn a_hostile_client_name_software_and_reason_are_escaped() {
        let (mut s, now) = snapshot(&[row(1, Some(0.5))]);
        let evil = "<script>alert('x')</script>";
        s.clients.insert(
            evil.into(),
            ClientRow {
                connected: true,
                enrolled: true,
                software: Some("\"><img src=x onerror=alert(1)>".into()),
                last_heard: Some(now - Duration::from_secs(3)),
                grant: Some(Grant { round: Round(2), ranks: vec![("<b>q</b>".into(), 4)], upload_bps: Some(4e3) }),
            },
        );
        s.quarantined = BTreeMap::from([(evil.to_string(), "<i>third refusal</i> & more".to_string())]);
        s.rejections = BTreeMap::from([("<u>protocol</u>".to_string(), 2)]);
        s.rank_policy = Some("fixed rank 4 <em>".into());
        let html = render(&s, now);
        assert!(!html.contains("<script"), "a client name became markup:\n{html}");
        assert!(!html.contains("<img"), "a software string became markup");
        assert!(!html.contains("<i>") && !html.contains("<b>q") && !html.contains("<u>") && !html.contains("<em>"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"), "{html}");
        assert!(html.contains("data-client=\"&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;\""));
        assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("&lt;i&gt;third refusal&lt;/i&gt; &amp; more"));
        assert!(html.contains("3 s ago"), "{html}");
        assert!(html.contains("<span class=\"state state-quarantined\">quarantined</span>"));
    }

    #[test]
    fn clients_show_their_state_and_when_they_were_last_heard() {
        let (mut s, now) = snapshot(&[]);
        let heard = |secs| Some(now - Duration::from_secs(secs));
        s.clients.insert(
            "alpha".into(),
            ClientRow {
                connected: true,
                enrolled: true,
                software: Some("fedpool-client 0.1.0".into()),
                last_heard: heard(2),
                grant: None,
            },
        );
        s.clients.insert(
            "beta".into(),
            ClientRow { connected: false, enrolled: true, software: None, last_heard: heard(300), grant: None },
        );
        s.clients.insert(
            "gamma".into(),
            ClientRow { connected: true, enrolled: false, software: None, last_heard: None, grant: None },
        );
        let html = render(&s, now);
        assert!(html.contains("<td class=\"name\">alpha</td><td><span class=\"state state-connected\">connected</span></td><td class=\"software\">fedpool-client 0.1.0</td><td class=\"heard\">2 s ago</td>"), "{html}");
        assert!(
            html.contains(
                "enrolled, disconnected</span></td><td class=\"software\">–</td><td class=\"heard\">5 min ago</td>"
            ),
            "{html}"
        );
        assert!(html.contains(
            "connected, not enrolled</span></td><td class=\"software\">–</td><td class=\"heard\">never</td>"
        ));
        assert!(html.contains("<dd id=\"connected\">2</dd>") && html.contains("<dd id=\"enrolled\">2</dd>"), "{html}");
    }

    #[test]
    fn grants_show_each_clients_latest_ranks_when_budgets_are_on() {
        let (mut s, now) = snapshot(&[]);
        s.rank_policy = Some("fixed rank 2".into());
        let html = render(&s, now);
        assert!(html.contains("Policy: fixed rank 2.") && html.contains("No task with a grant sent yet."), "{html}");
        let grant = Grant {
            round: Round(3),
            ranks: vec![("layer.0.query".into(), 2), ("layer.0.value".into(), 1)],
            upload_bps: Some(16_000.0),
        };
        s.clients.insert(
            "a".into(),
            ClientRow { connected: true, enrolled: true, grant: Some(grant), ..Default::default() },
        );
        let html = render(&s, now);
        assert!(
            html.contains(
                "<tr class=\"grant\" data-client=\"a\"><td>a</td><td>3</td><td>16.0 kB/s</td><td>3</td>\
                 <td class=\"targets\"><span class=\"rank\" title=\"layer.0.query\">query&nbsp;<b>2</b></span> \
                 <span class=\"rank\" title=\"layer.0.value\">value&nbsp;<b>1</b></span></td></tr>"
            ),
            "{html}"
        );
    }

    #[test]
    fn target_labels_leave_out_what_every_target_shares() {
        let bert = [
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.value",
            "encoder.layer.1.attention.self.query",
        ];
        assert_eq!(short_targets(&bert), ["0.query", "0.value", "1.query"]);
        assert_eq!(short_targets(&["only.one"]), ["only.one"]);
        assert_eq!(short_targets(&["a.b", "a.b.c"]), ["a.b", "a.b.c"], "different shapes stay whole");
    }

    #[test]
    fn rejections_are_listed_by_reason() {
        let (mut s, now) = snapshot(&[]);
        s.rejections = BTreeMap::from([("wrong_nonce".to_string(), 3), ("late".to_string(), 0)]);
        let html = render(&s, now);
        assert!(
            html.contains("<tr class=\"rejection\" data-reason=\"wrong_nonce\"><td>wrong_nonce</td><td>3</td></tr>")
        );
        assert!(!html.contains("data-reason=\"late\""), "zero counts are left out");
    }

    #[test]
    fn a_finished_federation_says_so() {
        let (mut s, now) = snapshot(&[row(1, Some(0.5)), row(2, Some(0.6))]);
        s.phase = "finished";
        s.total_rounds = 2;
        let html = render(&s, now);
        assert!(html.contains("<span class=\"phase phase-finished\" id=\"phase\">finished</span>"), "{html}");
        assert!(html.contains("2 of 2 rounds committed"));
        assert!(html.contains("<title>fedpool · finished · 2 rounds</title>"));
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(2_500), "2.5 kB");
        assert_eq!(bytes(22_500_000), "22.50 MB");
        assert_eq!(span(Duration::from_secs(3)), "3 s");
        assert_eq!(span(Duration::from_secs(600)), "10 min");
        assert_eq!(span(Duration::from_secs(7_500)), "2 h 5 min");
        assert_eq!(pct(Some(0.7362)), "73.62%");
        assert_eq!(pct(None), "–");
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
    }
}
