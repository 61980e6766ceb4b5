//! The nftables backend's figures, each scale in a throwaway network namespace (root needed):
//! 1. full sync of N Services × 10 endpoints through `NftablesBackend` (wall time, and the CPU
//!    `nft` spent in it: its user + system time, the kernel's commit included), beside `nft -f`
//!    alone of the same plan text (`render::full_text`) and beside kube-proxy's nftables layout
//!    for the same Services (`kpx_lab::bench::kube_nft`: a numgen vmap per Service, a chain per
//!    endpoint); rounds interleaved (alone, kube-proxy, kpx), the tables deleted between,
//!    medians with the range;
//! 2. one endpoint changed among N: the partial sync's time over `KPX_BENCH_CHANGES` (30)
//!    changes, each on another Service, p50 / p90 / max — an endpoint's address swapped (same
//!    count), and an endpoint added (count changes);
//! 3. kpx-proxy (`--proxy-mode nftables`) against kpx-control: its resident memory at
//!    min(largest scale, 10,000) Services × 10 endpoints, and network programming latency
//!    there (API write → the new address in the kernel's endpoint map, polled with `nft`).
//!
//! A table and `nftables_sync.json` (`KPX_BENCH_JSON` to put it elsewhere) are the output.
//!
//! Run: `cargo bench -p kpx-lab --bench nftables_sync` (`KPX_BENCH_SCALES=1000,10000`, also
//! runnable at 100000; kube-proxy's layout is measured up to 10,000, once only when a load
//! takes over 120 s).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_lab::bench::kube_nft;
use kpx_proxy::backend::{Backend, NodeState, SyncInput, SyncReport};
use kpx_proxy::model::{ChangeTracker, ProxyState};
use kpx_proxy::nftables::render::{self, RenderConfig};
use kpx_proxy::nftables::NftablesBackend;
use serde_json::{json, Value};

mod fixtures;

use fixtures::{median, service, slice, ENDPOINTS};

/// Full-sync rounds per scale; medians are reported, with the range.
const ROUNDS: usize = 3;
/// A kube-proxy layout load longer than this is measured once, not every round.
const KUBE_ONCE_AFTER: Duration = Duration::from_secs(120);
/// Above this many Services kube-proxy's layout is not loaded (92 s at 10,000 × 1 already).
const KUBE_MAX_SERVICES: usize = 10_000;
const CLUSTER_CIDR: &str = "198.19.0.0/16";
const SERVICE_CIDR: &str = "198.18.128.0/17";

/// The CPU seconds (user + system) of this process's waited-for children: the `nft` runs.
fn children_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// One timed run: wall seconds and the children's CPU seconds.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let cpu = children_cpu();
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64(), children_cpu() - cpu)
}

fn nft(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("nft stdin");
    drop(input);
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every table of this (scratch) namespace gone.
fn flush_ruleset() {
    nft(&["flush", "ruleset"], None);
}

/// The network namespace the benchmark was started in (the parent hands it to `--inside`).
const PARENT_NETNS: &str = "KPX_BENCH_PARENT_NETNS";

fn own_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .expect("/proc/self/ns/net")
        .display()
        .to_string()
}

/// The benchmark must run inside a namespace of its own: it flushes the whole ruleset there.
fn assert_not_root_namespace() {
    let parent = std::env::var(PARENT_NETNS).expect("--inside is started by the benchmark");
    assert_ne!(
        own_netns(),
        parent,
        "the nftables benchmark must not run in the namespace it was started from"
    );
}

/// `values` sorted, with (median, min, max).
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    let m = median(values);
    (m, values[0], values[values.len() - 1])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// kube-proxy's view of the same Services (ClusterIP, cluster policy, the endpoints kpx picks).
fn kube_services(state: &ProxyState) -> Vec<kube_nft::ServicePort> {
    state
        .entries
        .iter()
        .map(|(name, entry)| kube_nft::ServicePort {
            namespace: name.service.namespace.clone(),
            name: name.service.name.clone(),
            port_name: name.port.clone(),
            protocol: name.protocol.lower(),
            cluster_ip: entry.port.cluster_ips[0],
            port: entry.port.port,
            endpoints: entry
                .selected
                .cluster
                .iter()
                .map(|e| SocketAddr::new(e.ip, e.port))
                .collect(),
        })
        .collect()
}

/// Service `i`'s slice with one endpoint more than the fixture's (the count changes).
fn slice_plus_one(i: usize) -> EndpointSlice {
    let mut s = slice(i, 0);
    let extra = (i * ENDPOINTS) % 250 + 1;
    s.endpoints.push(
        serde_json::from_value(json!({"addresses": [format!("198.19.251.{extra}")],
            "conditions": {"ready": true}, "nodeName": "other"}))
        .expect("endpoint"),
    );
    s
}

fn full_sync(
    backend: &mut NftablesBackend,
    state: &ProxyState,
    changes: &kpx_proxy::model::Changes,
) -> SyncReport {
    backend
        .sync(SyncInput {
            state,
            changes,
            full: true,
            node: &NodeState::default(),
        })
        .unwrap_or_else(|e| panic!("full sync failed: {e}"))
}

/// `count` Services, spread over the table and distinct from each other and from `avoid`.
fn spread_services(services: usize, count: usize, salt: usize, avoid: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut k = salt;
    // A prime stride; the bound ends the walk should it share a factor with `services`.
    while out.len() < count.min(services.saturating_sub(avoid.len())) && k < salt + 4 * services {
        let i = (k * 7919) % services;
        k += 1;
        if !out.contains(&i) && !avoid.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// One series of partial syncs: each change's time (ms, sorted) and what it wrote, or the
/// error that ended the series (the backend then starts over with a full sync, so the series
/// stops there rather than measure that).
struct Partials {
    ms: Vec<f64>,
    written: Vec<usize>,
    error: Option<String>,
}

impl Partials {
    fn row(&self) -> String {
        let figures = if self.ms.is_empty() {
            String::new()
        } else {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms ({} changes, {}-{} rules and elements written)",
                percentile(&self.ms, 0.5),
                percentile(&self.ms, 0.9),
                self.ms[self.ms.len() - 1],
                self.ms.len(),
                self.written[0],
                self.written[self.written.len() - 1]
            )
        };
        match &self.error {
            Some(e) => format!("{figures} FAILED after {} changes: {e}", self.ms.len()),
            None => figures,
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({"changes": self.ms.len(), "error": self.error});
        if !self.ms.is_empty() {
            v["p50Ms"] = json!(percentile(&self.ms, 0.5));
            v["p90Ms"] = json!(percentile(&self.ms, 0.9));
            v["maxMs"] = json!(self.ms[self.ms.len() - 1]);
            v["writtenMin"] = json!(self.written[0]);
            v["writtenMax"] = json!(self.written[self.written.len() - 1]);
        }
        v
    }
}

/// Partial syncs, one per changed slice.
fn partials(
    backend: &mut NftablesBackend,
    tracker: &mut ChangeTracker,
    state: &mut ProxyState,
    slices: Vec<EndpointSlice>,
) -> Partials {
    let mut out = Partials {
        ms: Vec::new(),
        written: Vec::new(),
        error: None,
    };
    for s in slices {
        tracker.apply_slice(s);
        let (next, changes) = tracker.snapshot(state);
        let (report, wall, _) = timed(|| {
            backend.sync(SyncInput {
                state: &next,
                changes: &changes,
                full: false,
                node: &NodeState::default(),
            })
        });
        *state = next;
        match report {
            Ok(report) => {
                out.ms.push(wall * 1000.0);
                out.written.push(report.written.n);
            }
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        }
    }
    out.ms.sort_by(f64::total_cmp);
    out.written.sort_unstable();
    out
}

/// Runs inside a fresh namespace: the loading figures at one scale, as JSON.
fn inside(services: usize, changes: usize) -> Value {
    assert_not_root_namespace();
    let config = RenderConfig {
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        ..Default::default()
    };
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..services {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let ((mut state, changes0), model_s, _) = timed(|| tracker.snapshot(&ProxyState::default()));
    let (plan, render_s, _) = timed(|| render::full_text(&config, &state));
    let kube_layout = kube_nft::Layout {
        ipv6: false,
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        service_cidr: Some(SERVICE_CIDR.into()),
    };
    let (kube_text, kube_render_s, _) =
        timed(|| kube_nft::full_sync(&kube_layout, &kube_services(&state)));
    let kube_runs = services <= KUBE_MAX_SERVICES;
    let mut kube_once = false;

    let (mut alone, mut alone_cpu) = (Vec::new(), Vec::new());
    let (mut kube, mut kube_cpu) = (Vec::new(), Vec::new());
    let (mut kpx, mut kpx_cpu) = (Vec::new(), Vec::new());
    let mut last = None;
    flush_ruleset();
    for round in 0..ROUNDS {
        let (_, wall, cpu) = timed(|| nft(&["-f", "-"], Some(&plan)));
        alone.push(wall);
        alone_cpu.push(cpu);
        flush_ruleset();
        if kube_runs && !kube_once {
            let (_, wall, cpu) = timed(|| nft(&["-f", "-"], Some(&kube_text)));
            kube.push(wall);
            kube_cpu.push(cpu);
            kube_once = round == 0 && wall > KUBE_ONCE_AFTER.as_secs_f64();
            flush_ruleset();
        }
        let mut backend = NftablesBackend::new(config.clone());
        let (report, wall, cpu) = timed(|| full_sync(&mut backend, &state, &changes0));
        kpx.push(wall);
        kpx_cpu.push(cpu);
        if round + 1 < ROUNDS {
            flush_ruleset();
        }
        last = Some((backend, report));
    }
    let (mut backend, report) = last.expect("at least one round");
    let (alone_s, alone_lo, alone_hi) = spread(&mut alone);
    let (kpx_s, kpx_lo, kpx_hi) = spread(&mut kpx);
    let (alone_cpu_s, ..) = spread(&mut alone_cpu);
    let (kpx_cpu_s, ..) = spread(&mut kpx_cpu);
    let kube_fig = (!kube.is_empty()).then(|| {
        let (m, lo, hi) = spread(&mut kube);
        let (cpu, ..) = spread(&mut kube_cpu);
        (m, lo, hi, cpu, kube.len())
    });

    // One endpoint changed: an address swapped on each of `changes` Services, then an endpoint
    // added on as many others.
    let swapped = spread_services(services, changes, 0, &[]);
    let added = spread_services(services, changes, 1, &swapped);
    let swaps = partials(
        &mut backend,
        &mut tracker,
        &mut state,
        swapped.iter().map(|&i| slice(i, 1)).collect(),
    );
    let adds = partials(
        &mut backend,
        &mut tracker,
        &mut state,
        added.iter().map(|&i| slice_plus_one(i)).collect(),
    );
    flush_ruleset();

    let kube_col = match kube_fig {
        Some((m, lo, hi, cpu, n)) => format!(
            "{m:.2} s ({lo:.2}-{hi:.2}, nft CPU {cpu:.2} s{}) -> kpx {:.1}x faster",
            if n == 1 {
                ", measured once: over 120 s".to_string()
            } else {
                String::new()
            },
            m / kpx_s
        ),
        None => format!("not run (over {KUBE_MAX_SERVICES} Services)"),
    };
    println!(
        "nftables {services:>6} x {ENDPOINTS}: model {model_s:.2} s, render {render_s:.2} s | kpx full sync {kpx_s:.2} s ({kpx_lo:.2}-{kpx_hi:.2}, nft CPU {kpx_cpu_s:.2} s), nft -f alone {alone_s:.2} s ({alone_lo:.2}-{alone_hi:.2}, nft CPU {alone_cpu_s:.2} s) -> {:.2}x (medians of {ROUNDS}), {} rules | kube-proxy layout {kube_col}",
        kpx_s / alone_s,
        report.total.n,
    );
    println!(
        "nftables {services:>6} x {ENDPOINTS}: one endpoint's address swapped: {} | one endpoint added: {}",
        swaps.row(),
        adds.row()
    );
    json!({
        "services": services,
        "endpointsPerService": ENDPOINTS,
        "modelSeconds": model_s,
        "renderSeconds": render_s,
        "rules": report.total.n,
        "planBytes": plan.len(),
        "kpxFullSync": {"medianSeconds": kpx_s, "minSeconds": kpx_lo, "maxSeconds": kpx_hi,
            "nftCpuSeconds": kpx_cpu_s, "rounds": ROUNDS},
        "nftAlone": {"medianSeconds": alone_s, "minSeconds": alone_lo, "maxSeconds": alone_hi,
            "nftCpuSeconds": alone_cpu_s, "rounds": ROUNDS},
        "kubeProxyLayout": kube_fig.map(|(m, lo, hi, cpu, n)| json!({
            "medianSeconds": m, "minSeconds": lo, "maxSeconds": hi, "nftCpuSeconds": cpu,
            "rounds": n, "bytes": kube_text.len(), "generateSeconds": kube_render_s,
            "kpxTimesFaster": m / kpx_s})),
        "endpointAddressSwapped": swaps.json(),
        "endpointAdded": adds.json(),
    })
}

/// Processes killed when the run ends, a failed one too (a panic unwinds through this).
struct Reap(Vec<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rss_mb(pid: u32) -> f64 {
    kpx_lab::bench::setup::status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Inside a namespace: kpx-control and kpx-proxy for real, over loopback, as JSON.
fn end_to_end(services: usize, latency_samples: usize) -> Value {
    assert_not_root_namespace();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let bin = |name: &str| {
        kpx_lab::lab::binary(name).expect("build the binaries first: cargo build --bins")
    };
    let control = Command::new(bin("kpx-control"))
        .args(["--port", "0", "--data-dir"])
        .arg(dir.path())
        .args(["--service-cluster-ip-range", SERVICE_CIDR])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("kpx-control");
    let mut children = Reap(vec![control]);
    let mut line = String::new();
    BufReader::new(children.0[0].stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let url = line.trim().rsplit(' ').next().expect("url").to_string();
    // The API is HTTPS with bearer tokens: the admin token kpx-control made, and its CA.
    let token = std::fs::read_to_string(dir.path().join("tokens.csv"))
        .expect("tokens.csv")
        .split(',')
        .next()
        .expect("a token")
        .trim()
        .to_string();
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("ca.crt")).expect("ca.crt"))
            .expect("the CA");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let http = reqwest::blocking::Client::builder()
        .add_root_certificate(ca.clone())
        .default_headers(headers.clone())
        .build()
        .expect("client");
    // The metrics endpoint is plain HTTP on the namespace's loopback.
    let plain = reqwest::blocking::Client::new();
    let _ = http
        .post(format!("{url}/api/v1/namespaces"))
        .json(&json!({"metadata": {"name": "bench"}}))
        .send();
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .default_headers(headers)
            .build()
            .expect("client");
        let mut tasks = Vec::new();
        for w in 0..16 {
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                for i in (w..services).step_by(16) {
                    let svc = serde_json::to_value(service(i)).expect("json");
                    client
                        .post(format!("{url}/api/v1/namespaces/bench/services"))
                        .json(&svc)
                        .send()
                        .await
                        .expect("svc");
                    let sl = serde_json::to_value(slice(i, 0)).expect("json");
                    client
                        .post(format!(
                            "{url}/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices"
                        ))
                        .json(&sl)
                        .send()
                        .await
                        .expect("slice");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
    let proxy = Command::new(bin("kpx-proxy"))
        .args(["--proxy-mode", "nftables", "--kubeconfig"])
        .arg(dir.path().join("admin.kubeconfig"))
        .args([
            "--hostname-override",
            "this-node",
            "--cluster-cidr",
            CLUSTER_CIDR,
        ])
        .args(["--min-sync-period", "0s"])
        // This namespace's own loopback: nothing else listens here.
        .args(["--healthz-bind-address", "127.0.0.1:10256"])
        .args(["--metrics-bind-address", "127.0.0.1:10249"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("kpx-proxy");
    let proxy_pid = proxy.id();
    children.0.push(proxy);
    // Every Service was written before the proxy started, and nothing is programmed before
    // both initial lists are in: the first full sync holds them all.
    let started = Instant::now();
    loop {
        let text = plain
            .get("http://127.0.0.1:10249/metrics")
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default();
        if metric(
            &text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        )
        .is_some_and(|n| n >= 1.0)
        {
            break;
        }
        assert!(
            children.0[1].try_wait().expect("wait").is_none(),
            "kpx-proxy exited"
        );
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "no full sync within 15 min"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let synced = started.elapsed().as_secs_f64();
    let chains = nft(&["list", "chains", "ip"], None)
        .lines()
        .filter(|l| l.trim_start().starts_with("chain svc-"))
        .count();
    assert!(
        chains >= services,
        "{chains} Service chains for {services} Services"
    );
    std::thread::sleep(Duration::from_secs(2));
    let early = rss_mb(proxy_pid);
    // The allocator hands freed pages back over seconds; the steady state is what a node pays.
    std::thread::sleep(Duration::from_secs(20));
    let steady = rss_mb(proxy_pid);
    println!(
        "kpx-proxy (nftables) at {services} x {ENDPOINTS}: first full sync done after {synced:.1} s, RSS {early:.0} MB 2 s later, {steady:.0} MB steady (22 s later)"
    );
    let mut latency = Value::Null;
    if latency_samples > 0 {
        let mut samples = Vec::new();
        for n in 0..latency_samples {
            let i = (n * 7) % services;
            let name = kpx_proxy::model::ServicePortName {
                service: kpx_proxy::model::NamespacedName::new("bench", &format!("svc-{i:05}")),
                port: "http".into(),
                protocol: kpx_proxy::model::Protocol::Tcp,
            };
            // The shard map holding this Service's endpoints, read before the write.
            let chain = kpx_proxy::nftables::chains::service_chain(&name);
            let rules = nft(&["list", "chain", "ip", "kpx", &chain], None);
            let map = rules
                .split_whitespace()
                .find_map(|w| w.strip_prefix("@endpoints-"))
                .map(|k| format!("endpoints-{k}"))
                .unwrap_or_else(|| panic!("no endpoint map in {chain}:\n{rules}"));
            // One address swapped, the count kept: the endpoints of slice(i, 0) but the first.
            let new_ip = format!("198.19.250.{}", n % 250 + 1);
            let mut endpoints = vec![
                json!({"addresses": [new_ip], "conditions": {"ready": true}, "nodeName": "other"}),
            ];
            let old = serde_json::to_value(slice(i, 0)).expect("json");
            endpoints.extend(
                old["endpoints"].as_array().expect("endpoints")[1..]
                    .iter()
                    .cloned(),
            );
            let patch = json!({"endpoints": endpoints});
            let wanted = format!("{new_ip} . 8080");
            let t0 = Instant::now();
            http.patch(format!(
                "{url}/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-{i:05}-1"
            ))
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .expect("patch");
            loop {
                if nft(&["list", "map", "ip", "kpx", &map], None).contains(&wanted) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "change never programmed"
                );
            }
            samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        samples.sort_by(f64::total_cmp);
        // One poll's cost, the measurement's resolution.
        let (_, poll_s, _) = timed(|| nft(&["list", "map", "ip", "kpx", "endpoints-tcp-0"], None));
        println!(
            "network programming latency at {services} Services (API write -> address in the kernel's endpoint map, polled; one poll {:.1} ms): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms ({} changes)",
            poll_s * 1000.0,
            percentile(&samples, 0.5),
            percentile(&samples, 0.9),
            samples[samples.len() - 1],
            samples.len()
        );
        latency = json!({"p50Ms": percentile(&samples, 0.5), "p90Ms": percentile(&samples, 0.9),
            "maxMs": samples[samples.len() - 1], "samples": samples.len(), "pollMs": poll_s * 1000.0});
    }
    drop(children);
    flush_ruleset();
    json!({"services": services, "endpointsPerService": ENDPOINTS, "firstFullSyncSeconds": synced,
        "rssMiBEarly": early, "rssMiBSteady": steady, "networkProgrammingLatency": latency})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--inside") {
        let what = &args[pos + 1];
        let services: usize = args[pos + 2].parse().expect("scale");
        let extra: usize = args[pos + 3].parse().expect("count");
        let out = &args[pos + 4];
        let value = match what.as_str() {
            "sync" => inside(services, extra),
            "e2e" => end_to_end(services, extra),
            other => panic!("unknown mode {other}"),
        };
        std::fs::write(out, value.to_string()).expect("writing the figures");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the nftables benchmark needs root (network namespaces)");
        return;
    }
    let scales: Vec<usize> = std::env::var("KPX_BENCH_SCALES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let changes: usize = std::env::var("KPX_BENCH_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let exe = std::env::current_exe().expect("exe");
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let run = |mode: &str, services: usize, extra: usize| -> Value {
        // The lab prefix: `kpx-lab down --all` removes it if this run is killed.
        let ns = format!("kpx-bench-{}-nft-{mode}", std::process::id());
        let out = tmp.path().join(format!("{mode}-{services}.json"));
        assert!(Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .expect("ip")
            .success());
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])
            .status();
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&exe)
            .env(PARENT_NETNS, own_netns())
            .arg("--inside")
            .arg(mode)
            .args([services.to_string(), extra.to_string()])
            .arg(&out)
            .status();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "{mode} at {services} failed"
        );
        serde_json::from_str(&std::fs::read_to_string(&out).expect("figures")).expect("json")
    };
    println!("nftables backend benchmark (each row in a fresh network namespace)");
    let mut syncs = Vec::new();
    for &scale in &scales {
        syncs.push(run("sync", scale, changes));
    }
    let e2e_scale = scales.iter().copied().max().unwrap_or(10_000).min(10_000);
    let e2e = run("e2e", e2e_scale, changes);
    let report = json!({
        "benchmark": "nftables_sync",
        "version": env!("CARGO_PKG_VERSION"),
        "nft": nft(&["--version"], None).trim(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "scales": syncs,
        "endToEnd": e2e,
    });
    let path = std::env::var("KPX_BENCH_JSON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nftables_sync.json")
        });
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
        .expect("writing the report");
    println!("figures written to {}", path.display());
}
