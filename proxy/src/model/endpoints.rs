//! Endpoints from EndpointSlices, and which of them serve which traffic (kube-proxy's
//! `CategorizeEndpoints`, `pkg/proxy/topology.go`): ready endpoints, else serving-and-terminating
//! ones; topology hints narrow the cluster-wide set to this node's zone (or node); traffic
//! policy `Local` uses this node's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::refuse;
use super::service::{NamespacedName, Protocol, Skipped};

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The Node label holding the node's zone (`v1.LabelTopologyZone`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// An endpoint's topology hints (EndpointSlice `endpoints[].hints`): the zones and nodes
/// whose proxies should use it. Empty when the slice has none. One pointer wide: most
/// endpoints have none, and every endpoint is held several times (slices, the merged list,
/// each selected set), so two inline `Vec`s cost 14 MiB at 100,000 endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints(Option<std::sync::Arc<HintLists>>);

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct HintLists {
    zones: Vec<String>,
    nodes: Vec<String>,
}

impl Hints {
    pub fn new(zones: Vec<String>, nodes: Vec<String>) -> Self {
        if zones.is_empty() && nodes.is_empty() {
            return Self(None);
        }
        Self(Some(std::sync::Arc::new(HintLists { zones, nodes })))
    }

    /// `forZones`.
    pub fn zones(&self) -> &[String] {
        self.0.as_deref().map_or(&[], |h| &h.zones)
    }

    /// `forNodes`.
    pub fn nodes(&self) -> &[String] {
        self.0.as_deref().map_or(&[], |h| &h.nodes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this proxy's node.
    pub local: bool,
    pub hints: Hints,
}

/// The endpoints of one slice, per (port name, protocol). A short list rather than a map:
/// slices have one or two ports, and a B-tree's smallest node holds eleven.
pub type SliceEndpoints = Vec<((String, Protocol), Vec<Endpoint>)>;

/// The endpoints of one port of a slice.
pub fn port_endpoints<'a>(
    slice: &'a SliceEndpoints,
    key: &(String, Protocol),
) -> Option<&'a Vec<Endpoint>> {
    slice.iter().find(|(k, _)| k == key).map(|(_, eps)| eps)
}

/// The Service a slice belongs to.
pub fn slice_service(slice: &EndpointSlice) -> Option<NamespacedName> {
    let ns = slice.metadata.namespace.as_deref()?;
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(NamespacedName::new(ns, service))
}

/// Reads one slice; unusable endpoints and ports are skipped and reported.
pub fn slice_endpoints(
    slice: &EndpointSlice,
    node_name: &str,
    skips: &mut Vec<Skipped>,
) -> SliceEndpoints {
    let mut out: BTreeMap<(String, Protocol), Vec<Endpoint>> = BTreeMap::new();
    let object = format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or(""),
        slice.metadata.name.as_deref().unwrap_or("")
    );
    let skip = |field: String, reason: String| Skipped {
        kind: "EndpointSlice",
        object: object.clone(),
        field,
        reason,
        refusal: None,
    };
    let family_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        // FQDN slices are for DNS, not for the proxy.
        _ => return SliceEndpoints::new(),
    };
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses the first address only.
        let Some(text) = ep.addresses.first() else {
            continue;
        };
        let ip = match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() == family_v4 => ip,
            Ok(_) => {
                skips.push(skip(
                    format!("endpoints[{i}].addresses[0]"),
                    format!(
                        "{text} is not of the slice's address type {}",
                        slice.address_type
                    ),
                ));
                continue;
            }
            Err(_) => {
                skips.push(skip(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{text:?} is not an IP address"),
                ));
                continue;
            }
        };
        // Never program a loopback, link-local, unspecified or multicast backend (an endpoint
        // of 127.0.0.1:10249 served the proxy's own /metrics); node addresses are fine.
        if let Some(why) = refuse::endpoint(ip) {
            skips.push(Skipped {
                refusal: Some(why),
                ..skip(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{ip} {}: never programmed as an endpoint", why.explain()),
                )
            });
            continue;
        }
        // Unset conditions read as kube-proxy's EndpointSliceCache reads them
        // (`newEndpointSliceInfo`): ready and serving default to true, terminating to false.
        // (Serving does not follow ready: an unready endpoint with serving unset is serving.)
        let conditions = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        endpoints.push(Endpoint {
            ip,
            port: 0,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
            hints: Hints::new(
                hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            ),
        });
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = port.port.filter(|p| (1..=65535).contains(p)) else {
            skips.push(skip(
                format!("ports[{i}].port"),
                format!("{:?} is not a port number (1-65535)", port.port),
            ));
            continue;
        };
        let Some(protocol) = Protocol::parse(port.protocol.as_deref().unwrap_or("TCP")) else {
            skips.push(skip(
                format!("ports[{i}].protocol"),
                format!("{:?} is not TCP, UDP or SCTP", port.protocol),
            ));
            continue;
        };
        let list = out
            .entry((port.name.clone().unwrap_or_default(), protocol))
            .or_default();
        list.extend(endpoints.iter().map(|e| Endpoint {
            port: number as u16,
            ..e.clone()
        }));
    }
    out.into_iter().collect()
}

/// Merges the slices of one Service port: sorted, and one entry per address and port (an
/// endpoint listed in two slices while it moves counts once, ready if either says so).
pub fn merge<'a>(lists: impl Iterator<Item = &'a Vec<Endpoint>>) -> Vec<Endpoint> {
    let mut by_address: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for ep in lists.flatten() {
        by_address
            .entry((ep.ip, ep.port))
            .and_modify(|seen| {
                if ep.ready && !seen.ready {
                    *seen = ep.clone();
                }
            })
            .or_insert_with(|| ep.clone());
    }
    by_address.into_values().collect()
}

/// Which endpoints each kind of traffic goes to: kube-proxy's `CategorizeEndpoints` results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selected {
    /// The endpoints for `Cluster` traffic policy: ready ones (narrowed by topology hints when
    /// they apply), else serving-and-terminating ones. Empty when the Service port never uses
    /// Cluster policy (`internalTrafficPolicy: Local` and not reachable from outside).
    pub cluster: Vec<Endpoint>,
    /// The endpoints for `Local` traffic policy: this node's ready ones, else this node's
    /// serving-and-terminating ones. Empty when the Service port never uses Local policy.
    pub local: Vec<Endpoint>,
    /// Whether the Service has a usable endpoint anywhere in the cluster (ready, or serving
    /// and terminating): without one its traffic is rejected, with one but none here for a
    /// Local policy it is dropped (kube-proxy's `hasAnyEndpoints`).
    pub any: bool,
}

impl Selected {
    /// The endpoints for traffic from pods and the node to the cluster IP (kube-proxy's
    /// proxiers: `internalPolicyLocal ? localEndpoints : clusterEndpoints`).
    pub fn internal(&self, port: &super::ServicePort) -> &[Endpoint] {
        if port.internal_policy_local {
            &self.local
        } else {
            &self.cluster
        }
    }

    /// The endpoints for traffic from outside to a NodePort, external or load-balancer IP
    /// (`externalPolicyLocal ? localEndpoints : clusterEndpoints`; pods and the node reaching
    /// an external address with policy Local short-circuit to `cluster`).
    pub fn external(&self, port: &super::ServicePort) -> &[Endpoint] {
        if port.external_policy_local {
            &self.local
        } else {
            &self.cluster
        }
    }
}

/// Which endpoint sets a Service port needs (kube-proxy's `ServicePort.UsesClusterEndpoints`
/// and `UsesLocalEndpoints`, `pkg/proxy/serviceport.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uses {
    pub cluster: bool,
    pub local: bool,
}

impl Uses {
    /// Cluster endpoints unless internal traffic is `Local` and nothing comes from outside
    /// (even with `externalTrafficPolicy: Local`, pods and the node reaching an external
    /// address short-circuit to Cluster endpoints); Local ones when either policy is `Local`.
    pub fn of(port: &super::ServicePort) -> Self {
        let external = port.is_external();
        Self {
            cluster: !port.internal_policy_local || external,
            local: port.internal_policy_local || (port.external_policy_local && external),
        }
    }
}

/// Where this proxy runs, as topology sees it: its node's name and zone (empty if the Node
/// has no `topology.kubernetes.io/zone` label or is not known yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Place<'a> {
    pub node: &'a str,
    pub zone: &'a str,
}

/// How the cluster endpoints are narrowed (kube-proxy's topology modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// Every ready endpoint.
    All,
    /// Those hinted for this node (`PreferSameNode`).
    Node,
    /// Those hinted for this node's zone (`PreferClose`, `PreferSameZone`, `topology-mode`).
    Zone,
}

/// kube-proxy's `topologyModeFromHints`: hints are followed only if every *ready* endpoint
/// has them and at least one is for this node (node hints) or this node's zone (zone hints);
/// node hints are tried first, then zone hints, then none. The proxy follows hints whatever
/// asked for them (`trafficDistribution` or the `topology-mode` annotation): since kube 1.30 it
/// no longer reads either itself, the EndpointSlice controller decides by setting the hints.
fn topology(endpoints: &[Endpoint], place: Place<'_>) -> Topology {
    let ready = || endpoints.iter().filter(|e| e.ready);
    if ready().next().is_none() {
        return Topology::All;
    }
    let has = |hints: &[String], want: &str| !want.is_empty() && hints.iter().any(|h| h == want);
    if ready().all(|e| !e.hints.nodes().is_empty())
        && ready().any(|e| has(e.hints.nodes(), place.node))
    {
        return Topology::Node;
    }
    if ready().all(|e| !e.hints.zones().is_empty())
        && ready().any(|e| has(e.hints.zones(), place.zone))
    {
        return Topology::Zone;
    }
    Topology::All
}

/// kube-proxy's `availableForTopology`.
fn available(e: &Endpoint, mode: Topology, place: Place<'_>) -> bool {
    match mode {
        Topology::All => true,
        Topology::Node => e.hints.nodes().iter().any(|n| n == place.node),
        Topology::Zone => e.hints.zones().iter().any(|z| z == place.zone),
    }
}

/// kube-proxy's `CategorizeEndpoints` (`pkg/proxy/topology.go`) for one Service port.
/// [`select`] for each IP family on its own: kube-proxy runs one proxier per family, each
/// seeing only its family's slices, so readiness fallback, topology and `Local` are decided
/// per family (an IPv4 endpoint ready does not stop IPv6 falling back to a terminating one).
pub fn select_per_family(endpoints: &[Endpoint], uses: Uses, place: Place<'_>) -> Selected {
    let v4 = endpoints.iter().filter(|e| e.ip.is_ipv4()).count();
    if v4 == 0 || v4 == endpoints.len() {
        return select(endpoints, uses, place);
    }
    let (ipv4, ipv6): (Vec<Endpoint>, Vec<Endpoint>) =
        endpoints.iter().cloned().partition(|e| e.ip.is_ipv4());
    let (a, b) = (select(&ipv4, uses, place), select(&ipv6, uses, place));
    Selected {
        cluster: a.cluster.into_iter().chain(b.cluster).collect(),
        local: a.local.into_iter().chain(b.local).collect(),
        any: a.any || b.any,
    }
}

pub fn select(endpoints: &[Endpoint], uses: Uses, place: Place<'_>) -> Selected {
    let mut out = Selected::default();
    if uses.cluster {
        let mode = topology(endpoints, place);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available(e, mode, place))
            .cloned()
            .collect();
        // No ready endpoint (topology was already given up when none is ready for this
        // zone or node): fall back to the serving ones still terminating, anywhere.
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
        }
        out.any = !out.cluster.is_empty();
    }
    if uses.local {
        let usable = |e: &&Endpoint| e.ready || (e.serving && e.terminating);
        out.any |= endpoints.iter().any(|e| usable(&e));
        let local_ready = endpoints.iter().any(|e| e.local && e.ready);
        out.local = endpoints
            .iter()
            .filter(|e| {
                e.local
                    && if local_ready {
                        e.ready
                    } else {
                        e.serving && e.terminating
                    }
            })
            .cloned()
            .collect();
    }
    out
}

#[cfg(test)]
mod select_tests;
