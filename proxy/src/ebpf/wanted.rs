//! What the BPF maps should hold for a snapshot (pure): one map frontend per address a Service
//! port answers on, with the backends that kind of traffic goes to, in the same way the
//! iptables backend renders its chains.
//!
//! - a cluster IP gets the cluster endpoints (internalTrafficPolicy already applied);
//! - external and load-balancer IPs and the NodePort (one frontend per IP family, address
//!   zero: any of the node's addresses) get the cluster endpoints, masqueraded, or with
//!   `externalTrafficPolicy: Local` this node's endpoints and the client's address kept;
//! - no endpoints at all: rejected; endpoints, but none for this traffic: dropped.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kpx_ebpf::layout::{
    self, Backend, ServiceKey, SVC_F_DROP, SVC_F_EXTERNAL, SVC_F_LOCAL_ONLY, SVC_F_MASQUERADE,
    SVC_F_NODEPORT,
};
use kpx_ebpf::plan::{Wanted, WantedService};

use crate::model::{Changes, Endpoint, Protocol, ProxyState, ServiceEntry, ServicePortName};

/// The IP protocol number, for the protocols the programs balance.
fn ip_proto(protocol: Protocol) -> Option<u8> {
    match protocol {
        Protocol::Tcp => Some(6),
        Protocol::Udp => Some(17),
        Protocol::Sctp => None,
    }
}

fn service(
    name: &str,
    endpoints: &[Endpoint],
    ipv6: bool,
    any: bool,
    flags: u16,
    affinity: u32,
) -> WantedService {
    let backends: Vec<Backend> = endpoints
        .iter()
        .filter(|e| e.ip.is_ipv6() == ipv6)
        .map(|e| Backend::new(e.ip, e.port))
        .collect();
    let drop = backends.is_empty() && any;
    WantedService {
        name: name.to_string(),
        flags: flags | if drop { SVC_F_DROP } else { 0 },
        affinity_timeout: affinity,
        backends,
    }
}

/// The frontends of one Service port.
pub fn frontends(entry: &ServiceEntry, out: &mut Wanted) {
    let port = &entry.port;
    let Some(proto) = ip_proto(port.name.protocol) else {
        return;
    };
    let affinity = port.affinity_seconds.unwrap_or(0);
    let any = entry.selected.any;
    let name = port.name.to_string();
    let name = name.as_str();
    for ip in &port.cluster_ips {
        out.insert(
            ServiceKey::new(*ip, port.port, proto),
            service(
                name,
                &entry.selected.cluster,
                ip.is_ipv6(),
                any,
                0,
                affinity,
            ),
        );
    }
    if !port.is_external() {
        return;
    }
    let (outside, policy) = if port.external_policy_local {
        (&entry.selected.local, SVC_F_LOCAL_ONLY)
    } else {
        (&entry.selected.cluster, SVC_F_MASQUERADE)
    };
    for ip in port.external_ips.iter().chain(&port.load_balancer_ips) {
        out.insert(
            ServiceKey::new(*ip, port.port, proto),
            service(
                name,
                outside,
                ip.is_ipv6(),
                any,
                SVC_F_EXTERNAL | policy,
                affinity,
            ),
        );
    }
    if let Some(node_port) = port.node_port {
        let families = port.cluster_ips.iter().map(IpAddr::is_ipv6);
        let mut seen = [false; 2];
        for ipv6 in families {
            if std::mem::replace(&mut seen[usize::from(ipv6)], true) {
                continue;
            }
            let any_address = if ipv6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            };
            out.insert(
                ServiceKey::new(any_address, node_port, proto),
                service(name, outside, ipv6, any, SVC_F_NODEPORT | policy, affinity),
            );
        }
    }
}

/// Every frontend of the snapshot.
pub fn wanted(state: &ProxyState) -> Wanted {
    let mut out = Wanted::new();
    for entry in state.entries.values() {
        frontends(entry, &mut out);
    }
    out
}

/// The frontends of every Service port, kept up to date change by change, so a partial sync
/// costs what changed rather than the whole table.
#[derive(Debug, Default)]
pub struct WantedTable {
    pub wanted: Wanted,
    keys_of: HashMap<ServicePortName, Vec<ServiceKey>>,
}

impl WantedTable {
    pub fn full(state: &ProxyState) -> Self {
        let mut table = Self::default();
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
            frontends(entry, &mut mine);
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

/// A frontend as text, for snapshots and logs: `198.18.128.9:80/tcp`, `*:30080/tcp` (v4).
pub fn describe(key: &ServiceKey) -> String {
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
                ]
                .iter()
                .filter(|(bit, _)| w.flags & bit != 0)
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
                .join(",");
                format!(
                    "{} -> [{}] {flags} affinity={}\n",
                    describe(key),
                    backends.join(" "),
                    w.affinity_timeout
                )
            })
            .collect()
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
            *:30053/udp (v4) -> [] nodeport,local,drop affinity=0
            *:30080/tcp (v4) -> [198.19.1.10:8080 198.19.2.10:8080] nodeport,masquerade affinity=10800
            *:30080/tcp (v6) -> [2001:2:0:101::10:8080] nodeport,masquerade affinity=10800
            10.96.0.10:80/tcp -> [198.19.1.10:8080 198.19.2.10:8080]  affinity=10800
            10.96.0.11:53/udp -> [198.19.2.11:5353]  affinity=0
            10.96.0.12:80/tcp -> []  affinity=0
            198.18.2.1:80/tcp -> [198.19.1.10:8080 198.19.2.10:8080] external,masquerade affinity=10800
            [fd00::10]:80/tcp -> [2001:2:0:101::10:8080]  affinity=10800
        "#]]
        .assert_eq(&text(&wanted(&state)));
    }
}
