//! Names in kpx's nftables tables: the fixed chains, sets and maps, and the per Service port
//! chains (readable, as kube-proxy's nftables mode names them: a short hash for uniqueness, then
//! the Service port it serves).

use sha2::{Digest, Sha256};

use crate::model::ServicePortName;

/// kpx's table in each family (`ip kpx`, `ip6 kpx`): its own, so kube-proxy's `kube-proxy`
/// tables, kpx's iptables chains and anyone else's tables coexist with it.
pub const TABLE: &str = "kpx";

pub const NAT_PREROUTING: &str = "nat-prerouting";
pub const NAT_OUTPUT: &str = "nat-output";
pub const NAT_POSTROUTING: &str = "nat-postrouting";
pub const FILTER_INPUT: &str = "filter-input";
pub const FILTER_FORWARD: &str = "filter-forward";
pub const FILTER_OUTPUT: &str = "filter-output";
pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const MARK_MASQ: &str = "mark-for-masquerade";
pub const REJECT: &str = "reject-chain";
pub const ENDPOINTS_CHECK: &str = "endpoints-check";
pub const FILTER_PREROUTING: &str = "filter-prerouting";
pub const FILTER_OUTPUT_PRE_DNAT: &str = "filter-output-pre-dnat";
pub const FIREWALL_CHECK: &str = "firewall-check";

/// Base chains: name, type, hook, priority. Numbers, not names: nft 1.0.6 refuses `dstnat` on
/// the output hook. The filter chains run at -90, after DNAT (-100) on every hook, so a packet
/// already DNATed to an endpoint no longer matches its frontend in the no-endpoint checks.
/// The firewall's run at -110, before DNAT (kube-proxy's `dstnat - 10`), so they see every
/// new connection to a load-balancer IP with that address still its destination, whether it
/// will be DNATed or refused.
pub const BASE_CHAINS: &[(&str, &str, &str, i32)] = &[
    (FILTER_PREROUTING, "filter", "prerouting", -110),
    (FILTER_OUTPUT_PRE_DNAT, "filter", "output", -110),
    (NAT_PREROUTING, "nat", "prerouting", -100),
    (NAT_OUTPUT, "nat", "output", -100),
    (NAT_POSTROUTING, "nat", "postrouting", 100),
    (FILTER_INPUT, "filter", "input", -90),
    (FILTER_FORWARD, "filter", "forward", -90),
    (FILTER_OUTPUT, "filter", "output", -90),
];

/// Regular chains every plan has.
pub const FIXED_CHAINS: &[&str] = &[
    SERVICES,
    MASQUERADING,
    MARK_MASQ,
    REJECT,
    ENDPOINTS_CHECK,
    FIREWALL_CHECK,
];

pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
pub const NODEPORT_CIDRS: &str = "nodeport-cidrs";
pub const HAIRPIN: &str = "hairpin";

/// The packet mark asking for masquerade (bit 14, kube-proxy's default).
pub const MASQ_MARK: &str = "0x4000";

/// Endpoint sets per shard of the endpoint maps (`endpoints-K`). Every rule reading a map is
/// bound to it, and the kernel walks all of a map's bindings for each element added and all of
/// its elements for each binding added: one map for every Service is quadratic (measured: 15 s
/// for 10,000 Services × 10 endpoints), one per Service is a set per Service (the lookup by name
/// walks the table's sets). Shards of 64 sets: 1.6 s.
pub const SETS_PER_SHARD: u32 = 64;
/// Slots per endpoint set: its endpoints are keys `base + i`, `base = index << SLOT_BITS`.
pub const SLOT_BITS: u32 = 16;
pub const MAX_ENDPOINTS_PER_SET: usize = 1 << SLOT_BITS;

/// One map per protocol: nft re-reads a map's `typeof` from the kernel on later
/// transactions, and a `th dport` there conflicts with the rule's `meta l4proto tcp`.
pub fn endpoint_map(protocol: crate::model::Protocol, shard: u32) -> String {
    format!("endpoints-{}-{shard}", protocol.lower())
}

fn hash8(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// `ns/name/proto/port`, as kube-proxy's nftables chain names end.
fn readable(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.lower(),
        name.port
    )
}

fn id(name: &ServicePortName) -> String {
    format!(
        "{}/{}:{}/{}",
        name.service.namespace, name.service.name, name.port, name.protocol
    )
}

/// The chain picking one of the cluster's endpoints of a Service port.
pub fn service_chain(name: &ServicePortName) -> String {
    format!("svc-{}-{}", hash8(&["svc", &id(name)]), readable(name))
}

/// The chain picking one of this node's endpoints.
pub fn local_chain(name: &ServicePortName) -> String {
    format!("svl-{}-{}", hash8(&["svl", &id(name)]), readable(name))
}

/// The chain telling sources apart for the `n`th distinct set of routes among a Service
/// port's frontends that is not a plain jump (`externalTrafficPolicy: Local`).
pub fn external_chain(name: &ServicePortName, n: usize) -> String {
    let prefix = if n == 0 {
        "ext".to_string()
    } else {
        format!("ext{n}")
    };
    format!(
        "{prefix}-{}-{}",
        hash8(&["ext", &id(name), &n.to_string()]),
        readable(name)
    )
}

/// The chain dropping sources outside a load-balancer frontend's `loadBalancerSourceRanges`
/// (the `n`th distinct list of allowed sources among a Service port's frontends).
pub fn firewall_chain(name: &ServicePortName, n: usize) -> String {
    let prefix = if n == 0 {
        "fw".to_string()
    } else {
        format!("fw{n}")
    };
    format!(
        "{prefix}-{}-{}",
        hash8(&["fw", &id(name), &n.to_string()]),
        readable(name)
    )
}

/// The set remembering the clients of one endpoint of a set chain (session affinity).
/// The timeout is part of the name: a set's timeout cannot change in place.
pub fn affinity_set(chain: &str, endpoint: &str, timeout: u32) -> String {
    let timeout = timeout.to_string();
    format!(
        "aff-{}-{}",
        hash8(&[chain]),
        hash8(&[chain, endpoint, &timeout])
    )
}

/// Is `name` one of the per Service port chains (not a fixed or base chain)?
pub fn is_service_chain(name: &str) -> bool {
    ["svc-", "svl-", "ext", "fw"]
        .iter()
        .any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NamespacedName, Protocol};

    #[test]
    fn names_are_readable_stable_and_distinct() {
        let name = ServicePortName {
            service: NamespacedName::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let svc = service_chain(&name);
        assert!(
            svc.starts_with("svc-") && svc.ends_with("-default/web/tcp/http"),
            "{svc}"
        );
        assert_eq!(svc, service_chain(&name.clone()));
        assert_ne!(svc[4..12], local_chain(&name)[4..12]);
        assert_ne!(external_chain(&name, 0), external_chain(&name, 1));
        let fw = firewall_chain(&name, 0);
        assert!(fw.starts_with("fw-") && is_service_chain(&fw), "{fw}");
        assert_ne!(fw, firewall_chain(&name, 1));
        assert!(!is_service_chain(FIREWALL_CHECK) && !is_service_chain(FILTER_FORWARD));
        let udp = ServicePortName {
            protocol: Protocol::Udp,
            ..name
        };
        assert_ne!(service_chain(&udp), svc);
        assert!(is_service_chain(&svc) && !is_service_chain(SERVICES));
    }
}
