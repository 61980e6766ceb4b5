//! The tracker with topology: hints read from slices, the node's zone re-selecting every
//! Service, and the headless label.

use serde_json::{json, Value};

use super::*;
use crate::model::service::{HEADLESS_LABEL, SERVICE_WATCH_SELECTOR};

fn service(name: &str, labels: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "trafficDistribution": "PreferClose",
            "ports": [{"name": "http", "port": 80}]},
    }))
    .expect("service")
}

fn zoned_slice(service: &str) -> EndpointSlice {
    let ep = |ip: &str, zone: &str, node: &str| {
        json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node, "zone": zone,
            "hints": {"forZones": [{"name": zone}], "forNodes": [{"name": node}]}})
    };
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-a"), "namespace": "ns",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [ep("198.18.0.1", "zone-a", "n1"), ep("198.18.0.2", "zone-b", "n2"),
            ep("198.18.0.3", "zone-b", "n3")],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .expect("slice")
}

fn cluster_ips(state: &ProxyState) -> Vec<String> {
    state
        .entries
        .values()
        .map(|e| {
            let ips: Vec<String> = e
                .selected
                .cluster
                .iter()
                .map(|ep| ep.ip.to_string())
                .collect();
            format!("{} -> [{}]", e.port.name.service.name, ips.join(" "))
        })
        .collect()
}

fn zone(z: &str) -> BTreeMap<String, String> {
    [(ZONE_LABEL.to_string(), z.to_string())].into()
}

#[test]
fn slices_hints_are_read_including_for_nodes() {
    let mut skips = Vec::new();
    let eps = slice_endpoints(&zoned_slice("web"), "n1", &mut skips);
    let first = &eps[0].1[0];
    assert_eq!(first.hints.zones(), ["zone-a"]);
    assert_eq!(first.hints.nodes(), ["n1"]);
    assert!(skips.is_empty());
}

#[test]
fn the_nodes_zone_reselects_every_service() {
    // n4 is hinted for no endpoint, so node hints fall back to zone hints.
    let mut t = ChangeTracker::new("n4");
    t.apply_service(service("web", json!({})));
    t.apply_service(service("api", json!({})));
    t.apply_slice(zoned_slice("web"));
    t.apply_slice(zoned_slice("api"));
    let (state, _) = t.snapshot(&ProxyState::default());
    assert_eq!(
        cluster_ips(&state),
        [
            "api -> [198.18.0.1 198.18.0.2 198.18.0.3]",
            "web -> [198.18.0.1 198.18.0.2 198.18.0.3]"
        ],
        "no zone known yet: every endpoint"
    );
    t.set_node_labels(Some(&zone("zone-b")));
    assert!(t.has_changes(), "a new zone makes every Service dirty");
    let (state, changes) = t.snapshot(&state);
    assert_eq!(changes.changed.len(), 2);
    assert_eq!(
        cluster_ips(&state),
        [
            "api -> [198.18.0.2 198.18.0.3]",
            "web -> [198.18.0.2 198.18.0.3]"
        ]
    );
    t.set_node_labels(Some(&zone("zone-b")));
    assert!(!t.has_changes(), "the same zone again changes nothing");
    t.set_node_labels(Some(&zone("zone-c")));
    let (state, _) = t.snapshot(&state);
    assert_eq!(
        cluster_ips(&state)[0],
        "api -> [198.18.0.1 198.18.0.2 198.18.0.3]",
        "no endpoint for this zone: all"
    );
    t.set_node_labels(Some(&zone("zone-a")));
    let (state, _) = t.snapshot(&state);
    assert_eq!(cluster_ips(&state)[0], "api -> [198.18.0.1]");
    t.set_node_labels(None);
    let (state, _) = t.snapshot(&state);
    assert_eq!(
        cluster_ips(&state)[0],
        "api -> [198.18.0.1 198.18.0.2 198.18.0.3]",
        "the Node deleted: no zone"
    );
}

#[test]
fn node_hints_route_to_this_nodes_endpoints() {
    let mut t = ChangeTracker::new("n3");
    t.set_node_labels(Some(&zone("zone-b")));
    t.apply_service(service("web", json!({})));
    t.apply_slice(zoned_slice("web"));
    let (state, _) = t.snapshot(&ProxyState::default());
    assert_eq!(cluster_ips(&state), ["web -> [198.18.0.3]"]);
}

#[test]
fn headless_labelled_services_get_nothing_and_lose_their_rules() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service("web", json!({})));
    t.apply_service(service("dns", json!({HEADLESS_LABEL: ""})));
    t.apply_slice(zoned_slice("web"));
    t.apply_slice(zoned_slice("dns"));
    let (state, _) = t.snapshot(&ProxyState::default());
    assert_eq!(
        state.entries.len(),
        1,
        "the headless-labelled Service has no entry"
    );
    t.apply_service(service("web", json!({HEADLESS_LABEL: "true"})));
    let (state, changes) = t.snapshot(&state);
    assert!(state.entries.is_empty());
    assert_eq!(
        changes.removed.len(),
        1,
        "labelling a programmed Service removes it"
    );
}

#[test]
fn the_service_watch_selects_as_kube_proxy() {
    // cmd/kube-proxy/app/server.go: noProxyName and noHeadlessEndpoints requirements.
    assert_eq!(
        SERVICE_WATCH_SELECTOR,
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
}

#[test]
fn unset_conditions_default_as_kube_proxys_endpointslice_cache() {
    // newEndpointSliceInfo: ready nil → true, serving nil → true (not "= ready"),
    // terminating nil → false.
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-a", "namespace": "ns",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["198.18.0.1"]},
            {"addresses": ["198.18.0.2"], "conditions": {"ready": false, "terminating": true}},
            {"addresses": ["198.18.0.3"], "conditions": {"ready": false}},
        ],
        "ports": [{"name": "http", "port": 8080}],
    }))
    .expect("slice");
    let eps = slice_endpoints(&slice, "n1", &mut Vec::new());
    let flags: Vec<(bool, bool, bool)> = eps[0]
        .1
        .iter()
        .map(|e| (e.ready, e.serving, e.terminating))
        .collect();
    assert_eq!(
        flags,
        [
            (true, true, false),
            (false, true, true),
            (false, true, false)
        ]
    );
}
