//! Addresses the proxy never programs, decided once here for every backend.
//!
//! The API refuses these too (kpx-control's `api/validation/ip.rs`), but the proxy may run
//! against any API server, and objects stored before that validation still exist. Found on
//! a lab: an EndpointSlice endpoint of 127.0.0.1:10249 gave node-local clients the proxy's
//! own `/metrics`; a Service whose external IP was the node's address or the API server's
//! captured `kubectl logs` and every new connection to the API server (CVE-2020-8554 class).
//!
//! - Endpoints that are unspecified, loopback, link-local or multicast (or the broadcast
//!   address) are skipped: kube's `ValidateEndpointIP` refuses the same ranges (kpx adds
//!   multicast and broadcast, which no TCP peer can have). Node addresses stay valid
//!   endpoints: hostNetwork pods use them.
//! - External and load-balancer IPs that are this node's own addresses or the API server's
//!   address are skipped: a frontend there would capture the node's and the cluster's
//!   traffic to the node itself (kubelet) or to the control plane. The same special ranges
//!   are skipped there too.

use std::net::{IpAddr, Ipv4Addr};

/// Why an address is not programmed: the `reason` label of
/// `kpx_proxy_refused_addresses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    Unspecified,
    Loopback,
    LinkLocal,
    Multicast,
    Broadcast,
    NodeAddress,
    ApiServerAddress,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unspecified => "unspecified",
            Refusal::Loopback => "loopback",
            Refusal::LinkLocal => "link-local",
            Refusal::Multicast => "multicast",
            Refusal::Broadcast => "broadcast",
            Refusal::NodeAddress => "node-address",
            Refusal::ApiServerAddress => "api-server-address",
        }
    }

    /// The sentence of the warning.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::Unspecified => "is the unspecified address (0.0.0.0, ::)",
            Refusal::Loopback => "is in the loopback range (127.0.0.0/8, ::1/128)",
            Refusal::LinkLocal => "is in the link-local range (169.254.0.0/16, fe80::/10)",
            Refusal::Multicast => "is a multicast address (224.0.0.0/4, ff00::/8)",
            Refusal::Broadcast => "is the broadcast address (255.255.255.255)",
            Refusal::NodeAddress => {
                "is this node's own address: a frontend there would capture traffic to the node"
            }
            Refusal::ApiServerAddress => {
                "is the API server's address: a frontend there would capture traffic to the control plane"
            }
        }
    }
}

/// Addresses no Service may take as an external or load-balancer IP on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    /// This node's own addresses.
    pub node: Vec<IpAddr>,
    /// The API server's address(es), from the proxy's client configuration.
    pub api_server: Vec<IpAddr>,
}

/// An IPv4-mapped IPv6 address is judged as the IPv4 address it stands for.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why `ip` may never be an endpoint (or a frontend), if so.
pub fn special(ip: IpAddr) -> Option<Refusal> {
    let ip = unmapped(ip);
    if ip.is_unspecified() {
        return Some(Refusal::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Refusal::Loopback);
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local {
        return Some(Refusal::LinkLocal);
    }
    if ip.is_multicast() {
        return Some(Refusal::Multicast);
    }
    if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Some(Refusal::Broadcast);
    }
    None
}

/// Why `ip` may not be an endpoint. Node addresses are fine (hostNetwork pods).
pub fn endpoint(ip: IpAddr) -> Option<Refusal> {
    special(ip)
}

/// Why `ip` may not be an external or load-balancer IP on this node.
pub fn frontend(ip: IpAddr, protected: &Protected) -> Option<Refusal> {
    if let Some(why) = special(ip) {
        return Some(why);
    }
    let ip = unmapped(ip);
    if protected.api_server.iter().any(|a| unmapped(*a) == ip) {
        return Some(Refusal::ApiServerAddress);
    }
    if protected.node.iter().any(|a| unmapped(*a) == ip) {
        return Some(Refusal::NodeAddress);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn endpoints_never_loopback_link_local_unspecified_or_multicast_but_node_addresses_are_fine() {
        let table = [
            ("127.0.0.1", Some(Refusal::Loopback)),
            ("127.9.9.9", Some(Refusal::Loopback)),
            ("::1", Some(Refusal::Loopback)),
            ("::ffff:127.0.0.1", Some(Refusal::Loopback)),
            ("169.254.169.254", Some(Refusal::LinkLocal)),
            ("fe80::1", Some(Refusal::LinkLocal)),
            ("0.0.0.0", Some(Refusal::Unspecified)),
            ("::", Some(Refusal::Unspecified)),
            ("224.0.0.1", Some(Refusal::Multicast)),
            ("ff02::1", Some(Refusal::Multicast)),
            ("255.255.255.255", Some(Refusal::Broadcast)),
            ("198.18.0.10", None),
            ("2001:2::10", None),
        ];
        for (text, want) in table {
            assert_eq!(endpoint(ip(text)), want, "{text}");
        }
    }

    #[test]
    fn frontends_never_the_nodes_or_the_api_servers_address() {
        let protected = Protected {
            node: vec![ip("198.18.0.10"), ip("2001:2::10")],
            api_server: vec![ip("198.18.0.1")],
        };
        assert_eq!(
            frontend(ip("198.18.0.10"), &protected),
            Some(Refusal::NodeAddress)
        );
        assert_eq!(
            frontend(ip("::ffff:198.18.0.10"), &protected),
            Some(Refusal::NodeAddress)
        );
        assert_eq!(
            frontend(ip("2001:2::10"), &protected),
            Some(Refusal::NodeAddress)
        );
        assert_eq!(
            frontend(ip("198.18.0.1"), &protected),
            Some(Refusal::ApiServerAddress)
        );
        assert_eq!(
            frontend(ip("127.0.0.1"), &protected),
            Some(Refusal::Loopback)
        );
        assert_eq!(frontend(ip("198.18.64.10"), &protected), None);
    }
}
