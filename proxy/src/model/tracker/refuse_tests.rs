//! Issue 15, items 7 and 8: what the proxy must never program, whatever the API let through.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::*;
use crate::model::Refusal;

fn service(name: &str, spec: Value, status: Value) -> Service {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec, "status": status}),
    )
    .expect("service")
}

fn slice(name: &str, service: &str, addresses: &[&str], port: u16) -> EndpointSlice {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "n1"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }))
    .expect("slice")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn protected() -> Protected {
    Protected {
        node: vec![ip("198.18.0.10"), ip("2001:2::10")],
        api_server: vec![ip("198.18.0.1")],
    }
}

fn refusals(changes: &Changes) -> Vec<(String, Refusal)> {
    changes
        .skipped
        .iter()
        .filter_map(|s| s.refusal.map(|r| (format!("{} {}", s.object, s.field), r)))
        .collect()
}

#[test]
fn a_loopback_endpoint_is_never_programmed_but_a_node_address_is() {
    let mut t = ChangeTracker::with_protected("n1", protected());
    t.apply_service(service(
        "metrics",
        json!({"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
        json!({}),
    ));
    // The finding: 127.0.0.1:10249 gave node-local clients the proxy's own /metrics.
    t.apply_slice(slice(
        "metrics-a",
        "metrics",
        &[
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.5",
            "198.18.0.10",
        ],
        10249,
    ));
    let (state, changes) = t.snapshot(&ProxyState::default());
    let endpoints: Vec<String> = state
        .entries
        .values()
        .flat_map(|e| {
            e.endpoints
                .iter()
                .map(|ep| format!("{}:{}", ep.ip, ep.port))
        })
        .collect();
    assert_eq!(
        endpoints,
        ["198.18.0.10:10249"],
        "hostNetwork endpoints stay"
    );
    assert_eq!(
        refusals(&changes),
        [
            (
                "ns/metrics-a endpoints[0].addresses[0]".into(),
                Refusal::Loopback
            ),
            (
                "ns/metrics-a endpoints[1].addresses[0]".into(),
                Refusal::LinkLocal
            ),
            (
                "ns/metrics-a endpoints[2].addresses[0]".into(),
                Refusal::Unspecified
            ),
            (
                "ns/metrics-a endpoints[3].addresses[0]".into(),
                Refusal::Multicast
            ),
        ]
    );
    let first = &changes.skipped[0];
    assert_eq!(first.kind, "EndpointSlice");
    assert_eq!(
        first.reason,
        "127.0.0.1 is in the loopback range (127.0.0.0/8, ::1/128): never programmed as an endpoint"
    );
}

#[test]
fn the_nodes_and_the_api_servers_address_are_never_external_or_load_balancer_ips() {
    let mut t = ChangeTracker::with_protected("n1", protected());
    // The finding: these captured `kubectl logs` (the kubelet on the node's address) and every
    // new connection to the API server.
    t.apply_service(service(
        "hijack",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.30",
            "externalIPs": ["198.18.0.10", "198.18.0.1", "198.18.64.10"],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP", "nodePort": 30443}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.18.0.1"}, {"ip": "2001:2::10"}, {"ip": "198.18.64.20"}]}}),
    ));
    let (state, changes) = t.snapshot(&ProxyState::default());
    let entry = state
        .entries
        .values()
        .next()
        .expect("the Service is still programmed");
    assert_eq!(entry.port.external_ips, [ip("198.18.64.10")]);
    assert_eq!(entry.port.load_balancer_ips, [ip("198.18.64.20")]);
    assert_eq!(
        entry.port.cluster_ips,
        [ip("10.96.0.30")],
        "the rest of it syncs"
    );
    assert_eq!(
        refusals(&changes),
        [
            ("ns/hijack spec.externalIPs[0]".into(), Refusal::NodeAddress),
            (
                "ns/hijack spec.externalIPs[1]".into(),
                Refusal::ApiServerAddress
            ),
            (
                "ns/hijack status.loadBalancer.ingress.ip[0]".into(),
                Refusal::ApiServerAddress
            ),
            (
                "ns/hijack status.loadBalancer.ingress.ip[1]".into(),
                Refusal::NodeAddress
            ),
        ]
    );
    // Without protected addresses (as before this fix) they were all programmed.
    let mut open = ChangeTracker::new("n1");
    open.apply_service(service(
        "hijack",
        json!({"clusterIP": "10.96.0.30", "externalIPs": ["198.18.0.10"],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}),
        json!({}),
    ));
    let (state, _) = open.snapshot(&ProxyState::default());
    assert_eq!(
        state
            .entries
            .values()
            .next()
            .map(|e| e.port.external_ips.clone()),
        Some(vec![ip("198.18.0.10")])
    );
}
