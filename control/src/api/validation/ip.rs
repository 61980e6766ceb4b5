//! Which IP addresses an object may carry, as kube-apiserver's
//! `pkg/apis/core/validation/validation.go` decides (`ValidateNonSpecialIP`,
//! `ValidateEndpointIP`) plus the stricter parsing newer kube versions apply to new values
//! (`k8s.io/apimachinery/pkg/util/validation/ip.go`: `IsValidIPForLegacyField` with strict
//! checking refuses IPv4-mapped IPv6 and non-canonical forms).
//!
//! Where kpx is stricter than upstream it says so: these addresses end up programmed by
//! kpx-proxy on every node, and an address the kernel treats as local, as link scope or as a
//! group address is never a backend or a frontend a Service can own; upstream leaves some of
//! them to admission webhooks that kpx does not have.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use crate::api::FieldError;

/// What an address field is used for, which decides how strict its check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A pod's or host's own address (`status.podIP(s)`, `status.hostIP(s)`): upstream's
    /// `ValidateNonSpecialIP` set (kpx is stricter: upstream validates pod IPs only as IPs,
    /// but a pod IP is also what the EndpointSlice controller publishes as an endpoint).
    Host,
    /// Something kpx-proxy programs: an endpoint (EndpointSlice, Endpoints), an external IP
    /// or a load-balancer ingress IP. Upstream's `ValidateEndpointIP` / `ValidateNonSpecialIP`
    /// set, and (stricter than upstream, which accepts them) any multicast group and the
    /// limited broadcast 255.255.255.255: neither can be a TCP peer, and a Service or endpoint
    /// there would make every node answer for a group address.
    Programmed,
}

/// Parses `value` as kube does for a new value: a valid IP in canonical form, not an
/// IPv4-mapped IPv6 address. `was_stored` relaxes the form checks for a value the stored
/// object already had (as upstream ratchets: a stored object stays updatable).
pub fn parse(value: &str, was_stored: bool) -> Result<IpAddr, String> {
    let ip: IpAddr = value
        .parse()
        .map_err(|_| "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".to_string())?;
    if was_stored {
        return Ok(ip);
    }
    if let IpAddr::V6(v6) = ip {
        if v6.to_ipv4_mapped().is_some() {
            return Err("must not be an IPv4-mapped IPv6 address".into());
        }
    }
    let canonical = ip.to_string();
    if canonical != value {
        return Err(format!("must be in canonical form ({canonical:?})"));
    }
    Ok(ip)
}

/// Why `ip` may not be used as `usage`, in upstream's words, or `None` when it may.
pub fn refusal(ip: IpAddr, usage: Use) -> Option<&'static str> {
    // An IPv4-mapped address is judged as the IPv4 address it stands for (Go's net.IP does
    // the same: `::ffff:127.0.0.1`.IsLoopback() is true).
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() {
        return Some("may not be unspecified (0.0.0.0, ::)");
    }
    if ip.is_loopback() {
        return Some("may not be in the loopback range (127.0.0.0/8, ::1/128)");
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local {
        return Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)");
    }
    let link_local_multicast = match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        // Go's IsLinkLocalMulticast: ff02::/16 with any flags (ffX2::/16).
        IpAddr::V6(v6) => v6.octets()[0] == 0xff && (v6.octets()[1] & 0x0f) == 0x02,
    };
    if link_local_multicast {
        return Some("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)");
    }
    if usage == Use::Programmed {
        if ip.is_multicast() {
            return Some("may not be a multicast address (224.0.0.0/4, ff00::/8)");
        }
        if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Some("may not be the broadcast address (255.255.255.255)");
        }
    }
    None
}

/// Checks one address field; `stored` holds the values the same kind of field had in the
/// stored object (empty on create).
pub fn check(
    field: String,
    value: &str,
    usage: Use,
    stored: &HashSet<String>,
    errs: &mut Vec<FieldError>,
) {
    let was_stored = stored.contains(value);
    match parse(value, was_stored) {
        Err(why) => errs.push(FieldError::invalid(field, format!("{value:?}"), why)),
        Ok(ip) => {
            if let Some(why) = refusal(ip, usage) {
                errs.push(FieldError::invalid(field, format!("{value:?}"), why));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(value: &str, usage: Use) -> Result<(), String> {
        let mut errs = Vec::new();
        check("f".into(), value, usage, &HashSet::new(), &mut errs);
        match errs.as_slice() {
            [] => Ok(()),
            [e] => Err(e.detail.clone()),
            more => panic!("one field, one error: {more:?}"),
        }
    }

    #[test]
    fn special_addresses_are_refused_with_upstreams_words() {
        let loopback = "may not be in the loopback range (127.0.0.0/8, ::1/128)";
        let link_local = "may not be in the link-local range (169.254.0.0/16, fe80::/10)";
        let unspecified = "may not be unspecified (0.0.0.0, ::)";
        let ll_multicast = "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)";
        let multicast = "may not be a multicast address (224.0.0.0/4, ff00::/8)";
        let broadcast = "may not be the broadcast address (255.255.255.255)";
        let table: &[(&str, Use, Result<(), &str>)] = &[
            ("198.18.0.10", Use::Programmed, Ok(())),
            ("10.244.1.5", Use::Host, Ok(())),
            ("2001:db8::1", Use::Programmed, Ok(())),
            ("0.0.0.0", Use::Programmed, Err(unspecified)),
            ("::", Use::Host, Err(unspecified)),
            ("127.0.0.1", Use::Programmed, Err(loopback)),
            ("127.1.2.3", Use::Host, Err(loopback)),
            ("::1", Use::Programmed, Err(loopback)),
            ("169.254.169.254", Use::Programmed, Err(link_local)),
            ("169.254.1.1", Use::Host, Err(link_local)),
            ("fe80::1", Use::Programmed, Err(link_local)),
            ("febf::1", Use::Host, Err(link_local)),
            ("224.0.0.251", Use::Host, Err(ll_multicast)),
            ("ff02::1", Use::Programmed, Err(ll_multicast)),
            ("239.1.2.3", Use::Programmed, Err(multicast)),
            ("239.1.2.3", Use::Host, Ok(())),
            ("ff05::2", Use::Programmed, Err(multicast)),
            ("255.255.255.255", Use::Programmed, Err(broadcast)),
            (
                "::ffff:127.0.0.1",
                Use::Programmed,
                Err("must not be an IPv4-mapped IPv6 address"),
            ),
            (
                "::ffff:198.18.0.10",
                Use::Host,
                Err("must not be an IPv4-mapped IPv6 address"),
            ),
            (
                "2001:DB8::1",
                Use::Programmed,
                Err("must be in canonical form (\"2001:db8::1\")"),
            ),
            (
                "2001:db8:0:0::1",
                Use::Programmed,
                Err("must be in canonical form (\"2001:db8::1\")"),
            ),
            (
                "010.1.2.3",
                Use::Programmed,
                Err("must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"),
            ),
            (
                "web",
                Use::Host,
                Err("must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"),
            ),
        ];
        for (value, usage, want) in table {
            let want = want.map_err(String::from);
            assert_eq!(verdict(value, *usage), want, "{value} as {usage:?}");
        }
    }

    #[test]
    fn a_stored_value_keeps_its_form_but_not_a_special_range() {
        let stored: HashSet<String> = ["2001:DB8::1".to_string(), "::ffff:127.0.0.1".to_string()]
            .into_iter()
            .collect();
        let mut errs = Vec::new();
        check(
            "f".into(),
            "2001:DB8::1",
            Use::Programmed,
            &stored,
            &mut errs,
        );
        assert!(errs.is_empty(), "{errs:?}");
        // Mapped loopback is still loopback, stored or not.
        check(
            "f".into(),
            "::ffff:127.0.0.1",
            Use::Programmed,
            &stored,
            &mut errs,
        );
        assert_eq!(
            errs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["f: Invalid value: \"::ffff:127.0.0.1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"]
        );
    }
}
