//! The iptables backend: kube-proxy's proven layout with kpx's own chains (see `README.md`).
//! `render` is the plan (pure); this module applies it with one `iptables-restore --noflush`
//! per sync and keeps the jumps from the built-in chains in place. Running the tools, the jumps
//! as data, the canary and the cleanup of a prefix are the shared [`crate::netfilter`]'s.

pub mod chains;
mod dump;
pub mod exec;
pub mod render;
#[cfg(test)]
pub mod trace;

use std::collections::BTreeSet;

use crate::backend::{Backend, BackendError, Count, Dump, SyncInput, SyncReport, Unit};
use crate::netfilter::{self, ToolCleanup};
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

/// Removes every `KPX-` chain `tool` shows, in every table, and the rules jumping to them; needs
/// no running backend (kube-proxy's `iptables.CleanupLeftovers`). Quiet and cheap when there is
/// nothing, or no such tool or family here. Run it for each of [`Tool::EVERY`] to remove
/// leftovers of both flavours and families.
pub fn cleanup(tool: Tool) -> Result<ToolCleanup, BackendError> {
    netfilter::cleanup::cleanup(&tool, chains::PREFIX)
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

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
        let SyncInput {
            state,
            changes,
            full,
            ..
        } = input;
        // A full sync reads both tables once: kpx chains to drop, jumps to restore.
        let (existing, missing) = if full {
            let nat = self.tool.save("nat")?;
            let filter = self.tool.save("filter")?;
            let missing = netfilter::jump::missing(chains::JUMPS, |table| {
                if table == "nat" {
                    &nat
                } else {
                    &filter
                }
            });
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
            written: Count::new(plan.rules_written, Unit::Rules),
            total: Count::new(plan.rules_total, Unit::Rules),
            per_table: vec![
                (
                    "nat",
                    Count::new(plan.rules_total - plan.filter_rules_total, Unit::Rules),
                ),
                ("filter", Count::new(plan.filter_rules_total, Unit::Rules)),
            ],
            chains_written: plan.chains_written,
            chains_deleted: plan.chains_deleted,
            messages: 0,
        };
        self.applied = plan.fragments;
        Ok(report)
    }

    fn lost_state(&mut self) -> Option<String> {
        netfilter::canary::lost(
            &self.tool,
            chains::CANARY,
            &["nat", "filter"],
            chains::JUMPS,
        )
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        cleanup(self.tool)?;
        self.applied.clear();
        Ok(())
    }

    fn dump(&self) -> Result<Dump, BackendError> {
        Ok(dump::read(
            &self.tool.save("nat")?,
            &self.tool.save("filter")?,
        ))
    }
}
