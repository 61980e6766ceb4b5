//! The frontend model read directly: the route the model gives the probe's source.

use std::net::IpAddr;

use super::{endpoint_text, Case, From, Outcome, Probe, Runner, Seen};
use crate::model::frontend::{self, FrontendKind, NodeConfig, Route};
use crate::model::ProxyState;

pub struct ModelRunner {
    state: ProxyState,
    node: super::Node,
}

impl ModelRunner {
    pub fn new(case: &Case) -> Self {
        Self {
            state: case.state(),
            node: case.node.clone(),
        }
    }
}

impl Runner for ModelRunner {
    fn name(&self) -> &'static str {
        "model"
    }

    fn outcome(&self, probe: &Probe) -> Outcome {
        let ipv6 = probe.to.is_ipv6();
        let config = NodeConfig {
            cluster_cidr: self.node.parsed_cidr(ipv6),
            masquerade_all: self.node.masquerade_all,
            node_ips: vec![super::node_source(ipv6)],
        };
        let nodeport_ips = self.node.nodeport_ips();
        let mut exact = None;
        let mut node_port = None;
        for entry in self.state.entries.values() {
            if entry.port.name.protocol != probe.protocol {
                continue;
            }
            for fe in frontend::frontends(entry, &config, ipv6).frontends {
                if fe.port != probe.port {
                    continue;
                }
                if fe.kind == FrontendKind::NodePort {
                    if nodeport_ips.contains(&probe.to) {
                        node_port = Some(fe);
                    }
                } else if fe.ip == probe.to {
                    exact = Some(fe);
                }
            }
        }
        let Some(fe) = exact.or(node_port) else {
            return Outcome::NotAService;
        };
        let (route, src): (&Route, Option<IpAddr>) = match probe.from {
            From::Pod(ip) | From::RemotePod(ip) => {
                let ip: IpAddr = super::ip(ip);
                if config.is_pod(ip) {
                    (&fe.from_pods, Some(ip))
                } else {
                    (&fe.from_outside, Some(ip))
                }
            }
            From::Node => (&fe.from_node, None),
            From::Outside(ip) => (&fe.from_outside, Some(super::ip(ip))),
        };
        // Source ranges come first (kube-proxy's firewall runs before its reject rules).
        if !fe.admits(src.unwrap_or_else(|| super::node_source(ipv6))) {
            return Outcome::Drop;
        }
        match route {
            Route::To {
                endpoints,
                masquerade,
                ..
            } => {
                let hairpin = src.is_some_and(|s| endpoints.iter().any(|e| e.ip == s));
                Outcome::Reach {
                    endpoints: endpoints
                        .iter()
                        .map(|e| endpoint_text(e.ip, e.port))
                        .collect(),
                    seen: if *masquerade || hairpin {
                        Seen::Node
                    } else {
                        Seen::Client
                    },
                    affinity: fe.affinity_seconds,
                }
            }
            Route::Reject => Outcome::Reject,
            Route::Drop => Outcome::Drop,
        }
    }
}
