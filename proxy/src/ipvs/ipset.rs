//! The ipsets of a full sync, written with one `ipset restore` (kube-proxy runs one `ipset add`
//! process per entry: 3.4 ms each here, 68 s for 20,000 entries, against 0.38 s for one
//! restore): each set is refilled into a temporary one and swapped in, so the rules never see
//! a half-filled set. A partial sync's member edits go over netlink (`ipset_netlink.rs`), with
//! no process. Text pure, apply below.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::layout::SetKind;
use crate::backend::BackendError;

/// Hash sets grow past the default 65,536 members: 10,000 Services × 10 endpoints is 100,000
/// hairpin members.
const MAXELEM: u32 = 1 << 20;

fn create(kind: SetKind, ipv6: bool, name: &str) -> String {
    let mut line = format!("create {name} {} -exist", kind.create_args(ipv6));
    if !matches!(kind, SetKind::HealthCheckNodePorts) {
        line = format!(
            "create {name} {} maxelem {MAXELEM} -exist",
            kind.create_args(ipv6)
        );
    }
    line
}

fn temporary(name: &str) -> String {
    format!("{name}-T")
}

/// Every set created (if missing) and refilled with exactly `members`.
pub fn full_text(ipv6: bool, members: &BTreeMap<SetKind, BTreeSet<String>>) -> String {
    let mut out = String::new();
    for kind in SetKind::ALL {
        let name = kind.name(ipv6);
        let tmp = temporary(&name);
        out.push_str(&create(kind, ipv6, &name));
        out.push('\n');
        out.push_str(&create(kind, ipv6, &tmp));
        out.push('\n');
        out.push_str(&format!("flush {tmp}\n"));
        for m in members.get(&kind).into_iter().flatten() {
            // -exist: two Service ports sharing a frontend give it twice (with two comments).
            out.push_str(&format!("add {tmp} {m} -exist\n"));
        }
        out.push_str(&format!("swap {tmp} {name}\ndestroy {tmp}\n"));
    }
    out
}

/// Every set of the family destroyed (after the rules that use them are gone).
pub fn destroy_text(ipv6: bool, existing: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for kind in SetKind::ALL {
        let name = kind.name(ipv6);
        for n in [temporary(&name), name] {
            if existing.contains(&n) {
                out.push_str(&format!("flush {n}\ndestroy {n}\n"));
            }
        }
    }
    out
}

/// `ipset restore` with `input` on stdin.
pub fn restore(input: &str) -> Result<(), BackendError> {
    if input.is_empty() {
        return Ok(());
    }
    let name = "ipset restore";
    let spawn = |source| BackendError::Spawn {
        command: name.into(),
        source,
    };
    let mut child = Command::new("ipset")
        .arg("restore")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BackendError::Command {
            command: name.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The names of every set in this namespace (`ipset list -n`).
pub fn names() -> Result<BTreeSet<String>, BackendError> {
    let text = crate::netfilter::exec::output(
        Command::new("ipset").args(["list", "-n"]),
        "ipset list -n",
    )?;
    Ok(text.lines().map(str::to_string).collect())
}

/// One set's members (`ipset list NAME`), for lost-state checks and dump.
pub fn members(name: &str) -> Result<BTreeSet<String>, BackendError> {
    let text = crate::netfilter::exec::output(
        Command::new("ipset").args(["list", name]),
        &format!("ipset list {name}"),
    )?;
    Ok(text
        .lines()
        .skip_while(|l| !l.starts_with("Members:"))
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_sync_swaps_each_set_in_whole_and_cleanup_destroys_only_kpxs() {
        let mut members: BTreeMap<SetKind, BTreeSet<String>> = BTreeMap::new();
        members
            .entry(SetKind::Reject)
            .or_default()
            .insert("198.18.1.1,tcp:80".into());
        let text = full_text(false, &members);
        assert!(text.contains(
            "create KPXV-REJECT hash:ip,port family inet maxelem 1048576 -exist\n\
             create KPXV-REJECT-T hash:ip,port family inet maxelem 1048576 -exist\n\
             flush KPXV-REJECT-T\n\
             add KPXV-REJECT-T 198.18.1.1,tcp:80 -exist\n\
             swap KPXV-REJECT-T KPXV-REJECT\n\
             destroy KPXV-REJECT-T\n"
        ));
        assert!(
            text.contains("create KPXV-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535 -exist\n")
        );
        assert_eq!(text.matches("swap ").count(), SetKind::ALL.len());
        let existing = ["KPXV-DROP".to_string(), "KUBE-CLUSTER-IP".to_string()].into();
        assert_eq!(
            destroy_text(false, &existing),
            "flush KPXV-DROP\ndestroy KPXV-DROP\n"
        );
    }
}
