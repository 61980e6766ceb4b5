//! The frontend model's own rules; the behaviour per source is the conformance table's
//! (`crate::conformance`).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::model::{ChangeTracker, ProxyState};

fn entry(spec: serde_json::Value, endpoints: &[(&str, &str)]) -> Arc<ServiceEntry> {
    let mut t = ChangeTracker::new("n1");
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": spec}),
    )
    .expect("service");
    t.apply_service(svc);
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    let family = if endpoints.is_empty()
        || !endpoints[0]["addresses"][0]
            .as_str()
            .unwrap_or("")
            .contains(':')
    {
        "IPv4"
    } else {
        "IPv6"
    };
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family, "endpoints": endpoints, "ports": [{"port": 8080}],
    }))
    .expect("slice");
    t.apply_slice(slice);
    let (state, _) = t.snapshot(&ProxyState::default());
    state.entries.values().next().expect("one entry").clone()
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

#[test]
fn one_frontend_per_address_of_the_family_and_none_without_a_cluster_ip_of_it() {
    let e = entry(
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalIPs": ["198.19.64.1", "2001:2::64"],
               "ports": [{"port": 80, "nodePort": 30080}]}),
        &[("198.18.128.2", "n1")],
    );
    let v4 = frontends(&e, &NodeConfig::default(), false);
    let kinds: Vec<(FrontendKind, IpAddr, u16)> = v4
        .frontends
        .iter()
        .map(|f| (f.kind, f.ip, f.port))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (FrontendKind::ClusterIp, ip("10.96.0.10"), 80),
            (FrontendKind::ExternalIp, ip("198.19.64.1"), 80),
            (FrontendKind::NodePort, ip("0.0.0.0"), 30080),
        ]
    );
    // No IPv6 cluster IP: the IPv6 external IP is not served (kube-proxy's IPv6 proxier has
    // no such Service).
    assert!(frontends(&e, &NodeConfig::default(), true)
        .frontends
        .is_empty());
}

#[test]
fn each_endpoint_set_is_listed_once_for_backends_that_program_one_list_per_set() {
    let e = entry(
        json!({"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
               "ports": [{"port": 80, "nodePort": 30080}]}),
        &[("198.18.128.2", "n1"), ("198.18.129.2", "n2")],
    );
    let node = NodeConfig {
        cluster_cidr: Some((ip("198.18.128.0"), 17)),
        masquerade_all: false,
        node_ips: Vec::new(),
    };
    let model = frontends(&e, &node, false);
    let sets: Vec<(EndpointSet, usize)> = model.sets.iter().map(|(s, e)| (*s, e.len())).collect();
    assert_eq!(
        sets,
        vec![(EndpointSet::Cluster, 2), (EndpointSet::Local, 1)]
    );
    let node_port = &model.frontends[1];
    assert!(!node_port.uniform());
    assert_eq!(node_port.from_outside.set(), Some(EndpointSet::Local));
    assert!(node_port.from_node.masquerade() && !node_port.from_pods.masquerade());
}

#[test]
fn source_ranges_per_family_and_a_range_of_the_whole_family_admits_everyone() {
    let lb = |ranges: serde_json::Value| -> Vec<Option<Vec<String>>> {
        let mut t = ChangeTracker::new("n1");
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "loadBalancerSourceRanges": ranges, "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.19.65.1"}, {"ip": "2001:2::65"}]}},
        }))
        .expect("service");
        t.apply_service(svc);
        let (state, _) = t.snapshot(&ProxyState::default());
        let e = state.entries.values().next().expect("the entry").clone();
        [false, true]
            .iter()
            .map(|&v6| {
                let fe = frontends(&e, &NodeConfig::default(), v6)
                    .frontends
                    .into_iter()
                    .find(|f| f.kind == FrontendKind::LoadBalancerIp)
                    .expect("the load-balancer frontend");
                fe.allowed_sources
                    .map(|nets| nets.iter().map(|n| n.to_string()).collect())
            })
            .collect()
    };
    // Host bits cleared; the other family's ranges leave a family open (kube-proxy).
    assert_eq!(
        lb(json!(["198.51.100.7/24"])),
        vec![Some(vec!["198.51.100.0/24".to_string()]), None]
    );
    // 0.0.0.0/0 beside a narrow range: IPv4 unrestricted, IPv6 still narrowed.
    assert_eq!(
        lb(json!(["198.51.100.0/24", "0.0.0.0/0", "2001:db8::/32"])),
        vec![None, Some(vec!["2001:db8::/32".to_string()])]
    );
    // Nothing readable: closed for both.
    assert_eq!(lb(json!(["nonsense"])), vec![Some(vec![]), Some(vec![])]);
}
