//! Topology-aware routing and the headless label on the wire, on every backend.
//!
//! - `trafficDistribution: PreferClose` in a cluster lab whose nodes are in zones a, b and c:
//!   the EndpointSlice controller hints each endpoint for its node's zone (from the kubelet's
//!   `--node-labels`), each proxy reads its own Node's zone, and clients reach their own zone's
//!   endpoints — all of them when their zone has none (kube-proxy's `topologyModeFromHints`).
//! - `service.kubernetes.io/headless`: a Service with the label gets no rules, and a programmed
//!   one loses them when it gains the label (kube-proxy's Service label selector).
//!
//! The eBPF backend's socket load balancing also applies to pods (they sit in the node's
//! cgroup), so pod clients see the same selection on every backend.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, ListParams, Patch};
use kpx_lab::cluster::ClusterOptions;
use kpx_lab::lab::Lab;
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

/// A deadline for a system that makes no progress; never what a test asserts.
const PATIENCE: Duration = Duration::from_secs(90);

async fn until<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pods(lab: &Lab) -> Api<Pod> {
    Api::namespaced(lab.client(), "default")
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod pinned to node `node` (by `nodeName`, as the scheduler would bind it): an agnhost
/// server labelled `app=web`, or a client that sleeps.
async fn pinned_pod(lab: &Lab, name: &str, node: usize, server: bool) -> anyhow::Result<Pod> {
    let container = if server {
        json!({"name": "web", "image": "registry.k8s.io/e2e-test-images/agnhost:2.39",
            "args": ["netexec", "--http-port=8080"],
            "readinessProbe": {"httpGet": {"path": "/hostname", "port": 8080}, "periodSeconds": 1}})
    } else {
        json!({"name": "client", "image": "busybox:1.28", "command": ["sleep", "3600"]})
    };
    let labels = if server {
        json!({"app": "web"})
    } else {
        json!({})
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": lab.nodes[node].name, "containers": [container]},
    }))?;
    pods(lab).create(&pod).await?;
    until(&format!("pod {name} ready"), || async {
        let p = pods(lab).get(name).await?;
        Ok(is_ready(&p).then_some(p))
    })
    .await
}

/// Each ready endpoint of the Service's slices with the zone it is hinted for.
async fn hinted_zones(lab: &Lab, service: &str) -> anyhow::Result<Vec<(String, String)>> {
    let params = ListParams {
        label_selector: Some(format!("kubernetes.io/service-name={service}")),
        ..Default::default()
    };
    let slices = Api::<EndpointSlice>::namespaced(lab.client(), "default")
        .list(&params)
        .await?;
    let mut out: Vec<(String, String)> = slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .map(|e| {
            let zone = e
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .and_then(|z| z.first())
                .map(|z| z.name.clone())
                .unwrap_or_default();
            (e.addresses[0].clone(), zone)
        })
        .collect();
    out.sort();
    Ok(out)
}

fn seen(outcomes: &[Outcome]) -> BTreeSet<String> {
    pods_seen(outcomes)
}

fn only(outcomes: &[Outcome], pods: &[&str]) -> bool {
    all_answer(outcomes) && seen(outcomes) == pods.iter().map(|p| p.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_close_keeps_clients_in_their_zone_and_falls_back_to_all() {
    on_every_backend("topology-prefer-close", |backend| async move {
        let options = ClusterOptions {
            zones: vec!["zone-a".into(), "zone-b".into(), "zone-c".into()],
            ..Default::default()
        };
        let lab = Lab::cluster("zones", backend, 3, options).await?;
        let web_a = pinned_pod(&lab, "web-a", 0, true).await?;
        let web_b = pinned_pod(&lab, "web-b", 1, true).await?;
        let clients = [
            pinned_pod(&lab, "client-a", 0, false).await?,
            pinned_pod(&lab, "client-b", 1, false).await?,
            pinned_pod(&lab, "client-c", 2, false).await?,
        ];
        let svc = create_service(
            &lab,
            "web",
            json!({"selector": {"app": "web"}, "trafficDistribution": "PreferClose",
                "ports": [{"port": 80, "targetPort": 8080}]}),
        )
        .await?;
        let ip = |p: &Pod| {
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default()
        };
        let want = vec![(ip(&web_a), "zone-a".into()), (ip(&web_b), "zone-b".into())];
        let mut want_sorted = want.clone();
        want_sorted.sort();
        if let Err(e) = until("each endpoint hinted for its node's zone", || async {
            Ok((hinted_zones(&lab, "web").await? == want_sorted).then_some(()))
        })
        .await
        {
            let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(lab.client())
                .list(&ListParams::default())
                .await?;
            let labels: Vec<_> = nodes
                .items
                .iter()
                .map(|n| (n.metadata.name.clone(), n.metadata.labels.clone()))
                .collect();
            anyhow::bail!(
                "{e}: want {want_sorted:?}, have {:?}; nodes {labels:?}",
                hinted_zones(&lab, "web").await?
            );
        }
        let vip: SocketAddr = target(cluster_ip(&svc), 80);
        let from = |i: usize| lab.pod_entry(&clients[i]);
        let (a, b, c) = (from(0)?, from(1)?, from(2)?);
        eventually(
            &lab,
            "zone a's client reaches zone a's endpoint only",
            || traffic::http(&a, vip, 20, TIMEOUT),
            |o| only(o, &["web-a"]),
        )
        .await?;
        eventually(
            &lab,
            "zone b's client reaches zone b's endpoint only",
            || traffic::http(&b, vip, 20, TIMEOUT),
            |o| only(o, &["web-b"]),
        )
        .await?;
        // Zone c has no endpoint: no endpoint is hinted for it, so all are used.
        eventually(
            &lab,
            "zone c's client reaches every endpoint",
            || traffic::http(&c, vip, 30, TIMEOUT),
            |o| only(o, &["web-a", "web-b"]),
        )
        .await?;

        // Zone b loses its endpoint: its clients fall back to every endpoint left.
        pods(&lab).delete_with_grace("web-b", 0).await?;
        eventually(
            &lab,
            "zone b's client falls back to zone a's endpoint",
            || traffic::http(&b, vip, 20, TIMEOUT),
            |o| only(o, &["web-a"]),
        )
        .await?;

        // Without trafficDistribution the hints go and every client reaches every endpoint.
        let web_b = pinned_pod(&lab, "web-b2", 1, true).await?;
        services(&lab)
            .patch(
                "web",
                Patch::Merge,
                &json!({"spec": {"trafficDistribution": null}}),
            )
            .await?;
        let unhinted = vec![(ip(&web_a), String::new()), (ip(&web_b), String::new())];
        let mut unhinted_sorted = unhinted;
        unhinted_sorted.sort();
        until("hints removed", || async {
            Ok((hinted_zones(&lab, "web").await? == unhinted_sorted).then_some(()))
        })
        .await?;
        eventually(
            &lab,
            "zone a's client reaches every endpoint",
            || traffic::http(&a, vip, 30, TIMEOUT),
            |o| only(o, &["web-a", "web-b2"]),
        )
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_labelled_services_get_no_rules() {
    on_every_backend("topology-headless-label", |backend| async move {
        let mut lab = Lab::start("headless", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let client = &lab.pod("client").ns;
        let labelled = json!({"service.kubernetes.io/headless": ""});
        // Labelled from the start: its cluster IP is never answered.
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "quiet", "labels": labelled},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))?;
        let quiet = services(&lab).create(&svc).await?;
        set_endpoints(&lab, "quiet", &[ready("web-a")], http_port()).await?;
        let web = create_service(
            &lab,
            "web",
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        let (quiet_vip, vip) = (target(cluster_ip(&quiet), 80), target(cluster_ip(&web), 80));
        // Once the unlabelled one answers, the proxy has synced both.
        eventually(
            &lab,
            "the unlabelled Service answers",
            || traffic::http(client, vip, 5, TIMEOUT),
            all_answer,
        )
        .await?;
        let nobody = |o: &[Outcome]| o.iter().all(|x| x.pod().is_none());
        eventually(
            &lab,
            "the labelled Service is not answered",
            || traffic::http(client, quiet_vip, 2, Duration::from_millis(500)),
            nobody,
        )
        .await?;
        if backend.name().starts_with("iptables") {
            let rules = lab.iptables_save(0);
            anyhow::ensure!(
                !rules.contains("default/quiet"),
                "rules for the headless-labelled Service:\n{rules}"
            );
        }

        // A programmed Service that gains the label loses its rules; losing it brings them back.
        services(&lab)
            .patch(
                "web",
                Patch::Merge,
                &json!({"metadata": {"labels": labelled}}),
            )
            .await?;
        eventually(
            &lab,
            "no answer once labelled",
            || traffic::http(client, vip, 2, Duration::from_millis(500)),
            nobody,
        )
        .await?;
        services(&lab)
            .patch(
                "web",
                Patch::Merge,
                &json!({"metadata": {"labels": {"service.kubernetes.io/headless": null}}}),
            )
            .await?;
        eventually(
            &lab,
            "answered again once unlabelled",
            || traffic::http(client, vip, 5, TIMEOUT),
            all_answer,
        )
        .await?;
        Ok(())
    })
    .await;
}
