//! The proxy modes, as a table: adding a mode (ipvs, nftables) is one `ProxyMode` variant and
//! one `MODES` entry (its name, what it needs from the kernel, which configuration section
//! holds its periods, and how to start it).

use clap::ValueEnum;

use super::start::{self, StartFn};

/// `--proxy-mode` / `mode`. The names are kube-proxy's where kube-proxy has the mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, ValueEnum)]
pub enum ProxyMode {
    /// iptables-restore of kube-proxy's chain layout (nft or legacy flavour).
    #[default]
    Iptables,
    /// BPF programs: socket-level and tc per-packet load balancing.
    Ebpf,
    /// kpx's own nftables table per family (kube-proxy's successor mode).
    Nftables,
    /// Kernel IPVS virtual servers per frontend, with ipsets and a small iptables part.
    Ipvs,
}

/// Which `KubeProxyConfiguration` section holds a mode's `syncPeriod`, `minSyncPeriod` and
/// `masqueradeAll`: kube-proxy's conversion reads the ipvs and nftables sections for those
/// modes and the iptables section for every other mode (kpx's ebpf included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Iptables,
    Ipvs,
    Nftables,
}

/// One proxy mode.
pub struct ModeSpec {
    pub mode: ProxyMode,
    /// What the kernel and the node must provide (for errors and the README).
    pub needs: &'static str,
    pub section: Section,
    /// Builds and starts the backend from the effective settings.
    pub start: StartFn,
}

/// Every mode kpx-proxy runs.
pub const MODES: &[ModeSpec] = &[
    ModeSpec {
        mode: ProxyMode::Iptables,
        needs: "iptables-restore (nft or legacy) in PATH and the nat and filter tables; ip6tables for IPv6 Services",
        section: Section::Iptables,
        start: start::iptables,
    },
    ModeSpec {
        mode: ProxyMode::Ebpf,
        needs: "kernel 6.6 or newer with BTF, a bpffs for the pins, and a cgroup v2 mount for socket-level load balancing",
        section: Section::Iptables,
        start: start::ebpf,
    },
    ModeSpec {
        mode: ProxyMode::Nftables,
        needs: "nft (nftables 1.0 or newer) in PATH and a kernel with nf_tables, nat and fib; IPv6 Services need the ip6 family",
        section: Section::Nftables,
        start: start::nftables,
    },
    ModeSpec {
        mode: ProxyMode::Ipvs,
        needs: "kernel IPVS (ip_vs and the scheduler's module), ipset and iptables (nft or legacy) in PATH, and a `dummy` link type for kpx-ipvs0",
        section: Section::Ipvs,
        start: start::ipvs,
    },
];

impl ProxyMode {
    /// The mode's name, as `--proxy-mode` and `mode` spell it.
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ebpf => "ebpf",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ipvs => "ipvs",
        }
    }

    /// The mode's entry in [`MODES`].
    pub fn spec(self) -> &'static ModeSpec {
        MODES.iter().find(|m| m.mode == self).unwrap_or(&MODES[0])
    }

    /// A `mode` field's value; "" is kube-proxy's default (iptables on Linux).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self::default());
        }
        if let Some(mode) = Self::value_variants().iter().find(|m| m.name() == text) {
            return Ok(*mode);
        }
        let allowed = Self::allowed();
        Err(match text {
            "kernelspace" => format!("Windows only (allowed: {allowed})"),
            _ => format!("unknown proxy mode (allowed: {allowed})"),
        })
    }

    /// The allowed values, comma-separated.
    pub fn allowed() -> String {
        Self::value_variants()
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_one_table_entry_and_clap_spells_it_as_the_file_does() {
        for mode in ProxyMode::value_variants() {
            assert_eq!(
                MODES.iter().filter(|m| m.mode == *mode).count(),
                1,
                "{mode:?}"
            );
            let clap_name = mode.to_possible_value().map(|v| v.get_name().to_string());
            assert_eq!(clap_name.as_deref(), Some(mode.name()));
            assert_eq!(ProxyMode::parse(mode.name()), Ok(*mode));
        }
        assert_eq!(ProxyMode::parse(""), Ok(ProxyMode::Iptables));
        assert_eq!(ProxyMode::parse("ipvs"), Ok(ProxyMode::Ipvs));
        assert_eq!(ProxyMode::Ipvs.spec().section, Section::Ipvs);
        assert_eq!(
            ProxyMode::parse("kernelspace"),
            Err("Windows only (allowed: iptables, ebpf, nftables, ipvs)".into())
        );
        assert!(ProxyMode::parse("userspace")
            .expect_err("unknown")
            .contains("allowed: iptables, ebpf, nftables, ipvs"));
    }
}
