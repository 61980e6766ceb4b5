//! The flags: kube-proxy's (named as kube-proxy names them, each with its file field in the
//! help) and kpx's own backend flags. Both are `clap::Args`, flattened into the binary's parser.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::mode::ProxyMode;
use super::net::{ClusterCidrs, NodePortAddress};

/// kube-proxy's default ports (`pkg/cluster/ports`: ProxyHealthzPort, ProxyStatusPort).
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;

/// `IP:PORT`, or a bare IP that gets `default_port` (kube-proxy's `AppendPortIfNeeded`).
pub fn parse_bind_address(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| {
            "not an address (want IP:PORT or IP, e.g. 0.0.0.0:10256 or [::]:10256)".to_string()
        })
}

fn healthz_address(text: &str) -> Result<SocketAddr, String> {
    parse_bind_address(text, HEALTHZ_PORT)
}

fn metrics_address(text: &str) -> Result<SocketAddr, String> {
    parse_bind_address(text, METRICS_PORT)
}

/// `--ipvs-scheduler`: one of kube-proxy's IPVS schedulers, or "" for kube-proxy's default (rr).
pub fn ipvs_scheduler(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Ok(String::new());
    }
    crate::ipvs::config::check_scheduler(text).map(|()| text.to_string())
}

/// One `--ipvs-exclude-cidrs` entry.
pub fn exclude_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    text.trim()
        .parse::<ipnet::IpNet>()
        .map_err(|_| format!("{text:?}: not a CIDR (e.g. 198.18.0.0/24 or 2001:2::/64)"))
}

/// `--ipvs-sync-period`: kube-proxy requires it to be greater than 0.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match kpx_control::daemon::parse_duration(text)? {
        d if d.is_zero() => Err("must be greater than 0".into()),
        d => Ok(d),
    }
}

/// kube-proxy's flags. A flag given on the command line overrides the `--config` file; one
/// left at its default (or taken from its environment variable) does not (see
/// `Settings::resolve`).
#[derive(Debug, Clone, Args)]
pub struct KubeProxyFlags {
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1, as kubeadm's
    /// kube-proxy ConfigMap holds it in config.conf); flags given explicitly override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Write the effective configuration (the file, then the flags) to this file as a
    /// KubeProxyConfiguration, then exit.
    #[arg(long)]
    pub write_config_to: Option<PathBuf>,
    /// Which proxy mode to use (file: mode).
    #[arg(long, value_enum, default_value_t = ProxyMode::Iptables, global = true)]
    pub proxy_mode: ProxyMode,
    /// The pod network, one CIDR per IP family (comma-separated): traffic to a ClusterIP from
    /// outside it is masqueraded (file: clusterCIDR).
    #[arg(long)]
    pub cluster_cidr: Option<ClusterCidrs>,
    /// Masquerade all traffic sent to Service cluster IPs (file: iptables.masqueradeAll).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Conntrack accepts out-of-window TCP packets, so forwarded packets it marks INVALID are
    /// not dropped (file: conntrack.tcpBeLiberal; kpx does not set the sysctl itself).
    #[arg(long)]
    pub conntrack_tcp_be_liberal: bool,
    /// Where NodePorts answer: CIDRs (comma-separated, any family) or "primary" (the node's
    /// primary IPs); default: every local address (file: nodePortAddresses).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// The shortest time between two syncs, e.g. 1s, 500ms, 0s (file: iptables.minSyncPeriod).
    #[arg(long, default_value = "1s", value_parser = kpx_control::daemon::parse_duration)]
    pub min_sync_period: Duration,
    /// How often rules are checked and refreshed even without changes (file: iptables.syncPeriod).
    #[arg(long, default_value = "30s", value_parser = kpx_control::daemon::parse_duration)]
    pub sync_period: Duration,
    /// Address of /healthz and /livez (file: healthzBindAddress).
    #[arg(long, default_value = "127.0.0.1:10256", value_parser = healthz_address)]
    pub healthz_bind_address: SocketAddr,
    /// Address of /metrics (file: metricsBindAddress).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = metrics_address)]
    pub metrics_bind_address: SocketAddr,
    /// The name of this node (endpoints on it are local); defaults to the hostname
    /// (file: hostnameOverride).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Path to a kubeconfig file; without it and --master, the in-cluster config is used
    /// (file: clientConnection.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Exit when the health or metrics server cannot bind its address (file:
    /// bindAddressHardFail).
    #[arg(long)]
    pub bind_address_hard_fail: bool,
    /// The proxy process's oom_score_adj, -1000 to 1000; unset: left as inherited (file:
    /// oomScoreAdj).
    #[arg(long, value_parser = clap::value_parser!(i32).range(-1000..=1000), allow_hyphen_values = true)]
    pub oom_score_adj: Option<i32>,
    /// The node's addresses (one per family, comma-separated): its primary IPs for
    /// `--nodeport-addresses primary` and the masquerade source in ebpf mode; default: the
    /// Node object's, else the first address of each family on the node (file: bindAddress).
    #[arg(long, value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,
    #[command(flatten)]
    pub ipvs: IpvsFlags,
}

/// kube-proxy's `--ipvs-*` flags, named and defaulted as in its `cmd/kube-proxy/app/options.go`;
/// read in ipvs mode only.
#[derive(Debug, Clone, Args)]
pub struct IpvsFlags {
    /// The IPVS scheduler (file: ipvs.scheduler): rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed,
    /// nq or mh; empty: rr.
    #[arg(long, default_value = "", value_parser = ipvs_scheduler)]
    pub ipvs_scheduler: String,
    /// Strict ARP: arp_ignore=1 and arp_announce=2 in the node's namespace, so the node does not
    /// answer ARP for Service addresses (file: ipvs.strictARP).
    #[arg(long)]
    pub ipvs_strict_arp: bool,
    /// The timeout for idle IPVS TCP connections, 0 to leave as-is (file: ipvs.tcpTimeout).
    #[arg(long, default_value = "0s", value_parser = kpx_control::daemon::parse_duration)]
    pub ipvs_tcp_timeout: Duration,
    /// The timeout for IPVS TCP connections after a FIN, 0 to leave as-is (file:
    /// ipvs.tcpFinTimeout).
    #[arg(long, default_value = "0s", value_parser = kpx_control::daemon::parse_duration)]
    pub ipvs_tcpfin_timeout: Duration,
    /// The timeout for IPVS UDP packets, 0 to leave as-is (file: ipvs.udpTimeout).
    #[arg(long, default_value = "0s", value_parser = kpx_control::daemon::parse_duration)]
    pub ipvs_udp_timeout: Duration,
    /// CIDRs (comma-separated) whose virtual servers the IPVS mode never touches (file:
    /// ipvs.excludeCIDRs).
    #[arg(long, value_delimiter = ',', value_parser = exclude_cidr)]
    pub ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
    /// The shortest time between two IPVS syncs; in ipvs mode it overrides --min-sync-period
    /// (file: ipvs.minSyncPeriod).
    #[arg(long, default_value = "1s", value_parser = kpx_control::daemon::parse_duration)]
    pub ipvs_min_sync_period: Duration,
    /// How often IPVS rules are checked and refreshed even without changes, greater than 0; in
    /// ipvs mode it overrides --sync-period (file: ipvs.syncPeriod).
    #[arg(long, default_value = "30s", value_parser = positive_duration)]
    pub ipvs_sync_period: Duration,
}

/// kpx's own flags: how each backend finds its kernel pieces (no kube-proxy equivalent).
#[derive(Debug, Clone, Args)]
pub struct KpxFlags {
    /// ebpf: this instance's directory on a bpffs; its maps and links are pinned there, so a
    /// restarted proxy adopts them and traffic flows while it is down.
    #[arg(long, default_value = "/sys/fs/bpf/kpx", global = true)]
    pub bpf_pin_dir: PathBuf,
    /// ebpf: the cgroup v2 directory whose processes get socket-level load balancing
    /// (default: the cgroup v2 root; "none": per-packet load balancing only).
    #[arg(long, global = true)]
    pub cgroup_root: Option<String>,
    /// ebpf: a map's capacity, NAME=ENTRIES (repeatable), e.g. kpx_services=131072.
    #[arg(long = "bpf-map-size", value_name = "NAME=ENTRIES")]
    pub bpf_map_sizes: Vec<String>,
    /// Which iptables to drive: auto (the one already in use), nft or legacy.
    #[arg(long, default_value = "auto", global = true)]
    pub iptables_mode: String,
}
