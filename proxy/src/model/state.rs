//! A snapshot of everything the backends program, and what changed since the last one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::endpoints::{Endpoint, Selected};
use super::service::{Protocol, ServicePort, ServicePortName, Skipped};

/// One Service port with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub port: ServicePort,
    /// Every endpoint, whatever its condition (for counts and `dump`).
    pub endpoints: Vec<Endpoint>,
    pub selected: Selected,
}

/// What is programmed. Entries are shared between snapshots; an unchanged Service port keeps
/// the same `Arc`, so a backend can skip it by pointer.
#[derive(Debug, Clone, Default)]
pub struct ProxyState {
    pub entries: BTreeMap<ServicePortName, Arc<ServiceEntry>>,
}

impl ProxyState {
    pub fn endpoint_count(&self) -> usize {
        self.entries.values().map(|e| e.endpoints.len()).sum()
    }
}

/// Conntrack entries to delete after a sync, so UDP flows do not stick to a gone endpoint.
/// kube-proxy's `deleteStaleEndpointConnections` / `deleteStaleServiceConntrackEntries`
/// (`pkg/proxy/conntrack/cleanup.go`): by Service address, and by NodePort on any address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConntrackCleanup {
    /// Flows to `vip:port` answered by `endpoint`.
    Endpoint {
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
        endpoint: IpAddr,
    },
    /// All flows to `vip:port` (it had no endpoints; its rejected flows must not linger).
    Service {
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
    },
    /// Flows to the NodePort `node_port` on any local address, answered by `endpoint`
    /// (kube-proxy's `ClearEntriesForPortNAT`: `--dport` and `--dst-nat`). The family is the
    /// endpoint's.
    NodePortEndpoint {
        node_port: u16,
        protocol: Protocol,
        endpoint: IpAddr,
    },
    /// All flows of one family to the NodePort `node_port` on any address (the Service had no
    /// endpoints, so they were rejected; kube-proxy's `ClearEntriesForPort`).
    NodePort {
        ipv6: bool,
        node_port: u16,
        protocol: Protocol,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Added or modified Service ports.
    pub changed: BTreeSet<ServicePortName>,
    /// Removed Service ports, with what they were.
    pub removed: BTreeMap<ServicePortName, Arc<ServiceEntry>>,
    pub conntrack: BTreeSet<ConntrackCleanup>,
    /// Input skipped while building this snapshot.
    pub skipped: Vec<Skipped>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Every address a Service port answers on (cluster, external, load-balancer IPs).
pub fn service_addresses(port: &ServicePort) -> impl Iterator<Item = IpAddr> + '_ {
    port.cluster_ips
        .iter()
        .chain(&port.external_ips)
        .chain(&port.load_balancer_ips)
        .copied()
}

/// The conntrack cleanups UDP needs between two versions of a Service port: for every endpoint
/// that stopped serving, its flows to each Service address and to the NodePort; for a Service
/// port that goes from no endpoints to some, every flow to its addresses and its NodePort
/// (they were rejected and would stay so until their entries time out).
pub fn udp_cleanups(
    old: Option<&ServiceEntry>,
    new: Option<&ServiceEntry>,
    out: &mut BTreeSet<ConntrackCleanup>,
) {
    let Some(entry) = old.or(new) else {
        return;
    };
    if entry.port.name.protocol != Protocol::Udp {
        return;
    }
    let serving = |e: Option<&ServiceEntry>| -> BTreeSet<IpAddr> {
        e.map(|e| {
            e.selected
                .cluster
                .iter()
                .chain(&e.selected.local)
                .map(|ep| ep.ip)
                .collect()
        })
        .unwrap_or_default()
    };
    let (before, after) = (serving(old), serving(new));
    if let Some(old) = old {
        for gone in before.difference(&after) {
            for vip in service_addresses(&old.port) {
                out.insert(ConntrackCleanup::Endpoint {
                    vip,
                    port: old.port.port,
                    protocol: Protocol::Udp,
                    endpoint: *gone,
                });
            }
            if let Some(node_port) = old.port.node_port {
                out.insert(ConntrackCleanup::NodePortEndpoint {
                    node_port,
                    protocol: Protocol::Udp,
                    endpoint: *gone,
                });
            }
        }
    }
    if let Some(new) = new {
        if before.is_empty() && !after.is_empty() {
            for vip in service_addresses(&new.port) {
                out.insert(ConntrackCleanup::Service {
                    vip,
                    port: new.port.port,
                    protocol: Protocol::Udp,
                });
            }
            if let Some(node_port) = new.port.node_port {
                // One per family the Service has: the NodePort answers on every node address
                // of each of its families.
                let families: BTreeSet<bool> =
                    new.port.cluster_ips.iter().map(IpAddr::is_ipv6).collect();
                for ipv6 in families {
                    out.insert(ConntrackCleanup::NodePort {
                        ipv6,
                        node_port,
                        protocol: Protocol::Udp,
                    });
                }
            }
        }
    }
}
