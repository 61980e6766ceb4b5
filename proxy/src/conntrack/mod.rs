//! Deleting stale conntrack entries (UDP has no connection end, so a flow keeps going to an
//! endpoint that is gone until its entry is deleted), over ctnetlink: per family, one dump of
//! the conntrack table (narrowed by the kernel where it can filter), every entry matched
//! against all the cleanups of the call at once, and the matches deleted by their original
//! tuple, pipelined on the socket. The cleanups are kube-proxy's filters
//! (`ClearEntriesForNAT`, `ClearEntriesForIP`, `ClearEntriesForPortNAT`,
//! `ClearEntriesForPort` in `pkg/proxy/conntrack/conntrack.go`), applied the way kube-proxy
//! applies them since it stopped running the conntrack tool (`cleanup.go`
//! `CleanStaleEntries`: one `ListEntries` per family, the matching done in the proxy, then
//! `ClearEntries` of the matches). kpx-proxy runs no `conntrack` process; it needs
//! CAP_NET_ADMIN in the node's network namespace.

mod filter;
mod netlink;

use std::time::{Duration, Instant};

use crate::backend::BackendError;
use crate::model::ConntrackCleanup;

pub use filter::Describe;
use filter::{KernelFilter, Matcher};
use netlink::{Conn, DumpError};

/// Bounds of one call.
#[derive(Debug, Clone)]
pub struct Options {
    /// The most entries one dump may return: a table past it is an error naming the cap
    /// (what matched before it is still deleted).
    pub max_entries: usize,
    /// The longest the whole call may take (dumps and deletes of both families).
    pub time: Duration,
    /// Ask the kernel to filter the dump (`CTA_FILTER`, Linux 5.8 and later). Without it, or
    /// on a kernel that ignores or refuses it, the whole family is dumped and filtered here.
    pub kernel_filter: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            time: Duration::from_secs(30),
            kernel_filter: true,
        }
    }
}

/// What one call did, summed over both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries deleted.
    pub deleted: usize,
    /// Matching entries that were gone when their delete arrived (expired, or deleted by
    /// someone else).
    pub gone: usize,
    /// Entries the dumps returned (all of a family, or what the kernel filter let through).
    pub dumped: usize,
    /// Dumps sent with a kernel filter that the kernel did not refuse (a kernel before 5.8
    /// ignores it and dumps the whole family).
    pub kernel_filtered: usize,
}

/// Deletes the entries the cleanups match; returns how many were deleted.
pub fn clear(cleanups: impl IntoIterator<Item = ConntrackCleanup>) -> Result<usize, BackendError> {
    clear_with(cleanups, &Options::default()).map(|report| report.deleted)
}

/// [`clear`] within `options`' bounds. Bad cleanups (port 0, a Service address and an
/// endpoint of different families) are refused before anything is read or deleted.
pub fn clear_with(
    cleanups: impl IntoIterator<Item = ConntrackCleanup>,
    options: &Options,
) -> Result<Report, BackendError> {
    let cleanups: Vec<ConntrackCleanup> = cleanups.into_iter().collect();
    for cleanup in &cleanups {
        filter::validate(cleanup)?;
    }
    let deadline = Instant::now() + options.time;
    let mut report = Report::default();
    // A failing family does not keep the other's stale flows: both are tried, the first
    // error is returned.
    let mut failed = None;
    for ipv6 in [false, true] {
        let family: Vec<&ConntrackCleanup> = cleanups
            .iter()
            .filter(|c| filter::is_ipv6(c) == ipv6)
            .collect();
        if !family.is_empty() {
            if let Err(e) = clear_family(ipv6, &family, options, deadline, &mut report) {
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

fn clear_family(
    ipv6: bool,
    cleanups: &[&ConntrackCleanup],
    options: &Options,
    deadline: Instant,
    report: &mut Report,
) -> Result<(), BackendError> {
    let family = filter::family_name(ipv6);
    let matcher = Matcher::new(ipv6, cleanups);
    let kernel_filter = KernelFilter::common(ipv6, cleanups);
    let mut conn = Conn::open(deadline)?;
    let mut filter = (options.kernel_filter && !kernel_filter.is_empty()).then_some(&kernel_filter);
    let dump = loop {
        match conn.dump(ipv6, filter, options.max_entries, |flow| {
            matcher.matches(flow)
        }) {
            Ok(dump) => break dump,
            // A kernel that knows CTA_FILTER but cannot apply this one: the whole family,
            // filtered here.
            Err(DumpError::Refused(code)) if filter.is_some() => {
                tracing::debug!(
                    family,
                    error = %std::io::Error::from_raw_os_error(code.saturating_abs()),
                    "the kernel refused the conntrack dump filter; filtering in userspace"
                );
                filter = None;
                conn = Conn::open(deadline)?;
            }
            // nfnetlink answers EINVAL for a subsystem it does not have (and could not load).
            Err(DumpError::Refused(code)) => {
                return Err(BackendError::kernel(
                    format!("dumping the {family} conntrack table"),
                    format!(
                        "{} (is the nf_conntrack_netlink module loaded?)",
                        std::io::Error::from_raw_os_error(code.saturating_abs())
                    ),
                ))
            }
            Err(DumpError::Failed(e)) => return Err(e),
        }
    };
    if dump.capped {
        // The rest of that dump is still queued on the socket: delete on a new one.
        conn = Conn::open(deadline)?;
    }
    let outcome = conn.delete(&dump.kept)?;
    report.deleted += outcome.deleted;
    report.gone += outcome.gone;
    report.dumped += dump.entries;
    report.kernel_filtered += usize::from(filter.is_some());
    tracing::debug!(
        family,
        cleanups = cleanups.len(),
        kernel_filter = filter.is_some(),
        entries = dump.entries,
        unreadable = dump.unreadable,
        matched = dump.kept.len(),
        deleted = outcome.deleted,
        already_gone = outcome.gone,
        "cleared stale conntrack entries"
    );
    if dump.unreadable > 0 {
        // Skipped, so a stale one among them stays until it idles out.
        tracing::warn!(
            family,
            unreadable = dump.unreadable,
            "conntrack entries that could not be read were not matched"
        );
    }
    if dump.capped {
        return Err(BackendError::kernel(
            format!("dumping the {family} conntrack table"),
            format!(
                "stopped at the cap of {} entries (Options::max_entries); the {} matching \
                 entries before it were deleted, later ones may remain",
                options.max_entries, outcome.deleted
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use super::Describe;
    use crate::model::state::udp_cleanups;
    use crate::model::{
        ConntrackCleanup, Endpoint, NamespacedName, Protocol, Selected, ServiceEntry, ServicePort,
        ServicePortName,
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn endpoint(address: &str) -> Endpoint {
        Endpoint {
            ip: ip(address),
            port: 5353,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            hints: Default::default(),
        }
    }

    /// A UDP NodePort Service port with `endpoints` (all ready, all selected).
    fn entry(protocol: Protocol, node_port: Option<u16>, endpoints: &[&str]) -> ServiceEntry {
        let endpoints: Vec<Endpoint> = endpoints.iter().map(|a| endpoint(a)).collect();
        ServiceEntry {
            port: ServicePort {
                name: ServicePortName {
                    service: NamespacedName::new("default", "dns"),
                    port: "dns".into(),
                    protocol,
                },
                cluster_ips: vec![ip("10.96.0.53")],
                port: 53,
                node_port,
                external_ips: vec![],
                load_balancer_ips: vec![],
                source_ranges: Vec::new(),
                source_ranges_given: false,
                affinity_seconds: None,
                external_policy_local: false,
                internal_policy_local: false,
                health_check_node_port: None,
            },
            selected: Selected {
                cluster: endpoints.clone(),
                local: vec![],
                any: !endpoints.is_empty(),
            },
            endpoints,
        }
    }

    fn cleanups(old: Option<&ServiceEntry>, new: Option<&ServiceEntry>) -> Vec<String> {
        let mut out = BTreeSet::new();
        udp_cleanups(old, new, &mut out);
        out.iter().map(|c| Describe(c).to_string()).collect()
    }

    #[test]
    fn a_gone_endpoint_is_cleared_by_service_address_and_by_node_port() {
        let before = entry(Protocol::Udp, Some(30053), &["198.18.1.1", "198.18.1.2"]);
        let after = entry(Protocol::Udp, Some(30053), &["198.18.1.2"]);
        assert_eq!(
            cleanups(Some(&before), Some(&after)),
            [
                "-f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 198.18.1.1",
                "-f ipv4 -p udp --orig-port-dst 30053 --reply-src 198.18.1.1",
            ]
        );
        // The Service port removed: every endpoint it had.
        assert_eq!(cleanups(Some(&after), None).len(), 2);
    }

    #[test]
    fn a_service_gaining_endpoints_clears_its_rejected_flows_on_the_node_port() {
        let before = entry(Protocol::Udp, Some(30053), &[]);
        let after = entry(Protocol::Udp, Some(30053), &["198.18.1.1"]);
        assert_eq!(
            cleanups(Some(&before), Some(&after)),
            [
                "-f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53",
                "-f ipv4 -p udp --orig-port-dst 30053",
            ]
        );
        // A new Service port with endpoints counts as gaining them.
        assert_eq!(cleanups(None, Some(&after)).len(), 2);
    }

    #[test]
    fn without_a_node_port_or_for_tcp_nothing_is_cleared_by_port() {
        let before = entry(Protocol::Udp, None, &["198.18.1.1"]);
        let after = entry(Protocol::Udp, None, &[]);
        assert_eq!(
            cleanups(Some(&before), Some(&after)),
            ["-f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --reply-src 198.18.1.1"]
        );
        let before = entry(Protocol::Tcp, Some(30080), &["198.18.1.1"]);
        let after = entry(Protocol::Tcp, Some(30080), &[]);
        assert!(cleanups(Some(&before), Some(&after)).is_empty());
    }

    #[test]
    fn node_port_cleanups_take_the_family_of_the_endpoint_or_of_the_service() {
        let v6 = |ep: Option<&str>| match ep {
            Some(e) => ConntrackCleanup::NodePortEndpoint {
                node_port: 30053,
                protocol: Protocol::Udp,
                endpoint: ip(e),
            },
            None => ConntrackCleanup::NodePort {
                ipv6: true,
                node_port: 30053,
                protocol: Protocol::Udp,
            },
        };
        assert_eq!(
            Describe(&v6(Some("2001:2::5"))).to_string(),
            "-f ipv6 -p udp --orig-port-dst 30053 --reply-src 2001:2::5"
        );
        assert_eq!(
            Describe(&v6(None)).to_string(),
            "-f ipv6 -p udp --orig-port-dst 30053"
        );
        let mut dual = entry(Protocol::Udp, Some(30053), &["2001:2::5"]);
        dual.port.cluster_ips.push(ip("fd00::53"));
        let mut empty = dual.clone();
        empty.selected = Selected::default();
        let got = cleanups(Some(&empty), Some(&dual));
        assert!(got.contains(&"-f ipv4 -p udp --orig-port-dst 30053".to_string()));
        assert!(got.contains(&"-f ipv6 -p udp --orig-port-dst 30053".to_string()));
    }
}
