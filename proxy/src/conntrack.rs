//! Deleting stale conntrack entries (UDP has no connection end, so a flow keeps going to an
//! endpoint that is gone until its entry is deleted). Uses the `conntrack` tool, which lists the
//! table and deletes each entry that matches the filter (ctnetlink deletes only by full tuple).

use std::net::IpAddr;
use std::process::Command;

use crate::backend::BackendError;
use crate::iptables::exec::output;
use crate::model::ConntrackCleanup;

fn family(ip: &IpAddr) -> &'static str {
    family_of(ip.is_ipv6())
}

fn family_of(ipv6: bool) -> &'static str {
    if ipv6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

/// The `conntrack -D` arguments for one cleanup (the filters of kube-proxy's
/// `ClearEntriesForNAT`, `ClearEntriesForIP`, `ClearEntriesForPortNAT`, `ClearEntriesForPort`).
pub fn arguments(cleanup: &ConntrackCleanup) -> Vec<String> {
    let delete = |family: &str, protocol: &crate::model::Protocol| -> Vec<String> {
        vec![
            "-D".into(),
            "-f".into(),
            family.into(),
            "-p".into(),
            protocol.lower().into(),
        ]
    };
    match cleanup {
        ConntrackCleanup::Endpoint {
            vip,
            port,
            protocol,
            endpoint,
        } => {
            let mut args = delete(family(vip), protocol);
            args.extend([
                "--orig-dst".into(),
                vip.to_string(),
                "--orig-port-dst".into(),
                port.to_string(),
                // Only the flows that were DNATed to that endpoint.
                "--dst-nat".into(),
                endpoint.to_string(),
            ]);
            args
        }
        ConntrackCleanup::Service {
            vip,
            port,
            protocol,
        } => {
            let mut args = delete(family(vip), protocol);
            args.extend([
                "--orig-dst".into(),
                vip.to_string(),
                "--orig-port-dst".into(),
                port.to_string(),
            ]);
            args
        }
        // No `--orig-dst`: a NodePort answers on every node address (or those of
        // `--nodeport-addresses`), and a flow to any of them is stale.
        ConntrackCleanup::NodePortEndpoint {
            node_port,
            protocol,
            endpoint,
        } => {
            let mut args = delete(family(endpoint), protocol);
            args.extend([
                "--orig-port-dst".into(),
                node_port.to_string(),
                "--dst-nat".into(),
                endpoint.to_string(),
            ]);
            args
        }
        ConntrackCleanup::NodePort {
            ipv6,
            node_port,
            protocol,
        } => {
            let mut args = delete(family_of(*ipv6), protocol);
            args.extend(["--orig-port-dst".into(), node_port.to_string()]);
            args
        }
    }
}

/// Deletes the entries; "0 flow entries" (conntrack exits 1) is not an error.
pub fn clear(cleanups: impl IntoIterator<Item = ConntrackCleanup>) -> Result<usize, BackendError> {
    let mut deleted = 0;
    for cleanup in cleanups {
        let args = arguments(&cleanup);
        let name = format!("conntrack {}", args.join(" "));
        match output(Command::new("conntrack").args(&args), &name) {
            Ok(_) => deleted += 1,
            Err(BackendError::Command { stderr, .. }) if stderr.contains("0 flow entries") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use super::arguments;
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
        out.iter().map(|c| arguments(c).join(" ")).collect()
    }

    #[test]
    fn a_gone_endpoint_is_cleared_by_service_address_and_by_node_port() {
        let before = entry(Protocol::Udp, Some(30053), &["198.18.1.1", "198.18.1.2"]);
        let after = entry(Protocol::Udp, Some(30053), &["198.18.1.2"]);
        assert_eq!(
            cleanups(Some(&before), Some(&after)),
            [
                "-D -f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --dst-nat 198.18.1.1",
                "-D -f ipv4 -p udp --orig-port-dst 30053 --dst-nat 198.18.1.1",
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
                "-D -f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53",
                "-D -f ipv4 -p udp --orig-port-dst 30053",
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
            ["-D -f ipv4 -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --dst-nat 198.18.1.1"]
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
            arguments(&v6(Some("2001:2::5"))).join(" "),
            "-D -f ipv6 -p udp --orig-port-dst 30053 --dst-nat 2001:2::5"
        );
        assert_eq!(
            arguments(&v6(None)).join(" "),
            "-D -f ipv6 -p udp --orig-port-dst 30053"
        );
        let mut dual = entry(Protocol::Udp, Some(30053), &["2001:2::5"]);
        dual.port.cluster_ips.push(ip("fd00::53"));
        let mut empty = dual.clone();
        empty.selected = Selected::default();
        let got = cleanups(Some(&empty), Some(&dual));
        assert!(got.contains(&"-D -f ipv4 -p udp --orig-port-dst 30053".to_string()));
        assert!(got.contains(&"-D -f ipv6 -p udp --orig-port-dst 30053".to_string()));
    }
}
