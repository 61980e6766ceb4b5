//! The IPVS mode's fixed layout, as data: the dummy interface, the packet marks, the ipsets and
//! the small iptables part (chains and the jumps into them), so cleanup is the inverse of setup.
//!
//! Names start with `KPXV-`, not `KPX-`: starting in another mode removes every `KPX-` chain
//! (the iptables mode's prefix), and the iptables mode's cleanup must not take these.

use crate::netfilter::Jump;

/// The interface the Service addresses are bound to, kept down (kube-proxy's `kube-ipvs0`):
/// a local address makes the kernel deliver a Service's packets to INPUT, where IPVS takes them.
pub const DUMMY: &str = "kpx-ipvs0";

/// Every chain of the IPVS mode's iptables part starts with this.
pub const PREFIX: &str = "KPXV-";

/// mangle PREROUTING and OUTPUT: the fwmark of frontends whose sources take different endpoint
/// sets (the only ones that need firewall-mark virtual servers).
pub const MANGLE_PRE: &str = "KPXV-MARK-PRE";
pub const MANGLE_OUT: &str = "KPXV-MARK-OUT";
/// nat PREROUTING and OUTPUT: the masquerade mark, before IPVS sees the packet.
pub const SERVICES: &str = "KPXV-SERVICES";
pub const MARK_MASQ: &str = "KPXV-MARK-MASQ";
/// nat POSTROUTING: masquerade what is marked, and hairpin traffic.
pub const POSTROUTING: &str = "KPXV-POSTROUTING";
/// filter INPUT: reject or drop what has no endpoint for it (before IPVS, which hooks INPUT
/// after the filter table), accept health-check node ports, refuse ports of Service addresses
/// that are not Services (kube-proxy's `KUBE-IPVS-FILTER`: without it the node's own listeners
/// on 0.0.0.0 would answer on every cluster IP).
pub const FILTER: &str = "KPXV-FILTER";
/// filter FORWARD: kube-proxy's forward rules (drop INVALID, accept marked and established).
pub const FORWARD: &str = "KPXV-FORWARD";
pub const CANARY: &str = "KPXV-PROXY-CANARY";

/// Bit 14 asks for masquerade, as kube-proxy's default.
pub const MASQ_MARK: u32 = 0x4000;
/// Firewall marks of kpx's virtual servers: `id << 16`, with the masquerade bit when that
/// source is masqueraded (IPVS compares the whole mark, so the bit is part of the key).
pub const FWMARK_SHIFT: u32 = 16;
pub const FWMARK_MASK: u32 = 0xffff_0000;

/// Whether `mark` is one kpx gives a firewall-mark virtual server.
pub fn is_kpx_fwmark(mark: u32) -> bool {
    mark & FWMARK_MASK != 0 && mark & !(FWMARK_MASK | MASQ_MARK) == 0
}

/// The chains of each table, created by every full sync.
pub const MANGLE_CHAINS: &[&str] = &[MANGLE_PRE, MANGLE_OUT, CANARY];
pub const NAT_CHAINS: &[&str] = &[SERVICES, MARK_MASQ, POSTROUTING, CANARY];
pub const FILTER_CHAINS: &[&str] = &[FILTER, FORWARD, CANARY];

pub const JUMPS: &[Jump] = &[
    Jump {
        table: "mangle",
        from: "PREROUTING",
        to: MANGLE_PRE,
        matches: &[],
        comment: "kpx ipvs firewall marks",
    },
    Jump {
        table: "mangle",
        from: "OUTPUT",
        to: MANGLE_OUT,
        matches: &[],
        comment: "kpx ipvs firewall marks",
    },
    Jump {
        table: "nat",
        from: "PREROUTING",
        to: SERVICES,
        matches: &[],
        comment: "kpx ipvs service portals",
    },
    Jump {
        table: "nat",
        from: "OUTPUT",
        to: SERVICES,
        matches: &[],
        comment: "kpx ipvs service portals",
    },
    Jump {
        table: "nat",
        from: "POSTROUTING",
        to: POSTROUTING,
        matches: &[],
        comment: "kpx ipvs postrouting rules",
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: FILTER,
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "kpx ipvs service filter",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: FORWARD,
        matches: &[],
        comment: "kpx ipvs forwarding rules",
    },
];

/// One ipset of the layout: its name's stem (the family's prefix goes before it), its type
/// and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// `ip,proto:port` of every frontend whose traffic from outside the pod network is
    /// masqueraded and from inside it is not (cluster IPs with `--cluster-cidr`).
    MasqOffCluster,
    /// `ip,proto:port` of every frontend masqueraded for every source.
    MasqAll,
    /// `ip,proto:port` of every frontend with no endpoint at all: rejected.
    Reject,
    /// `ip,proto:port` of every frontend whose endpoints are elsewhere only: dropped.
    Drop,
    /// `ip,proto:port` of every frontend: a Service address's other ports are refused.
    Frontends,
    /// Every address bound to the dummy interface.
    Addresses,
    /// `ep,proto:port,ep` of every endpoint: a pod reaching itself is masqueraded.
    Hairpin,
    /// Health-check node ports (`bitmap:port`), accepted.
    HealthCheckNodePorts,
    /// `ip,proto:port` of every frontend with per-frontend mangle rules: the mangle chains
    /// look at nothing else, so other packets pay one set lookup.
    Marked,
    /// `ip,proto:port` of every load-balancer frontend with `loadBalancerSourceRanges`
    /// (kube-proxy's `KUBE-LOAD-BALANCER-FW`): new connections to it from a source not in
    /// `SourceRanges` are dropped.
    Firewalled,
    /// `ip,proto:port,net` of every allowed (firewalled frontend, source network) pair
    /// (kube-proxy's `KUBE-LOAD-BALANCER-SOURCE-CIDR`; the load-balancer IP itself among them
    /// when a range takes in the node, whose connections to it leave from it).
    SourceRanges,
}

impl SetKind {
    pub const ALL: [SetKind; 11] = [
        SetKind::MasqOffCluster,
        SetKind::MasqAll,
        SetKind::Reject,
        SetKind::Drop,
        SetKind::Frontends,
        SetKind::Addresses,
        SetKind::Hairpin,
        SetKind::HealthCheckNodePorts,
        SetKind::Marked,
        SetKind::Firewalled,
        SetKind::SourceRanges,
    ];

    fn stem(self) -> &'static str {
        match self {
            SetKind::MasqOffCluster => "MASQ-OFF-CLUSTER",
            SetKind::MasqAll => "MASQ-ALL",
            SetKind::Reject => "REJECT",
            SetKind::Drop => "DROP",
            SetKind::Frontends => "FRONTENDS",
            SetKind::Addresses => "ADDRESSES",
            SetKind::Hairpin => "LOOP-BACK",
            SetKind::HealthCheckNodePorts => "HEALTH-CHECK-NODE-PORT",
            SetKind::Marked => "MARKED",
            SetKind::Firewalled => "LB-FIREWALL",
            SetKind::SourceRanges => "LB-SOURCE-CIDR",
        }
    }

    /// The set's name in one family (ipset names are per namespace, not per family).
    pub fn name(self, ipv6: bool) -> String {
        format!("{}{}", set_prefix(ipv6), self.stem())
    }

    /// `ipset create` type and options.
    pub fn create_args(self, ipv6: bool) -> String {
        let family = if ipv6 { "inet6" } else { "inet" };
        match self {
            SetKind::Addresses => format!("hash:ip family {family}"),
            SetKind::Hairpin => format!("hash:ip,port,ip family {family}"),
            SetKind::SourceRanges => format!("hash:ip,port,net family {family}"),
            SetKind::HealthCheckNodePorts => "bitmap:port range 0-65535".to_string(),
            // Each member's comment names its Service port (for dump).
            SetKind::Frontends => format!("hash:ip,port family {family} comment"),
            _ => format!("hash:ip,port family {family}"),
        }
    }
}

/// Every ipset of a family starts with this (`KPXV-` and `KPXV6-`, at most 31 characters).
pub fn set_prefix(ipv6: bool) -> &'static str {
    if ipv6 {
        "KPXV6-"
    } else {
        "KPXV-"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_stay_apart_from_the_iptables_mode() {
        for kind in SetKind::ALL {
            for ipv6 in [false, true] {
                assert!(kind.name(ipv6).len() <= 31, "{}", kind.name(ipv6));
            }
        }
        for chain in MANGLE_CHAINS.iter().chain(NAT_CHAINS).chain(FILTER_CHAINS) {
            assert!(chain.starts_with(PREFIX) && chain.len() <= 28);
            assert!(!chain.starts_with(crate::iptables::chains::PREFIX));
        }
        assert!(is_kpx_fwmark(3 << 16));
        assert!(is_kpx_fwmark((3 << 16) | MASQ_MARK));
        assert!(!is_kpx_fwmark(MASQ_MARK));
        assert!(!is_kpx_fwmark((3 << 16) | 1));
    }
}
