//! The frontend model: Service semantics, decided once for every backend (pure).
//!
//! A Service port answers on several frontends per IP family: its cluster IP, each external IP,
//! each load-balancer IP and its NodePort (on the node's addresses). For each frontend this
//! module decides what traffic gets, by where the traffic comes from:
//!
//! - **pods**: a client inside the pod network (told apart by the node's local-traffic detector,
//!   kube-proxy's `--cluster-cidr` / `detectLocalMode: ClusterCIDR`; without one, pods cannot be
//!   told from outside clients and get what outside clients get);
//! - **node**: a process of the node itself (its own address is the source);
//! - **outside**: anything else (another machine, or a pod when pods cannot be told apart).
//!
//! Each gets a [`Route`]: to a set of endpoints, masqueraded or not, or rejected (no usable
//! endpoint anywhere: refuse at once, never a hang), or dropped (endpoints exist, but none for
//! this traffic: kube-proxy's "has no local endpoints"). Two rules hold for every route and are
//! not repeated in it: a client reaching itself through the frontend (hairpin) is always
//! masqueraded, and session affinity (`affinity_seconds`) applies to whichever endpoints the
//! route names.
//!
//! Backends render these routes and decide nothing themselves: `iptables/render.rs` turns them
//! into chains, `ebpf/wanted.rs` into map entries, and the conformance table
//! (`crate::conformance`) checks each backend's plan against this module's answers.
//!
//! The rules follow kube-proxy's `syncProxyRules` (iptables and nftables proxiers, 1.31+):
//! cluster IPs masquerade traffic from outside the pod network (with a detector) or everything
//! (`--masquerade-all`); external frontends masquerade everything with
//! `externalTrafficPolicy: Cluster`; with `Local`, outside clients keep their address and reach
//! only this node's endpoints, while pods (when told apart) and the node itself are
//! short-circuited to all endpoints as if they had gone out to a load balancer and back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use super::endpoints::Endpoint;
use super::service::Protocol;
use super::state::ServiceEntry;

/// What the frontend model needs to know about the node, per IP family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The pod network of this family (`--cluster-cidr`): the local-traffic detector. `None`:
    /// pod traffic cannot be told from outside traffic.
    pub cluster_cidr: Option<(IpAddr, u8)>,
    /// `--masquerade-all`: every client of a cluster IP is masqueraded.
    pub masquerade_all: bool,
    /// The node's own addresses of this family, where the backend knows them: a load-balancer
    /// IP whose source ranges take in one of them also admits itself as a source (below).
    pub node_ips: Vec<IpAddr>,
}

impl NodeConfig {
    /// Whether `ip` is a pod's address by the detector.
    pub fn is_pod(&self, ip: IpAddr) -> bool {
        self.cluster_cidr
            .is_some_and(|(net, len)| crate::cidr::contains(net, len, &ip))
    }
}

/// Which kind of address a frontend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
    /// The Service's NodePort, on every address the node answers NodePorts on
    /// (`--nodeport-addresses`).
    NodePort,
}

impl FrontendKind {
    /// Reachable from outside the cluster by design (everything but the cluster IP).
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

/// Which of the Service port's endpoint sets a route uses: backends that program one list per
/// set (iptables chains, IPVS real-server sets) name them by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointSet {
    /// The endpoints cluster traffic uses (`internalTrafficPolicy` applied).
    Cluster,
    /// This node's endpoints (`externalTrafficPolicy: Local`, or
    /// `internalTrafficPolicy: Local`).
    Local,
}

/// Where one kind of traffic to one frontend goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Balanced over `endpoints` (never empty); `masquerade`: the endpoint sees the node's
    /// address instead of the client's.
    To {
        set: EndpointSet,
        endpoints: Arc<[Endpoint]>,
        masquerade: bool,
    },
    /// No usable endpoint anywhere: refused at once (ICMP port unreachable / TCP reset).
    Reject,
    /// Usable endpoints exist, none for this traffic: dropped, so a client retries elsewhere.
    Drop,
}

impl Route {
    pub fn endpoints(&self) -> &[Endpoint] {
        match self {
            Route::To { endpoints, .. } => endpoints,
            _ => &[],
        }
    }

    pub fn set(&self) -> Option<EndpointSet> {
        match self {
            Route::To { set, .. } => Some(*set),
            _ => None,
        }
    }

    pub fn masquerade(&self) -> bool {
        matches!(
            self,
            Route::To {
                masquerade: true,
                ..
            }
        )
    }

    /// The same endpoints (or the same verdict), whatever the masquerade.
    pub fn same_target(&self, other: &Route) -> bool {
        match (self, other) {
            (Route::To { set: a, .. }, Route::To { set: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }
}

/// One address (and port) a Service port answers on, with a route per source of traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub kind: FrontendKind,
    /// The address; for a NodePort the unspecified address of its family (it answers on the
    /// node's addresses).
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub from_pods: Route,
    pub from_node: Route,
    pub from_outside: Route,
    /// `sessionAffinity: ClientIP`: a client keeps its endpoint for this many seconds.
    pub affinity_seconds: Option<u32>,
    /// `loadBalancerSourceRanges` (load-balancer IPs only): when `Some`, a new connection whose
    /// source address is in none of these networks is dropped, whatever its route — from pods,
    /// the node or outside alike (kube-proxy's firewall chain). Empty: nobody may connect.
    pub allowed_sources: Option<Arc<[IpNet]>>,
}

impl Frontend {
    /// Whether a connection from `source` passes the frontend's source ranges.
    pub fn admits(&self, source: IpAddr) -> bool {
        self.allowed_sources
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&source)))
    }

    pub fn ipv6(&self) -> bool {
        self.ip.is_ipv6()
    }

    /// The three routes, in the order pods, node, outside.
    pub fn routes(&self) -> [&Route; 3] {
        [&self.from_pods, &self.from_node, &self.from_outside]
    }

    /// Every source gets the same route.
    pub fn uniform(&self) -> bool {
        self.from_pods == self.from_node && self.from_node == self.from_outside
    }
}

/// The frontends of one family of a Service port, with its endpoints of that family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontends {
    pub frontends: Vec<Frontend>,
    /// The endpoint sets the routes use (each at most once), for backends that program one
    /// list per set.
    pub sets: Vec<(EndpointSet, Arc<[Endpoint]>)>,
}

fn unspecified(ipv6: bool) -> IpAddr {
    if ipv6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

fn of_family(endpoints: &[Endpoint], ipv6: bool) -> Arc<[Endpoint]> {
    endpoints
        .iter()
        .filter(|e| e.ip.is_ipv6() == ipv6)
        .cloned()
        .collect()
}

/// The frontends of `entry` in one IP family, and their routes. Pure; the only producer of
/// routes in the proxy.
pub fn frontends(entry: &ServiceEntry, node: &NodeConfig, ipv6: bool) -> Frontends {
    let port = &entry.port;
    let mut out = Frontends::default();
    let cluster_ips: Vec<IpAddr> = port
        .cluster_ips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv6() == ipv6)
        .collect();
    // A family without a cluster IP is not served at all (kube-proxy's per-family proxier
    // skips the Service), whatever its external addresses.
    if cluster_ips.is_empty() {
        return out;
    }
    let selected = &entry.selected;
    let cluster = of_family(&selected.cluster, ipv6);
    let local = of_family(&selected.local, ipv6);
    // kube-proxy's hasEndpoints: any usable endpoint anywhere (of this family: each family's
    // proxier sees only its own slices).
    let any = entry
        .endpoints
        .iter()
        .any(|e| e.ip.is_ipv6() == ipv6 && (e.ready || (e.serving && e.terminating)));
    let to = |set: EndpointSet, masquerade: bool| -> Route {
        let endpoints = match set {
            EndpointSet::Cluster => &cluster,
            EndpointSet::Local => &local,
        };
        if endpoints.is_empty() {
            if any {
                Route::Drop
            } else {
                Route::Reject
            }
        } else {
            Route::To {
                set,
                endpoints: endpoints.clone(),
                masquerade,
            }
        }
    };
    let detector = node.cluster_cidr.is_some();
    let base = Frontend {
        kind: FrontendKind::ClusterIp,
        ip: unspecified(ipv6),
        port: port.port,
        protocol: port.name.protocol,
        from_pods: Route::Reject,
        from_node: Route::Reject,
        from_outside: Route::Reject,
        affinity_seconds: port.affinity_seconds,
        allowed_sources: None,
    };

    // Cluster IPs: internalTrafficPolicy decides the endpoint set (this node's for Local, the
    // cluster's, topology applied, otherwise); masquerade everything with --masquerade-all,
    // else what comes from outside the pod network when it can be told apart.
    let internal_set = if port.internal_policy_local {
        EndpointSet::Local
    } else {
        EndpointSet::Cluster
    };
    let off_cluster_masq = node.masquerade_all || detector;
    for ip in &cluster_ips {
        out.frontends.push(Frontend {
            kind: FrontendKind::ClusterIp,
            ip: *ip,
            from_pods: to(internal_set, node.masquerade_all),
            from_node: to(internal_set, off_cluster_masq),
            from_outside: to(internal_set, off_cluster_masq),
            ..base.clone()
        });
    }

    if port.is_external() {
        let (pods, node_route, outside) = if port.external_policy_local {
            let outside = to(EndpointSet::Local, false);
            // Pods are short-circuited to all endpoints, unmasqueraded (as if they went out
            // to the load balancer and came back); the node's own traffic too, masqueraded,
            // since the frontend address is local and would be its source.
            let pods = if detector {
                to(EndpointSet::Cluster, false)
            } else {
                outside.clone()
            };
            (pods, to(EndpointSet::Cluster, true), outside)
        } else {
            let all = to(EndpointSet::Cluster, true);
            (all.clone(), all.clone(), all)
        };
        let external = |kind: FrontendKind, ip: IpAddr, port_number: u16| Frontend {
            kind,
            ip,
            port: port_number,
            from_pods: pods.clone(),
            from_node: node_route.clone(),
            from_outside: outside.clone(),
            ..base.clone()
        };
        for ip in port.external_ips.iter().filter(|ip| ip.is_ipv6() == ipv6) {
            out.frontends
                .push(external(FrontendKind::ExternalIp, *ip, port.port));
        }
        let ranges: Vec<IpNet> = port
            .source_ranges
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == ipv6)
            .copied()
            .collect();
        // kube-proxy: ranges of the other family only leave this family open; a Service whose
        // ranges could not be read at all is closed (kube-apiserver refuses such input, so
        // only a store written around it gets here).
        // A range of the whole family (0.0.0.0/0, ::/0: a common cloud default) admits every
        // source: no restriction to render (ipset's net types refuse a /0 member outright).
        let everyone = ranges.iter().any(|n| n.prefix_len() == 0);
        let restricted = !everyone
            && (!ranges.is_empty() || (port.source_ranges_given && port.source_ranges.is_empty()));
        // A load balancer whose address is also bound on the node (IPVS binds it to kpx-ipvs0)
        // answers the node's own connections from that address: kube-proxy admits it as a
        // source when the ranges take in the node.
        let from_node = ranges
            .iter()
            .any(|n| node.node_ips.iter().any(|ip| n.contains(ip)));
        for ip in port
            .load_balancer_ips
            .iter()
            .filter(|ip| ip.is_ipv6() == ipv6)
        {
            let mut f = external(FrontendKind::LoadBalancerIp, *ip, port.port);
            if restricted {
                let mut allowed = ranges.clone();
                if from_node {
                    allowed.push(IpNet::from(*ip));
                }
                f.allowed_sources = Some(allowed.into());
            }
            out.frontends.push(f);
        }
        if let Some(node_port) = port.node_port {
            out.frontends.push(external(
                FrontendKind::NodePort,
                unspecified(ipv6),
                node_port,
            ));
        }
    }

    for f in &out.frontends {
        for route in f.routes() {
            if let Route::To { set, endpoints, .. } = route {
                if !out.sets.iter().any(|(s, _)| s == set) {
                    out.sets.push((*set, endpoints.clone()));
                }
            }
        }
    }
    out.sets.sort_by_key(|(s, _)| *s);
    out
}

#[cfg(test)]
mod tests;
