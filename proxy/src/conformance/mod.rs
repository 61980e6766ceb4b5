//! One conformance table for every backend's plan (tests only, no root).
//!
//! Each case is data: Services and EndpointSlices as the API server sends them, the node's
//! configuration, and probes — a connection from somewhere (a pod on this node, a pod on another
//! node, the node itself, a client outside the cluster) to an address and port — with the
//! outcome Kubernetes promises (kube-proxy's behaviour): which endpoints it can reach and whether
//! they see the client's address or the node's, or that it is rejected, dropped, or not a
//! Service at all. Every case runs against:
//!
//! - the frontend model itself (`model/frontend.rs`), read as the routes say;
//! - the iptables plan, traced rule by rule (`iptables/trace.rs`), from the hook the packet
//!   enters by;
//! - the eBPF plan's map entries, through an interpreter of the lookups the C programs make
//!   (`ebpf.rs` here: socket LB for the node's and pods' sockets, tc for forwarded packets);
//!
//! and every backend added later plugs in one more runner.

pub(crate) mod cases;
mod ebpf;
mod iptables;
mod ipvs;
pub(crate) use ipvs::config as ipvs_config;
mod model;
mod nftables;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::model::{ChangeTracker, Protocol, ProxyState};

/// The node every case runs on, and its neighbours.
pub const NODE: &str = "n1";
pub const NODE_IP4: &str = "198.18.0.10";
pub const NODE_IP6: &str = "2001:2::10";

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// A pod on this node (in the pod network), with this address.
    Pod(&'static str),
    /// A pod on another node whose packets reach this node (its address is in the pod network).
    RemotePod(&'static str),
    /// A process of the node itself.
    Node,
    /// A client outside the cluster, with this address.
    Outside(&'static str),
}

/// What the endpoint sees as the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The client's own address (for the node: the source the kernel picked, unrewritten —
    /// which for a frontend address local to the node is that address itself, so the node's
    /// routes to local frontends must masquerade).
    Client,
    /// The node's (masqueraded).
    Node,
    /// Either: a pod reaching itself (iptables masquerades it so the reply leaves the pod;
    /// socket LB connects the socket to its own address, which needs none).
    Hairpin,
}

/// A probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reach {
        endpoints: BTreeSet<String>,
        seen: Seen,
        affinity: Option<u32>,
    },
    Reject,
    Drop,
    /// The backend does not handle it (not a Service address, or a port it does not serve).
    NotAService,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reach {
                endpoints,
                seen,
                affinity,
            } => {
                let list: Vec<&str> = endpoints.iter().map(String::as_str).collect();
                write!(f, "reach [{}] seen={seen:?}", list.join(" "))?;
                if let Some(s) = affinity {
                    write!(f, " affinity={s}s")?;
                }
                Ok(())
            }
            Outcome::Reject => f.write_str("reject"),
            Outcome::Drop => f.write_str("drop"),
            Outcome::NotAService => f.write_str("not a service"),
        }
    }
}

/// Whether `got` is what `want` asks for (`Seen::Hairpin` accepts either address).
fn satisfies(got: &Outcome, want: &Outcome) -> bool {
    match (got, want) {
        (
            Outcome::Reach {
                endpoints: a,
                seen: sa,
                affinity: fa,
            },
            Outcome::Reach {
                endpoints: b,
                seen: sb,
                affinity: fb,
            },
        ) => a == b && fa == fb && (sa == sb || *sb == Seen::Hairpin),
        (a, b) => a == b,
    }
}

/// One connection and what it must get.
#[derive(Debug, Clone)]
pub struct Probe {
    pub from: From,
    pub to: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub want: Outcome,
}

/// The node's configuration, as flags give it.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// `--cluster-cidr`, per family.
    pub cluster_cidrs: Vec<&'static str>,
    pub masquerade_all: bool,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: Vec<&'static str>,
    /// The node's `topology.kubernetes.io/zone` label.
    pub zone: Option<&'static str>,
}

impl Node {
    pub fn cidr(&self, ipv6: bool) -> Option<&'static str> {
        self.cluster_cidrs
            .iter()
            .copied()
            .find(|c| c.contains(':') == ipv6)
    }

    /// `--nodeport-addresses` of one family, as a backend's configuration takes them.
    pub fn nodeport_addresses_of(&self, ipv6: bool) -> Vec<String> {
        self.nodeport_addresses
            .iter()
            .filter(|c| c.contains(':') == ipv6)
            .map(|c| c.to_string())
            .collect()
    }

    pub fn parsed_cidr(&self, ipv6: bool) -> Option<(IpAddr, u8)> {
        let (ip, len) = self.cidr(ipv6)?.split_once('/')?;
        Some((ip.parse().ok()?, len.parse().ok()?))
    }

    pub fn nodeport_cidrs(&self) -> Vec<(IpAddr, u8)> {
        self.nodeport_addresses
            .iter()
            .filter_map(|c| {
                let (ip, len) = c.split_once('/')?;
                Some((ip.parse().ok()?, len.parse().ok()?))
            })
            .collect()
    }

    /// The node's addresses NodePorts answer on: per family, those in that family's
    /// `--nodeport-addresses`, all when the flag names none of the family (kube-proxy's
    /// `NewNodePortAddresses`).
    pub fn nodeport_ips(&self) -> Vec<IpAddr> {
        let cidrs = self.nodeport_cidrs();
        node_ips()
            .into_iter()
            .filter(|ip| {
                let family: Vec<_> = cidrs
                    .iter()
                    .filter(|(net, _)| net.is_ipv6() == ip.is_ipv6())
                    .collect();
                family.is_empty()
                    || family
                        .iter()
                        .any(|(net, len)| crate::cidr::contains(*net, *len, ip))
            })
            .collect()
    }
}

pub fn node_ips() -> Vec<IpAddr> {
    vec![ip(NODE_IP4), ip(cases::NODE_IP4_B), ip(NODE_IP6)]
}

/// The node's address a process of the node sends from, in `family`.
pub fn node_source(ipv6: bool) -> IpAddr {
    ip(if ipv6 { NODE_IP6 } else { NODE_IP4 })
}

/// `ip:port` as endpoints are written in the table.
pub fn endpoint_text(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("a valid address in a case")
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub services: Vec<Value>,
    pub slices: Vec<Value>,
    pub node: Node,
    pub probes: Vec<Probe>,
}

impl Case {
    pub fn state(&self) -> ProxyState {
        let mut tracker = ChangeTracker::new(NODE);
        if let Some(zone) = self.node.zone {
            let labels = [("topology.kubernetes.io/zone".to_string(), zone.to_string())].into();
            tracker.set_node_labels(Some(&labels));
        }
        for s in &self.services {
            let svc: Service = serde_json::from_value(s.clone()).expect("a Service in a case");
            tracker.apply_service(svc);
        }
        for s in &self.slices {
            let slice: EndpointSlice =
                serde_json::from_value(s.clone()).expect("an EndpointSlice in a case");
            tracker.apply_slice(slice);
        }
        tracker.snapshot(&ProxyState::default()).0
    }
}

/// A backend's plan of one case, asked probe by probe.
pub trait Runner {
    fn name(&self) -> &'static str;
    fn outcome(&self, probe: &Probe) -> Outcome;
}

/// Runs every case against the runners `make` builds; returns every mismatch.
pub fn run(make: impl Fn(&Case) -> Box<dyn Runner>) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases::all() {
        let runner = make(&case);
        for probe in &case.probes {
            let got = runner.outcome(probe);
            if !satisfies(&got, &probe.want) {
                failures.push(format!(
                    "{}: {}: {:?} -> {}:{}/{}: got {got}, want {}",
                    runner.name(),
                    case.name,
                    probe.from,
                    probe.to,
                    probe.port,
                    probe.protocol,
                    probe.want
                ));
            }
        }
    }
    failures
}

fn check(make: impl Fn(&Case) -> Box<dyn Runner>) {
    let failures = run(make);
    assert!(
        failures.is_empty(),
        "{} probe(s) differ from the table:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_frontend_model_answers_the_table() {
    check(|case| Box::new(model::ModelRunner::new(case)));
}

#[test]
fn the_iptables_plan_answers_the_table() {
    check(|case| Box::new(iptables::IptablesRunner::new(case)));
}

#[test]
fn the_ebpf_plan_answers_the_table() {
    check(|case| Box::new(ebpf::EbpfRunner::new(case)));
}

#[test]
fn the_ipvs_plan_answers_the_table() {
    check(|case| Box::new(ipvs::IpvsRunner::new(case)));
}

#[test]
fn the_nftables_plan_answers_the_table() {
    check(|case| Box::new(nftables::NftablesRunner::new(case)));
}

#[test]
fn the_table_covers_what_the_issue_lists() {
    let names: Vec<&str> = cases::all().iter().map(|c| c.name).collect();
    for wanted in [
        "cluster IP",
        "NodePort",
        "external IP",
        "load-balancer IP",
        "multiport",
        "no endpoints",
        "no usable endpoints",
        "externalTrafficPolicy Local with local endpoints",
        "externalTrafficPolicy Local without local endpoints",
        "internalTrafficPolicy Local with local endpoints",
        "internalTrafficPolicy Local without local endpoints",
        "terminating fallback",
        "hairpin",
        "session affinity",
        "dual-stack",
        "nodeport-addresses",
        "masquerade-all",
        "cluster-cidr absent",
        "topology hints",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(wanted)),
            "no case {wanted:?}"
        );
    }
}

/// The frontend model is the only producer of routes: no backend module reads the Service
/// fields routes are decided from (traffic policies, the selected endpoints, whether a port is
/// external) or builds a route itself.
#[test]
fn no_backend_decides_a_route_itself() {
    let backends: &[(&str, &str)] = &[
        ("iptables/render.rs", include_str!("../iptables/render.rs")),
        ("iptables/mod.rs", include_str!("../iptables/mod.rs")),
        ("ebpf/wanted.rs", include_str!("../ebpf/wanted.rs")),
        ("ebpf/backend.rs", include_str!("../ebpf/backend.rs")),
        ("nftables/render.rs", include_str!("../nftables/render.rs")),
        ("nftables/mod.rs", include_str!("../nftables/mod.rs")),
    ];
    let deciding = [
        "external_policy_local",
        "internal_policy_local",
        ".selected",
        "is_external()",
        "Route::To {\n",
        "Route::Reject,",
        "Route::Drop,",
    ];
    for (file, text) in backends {
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for word in deciding {
            assert!(
                !code.contains(word),
                "{file} uses {word:?}: Service semantics belong in model/frontend.rs"
            );
        }
    }
}
