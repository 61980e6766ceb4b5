use serde_json::{json, Value};

use super::*;
use crate::model::{ConntrackCleanup, Protocol};

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec}))
        .expect("service")
}

fn slice(name: &str, service: &str, endpoints: Value, ports: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
    }))
    .expect("slice")
}

fn web() -> Service {
    service(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
    )
}

fn ep(ip: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}, "nodeName": node})
}

fn http_port() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

fn summary(state: &ProxyState) -> Vec<String> {
    state
        .entries
        .values()
        .map(|e| {
            let eps: Vec<String> = e
                .selected
                .cluster
                .iter()
                .map(|ep| format!("{}:{}", ep.ip, ep.port))
                .collect();
            format!("{} -> [{}]", e.port.name, eps.join(" "))
        })
        .collect()
}

#[test]
fn services_join_their_slices_and_noop_changes_are_dropped() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(web());
    t.apply_slice(slice(
        "web-a",
        "web",
        json!([
            ep("198.18.0.1", true, true, false, "n1"),
            ep("198.18.0.2", true, true, false, "n2")
        ]),
        http_port(),
    ));
    let (state, changes) = t.snapshot(&ProxyState::default());
    assert_eq!(
        summary(&state),
        ["ns/web:http/TCP -> [198.18.0.1:8080 198.18.0.2:8080]"]
    );
    assert_eq!(changes.changed.len(), 1);
    let mut annotated = web();
    annotated.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
    t.apply_service(annotated);
    let (next, changes) = t.snapshot(&state);
    assert!(changes.is_empty(), "an annotation changes no rule");
    assert!(Arc::ptr_eq(
        next.entries.values().next().expect("entry"),
        state.entries.values().next().expect("entry")
    ));
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(web());
    t.apply_slice(slice(
        "web-a",
        "web",
        json!([
            ep("198.18.0.1", true, true, false, "n1"),
            ep("198.18.0.2", false, true, true, "n1")
        ]),
        http_port(),
    ));
    let (state, _) = t.snapshot(&ProxyState::default());
    assert_eq!(summary(&state), ["ns/web:http/TCP -> [198.18.0.1:8080]"]);
    t.apply_slice(slice(
        "web-a",
        "web",
        json!([
            ep("198.18.0.1", false, false, true, "n1"),
            ep("198.18.0.2", false, true, true, "n1")
        ]),
        http_port(),
    ));
    let (state, _) = t.snapshot(&state);
    assert_eq!(summary(&state), ["ns/web:http/TCP -> [198.18.0.2:8080]"]);
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service("web", json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80}]})));
    t.apply_slice(slice(
        "web-a",
        "web",
        json!([
            ep("198.18.0.1", true, true, false, "n1"),
            ep("198.18.0.2", true, true, false, "n2")
        ]),
        http_port(),
    ));
    let (state, _) = t.snapshot(&ProxyState::default());
    let entry = state.entries.values().next().expect("entry");
    let local: Vec<String> = entry
        .selected
        .local
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(local, ["198.18.0.1"]);
    assert!(
        entry.selected.cluster.is_empty(),
        "internal Local and not external: no cluster endpoints (UsesClusterEndpoints)"
    );
}

#[test]
fn unusable_input_is_skipped_naming_the_field_and_the_rest_still_syncs() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(web());
    t.apply_service(service(
        "broken",
        json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
    ));
    t.apply_slice(slice(
        "web-a",
        "web",
        json!([
            ep("not-an-ip", true, true, false, "n1"),
            ep("198.18.0.2", true, true, false, "n2")
        ]),
        json!([{"name": "http", "port": 8080}, {"name": "bad", "port": 70000}]),
    ));
    let (state, changes) = t.snapshot(&ProxyState::default());
    assert_eq!(summary(&state), ["ns/web:http/TCP -> [198.18.0.2:8080]"]);
    let skipped: Vec<String> = changes.skipped.iter().map(ToString::to_string).collect();
    assert!(skipped.contains(&"EndpointSlice ns/web-a: endpoints[0].addresses[0]: \"not-an-ip\" is not an IP address".to_string()), "{skipped:?}");
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with("EndpointSlice ns/web-a: ports[1].port")),
        "{skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with("Service ns/broken: spec.clusterIPs[0]")),
        "{skipped:?}"
    );
}

#[test]
fn headless_external_name_and_other_proxies_get_nothing() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service(
        "headless",
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
    ));
    t.apply_service(service(
        "ext",
        json!({"type": "ExternalName", "externalName": "example.com"}),
    ));
    let mut other: Service = web();
    other.metadata.labels = Some(
        [(
            "service.kubernetes.io/service-proxy-name".to_string(),
            "x".to_string(),
        )]
        .into(),
    );
    t.apply_service(other);
    let (state, _) = t.snapshot(&ProxyState::default());
    assert!(state.entries.is_empty());
}

#[test]
fn removed_udp_endpoints_and_services_gaining_endpoints_need_conntrack_cleanup() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service("dns", json!({"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]})));
    let (state, _) = t.snapshot(&ProxyState::default());
    let port = json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]);
    t.apply_slice(slice(
        "dns-a",
        "dns",
        json!([ep("198.18.0.1", true, true, false, "n1")]),
        port.clone(),
    ));
    let (state, changes) = t.snapshot(&state);
    let vip = "10.96.0.53".parse().expect("ip");
    assert_eq!(
        changes.conntrack.iter().cloned().collect::<Vec<_>>(),
        [ConntrackCleanup::Service {
            vip,
            port: 53,
            protocol: Protocol::Udp
        }]
    );
    t.apply_slice(slice(
        "dns-a",
        "dns",
        json!([ep("198.18.0.2", true, true, false, "n1")]),
        port,
    ));
    let (_, changes) = t.snapshot(&state);
    assert_eq!(
        changes.conntrack.iter().cloned().collect::<Vec<_>>(),
        [ConntrackCleanup::Endpoint {
            vip,
            port: 53,
            protocol: Protocol::Udp,
            endpoint: "198.18.0.1".parse().expect("ip")
        }]
    );
}

#[test]
fn resets_replace_everything_and_deletions_remove_ports() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(web());
    t.apply_service(service(
        "old",
        json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}),
    ));
    let (state, _) = t.snapshot(&ProxyState::default());
    t.reset_services(vec![web()]);
    let (state, changes) = t.snapshot(&state);
    assert_eq!(
        changes
            .removed
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["ns/old/TCP"]
    );
    t.delete_service(&web());
    let (state, _) = t.snapshot(&state);
    assert!(state.entries.is_empty());
}
