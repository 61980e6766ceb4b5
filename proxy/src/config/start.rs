//! From [`Settings`] to a running backend: one small function per mode (the `start` of its
//! [`MODES`](super::MODES) entry), each building that backend's own config struct.

use std::path::PathBuf;

use kpx_ebpf::objects::Capacity;

use super::flags::KpxFlags;
use super::settings::Settings;
use super::ConfigError;
use crate::backend::{Backend, BackendError};
use crate::dual_stack::DualStack;
use crate::ebpf::{EbpfBackend, EbpfConfig};
use crate::iptables::exec::{Flavour, Tool};
use crate::iptables::render::RenderConfig;
use crate::iptables::IptablesBackend;

/// A mode's start function.
pub type StartFn = fn(&Settings, &KpxFlags) -> Result<Box<dyn Backend>, StartError>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("starting the {mode} backend: {source}")]
    Backend {
        mode: &'static str,
        #[source]
        source: BackendError,
    },
}

/// Starts the backend `settings.mode` names.
pub fn backend(settings: &Settings, kpx: &KpxFlags) -> Result<Box<dyn Backend>, StartError> {
    (settings.mode.spec().start)(settings, kpx)
}

/// The iptables render configuration of one family.
pub fn render_config(settings: &Settings, ipv6: bool) -> Result<RenderConfig, ConfigError> {
    Ok(RenderConfig {
        ipv6,
        cluster_cidr: settings
            .cluster_cidrs
            .of_family(ipv6)
            .map(ToString::to_string),
        masquerade_all: settings.masquerade_all,
        nodeport_addresses: settings
            .nodeport_cidrs()?
            .iter()
            .filter(|c| matches!(c, ipnet::IpNet::V6(_)) == ipv6)
            .map(ToString::to_string)
            .collect(),
        conntrack_tcp_be_liberal: settings.conntrack_tcp_be_liberal,
    })
}

/// The IPv4 and IPv6 iptables tools `--iptables-mode` names (auto: the flavour already in use).
pub fn iptables_tools(kpx: &KpxFlags) -> Result<(Tool, Tool), ConfigError> {
    let flavour = Flavour::parse(&kpx.iptables_mode).ok_or_else(|| {
        ConfigError::invalid(
            "--iptables-mode",
            kpx.iptables_mode.as_str(),
            "allowed values: auto, nft, legacy",
        )
    })?;
    let v4 = match flavour {
        Some(flavour) => Tool {
            flavour,
            ipv6: false,
        },
        None => Tool::detect(false),
    };
    // IPv6 follows IPv4's flavour: mixing nft and legacy on one node confuses every tool.
    let v6 = Tool {
        flavour: v4.flavour,
        ipv6: true,
    };
    Ok((v4, v6))
}

/// The iptables backend of each IP family this node can program: IPv4, and IPv6 too when
/// ip6tables works here (dual-stack, as kube-proxy runs when both families are usable).
pub fn iptables(settings: &Settings, kpx: &KpxFlags) -> Result<Box<dyn Backend>, StartError> {
    let (v4, v6) = iptables_tools(kpx)?;
    let secondary = match v6.unusable() {
        None => Some(IptablesBackend::new(v6, render_config(settings, true)?)),
        Some(why) => {
            tracing::warn!(reason = %why, "IPv6 Services are not programmed (IPv4 only)");
            None
        }
    };
    Ok(Box::new(DualStack::new(
        IptablesBackend::new(v4, render_config(settings, false)?),
        secondary,
    )))
}

/// The eBPF backend's configuration.
pub fn ebpf_config(settings: &Settings, kpx: &KpxFlags) -> Result<EbpfConfig, ConfigError> {
    let cgroup = match kpx.cgroup_root.as_deref() {
        Some("none") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => Some(kpx_control::netns::cgroup2_root().ok_or_else(|| {
            ConfigError::invalid(
                "--cgroup-root",
                "",
                "no cgroup v2 file system is mounted; give a cgroup v2 directory or \"none\"",
            )
        })?),
    };
    let mut capacity = Capacity::default();
    for entry in &kpx.bpf_map_sizes {
        let parsed = entry.split_once('=').and_then(|(name, size)| {
            let name = kpx_ebpf::objects::MAPS.iter().find(|m| **m == name)?;
            Some((*name, size.parse::<u32>().ok().filter(|s| *s > 0)?))
        });
        match parsed {
            Some(pair) => capacity.entries.push(pair),
            None => {
                return Err(ConfigError::invalid(
                    "--bpf-map-size",
                    entry.as_str(),
                    format!(
                        "want NAME=ENTRIES with ENTRIES > 0 and NAME one of {}",
                        kpx_ebpf::objects::MAPS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(EbpfConfig {
        pin_dir: kpx.bpf_pin_dir.clone(),
        cgroup,
        node_ips: settings.node_ips.clone(),
        nodeport_cidrs: settings
            .nodeport_cidrs()?
            .iter()
            .map(|c| (c.addr(), c.prefix_len()))
            .collect(),
        cluster_cidrs: [false, true]
            .into_iter()
            .filter_map(|ipv6| settings.cluster_cidrs.of_family(ipv6))
            .map(|c| (c.addr(), c.prefix_len()))
            .collect(),
        masquerade_all: settings.masquerade_all,
        capacity,
    })
}

pub fn ebpf(settings: &Settings, kpx: &KpxFlags) -> Result<Box<dyn Backend>, StartError> {
    let backend =
        EbpfBackend::start(ebpf_config(settings, kpx)?).map_err(|source| StartError::Backend {
            mode: "ebpf",
            source,
        })?;
    Ok(Box::new(backend))
}

pub fn nftables_config(
    settings: &Settings,
    ipv6: bool,
) -> Result<crate::nftables::render::RenderConfig, ConfigError> {
    let c = render_config(settings, ipv6)?;
    Ok(crate::nftables::render::RenderConfig {
        ipv6,
        cluster_cidr: c.cluster_cidr,
        masquerade_all: c.masquerade_all,
        nodeport_addresses: c.nodeport_addresses,
        conntrack_tcp_be_liberal: c.conntrack_tcp_be_liberal,
    })
}

/// One table per family; IPv6 when the kernel takes an `ip6` table (checked with a throwaway
/// transaction that creates nothing: `nft -c`).
pub fn nftables(settings: &Settings, _kpx: &KpxFlags) -> Result<Box<dyn Backend>, StartError> {
    use crate::nftables::NftablesBackend;
    let works = |family: &str| {
        std::process::Command::new("nft")
            .args(["-c", &format!("add table {family} kpx-probe")])
            .output()
    };
    match works("ip") {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(StartError::Backend {
                mode: "nftables",
                source: BackendError::Command {
                    command: "nft -c add table ip kpx-probe".into(),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                },
            })
        }
        Err(source) => {
            return Err(StartError::Backend {
                mode: "nftables",
                source: BackendError::Spawn {
                    command: "nft".into(),
                    source,
                },
            })
        }
    }
    let secondary = match works("ip6") {
        Ok(out) if out.status.success() => {
            Some(NftablesBackend::new(nftables_config(settings, true)?))
        }
        _ => {
            tracing::warn!(
                "nft cannot create an ip6 table here: IPv6 Services are not programmed (IPv4 only)"
            );
            None
        }
    };
    Ok(Box::new(DualStack::new(
        NftablesBackend::new(nftables_config(settings, false)?),
        secondary,
    )))
}

/// The IPVS backend's configuration of one family, its iptables part driven by `tool`.
pub fn ipvs_config(
    settings: &Settings,
    ipv6: bool,
    tool: Tool,
) -> Result<crate::ipvs::IpvsConfig, ConfigError> {
    let i = &settings.ipvs;
    // A scheduler from the file is checked when read and one from a flag when parsed; checked
    // once more here so no path hands the kernel a name it has no module for.
    crate::ipvs::config::check_scheduler(i.scheduler())
        .map_err(|why| ConfigError::invalid("--ipvs-scheduler", i.scheduler.as_str(), why))?;
    let c = render_config(settings, ipv6)?;
    Ok(crate::ipvs::IpvsConfig {
        plan: crate::ipvs::plan::PlanConfig {
            ipv6,
            cluster_cidr: c.cluster_cidr,
            masquerade_all: c.masquerade_all,
            nodeport_addresses: c.nodeport_addresses,
            scheduler: i.scheduler().to_string(),
            conntrack_tcp_be_liberal: c.conntrack_tcp_be_liberal,
        },
        iptables: tool,
        strict_arp: i.strict_arp,
        tcp_timeout: i.tcp_timeout,
        tcpfin_timeout: i.tcpfin_timeout,
        udp_timeout: i.udp_timeout,
        // Each family's instance only ever lists its own family's virtual servers.
        exclude_cidrs: i
            .exclude_cidrs
            .iter()
            .filter(|c| matches!(c, ipnet::IpNet::V6(_)) == ipv6)
            .copied()
            .collect(),
    })
}

/// One IPVS instance per family, IPv6 when ip6tables works here (its iptables part needs it),
/// started by the backend, which probes IPVS first.
pub fn ipvs(settings: &Settings, kpx: &KpxFlags) -> Result<Box<dyn Backend>, StartError> {
    let (v4, v6) = iptables_tools(kpx)?;
    let secondary = match v6.unusable() {
        None => Some(ipvs_config(settings, true, v6)?),
        Some(why) => {
            tracing::warn!(reason = %why, "IPv6 Services are not programmed (IPv4 only)");
            None
        }
    };
    crate::ipvs::start(ipvs_config(settings, false, v4)?, secondary).map_err(|source| {
        StartError::Backend {
            mode: "ipvs",
            source,
        }
    })
}
