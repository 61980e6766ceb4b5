//! The canary: an empty chain of the mode's own, holding one `RETURN`, in each table it uses.
//! Someone flushing the tables (a firewall reload) removes it; finding it gone means the rules
//! are gone too, and the next sync must be full (kube-proxy's `KUBE-PROXY-CANARY`, watched by
//! `Monitor` in `pkg/util/iptables/iptables.go`). Only the canary and the built-in chains the
//! jumps leave from are read (`-S CHAIN`), never whole tables: that costs as much as the
//! tables are large.

use super::exec::Tool;
use super::jump::Jump;

/// The canary chain's one rule.
pub fn rule(chain: &str) -> String {
    format!("-A {chain} -j RETURN")
}

/// Why the state is lost, if it is: the canary missing in one of `tables`, or one of `jumps`.
pub fn lost(tool: &Tool, chain: &str, tables: &[&str], jumps: &[Jump]) -> Option<String> {
    let canary = rule(chain);
    for table in tables {
        match tool.run(&["-t", table, "-S", chain]) {
            Ok(text) if text.lines().any(|l| l == canary) => {}
            Ok(_) => return Some(format!("the {table} canary rule is gone")),
            Err(e) => return Some(format!("the {table} canary chain is gone: {e}")),
        }
    }
    for jump in jumps {
        match tool.run(&["-t", jump.table, "-S", jump.from]) {
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
