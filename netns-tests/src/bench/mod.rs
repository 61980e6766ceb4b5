//! `kpx-lab bench`: every backend side by side on identical traffic.
//!
//! One lab per backend (a node, a client pod, the server pods), all alive at once so runs
//! interleave between backends: for each scale, the Services are filled in every lab, then
//! each round measures every backend's control plane and then every backend's data plane
//! (A B C A B C …). Each data-plane round runs the loopback target (the client pod's own
//! loopback: the host alone, no proxy rule or map entry on its path), the direct target (the
//! server pods' IPs) and the first, middle and last Service in the table in slices, the
//! targets in turn slice by
//! slice, so every Service run has a direct run from the same stretch of time to be divided
//! by, and every run of the round a host reference to tell the host's speed from the
//! dataplane's when two runs are compared. The traffic's clients and servers share one core;
//! everything else keeps off it ([`cpus`]).

pub mod client;
pub mod cpus;
pub mod kube_nft;
pub mod loader;
pub mod loads;
pub mod machine;
pub mod plot;
pub mod progress;
pub mod promises;
pub mod report;
pub mod setup;
pub mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cpus::Placement;

use crate::lab::{ProxyBackend, ALL_BACKENDS};
use crate::traffic::metric_value;
use progress::Progress;
use report::{BackendResult, Report, ScaleResult, Settings, TargetResult};
use setup::{BenchLab, HTTP_PORT, IPERF_PORT, LOOPBACK_IP, POD_HTTP_PORT, UDP_PORT};
use stats::{paired_ratio, percentile, Spread};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Numbers of Services to measure at (each with `--endpoints-per-service` endpoints).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    pub services: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    pub endpoints_per_service: usize,
    /// Backends to measure: iptables-nft, iptables-legacy, ebpf, ipvs, nftables (default:
    /// all; one this kernel or kpx cannot run is a row saying why).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Measurement rounds per scale, interleaved between backends.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Endpoint changes per control round (each a one-endpoint sync and a network programming
    /// latency): a small table's sync takes a few milliseconds and varies by half from one
    /// change to the next, so its median needs many.
    #[arg(long, default_value_t = ENDPOINT_CHANGES)]
    pub endpoint_changes: usize,
    /// New connections per latency run (and per connection-rate run).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections at a time in the connection-rate run.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Requests per keep-alive run.
    #[arg(long, default_value_t = 2000)]
    pub keepalive_requests: usize,
    /// Request/response exchanges per UDP run.
    #[arg(long, default_value_t = 5000)]
    pub udp_requests: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 1)]
    pub tcp_seconds: u32,
    /// The core the traffic's clients and servers share, the rest of the bench keeping off it
    /// (default: the last core; `none`: wherever the scheduler puts them).
    #[arg(long, value_name = "CORE|none")]
    pub cpu: Option<String>,
    /// Where report.json, report.csv and the plots go.
    #[arg(long, default_value = "kpx-bench")]
    pub out: PathBuf,
    /// An earlier report.json to print the change against.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Measure nothing: render this report.json again (table, CSV, plots into `--out`).
    #[arg(long, value_name = "REPORT")]
    pub from: Option<PathBuf>,
}

impl Options {
    /// Checks every option before anything is built; errors name the option and what it takes.
    pub fn validate(&mut self) -> anyhow::Result<(Choices, Placement)> {
        self.services.sort_unstable();
        self.services.dedup();
        if self.services.is_empty()
            || self.services[0] == 0
            || self.services[self.services.len() - 1] > 30_000
        {
            bail!(
                "--services {:?}: allowed values: numbers from 1 to 30000, comma-separated",
                self.services
            );
        }
        if !(1..=50).contains(&self.endpoints_per_service) {
            bail!(
                "--endpoints-per-service {}: allowed values: 1 to 50",
                self.endpoints_per_service
            );
        }
        if !(1..=20).contains(&self.rounds) {
            bail!("--rounds {}: allowed values: 1 to 20", self.rounds);
        }
        for (flag, v, lo, hi) in [
            ("--connections", self.connections, 10, 1_000_000),
            ("--concurrency", self.concurrency, 1, 64),
            (
                "--keepalive-requests",
                self.keepalive_requests,
                10,
                1_000_000,
            ),
            ("--udp-requests", self.udp_requests, 10, 1_000_000),
            ("--tcp-seconds", self.tcp_seconds as usize, 1, 60),
            ("--endpoint-changes", self.endpoint_changes, 1, 100),
        ] {
            if !(lo..=hi).contains(&v) {
                bail!("{flag} {v}: allowed values: {lo} to {hi}");
            }
        }
        let known: Vec<&str> = ALL_BACKENDS.iter().map(|b| b.name()).collect();
        let wanted: Vec<String> = if self.backends.is_empty() {
            known.iter().map(|s| s.to_string()).collect()
        } else {
            self.backends.clone()
        };
        let mut out = Vec::new();
        for name in wanted {
            if let Some(b) = ALL_BACKENDS.iter().find(|b| b.name() == name) {
                out.push((name, b.unsupported().map_or(Ok(*b), Err)));
            } else {
                bail!("--backends {name:?}: allowed values: {}", known.join(", "));
            }
        }
        Ok((out, Placement::choose(self.cpu.as_deref())?))
    }
}

/// Each figure's value in every run, by key.
type Runs = BTreeMap<&'static str, Vec<f64>>;

/// What one backend's runs at one scale gathered, run by run.
#[derive(Default)]
struct Gathered {
    control: Runs,
    programmed: u64,
    /// Per target, in the order measured: its address and figures.
    targets: Vec<(String, String, Runs)>,
}

impl Gathered {
    fn push(&mut self, key: &'static str, v: f64) {
        self.control.entry(key).or_default().push(v);
    }

    fn target(&mut self, name: &str, address: String) -> &mut Runs {
        if let Some(i) = self.targets.iter().position(|t| t.0 == name) {
            return &mut self.targets[i].2;
        }
        self.targets
            .push((name.to_string(), address, BTreeMap::new()));
        &mut self.targets.last_mut().expect("just pushed").2
    }

    fn result(&self, services: usize) -> ScaleResult {
        let spreads = |m: &Runs| -> BTreeMap<String, Spread> {
            m.iter()
                .filter_map(|(k, v)| Some((k.to_string(), Spread::of(v)?)))
                .collect()
        };
        let find = |name: &str| self.targets.iter().find(|t| t.0 == name).map(|t| &t.2);
        let (direct, loopback) = (find(report::DIRECT), find(report::LOOPBACK));
        // Each figure against `base`'s in the same round, pair by pair.
        let against = |m: &Runs, base: &Runs| -> BTreeMap<String, Spread> {
            m.iter()
                .filter(|(k, _)| **k != "failed_requests")
                .filter_map(|(k, v)| Some((k.to_string(), paired_ratio(v, base.get(k)?)?)))
                .collect()
        };
        let targets = self
            .targets
            .iter()
            .map(|(name, address, m)| TargetResult {
                target: name.clone(),
                address: address.clone(),
                metrics: spreads(m),
                vs_direct: match direct {
                    Some(d) if report::is_service(name) => against(m, d),
                    _ => BTreeMap::new(),
                },
                vs_loopback: match loopback {
                    Some(l) if name != report::LOOPBACK => against(m, l),
                    _ => BTreeMap::new(),
                },
            })
            .collect();
        let full_vs_loader = match (
            self.control.get("full_sync_ms"),
            self.control.get("loader_ms"),
        ) {
            (Some(f), Some(l)) => paired_ratio(f, l),
            _ => None,
        };
        ScaleResult {
            services,
            programmed: self.programmed,
            control: spreads(&self.control),
            full_vs_loader,
            targets,
        }
    }
}

/// A place measured: the client pod's loopback (the host reference), the direct pod IP or a
/// Service, with its HTTP, iperf3 and UDP addresses.
struct Target {
    name: &'static str,
    /// New connections go to these in turn (every server directly, or the ClusterIP).
    http: Vec<SocketAddr>,
    tcp: SocketAddr,
    udp: SocketAddr,
}

/// The Services measured among `services`, by their place in the table (one Service is first,
/// middle and last at once, so it is measured once).
fn places(services: usize) -> Vec<(&'static str, usize)> {
    let mut places = vec![
        ("first", 0),
        ("middle", services / 2),
        ("last", services.saturating_sub(1)),
    ];
    places.dedup_by_key(|p| p.1);
    places
}

async fn targets(b: &mut BenchLab, services: usize) -> anyhow::Result<Vec<Target>> {
    let mut out = vec![
        Target {
            name: report::LOOPBACK,
            http: vec![SocketAddr::new(LOOPBACK_IP, POD_HTTP_PORT)],
            tcp: SocketAddr::new(LOOPBACK_IP, IPERF_PORT),
            udp: SocketAddr::new(LOOPBACK_IP, UDP_PORT),
        },
        Target {
            name: report::DIRECT,
            http: b.direct_all(),
            tcp: b.direct(IPERF_PORT),
            udp: b.direct(UDP_PORT),
        },
    ];
    for (name, i) in places(services) {
        b.ensure_twin(i).await?;
        let vip = b.vip(&setup::service_name(i)).await?;
        let twin = b.vip(&format!("{}-s", setup::service_name(i))).await?;
        out.push(Target {
            name,
            http: vec![SocketAddr::new(vip, HTTP_PORT)],
            tcp: SocketAddr::new(twin, IPERF_PORT),
            udp: SocketAddr::new(twin, UDP_PORT),
        });
    }
    Ok(out)
}

/// Rough seconds each step takes, for the time-left estimate.
struct Estimate<'a>(&'a Options);

impl Estimate<'_> {
    fn fill(&self, services: usize) -> f64 {
        services as f64 * 0.0045
    }

    fn control(&self, backend: ProxyBackend, services: usize) -> f64 {
        // Per Service: the full sync and the loader alone; each endpoint change.
        let (per_service, per_change) = match backend {
            ProxyBackend::IptablesNft => (0.0009, 0.00003),
            ProxyBackend::IptablesLegacy => (0.0003, 0.00006),
            ProxyBackend::Ebpf => (0.0001, 0.0),
            // benches/nftables_sync.rs at 10,000 x 10: full sync 1.9 s, nft -f alone 1.7 s
            // (plus the untimed `nft list table` before it), one endpoint changed 40 ms.
            ProxyBackend::Nftables => (0.0004, 0.000004),
            // No figures yet (this kernel has no IPVS); taken as nftables's until measured in
            // the VM.
            ProxyBackend::Ipvs => (0.0004, 0.000004),
        };
        let n = services as f64;
        let full = 0.3 + 2.0 * per_service * n;
        0.7 + full * full_syncs_per_round(services) as f64
            + self.0.endpoint_changes as f64 * (0.2 + per_change * n)
    }

    /// Targets measured at `services`: loopback, direct and the Services' places.
    fn targets(&self, services: usize) -> usize {
        2 + places(services).len()
    }

    /// A warm-up's share of a data round.
    fn warm_up(&self, whole: bool) -> f64 {
        if whole {
            1.0
        } else {
            1.0 / WARM_UP_SHARE as f64
        }
    }

    fn data_target(&self) -> f64 {
        let o = self.0;
        let requests = (2 * o.connections) as f64 * 200e-6
            + o.keepalive_requests as f64 * 60e-6
            + o.udp_requests as f64 * 50e-6;
        requests + f64::from(o.tcp_seconds) + 0.8
    }
}

/// `--endpoint-changes`' default: 12 per round, 60 samples per median over 5 rounds. With 20,
/// two back-to-back runs on a quiet host still put iptables-nft's one-Service sync 32% apart
/// (its samples spread from 8 to 27 ms).
pub const ENDPOINT_CHANGES: usize = 12;

/// Full syncs per control round: each is a proxy restart from empty, one sample. A table of up
/// to 100 Services syncs in a few milliseconds, and those vary by a third from one restart to
/// the next (a 1-Service legacy sync read 13.2 and 14.8 ms in back-to-back runs of one sample
/// a round); three a round there cost a few seconds in all. Larger tables take 0.1–4 s a sync
/// and agree within a few percent with one.
pub fn full_syncs_per_round(services: usize) -> usize {
    if services <= 100 {
        3
    } else {
        1
    }
}

/// A full sync from empty (its time, the proxy's CPU and peak memory after it) and the loader
/// alone with the same rules.
async fn full_sync(b: &mut BenchLab, g: &mut Gathered) -> anyhow::Result<()> {
    const FULL_SUM: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds_sum";
    const FULL_COUNT: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds_count";
    b.restart_proxy_from_empty()?;
    let pid = b.lab.proxy_pid(0).context("the proxy did not start")?;
    let started = Instant::now();
    let text = loop {
        if let Ok(text) = b.metrics() {
            if metric_value(&text, FULL_COUNT).unwrap_or(0.0) >= 1.0 {
                break text;
            }
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("no full sync within 15 min\n{}", b.lab.proxy_logs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    g.push(
        "full_sync_ms",
        metric_value(&text, FULL_SUM).unwrap_or(0.0) * 1000.0,
    );
    let (cpu, rss) = setup::process_usage(pid).context("reading the proxy's usage")?;
    g.push("proxy_cpu_s", cpu);
    g.push("peak_rss_mib", rss);

    let programmed = loader::Programmed::read(b)?;
    g.programmed = programmed.size() as u64;
    let scratch = format!("{}-ld", b.lab.name);
    let alone = programmed.load_alone(&scratch).await?;
    g.push("loader_ms", alone.as_secs_f64() * 1000.0);
    Ok(())
}

/// One backend's control plane, one round: full syncs from empty (time, CPU, memory) with the
/// loader alone beside each, then endpoint changes (each one's sync, and the time until a
/// request reaches the new endpoint).
async fn control_round(
    b: &mut BenchLab,
    changes: usize,
    g: &mut Gathered,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    const PARTIAL_SUM: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds_sum";
    const PARTIAL_COUNT: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count";
    for _ in 0..full_syncs_per_round(b.filled) {
        full_sync(b, g).await?;
    }

    let probe = SocketAddr::new(b.vip("svc-probe").await?, HTTP_PORT);
    b.wait_answering(probe, Duration::from_secs(60)).await?;
    // A change whose new endpoint is not reached in time is noted (with the proxy's log) and
    // made again, a few times at most, so one lost sample does not end the whole run.
    let mut measured = 0;
    let mut attempts = 0;
    while measured < changes {
        attempts += 1;
        let text = b.metrics()?;
        let (sum0, count0) = (
            metric_value(&text, PARTIAL_SUM).unwrap_or(0.0),
            metric_value(&text, PARTIAL_COUNT).unwrap_or(0.0),
        );
        let poller = loads::poll_until(
            &b.client()?,
            probe,
            &b.next_probe_spare(),
            Duration::from_secs(60),
        )?;
        // The poller is up and hitting the old endpoints before the write.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let written = b.swap_probe_endpoint().await?;
        let answered = match poller.answered().await {
            Ok(answered) => answered,
            Err(e) => {
                let partial_syncs = b
                    .metrics()
                    .ok()
                    .and_then(|t| metric_value(&t, PARTIAL_COUNT))
                    .map_or("unknown (no metrics)".into(), |c| (c - count0).to_string());
                let why = format!(
                    "{} backend, {} Services: an endpoint change (to {}) was not served: {e:#}\n\
                     partial syncs since the write: {}; the proxy's view: {}\n{}",
                    b.backend.name(),
                    b.filled,
                    b.current_probe_spare(),
                    partial_syncs,
                    b.programmed_row("svc-probe"),
                    b.lab.proxy_logs()
                );
                anyhow::ensure!(attempts < changes + 2, "{why}");
                eprintln!("{why}");
                notes.push(why);
                continue;
            }
        };
        measured += 1;
        let latency = answered.duration_since(written).unwrap_or_default();
        g.push("programming_ms", latency.as_secs_f64() * 1000.0);
        let waited = Instant::now();
        loop {
            let text = b.metrics()?;
            let count = metric_value(&text, PARTIAL_COUNT).unwrap_or(0.0);
            if count > count0 {
                let sum = metric_value(&text, PARTIAL_SUM).unwrap_or(0.0);
                g.push("change_sync_ms", (sum - sum0) / (count - count0) * 1000.0);
                break;
            }
            anyhow::ensure!(
                waited.elapsed() < Duration::from_secs(30),
                "the endpoint change was served but no partial sync was counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

fn some_answered(run: &client::Run, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !run.latencies_us.is_empty(),
        "{what}: every request failed ({} of them)",
        run.failed
    );
    Ok(())
}

/// Each round's latency and connection loads run in this many slices, the targets in turn
/// slice by slice (direct, first, middle, last, direct, …): on this VM the same load runs
/// ~25% slower for seconds at a time (the host's doing: the other core is idle then), and
/// slices spread every target over the same stretch of time instead of one short window each.
const SLICES: usize = 5;

/// One backend's data plane, one round: every target, each load after a conntrack flush.
async fn data_round(
    b: &BenchLab,
    targets: &[Target],
    o: &Options,
    g: &mut Gathered,
    progress: &mut Progress,
    est: &Estimate<'_>,
    label: &str,
) -> anyhow::Result<()> {
    let client = b.client()?;
    let node = b.node()?;
    let both = [&node, &client.entry];
    let flush = || loads::flush_conntrack(&both);
    let mut sequential: Vec<client::Run> = targets.iter().map(|_| client::Run::default()).collect();
    let mut concurrent = sequential.clone();
    let mut keepalive = sequential.clone();
    let mut udp = sequential.clone();
    let slice = |n: usize| (n / SLICES).max(1);
    for s in 1..=SLICES {
        progress.step(&format!(
            "{label}: {} connections and requests, slice {s}/{SLICES}",
            b.backend.name()
        ));
        for (i, t) in targets.iter().enumerate() {
            flush().await?;
            sequential[i]
                .absorb(loads::new_connections(&client, &t.http, slice(o.connections), 1).await?);
            flush().await?;
            concurrent[i].absorb(
                loads::new_connections(&client, &t.http, slice(o.connections), o.concurrency)
                    .await?,
            );
            keepalive[i]
                .absorb(loads::keepalive(&client, t.http[0], slice(o.keepalive_requests)).await?);
            udp[i].absorb(loads::udp_flow(&client, t.udp, slice(o.udp_requests)).await?);
        }
        progress.done(est.data_target() * targets.len() as f64 * 0.5 / SLICES as f64);
    }
    for (i, t) in targets.iter().enumerate() {
        progress.step(&format!(
            "{label}: {} TCP throughput to {}",
            b.backend.name(),
            t.name
        ));
        let address = t
            .http
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let m = g.target(t.name, address);
        some_answered(&sequential[i], &format!("new connections to {}", t.name))?;
        some_answered(
            &concurrent[i],
            &format!("concurrent connections to {}", t.name),
        )?;
        some_answered(&keepalive[i], &format!("keep-alive requests to {}", t.name))?;
        some_answered(&udp[i], &format!("UDP exchanges with {}", t.udp))?;
        for (key, p) in [
            ("newconn_p50_us", 50.0),
            ("newconn_p90_us", 90.0),
            ("newconn_p99_us", 99.0),
        ] {
            m.entry(key)
                .or_default()
                .push(percentile(&sequential[i].latencies_us, p).unwrap_or(0.0));
        }
        m.entry("conns_per_s")
            .or_default()
            .push(concurrent[i].rate());
        for (key, p) in [("keepalive_p50_us", 50.0), ("keepalive_p99_us", 99.0)] {
            m.entry(key)
                .or_default()
                .push(percentile(&keepalive[i].latencies_us, p).unwrap_or(0.0));
        }
        m.entry("udp_rr_per_s").or_default().push(udp[i].rate());
        let gbit = loads::iperf(&client, t.tcp, o.tcp_seconds).await?;
        m.entry("tcp_gbit_s").or_default().push(gbit);
        let failed =
            sequential[i].failed + concurrent[i].failed + keepalive[i].failed + udp[i].failed;
        m.entry("failed_requests").or_default().push(failed as f64);
        progress.done(est.data_target() * 0.5);
    }
    Ok(())
}

/// A short pass of every load to every target, not recorded: caches, neighbour entries, the
/// clients' pages, the first connection tracking entries.
/// Warm-ups after the first scale run this fraction (1/N) of a round's loads.
const WARM_UP_SHARE: usize = 4;

async fn warm_up(b: &BenchLab, targets: &[Target], o: &Options, whole: bool) -> anyhow::Result<()> {
    let client = b.client()?;
    let part = |n: usize| {
        if whole {
            n
        } else {
            (n / WARM_UP_SHARE).max(10)
        }
    };
    for t in targets {
        loads::new_connections(&client, &t.http, part(o.connections), 1).await?;
        loads::new_connections(&client, &t.http, part(o.connections), o.concurrency).await?;
        loads::keepalive(&client, t.http[0], part(o.keepalive_requests)).await?;
        loads::udp_flow(&client, t.udp, part(o.udp_requests)).await?;
    }
    Ok(())
}

/// How long a data round waits for the load core to go quiet.
const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// The backends to measure, each runnable or the reason it is not.
pub type Choices = Vec<(String, Result<ProxyBackend, String>)>;

/// Measures everything; returns the report (nothing written yet).
pub async fn run(o: &Options, choices: Choices, placement: Placement) -> anyhow::Result<Report> {
    if !nix::unistd::geteuid().is_root() {
        bail!("kpx-lab bench needs root: it builds network namespaces and loads rules");
    }
    for tool in ["iperf3", "conntrack"] {
        which(tool).with_context(|| {
            format!("kpx-lab bench needs {tool} (apt-get install {tool}; `cargo xtask deps` installs it)")
        })?;
    }
    placement.keep_self_off()?;
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let est = Estimate(o);
    let mut labs: Vec<BenchLab> = Vec::new();
    let mut results: Vec<BackendResult> = Vec::new();
    for (name, choice) in &choices {
        match choice {
            Ok(backend) => {
                eprintln!("starting the {name} lab");
                labs.push(BenchLab::start(*backend, o.endpoints_per_service, placement).await?);
            }
            Err(why) => results.push(BackendResult {
                backend: name.clone(),
                not_run: Some(why.clone()),
                scales: vec![],
            }),
        }
    }
    let mut total = 0.0;
    let mut previous = 0;
    for &n in &o.services {
        for b in &labs {
            total += est.fill(n - previous) + o.rounds as f64 * est.control(b.backend, n);
            total += (o.rounds as f64 + est.warm_up(n == o.services[0]))
                * est.targets(n) as f64
                * est.data_target();
        }
        previous = n;
    }
    let mut progress = Progress::new(total);
    let mut gathered: Vec<Vec<(usize, Gathered)>> = labs.iter().map(|_| Vec::new()).collect();
    let mut notes = Vec::new();
    let mut previous = 0;
    for &n in &o.services {
        progress.step(&format!("{n} Services: creating them in every lab"));
        // Proxies stopped meanwhile: thousands of syncs of a growing table would take the
        // API servers' core (each round restarts them from empty anyway).
        for b in &mut labs {
            b.lab.stop_proxy(0);
        }
        let fills: Vec<_> = labs.iter_mut().map(|b| b.fill(n)).collect();
        for r in futures::future::join_all(fills).await {
            r?;
        }
        for b in &mut labs {
            b.lab.start_proxy(0)?;
        }
        let mut places = Vec::new();
        let share = est.fill(n - previous);
        for b in &mut labs {
            let t = targets(b, n).await?;
            for target in &t {
                b.wait_answering(target.http[0], Duration::from_secs(900))
                    .await?;
            }
            places.push(t);
            progress.done(share);
        }
        previous = n;
        for (i, b) in labs.iter().enumerate() {
            progress.step(&format!("{n} Services: warming up {}", b.backend.name()));
            // The first scale's loads are the first the kernel sees: socket and conntrack
            // caches grow during them, so it warms up with a whole round's worth.
            let whole = n == o.services[0];
            warm_up(b, &places[i], o, whole).await?;
            progress.done(est.warm_up(whole) * places[i].len() as f64 * est.data_target());
        }
        let mut at_scale: Vec<Gathered> = labs.iter().map(|_| Gathered::default()).collect();
        for round in 1..=o.rounds {
            let label = format!("{n} Services, round {round}/{}", o.rounds);
            for (i, b) in labs.iter_mut().enumerate() {
                progress.step(&format!(
                    "{label}: {} full sync, loader alone, endpoint change",
                    b.backend.name()
                ));
                control_round(b, o.endpoint_changes, &mut at_scale[i], &mut notes).await?;
                // The restarted proxy has programmed everything; traffic flows again.
                for t in &places[i] {
                    b.wait_answering(t.http[0], Duration::from_secs(60)).await?;
                }
                progress.done(est.control(b.backend, n));
            }
            for (i, b) in labs.iter().enumerate() {
                if placement.settle(SETTLE_WITHIN).await?.is_none() {
                    notes.push(format!(
                        "{label}: the load core was still busy {} s before {}'s traffic; measured anyway",
                        SETTLE_WITHIN.as_secs(),
                        b.backend.name()
                    ));
                }
                data_round(
                    b,
                    &places[i],
                    o,
                    &mut at_scale[i],
                    &mut progress,
                    &est,
                    &label,
                )
                .await?;
            }
        }
        for (i, g) in at_scale.into_iter().enumerate() {
            gathered[i].push((n, g));
        }
    }
    progress.finish();
    for (b, scales) in labs.iter().zip(gathered) {
        results.push(BackendResult {
            backend: b.backend.name().to_string(),
            not_run: None,
            scales: scales.iter().map(|(n, g)| g.result(*n)).collect(),
        });
    }
    // Rows in a stable order: ALL_BACKENDS's.
    let order: Vec<&str> = ALL_BACKENDS.iter().map(|b| b.name()).collect();
    results.sort_by_key(|r| order.iter().position(|n| *n == r.backend));
    drop(labs);
    Ok(Report {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        seconds: started.elapsed().as_secs_f64(),
        machine: machine::describe(),
        settings: Settings {
            services: o.services.clone(),
            endpoints_per_service: o.endpoints_per_service,
            rounds: o.rounds,
            connections: o.connections,
            concurrency: o.concurrency,
            keepalive_requests: o.keepalive_requests,
            udp_requests: o.udp_requests,
            tcp_seconds: o.tcp_seconds,
            endpoint_changes: o.endpoint_changes,
            cpu: placement.describe(),
        },
        backends: results,
        notes,
    })
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .with_context(|| format!("{tool} is not on PATH"))
}

fn read_report(flag: &str, path: &std::path::Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{flag} {}: not a kpx-lab bench report.json", path.display()))
}

/// `kpx-lab bench`: measures, writes report.json, report.csv and the plots into `--out`,
/// prints the table (and the change against `--compare`).
pub async fn main(mut o: Options) -> anyhow::Result<()> {
    // Bad input changes nothing: the earlier report is read before anything is built.
    let (choices, placement) = o.validate()?;
    let old = o
        .compare
        .as_deref()
        .map(|p| read_report("--compare", p))
        .transpose()?;
    let earlier = o
        .from
        .as_deref()
        .map(|p| read_report("--from", p))
        .transpose()?;
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("--out {}: cannot create it", o.out.display()))?;
    let report = match earlier {
        Some(report) => report,
        None => run(&o, choices, placement).await?,
    };
    let json = o.out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(o.out.join("report.csv"), report::csv(&report))?;
    let plots = plot::write_all(&report, &o.out)?;
    print!("{}", report::table(&report));
    if let Some(old) = old {
        println!();
        print!("{}", report::compare(&old, &report));
    }
    println!(
        "\nwrote {}, report.csv and {} plots in {} ({:.0} s)",
        json.display(),
        plots.len(),
        o.out.display(),
        report.seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::places;

    #[test]
    fn each_service_place_is_measured_once() {
        let names = |n: usize| -> Vec<(&str, usize)> { places(n) };
        assert_eq!(names(1), [("first", 0)]);
        assert_eq!(names(2), [("first", 0), ("middle", 1)]);
        assert_eq!(
            names(10_000),
            [("first", 0), ("middle", 5000), ("last", 9999)]
        );
    }
}
