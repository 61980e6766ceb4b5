//! Issue 15, items 7 and 8, on every backend: a Service could take the node's own address or
//! the API server's as an external IP (capturing `kubectl logs` and every new connection to
//! the API server, the CVE-2020-8554 class), and an EndpointSlice could point at 127.0.0.1
//! (an endpoint of 127.0.0.1:10249 served the proxy's own /metrics to node-local clients).
//!
//! The API now refuses those writes (403 outside `--service-external-ip-cidrs`, 422 for
//! special addresses); what it still lets through — a load-balancer ingress IP is status, not
//! covered by the external-IP allow-list — the proxy refuses to program: traffic to the API
//! server and to the node stays theirs while the same Service's other address works.

mod common;

use std::net::IpAddr;

use common::*;
use kpx_control::client::Patch;
use kpx_lab::lab::{api_address, Lab};
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

/// Sum of `name{...}` samples whose labels contain `label` (e.g. `reason="loopback"`).
fn labelled_total(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_and_the_api_servers_addresses_and_loopback_endpoints_capture_nothing() {
    on_every_backend("hijack", |backend| async move {
        let mut lab = Lab::start("hij", backend, 1, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let node_ip = IpAddr::V4(lab.nodes[0].ip);
        let api: std::net::SocketAddr = api_address().parse()?;

        // The API refuses the node's address as an external IP (outside the lab's allowed
        // range), and the API server's too.
        for address in [node_ip, api.ip()] {
            let refused = create_service(&lab, "hijack", json!({"externalIPs": [address.to_string()],
                "ports": [{"name": "https", "port": api.port(), "targetPort": 8080}]}))
            .await;
            let error = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
            anyhow::ensure!(
                error.contains("Use of external IPs is denied by admission control"),
                "external IP {address} was not refused: {error:?}"
            );
        }
        // … and a slice endpoint on loopback.
        create_service(&lab, "metrics", json!({"ports": [{"name": "http", "port": 80, "targetPort": 10249}]})).await?;
        let loopback = serde_json::from_value(json!({
            "metadata": {"name": "metrics-kpx", "labels": {"kubernetes.io/service-name": "metrics"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"]}],
            "ports": [{"name": "http", "port": 10249, "protocol": "TCP"}]}))?;
        let error = slices(&lab).create(&loopback).await.err().map(|e| format!("{e:#}")).unwrap_or_default();
        anyhow::ensure!(
            error.contains("may not be in the loopback range"),
            "loopback endpoint was not refused: {error:?}"
        );

        // A LoadBalancer whose ingress names the API server and the node besides a real
        // load-balancer address: only the real one is programmed.
        let lb_ip = Lab::external_ip(20);
        create_service(&lab, "lb", json!({"type": "LoadBalancer",
            "ports": [{"name": "http", "port": api.port(), "targetPort": 8080}]}))
        .await?;
        set_endpoints(&lab, "lb", &[ready("web-a")], http_port()).await?;
        services(&lab)
            .patch_status("lb", Patch::Merge, &json!({"status": {"loadBalancer": {"ingress": [
                {"ip": api.ip().to_string()}, {"ip": node_ip.to_string()}, {"ip": lb_ip.to_string()}]}}}))
            .await?;
        let outside = &lab.externals[0];
        eventually(&lab, "the real load-balancer IP", || traffic::http(outside, target(lb_ip, api.port()), 3, TIMEOUT), all_answer).await?;
        // Connections to the API server from the node and from a pod still reach it (the
        // hijack answered with web-a), and so do the node's own services.
        let captured = |o: &[Outcome]| o.iter().any(|x| x.pod() == Some("web-a"));
        for (who, outcomes) in [
            ("node", traffic::http(&lab.nodes[0], api, 5, TIMEOUT)?),
            ("pod", traffic::http(&lab.pod("client").ns, api, 5, TIMEOUT)?),
            ("outside, to the node", traffic::http(outside, target(node_ip, api.port()), 3, TIMEOUT)?),
        ] {
            anyhow::ensure!(!captured(&outcomes), "{who}: traffic to a protected address was captured: {outcomes:?}");
        }
        anyhow::ensure!(lab.client().version().await.is_ok(), "the API server still answers");
        // … because the proxy refused them, and says so.
        let (code, metrics) = traffic::local_get(&lab.nodes[0].ns, 10249, "/metrics")?;
        anyhow::ensure!(code == 200, "proxy metrics: {code}");
        for reason in ["api-server-address", "node-address"] {
            anyhow::ensure!(
                labelled_total(&metrics, "kpx_proxy_refused_addresses_total", &format!("reason=\"{reason}\"")) >= 1.0,
                "{reason} not counted:\n{metrics}"
            );
        }
        Ok(())
    })
    .await;
}
