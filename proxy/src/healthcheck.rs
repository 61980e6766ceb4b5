//! Health-check node ports (kube-proxy's `ServiceHealthServer`,
//! `pkg/proxy/healthcheck/service_health.go`). A load balancer in front of a Service with
//! `externalTrafficPolicy: Local` probes `healthCheckNodePort` on every node and sends traffic
//! only to nodes that answer 200: those with a local ready endpoint.
//!
//! - pure: [`wanted`], per Service its port and its count of local ready endpoints, from a
//!   [`ProxyState`];
//! - I/O: [`HealthCheckServer`], the listeners, opened and closed after each sync as Services
//!   come and go. A failed bind is logged, counted and retried on the next sync; never fatal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;

use crate::metrics::Health;
use crate::model::{NamespacedName, ProxyState};

/// What one Service's health-check port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceHealth {
    pub port: u16,
    /// Endpoints on this node that are ready (so not terminating), counted once per address
    /// across the Service's ports.
    pub local_ready: usize,
}

/// The Services that need a health-check port on this node, with their counts.
///
/// As kube-proxy: a Service needs one when it has `healthCheckNodePort` and
/// `externalTrafficPolicy: Local` (`apiservice.NeedsHealthCheck`; the API server only sets the
/// port on type LoadBalancer). The count is kube-proxy's `EndpointsMap.LocalReadyEndpoints`:
/// local endpoints that are *ready*, squashed by IP (10.0.0.1:80 and 10.0.0.1:443 are one).
/// Serving-but-terminating endpoints still get traffic (the fallback) but are not counted, so
/// a node whose endpoints all terminate fails its check and the load balancer drains it
/// (KEP-1669; e2e "should fail health check node port if there are only terminating
/// endpoints"). The API makes `ready` false for terminating endpoints; `!terminating` is
/// checked as well so a slice that says both does not keep a draining node in rotation.
pub fn wanted(state: &ProxyState) -> BTreeMap<NamespacedName, ServiceHealth> {
    let mut ready: BTreeMap<NamespacedName, (u16, BTreeSet<IpAddr>)> = BTreeMap::new();
    for entry in state.entries.values() {
        let port = &entry.port;
        let Some(hc) = port.health_check_node_port else {
            continue;
        };
        if !port.external_policy_local {
            continue;
        }
        let (_, ips) = ready
            .entry(port.name.service.clone())
            .or_insert_with(|| (hc, BTreeSet::new()));
        ips.extend(
            entry
                .endpoints
                .iter()
                .filter(|e| e.local && e.ready && !e.terminating)
                .map(|e| e.ip),
        );
    }
    ready
        .into_iter()
        .map(|(name, (port, ips))| {
            (
                name,
                ServiceHealth {
                    port,
                    local_ready: ips.len(),
                },
            )
        })
        .collect()
}

/// The addresses to listen on: the wildcard, or with `--nodeport-addresses` the node's
/// addresses inside those CIDRs (kube-proxy's `nodeIPs` from `GetNodeIPs`).
pub fn bind_addresses(cidrs: &[(IpAddr, u8)], node: &[IpAddr]) -> Vec<IpAddr> {
    if cidrs.is_empty() {
        return vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
    }
    let mut out: Vec<IpAddr> = node
        .iter()
        .filter(|ip| {
            cidrs
                .iter()
                .any(|(net, len)| crate::cidr::contains(*net, *len, ip))
        })
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `ADDRESS/PREFIX` (as `--nodeport-addresses` gives them) to a pair for [`bind_addresses`].
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (address, prefix) = text.trim().split_once('/')?;
    let address: IpAddr = address.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if address.is_ipv6() { 128 } else { 32 };
    (prefix <= max).then_some((address, prefix))
}

/// The node's interface addresses (what `--nodeport-addresses` selects from).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let storage = a.address?;
            if let Some(v4) = storage.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                storage.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// What the handlers read: the counts of the open Services and the proxy's own health.
struct Shared {
    counts: RwLock<BTreeMap<NamespacedName, usize>>,
    health: Arc<Health>,
}

struct Instance {
    port: u16,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Aborting the serve task drops its listener: the port closes at once.
        for server in &self.servers {
            server.abort();
        }
    }
}

/// The health-check listeners of this node.
pub struct HealthCheckServer {
    /// `--nodeport-addresses`; empty for every address.
    cidrs: Vec<(IpAddr, u8)>,
    shared: Arc<Shared>,
    open: BTreeMap<NamespacedName, Instance>,
    bind_failures: u64,
}

impl HealthCheckServer {
    pub fn new(nodeport_cidrs: Vec<(IpAddr, u8)>, health: Arc<Health>) -> Self {
        Self {
            cidrs: nodeport_cidrs,
            shared: Arc::new(Shared {
                counts: RwLock::new(BTreeMap::new()),
                health,
            }),
            open: BTreeMap::new(),
            bind_failures: 0,
        }
    }

    /// Binds that failed so far (each is retried on the next sync).
    pub fn bind_failures(&self) -> u64 {
        self.bind_failures
    }

    /// The ports open now, per Service.
    pub fn open_ports(&self) -> BTreeMap<NamespacedName, u16> {
        self.open.iter().map(|(n, i)| (n.clone(), i.port)).collect()
    }

    /// Makes the listeners and counts match `state` (kube-proxy's `SyncServices` then
    /// `SyncEndpoints`): closes those of gone Services or changed ports, opens the missing
    /// ones, leaves the rest serving. Must run inside a tokio runtime.
    pub fn sync(&mut self, state: &ProxyState) {
        let wanted = wanted(state);
        self.open.retain(|name, instance| {
            let keep = wanted.get(name).is_some_and(|w| w.port == instance.port);
            if !keep {
                tracing::info!(service = %name, port = instance.port, "closing health-check node port");
            }
            keep
        });
        {
            let mut counts = self
                .shared
                .counts
                .write()
                .unwrap_or_else(|e| e.into_inner());
            *counts = wanted
                .iter()
                .map(|(n, w)| (n.clone(), w.local_ready))
                .collect();
        }
        let mut node: Option<Vec<IpAddr>> = None;
        for (name, want) in &wanted {
            if self.open.contains_key(name) {
                continue;
            }
            let addresses = if self.cidrs.is_empty() {
                bind_addresses(&[], &[])
            } else {
                let node = node.get_or_insert_with(interface_addresses);
                bind_addresses(&self.cidrs, node)
            };
            match self.listen_all(name, want.port, &addresses) {
                Ok(instance) => {
                    tracing::info!(service = %name, port = want.port, addresses = ?addresses, "opened health-check node port");
                    self.open.insert(name.clone(), instance);
                }
                Err((address, e)) => {
                    self.bind_failures += 1;
                    tracing::error!(service = %name, port = want.port, %address, error = %e, failures = self.bind_failures, "cannot open the health-check node port; retrying on the next sync");
                }
            }
        }
    }

    /// Listens on `port` of every address, or on none (what was opened is closed again, so a
    /// retry or another owner of the port finds it free).
    fn listen_all(
        &self,
        name: &NamespacedName,
        port: u16,
        addresses: &[IpAddr],
    ) -> Result<Instance, (SocketAddr, std::io::Error)> {
        let mut instance = Instance {
            port,
            servers: Vec::new(),
        };
        for ip in addresses {
            let address = SocketAddr::new(*ip, port);
            let listener = listen(address).map_err(|e| (address, e))?;
            let app = Router::new()
                // Every path answers, as kube-proxy's handler does.
                .fallback(probe)
                .with_state((name.clone(), self.shared.clone()));
            let service = name.clone();
            instance.servers.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(%service, %address, error = %e, "health-check node port closed");
                }
            }));
        }
        Ok(instance)
    }
}

/// A listening socket on `address`; the IPv6 wildcard also takes IPv4 (as Go's "0.0.0.0"
/// listener does), whatever `net.ipv6.bindv6only` says.
fn listen(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if address.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)
            .map_err(std::io::Error::from)?;
    }
    socket.set_reuseaddr(true)?;
    match socket.bind(address) {
        Ok(()) => {}
        // A node without IPv6: the IPv4 wildcard then.
        Err(e)
            if address.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            return listen(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                address.port(),
            ));
        }
        Err(e) => return Err(e),
    }
    socket.listen(1024)
}

/// The answer to a probe: kube-proxy's body, 200 with local ready endpoints while the proxy is
/// healthy, else 503.
pub fn answer(name: &NamespacedName, local_ready: usize, proxy_healthy: bool) -> Response {
    let body = json!({
        "service": {"namespace": name.namespace, "name": name.name},
        "localEndpoints": local_ready,
        "serviceProxyHealthy": proxy_healthy,
    });
    let code = if local_ready > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn probe(State((name, shared)): State<(NamespacedName, Arc<Shared>)>) -> Response {
    // A Service closed while this request was in flight counts 0.
    let count = shared
        .counts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .copied()
        .unwrap_or(0);
    let (healthy, _, _) = shared.health.status();
    answer(&name, count, healthy)
}

#[cfg(test)]
#[path = "healthcheck_tests.rs"]
mod tests;
