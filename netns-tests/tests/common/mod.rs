//! Shared by the scenario tests: running a scenario on every backend, and the test's own
//! endpoint bookkeeping (the EndpointSlice controller arrives with the lean-cluster issue, so
//! tests write the slices a controller would).
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, Patch};
use kpx_lab::lab::{Lab, ProxyBackend, ALL_BACKENDS};
use kpx_lab::traffic::Outcome;
use serde_json::{json, Value};

/// Per request, for probes (in `eventually`, and where nothing may answer): short, since a
/// dropped request is seen only by waiting.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Per request, where every request must be answered on a path already proven: long enough
/// for two lost SYNs (retransmitted at 1 s and 3 s) and the stall of a busy or emulated
/// machine, so the verdict does not depend on load; it costs nothing when requests are answered.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The backends a scenario runs on: those this kernel supports (and `KPX_BACKENDS` names);
/// the others are reported as skipped with the reason. Without root there are none (and that
/// fails when `KPX_REQUIRE_NETNS=1`, as `cargo xtask test` sets, so CI cannot pass it silently).
fn runnable(tag: &str) -> Vec<ProxyBackend> {
    let required = std::env::var("KPX_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    if !is_root() {
        assert!(
            !required,
            "{tag}: network namespace tests need root (KPX_REQUIRE_NETNS=1)"
        );
        eprintln!("SKIPPED {tag}: network namespace tests need root");
        return Vec::new();
    }
    // KPX_BACKENDS=ebpf,iptables-nft narrows the run (while working on one backend).
    let only = std::env::var("KPX_BACKENDS").ok();
    let mut out = Vec::new();
    for backend in ALL_BACKENDS {
        if let Some(only) = &only {
            if !only.split(',').any(|b| b == backend.name()) {
                eprintln!(
                    "SKIPPED {tag} on {}: not in KPX_BACKENDS={only}",
                    backend.name()
                );
                continue;
            }
        }
        if let Some(reason) = backend.unsupported() {
            eprintln!("SKIPPED {tag} on {}: {reason}", backend.name());
            continue;
        }
        out.push(*backend);
    }
    assert!(
        !out.is_empty() || !is_root(),
        "{tag}: no backend is supported on this kernel"
    );
    out
}

/// Runs `scenario` against each backend this kernel supports.
pub async fn on_every_backend<F, Fut>(tag: &str, scenario: F)
where
    F: Fn(ProxyBackend) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    for backend in runnable(tag) {
        eprintln!("RUN {tag} on {}", backend.name());
        if let Err(e) = scenario(backend).await {
            panic!("{tag} on {}: {e:#}", backend.name());
        }
    }
}

/// Runs `scenario` on the first backend this kernel supports, for behaviour that does not
/// depend on the proxy backend; the others are reported as skipped.
pub async fn on_one_backend<F, Fut>(tag: &str, scenario: F)
where
    F: Fn(ProxyBackend) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let backends = runnable(tag);
    if let Some((first, rest)) = backends.split_first() {
        for other in rest {
            eprintln!(
                "SKIPPED {tag} on {}: the scenario does not depend on the backend",
                other.name()
            );
        }
        eprintln!("RUN {tag} on {}", first.name());
        if let Err(e) = scenario(*first).await {
            panic!("{tag} on {}: {e:#}", first.name());
        }
    }
}

pub fn services(lab: &Lab) -> Api<Service> {
    Api::namespaced(lab.client(), "default")
}

pub fn slices(lab: &Lab) -> Api<EndpointSlice> {
    Api::namespaced(lab.client(), "default")
}

pub async fn create_service(lab: &Lab, name: &str, spec: Value) -> anyhow::Result<Service> {
    let svc: Service = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}),
    )?;
    Ok(services(lab).create(&svc).await?)
}

/// An endpoint as a test wants it: pod name and conditions.
pub struct Ep<'a> {
    pub pod: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub fn ready(pod: &str) -> Ep<'_> {
    Ep {
        pod,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// Writes the Service's IPv4 EndpointSlice (creating or replacing it) with `ports`
/// (`[{"name": ..., "port": ..., "protocol": ...}]`).
pub async fn set_endpoints(
    lab: &Lab,
    service: &str,
    endpoints: &[Ep<'_>],
    ports: Value,
) -> anyhow::Result<()> {
    write_slice(lab, service, endpoints, ports, false).await
}

/// Writes the Service's IPv6 EndpointSlice: the pods' IPv6 addresses.
pub async fn set_endpoints_v6(
    lab: &Lab,
    service: &str,
    endpoints: &[Ep<'_>],
    ports: Value,
) -> anyhow::Result<()> {
    write_slice(lab, service, endpoints, ports, true).await
}

async fn write_slice(
    lab: &Lab,
    service: &str,
    endpoints: &[Ep<'_>],
    ports: Value,
    ipv6: bool,
) -> anyhow::Result<()> {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let pod = lab.pod(e.pod);
            let address = if ipv6 { pod.ip6.to_string() } else { pod.ip.to_string() };
            json!({
                "addresses": [address],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": lab.nodes[pod.node].name,
                "targetRef": {"kind": "Pod", "namespace": "default", "name": e.pod},
            })
        })
        .collect();
    let (name, address_type) = if ipv6 {
        (format!("{service}-kpx6"), "IPv6")
    } else {
        (format!("{service}-kpx"), "IPv4")
    };
    let body = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type, "endpoints": eps, "ports": ports,
    });
    let api = slices(lab);
    match api.get(&name).await {
        Ok(_) => {
            api.patch(
                &name,
                Patch::Merge,
                &json!({"endpoints": body["endpoints"], "ports": body["ports"]}),
            )
            .await?;
        }
        Err(e) if e.is_not_found() => {
            api.create(&serde_json::from_value(body)?).await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

pub fn http_port() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

pub fn cluster_ip(svc: &Service) -> std::net::IpAddr {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("a ClusterIP")
}

/// The Service's ClusterIP of the given family.
pub fn cluster_ip_of(svc: &Service, ipv6: bool) -> std::net::IpAddr {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .find(|ip| ip.is_ipv6() == ipv6)
        .unwrap_or_else(|| panic!("no {} ClusterIP", if ipv6 { "IPv6" } else { "IPv4" }))
}

pub fn node_port(svc: &Service) -> u16 {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p[0].node_port)
        .expect("a NodePort") as u16
}

/// The deadline for a system that makes no progress at all: `KPX_TEST_PATIENCE_SECONDS`
/// (default 60 s; the VM sets 180, everything being several times slower under TCG).
pub fn patience() -> Duration {
    let seconds = std::env::var("KPX_TEST_PATIENCE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

/// Polls until `check` holds on the outcomes of `probe`, or fails with the last outcomes and
/// the proxy logs. Patience is `KPX_TEST_PATIENCE_SECONDS` (default 60 s: a deadline for a
/// system that makes no progress, generous so a busy machine only makes a test slower).
pub async fn eventually<P, C>(
    lab: &Lab,
    what: &str,
    mut probe: P,
    check: C,
) -> anyhow::Result<Vec<Outcome>>
where
    P: FnMut() -> anyhow::Result<Vec<Outcome>>,
    C: Fn(&[Outcome]) -> bool,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        let outcomes = probe()?;
        if check(&outcomes) {
            return Ok(outcomes);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "timed out waiting for {what}; last outcomes {outcomes:?}\n{}\n--- iptables (node-1) ---\n{}",
                lab.proxy_logs(),
                lab.iptables_save(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn target(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

pub fn all_answer(outcomes: &[Outcome]) -> bool {
    !outcomes.is_empty() && outcomes.iter().all(|o| o.pod().is_some())
}

/// The pods that answered.
pub fn pods_seen(o: &[Outcome]) -> std::collections::BTreeSet<String> {
    o.iter()
        .filter_map(Outcome::pod)
        .map(String::from)
        .collect()
}

/// `kpx-proxy --cleanup` on node `node` (its proxy stopped first), then checks nothing of
/// kpx is left: no KPX chain in iptables or ip6tables; for nftables, no `ip kpx` or `ip6 kpx`
/// table; for ebpf, no pin (so no attached link and no map) left under the node's bpffs
/// directory.
pub fn cleanup_and_check(lab: &mut Lab, node: usize) -> anyhow::Result<()> {
    lab.stop_proxy(node);
    let out = lab.proxy_command(node)?.arg("--cleanup").output()?;
    anyhow::ensure!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match lab.backend {
        ProxyBackend::Ebpf => {
            let pins = lab.dir().join("bpffs").join(&lab.nodes[node].name);
            anyhow::ensure!(
                !pins.exists(),
                "pins left after cleanup in {}",
                pins.display()
            );
        }
        ProxyBackend::Nftables => {
            let listed = lab.nodes[node]
                .ns
                .command("nft")
                .arg("list tables")
                .output()?;
            let listed = String::from_utf8_lossy(&listed.stdout);
            anyhow::ensure!(
                !listed.lines().any(|l| l.trim().ends_with(" kpx")),
                "kpx tables left after cleanup:\n{listed}"
            );
        }
        _ => {
            let flavour = if lab.backend == ProxyBackend::IptablesNft {
                "nft"
            } else {
                "legacy"
            };
            for tool in ["iptables", "ip6tables"] {
                let saved = lab.nodes[node]
                    .ns
                    .command(format!("{tool}-{flavour}-save"))
                    .output()?;
                let saved = String::from_utf8_lossy(&saved.stdout);
                anyhow::ensure!(!saved.contains("KPX"), "kpx rules left in {tool}:\n{saved}");
            }
        }
    }
    Ok(())
}
