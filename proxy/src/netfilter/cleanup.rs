//! Removing every chain of a prefix and the rules elsewhere that jump to them, in every table,
//! as kube-proxy's `CleanupLeftovers` (`pkg/proxy/iptables/proxier.go`) does for `KUBE-`: one
//! restore per tool that flushes and deletes the chains and deletes the jumps, so the tables
//! never hold a jump to a missing chain. The plan ([`leftovers`], [`removal`]) is pure; only
//! [`cleanup`] runs tools.
//!
//! Only chains whose name starts with the prefix are removed, and only the rules that target
//! them: anyone else's chains (kube-proxy's `KUBE-*`, a firewall's) and their other rules stay.

use std::collections::{BTreeMap, BTreeSet};

use super::exec::Tool;
use super::restore::RestoreWriter;
use crate::backend::BackendError;

/// What one table holds of a prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub table: String,
    /// Chains named with the prefix: flushed, then deleted.
    pub chains: Vec<String>,
    /// Rules of other chains that jump (`-j`) or go (`-g`) to one of them, as saved: deleted.
    pub jumps: Vec<String>,
}

/// Splits a saved rule into words, keeping a quoted comment as one.
fn words(rule: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = rule.trim_start();
    while !rest.is_empty() {
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"').map_or(rest.len(), |i| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    out
}

/// The target of a saved rule, if it jumps or goes to a chain.
fn target(rule: &str) -> Option<&str> {
    let w = words(rule);
    w.iter()
        .position(|x| matches!(*x, "-j" | "--jump" | "-g" | "--goto"))
        .and_then(|i| w.get(i + 1).copied())
}

/// One saved table: the chains of the prefix, and every rule as `(chain, line)`.
type Table<'a> = (BTreeSet<&'a str>, Vec<(&'a str, &'a str)>);

/// What `saved` (`iptables-save` of every table) holds of `prefix`, per table that holds any.
/// An empty prefix matches nothing: it would name every chain.
pub fn leftovers(saved: &str, prefix: &str) -> Vec<Leftovers> {
    if prefix.is_empty() {
        return Vec::new();
    }
    let mut tables: BTreeMap<&str, Table> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in saved.lines() {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(table.trim());
            tables.entry(table.trim()).or_default();
            continue;
        }
        let Some(table) = current else { continue };
        let entry = tables.entry(table).or_default();
        if let Some(chain) = line.strip_prefix(':') {
            if let Some(name) = chain.split_whitespace().next() {
                if name.starts_with(prefix) {
                    entry.0.insert(name);
                }
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            if let Some(chain) = rule.split_whitespace().next() {
                entry.1.push((chain, line));
            }
        } else if line == "COMMIT" {
            current = None;
        }
    }
    tables
        .into_iter()
        .filter_map(|(table, (chains, rules))| {
            let jumps: Vec<String> = rules
                .iter()
                .filter(|(chain, _)| !chain.starts_with(prefix))
                .filter(|(_, line)| target(line).is_some_and(|t| chains.contains(t)))
                .map(|(_, line)| line.to_string())
                .collect();
            (!chains.is_empty() || !jumps.is_empty()).then(|| Leftovers {
                table: table.to_string(),
                chains: chains.into_iter().map(String::from).collect(),
                jumps,
            })
        })
        .collect()
}

/// The restore input removing `leftovers`: per table, declare (flush) the chains, delete the
/// jumps, delete the chains; empty when there is nothing.
pub fn removal(leftovers: &[Leftovers]) -> String {
    let mut w = RestoreWriter::new();
    for t in leftovers {
        w.table(&t.table);
        for chain in &t.chains {
            w.chain(chain);
        }
        for rule in &t.jumps {
            // `-A CHAIN spec` as saved → `-D CHAIN spec`.
            w.line(&format!("-D{}", &rule[2..]));
        }
        for chain in &t.chains {
            w.line(&format!("-X {chain}"));
        }
    }
    w.finish()
}

/// What cleaning one tool did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCleanup {
    /// The tool, e.g. `ip6tables-legacy`.
    pub tool: String,
    pub removed: Vec<Leftovers>,
    /// Why the tool was not looked at (not installed, IPv6 disabled, unreadable): nothing of
    /// ours can be there, or nothing we could remove.
    pub skipped: Option<String>,
}

impl ToolCleanup {
    pub fn chains(&self) -> usize {
        self.removed.iter().map(|t| t.chains.len()).sum()
    }

    pub fn jumps(&self) -> usize {
        self.removed.iter().map(|t| t.jumps.len()).sum()
    }
}

/// Removes every chain of `prefix`, and the jumps to them, that `tool` shows. Cheap and quiet
/// when there is nothing: one `-save`, no restore; a missing tool or family is skipped (said at
/// debug level), not an error. Errors only when something was found and could not be removed.
pub fn cleanup(tool: &Tool, prefix: &str) -> Result<ToolCleanup, BackendError> {
    let mut report = ToolCleanup {
        tool: tool.binary(""),
        ..Default::default()
    };
    if tool.ipv6 && !std::path::Path::new("/proc/net/if_inet6").exists() {
        report.skipped = Some("the kernel has IPv6 disabled".into());
        tracing::debug!(tool = %report.tool, "cleanup skipped: the kernel has IPv6 disabled");
        return Ok(report);
    }
    let saved = match tool.save_all() {
        Ok(saved) => saved,
        Err(BackendError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            report.skipped = Some(format!("{}-save is not installed", report.tool));
            tracing::debug!(tool = %report.tool, "cleanup skipped: not installed");
            return Ok(report);
        }
        // The kernel lacks this flavour or family: it can hold nothing of ours.
        Err(e @ BackendError::Command { .. }) => {
            report.skipped = Some(e.to_string());
            tracing::debug!(tool = %report.tool, error = %e, "cleanup skipped: cannot read the tables");
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.removed = leftovers(&saved, prefix);
    if report.removed.is_empty() {
        tracing::debug!(tool = %report.tool, prefix, "nothing to clean up");
        return Ok(report);
    }
    tool.restore(&removal(&report.removed))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Wed Dec  2 04:00:00 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KPX-FORWARD - [0:0]
:KUBE-FORWARD - [0:0]
:MINE - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kpx externally-visible service portals\" -j KPX-EXTERNAL-SERVICES
-A FORWARD -m comment --comment \"kpx forwarding rules\" -j KPX-FORWARD
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m comment --comment \"-j KPX-FORWARD in a comment\" -j ACCEPT
-A MINE -g KPX-FORWARD
-A KPX-FORWARD -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -j KUBE-SERVICES
COMMIT
*mangle
:KPX-SVC-ABC - [0:0]
COMMIT
";

    #[test]
    fn only_the_prefix_chains_and_the_rules_targeting_them_are_planned() {
        let mut saved = SAVED.replace(
            ":KPX-FORWARD - [0:0]",
            ":KPX-FORWARD - [0:0]\n:KPX-EXTERNAL-SERVICES - [0:0]",
        );
        saved.push_str("*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
        let plan = leftovers(&saved, "KPX-");
        assert_eq!(
            plan,
            vec![
                Leftovers {
                    table: "filter".into(),
                    chains: vec!["KPX-EXTERNAL-SERVICES".into(), "KPX-FORWARD".into()],
                    jumps: vec![
                        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kpx externally-visible service portals\" -j KPX-EXTERNAL-SERVICES".into(),
                        "-A FORWARD -m comment --comment \"kpx forwarding rules\" -j KPX-FORWARD".into(),
                        "-A MINE -g KPX-FORWARD".into(),
                    ],
                },
                Leftovers {
                    table: "mangle".into(),
                    chains: vec!["KPX-SVC-ABC".into()],
                    jumps: vec![],
                },
            ]
        );
        // kube-proxy's chains and jumps, another program's chain, tables without ours: kept.
        let text = removal(&plan);
        assert!(!text.contains("KUBE"), "{text}");
        assert!(!text.contains("-X MINE") && !text.contains("*nat") && !text.contains("*raw"));
        assert_eq!(
            text,
            "*filter\n:KPX-EXTERNAL-SERVICES - [0:0]\n:KPX-FORWARD - [0:0]\n\
             -D INPUT -m conntrack --ctstate NEW -m comment --comment \"kpx externally-visible service portals\" -j KPX-EXTERNAL-SERVICES\n\
             -D FORWARD -m comment --comment \"kpx forwarding rules\" -j KPX-FORWARD\n\
             -D MINE -g KPX-FORWARD\n-X KPX-EXTERNAL-SERVICES\n-X KPX-FORWARD\nCOMMIT\n\
             *mangle\n:KPX-SVC-ABC - [0:0]\n-X KPX-SVC-ABC\nCOMMIT\n"
        );
    }

    #[test]
    fn the_prefix_is_a_parameter() {
        // Another mode's prefix (the IPVS backend's) sees only its own chains.
        let saved = "*nat\n:KPX-SERVICES - [0:0]\n:KPXV-SERVICES - [0:0]\n-A OUTPUT -j KPXV-SERVICES\n-A OUTPUT -j KPX-SERVICES\nCOMMIT\n";
        let plan = leftovers(saved, "KPXV-");
        assert_eq!(plan[0].chains, vec!["KPXV-SERVICES".to_string()]);
        assert_eq!(
            plan[0].jumps,
            vec!["-A OUTPUT -j KPXV-SERVICES".to_string()]
        );
        assert_eq!(
            leftovers(saved, "KPX-")[0].chains,
            vec!["KPX-SERVICES".to_string()]
        );
    }

    #[test]
    fn nothing_left_plans_nothing() {
        assert_eq!(leftovers("", "KPX-"), vec![]);
        assert_eq!(
            leftovers(SAVED.split("*mangle").next().unwrap_or(""), "NONE-"),
            vec![]
        );
        // An empty prefix would name every chain: it names none.
        assert_eq!(leftovers(SAVED, ""), vec![]);
        assert_eq!(removal(&[]), "");
    }
}
