//! Which conntrack entries a set of cleanups deletes, decided in userspace for every entry of
//! a dump (the kernel filter, where the kernel has one, only narrows the dump), and the
//! narrowest kernel filter that still returns every entry the cleanups match.
//!
//! The filters are kube-proxy's (`pkg/proxy/conntrack/cleanup.go`, `filter.go`): a flow is
//! matched on its protocol, its original destination address and port, and its reply source
//! (where a DNATed flow was sent: `filterForNAT` and `filterForPortNAT` compare `--reply-src`
//! with the endpoint).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::backend::BackendError;
use crate::model::{ConntrackCleanup, Protocol};

/// IANA protocol numbers, as conntrack's `CTA_PROTO_NUM` carries them.
pub(super) fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
        Protocol::Sctp => libc::IPPROTO_SCTP as u8,
    }
}

/// One direction of a conntrack entry (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`). Ports are 0
/// for protocols without ports (ICMP), which no cleanup matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A conntrack entry as a dump returns it: what the filters look at, and what a delete needs
/// to name exactly this entry (its original tuple, zone and id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Flow {
    pub protocol: u8,
    pub orig: Tuple,
    pub reply: Tuple,
    /// `CTA_ZONE`, when the entry is not in the default zone.
    pub zone: Option<u16>,
    /// `CTA_TUPLE_ZONE` inside the original tuple (a zone for one direction only).
    pub orig_zone: Option<u16>,
    /// `CTA_ID`: a delete carrying it removes this entry and not a newer one with the same
    /// tuple (the kernel answers ENOENT then), as conntrack(8) deletes what it listed.
    pub id: Option<u32>,
}

impl Flow {
    pub fn ipv6(&self) -> bool {
        self.orig.dst.is_ipv6()
    }
}

/// The family as conntrack(8) and the logs name it.
pub(super) fn family_name(ipv6: bool) -> &'static str {
    if ipv6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

/// The family of the entries a cleanup matches.
pub(super) fn is_ipv6(cleanup: &ConntrackCleanup) -> bool {
    match cleanup {
        ConntrackCleanup::Endpoint { vip, .. } | ConntrackCleanup::Service { vip, .. } => {
            vip.is_ipv6()
        }
        ConntrackCleanup::NodePortEndpoint { endpoint, .. } => endpoint.is_ipv6(),
        ConntrackCleanup::NodePort { ipv6, .. } => *ipv6,
    }
}

fn protocol_and_port(cleanup: &ConntrackCleanup) -> (Protocol, u16) {
    match cleanup {
        ConntrackCleanup::Endpoint { protocol, port, .. }
        | ConntrackCleanup::Service { protocol, port, .. } => (*protocol, *port),
        ConntrackCleanup::NodePortEndpoint {
            protocol,
            node_port,
            ..
        }
        | ConntrackCleanup::NodePort {
            protocol,
            node_port,
            ..
        } => (*protocol, *node_port),
    }
}

/// The original destination address a cleanup requires, if any (NodePorts answer on every
/// local address, so theirs is any).
fn orig_dst(cleanup: &ConntrackCleanup) -> Option<IpAddr> {
    match cleanup {
        ConntrackCleanup::Endpoint { vip, .. } | ConntrackCleanup::Service { vip, .. } => {
            Some(*vip)
        }
        _ => None,
    }
}

/// The reply source (the endpoint the flow was DNATed to) a cleanup requires, if any.
fn reply_src(cleanup: &ConntrackCleanup) -> Option<IpAddr> {
    match cleanup {
        ConntrackCleanup::Endpoint { endpoint, .. }
        | ConntrackCleanup::NodePortEndpoint { endpoint, .. } => Some(*endpoint),
        _ => None,
    }
}

/// Refuses a cleanup that could match nothing sensible: port 0 (no Service port or NodePort
/// is 0), or a Service address and an endpoint of different families.
pub(super) fn validate(cleanup: &ConntrackCleanup) -> Result<(), BackendError> {
    let (_, port) = protocol_and_port(cleanup);
    if port == 0 {
        let field = match cleanup {
            ConntrackCleanup::Endpoint { .. } | ConntrackCleanup::Service { .. } => "port",
            _ => "node_port",
        };
        return Err(BackendError::kernel(
            "conntrack cleanup",
            format!(
                "{field} is 0 in {}: a Service port or NodePort is 1-65535",
                Describe(cleanup)
            ),
        ));
    }
    if let (Some(vip), Some(endpoint)) = (orig_dst(cleanup), reply_src(cleanup)) {
        if vip.is_ipv6() != endpoint.is_ipv6() {
            return Err(BackendError::kernel(
                "conntrack cleanup",
                format!(
                    "endpoint {endpoint} is not of the family of vip {vip} in {}: both must be \
                     IPv4 or both IPv6",
                    Describe(cleanup)
                ),
            ));
        }
    }
    Ok(())
}

/// A cleanup in conntrack(8)'s words (`conntrack -D` with these options lists and deletes the
/// same entries), for logs and errors.
pub struct Describe<'a>(pub &'a ConntrackCleanup);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (protocol, port) = protocol_and_port(self.0);
        write!(
            f,
            "-f {} -p {}",
            family_name(is_ipv6(self.0)),
            protocol.lower()
        )?;
        if let Some(vip) = orig_dst(self.0) {
            write!(f, " --orig-dst {vip}")?;
        }
        write!(f, " --orig-port-dst {port}")?;
        if let Some(endpoint) = reply_src(self.0) {
            write!(f, " --reply-src {endpoint}")?;
        }
        Ok(())
    }
}

fn matches(cleanup: &ConntrackCleanup, flow: &Flow) -> bool {
    orig_dst(cleanup).is_none_or(|vip| flow.orig.dst == vip)
        && reply_src(cleanup).is_none_or(|endpoint| flow.reply.src == endpoint)
}

/// All the cleanups of one family, indexed by protocol and original destination port (which
/// every cleanup names), so each entry of a dump is compared with the few that share its port
/// instead of with all of them.
pub(super) struct Matcher<'a> {
    ipv6: bool,
    by_port: HashMap<(u8, u16), Vec<&'a ConntrackCleanup>>,
}

impl<'a> Matcher<'a> {
    /// `cleanups` are all of family `ipv6` (the caller groups them).
    pub fn new(ipv6: bool, cleanups: &[&'a ConntrackCleanup]) -> Self {
        let mut by_port: HashMap<(u8, u16), Vec<&'a ConntrackCleanup>> = HashMap::new();
        for cleanup in cleanups {
            let (protocol, port) = protocol_and_port(cleanup);
            by_port
                .entry((protocol_number(protocol), port))
                .or_default()
                .push(cleanup);
        }
        Self { ipv6, by_port }
    }

    /// Whether any cleanup deletes `flow`. Entries of the other family (a kernel that ignored
    /// the dump's family) never match.
    pub fn matches(&self, flow: &Flow) -> bool {
        if flow.ipv6() != self.ipv6 || flow.orig.src.is_ipv6() != self.ipv6 {
            return false;
        }
        self.by_port
            .get(&(flow.protocol, flow.orig.dst_port))
            .is_some_and(|cleanups| cleanups.iter().any(|c| matches(c, flow)))
    }
}

/// What the kernel can filter a dump on (`CTA_FILTER`, Linux 5.8 and later): the fields that
/// all the cleanups of the call share, so the kernel returns a superset of their matches.
/// Userspace still checks every entry against every cleanup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KernelFilter {
    pub protocol: Option<u8>,
    /// Only with `protocol` (the kernel refuses port flags without a protocol number).
    pub orig_dst_port: Option<u16>,
    pub orig_dst: Option<IpAddr>,
    pub reply_src: Option<IpAddr>,
}

/// `Some(v)` when every item yields the same `Some(v)`.
fn shared<T: PartialEq + Copy>(mut items: impl Iterator<Item = Option<T>>) -> Option<T> {
    let first = items.next()??;
    items.all(|v| v == Some(first)).then_some(first)
}

impl KernelFilter {
    /// The filter for the cleanups of one family. IPv6 gets no addresses: the kernel's
    /// `ctnetlink_filter_match_tuple` compares IPv6 addresses with `!ipv6_addr_cmp(..)`, which
    /// drops exactly the entries whose address equals the filter's (seen on Linux 6.18: an
    /// IPv6 address filter returns none of the entries it names).
    pub fn common(ipv6: bool, cleanups: &[&ConntrackCleanup]) -> Self {
        let protocol = shared(
            cleanups
                .iter()
                .map(|c| Some(protocol_number(protocol_and_port(c).0))),
        );
        let orig_dst_port = protocol.and(shared(
            cleanups.iter().map(|c| Some(protocol_and_port(c).1)),
        ));
        let address = |shared: Option<IpAddr>| shared.filter(|_| !ipv6);
        Self {
            protocol,
            orig_dst_port,
            orig_dst: address(shared(cleanups.iter().map(|c| orig_dst(c)))),
            reply_src: address(shared(cleanups.iter().map(|c| reply_src(c)))),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{Describe, Flow, KernelFilter, Matcher, Tuple};
    use crate::model::{ConntrackCleanup, Protocol};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    const UDP: u8 = 17;
    const TCP: u8 = 6;

    /// A flow from a client to `dst:dport`, answered by `answer:5353` (`dst` itself when not
    /// DNATed).
    fn flow(protocol: u8, dst: &str, dport: u16, answer: &str) -> Flow {
        let client = if dst.contains(':') {
            ip("2001:2::9")
        } else {
            ip("198.18.0.9")
        };
        let answer = ip(answer);
        let answer_port = if answer == ip(dst) { dport } else { 5353 };
        Flow {
            protocol,
            orig: Tuple {
                src: client,
                dst: ip(dst),
                src_port: 40000,
                dst_port: dport,
            },
            reply: Tuple {
                src: answer,
                dst: client,
                src_port: answer_port,
                dst_port: 40000,
            },
            zone: None,
            orig_zone: None,
            id: Some(7),
        }
    }

    fn endpoint(vip: &str, port: u16, endpoint: &str) -> ConntrackCleanup {
        ConntrackCleanup::Endpoint {
            vip: ip(vip),
            port,
            protocol: Protocol::Udp,
            endpoint: ip(endpoint),
        }
    }

    fn service(vip: &str, port: u16) -> ConntrackCleanup {
        ConntrackCleanup::Service {
            vip: ip(vip),
            port,
            protocol: Protocol::Udp,
        }
    }

    fn node_port_endpoint(node_port: u16, endpoint: &str) -> ConntrackCleanup {
        ConntrackCleanup::NodePortEndpoint {
            node_port,
            protocol: Protocol::Udp,
            endpoint: ip(endpoint),
        }
    }

    fn node_port(ipv6: bool, node_port: u16) -> ConntrackCleanup {
        ConntrackCleanup::NodePort {
            ipv6,
            node_port,
            protocol: Protocol::Udp,
        }
    }

    /// As `clear_with` groups them: the cleanups of the flow's family.
    fn matched(cleanups: &[ConntrackCleanup], flow: &Flow) -> bool {
        let refs: Vec<&ConntrackCleanup> = cleanups
            .iter()
            .filter(|c| super::is_ipv6(c) == flow.ipv6())
            .collect();
        Matcher::new(flow.ipv6(), &refs).matches(flow)
    }

    #[test]
    fn an_endpoint_cleanup_takes_the_flows_to_the_service_port_dnated_to_that_endpoint() {
        // kube-proxy's filterForNAT: --orig-dst VIP, --reply-src endpoint (and kpx adds the
        // port: another port of the same VIP may still have that endpoint).
        let cleanup = [endpoint("10.96.0.53", 53, "198.18.1.1")];
        assert!(matched(
            &cleanup,
            &flow(UDP, "10.96.0.53", 53, "198.18.1.1")
        ));
        assert!(!matched(
            &cleanup,
            &flow(UDP, "10.96.0.53", 53, "198.18.1.2")
        ));
        assert!(!matched(
            &cleanup,
            &flow(UDP, "10.96.0.53", 54, "198.18.1.1")
        ));
        assert!(!matched(
            &cleanup,
            &flow(UDP, "10.96.0.54", 53, "198.18.1.1")
        ));
        assert!(!matched(
            &cleanup,
            &flow(TCP, "10.96.0.53", 53, "198.18.1.1")
        ));
    }

    #[test]
    fn a_service_cleanup_takes_every_flow_to_the_service_port() {
        // ClearEntriesForIP: --orig-dst VIP (whoever answered: rejected flows have no DNAT).
        let cleanup = [service("10.96.0.53", 53)];
        assert!(matched(
            &cleanup,
            &flow(UDP, "10.96.0.53", 53, "198.18.1.1")
        ));
        assert!(matched(
            &cleanup,
            &flow(UDP, "10.96.0.53", 53, "10.96.0.53")
        ));
        assert!(!matched(
            &cleanup,
            &flow(UDP, "10.96.0.53", 80, "10.96.0.53")
        ));
        assert!(!matched(
            &cleanup,
            &flow(UDP, "10.96.0.10", 53, "10.96.0.10")
        ));
    }

    #[test]
    fn node_port_cleanups_take_flows_to_the_port_on_any_address() {
        // ClearEntriesForPortNAT: --dport and --reply-src endpoint; ClearEntriesForPort: --dport.
        let by_endpoint = [node_port_endpoint(30053, "198.18.1.1")];
        assert!(matched(
            &by_endpoint,
            &flow(UDP, "198.18.0.2", 30053, "198.18.1.1")
        ));
        assert!(matched(
            &by_endpoint,
            &flow(UDP, "198.18.0.3", 30053, "198.18.1.1")
        ));
        assert!(!matched(
            &by_endpoint,
            &flow(UDP, "198.18.0.2", 30053, "198.18.1.2")
        ));
        assert!(!matched(
            &by_endpoint,
            &flow(UDP, "198.18.0.2", 30054, "198.18.1.1")
        ));
        let any = [node_port(false, 30053)];
        assert!(matched(&any, &flow(UDP, "198.18.0.2", 30053, "198.18.0.2")));
        assert!(matched(&any, &flow(UDP, "198.18.0.2", 30053, "198.18.1.7")));
        assert!(!matched(&any, &flow(UDP, "2001:2::2", 30053, "2001:2::2")));
        assert!(matched(
            &[node_port(true, 30053)],
            &flow(UDP, "2001:2::2", 30053, "2001:2::2")
        ));
    }

    #[test]
    fn an_entry_matches_if_any_cleanup_of_the_call_matches_it() {
        let cleanups = [
            endpoint("10.96.0.53", 53, "198.18.1.1"),
            service("10.96.0.10", 53),
            node_port_endpoint(30053, "198.18.1.3"),
            endpoint("2001:db8::53", 53, "2001:2::1"),
        ];
        let flows = [
            (flow(UDP, "10.96.0.53", 53, "198.18.1.1"), true),
            (flow(UDP, "10.96.0.53", 53, "198.18.1.3"), false),
            (flow(UDP, "10.96.0.10", 53, "198.18.1.9"), true),
            (flow(UDP, "198.18.0.2", 30053, "198.18.1.3"), true),
            (flow(UDP, "198.18.0.2", 30053, "198.18.1.1"), false),
            (flow(UDP, "2001:db8::53", 53, "2001:2::1"), true),
            (flow(UDP, "2001:db8::53", 53, "2001:2::2"), false),
        ];
        for (flow, expected) in flows {
            assert_eq!(matched(&cleanups, &flow), expected, "{flow:?}");
        }
    }

    #[test]
    fn the_kernel_filter_keeps_only_what_every_cleanup_shares() {
        let one = endpoint("10.96.0.53", 53, "198.18.1.1");
        assert_eq!(
            KernelFilter::common(false, &[&one]),
            KernelFilter {
                protocol: Some(UDP),
                orig_dst_port: Some(53),
                orig_dst: Some(ip("10.96.0.53")),
                reply_src: Some(ip("198.18.1.1")),
            }
        );
        // Two endpoints of one Service port: the address and port stay, the reply source goes.
        let two = endpoint("10.96.0.53", 53, "198.18.1.2");
        assert_eq!(
            KernelFilter::common(false, &[&one, &two]),
            KernelFilter {
                protocol: Some(UDP),
                orig_dst_port: Some(53),
                orig_dst: Some(ip("10.96.0.53")),
                reply_src: None,
            }
        );
        // A NodePort cleanup beside it has no address: only protocol and port... if shared.
        let np = node_port_endpoint(30053, "198.18.1.1");
        assert_eq!(
            KernelFilter::common(false, &[&one, &np]),
            KernelFilter {
                protocol: Some(UDP),
                orig_dst_port: None,
                orig_dst: None,
                reply_src: Some(ip("198.18.1.1")),
            }
        );
        let tcp = ConntrackCleanup::Service {
            vip: ip("10.96.0.53"),
            port: 53,
            protocol: Protocol::Tcp,
        };
        // Without a shared protocol the kernel takes no port either.
        let mixed = KernelFilter::common(false, &[&one, &tcp]);
        assert_eq!(mixed.protocol, None);
        assert_eq!(mixed.orig_dst_port, None);
        assert_eq!(mixed.orig_dst, Some(ip("10.96.0.53")));
        assert!(KernelFilter::common(false, &[]).is_empty());
        // IPv6: protocol and port only (the kernel's IPv6 address comparison is inverted).
        let v6 = endpoint("2001:db8::53", 53, "2001:2::1");
        assert_eq!(
            KernelFilter::common(true, &[&v6]),
            KernelFilter {
                protocol: Some(UDP),
                orig_dst_port: Some(53),
                orig_dst: None,
                reply_src: None,
            }
        );
    }

    #[test]
    fn what_the_kernel_filter_keeps_includes_every_match() {
        // A flow the cleanups match passes the kernel filter built from them.
        let cleanups = [
            endpoint("10.96.0.53", 53, "198.18.1.1"),
            endpoint("10.96.0.53", 53, "198.18.1.2"),
        ];
        let refs: Vec<&ConntrackCleanup> = cleanups.iter().collect();
        let filter = KernelFilter::common(false, &refs);
        let passes = |f: &Flow| {
            filter.protocol.is_none_or(|p| p == f.protocol)
                && filter.orig_dst_port.is_none_or(|p| p == f.orig.dst_port)
                && filter.orig_dst.is_none_or(|a| a == f.orig.dst)
                && filter.reply_src.is_none_or(|a| a == f.reply.src)
        };
        for answer in ["198.18.1.1", "198.18.1.2", "198.18.1.3"] {
            let f = flow(UDP, "10.96.0.53", 53, answer);
            if matched(&cleanups, &f) {
                assert!(passes(&f), "{f:?}");
            }
        }
    }

    #[test]
    fn bad_cleanups_are_refused_naming_the_field() {
        let err = super::validate(&node_port(false, 0)).expect_err("port 0");
        assert!(err.to_string().contains("node_port is 0"), "{err}");
        let err = super::validate(&endpoint("10.96.0.53", 53, "2001:2::1")).expect_err("family");
        assert!(
            err.to_string()
                .contains("endpoint 2001:2::1 is not of the family of vip 10.96.0.53"),
            "{err}"
        );
        assert!(super::validate(&service("10.96.0.53", 53)).is_ok());
    }

    #[test]
    fn cleanups_read_as_conntrack_options() {
        assert_eq!(
            Describe(&endpoint("10.96.0.53", 53, "198.18.1.1")).to_string(),
            "-f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 198.18.1.1"
        );
        assert_eq!(
            Describe(&node_port(true, 30053)).to_string(),
            "-f ipv6 -p udp --orig-port-dst 30053"
        );
    }
}
