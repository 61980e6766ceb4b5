//! The effective configuration: kpx's defaults, then the `--config` file, then every flag given
//! on the command line, and back out as a file for `--write-config-to`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{self, GoDuration, KubeProxyConfiguration, Unimplemented};
use super::flags::{parse_bind_address, KubeProxyFlags, HEALTHZ_PORT, METRICS_PORT};
use super::mode::{ProxyMode, Section};
use super::net::{ClusterCidrs, NodePortAddress, NodePortAddresses};
use super::ConfigError;

/// What kpx-proxy runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: ProxyMode,
    pub cluster_cidrs: ClusterCidrs,
    pub nodeport_addresses: NodePortAddresses,
    pub masquerade_all: bool,
    /// `--conntrack-tcp-be-liberal` / `conntrack.tcpBeLiberal`: forwarded packets conntrack
    /// marks INVALID are not dropped (kube-proxy then leaves its drop rule out).
    pub conntrack_tcp_be_liberal: bool,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    /// `bindAddressHardFail`: a health or metrics server that cannot bind stops the proxy.
    pub bind_address_hard_fail: bool,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// The node's primary IPs (`--node-ip`, or `bindAddress`).
    pub node_ips: Vec<IpAddr>,
    /// `oomScoreAdj`, applied to the proxy's own process when set.
    pub oom_score_adj: Option<i32>,
    /// kube-proxy's IPVS settings (`--ipvs-*`, the file's `ipvs` section), used in ipvs mode.
    pub ipvs: IpvsSettings,
    /// The file as read (every field kpx does not act on is written back unchanged).
    pub file: Option<KubeProxyConfiguration>,
}

/// The IPVS mode's own settings (its periods are `Settings::{sync_period, min_sync_period}`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpvsSettings {
    /// `--ipvs-scheduler` / `ipvs.scheduler`, checked against kube-proxy's schedulers; "" is
    /// kube-proxy's default, rr.
    pub scheduler: String,
    pub strict_arp: bool,
    /// Zero: the kernel's value is left as it is.
    pub tcp_timeout: Duration,
    pub tcpfin_timeout: Duration,
    pub udp_timeout: Duration,
    pub exclude_cidrs: Vec<ipnet::IpNet>,
}

impl IpvsSettings {
    /// The scheduler the backend is given: "" is rr, as in kube-proxy.
    pub fn scheduler(&self) -> &str {
        if self.scheduler.is_empty() {
            "rr"
        } else {
            &self.scheduler
        }
    }
}

impl Settings {
    /// The flags' defaults, as if neither a file nor a flag had been given.
    pub fn defaults() -> Self {
        Self {
            mode: ProxyMode::default(),
            cluster_cidrs: ClusterCidrs::default(),
            nodeport_addresses: NodePortAddresses::default(),
            masquerade_all: false,
            conntrack_tcp_be_liberal: false,
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            healthz_bind_address: SocketAddr::from(([127, 0, 0, 1], HEALTHZ_PORT)),
            metrics_bind_address: SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
            bind_address_hard_fail: false,
            hostname_override: None,
            kubeconfig: None,
            node_ips: Vec::new(),
            oom_score_adj: None,
            ipvs: IpvsSettings::default(),
            file: None,
        }
    }

    /// The effective settings: defaults, then `flags.config`'s file if given, then each flag
    /// `given` says was set on the command line. Returns
    /// the file's fields kpx does not implement, for one warning each.
    ///
    /// kube-proxy documents most flags as "ignored if a config file is specified by
    /// --config" (only --hostname-override, --master and logging flags override it); kpx lets
    /// every explicitly given flag win instead, so a flag is never silently dropped.
    pub fn resolve(
        flags: &KubeProxyFlags,
        given: impl Fn(&str) -> bool,
    ) -> Result<(Self, Vec<Unimplemented>), ConfigError> {
        let mut settings = Self::defaults();
        let mut unimplemented = Vec::new();
        if let Some(path) = &flags.config {
            let file = read_file(path)?;
            unimplemented = settings.apply_file(file)?;
        }
        settings.apply_flags(flags, given)?;
        // Which sections are another mode's depends on the mode a flag may have changed.
        if let Some(file) = &settings.file {
            unimplemented = file::unimplemented_fields(file, settings.mode);
        }
        Ok((settings, unimplemented))
    }

    /// Overlays a file's fields. kube-proxy's defaulting reads a zero duration and an empty
    /// string as "unset", so those leave the current value.
    pub fn apply_file(
        &mut self,
        c: KubeProxyConfiguration,
    ) -> Result<Vec<Unimplemented>, ConfigError> {
        let api_version = c.api_version.as_deref().unwrap_or("");
        if api_version != file::API_VERSION {
            return Err(ConfigError::invalid(
                "apiVersion",
                api_version,
                format!("kpx reads {}", file::API_VERSION),
            ));
        }
        let kind = c.kind.as_deref().unwrap_or("");
        if kind != file::KIND {
            return Err(ConfigError::invalid(
                "kind",
                kind,
                format!("want {}", file::KIND),
            ));
        }
        let mut next = self.clone();
        if let Some(mode) = c.mode.as_deref() {
            next.mode =
                ProxyMode::parse(mode).map_err(|why| ConfigError::invalid("mode", mode, why))?;
        }
        match c.detect_local_mode.as_deref().unwrap_or("") {
            "" | "ClusterCIDR" => {}
            other @ ("NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix") => {
                return Err(ConfigError::invalid(
                    "detectLocalMode",
                    other,
                    "kpx tells pod traffic by clusterCIDR only (allowed: ClusterCIDR); another mode would masquerade different traffic than asked",
                ))
            }
            other => {
                return Err(ConfigError::invalid(
                    "detectLocalMode",
                    other,
                    "allowed: ClusterCIDR (kube-proxy also knows NodeCIDR, BridgeInterface, InterfaceNamePrefix)",
                ))
            }
        }
        if let Some(text) = c.cluster_cidr.as_deref().filter(|t| !t.is_empty()) {
            next.cluster_cidrs = text.parse().map_err(|why: String| {
                ConfigError::invalid(
                    "clusterCIDR",
                    text,
                    why.trim_start_matches(&format!("{text:?}: ")).to_string(),
                )
            })?;
        }
        if let Some(list) = c.node_port_addresses.as_ref().filter(|l| !l.is_empty()) {
            let entries = list
                .iter()
                .map(|e| e.parse::<NodePortAddress>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| ConfigError::invalid("nodePortAddresses", list.join(","), why))?;
            next.nodeport_addresses = NodePortAddresses::new(entries)
                .map_err(|why| ConfigError::invalid("nodePortAddresses", list.join(","), why))?;
        }
        // The mode's own section, as kube-proxy's v1alpha1 conversion picks it.
        let (sync, min_sync, masquerade_all) = match next.mode.spec().section {
            Section::Iptables => c.iptables.as_ref().map_or((None, None, None), |s| {
                (s.sync_period, s.min_sync_period, s.masquerade_all)
            }),
            Section::Nftables => c.nftables.as_ref().map_or((None, None, None), |s| {
                (s.sync_period, s.min_sync_period, s.masquerade_all)
            }),
            // The ipvs section has no masqueradeAll: kube-proxy's conversion reads the
            // iptables section's for every mode but nftables.
            Section::Ipvs => c.ipvs.as_ref().map_or((None, None, None), |s| {
                (
                    s.sync_period,
                    s.min_sync_period,
                    c.iptables.as_ref().and_then(|i| i.masquerade_all),
                )
            }),
        };
        if let Some(GoDuration(d)) = sync.filter(|d| !d.is_zero()) {
            next.sync_period = d;
        }
        if let Some(GoDuration(d)) = min_sync.filter(|d| !d.is_zero()) {
            next.min_sync_period = d;
        }
        if let Some(all) = masquerade_all {
            next.masquerade_all = all;
        }
        if let Some(liberal) = c.conntrack.as_ref().and_then(|ct| ct.tcp_be_liberal) {
            next.conntrack_tcp_be_liberal = liberal;
        }
        if let Some(text) = c.healthz_bind_address.as_deref().filter(|t| !t.is_empty()) {
            next.healthz_bind_address = parse_bind_address(text, HEALTHZ_PORT)
                .map_err(|why| ConfigError::invalid("healthzBindAddress", text, why))?;
        }
        if let Some(text) = c.metrics_bind_address.as_deref().filter(|t| !t.is_empty()) {
            next.metrics_bind_address = parse_bind_address(text, METRICS_PORT)
                .map_err(|why| ConfigError::invalid("metricsBindAddress", text, why))?;
        }
        if let Some(hard) = c.bind_address_hard_fail {
            next.bind_address_hard_fail = hard;
        }
        if let Some(name) = c.hostname_override.as_deref().filter(|t| !t.is_empty()) {
            next.hostname_override = Some(name.to_string());
        }
        if let Some(path) = c
            .client_connection
            .as_ref()
            .and_then(|cc| cc.kubeconfig.as_deref())
            .filter(|t| !t.is_empty())
        {
            next.kubeconfig = Some(PathBuf::from(path));
        }
        // kube-proxy: bindAddress overrides its idea of the node's primary IP; 0.0.0.0 and ::
        // (kubeadm writes 0.0.0.0) mean "not overridden".
        if let Some(text) = c.bind_address.as_deref().filter(|t| !t.is_empty()) {
            let ip: IpAddr = text.parse().map_err(|_| {
                ConfigError::invalid("bindAddress", text, "not an IP address (e.g. 10.0.0.5)")
            })?;
            if !ip.is_unspecified() {
                next.node_ips = vec![ip];
            }
        }
        if let Some(adj) = c.oom_score_adj {
            if !(-1000..=1000).contains(&adj) {
                return Err(ConfigError::invalid(
                    "oomScoreAdj",
                    adj.to_string(),
                    "must be -1000 to 1000",
                ));
            }
            next.oom_score_adj = Some(adj);
        }
        if let Some(ipvs) = &c.ipvs {
            next.ipvs.apply_file(ipvs)?;
        }
        let unimplemented = file::unimplemented_fields(&c, next.mode);
        next.file = Some(c);
        *self = next;
        Ok(unimplemented)
    }

    /// Overlays each flag `given` names (by its clap id, the field name).
    pub fn apply_flags(
        &mut self,
        flags: &KubeProxyFlags,
        given: impl Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        if given("proxy_mode") {
            self.mode = flags.proxy_mode;
        }
        if given("cluster_cidr") {
            self.cluster_cidrs = flags.cluster_cidr.clone().unwrap_or_default();
        }
        if given("masquerade_all") {
            self.masquerade_all = flags.masquerade_all;
        }
        if given("conntrack_tcp_be_liberal") {
            self.conntrack_tcp_be_liberal = flags.conntrack_tcp_be_liberal;
        }
        if given("nodeport_addresses") {
            self.nodeport_addresses = NodePortAddresses::new(flags.nodeport_addresses.clone())
                .map_err(|why| {
                    let value: Vec<String> = flags
                        .nodeport_addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    ConfigError::invalid("--nodeport-addresses", value.join(","), why)
                })?;
        }
        if given("min_sync_period") {
            self.min_sync_period = flags.min_sync_period;
        }
        if given("sync_period") {
            self.sync_period = flags.sync_period;
        }
        if given("healthz_bind_address") {
            self.healthz_bind_address = flags.healthz_bind_address;
        }
        if given("metrics_bind_address") {
            self.metrics_bind_address = flags.metrics_bind_address;
        }
        if given("hostname_override") {
            self.hostname_override = flags.hostname_override.clone();
        }
        // $KUBECONFIG (the flag's env fallback) only fills in what the file left unset:
        // kube-proxy does not read it at all, so it must not override a file.
        if given("kubeconfig") || self.kubeconfig.is_none() {
            self.kubeconfig = flags.kubeconfig.clone();
        }
        if given("bind_address_hard_fail") {
            self.bind_address_hard_fail = flags.bind_address_hard_fail;
        }
        if given("oom_score_adj") {
            self.oom_score_adj = flags.oom_score_adj;
        }
        if given("node_ip") {
            self.node_ips = flags.node_ip.clone();
        }
        let ipvs = &flags.ipvs;
        if given("ipvs_scheduler") {
            self.ipvs.scheduler = ipvs.ipvs_scheduler.clone();
        }
        if given("ipvs_strict_arp") {
            self.ipvs.strict_arp = ipvs.ipvs_strict_arp;
        }
        if given("ipvs_tcp_timeout") {
            self.ipvs.tcp_timeout = ipvs.ipvs_tcp_timeout;
        }
        if given("ipvs_tcpfin_timeout") {
            self.ipvs.tcpfin_timeout = ipvs.ipvs_tcpfin_timeout;
        }
        if given("ipvs_udp_timeout") {
            self.ipvs.udp_timeout = ipvs.ipvs_udp_timeout;
        }
        if given("ipvs_exclude_cidrs") {
            self.ipvs.exclude_cidrs = ipvs.ipvs_exclude_cidrs.clone();
        }
        // kube-proxy: the ipvs-specific periods win over --sync-period/--min-sync-period in
        // ipvs mode only (`processV1Alpha1Flags`); in other modes they are not read.
        if self.mode == ProxyMode::Ipvs {
            if given("ipvs_min_sync_period") {
                self.min_sync_period = ipvs.ipvs_min_sync_period;
            }
            if given("ipvs_sync_period") {
                self.sync_period = ipvs.ipvs_sync_period;
            }
        }
        Ok(())
    }

    /// The CIDRs NodePorts answer on (empty: every address), `primary` resolved.
    pub fn nodeport_cidrs(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.nodeport_addresses
            .cidrs(&self.node_ips)
            .map_err(|why| {
                ConfigError::invalid(
                    "nodePortAddresses",
                    self.nodeport_addresses.to_string(),
                    why,
                )
            })
    }

    /// The effective configuration as a KubeProxyConfiguration: the file as read (or an
    /// empty one), with every field kpx implements set to its effective value.
    pub fn to_file(&self) -> KubeProxyConfiguration {
        let mut c = self.file.clone().unwrap_or_default();
        c.api_version = Some(file::API_VERSION.to_string());
        c.kind = Some(file::KIND.to_string());
        c.mode = Some(self.mode.name().to_string());
        c.cluster_cidr = Some(self.cluster_cidrs.to_string());
        c.detect_local_mode = Some("ClusterCIDR".to_string());
        c.node_port_addresses = (!self.nodeport_addresses.0.is_empty()).then(|| {
            self.nodeport_addresses
                .0
                .iter()
                .map(ToString::to_string)
                .collect()
        });
        let (sync, min_sync) = (
            Some(GoDuration(self.sync_period)),
            Some(GoDuration(self.min_sync_period)),
        );
        match self.mode.spec().section {
            Section::Iptables => {
                let s = c.iptables.get_or_insert_with(Default::default);
                s.sync_period = sync;
                s.min_sync_period = min_sync;
                s.masquerade_all = Some(self.masquerade_all);
            }
            Section::Nftables => {
                let s = c.nftables.get_or_insert_with(Default::default);
                s.sync_period = sync;
                s.min_sync_period = min_sync;
                s.masquerade_all = Some(self.masquerade_all);
            }
            Section::Ipvs => {
                let s = c.ipvs.get_or_insert_with(Default::default);
                s.sync_period = sync;
                s.min_sync_period = min_sync;
                c.iptables
                    .get_or_insert_with(Default::default)
                    .masquerade_all = Some(self.masquerade_all);
            }
        }
        // The ipvs section's other fields: effective in ipvs mode, and whenever they were set
        // (a file read in another mode keeps them as written when they are the defaults).
        if self.mode == ProxyMode::Ipvs || self.ipvs != IpvsSettings::default() {
            let s = c.ipvs.get_or_insert_with(Default::default);
            let i = &self.ipvs;
            s.scheduler = Some(i.scheduler.clone());
            s.strict_arp = Some(i.strict_arp);
            s.tcp_timeout = Some(GoDuration(i.tcp_timeout));
            s.tcp_fin_timeout = Some(GoDuration(i.tcpfin_timeout));
            s.udp_timeout = Some(GoDuration(i.udp_timeout));
            s.exclude_cidrs = (!i.exclude_cidrs.is_empty())
                .then(|| i.exclude_cidrs.iter().map(ToString::to_string).collect());
        }
        c.conntrack
            .get_or_insert_with(Default::default)
            .tcp_be_liberal = Some(self.conntrack_tcp_be_liberal);
        c.healthz_bind_address = Some(self.healthz_bind_address.to_string());
        c.metrics_bind_address = Some(self.metrics_bind_address.to_string());
        c.bind_address_hard_fail = Some(self.bind_address_hard_fail);
        c.hostname_override = Some(self.hostname_override.clone().unwrap_or_default());
        c.client_connection
            .get_or_insert_with(Default::default)
            .kubeconfig = Some(
            self.kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        // bindAddress holds one IP: the first node IP (a second family's is not expressible).
        c.bind_address = Some(
            self.node_ips
                .first()
                .map_or_else(|| "0.0.0.0".to_string(), ToString::to_string),
        );
        c.oom_score_adj = self.oom_score_adj;
        c
    }

    /// `--write-config-to`: the effective configuration as YAML.
    pub fn write_file(&self, path: &Path) -> Result<(), ConfigError> {
        let text = to_yaml(&self.to_file());
        std::fs::write(path, text).map_err(|source| ConfigError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

impl IpvsSettings {
    /// Overlays the file's `ipvs` section (zero durations and "" are kube-proxy's "unset").
    /// Checked whatever the mode, so a bad value is named before anyone switches to ipvs.
    fn apply_file(&mut self, s: &file::Ipvs) -> Result<(), ConfigError> {
        if let Some(name) = s.scheduler.as_deref().filter(|t| !t.is_empty()) {
            crate::ipvs::config::check_scheduler(name)
                .map_err(|why| ConfigError::invalid("ipvs.scheduler", name, why))?;
            self.scheduler = name.to_string();
        }
        if let Some(strict) = s.strict_arp {
            self.strict_arp = strict;
        }
        for (value, into) in [
            (s.tcp_timeout, &mut self.tcp_timeout),
            (s.tcp_fin_timeout, &mut self.tcpfin_timeout),
            (s.udp_timeout, &mut self.udp_timeout),
        ] {
            if let Some(GoDuration(d)) = value.filter(|d| !d.is_zero()) {
                *into = d;
            }
        }
        if let Some(list) = s.exclude_cidrs.as_ref().filter(|l| !l.is_empty()) {
            self.exclude_cidrs = list
                .iter()
                .map(|e| super::flags::exclude_cidr(e))
                .collect::<Result<_, _>>()
                .map_err(|why| ConfigError::invalid("ipvs.excludeCIDRs", list.join(","), why))?;
        }
        Ok(())
    }
}

/// A KubeProxyConfiguration as YAML.
pub fn to_yaml(c: &KubeProxyConfiguration) -> String {
    // Serialising plain structs of strings, numbers and maps cannot fail.
    serde_yaml::to_string(c).unwrap_or_default()
}

/// Parses a KubeProxyConfiguration; `path` only names the source in errors.
pub fn parse_file(path: &str, text: &str) -> Result<KubeProxyConfiguration, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })
}

/// Reads and parses a `--config` file.
pub fn read_file(path: &Path) -> Result<KubeProxyConfiguration, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_file(&path.display().to_string(), &text)
}

/// The `config.conf` key of a kube-proxy ConfigMap, as `kubectl -n kube-system get configmap
/// kube-proxy -o yaml` prints it (kubeadm's layout), for tools and tests that start from it.
pub fn config_conf_of_configmap(configmap_yaml: &str) -> Result<String, ConfigError> {
    let cm: serde_yaml::Value =
        serde_yaml::from_str(configmap_yaml).map_err(|e| ConfigError::Parse {
            path: "ConfigMap".into(),
            message: e.to_string(),
        })?;
    cm["data"]["config.conf"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ConfigError::Parse {
            path: "ConfigMap".into(),
            message: "no data.config.conf (kubeadm's kube-proxy ConfigMap has it)".into(),
        })
}
