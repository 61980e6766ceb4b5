//! What the BPF maps should hold for a snapshot (pure): the frontend model's routes
//! (`model/frontend.rs`) as map entries, one per frontend (its key's address zero for a
//! NodePort: any of the node's addresses), with the backends, flags and affinity of the route
//! outside clients get. A frontend whose internal clients (the node, and pods when the pod
//! network is known) go elsewhere has a second, internal-scope entry under the same key
//! (`kpx_maps.h`). Masquerade is a flag per source (outside, pods); the node's own clients
//! need none (socket LB: the node's address is theirs). A route with no endpoints is an entry
//! with no backends: rejected, or dropped with `SVC_F_DROP`. A frontend the model gives
//! `allowed_sources` (loadBalancerSourceRanges) is flagged `SVC_F_SOURCE_RANGES` with those
//! networks, on its internal-scope entry too: the ranges apply to every source alike.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use kpx_ebpf::layout::{
    self, Backend, ServiceKey, SVC_F_DROP, SVC_F_EXTERNAL, SVC_F_INTERNAL, SVC_F_LOCAL_ONLY,
    SVC_F_MASQUERADE, SVC_F_MASQ_PODS, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES,
};
use kpx_ebpf::plan::{SourceRange, Wanted, WantedService};

use crate::model::frontend::{self, Frontend, FrontendKind, NodeConfig, Route};
use crate::model::{Changes, Protocol, ProxyState, ServiceEntry, ServicePortName};

/// The IP protocol number, for the protocols the programs balance.
fn ip_proto(protocol: Protocol) -> Option<u8> {
    match protocol {
        Protocol::Tcp => Some(6),
        Protocol::Udp => Some(17),
        Protocol::Sctp => None,
    }
}

/// The frontend model's configuration for each family: `[IPv4, IPv6]`.
pub type NodeConfigs = [NodeConfig; 2];

fn entry(name: &str, fe: &Frontend, route: &Route, flags: u16, affinity: u32) -> WantedService {
    let backends = route
        .endpoints()
        .iter()
        .map(|e| Backend::new(e.ip, e.port))
        .collect();
    let drop = if matches!(route, Route::Drop) {
        SVC_F_DROP
    } else {
        0
    };
    let (ranges, source_ranges) = match &fe.allowed_sources {
        Some(nets) => (
            SVC_F_SOURCE_RANGES,
            nets.iter()
                .map(|n| SourceRange::new(n.addr(), n.prefix_len()))
                .collect(),
        ),
        None => (0, BTreeSet::new()),
    };
    WantedService {
        name: name.to_string(),
        flags: flags | drop | ranges,
        affinity_timeout: affinity,
        backends,
        source_ranges,
    }
}

/// Whether NodePorts answer on the node's address `ip` (`kpx_node_addrs`): with
/// `--nodeport-addresses` naming CIDRs of its family, only inside them; else on every address
/// of the family (kube-proxy's `NewNodePortAddresses` is per family).
pub fn answers_nodeports(ip: &IpAddr, cidrs: &[(IpAddr, u8)]) -> bool {
    let mut family = cidrs
        .iter()
        .filter(|(net, _)| net.is_ipv6() == ip.is_ipv6())
        .peekable();
    family.peek().is_none() || family.any(|(net, len)| crate::cidr::contains(*net, *len, ip))
}

/// The map entries of one frontend.
fn render(name: &str, fe: &Frontend, pods_known: bool, proto: u8, out: &mut Wanted) {
    let key = ServiceKey::new(fe.ip, fe.port, proto);
    let kind = match fe.kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::NodePort => SVC_F_NODEPORT,
        FrontendKind::ExternalIp | FrontendKind::LoadBalancerIp => SVC_F_EXTERNAL,
    };
    let affinity = fe.affinity_seconds.unwrap_or(0);
    // Internal clients: the node, and pods when they can be told apart (otherwise pods are
    // outside clients, and the model gives them the outside route).
    let internal = if pods_known {
        &fe.from_pods
    } else {
        &fe.from_node
    };
    // One internal entry serves the node and (known) pods alike: their routes must name the
    // same endpoints (kube-proxy's semantics give them that; masquerade may differ).
    debug_assert!(
        !pods_known || fe.from_pods.same_target(&fe.from_node),
        "{name}: pods and the node go to different endpoints"
    );
    let twin =
        !internal.same_target(&fe.from_outside) || !fe.from_node.same_target(&fe.from_outside);
    let local_only = if fe.from_outside.set() == Some(frontend::EndpointSet::Local) {
        SVC_F_LOCAL_ONLY
    } else {
        0
    };
    let masq = |route: &Route, bit: u16| if route.masquerade() { bit } else { 0 };
    let mut outside_flags = kind | local_only | masq(&fe.from_outside, SVC_F_MASQUERADE);
    if twin {
        outside_flags |= SVC_F_INTERNAL;
        let inner =
            kind | masq(internal, SVC_F_MASQ_PODS) | masq(&fe.from_outside, SVC_F_MASQUERADE);
        out.insert(key.internal(), entry(name, fe, internal, inner, affinity));
    } else {
        outside_flags |= masq(&fe.from_pods, SVC_F_MASQ_PODS);
    }
    out.insert(
        key,
        entry(name, fe, &fe.from_outside, outside_flags, affinity),
    );
}

/// The frontends of one Service port, both families.
pub fn frontends(entry: &ServiceEntry, nodes: &NodeConfigs, out: &mut Wanted) {
    let Some(proto) = ip_proto(entry.port.name.protocol) else {
        return;
    };
    let name = entry.port.name.to_string();
    for (ipv6, node) in [(false, &nodes[0]), (true, &nodes[1])] {
        for fe in frontend::frontends(entry, node, ipv6).frontends {
            render(&name, &fe, node.cluster_cidr.is_some(), proto, out);
        }
    }
}

/// Every frontend of the snapshot.
pub fn wanted(state: &ProxyState, nodes: &NodeConfigs) -> Wanted {
    let mut out = Wanted::new();
    for entry in state.entries.values() {
        frontends(entry, nodes, &mut out);
    }
    out
}

/// The frontends of every Service port, kept up to date change by change, so a partial sync
/// costs what changed rather than the whole table.
#[derive(Debug, Default)]
pub struct WantedTable {
    pub wanted: Wanted,
    keys_of: HashMap<ServicePortName, Vec<ServiceKey>>,
    nodes: NodeConfigs,
}

impl WantedTable {
    pub fn new(nodes: NodeConfigs) -> Self {
        Self {
            nodes,
            ..Self::default()
        }
    }

    pub fn full(state: &ProxyState, nodes: NodeConfigs) -> Self {
        let mut table = Self::new(nodes);
        for (name, entry) in &state.entries {
            table.set(name, Some(entry));
        }
        table
    }

    /// Replaces the frontends of `name`; returns the keys touched.
    fn set(&mut self, name: &ServicePortName, entry: Option<&ServiceEntry>) -> Vec<ServiceKey> {
        let mut touched = self.keys_of.remove(name).unwrap_or_default();
        for key in &touched {
            self.wanted.remove(key);
        }
        if let Some(entry) = entry {
            let mut mine = Wanted::new();
            frontends(entry, &self.nodes, &mut mine);
            let keys: Vec<ServiceKey> = mine.keys().copied().collect();
            touched.extend(&keys);
            self.wanted.extend(mine);
            self.keys_of.insert(name.clone(), keys);
        }
        touched
    }

    /// Follows `changes` (against `state`, the snapshot they led to); returns the frontends
    /// whose map entries may need writing.
    pub fn update(&mut self, state: &ProxyState, changes: &Changes) -> BTreeSet<ServiceKey> {
        let mut touched = BTreeSet::new();
        for name in changes.changed.iter().chain(changes.removed.keys()) {
            touched.extend(self.set(name, state.entries.get(name).map(|e| e.as_ref())));
        }
        touched
    }
}

/// A frontend as text, for snapshots and logs: `198.18.128.9:80/tcp`, `*:30080/tcp (v4)`,
/// with ` internal` for an internal-scope entry.
pub fn describe(key: &ServiceKey) -> String {
    let text = describe_address(key);
    if key.is_internal() {
        format!("{text} internal")
    } else {
        text
    }
}

fn describe_address(key: &ServiceKey) -> String {
    let ip = layout::ip(&key.addr, key.family);
    let port = u16::from_be(key.port);
    let proto = match key.proto {
        6 => "tcp",
        17 => "udp",
        _ => "?",
    };
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => format!("*:{port}/{proto} (v4)"),
        IpAddr::V6(a) if a.is_unspecified() => format!("*:{port}/{proto} (v6)"),
        IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::{json, Value};

    use super::*;
    use crate::model::ChangeTracker;

    fn service(name: &str, spec: Value) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec}))
            .expect("service")
    }

    fn slice(
        service: &str,
        family: &str,
        endpoints: &[(&str, &str, bool)],
        port: Value,
    ) -> EndpointSlice {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(ip, node, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-{family}"), "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
            "addressType": family, "endpoints": endpoints, "ports": [port],
        }))
        .expect("slice")
    }

    fn text(wanted: &Wanted) -> String {
        wanted
            .iter()
            .map(|(key, w)| {
                let backends: Vec<String> = w
                    .backends
                    .iter()
                    .map(|b| format!("{}:{}", layout::ip(&b.addr, b.family), u16::from_be(b.port)))
                    .collect();
                let flags = [
                    (SVC_F_NODEPORT, "nodeport"),
                    (SVC_F_EXTERNAL, "external"),
                    (SVC_F_LOCAL_ONLY, "local"),
                    (SVC_F_MASQUERADE, "masquerade"),
                    (SVC_F_DROP, "drop"),
                    (SVC_F_MASQ_PODS, "masquerade-pods"),
                    (SVC_F_INTERNAL, "internal"),
                    (SVC_F_SOURCE_RANGES, "source-ranges"),
                ]
                .iter()
                .filter(|(bit, _)| w.flags & bit != 0)
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
                .join(",");
                let ranges: Vec<String> = w
                    .source_ranges
                    .iter()
                    .map(|r| format!("{}/{}", r.ip(), r.prefix))
                    .collect();
                let ranges = if w.flags & SVC_F_SOURCE_RANGES != 0 {
                    format!(" from=[{}]", ranges.join(" "))
                } else {
                    String::new()
                };
                format!(
                    "{} -> [{}] {flags} affinity={}{ranges}\n",
                    describe(key),
                    backends.join(" "),
                    w.affinity_timeout
                )
            })
            .collect()
    }

    fn nodes() -> NodeConfigs {
        let cidr = |t: &str, len| Some((t.parse().expect("ip"), len));
        [
            NodeConfig {
                cluster_cidr: cidr("198.19.0.0", 16),
                masquerade_all: false,
                node_ips: Vec::new(),
            },
            NodeConfig {
                cluster_cidr: cidr("2001:2::", 48),
                masquerade_all: false,
                node_ips: Vec::new(),
            },
        ]
    }

    #[test]
    fn frontends_per_address_family_and_traffic_policy() {
        let mut t = ChangeTracker::new("n1");
        t.apply_service(service(
            "web",
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                   "ipFamilies": ["IPv4", "IPv6"], "externalIPs": ["198.18.2.1"],
                   "sessionAffinity": "ClientIP",
                   "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
        ));
        t.apply_slice(slice(
            "web",
            "IPv4",
            &[("198.19.1.10", "n1", true), ("198.19.2.10", "n2", true)],
            json!({"name": "http", "port": 8080}),
        ));
        t.apply_slice(slice(
            "web",
            "IPv6",
            &[("2001:2:0:101::10", "n1", true)],
            json!({"name": "http", "port": 8080}),
        ));
        t.apply_service(service(
            "local",
            json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local",
                   "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}),
        ));
        t.apply_slice(slice(
            "local",
            "IPv4",
            &[("198.19.2.11", "n2", true)],
            json!({"port": 5353, "protocol": "UDP"}),
        ));
        t.apply_service(service(
            "empty",
            json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}),
        ));
        t.apply_service(service(
            "sctp",
            json!({"clusterIP": "10.96.0.13", "ports": [{"port": 80, "protocol": "SCTP"}]}),
        ));
        let (state, _) = t.snapshot(&ProxyState::default());
        expect![[r#"
            *:30053/udp (v4) -> [] nodeport,drop,internal affinity=0
            *:30053/udp (v4) internal -> [198.19.2.11:5353] nodeport affinity=0
            *:30080/tcp (v4) -> [198.19.1.10:8080 198.19.2.10:8080] nodeport,masquerade,masquerade-pods affinity=10800
            *:30080/tcp (v6) -> [2001:2:0:101::10:8080] nodeport,masquerade,masquerade-pods affinity=10800
            10.96.0.10:80/tcp -> [198.19.1.10:8080 198.19.2.10:8080] masquerade affinity=10800
            10.96.0.11:53/udp -> [198.19.2.11:5353] masquerade affinity=0
            10.96.0.12:80/tcp -> []  affinity=0
            198.18.2.1:80/tcp -> [198.19.1.10:8080 198.19.2.10:8080] external,masquerade,masquerade-pods affinity=10800
            [fd00::10]:80/tcp -> [2001:2:0:101::10:8080] masquerade affinity=10800
        "#]]
        .assert_eq(&text(&wanted(&state, &nodes())));
    }

    #[test]
    fn source_ranges_flag_the_load_balancer_ip_and_its_internal_entry_only() {
        let mut t = ChangeTracker::new("n1");
        let lb: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                     "loadBalancerSourceRanges": ["198.19.255.7/24", "2001:db8::/32"],
                     "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.19.65.10"}]}},
        }))
        .expect("service");
        t.apply_service(lb);
        t.apply_slice(slice(
            "web",
            "IPv4",
            &[("198.19.1.10", "n1", true), ("198.19.2.10", "n2", true)],
            json!({"port": 8080}),
        ));
        let (state, _) = t.snapshot(&ProxyState::default());
        expect![[r#"
            *:30080/tcp (v4) -> [198.19.1.10:8080] nodeport,local,internal affinity=0
            *:30080/tcp (v4) internal -> [198.19.1.10:8080 198.19.2.10:8080] nodeport affinity=0
            10.96.0.10:80/tcp -> [198.19.1.10:8080 198.19.2.10:8080] masquerade affinity=0
            198.19.65.10:80/tcp -> [198.19.1.10:8080] external,local,internal,source-ranges affinity=0 from=[198.19.255.0/24]
            198.19.65.10:80/tcp internal -> [198.19.1.10:8080 198.19.2.10:8080] external,source-ranges affinity=0 from=[198.19.255.0/24]
        "#]]
        .assert_eq(&text(&wanted(&state, &nodes())));
    }
}
