//! The iptables plan, traced: the full restore of each family, a packet walked through it from
//! the hook it enters by (`iptables/trace.rs`).

use std::collections::BTreeSet;

use super::{node_ips, node_source, Case, From, Outcome, Probe, Runner, Seen};
use crate::iptables::render::{self, Fragments, RenderConfig};
use crate::iptables::trace::{filter_chains, trace_through, Packet};
use crate::model::Changes;

pub struct IptablesRunner {
    /// The full restore text, IPv4 then IPv6.
    restore: [String; 2],
}

impl IptablesRunner {
    pub fn new(case: &Case) -> Self {
        let state = case.state();
        let plan = |ipv6: bool| {
            let cfg = RenderConfig {
                ipv6,
                cluster_cidr: case.node.cidr(ipv6).map(str::to_string),
                masquerade_all: case.node.masquerade_all,
                nodeport_addresses: case.node.nodeport_addresses_of(ipv6),
                conntrack_tcp_be_liberal: false,
            };
            render::plan(
                &cfg,
                &state,
                &Changes::default(),
                &Fragments::new(),
                true,
                &BTreeSet::new(),
                &[],
            )
            .restore
        };
        Self {
            restore: [plan(false), plan(true)],
        }
    }
}

impl Runner for IptablesRunner {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn outcome(&self, probe: &Probe) -> Outcome {
        let ipv6 = probe.to.is_ipv6();
        let local = node_ips();
        let src = match probe.from {
            From::Pod(ip) | From::RemotePod(ip) | From::Outside(ip) => super::ip(ip),
            From::Node => node_source(ipv6),
        };
        let packet = Packet {
            src,
            dst: probe.to,
            protocol: probe.protocol.lower(),
            dport: probe.port,
            local: &local,
        };
        let hooks = filter_chains(probe.from == From::Node, local.contains(&probe.to));
        let outcomes: Vec<_> = trace_through(&self.restore[usize::from(ipv6)], &packet, hooks)
            .into_iter()
            .filter(|o| o.probability > 1e-9)
            .collect();
        let dnat: BTreeSet<String> = outcomes.iter().filter_map(|o| o.dnat.clone()).collect();
        if !dnat.is_empty() {
            if outcomes.iter().any(|o| o.dnat.is_none()) {
                return Outcome::Reach {
                    endpoints: ["<some ways not DNATed>".to_string()].into(),
                    seen: Seen::Client,
                    affinity: None,
                };
            }
            let masqueraded = outcomes.iter().all(|o| o.masquerade);
            if !masqueraded && outcomes.iter().any(|o| o.masquerade) {
                return Outcome::Reach {
                    endpoints: ["<masqueraded on some ways only>".to_string()].into(),
                    seen: Seen::Client,
                    affinity: None,
                };
            }
            return Outcome::Reach {
                endpoints: dnat,
                // The node's own traffic counts as masqueraded only when it is: to a local
                // frontend address the kernel would pick that address as the source.
                seen: if masqueraded {
                    Seen::Node
                } else {
                    Seen::Client
                },
                affinity: outcomes.iter().find_map(|o| o.affinity),
            };
        }
        match outcomes.iter().find_map(|o| o.verdict.as_deref()) {
            Some(v) if v.starts_with("REJECT") => Outcome::Reject,
            Some("DROP") => Outcome::Drop,
            _ => Outcome::NotAService,
        }
    }
}
