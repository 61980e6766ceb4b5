//! Running the iptables tools (legacy or nft flavour, IPv4 or IPv6), and commands in general.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::backend::BackendError;

/// Which iptables the node uses: nft (the kernel's nf_tables) or legacy (x_tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Nft,
    Legacy,
}

impl Flavour {
    pub fn parse(text: &str) -> Option<Option<Self>> {
        match text {
            "auto" => Some(None),
            "nft" => Some(Some(Flavour::Nft)),
            "legacy" => Some(Some(Flavour::Legacy)),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Nft => "nft",
            Flavour::Legacy => "legacy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub flavour: Flavour,
    pub ipv6: bool,
}

fn count_rules(binary: &str) -> Option<usize> {
    let out = Command::new(binary).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count()
    })
}

impl Tool {
    /// Every flavour of both families: where a cleanup looks, since a node may have run either
    /// flavour before (kube-proxy's `platformCleanup` cleans every `getIPTables` family).
    pub const EVERY: [Tool; 4] = [
        Tool {
            flavour: Flavour::Nft,
            ipv6: false,
        },
        Tool {
            flavour: Flavour::Nft,
            ipv6: true,
        },
        Tool {
            flavour: Flavour::Legacy,
            ipv6: false,
        },
        Tool {
            flavour: Flavour::Legacy,
            ipv6: true,
        },
    ];

    /// Like kube-proxy's iptables wrapper: the flavour that already holds rules in this network
    /// namespace wins (legacy only when it has more), nft otherwise.
    pub fn detect(ipv6: bool) -> Self {
        let family = if ipv6 { "ip6tables" } else { "iptables" };
        let legacy = count_rules(&format!("{family}-legacy-save")).unwrap_or(0);
        let nft = count_rules(&format!("{family}-nft-save")).unwrap_or(0);
        let flavour = if legacy > nft {
            Flavour::Legacy
        } else {
            Flavour::Nft
        };
        Self { flavour, ipv6 }
    }

    pub fn binary(&self, suffix: &str) -> String {
        let family = if self.ipv6 { "ip6tables" } else { "iptables" };
        format!("{family}-{}{suffix}", self.flavour.name())
    }

    fn command(&self, suffix: &str) -> Command {
        let mut cmd = Command::new(self.binary(suffix));
        if self.flavour == Flavour::Legacy && suffix != "-save" {
            // Legacy iptables serialises writers with a lock; wait for it instead of failing.
            cmd.arg("-w");
        }
        cmd
    }

    /// `iptables ARGS`; returns whether it succeeded (for `-C` checks).
    pub fn check(&self, args: &[&str]) -> bool {
        self.command("")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Why this family's iptables cannot program Services here, if it cannot (no IPv6 in the
    /// kernel, no nat table, the tool missing).
    pub fn unusable(&self) -> Option<String> {
        if self.ipv6 && !std::path::Path::new("/proc/net/if_inet6").exists() {
            return Some("the kernel has IPv6 disabled".into());
        }
        self.run(&["-t", "nat", "-L", "POSTROUTING", "-n"])
            .err()
            .map(|e| e.to_string())
    }

    pub fn run(&self, args: &[&str]) -> Result<String, BackendError> {
        output(
            self.command("").args(args),
            &format!("{} {}", self.binary(""), args.join(" ")),
        )
    }

    pub fn save(&self, table: &str) -> Result<String, BackendError> {
        output(
            self.command("-save").args(["-t", table]),
            &format!("{}-save -t {table}", self.binary("")),
        )
    }

    /// Every table that exists, as `iptables-save` without `-t` prints them. Unlike `-t TABLE`,
    /// this never creates a table (legacy loads a table's module on first use; nft creates it).
    pub fn save_all(&self) -> Result<String, BackendError> {
        output(&mut self.command("-save"), &self.binary("-save"))
    }

    /// `iptables-restore --noflush` with `input` on stdin: one transaction per table.
    pub fn restore(&self, input: &str) -> Result<(), BackendError> {
        let name = format!("{} --noflush", self.binary("-restore"));
        let mut child = self
            .command("-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BackendError::Spawn {
                command: name.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|source| BackendError::Spawn {
                    command: name.clone(),
                    source,
                })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| BackendError::Spawn {
                command: name.clone(),
                source,
            })?;
        succeeded(out, &name).map(|_| ())
    }
}

/// The command's stdout when it exited 0, else an error carrying its status and stderr.
fn succeeded(out: std::process::Output, name: &str) -> Result<String, BackendError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(BackendError::Command {
            command: name.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub fn output(cmd: &mut Command, name: &str) -> Result<String, BackendError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BackendError::Spawn {
            command: name.to_string(),
            source,
        })?;
    succeeded(out, name)
}
