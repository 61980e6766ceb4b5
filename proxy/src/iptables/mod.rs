//! The iptables backend: kube-proxy's proven layout with kpx's own chains (see `README.md`).
//! `render` is the plan (pure); this module applies it with one `iptables-restore --noflush`
//! per sync and keeps the jumps from the built-in chains in place.

pub mod chains;
mod dump;
pub mod exec;
pub mod render;
#[cfg(test)]
pub mod trace;

use std::collections::BTreeSet;

use serde_json::Value;

use crate::backend::{Backend, BackendError, SyncReport};
use crate::model::{Changes, ProxyState};
use exec::Tool;
use render::{Fragments, RenderConfig};

pub struct IptablesBackend {
    tool: Tool,
    config: RenderConfig,
    /// What the kernel holds, as of the last successful sync.
    applied: Fragments,
}

impl IptablesBackend {
    pub fn new(tool: Tool, config: RenderConfig) -> Self {
        Self {
            tool,
            config,
            applied: Fragments::new(),
        }
    }

    pub fn tool(&self) -> Tool {
        self.tool
    }
}

/// kpx chains present in an `iptables-save` output.
fn kpx_chains(saved: &str) -> BTreeSet<String> {
    saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(chains::PREFIX))
        .map(String::from)
        .collect()
}

impl Backend for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn sync(
        &mut self,
        state: &ProxyState,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        // A full sync reads both tables once: kpx chains to drop, jumps to restore.
        let (existing, missing) = if full {
            let nat = self.tool.save("nat")?;
            let filter = self.tool.save("filter")?;
            let missing: Vec<chains::Jump> = chains::JUMPS
                .iter()
                .filter(|j| !j.present_in(if j.table == "nat" { &nat } else { &filter }))
                .copied()
                .collect();
            (kpx_chains(&nat), missing)
        } else {
            (BTreeSet::new(), Vec::new())
        };
        let plan = render::plan(
            &self.config,
            state,
            changes,
            &self.applied,
            full,
            &existing,
            &missing,
        );
        if !plan.restore.is_empty() {
            self.tool.restore(&plan.restore)?;
        }
        let report = SyncReport {
            full,
            rules_written: plan.rules_written,
            rules_total: plan.rules_total,
            chains_written: plan.chains_written,
            chains_deleted: plan.chains_deleted,
        };
        self.applied = plan.fragments;
        Ok(report)
    }

    fn lost_state(&mut self) -> Option<String> {
        // Only the chains the check needs (`-S CHAIN`), like kube-proxy's canary: saving whole
        // tables every sync period costs as much as the tables are large.
        let canary = format!("-A {} -j RETURN", chains::CANARY);
        for table in ["nat", "filter"] {
            match self.tool.run(&["-t", table, "-S", chains::CANARY]) {
                Ok(text) if text.lines().any(|l| l == canary) => {}
                Ok(_) => return Some(format!("the {table} canary rule is gone")),
                Err(e) => return Some(format!("the {table} canary chain is gone: {e}")),
            }
        }
        for jump in chains::JUMPS {
            match self.tool.run(&["-t", jump.table, "-S", jump.from]) {
                Ok(text) if jump.present_in(&text) => {}
                Ok(_) => {
                    return Some(format!(
                        "the jump from {} {} to {} is gone",
                        jump.table, jump.from, jump.to
                    ))
                }
                Err(e) => return Some(format!("cannot read {} {}: {e}", jump.table, jump.from)),
            }
        }
        None
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let mut input = String::new();
        for table in ["nat", "filter", "mangle"] {
            let saved = self.tool.save(table)?;
            let ours = kpx_chains(&saved);
            // Rules in built-in chains that jump to ours.
            let jumps: Vec<String> = saved
                .lines()
                .filter(|l| {
                    l.starts_with("-A ") && !l.starts_with(&format!("-A {}", chains::PREFIX))
                })
                .filter(|l| {
                    ours.iter()
                        .any(|c| l.ends_with(&format!("-j {c}")) || l.contains(&format!("-j {c} ")))
                })
                .map(|l| format!("-D{}", &l[2..]))
                .collect();
            if ours.is_empty() && jumps.is_empty() {
                continue;
            }
            input.push_str(&format!("*{table}\n"));
            for chain in &ours {
                input.push_str(&format!(":{chain} - [0:0]\n"));
            }
            for rule in &jumps {
                input.push_str(rule);
                input.push('\n');
            }
            for chain in &ours {
                input.push_str(&format!("-X {chain}\n"));
            }
            input.push_str("COMMIT\n");
        }
        if !input.is_empty() {
            self.tool.restore(&input)?;
        }
        self.applied.clear();
        Ok(())
    }

    fn dump(&self) -> Result<Value, BackendError> {
        Ok(dump::read(
            &self.tool.save("nat")?,
            &self.tool.save("filter")?,
        ))
    }
}
