//! Endpoints from EndpointSlices, and which of them serve which traffic (kube-proxy's
//! `CategorizeEndpoints`): ready endpoints, else serving-and-terminating ones; traffic policy
//! `Local` narrows to this node's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::refuse;
use super::service::{NamespacedName, Protocol, Skipped};

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this proxy's node.
    pub local: bool,
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
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(Endpoint {
            ip,
            port: 0,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
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

/// Which endpoints each kind of traffic goes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selected {
    /// Traffic from inside the cluster (ClusterIP; all traffic unless a policy is Local).
    pub cluster: Vec<Endpoint>,
    /// Traffic from outside when `externalTrafficPolicy: Local`: this node's endpoints.
    pub local: Vec<Endpoint>,
    /// Whether the Service has any endpoint at all (else its traffic is rejected).
    pub any: bool,
}

fn usable(endpoints: impl Iterator<Item = Endpoint> + Clone) -> Vec<Endpoint> {
    let ready: Vec<Endpoint> = endpoints.clone().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    // None ready: fall back to endpoints still serving while they terminate.
    endpoints.filter(|e| e.serving && e.terminating).collect()
}

pub fn select(endpoints: &[Endpoint], internal_local: bool) -> Selected {
    let local = usable(endpoints.iter().filter(|e| e.local).cloned());
    let cluster = if internal_local {
        local.clone()
    } else {
        usable(endpoints.iter().cloned())
    };
    Selected {
        cluster,
        local,
        any: !endpoints.is_empty(),
    }
}
