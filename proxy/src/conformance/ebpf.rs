//! The eBPF plan's map entries, through an interpreter of the lookups the programs make
//! (`ebpf/bpf/lb.h`, `sock_lb.bpf.c`, `tc_lb.bpf.c`): the node's and pods' sockets go through
//! socket LB at connect time; what it leaves alone, and every packet from another machine,
//! through the tc program. Keep it in step with the C code: it is the C code's contract.

use std::net::IpAddr;

use kpx_ebpf::layout::{
    self, ServiceKey, SVC_F_DROP, SVC_F_INTERNAL, SVC_F_MASQUERADE, SVC_F_MASQ_PODS,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES,
};
use kpx_ebpf::plan::{Wanted, WantedService};

use super::{endpoint_text, Case, From, Node, Outcome, Probe, Runner, Seen};
use crate::ebpf::wanted::{self, NodeConfigs};
use crate::model::frontend::NodeConfig;
use crate::model::Protocol;

pub struct EbpfRunner {
    wanted: Wanted,
    node: Node,
}

impl EbpfRunner {
    pub fn new(case: &Case) -> Self {
        let of = |ipv6: bool| NodeConfig {
            cluster_cidr: case.node.parsed_cidr(ipv6),
            masquerade_all: case.node.masquerade_all,
            node_ips: Vec::new(),
        };
        let nodes: NodeConfigs = [of(false), of(true)];
        Self {
            wanted: wanted::wanted(&case.state(), &nodes),
            node: case.node.clone(),
        }
    }

    /// `from_pod_network` in lb.h.
    fn in_pod_network(&self, ip: IpAddr) -> bool {
        self.node
            .parsed_cidr(ip.is_ipv6())
            .is_some_and(|(net, len)| crate::cidr::contains(net, len, &ip))
    }

    /// `lookup_service` in lb.h.
    fn lookup(&self, probe: &Probe, internal: bool) -> Option<&WantedService> {
        let proto = match probe.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => return None,
        };
        let key = ServiceKey::new(probe.to, probe.port, proto);
        let svc = match self.wanted.get(&key) {
            Some(svc) => svc,
            None => {
                // kpx_node_addrs: the addresses NodePorts answer on (backend.rs refresh_node).
                if !super::node_ips().contains(&probe.to)
                    || !wanted::answers_nodeports(&probe.to, &self.node.nodeport_cidrs())
                {
                    return None;
                }
                let any = if probe.to.is_ipv6() {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                };
                let svc = self.wanted.get(&ServiceKey::new(any, probe.port, proto))?;
                if svc.flags & SVC_F_NODEPORT == 0 {
                    return None;
                }
                svc
            }
        };
        if !internal || svc.flags & SVC_F_INTERNAL == 0 {
            return Some(svc);
        }
        let mut inner = ServiceKey::new(probe.to, probe.port, proto);
        if !self.wanted.contains_key(&inner) {
            inner.addr = [0; 16];
        }
        Some(self.wanted.get(&inner.internal()).unwrap_or(svc))
    }

    fn reach(svc: &WantedService, seen: Seen) -> Outcome {
        Outcome::Reach {
            endpoints: svc
                .backends
                .iter()
                .map(|b| endpoint_text(layout::ip(&b.addr, b.family), u16::from_be(b.port)))
                .collect(),
            seen,
            affinity: (svc.affinity_timeout != 0).then_some(svc.affinity_timeout),
        }
    }

    /// `source_admitted` in lb.h: the trie under the entry's id holds the entry's ranges.
    fn admitted(svc: &WantedService, src: IpAddr) -> bool {
        svc.flags & SVC_F_SOURCE_RANGES == 0 || svc.source_ranges.iter().any(|r| r.contains(src))
    }

    fn no_backends(svc: &WantedService) -> Outcome {
        if svc.flags & SVC_F_DROP != 0 {
            Outcome::Drop
        } else {
            Outcome::Reject
        }
    }

    /// `load_balance` in tc_lb.bpf.c, for a packet from `src`.
    fn tc(&self, probe: &Probe, src: IpAddr) -> Outcome {
        let pod = self.in_pod_network(src);
        let Some(svc) = self.lookup(probe, pod) else {
            return Outcome::NotAService;
        };
        // Every probe is a new connection: the ranges are asked before anything else.
        if !Self::admitted(svc, src) {
            return Outcome::Drop;
        }
        if svc.backends.is_empty() {
            return Self::no_backends(svc);
        }
        let masq_bit = if pod {
            SVC_F_MASQ_PODS
        } else {
            SVC_F_MASQUERADE
        };
        let hairpin = svc
            .backends
            .iter()
            .any(|b| layout::ip(&b.addr, b.family) == src);
        let seen = if svc.flags & masq_bit != 0 || hairpin {
            Seen::Node
        } else {
            Seen::Client
        };
        Self::reach(svc, seen)
    }

    /// `translate` in sock_lb.bpf.c, for a socket of the node (`node`) or of a pod.
    fn sock(&self, probe: &Probe, node: bool, pod_src: Option<IpAddr>) -> Outcome {
        let pods_known = self.node.parsed_cidr(probe.to.is_ipv6()).is_some();
        let Some(svc) = self.lookup(probe, node || pods_known) else {
            return Outcome::NotAService;
        };
        let to_tc = |this: &Self| match pod_src {
            Some(src) => this.tc(probe, src),
            None => Outcome::NotAService,
        };
        if svc.flags & SVC_F_SOURCE_RANGES != 0 {
            // A pod's packets are judged by tc; the node's socket by the address it sends
            // from: unbound, as every probe's is, the node's (kpx_config).
            if !node {
                return to_tc(self);
            }
            if !Self::admitted(svc, super::node_source(probe.to.is_ipv6())) {
                return Outcome::Drop;
            }
        }
        if !node && svc.flags & SVC_F_MASQ_PODS != 0 {
            return to_tc(self);
        }
        if svc.backends.is_empty() {
            if svc.flags & SVC_F_DROP != 0 && !node {
                return to_tc(self);
            }
            return Self::no_backends(svc);
        }
        Self::reach(svc, if node { Seen::Node } else { Seen::Client })
    }
}

impl Runner for EbpfRunner {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn outcome(&self, probe: &Probe) -> Outcome {
        match probe.from {
            // Pods sit in the node's cgroup: their sockets go through socket LB first.
            From::Pod(ip) => self.sock(probe, false, Some(super::ip(ip))),
            From::Node => self.sock(probe, true, None),
            From::RemotePod(ip) | From::Outside(ip) => self.tc(probe, super::ip(ip)),
        }
    }
}
