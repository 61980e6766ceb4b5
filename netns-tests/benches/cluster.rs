//! The lean cluster's figures: how long `kpx-lab up --nodes 3` takes to be ready for traffic,
//! how long a 100-replica Deployment takes to be Ready and in its Service's EndpointSlices,
//! and the kubelet's resident memory with 50 pods. Medians of `KPX_BENCH_ROUNDS` (default 5).
//! Needs root; run `cargo build --release --workspace --bins` first.

#[allow(dead_code)] // only its median is used here
mod fixtures;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, ListParams};
use kpx_lab::cluster::ClusterOptions;
use kpx_lab::lab::{Lab, ProxyBackend};
use serde_json::json;

fn deployment(replicas: usize) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.14.2", "ports": [{"containerPort": 80}]}]}}}
    }))
    .expect("a Deployment")
}

fn service() -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
    }))
    .expect("a Service")
}

async fn ready_pods(lab: &Lab) -> anyhow::Result<usize> {
    let pods = Api::<Pod>::namespaced(lab.client(), "default")
        .list(&ListParams::default())
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

async fn ready_endpoints(lab: &Lab) -> anyhow::Result<usize> {
    let slices = Api::<EndpointSlice>::namespaced(lab.client(), "default")
        .list(&ListParams::default())
        .await?;
    Ok(slices
        .items
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count())
}

/// Seconds from creating the Deployment to `replicas` Ready pods and ready endpoints.
async fn rollout(lab: &Lab, replicas: usize) -> anyhow::Result<(f64, f64)> {
    Api::<Service>::namespaced(lab.client(), "default")
        .create(&service())
        .await?;
    let started = Instant::now();
    Api::<Deployment>::namespaced(lab.client(), "default")
        .create(&deployment(replicas))
        .await?;
    let mut pods_at = None;
    loop {
        if pods_at.is_none() && ready_pods(lab).await? >= replicas {
            pods_at = Some(started.elapsed().as_secs_f64());
        }
        if let Some(pods) = pods_at {
            if ready_endpoints(lab).await? >= replicas {
                return Ok((pods, started.elapsed().as_secs_f64()));
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the rollout did not finish in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let kib = kpx_lab::bench::setup::status_kib(pid, "VmRSS:")
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the cluster benchmark needs root (network namespaces)");
        return Ok(());
    }
    let rounds: usize = std::env::var("KPX_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let backend = ProxyBackend::IptablesNft;
    let (mut up, mut pods, mut slices) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        let lab = Lab::cluster("bench-up", backend, 3, ClusterOptions::default()).await?;
        up.push(started.elapsed().as_secs_f64());
        let (p, s) = rollout(&lab, 100).await?;
        pods.push(p);
        slices.push(s);
    }
    println!(
        "cluster ({} proxies), {rounds} rounds, medians (min-max)",
        backend.name()
    );
    let show = |what: &str, v: &mut Vec<f64>, unit: &str| {
        let (min, max) = (
            v.iter().copied().fold(f64::MAX, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "  {what:<58} {:>7.2} {unit} ({min:.2}-{max:.2})",
            fixtures::median(v)
        );
    };
    show("kpx-lab up --nodes 3, ready for traffic", &mut up, "s");
    show("100-replica Deployment: all pods Ready", &mut pods, "s");
    show(
        "100-replica Deployment: all Ready and in the EndpointSlices",
        &mut slices,
        "s",
    );

    let lab = Lab::cluster("bench-rss", backend, 1, ClusterOptions::default()).await?;
    let pid = lab
        .kubelet_pid(0)
        .ok_or_else(|| anyhow::anyhow!("no kubelet"))?;
    let idle = rss_mib(pid)?;
    rollout(&lab, 50).await?;
    // Let a few heartbeats and status writes pass before reading.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let loaded = rss_mib(pid)?;
    println!(
        "  kpx-kubelet resident memory: {idle:.1} MiB with no pods, {loaded:.1} MiB with 50 pods"
    );
    Ok(())
}
