//! The iptables part of the IPVS mode, as `iptables-restore --noflush` input: the fixed rules
//! (set lookups, O(1) at any number of Services) and the few per-frontend chains the plan asks
//! for. Pure; written whole whenever its text changes (it stays small: the sets hold the bulk).

use std::collections::BTreeSet;

use super::layout::{self, SetKind, MASQ_MARK};
use super::plan::{PlanConfig, Rule};
use crate::netfilter::{Jump, RestoreWriter};

fn set(kind: SetKind, cfg: &PlanConfig) -> String {
    kind.name(cfg.ipv6)
}

fn reject(cfg: &PlanConfig) -> &'static str {
    super::plan::reject_rule(cfg.ipv6)
}

/// Drops a new connection to a firewalled load-balancer frontend from a source outside its
/// ranges: two set lookups, whatever the number of Services and ranges.
fn firewall(cfg: &PlanConfig) -> String {
    format!(
        "-m set --match-set {} dst,dst -m set ! --match-set {} dst,dst,src -j DROP",
        set(SetKind::Firewalled, cfg),
        set(SetKind::SourceRanges, cfg)
    )
}

/// The fixed rules of one table's chain, before (`head`) and after (`tail`) the plan's own.
fn fixed(cfg: &PlanConfig, table: &str, chain: &str) -> (Vec<String>, Vec<String>) {
    let m = format!("{MASQ_MARK:#x}");
    let s = |k| set(k, cfg);
    match (table, chain) {
        ("nat", layout::SERVICES) => {
            let mut head = vec![format!(
                "-m set --match-set {} dst,dst -j {}",
                s(SetKind::MasqAll),
                layout::MARK_MASQ
            )];
            if let Some(cidr) = &cfg.cluster_cidr {
                head.push(format!(
                    "! -s {cidr} -m set --match-set {} dst,dst -j {}",
                    s(SetKind::MasqOffCluster),
                    layout::MARK_MASQ
                ));
            }
            // The node's own connections to a Service address leave from that address (it is
            // local, on kpx-ipvs0): an endpoint elsewhere would answer a VIP it holds itself.
            // Masqueraded whatever the routes say (kube-proxy's `KUBE-CLUSTER-IP src,dst`).
            head.push(format!(
                "-m set --match-set {} src -m set --match-set {} dst,dst -j {}",
                s(SetKind::Addresses),
                s(SetKind::Frontends),
                layout::MARK_MASQ
            ));
            (head, vec![])
        }
        // Only the first packet of a connection to a marked frontend needs its mark: IPVS
        // schedules once, later packets follow its connection table.
        ("mangle", layout::MANGLE_PRE | layout::MANGLE_OUT) => {
            let mut head = vec!["-m conntrack ! --ctstate NEW -j RETURN".to_string()];
            if chain == layout::MANGLE_OUT {
                // IPVS takes the node's own packets on OUTPUT, before the filter table: its
                // connections to a firewalled load-balancer IP are judged here.
                head.push(firewall(cfg));
            }
            head.push(format!(
                "-m set ! --match-set {} dst,dst -j RETURN",
                s(SetKind::Marked)
            ));
            (head, vec![])
        }
        ("nat", layout::MARK_MASQ) => (vec![format!("-j MARK --or-mark {m}")], vec![]),
        ("nat", layout::POSTROUTING) => (
            vec![
                // A pod reaching itself through a Service: only a hairpinned packet has the
                // endpoint as both source and destination after IPVS.
                format!(
                    "-m set --match-set {} dst,dst,src -j MASQUERADE",
                    s(SetKind::Hairpin)
                ),
                format!("-m mark ! --mark {m}/{m} -j RETURN"),
                format!("-j MARK --xor-mark {m}"),
                "-j MASQUERADE".to_string(),
            ],
            vec![],
        ),
        ("filter", layout::FILTER) => (
            vec![
                // loadBalancerSourceRanges first: before the no-endpoint reject, and before
                // IPVS (which takes arriving packets on INPUT after the filter table).
                firewall(cfg),
                format!(
                    "-m set --match-set {} dst -j ACCEPT",
                    s(SetKind::HealthCheckNodePorts)
                ),
                format!(
                    "-m set --match-set {} dst,dst -j {}",
                    s(SetKind::Reject),
                    reject(cfg)
                ),
                format!("-m set --match-set {} dst,dst -j DROP", s(SetKind::Drop)),
            ],
            vec![
                format!(
                    "-m set --match-set {} dst,dst -j RETURN",
                    s(SetKind::Frontends)
                ),
                // Other ports of a Service address are not Services: the node's own listeners
                // must not answer there.
                format!(
                    "-m set --match-set {} dst -j {}",
                    s(SetKind::Addresses),
                    reject(cfg)
                ),
            ],
        ),
        ("filter", layout::FORWARD) => {
            let mut head = Vec::new();
            if !cfg.conntrack_tcp_be_liberal {
                head.push("-m conntrack --ctstate INVALID -j DROP".to_string());
            }
            head.push(format!("-m mark --mark {m}/{m} -j ACCEPT"));
            head.push("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string());
            (head, vec![])
        }
        // The canary's one rule (`netfilter::canary::rule`).
        (_, layout::CANARY) => (vec!["-j RETURN".to_string()], vec![]),
        _ => (vec![], vec![]),
    }
}

fn tables() -> [(&'static str, &'static [&'static str]); 3] {
    [
        ("mangle", layout::MANGLE_CHAINS),
        ("nat", layout::NAT_CHAINS),
        ("filter", layout::FILTER_CHAINS),
    ]
}

/// The whole iptables part: every chain declared (so flushed) and refilled, the plan's
/// per-frontend chains included, and the `missing` jumps put first in their built-in chains.
/// `stale` chains (per-frontend chains no longer planned) are deleted after.
pub fn text(
    cfg: &PlanConfig,
    rules: &[&Rule],
    missing: &[Jump],
    stale: &[(String, String)],
) -> String {
    let mut w = RestoreWriter::new();
    for (table, base) in tables() {
        w.table(table);
        let own: BTreeSet<&str> = rules
            .iter()
            .filter(|r| r.table == table && !base.contains(&r.chain.as_str()))
            .map(|r| r.chain.as_str())
            .collect();
        let gone: Vec<&str> = stale
            .iter()
            .filter(|(t, c)| t == table && !own.contains(c.as_str()))
            .map(|(_, c)| c.as_str())
            .collect();
        // Declaring a chain flushes it, so a stale one can be deleted at the end.
        for chain in base
            .iter()
            .copied()
            .chain(own.iter().copied())
            .chain(gone.iter().copied())
        {
            w.chain(chain);
        }
        for chain in base.iter().copied().chain(own.iter().copied()) {
            let (head, tail) = fixed(cfg, table, chain);
            for r in head {
                w.line(&format!("-A {chain} {r}"));
            }
            for r in rules
                .iter()
                .filter(|r| r.table == table && r.chain == chain)
            {
                w.line(&format!("-A {chain} {}", r.rule));
            }
            for r in tail {
                w.line(&format!("-A {chain} {r}"));
            }
        }
        for jump in missing.iter().filter(|j| j.table == table) {
            w.line(&jump.insert_line());
        }
        for chain in gone {
            w.line(&format!("-X {chain}"));
        }
    }
    w.finish()
}

/// The per-frontend chains `rules` use, as `(table, chain)`.
pub fn own_chains(rules: &[&Rule]) -> BTreeSet<(String, String)> {
    let base: BTreeSet<&str> = tables()
        .iter()
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    rules
        .iter()
        .filter(|r| !base.contains(r.chain.as_str()))
        .map(|r| (r.table.to_string(), r.chain.clone()))
        .collect()
}
