//! The iptables backend: kube-proxy's proven layout with kpx's own chains (see `README.md`).
//! `render` is the plan (pure); this module applies it with one `iptables-restore --noflush`
//! per sync and keeps the jumps from the built-in chains in place.

pub mod chains;
mod dump;
pub mod exec;
pub mod render;

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

    /// kpx chains present in a table, from `iptables-save`.
    fn existing_chains(&self, table: &str) -> Result<BTreeSet<String>, BackendError> {
        let saved = self.tool.save(table)?;
        Ok(saved
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with(chains::PREFIX))
            .map(String::from)
            .collect())
    }

    fn jump_args(jump: &chains::Jump) -> Vec<&str> {
        let mut args: Vec<&str> = vec!["-t", jump.table];
        args.extend_from_slice(jump.matches);
        args.extend(["-m", "comment", "--comment", jump.comment, "-j", jump.to]);
        args
    }

    /// Puts the jumps from the built-in chains first in line, where missing.
    fn ensure_jumps(&self) -> Result<(), BackendError> {
        for jump in chains::JUMPS {
            let spec = Self::jump_args(jump);
            let mut check = vec!["-C", jump.from];
            check.extend(&spec);
            if !self.tool.check(&check) {
                let mut insert = vec!["-I", jump.from, "1"];
                insert.extend(&spec);
                self.tool.run(&insert)?;
            }
        }
        Ok(())
    }
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
        let existing = if full {
            self.existing_chains("nat")?
        } else {
            BTreeSet::new()
        };
        let plan = render::plan(&self.config, state, changes, &self.applied, full, &existing);
        if !plan.restore.is_empty() {
            self.tool.restore(&plan.restore)?;
        }
        if full {
            self.ensure_jumps()?;
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
        for table in ["nat", "filter"] {
            if !self
                .tool
                .check(&["-t", table, "-C", chains::CANARY, "-j", "RETURN"])
            {
                return Some(format!("the {table} canary rule is gone"));
            }
        }
        for jump in chains::JUMPS {
            let mut check = vec!["-C", jump.from];
            check.extend(Self::jump_args(jump));
            if !self.tool.check(&check) {
                return Some(format!(
                    "the jump from {} {} to {} is gone",
                    jump.table, jump.from, jump.to
                ));
            }
        }
        None
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let mut input = String::new();
        for table in ["nat", "filter", "mangle"] {
            let saved = self.tool.save(table)?;
            let ours: Vec<String> = saved
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| c.starts_with(chains::PREFIX))
                .map(String::from)
                .collect();
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
