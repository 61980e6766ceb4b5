//! What a benchmark run produced, and its renderings: the table on stdout, JSON (the whole
//! report, every run's value), CSV (one row per figure), and the change against an earlier run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::stats::{change, Spread};

/// One figure the benchmark reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// How far apart two readings of the same work can be, from how the figure is counted (0:
    /// continuous); two runs that far apart agree.
    pub resolution: f64,
}

const fn metric(key: &'static str, label: &'static str, unit: &'static str, up: bool) -> Metric {
    Metric {
        key,
        label,
        unit,
        higher_is_better: up,
        resolution: 0.0,
    }
}

/// A figure read only to within `resolution`.
const fn stepped(m: Metric, resolution: f64) -> Metric {
    Metric { resolution, ..m }
}

/// Per backend and scale: the proxy's work.
pub const CONTROL: &[Metric] = &[
    metric("full_sync_ms", "full sync", "ms", false),
    metric("loader_ms", "loader alone", "ms", false),
    metric("change_sync_ms", "1-endpoint sync", "ms", false),
    metric("programming_ms", "programming", "ms", false),
    // From /proc/PID/stat: its user and system time and its children's, four counters each
    // rounded down to a 10 ms clock tick, so the same work can read up to three ticks apart
    // (a one-Service full sync read 0.00 and 0.02 s in back-to-back runs).
    stepped(metric("proxy_cpu_s", "proxy CPU", "s", false), 0.03),
    metric("peak_rss_mib", "peak RSS", "MiB", false),
];

/// Per backend, scale and target: the traffic's.
pub const DATA: &[Metric] = &[
    metric("newconn_p50_us", "new-conn p50", "µs", false),
    metric("newconn_p90_us", "p90", "µs", false),
    metric("newconn_p99_us", "p99", "µs", false),
    metric("keepalive_p50_us", "keep-alive p50", "µs", false),
    metric("keepalive_p99_us", "p99", "µs", false),
    metric("conns_per_s", "conns/s", "1/s", true),
    metric("tcp_gbit_s", "TCP", "Gbit/s", true),
    metric("udp_rr_per_s", "UDP req/resp", "1/s", true),
    metric("failed_requests", "failed", "requests", false),
];

pub fn lookup(key: &str) -> Option<&'static Metric> {
    CONTROL.iter().chain(DATA).find(|m| m.key == key)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub iptables: String,
    pub iperf3: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub services: Vec<usize>,
    pub endpoints_per_service: usize,
    pub rounds: usize,
    pub connections: usize,
    pub concurrency: usize,
    pub keepalive_requests: usize,
    pub udp_requests: usize,
    pub tcp_seconds: u32,
    /// Endpoint changes per control round; reports from before it made 4.
    #[serde(default = "four")]
    pub endpoint_changes: usize,
    /// Where the traffic's clients and servers ran (`--cpu`); reports from before it say "".
    #[serde(default)]
    pub cpu: String,
}

fn four() -> usize {
    4
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// kpx-lab's version.
    pub version: String,
    /// When the run started (RFC 3339) and how long it took.
    pub started: String,
    pub seconds: f64,
    pub machine: Machine,
    pub settings: Settings,
    pub backends: Vec<BackendResult>,
    /// What the run noticed about itself (a load core that never went quiet, say).
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendResult {
    pub backend: String,
    /// Why the backend was not measured (this kernel cannot run it, it is not built yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
    #[serde(default)]
    pub scales: Vec<ScaleResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleResult {
    pub services: usize,
    /// Rules (iptables, both families) or map entries (eBPF) the proxy programmed.
    pub programmed: u64,
    /// `CONTROL` figures by key.
    pub control: BTreeMap<String, Spread>,
    /// Full sync against the loader alone, round by round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_vs_loader: Option<Spread>,
    pub targets: Vec<TargetResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResult {
    /// first, middle or last (a Service by its place in the table), direct (the pod IP), or
    /// loopback (the client pod's own loopback: the host reference, no proxy rule or map entry
    /// on its path).
    pub target: String,
    pub address: String,
    /// `DATA` figures by key.
    pub metrics: BTreeMap<String, Spread>,
    /// Each figure against the direct run of the same round.
    #[serde(default)]
    pub vs_direct: BTreeMap<String, Spread>,
    /// Each figure against the loopback run of the same round: the host's own speed divided
    /// out, so two runs on a host that sped up or slowed down between them can be compared.
    #[serde(default)]
    pub vs_loopback: BTreeMap<String, Spread>,
}

/// The targets that are no Service: the host reference and the pods' IPs.
pub const LOOPBACK: &str = "loopback";
pub const DIRECT: &str = "direct";

/// Whether `target` is a Service (first, middle, last), which is taken against direct.
pub fn is_service(target: &str) -> bool {
    target != LOOPBACK && target != DIRECT
}

impl ScaleResult {
    pub fn target(&self, name: &str) -> Option<&TargetResult> {
        self.targets.iter().find(|t| t.target == name)
    }
}

impl Report {
    pub fn backend(&self, name: &str) -> Option<&BackendResult> {
        self.backends.iter().find(|b| b.backend == name)
    }
}

/// A number with the precision its size deserves: 1,234 / 123 / 12.3 / 1.23 / 0.123.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A count with thousands separators: 1 / 1,000 / 10,000.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn with_range(s: Option<&Spread>) -> String {
    match s {
        Some(s) if s.samples.len() > 1 => {
            format!("{} ({}–{})", number(s.median), number(s.min), number(s.max))
        }
        Some(s) => number(s.median),
        None => "-".into(),
    }
}

fn ratio(s: Option<&Spread>) -> String {
    s.map_or_else(|| "-".into(), |s| format!("{:.2}×", s.median))
}

fn median(s: Option<&Spread>) -> String {
    s.map_or_else(|| "-".into(), |s| number(s.median))
}

/// Left-aligned first columns, right-aligned numbers, widths from the content.
fn render_table(header: &[String], rows: &[Vec<String>], left: usize) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    // Two-cell rows (a backend that did not run, and why) span the table.
    for row in rows.iter().filter(|r| r.len() > 2) {
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let mut line = String::new();
        if row.len() == 2 {
            let fill = " ".repeat(widths[0].saturating_sub(row[0].chars().count()));
            out.push_str(&format!("{}{fill}  {}\n", row[0], row[1]));
            continue;
        }
        for (i, cell) in row.iter().enumerate() {
            let pad = widths.get(i).copied().unwrap_or(0);
            if i > 0 {
                line.push_str("  ");
            }
            let fill = " ".repeat(pad.saturating_sub(cell.chars().count()));
            if i < left {
                line.push_str(cell);
                line.push_str(&fill);
            } else {
                line.push_str(&fill);
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn header(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// A table's rows: `each` adds a scale's rows; a backend that did not run is one row saying
/// why.
fn backend_rows(
    report: &Report,
    each: impl Fn(&str, &ScaleResult, &mut Vec<Vec<String>>),
) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for b in &report.backends {
        match &b.not_run {
            Some(why) => rows.push(vec![b.backend.clone(), format!("not run: {why}")]),
            None => b
                .scales
                .iter()
                .for_each(|sc| each(&b.backend, sc, &mut rows)),
        }
    }
    rows
}

/// The two tables and the promises, as printed at the end of a run.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let s = &report.settings;
    let _ = writeln!(
        out,
        "control plane: medians (min–max) of {} rounds; {} endpoints per Service",
        s.rounds, s.endpoints_per_service
    );
    let head = header(&[
        "backend",
        "Services",
        "full sync ms",
        "loader alone ms",
        "×loader",
        "1-endpoint sync ms",
        "programming ms",
        "proxy CPU s",
        "peak RSS MiB",
        "programmed",
    ]);
    let rows = backend_rows(report, |backend, sc, rows| {
        let c = |k: &str| with_range(sc.control.get(k));
        rows.push(vec![
            backend.to_string(),
            count(sc.services),
            c("full_sync_ms"),
            c("loader_ms"),
            ratio(sc.full_vs_loader.as_ref()),
            c("change_sync_ms"),
            c("programming_ms"),
            c("proxy_cpu_s"),
            c("peak_rss_mib"),
            count(sc.programmed as usize),
        ]);
    });
    out.push_str(&render_table(&head, &rows, 1));
    let _ = writeln!(
        out,
        "\ndata plane: medians of {} rounds; ×direct = against the pod IP in the same round, pair \
         by pair; loopback = the same loads inside the client pod, the host's own speed (no \
         Service on its path); min–max of every figure in report.csv{}",
        s.rounds,
        if s.cpu.is_empty() {
            String::new()
        } else {
            format!("; {}", s.cpu)
        }
    );
    let head = header(&[
        "backend",
        "Services",
        "target",
        "new-conn p50 µs",
        "×direct",
        "p90",
        "p99",
        "keep-alive p50",
        "p99",
        "conns/s",
        "×direct",
        "TCP Gbit/s",
        "UDP req/s",
        "failed",
    ]);
    let rows = backend_rows(report, |backend, sc, rows| {
        for t in &sc.targets {
            let m = |k: &str| median(t.metrics.get(k));
            let r = |k: &str| {
                if is_service(&t.target) {
                    ratio(t.vs_direct.get(k))
                } else {
                    String::new()
                }
            };
            rows.push(vec![
                backend.to_string(),
                count(sc.services),
                t.target.clone(),
                with_range(t.metrics.get("newconn_p50_us")),
                r("newconn_p50_us"),
                m("newconn_p90_us"),
                m("newconn_p99_us"),
                m("keepalive_p50_us"),
                m("keepalive_p99_us"),
                m("conns_per_s"),
                r("conns_per_s"),
                m("tcp_gbit_s"),
                m("udp_rr_per_s"),
                t.metrics
                    .get("failed_requests")
                    .map_or("-".into(), |s| number(s.samples.iter().sum())),
            ]);
        }
    });
    out.push_str(&render_table(&head, &rows, 3));
    let promises = super::promises::check(report);
    if !promises.is_empty() {
        out.push_str("\nthe figures earlier issues promise:\n");
        for p in promises {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if p.holds { "holds" } else { "NOT MET" },
                p.promise,
                p.measured
            );
        }
    }
    if !report.notes.is_empty() {
        out.push_str("\nnotes:\n");
        for note in &report.notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub const CSV_HEADER: &str = "backend,status,services,target,metric,unit,median,min,max,runs,samples,vs_direct_median,vs_direct_min,vs_direct_max,vs_loopback_median,vs_loopback_min,vs_loopback_max";

/// One row per figure, every run's value in `samples` (`;`-separated); the machine and the
/// settings as `#` lines first.
pub fn csv(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(
        out,
        "# kpx-lab {} started {} ({:.0} s); kernel {}; cpu {} ({} cores); memory {:.1} GiB; {}; {}",
        report.version,
        report.started,
        report.seconds,
        m.kernel,
        m.cpu,
        m.cores,
        m.memory_gib,
        m.iptables,
        m.iperf3
    );
    let _ = writeln!(
        out,
        "# settings {}",
        serde_json::to_string(&report.settings).unwrap_or_default()
    );
    out.push_str(CSV_HEADER);
    out.push('\n');
    let row = |out: &mut String,
               backend: &str,
               services: usize,
               target: &str,
               key: &str,
               s: &Spread,
               ratios: [Option<&Spread>; 2]| {
        let unit = lookup(key).map_or("", |m| m.unit);
        let samples: Vec<String> = s.samples.iter().map(|v| format!("{v}")).collect();
        let ratios: Vec<String> = ratios
            .iter()
            .map(|r| r.map_or(",,".into(), |r| format!("{},{},{}", r.median, r.min, r.max)))
            .collect();
        let _ = writeln!(
            out,
            "{},ran,{services},{target},{key},{unit},{},{},{},{},{},{}",
            csv_field(backend),
            s.median,
            s.min,
            s.max,
            s.samples.len(),
            samples.join(";"),
            ratios.join(",")
        );
    };
    for b in &report.backends {
        if let Some(why) = &b.not_run {
            let _ = writeln!(
                out,
                "{},{}{}",
                csv_field(&b.backend),
                csv_field(&format!("not run: {why}")),
                // Every other column empty.
                ",".repeat(CSV_HEADER.split(',').count() - 2)
            );
            continue;
        }
        for sc in &b.scales {
            for (key, s) in &sc.control {
                let r = (key == "full_sync_ms")
                    .then_some(sc.full_vs_loader.as_ref())
                    .flatten();
                row(
                    &mut out,
                    &b.backend,
                    sc.services,
                    "control",
                    key,
                    s,
                    [r, None],
                );
            }
            for t in &sc.targets {
                for (key, s) in &t.metrics {
                    row(
                        &mut out,
                        &b.backend,
                        sc.services,
                        &t.target,
                        key,
                        s,
                        [t.vs_direct.get(key), t.vs_loopback.get(key)],
                    );
                }
            }
        }
    }
    out
}

/// How far apart two medians may be and still agree: within ±10%, or within what the figure
/// can resolve (0.01 s of proxy CPU against 0.02 s is the rounding of its tick counters, not a
/// doubling).
fn agrees(key: &str, old: f64, new: f64) -> bool {
    let resolution = lookup(key).map_or(0.0, |m| m.resolution);
    (new - old).abs() <= resolution * (1.0 + 1e-9)
        || change(old, new).is_some_and(|d| d.abs() <= 0.10)
}

/// One figure of both runs, side by side.
struct Pair<'a> {
    backend: &'a str,
    services: usize,
    target: &'a str,
    /// The figure's key, or `key ×direct` / `full_sync_ms ×loader` for a ratio.
    figure: String,
    /// The key the direction (higher or lower is better) comes from.
    key: &'a str,
    old: f64,
    new: f64,
    /// For a traffic figure with the host reference beside it: the figure over the loopback's
    /// in the same round (old, new) — the change with the host's own change divided out.
    host: Option<(f64, f64)>,
}

/// Every figure both runs have: the absolute medians, and the ratios (×direct, ×loader),
/// which are taken round by round and so move less with the host.
fn pairs<'a>(old: &'a Report, new: &'a Report) -> Vec<Pair<'a>> {
    let mut out = Vec::new();
    for b in &new.backends {
        let Some(ob) = old.backend(&b.backend) else {
            continue;
        };
        for sc in &b.scales {
            let Some(osc) = ob.scales.iter().find(|o| o.services == sc.services) else {
                continue;
            };
            let mut push = |target: &'a str,
                            figure: String,
                            key: &'a str,
                            o: &Spread,
                            s: &Spread,
                            host: Option<(&Spread, &Spread)>| {
                out.push(Pair {
                    backend: &b.backend,
                    services: sc.services,
                    target,
                    figure,
                    key,
                    old: o.median,
                    new: s.median,
                    host: host.map(|(o, s)| (o.median, s.median)),
                });
            };
            for (k, s) in &sc.control {
                if let Some(o) = osc.control.get(k) {
                    push("control", k.clone(), k, o, s, None);
                }
            }
            if let (Some(o), Some(s)) = (&osc.full_vs_loader, &sc.full_vs_loader) {
                push(
                    "control",
                    "full_sync_ms ×loader".into(),
                    "full_sync_ms",
                    o,
                    s,
                    None,
                );
            }
            for t in &sc.targets {
                let Some(ot) = osc.target(&t.target) else {
                    continue;
                };
                for (k, s) in &t.metrics {
                    if let Some(o) = ot.metrics.get(k) {
                        let host = ot.vs_loopback.get(k).zip(t.vs_loopback.get(k));
                        push(&t.target, k.clone(), k, o, s, host);
                    }
                }
                for (k, s) in &t.vs_direct {
                    if let Some(o) = ot.vs_direct.get(k) {
                        push(&t.target, format!("{k} ×direct"), k, o, s, None);
                    }
                }
            }
        }
    }
    out
}

/// How one figure agreed over every cell both runs have.
#[derive(Default)]
struct Agreement {
    within: usize,
    of: usize,
    /// The largest change either way.
    largest: f64,
    /// With the host's own change divided out where a host reference was measured beside it
    /// (the reference's own figures left out).
    host_within: usize,
    host_of: usize,
}

/// Every figure both runs have, old median → new median, with the change; changes beyond
/// ±10% in the worse direction are flagged. Beside each traffic figure, its change once the
/// host's own change (the loopback's, same round) is divided out. Ends with how many agreed,
/// per figure.
pub fn compare(old: &Report, new: &Report) -> String {
    let mut rows = Vec::new();
    let mut worse = 0;
    let mut agreed: BTreeMap<String, Agreement> = BTreeMap::new();
    for p in pairs(old, new) {
        let Some(delta) = change(p.old, p.new) else {
            continue;
        };
        let up = lookup(p.key).is_some_and(|m| m.higher_is_better);
        let ok = agrees(p.key, p.old, p.new);
        let flag = if ok {
            ""
        } else if (up && delta < 0.0) || (!up && delta > 0.0) {
            worse += 1;
            "worse"
        } else {
            "better"
        };
        let after_host = p
            .host
            .and_then(|(o, n)| Some((change(o, n)?, agrees(p.key, o, n))));
        let e = agreed.entry(p.figure.clone()).or_default();
        e.of += 1;
        e.within += usize::from(ok);
        if delta.abs() > e.largest.abs() {
            e.largest = delta;
        }
        if p.target != LOOPBACK {
            e.host_of += 1;
            e.host_within += usize::from(after_host.map_or(ok, |a| a.1));
        }
        rows.push(vec![
            p.backend.to_string(),
            count(p.services),
            p.target.to_string(),
            p.figure,
            number(p.old),
            number(p.new),
            format!("{:+.1}%", delta * 100.0),
            flag.to_string(),
            after_host.map_or(String::new(), |(d, _)| format!("{:+.1}%", d * 100.0)),
        ]);
    }
    let within = rows.iter().filter(|r| r[7].is_empty()).count();
    let head = header(&[
        "backend",
        "Services",
        "target",
        "figure",
        "old",
        "new",
        "change",
        "",
        "after host",
    ]);
    let mut out = format!(
        "change against the run of {} ({} figures; {within} agree within ±10%, {worse} worse, {} \
         better; \"after host\": the change with the host's own divided out, each traffic figure \
         over the loopback's of the same round):\n",
        old.started,
        rows.len(),
        rows.len() - within - worse
    );
    out.push_str(&render_table(&head, &rows, 4));
    out.push_str(
        "\nagreement by figure (medians within ±10% of the earlier run's, or within the figure's \
         resolution; largest change; within once the host's own change is divided out, the \
         loopback's own figures left out):\n",
    );
    out.push_str(&agreement_by_figure(&agreed));
    out
}

/// Per figure, in the report's order (each absolute figure, then its ratio): how many of its
/// medians agreed, of how many, the largest change either way — tails (p99) move more than
/// medians, and a reader should see which — and how many agreed after the host's own change.
fn agreement_by_figure(agreed: &BTreeMap<String, Agreement>) -> String {
    let order = |figure: &str| {
        let (key, ratio) = figure
            .split_once(' ')
            .map_or((figure, false), |(k, _)| (k, true));
        let at = CONTROL
            .iter()
            .chain(DATA)
            .position(|m| m.key == key)
            .unwrap_or(usize::MAX);
        (at, ratio)
    };
    let mut figures: Vec<&String> = agreed.keys().collect();
    figures.sort_by_key(|f| order(f));
    let mut all = Agreement::default();
    let mut rows: Vec<Vec<String>> = figures
        .iter()
        .map(|f| {
            let a = &agreed[*f];
            all.within += a.within;
            all.of += a.of;
            all.host_within += a.host_within;
            all.host_of += a.host_of;
            vec![
                f.to_string(),
                format!("{}/{}", a.within, a.of),
                format!("{:+.1}%", a.largest * 100.0),
                format!("{}/{}", a.host_within, a.host_of),
            ]
        })
        .collect();
    rows.push(vec![
        "all figures".into(),
        format!("{}/{}", all.within, all.of),
        String::new(),
        format!("{}/{}", all.host_within, all.host_of),
    ]);
    render_table(
        &header(&["figure", "within", "largest", "after host"]),
        &rows,
        1,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The compare row of `figure` for ebpf's first Service at one Service, cell by cell.
    fn first_service_row(text: &str, figure: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[..4] == ["ebpf", "1", "first", figure])
            .unwrap_or_else(|| panic!("{figure} missing from\n{text}"))
    }

    /// The "all figures" totals of a comparison: (within, of), then the same after the host.
    fn totals(text: &str) -> [(usize, usize); 2] {
        let line = text
            .lines()
            .find(|l| l.starts_with("all figures"))
            .unwrap_or_else(|| panic!("no total in\n{text}"));
        let cells: Vec<(usize, usize)> = line
            .split_whitespace()
            .skip(2)
            .map(|c| {
                let (within, of) = c.split_once('/').expect("within/of");
                (within.parse().expect("n"), of.parse().expect("n"))
            })
            .collect();
        [cells[0], cells[1]]
    }

    fn spread(v: &[f64]) -> Spread {
        Spread::of(v).expect("spread")
    }

    /// A small report with every figure, for the renderers' tests.
    pub(crate) fn sample() -> Report {
        let control: BTreeMap<String, Spread> = CONTROL
            .iter()
            .map(|m| (m.key.to_string(), spread(&[10.0, 12.0, 11.0])))
            .collect();
        let target = |name: &str, scale: f64| TargetResult {
            target: name.into(),
            address: "198.18.128.10:80".into(),
            metrics: DATA
                .iter()
                .map(|m| (m.key.to_string(), spread(&[100.0 * scale, 110.0 * scale])))
                .collect(),
            vs_direct: if name == "direct" || name == "loopback" {
                BTreeMap::new()
            } else {
                DATA.iter()
                    .map(|m| (m.key.to_string(), spread(&[scale, scale])))
                    .collect()
            },
            vs_loopback: if name == "loopback" {
                BTreeMap::new()
            } else {
                DATA.iter()
                    .map(|m| (m.key.to_string(), spread(&[scale / 0.5, scale / 0.5])))
                    .collect()
            },
        };
        Report {
            version: "0.1.0".into(),
            started: "2026-11-23T10:00:00Z".into(),
            seconds: 600.0,
            machine: Machine {
                kernel: "6.18.0".into(),
                cpu: "Test CPU".into(),
                cores: 2,
                memory_gib: 24.0,
                iptables: "iptables v1.8.9".into(),
                iperf3: "iperf 3.12".into(),
            },
            settings: Settings {
                cpu: "clients and servers on core 1, the rest on the others".into(),
                services: vec![1, 1000],
                endpoints_per_service: 10,
                rounds: 2,
                connections: 1000,
                concurrency: 4,
                keepalive_requests: 2000,
                udp_requests: 5000,
                tcp_seconds: 1,
                endpoint_changes: 12,
            },
            notes: vec!["1 Services, round 1/2: the load core was still busy".into()],
            backends: vec![
                BackendResult {
                    backend: "ebpf".into(),
                    not_run: None,
                    scales: [1, 1000]
                        .iter()
                        .map(|&n| ScaleResult {
                            services: n,
                            programmed: 18 * n as u64,
                            control: control.clone(),
                            full_vs_loader: Some(spread(&[1.2, 1.3])),
                            targets: vec![
                                target("loopback", 0.5),
                                target("direct", 1.0),
                                target("first", 1.02),
                            ],
                        })
                        .collect(),
                },
                BackendResult {
                    backend: "ipvs".into(),
                    not_run: Some("the kernel has no IP_VS".into()),
                    scales: vec![],
                },
            ],
        }
    }

    #[test]
    fn the_table_has_every_column_and_says_why_a_backend_did_not_run() {
        let text = table(&sample());
        for column in [
            "full sync ms",
            "loader alone ms",
            "×loader",
            "1-endpoint sync ms",
            "programming ms",
            "proxy CPU s",
            "peak RSS MiB",
            "new-conn p50 µs",
            "keep-alive p50",
            "conns/s",
            "TCP Gbit/s",
            "UDP req/s",
        ] {
            assert!(text.contains(column), "{column} missing from\n{text}");
        }
        assert!(
            text.lines().any(
                |l| l.starts_with("ipvs ") && l.ends_with("  not run: the kernel has no IP_VS")
            ),
            "{text}"
        );
        // Medians with their range, and the pairwise ratio.
        assert!(text.contains("11.0 (10.0–12.0)"), "{text}");
        assert!(text.contains("1.02×"), "{text}");
        // Where the traffic ran, and what the run noticed.
        assert!(text.contains("; clients and servers on core 1"), "{text}");
        assert!(
            text.contains("notes:\n  1 Services, round 1/2: the load core was still busy"),
            "{text}"
        );
    }

    #[test]
    fn csv_has_a_row_per_figure_and_the_machine() {
        let text = csv(&sample());
        let mut lines = text.lines();
        assert!(lines.next().is_some_and(|l| l.contains("kernel 6.18.0")));
        assert!(lines.next().is_some_and(|l| l.starts_with("# settings")));
        assert_eq!(lines.next(), Some(CSV_HEADER));
        let rows: Vec<&str> = lines.collect();
        // 2 scales × (control + 3 targets × data) + the row saying ipvs did not run.
        assert_eq!(rows.len(), 2 * (CONTROL.len() + 3 * DATA.len()) + 1);
        let columns = CSV_HEADER.split(',').count();
        assert!(
            rows.iter().all(|r| r.split(',').count() == columns),
            "{text}"
        );
        assert!(
            rows.contains(
                &"ebpf,ran,1,first,newconn_p50_us,µs,107.1,102,112.2,2,102;112.2,1.02,1.02,1.02,2.04,2.04,2.04"
            ),
            "{text}"
        );
        assert!(rows.contains(&"ipvs,not run: the kernel has no IP_VS,,,,,,,,,,,,,,,"));
    }

    #[test]
    fn json_round_trips() {
        let report = sample();
        let text = serde_json::to_string_pretty(&report).expect("json");
        let back: Report = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, report);
    }

    #[test]
    fn compare_reads_ratios_too_and_forgives_a_cpu_tick() {
        let mut old = sample();
        old.backends[0].scales[0]
            .control
            .insert("proxy_cpu_s".into(), spread(&[0.01, 0.01, 0.01]));
        let mut new = sample();
        let ebpf = &mut new.backends[0].scales[0];
        // Proxy CPU counted in 10 ms ticks: 0.01 s → 0.02 s is their rounding, not +100%.
        ebpf.control
            .insert("proxy_cpu_s".into(), spread(&[0.01, 0.02, 0.02]));
        // The first Service 30% slower against direct: a ratio row of its own, worse.
        ebpf.targets[2]
            .vs_direct
            .insert("newconn_p50_us".into(), spread(&[1.33, 1.33]));
        ebpf.full_vs_loader = Some(spread(&[1.25, 1.26]));
        let text = compare(&old, &new);
        let row = |figure: &str| {
            text.lines()
                .find(|l| l.contains(figure))
                .unwrap_or_else(|| panic!("{figure} missing from\n{text}"))
                .to_string()
        };
        assert!(row("newconn_p50_us ×direct").ends_with("worse"), "{text}");
        assert!(!row("full_sync_ms ×loader").ends_with("worse"), "{text}");
        let cpu = text
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some("proxy_cpu_s"))
            .expect("a proxy_cpu_s row");
        assert!(cpu.contains("+100.0%") && !cpu.ends_with("worse"), "{text}");
        // Every figure of both scales: CONTROL, ×loader, DATA and DATA ×direct for the
        // Service target, DATA for direct and loopback; one of them moved beyond ±10%. After
        // the host: the same but for the loopback's own figures.
        let per_scale = CONTROL.len() + 1 + DATA.len() * 4;
        let total = 2 * per_scale;
        let host_total = total - 2 * DATA.len();
        assert_eq!(
            totals(&text),
            [(total - 1, total), (host_total - 1, host_total)],
            "{text}"
        );
    }

    #[test]
    fn compare_flags_changes_beyond_ten_percent_by_direction() {
        let old = sample();
        let mut new = sample();
        let ebpf = &mut new.backends[0].scales[0];
        // Latency 20% higher: worse. Connection rate 20% higher: better.
        ebpf.targets[2]
            .metrics
            .insert("newconn_p50_us".into(), spread(&[126.0, 131.0]));
        ebpf.targets[2]
            .metrics
            .insert("conns_per_s".into(), spread(&[126.0, 131.0]));
        let text = compare(&old, &new);
        assert_eq!(
            first_service_row(&text, "newconn_p50_us")[6..8],
            ["+20.0%", "worse"],
            "{text}"
        );
        assert_eq!(
            first_service_row(&text, "conns_per_s")[7],
            "better",
            "{text}"
        );
        assert_eq!(first_service_row(&text, "tcp_gbit_s")[6], "+0.0%", "{text}");
        assert!(text.contains("1 worse"), "{text}");
        // The per-figure summary: two Services' worth of each figure, one moved by 20%.
        let agreement = text
            .split("agreement by figure")
            .nth(1)
            .unwrap_or_else(|| panic!("no agreement summary in\n{text}"));
        let summary = |key: &str| {
            agreement
                .lines()
                .find(|l| l.split_whitespace().next() == Some(key))
                .unwrap_or_else(|| panic!("{key} missing from\n{agreement}"))
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let moved = summary("newconn_p50_us");
        assert_eq!(moved.split_whitespace().nth(1), Some("+20.0%"), "{moved}");
        let (within, of) = moved
            .split_whitespace()
            .next()
            .and_then(|f| f.split_once('/'))
            .expect("within/of");
        assert_eq!(
            within.parse::<usize>().expect("n") + 1,
            of.parse::<usize>().expect("n")
        );
        assert_eq!(
            summary("tcp_gbit_s").split_whitespace().nth(1),
            Some("+0.0%"),
            "{agreement}"
        );
    }

    #[test]
    fn a_host_that_slowed_down_is_divided_out_after_the_host() {
        let old = sample();
        let mut new = sample();
        // The host 20% slower for every load of one cell, the loopback's included: every
        // traffic figure moves by 20%, none against the loopback of its round.
        let cell = &mut new.backends[0].scales[0];
        for t in &mut cell.targets {
            for (key, s) in &mut t.metrics {
                let factor = if lookup(key).is_some_and(|m| m.higher_is_better) {
                    1.0 / 1.2
                } else {
                    1.2
                };
                let moved: Vec<f64> = s.samples.iter().map(|v| v * factor).collect();
                *s = spread(&moved);
            }
        }
        let text = compare(&old, &new);
        assert_eq!(
            first_service_row(&text, "newconn_p50_us")[6..],
            ["+20.0%", "worse", "+0.0%"],
            "{text}"
        );
        let [(within, of), (host_within, host_of)] = totals(&text);
        assert!(within < of, "{text}");
        assert_eq!(host_within, host_of, "{text}");
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(number(123456.0), "123,456");
        assert_eq!(number(1234.4), "1234");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.1234), "0.123");
        assert_eq!(count(1), "1");
        assert_eq!(count(10000), "10,000");
    }
}
