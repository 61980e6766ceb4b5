//! The seam every backend plugs into, in no backend's vocabulary. A backend turns a snapshot
//! into kernel state: its plan is pure (and checked by the conformance table); only its apply
//! touches the kernel.
//!
//! The failure contract: a failed sync may leave part of its plan applied (iptables-restore is
//! atomic per call, BPF map writes and IPVS are not). The runner then makes the next sync full,
//! and a full sync converges from what the backend reads back from the kernel, never from what
//! it remembers having written.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{Changes, ConntrackCleanup, ProxyState, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A tool ran and failed (`iptables-restore`, `ipset`, `conntrack`).
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A tool could not be started.
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A kernel call failed (a bpf() or netlink operation, a sysctl, a file under /proc).
    #[error("{op}: {detail}")]
    Kernel { op: String, detail: String },
    /// A kernel table is full; what fit is programmed and keeps working.
    #[error(
        "{what} is full ({capacity} entries): {hint}; the Services written before it keep working"
    )]
    Capacity {
        what: String,
        capacity: u32,
        hint: String,
    },
}

impl BackendError {
    pub fn kernel(op: impl Into<String>, detail: impl fmt::Display) -> Self {
        BackendError::Kernel {
            op: op.into(),
            detail: detail.to_string(),
        }
    }
}

/// What the backend is told about the node, read once per sync by the runner (not polled by
/// each backend).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The node's own addresses (every interface's, but loopback and link-local ones and
    /// kube-ipvs0's and kpx-ipvs0's), in interface order.
    pub addresses: Vec<NodeAddress>,
}

/// One address of the node, and the interface it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub interface: String,
    pub ip: IpAddr,
}

impl NodeState {
    /// The node's addresses as they are now (`getifaddrs`).
    pub fn read() -> Self {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Self::default();
        };
        let addresses = addrs
            .filter(|a| a.interface_name != KUBE_IPVS && a.interface_name != KPX_IPVS)
            .filter_map(|a| {
                let storage = a.address?;
                let ip = if let Some(v4) = storage.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else {
                    IpAddr::V6(storage.as_sockaddr_in6()?.ip())
                };
                Some(NodeAddress {
                    interface: a.interface_name,
                    ip,
                })
            })
            // The same loopback and link-local ranges the proxy never programs (refuse.rs).
            .filter(|a| {
                !matches!(
                    crate::model::refuse::special(a.ip),
                    Some(Refusal::Loopback | Refusal::LinkLocal)
                )
            })
            .collect();
        Self { addresses }
    }

    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().map(|a| a.ip)
    }
}

/// kube-proxy's IPVS mode binds every Service address to this dummy interface: those are
/// Service addresses, not the node's.
const KUBE_IPVS: &str = "kube-ipvs0";
/// And kpx's IPVS mode to this one (`ipvs::layout::DUMMY`).
const KPX_IPVS: &str = crate::ipvs::layout::DUMMY;

/// One sync's input.
#[derive(Debug, Clone, Copy)]
pub struct SyncInput<'a> {
    pub state: &'a ProxyState,
    /// What changed since the last successful sync (ignored by a full sync).
    pub changes: &'a Changes,
    /// Program everything, from what the kernel holds, not only what `changes` touched.
    pub full: bool,
    pub node: &'a NodeState,
}

/// What a backend's counts count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unit {
    /// iptables or nftables rules.
    #[default]
    Rules,
    /// BPF map entries (frontends).
    MapEntries,
    /// IPVS virtual servers.
    VirtualServers,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::Rules => "rules",
            Unit::MapEntries => "map entries",
            Unit::VirtualServers => "virtual servers",
        }
    }
}

/// A number of things, and which things.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Count {
    pub n: usize,
    pub unit: Unit,
}

impl Count {
    pub fn new(n: usize, unit: Unit) -> Self {
        Self { n, unit }
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.n, self.unit.label())
    }
}

impl std::ops::Add for Count {
    type Output = Count;
    fn add(self, other: Count) -> Count {
        Count {
            n: self.n + other.n,
            unit: self.unit,
        }
    }
}

/// What one sync did, for metrics and logs.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub full: bool,
    /// Written by this sync.
    pub written: Count,
    /// Programmed once it is applied.
    pub total: Count,
    /// Chains (or sets, maps) created or rewritten, and deleted.
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// `total` per kernel table, where the backend has tables (iptables: `nat`, `filter`;
    /// ipvs: its family, `IPv4` or `IPv6`, for `kpx_proxy_ipvs_virtual_servers{ip_family}`).
    pub per_table: Vec<(&'static str, Count)>,
    /// Kernel messages this sync sent (ipvs: generic netlink messages, for
    /// `kpx_proxy_ipvs_netlink_messages_total`); 0 for backends that do not count them.
    pub messages: usize,
}

/// One Service port as a backend reads it back from the kernel (`kpx-proxy dump`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpedService {
    /// `namespace/name:port/PROTOCOL`.
    pub service: String,
    /// `ip:port` of every frontend address (NodePorts apart).
    pub addresses: Vec<String>,
    pub node_port: Option<u16>,
    /// `ip:port` of every endpoint any of its frontends reaches.
    pub endpoints: Vec<String>,
    /// With no endpoint: what its traffic gets (`reject` or `drop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_endpoints: Option<String>,
    /// The backend's own view of each frontend (eBPF: map entries), when it has one.
    #[serde(default)]
    pub frontends: Vec<DumpedFrontend>,
}

/// One frontend as a backend keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpedFrontend {
    /// `ip:port`, `*:port` for a NodePort, with ` internal` for an internal-scope entry.
    pub frontend: String,
    pub id: u32,
    pub flags: u16,
    pub affinity_timeout: u32,
    pub endpoints: Vec<String>,
    /// The networks new connections may come from (eBPF: `loadBalancerSourceRanges`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
}

/// One flow of a backend's own connection tracking (eBPF).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpedFlow {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub direction: String,
    pub masqueraded: bool,
    pub backend_id: u32,
    pub service_id: u32,
}

/// What is programmed, read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dump {
    pub backend: String,
    pub services: Vec<DumpedService>,
    #[serde(default)]
    pub conntrack: Vec<DumpedFlow>,
}

impl Dump {
    /// Sorts services by name and each one's lists, so dumps compare and print stably.
    pub fn sorted(mut self) -> Self {
        self.services.sort_by(|a, b| a.service.cmp(&b.service));
        for s in &mut self.services {
            s.addresses.sort();
            s.addresses.dedup();
            s.endpoints.sort();
            s.endpoints.dedup();
        }
        self
    }
}

pub trait Backend: Send + 'static {
    fn name(&self) -> &'static str;

    /// Programs `input.state`: all of it when `input.full`, else what `input.changes`
    /// touched. On error, part of the plan may be in place; the next sync is full.
    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError>;

    /// What someone removed of what this backend programmed, if anything (the next sync must
    /// then be full).
    fn lost_state(&mut self) -> Option<String>;

    /// Work between syncs, on the runner's periodic tick (stale chains, graceful termination
    /// of IPVS real servers). Nothing by default.
    fn housekeeping(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Removes the flows that must not outlive this sync (UDP flows to a gone endpoint, or
    /// rejected while a Service had none). By default from the kernel's conntrack table,
    /// which the netfilter-based backends use; a backend keeping its own conntrack overrides it.
    fn clear_stale_flows(
        &mut self,
        flows: &BTreeSet<ConntrackCleanup>,
    ) -> Result<(), BackendError> {
        crate::conntrack::clear(flows.iter().cloned()).map(|_| ())
    }

    /// Removes everything this backend ever programmed, and nothing else.
    fn cleanup(&mut self) -> Result<(), BackendError>;

    /// What is programmed in the kernel now, per Service port, read back from the kernel.
    fn dump(&self) -> Result<Dump, BackendError>;
}

/// A backend chosen at run time (`--proxy-mode`).
impl Backend for Box<dyn Backend> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
        (**self).sync(input)
    }

    fn lost_state(&mut self) -> Option<String> {
        (**self).lost_state()
    }

    fn housekeeping(&mut self) -> Result<(), BackendError> {
        (**self).housekeeping()
    }

    fn clear_stale_flows(
        &mut self,
        flows: &BTreeSet<ConntrackCleanup>,
    ) -> Result<(), BackendError> {
        (**self).clear_stale_flows(flows)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        (**self).cleanup()
    }

    fn dump(&self) -> Result<Dump, BackendError> {
        (**self).dump()
    }
}
