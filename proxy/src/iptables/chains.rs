//! Chain names and the fixed part of the layout, as data: kpx's chains, and the jumps from the
//! kernel's built-in chains into them.

use sha2::{Digest, Sha256};

use crate::model::ServicePortName;

/// Every chain kpx's iptables mode creates starts with this, so a real kube-proxy (`KUBE-`) can
/// coexist and `--cleanup` knows what is its own (`netfilter::cleanup` takes it as a parameter;
/// another mode's iptables part has its own, which must not start with `KPX-`: starting in
/// another mode removes every `KPX-` chain).
pub const PREFIX: &str = "KPX-";
pub const SERVICES: &str = "KPX-SERVICES";
pub const EXTERNAL_SERVICES: &str = "KPX-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "KPX-NODEPORTS";
pub const POSTROUTING: &str = "KPX-POSTROUTING";
pub const MARK_MASQ: &str = "KPX-MARK-MASQ";
pub const FORWARD: &str = "KPX-FORWARD";
pub const CANARY: &str = "KPX-PROXY-CANARY";
/// `loadBalancerSourceRanges`: drops new connections to a load-balancer IP from sources
/// outside its ranges (kube-proxy's `KUBE-PROXY-FIREWALL`).
pub const FIREWALL: &str = "KPX-PROXY-FIREWALL";

/// The packet mark asking for masquerade (bit 14, as kube-proxy's default).
pub const MASQ_MARK: &str = "0x4000";

/// The jumps from built-in chains are data of the shared netfilter module: render puts the
/// missing ones first in line in the sync's restore, the canary check looks for them, and
/// cleanup removes whatever targets a `KPX-` chain.
pub use crate::netfilter::Jump;

pub const JUMPS: &[Jump] = &[
    Jump {
        table: "nat",
        from: "PREROUTING",
        to: SERVICES,
        matches: &[],
        comment: "kpx service portals",
    },
    Jump {
        table: "nat",
        from: "OUTPUT",
        to: SERVICES,
        matches: &[],
        comment: "kpx service portals",
    },
    Jump {
        table: "nat",
        from: "POSTROUTING",
        to: POSTROUTING,
        matches: &[],
        comment: "kpx postrouting rules",
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: NODEPORTS,
        matches: &[],
        comment: "kpx health check service ports",
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: EXTERNAL_SERVICES,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx externally-visible service portals",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: EXTERNAL_SERVICES,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx externally-visible service portals",
    },
    // The node's own connections to an external or load-balancer IP (or a NodePort) of a
    // Service without endpoints are refused too, as kube-proxy's nftables mode does.
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: EXTERNAL_SERVICES,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx externally-visible service portals",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: SERVICES,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx service portals",
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: SERVICES,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx service portals",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: FORWARD,
        matches: &[],
        comment: "kpx forwarding rules",
    },
    // Last in this list, so first in each built-in chain (every jump goes in at position 1):
    // the source ranges are judged before `KPX-FORWARD` accepts a masqueraded packet and
    // before `KPX-EXTERNAL-SERVICES` rejects a Service without endpoints.
    Jump {
        table: "filter",
        from: "INPUT",
        to: FIREWALL,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx load balancer firewall",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: FIREWALL,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx load balancer firewall",
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: FIREWALL,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx load balancer firewall",
    },
];

/// Chains that exist in every sync, per table.
pub const NAT_BASE: &[&str] = &[SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, CANARY];
pub const FILTER_BASE: &[&str] = &[
    SERVICES,
    EXTERNAL_SERVICES,
    NODEPORTS,
    FORWARD,
    FIREWALL,
    CANARY,
];

/// 16 base32 characters of a SHA-256 over `parts` (NUL-separated): chain names that fit
/// iptables' 28 characters. Shared with the IPVS mode's per-frontend chains.
pub(crate) fn hash16(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    // Base32 (RFC 4648 alphabet) of the first 10 bytes: 16 characters.
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut bits: u64 = 0;
    let mut count = 0;
    for byte in &digest[..10] {
        bits = (bits << 8) | u64::from(*byte);
        count += 8;
        while count >= 5 {
            count -= 5;
            out.push(ALPHABET[((bits >> count) & 31) as usize] as char);
        }
    }
    out
}

fn port_id(name: &ServicePortName) -> String {
    format!(
        "{}/{}:{}/{}",
        name.service.namespace, name.service.name, name.port, name.protocol
    )
}

/// The chain of cluster traffic to one Service port.
pub fn service_chain(name: &ServicePortName) -> String {
    format!("KPX-SVC-{}", hash16(&["svc", &port_id(name)]))
}

/// The chain of external traffic (NodePort, external and load-balancer IPs).
pub fn external_chain(name: &ServicePortName) -> String {
    format!("KPX-EXT-{}", hash16(&["ext", &port_id(name)]))
}

/// The chain of the `n`th distinct set of routes among a Service port's frontends that is
/// not a plain jump to an endpoint chain (`n` = 0 is `external_chain`; kube-proxy's
/// semantics never need a second one, the frontend model might).
pub fn external_chain_n(name: &ServicePortName, n: usize) -> String {
    if n == 0 {
        return external_chain(name);
    }
    format!(
        "KPX-EXT-{}",
        hash16(&["ext", &port_id(name), &n.to_string()])
    )
}

/// Local endpoints only, for `externalTrafficPolicy: Local`.
pub fn local_chain(name: &ServicePortName) -> String {
    format!("KPX-SVL-{}", hash16(&["svl", &port_id(name)]))
}

/// The `recent` list remembering clients of one endpoint (session affinity).
pub fn affinity_list(name: &ServicePortName, endpoint: &str) -> String {
    format!("KPX-SEP-{}", hash16(&["sep", &port_id(name), endpoint]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NamespacedName, Protocol};

    #[test]
    fn names_are_stable_short_and_distinct() {
        let name = ServicePortName {
            service: NamespacedName::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let svc = service_chain(&name);
        assert_eq!(svc.len(), 24);
        assert!(
            svc.len() <= 28,
            "iptables chain names are at most 28 characters"
        );
        assert_eq!(svc, service_chain(&name.clone()));
        assert_ne!(svc[8..], external_chain(&name)[8..]);
        let udp = ServicePortName {
            protocol: Protocol::Udp,
            ..name
        };
        assert_ne!(service_chain(&udp), svc);
    }
}
