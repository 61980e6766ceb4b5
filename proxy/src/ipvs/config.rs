//! The IPVS backend's configuration, one per IP family, as `config::start` builds it from
//! kube-proxy's flags (`--ipvs-*`) and the `ipvs` section of a KubeProxyConfiguration.

use std::time::Duration;

use super::plan::PlanConfig;
use crate::netfilter::Tool;

/// kube-proxy's IPVS schedulers (`--ipvs-scheduler`; the kernel module is `ip_vs_NAME`).
pub const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh",
];

#[derive(Debug, Clone)]
pub struct IpvsConfig {
    /// What the plan needs (family, cluster CIDR, masquerade-all, NodePort addresses,
    /// scheduler, conntrack liberal).
    pub plan: PlanConfig,
    /// The family's iptables (the small iptables part), nft or legacy.
    pub iptables: Tool,
    /// `--ipvs-strict-arp`: `arp_ignore=1`, `arp_announce=2` in the node's namespace, so the
    /// node does not answer ARP for the Service addresses on the dummy interface.
    pub strict_arp: bool,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`; zero leaves the
    /// kernel's value.
    pub tcp_timeout: Duration,
    pub tcpfin_timeout: Duration,
    pub udp_timeout: Duration,
    /// `--ipvs-exclude-cidrs`: virtual servers on these addresses are never touched.
    pub exclude_cidrs: Vec<ipnet::IpNet>,
}

/// Why `name` is not a scheduler kpx accepts, if it is not.
pub fn check_scheduler(name: &str) -> Result<(), String> {
    if SCHEDULERS.contains(&name) {
        Ok(())
    } else {
        Err(format!("allowed values: {}", SCHEDULERS.join(", ")))
    }
}
