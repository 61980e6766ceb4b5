//! Request latency and new-connection rate through a ClusterIP against the pod IP directly,
//! per backend, with 1 to 10,000 Services in the table (root, network namespaces):
//! - socket LB (eBPF) / OUTPUT DNAT (iptables): a client process on the node, in its cgroup;
//! - per-packet LB (eBPF tc) / PREROUTING DNAT (iptables): a client process in a pod's
//!   namespace outside the node's cgroup, so only the per-packet path can balance it.
//!
//! Each sample is a new TCP connection with one HTTP request (`kpx-workload --client http
//! --latency`), reset by the client after the response so no TIME_WAIT tuple is reused by a
//! later run. After a warm-up run of each, direct and Service runs alternate (A B A B), medians
//! of the rounds' p50/p99.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p kpx-lab --bench dataplane`
//! (`KPX_BENCH_SCALES=1,1000,10000`, `KPX_BENCH_BACKENDS=ebpf,iptables-nft`).

#[allow(dead_code)] // each bench uses part of the fixtures
mod fixtures;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::Api;
use kpx_lab::lab::{Lab, ProxyBackend, ALL_BACKENDS};
use kpx_lab::netns::{Enter, Entry};
use serde_json::json;

const REQUESTS: usize = 2000;
const ROUNDS: usize = 5;

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// (p50, p99) in microseconds, requests per second and failures of `REQUESTS` sequential new
/// connections from a client process started from `entry`.
fn measure(entry: &Entry, target: SocketAddr) -> anyhow::Result<(f64, f64, f64, usize)> {
    let start = Instant::now();
    let out = entry
        .command(kpx_lab::lab::binary("kpx-workload")?)?
        .args([
            "--client",
            "http",
            "--latency",
            "--target",
            &target.to_string(),
        ])
        .args(["--count", &REQUESTS.to_string(), "--timeout-ms", "2000"])
        .output()?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut samples: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let failed = REQUESTS - samples.iter().filter(|s| **s >= 0.0).count();
    samples.retain(|s| *s >= 0.0);
    anyhow::ensure!(
        samples.len() * 2 > REQUESTS,
        "{failed} of {REQUESTS} requests to {target} failed"
    );
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
        samples.len() as f64 / elapsed,
        failed,
    ))
}

async fn fill(lab: &Lab, from: usize, to: usize, pod_ip: &str) -> anyhow::Result<()> {
    let services: Api<Service> = Api::namespaced(lab.client(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(lab.client(), "default");
    futures::stream::iter(from..to)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("fill-{i:05}");
                let svc: Service = serde_json::from_value(json!({"metadata": {"name": name},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))?;
                services.create(&svc).await?;
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [pod_ip], "conditions": {"ready": true}, "nodeName": "node-1"}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}))?;
                slices.create(&slice).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn vip_of(lab: &Lab, i: usize) -> anyhow::Result<SocketAddr> {
    let services: Api<Service> = Api::namespaced(lab.client(), "default");
    let svc = services.get(&format!("fill-{i:05}")).await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    Ok(SocketAddr::new(ip.parse()?, 80))
}

async fn backend_run(backend: ProxyBackend, scales: &[usize]) -> anyhow::Result<()> {
    let mut lab = Lab::start("bench", backend, 1, 0).await?;
    lab.add_pod(0, "server").await?;
    lab.add_pod(0, "client").await?;
    let server = SocketAddr::from((lab.pod("server").ip, 8080));
    let pod_ip = lab.pod("server").ip.to_string();
    let node = lab.nodes[0].entry()?;
    let pod = lab.pod("client").ns.entry()?;
    let mut have = 0;
    for &scale in scales {
        fill(&lab, have, scale, &pod_ip).await?;
        have = scale;
        // The last Service written is the one measured: it is programmed last.
        let vip = vip_of(&lab, scale - 1).await?;
        let ready = Instant::now();
        while measure(&node, vip).map_or(true, |m| m.3 > 0) {
            anyhow::ensure!(
                ready.elapsed() < Duration::from_secs(300),
                "{vip} never answered"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (path, entry) in [
            ("node (socket LB / OUTPUT)", &node),
            ("pod (per-packet / PREROUTING)", &pod),
        ] {
            // Warm-up: caches, neighbour entries, the client binary's pages.
            measure(entry, server)?;
            measure(entry, vip)?;
            let (mut direct, mut service) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                direct.push(measure(entry, server)?);
                service.push(measure(entry, vip)?);
            }
            type Run = (f64, f64, f64, usize);
            let med = |v: &mut Vec<Run>, f: fn(&Run) -> f64| {
                let mut x: Vec<f64> = v.iter().map(f).collect();
                fixtures::median(&mut x)
            };
            let (d50, d99, drate) = (
                med(&mut direct, |s| s.0),
                med(&mut direct, |s| s.1),
                med(&mut direct, |s| s.2),
            );
            let (s50, s99, srate) = (
                med(&mut service, |s| s.0),
                med(&mut service, |s| s.1),
                med(&mut service, |s| s.2),
            );
            let failures: usize = service.iter().chain(&direct).map(|r| r.3).sum();
            println!(
                "{:<15} {scale:>6} svcs  {path:<30} p50 {s50:>6.0} us vs direct {d50:>6.0} ({:.2}x) | p99 {s99:>6.0} vs {d99:>6.0} ({:.2}x) | new conns/s {srate:>6.0} vs {drate:>6.0} ({:.2}x) | failed {failures}",
                backend.name(),
                s50 / d50,
                s99 / d99,
                srate / drate
            );
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the data-plane benchmark needs root (network namespaces)");
        return Ok(());
    }
    let scales: Vec<usize> = std::env::var("KPX_BENCH_SCALES")
        .unwrap_or_else(|_| "1,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let wanted = std::env::var("KPX_BENCH_BACKENDS").unwrap_or_else(|_| "ebpf,iptables-nft".into());
    println!("data plane: {REQUESTS} new connections per run, {ROUNDS} rounds, medians; client and server on one node");
    for name in wanted.split(',') {
        let Some(backend) = ALL_BACKENDS.iter().find(|b| b.name() == name) else {
            anyhow::bail!("KPX_BENCH_BACKENDS: unknown backend {name:?}");
        };
        if let Some(why) = backend.unsupported() {
            println!("{:<15} not run: {why}", backend.name());
            continue;
        }
        backend_run(*backend, &scales).await?;
    }
    Ok(())
}
