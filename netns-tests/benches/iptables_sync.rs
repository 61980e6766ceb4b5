//! The iptables backend's figures, in throwaway network namespaces (root needed):
//! - full sync of N Services × 10 endpoints (kpx, through its backend) against
//!   `iptables-restore` alone loading the same rules, and against kube-proxy's layout (one
//!   chain per endpoint) for the same Services;
//! - one endpoint changed: the partial sync's time and the share of rules it writes;
//! - kpx-proxy's resident memory at 10,000 Services × 10 endpoints, and network programming
//!   latency (API write → rule in the kernel) at 1,000 Services with `--min-sync-period 0`.
//!
//! Run: `cargo bench -p kpx-lab --bench iptables_sync` (`KPX_BENCH_SCALES=1000,10000`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kpx_proxy::backend::{Backend, NodeState, SyncInput};
use kpx_proxy::iptables::exec::{Flavour, Tool};
use kpx_proxy::iptables::render::{self, Fragments, RenderConfig};
use kpx_proxy::iptables::IptablesBackend;
use kpx_proxy::model::{ChangeTracker, ProxyState};
use serde_json::json;

mod fixtures;

use fixtures::{median, service, slice, ENDPOINTS};

/// Full-sync rounds per flavour and scale; medians are reported, with the range.
const ROUNDS: usize = 3;

/// kube-proxy's layout for the same state: a chain per Service port and one per endpoint.
fn kube_proxy_layout(state: &ProxyState) -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::new();
    for (n, (name, entry)) in state.entries.iter().enumerate() {
        let svc = format!("KUBE-SVC-{n:016}");
        out.push_str(&format!(":{svc} - [0:0]\n"));
        let vip = entry.port.cluster_ips[0];
        rules.push_str(&format!("-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j {svc}\n"));
        let eps = &entry.selected.cluster;
        for (i, ep) in eps.iter().enumerate() {
            let sep = format!("KUBE-SEP-{n:010}{i:06}");
            out.push_str(&format!(":{sep} - [0:0]\n"));
            let prob = if i + 1 < eps.len() {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (eps.len() - i) as f64
                )
            } else {
                String::new()
            };
            rules.push_str(&format!(
                "-A {svc} -m comment --comment \"{name} -> {}:{}\"{prob} -j {sep}\n",
                ep.ip, ep.port
            ));
            rules.push_str(&format!(
                "-A {sep} -s {}/32 -m comment --comment {name} -j KUBE-MARK-MASQ\n",
                ep.ip
            ));
            rules.push_str(&format!("-A {sep} -p tcp -m comment --comment {name} -m tcp -j DNAT --to-destination {}:{}\n", ep.ip, ep.port));
        }
    }
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

fn flush(tool: &Tool) {
    for table in ["nat", "filter"] {
        for flag in ["-F", "-X"] {
            let _ = Command::new(tool.binary(""))
                .args(["-t", table, flag])
                .status();
        }
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

/// Runs inside a fresh namespace: the rule-loading figures for one flavour and scale.
fn inside(flavour: Flavour, services: usize) {
    let tool = Tool {
        flavour,
        ipv6: false,
    };
    let config = RenderConfig {
        cluster_cidr: Some("198.19.0.0/16".into()),
        ..Default::default()
    };
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..services {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let ((state, changes), model_s) = timed(|| tracker.snapshot(&ProxyState::default()));
    let plan = render::plan(
        &config,
        &state,
        &changes,
        &Fragments::new(),
        true,
        &BTreeSet::new(),
        &[],
    );
    // Rounds interleaved (alone, kpx, alone, kpx, ...) from empty tables; medians compared.
    let mut alone = Vec::new();
    let mut kpx = Vec::new();
    let mut last = None;
    for _ in 0..ROUNDS {
        let (_, restore_s) = timed(|| tool.restore(&plan.restore).expect("restore alone"));
        alone.push(restore_s);
        flush(&tool);
        let mut backend = IptablesBackend::new(tool, config.clone());
        let (report, full_s) = timed(|| {
            backend
                .sync(SyncInput {
                    state: &state,
                    changes: &changes,
                    full: true,
                    node: &NodeState::default(),
                })
                .expect("full sync")
        });
        kpx.push(full_s);
        last = Some((backend, report));
        if alone.len() < ROUNDS {
            flush(&tool);
        }
    }
    let (mut backend, report) = last.expect("at least one round");
    let (restore_s, full_s) = (median(&mut alone), median(&mut kpx));
    // One endpoint of one Service changes.
    tracker.apply_slice(slice(services / 2, 1));
    let (next, changes) = tracker.snapshot(&state);
    let (partial, partial_s) = timed(|| {
        backend
            .sync(SyncInput {
                state: &next,
                changes: &changes,
                full: false,
                node: &NodeState::default(),
            })
            .expect("partial sync")
    });
    // The loader's floor for any change: one DNAT rule into a new, unreferenced chain. With
    // iptables-nft the kernel validates every chain reachable from a base chain on each commit
    // that adds such a rule, so this grows with the table whatever the change.
    let floor_input = "*nat\n:KPX-BENCH-FLOOR - [0:0]\n-A KPX-BENCH-FLOOR -p tcp -j DNAT --to-destination 198.19.255.1:1\nCOMMIT\n";
    let (_, floor_s) = timed(|| tool.restore(floor_input).expect("one-rule restore"));
    let kube = if flavour == Flavour::Nft && services > 2000 {
        "not run (quadratic: over 15 min at 10,000 measured)".to_string()
    } else {
        flush(&tool);
        let text = kube_proxy_layout(&state);
        let (_, kube_s) = timed(|| tool.restore(&text).expect("kube-proxy layout"));
        format!("{kube_s:.2} s")
    };
    println!(
        "{:<7} {:>6} x {ENDPOINTS}: model {model_s:.2} s | kpx full sync {full_s:.2} s ({:.2}-{:.2}), restore alone {restore_s:.2} s ({:.2}-{:.2}) -> {:.2}x (medians of {ROUNDS}), {} rules | kube-proxy layout restore {kube} | one endpoint changed: {:.1} ms, {} of {} rules written ({:.3}%); one DNAT rule restored alone: {:.1} ms",
        flavour.name(),
        services,
        kpx[0],
        kpx[ROUNDS - 1],
        alone[0],
        alone[ROUNDS - 1],
        full_s / restore_s,
        report.total.n,
        partial_s * 1000.0,
        partial.written.n,
        partial.total.n,
        100.0 * partial.written.n as f64 / partial.total.n as f64,
        floor_s * 1000.0
    );
    flush(&tool);
}

fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("build {name} first: cargo build --release --workspace --bins"))
}

fn rss_mb(pid: u32) -> f64 {
    kpx_lab::bench::setup::status_kib(pid, "VmRSS:").unwrap_or(0.0) / 1024.0
}

/// Inside a namespace: kpx-control and kpx-proxy for real, over loopback.
fn end_to_end(services: usize, latency_samples: usize) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let mut control = Command::new(binary("kpx-control"))
        .args(["--port", "0", "--data-dir"])
        .arg(dir.path())
        .args(["--service-cluster-ip-range", "198.18.128.0/17"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("kpx-control");
    let mut line = String::new();
    BufReader::new(control.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let url = line.trim().rsplit(' ').next().expect("url").to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let http = reqwest::blocking::Client::new();
    let _ = http
        .post(format!("{url}/api/v1/namespaces"))
        .json(&json!({"metadata": {"name": "bench"}}))
        .send();
    runtime.block_on(async {
        let client = reqwest::Client::new();
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
    let proxy = Command::new(binary("kpx-proxy"))
        .args([
            "--master",
            &url,
            "--hostname-override",
            "this-node",
            "--cluster-cidr",
            "198.19.0.0/16",
            "--min-sync-period",
            "0s",
        ])
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("kpx-proxy");
    let tool = Tool::detect(false);
    let started = Instant::now();
    loop {
        let out = Command::new(tool.binary("-save"))
            .args(["-t", "nat"])
            .output()
            .expect("save");
        let chains = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(":KPX-SVC-"))
            .count();
        if chains >= services {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "rules never appeared"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let synced = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let early = rss_mb(proxy.id());
    // The allocator hands freed pages back over seconds; the steady state is what a node pays.
    std::thread::sleep(Duration::from_secs(20));
    println!(
        "kpx-proxy at {services} x {ENDPOINTS}: first full sync done after {synced:.1} s, RSS {early:.0} MB 2 s later, {:.0} MB steady (22 s later)",
        rss_mb(proxy.id())
    );
    if latency_samples > 0 {
        let mut samples = Vec::new();
        for n in 0..latency_samples {
            let i = (n * 7) % services;
            let name = kpx_proxy::model::ServicePortName {
                service: kpx_proxy::model::NamespacedName::new("bench", &format!("svc-{i:05}")),
                port: "http".into(),
                protocol: kpx_proxy::model::Protocol::Tcp,
            };
            let chain = kpx_proxy::iptables::chains::service_chain(&name);
            let new_ip = format!("198.19.250.{}", n % 250 + 1);
            let patch =
                json!({"endpoints": [{"addresses": [new_ip], "conditions": {"ready": true}}]});
            let t0 = Instant::now();
            http.patch(format!(
                "{url}/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-{i:05}-1"
            ))
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .expect("patch");
            loop {
                let out = Command::new(tool.binary(""))
                    .args(["-t", "nat", "-S", &chain])
                    .output()
                    .expect("iptables -S");
                if String::from_utf8_lossy(&out.stdout).contains(&format!("{new_ip}:8080")) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "change never programmed"
                );
            }
            samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        println!(
            "network programming latency at {services} Services (API write -> rule in the kernel, polled): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            samples[samples.len() / 2],
            samples[samples.len() * 9 / 10],
            samples[samples.len() - 1]
        );
    }
    let mut proxy = proxy;
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = control.kill();
    let _ = control.wait();
    flush(&tool);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--inside") {
        let what = &args[pos + 1];
        let services: usize = args[pos + 2].parse().expect("scale");
        match what.as_str() {
            "nft" => inside(Flavour::Nft, services),
            "legacy" => inside(Flavour::Legacy, services),
            "e2e" => end_to_end(
                services,
                args.get(pos + 3).and_then(|s| s.parse().ok()).unwrap_or(0),
            ),
            other => panic!("unknown mode {other}"),
        }
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the iptables benchmark needs root (network namespaces)");
        return;
    }
    let scales: Vec<usize> = std::env::var("KPX_BENCH_SCALES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let exe = std::env::current_exe().expect("exe");
    let run = |mode: &str, extra: &[String]| {
        let ns = format!("kpx-bench-{}-{mode}", std::process::id());
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
            .arg("--inside")
            .arg(mode)
            .args(extra)
            .status();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        assert!(status.is_ok_and(|s| s.success()), "{mode} {extra:?} failed");
    };
    println!("iptables backend benchmark (rules loading; each row in a fresh network namespace)");
    for scale in &scales {
        for mode in ["nft", "legacy"] {
            run(mode, &[scale.to_string()]);
        }
    }
    run("e2e", &["1000".into(), "50".into()]);
    run("e2e", &["10000".into(), "0".into()]);
}
