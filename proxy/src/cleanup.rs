//! Cleanup across modes, as kube-proxy's `platformCleanup` (`cmd/kube-proxy/app/server_linux.go`):
//! `kpx-proxy --cleanup` removes what every mode left (`cleanupAndExit`: every mode's
//! `CleanupLeftovers`, an error if any failed), and starting in one mode first removes what the
//! *other* modes left, best effort (`Options.Run` in `server.go` ignores that error: the mode
//! starts anyway). Each mode's cleanup is a module-level function that needs no running backend:
//! [`iptables::cleanup`] (every `KPX-` chain and the jumps to them, per tool: both families,
//! both flavours), [`ebpf::cleanup`] (the pinned links and maps) and
//! [`crate::nftables::cleanup`] (the `ip kpx` and `ip6 kpx` tables) and
//! [`crate::ipvs::cleanup_all`] (the virtual servers kpx owns, `kpx-ipvs0`, the `KPXV-` chains
//! and ipsets). Only kpx's own state is removed: never kube-proxy's `KUBE-` chains, never
//! another program's pins. The IPVS mode's chains are `KPXV-`, not `KPX-`, so the iptables
//! cleanup (every `KPX-` chain) leaves them to the IPVS one, which removes them in its order.

use std::fmt;
use std::path::PathBuf;

use crate::backend::BackendError;
use crate::ebpf::{self, EbpfCleanup};
use crate::iptables;
use crate::netfilter::{Flavour, Tool, ToolCleanup};

/// What a cleanup looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupTargets {
    /// The iptables tools whose `KPX-` chains are removed.
    pub iptables: Vec<Tool>,
    /// The eBPF mode's pin directory (`--bpf-pin-dir`), if it is cleaned.
    pub ebpf_pin_dir: Option<PathBuf>,
    /// kpx's nftables tables (`ip kpx`, `ip6 kpx`).
    pub nftables: bool,
    /// What the IPVS mode left: always for `--cleanup`; for a start in another mode only when
    /// [`crate::ipvs::leftovers_present`] finds something (a quick look, no ipset or iptables
    /// runs on a node that never ran ipvs).
    pub ipvs: IpvsTarget,
}

/// Whether and when the IPVS mode's leftovers are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpvsTarget {
    Skip,
    /// Removed if [`crate::ipvs::leftovers_present`] says there are any.
    IfPresent,
    Always,
}

/// The mode a proxy starts in, for [`CleanupTargets::left_by_others`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// iptables of this flavour (both families).
    Iptables(Flavour),
    Ebpf,
    Nftables,
    Ipvs,
}

impl CleanupTargets {
    /// Everything every mode may have left: `--cleanup`.
    pub fn every_mode(ebpf_pin_dir: PathBuf) -> Self {
        Self {
            iptables: Tool::EVERY.to_vec(),
            ebpf_pin_dir: Some(ebpf_pin_dir),
            nftables: true,
            ipvs: IpvsTarget::Always,
        }
    }

    /// What the modes other than `running` may have left, for a start in `running`. iptables
    /// of the other flavour counts as another mode: every packet traverses both the legacy and
    /// the nft tables, so stale `KPX-` rules in the flavour not in use would still DNAT. The
    /// running flavour's own stale chains are the backend's business (its first full sync
    /// removes those no longer wanted). The IPVS mode's small iptables part is `KPXV-` chains,
    /// not `KPX-`: every iptables tool is cleaned of `KPX-` in ipvs mode.
    pub fn left_by_others(running: Running, ebpf_pin_dir: PathBuf) -> Self {
        let ipvs = IpvsTarget::IfPresent;
        match running {
            Running::Iptables(flavour) => Self {
                iptables: Tool::EVERY
                    .into_iter()
                    .filter(|t| t.flavour != flavour)
                    .collect(),
                ebpf_pin_dir: Some(ebpf_pin_dir),
                nftables: true,
                ipvs,
            },
            Running::Ebpf => Self {
                iptables: Tool::EVERY.to_vec(),
                ebpf_pin_dir: None,
                nftables: true,
                ipvs,
            },
            Running::Nftables => Self {
                iptables: Tool::EVERY.to_vec(),
                ebpf_pin_dir: Some(ebpf_pin_dir),
                nftables: false,
                ipvs,
            },
            Running::Ipvs => Self {
                iptables: Tool::EVERY.to_vec(),
                ebpf_pin_dir: Some(ebpf_pin_dir),
                nftables: true,
                ipvs: IpvsTarget::Skip,
            },
        }
    }
}

/// What a cleanup removed, per mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub iptables: Vec<ToolCleanup>,
    pub ebpf: Option<EbpfCleanup>,
    /// nftables tables deleted.
    pub nftables: usize,
    /// What the IPVS cleanup removed, as it says (virtual servers, kpx-ipvs0, chains, ipsets).
    pub ipvs: Vec<String>,
}

impl Report {
    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.iptables.iter().all(|t| t.removed.is_empty())
            && self.ebpf.as_ref().is_none_or(EbpfCleanup::is_empty)
            && self.nftables == 0
            && self.ipvs.is_empty()
    }

    /// One info line per mode that had leftovers (what was skipped was said at debug level).
    pub fn log(&self) {
        for t in self.iptables.iter().filter(|t| !t.removed.is_empty()) {
            tracing::info!(
                tool = %t.tool,
                chains = t.chains(),
                jumps = t.jumps(),
                "removed kpx iptables chains and the jumps to them"
            );
        }
        if let Some(e) = self.ebpf.as_ref().filter(|e| !e.is_empty()) {
            tracing::info!(
                pin_dir = %e.pin_dir.display(),
                links = e.links.len(),
                maps = e.maps.len(),
                "detached kpx BPF programs and removed their pins"
            );
        }
        if self.nftables > 0 {
            tracing::info!(tables = self.nftables, "deleted kpx nftables tables");
        }
        if !self.ipvs.is_empty() {
            tracing::info!(removed = %self.ipvs.join(", "), "removed what kpx's ipvs mode left");
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing of kpx was left");
        }
        let mut parts = Vec::new();
        for t in self.iptables.iter().filter(|t| !t.removed.is_empty()) {
            parts.push(format!(
                "{}: {} chains, {} jumps",
                t.tool,
                t.chains(),
                t.jumps()
            ));
        }
        if let Some(e) = self.ebpf.as_ref().filter(|e| !e.is_empty()) {
            parts.push(format!(
                "ebpf {}: {} links, {} maps",
                e.pin_dir.display(),
                e.links.len(),
                e.maps.len()
            ));
        }
        if self.nftables > 0 {
            parts.push(format!("nftables: {} tables", self.nftables));
        }
        if !self.ipvs.is_empty() {
            parts.push(format!("ipvs: {}", self.ipvs.join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

/// A cleanup that failed somewhere; `report` holds what the others removed.
#[derive(Debug, thiserror::Error)]
#[error("cleanup failed: {}", failures.iter().map(|(what, e)| format!("{what}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct CleanupError {
    pub report: Box<Report>,
    /// What failed (`iptables-nft`, `ebpf /sys/fs/bpf/kpx`) and why.
    pub failures: Vec<(String, BackendError)>,
}

/// Runs every cleanup `targets` names; one failing does not stop the others (as
/// `platformCleanup` runs every `CleanupLeftovers` and reports whether any failed).
pub fn cleanup_all(targets: &CleanupTargets) -> Result<Report, CleanupError> {
    let mut report = Report::default();
    let mut failures = Vec::new();
    for tool in &targets.iptables {
        match iptables::cleanup(*tool) {
            Ok(t) => report.iptables.push(t),
            Err(e) => failures.push((tool.binary(""), e)),
        }
    }
    if let Some(pin_dir) = &targets.ebpf_pin_dir {
        match ebpf::cleanup(pin_dir) {
            Ok(e) => report.ebpf = Some(e),
            Err(e) => failures.push((format!("ebpf {}", pin_dir.display()), e)),
        }
    }
    if targets.nftables {
        match crate::nftables::cleanup() {
            Ok(n) => report.nftables = n,
            Err(e) => failures.push(("nftables".into(), e)),
        }
    }
    let ipvs = match targets.ipvs {
        IpvsTarget::Skip => false,
        IpvsTarget::IfPresent => crate::ipvs::leftovers_present(),
        IpvsTarget::Always => true,
    };
    if ipvs {
        match crate::ipvs::cleanup_all() {
            Ok(removed) => report.ipvs = removed,
            Err(e) => failures.push(("ipvs".into(), e)),
        }
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(CleanupError {
            report: Box::new(report),
            failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::Leftovers;

    fn tools(t: &CleanupTargets) -> Vec<String> {
        t.iptables.iter().map(|t| t.binary("")).collect()
    }

    #[test]
    fn cleanup_looks_at_every_mode_and_a_start_at_the_others_only() {
        let pins = PathBuf::from("/sys/fs/bpf/kpx");
        let all = CleanupTargets::every_mode(pins.clone());
        assert_eq!(
            tools(&all),
            [
                "iptables-nft",
                "ip6tables-nft",
                "iptables-legacy",
                "ip6tables-legacy"
            ]
        );
        assert_eq!(all.ebpf_pin_dir.as_ref(), Some(&pins));

        let ebpf = CleanupTargets::left_by_others(Running::Ebpf, pins.clone());
        assert_eq!(tools(&ebpf), tools(&all));
        assert_eq!(
            ebpf.ebpf_pin_dir, None,
            "the running mode's pins are its own"
        );

        let nft = CleanupTargets::left_by_others(Running::Iptables(Flavour::Nft), pins.clone());
        assert_eq!(tools(&nft), ["iptables-legacy", "ip6tables-legacy"]);
        assert_eq!(nft.ebpf_pin_dir.as_ref(), Some(&pins));
        let legacy = CleanupTargets::left_by_others(Running::Iptables(Flavour::Legacy), pins);
        assert_eq!(tools(&legacy), ["iptables-nft", "ip6tables-nft"]);
    }

    #[test]
    fn ipvs_is_cleaned_by_cleanup_and_by_every_other_mode_and_ipvs_cleans_every_other() {
        let pins = PathBuf::from("/sys/fs/bpf/kpx");
        assert_eq!(
            CleanupTargets::every_mode(pins.clone()).ipvs,
            IpvsTarget::Always
        );
        for running in [
            Running::Iptables(Flavour::Nft),
            Running::Iptables(Flavour::Legacy),
            Running::Ebpf,
            Running::Nftables,
        ] {
            let t = CleanupTargets::left_by_others(running, pins.clone());
            assert_eq!(t.ipvs, IpvsTarget::IfPresent, "{running:?}");
        }
        let ipvs = CleanupTargets::left_by_others(Running::Ipvs, pins.clone());
        assert_eq!(ipvs.ipvs, IpvsTarget::Skip, "the running mode's own state");
        assert_eq!(
            tools(&ipvs),
            tools(&CleanupTargets::every_mode(pins.clone())),
            "every KPX- chain of both flavours: ipvs's own chains are KPXV-"
        );
        assert_eq!(ipvs.ebpf_pin_dir.as_ref(), Some(&pins));
        assert!(ipvs.nftables);
    }

    #[test]
    fn the_iptables_cleanup_leaves_the_ipvs_modes_kpxv_chains_alone() {
        let saved = "*nat\n\
:PREROUTING ACCEPT [0:0]\n\
:OUTPUT ACCEPT [0:0]\n\
:KPX-SERVICES - [0:0]\n\
:KPXV-SERVICES - [0:0]\n\
:KPXV-POSTROUTING - [0:0]\n\
-A PREROUTING -j KPX-SERVICES\n\
-A PREROUTING -j KPXV-SERVICES\n\
-A KPXV-SERVICES -m set --match-set KPXV-CLUSTER-IP dst,dst -j ACCEPT\n\
COMMIT\n";
        let found = crate::netfilter::cleanup::leftovers(saved, iptables::chains::PREFIX);
        assert_eq!(
            found,
            vec![Leftovers {
                table: "nat".into(),
                chains: vec!["KPX-SERVICES".into()],
                jumps: vec!["-A PREROUTING -j KPX-SERVICES".into()],
            }]
        );
        let ipvs = crate::netfilter::cleanup::leftovers(saved, crate::ipvs::layout::PREFIX);
        assert_eq!(
            ipvs.iter().map(|l| l.chains.clone()).collect::<Vec<_>>(),
            [vec!["KPXV-POSTROUTING".to_string(), "KPXV-SERVICES".into()]]
        );
    }

    #[test]
    fn the_report_says_what_each_mode_removed() {
        let mut report = Report::default();
        assert!(report.is_empty());
        assert_eq!(report.to_string(), "nothing of kpx was left");
        report.iptables.push(ToolCleanup {
            tool: "iptables-legacy".into(),
            skipped: Some("not installed".into()),
            ..Default::default()
        });
        report.ebpf = Some(EbpfCleanup {
            pin_dir: "/p".into(),
            skipped: Some("/p does not exist".into()),
            ..Default::default()
        });
        assert!(report.is_empty(), "skipped targets removed nothing");
        report.iptables.push(ToolCleanup {
            tool: "iptables-nft".into(),
            removed: vec![Leftovers {
                table: "nat".into(),
                chains: vec!["KPX-SERVICES".into(), "KPX-SVC-A".into()],
                jumps: vec!["-A OUTPUT -j KPX-SERVICES".into()],
            }],
            skipped: None,
        });
        report.ebpf = Some(EbpfCleanup {
            pin_dir: "/p".into(),
            links: vec!["tc-ingress-2".into()],
            maps: vec!["kpx_services".into()],
            dir_removed: true,
            skipped: None,
        });
        assert!(!report.is_empty());
        assert_eq!(
            report.to_string(),
            "iptables-nft: 2 chains, 1 jumps; ebpf /p: 1 links, 1 maps"
        );
        let mut ipvs_only = Report {
            ipvs: vec!["2 virtual servers".into(), "kpx-ipvs0".into()],
            ..Default::default()
        };
        assert!(!ipvs_only.is_empty());
        assert_eq!(ipvs_only.to_string(), "ipvs: 2 virtual servers, kpx-ipvs0");
        ipvs_only.ipvs.clear();
        assert!(ipvs_only.is_empty());
    }
}
