//! `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`), the file kube-proxy reads
//! with `--config` and kubeadm keeps in the `kube-proxy` ConfigMap (key `config.conf`).
//!
//! Field names and shapes follow upstream `staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go`;
//! fields are alphabetical, as kube-proxy writes them. Every field is optional, and `null`
//! reads as unset, so kubeadm's output (which writes every field, most of them empty) parses.
//! Unknown fields are refused by name, as kube-proxy's strict decoding does (kube-proxy then
//! retries leniently for v1alpha1 with a warning; kpx does not, so a typo cannot silently
//! change nothing).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::mode::ProxyMode;

/// The API version kube-proxy reads.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub client_connection: Option<ClientConnection>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub config_sync_period: Option<GoDuration>,
    pub conntrack: Option<Conntrack>,
    pub detect_local: Option<DetectLocal>,
    pub detect_local_mode: Option<String>,
    pub enable_profiling: Option<bool>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub healthz_bind_address: Option<String>,
    pub hostname_override: Option<String>,
    pub iptables: Option<Iptables>,
    pub ipvs: Option<Ipvs>,
    pub kind: Option<String>,
    pub logging: Option<Logging>,
    pub metrics_bind_address: Option<String>,
    pub mode: Option<String>,
    pub nftables: Option<Nftables>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub port_range: Option<String>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub windows_run_as_service: Option<bool>,
    pub winkernel: Option<Winkernel>,
}

/// componentbaseconfig's `ClientConnectionConfiguration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ClientConnection {
    pub accept_content_types: Option<String>,
    pub burst: Option<i32>,
    pub content_type: Option<String>,
    pub kubeconfig: Option<String>,
    pub qps: Option<f32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_be_liberal: Option<bool>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Iptables {
    pub localhost_node_ports: Option<bool>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: Option<GoDuration>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Ipvs {
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub tcp_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Nftables {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: Option<GoDuration>,
    pub sync_period: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Winkernel {
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub forward_health_check_vip: Option<bool>,
    pub network_name: Option<String>,
    pub root_hns_endpoint_name: Option<String>,
    pub source_vip: Option<String>,
}

/// component-base's `LoggingConfiguration`; its inner options stay as written (kpx logs
/// through `RUST_LOG`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Logging {
    pub flush_frequency: Option<serde_yaml::Value>,
    pub format: Option<String>,
    pub options: Option<serde_yaml::Value>,
    pub verbosity: Option<serde_yaml::Value>,
    pub vmodule: Option<serde_yaml::Value>,
}

/// A `metav1.Duration`: Go's duration text (`30s`, `1m0s`, `500ms`), written back as Go's
/// `Duration.String()` writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_go_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        kpx_control::daemon::parse_duration(&text)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Go's `time.Duration.String()`: `0s`, `500ms`, `1.5s`, `1m0s`, `24h0m0s`.
pub fn format_go_duration(d: Duration) -> String {
    fn trim(mut s: String) -> String {
        if s.contains('.') {
            while s.ends_with('0') {
                s.pop();
            }
            if s.ends_with('.') {
                s.pop();
            }
        }
        s
    }
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}\u{b5}s", trim(format!("{:.3}", nanos as f64 / 1e3)));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim(format!("{:.6}", nanos as f64 / 1e6)));
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let frac = d.subsec_nanos();
    let seconds = if frac == 0 {
        format!("{s}s")
    } else {
        format!("{}s", trim(format!("{s}.{frac:09}")))
    };
    match (h, m) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

/// A field kube-proxy knows that kpx accepts but does not act on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unimplemented {
    /// The field's path in the file, e.g. `ipvs.scheduler`.
    pub field: String,
    pub why: &'static str,
}

fn set_str(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|s| !s.is_empty())
}
fn set_true(v: &Option<bool>) -> bool {
    *v == Some(true)
}
fn set_duration(v: &Option<GoDuration>) -> bool {
    v.is_some_and(|d| !d.is_zero())
}
/// Logging values kubeadm writes as `0` / `"0"` / `{}` mean "as default".
fn set_value(v: &Option<serde_yaml::Value>) -> bool {
    use serde_yaml::Value;
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty() && s != "0" && s != "0s",
        Some(Value::Mapping(m)) => !m.is_empty(),
        Some(Value::Sequence(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

const CONNTRACK: &str =
    "kpx does not set the kernel's nf_conntrack sysctls; the node's values stay in force";
const OTHER_MODE: &str = "only read in another proxy mode";
const WINDOWS: &str = "Windows only";

/// Every field set (to something other than its empty value) that kpx does not implement in
/// `mode`, so the proxy can warn once per field: the `ipvs` and `nftables` sections count as
/// implemented in their own mode only. kubeadm's default file, which writes every field empty
/// or null, yields none.
pub fn unimplemented_fields(c: &KubeProxyConfiguration, mode: ProxyMode) -> Vec<Unimplemented> {
    let mut out = Vec::new();
    let mut add = |set: bool, field: &str, why: &'static str| {
        if set {
            out.push(Unimplemented {
                field: field.to_string(),
                why,
            });
        }
    };
    if let Some(cc) = &c.client_connection {
        let why = "kpx's client chooses its own content types";
        add(
            set_str(&cc.accept_content_types),
            "clientConnection.acceptContentTypes",
            why,
        );
        add(
            set_str(&cc.content_type),
            "clientConnection.contentType",
            why,
        );
    }
    add(
        set_duration(&c.config_sync_period),
        "configSyncPeriod",
        "kpx's watches have no periodic resync; a 410 Gone re-lists",
    );
    if let Some(ct) = &c.conntrack {
        add(
            ct.max_per_core.is_some_and(|v| v != 0),
            "conntrack.maxPerCore",
            CONNTRACK,
        );
        add(ct.min.is_some_and(|v| v != 0), "conntrack.min", CONNTRACK);
        add(
            set_duration(&ct.tcp_close_wait_timeout),
            "conntrack.tcpCloseWaitTimeout",
            CONNTRACK,
        );
        add(
            set_duration(&ct.tcp_established_timeout),
            "conntrack.tcpEstablishedTimeout",
            CONNTRACK,
        );
        add(
            set_duration(&ct.udp_stream_timeout),
            "conntrack.udpStreamTimeout",
            CONNTRACK,
        );
        add(
            set_duration(&ct.udp_timeout),
            "conntrack.udpTimeout",
            CONNTRACK,
        );
    }
    if let Some(dl) = &c.detect_local {
        let why = "only read with detectLocalMode BridgeInterface or InterfaceNamePrefix, which kpx refuses";
        add(
            set_str(&dl.bridge_interface),
            "detectLocal.bridgeInterface",
            why,
        );
        add(
            set_str(&dl.interface_name_prefix),
            "detectLocal.interfaceNamePrefix",
            why,
        );
    }
    add(
        set_true(&c.enable_profiling),
        "enableProfiling",
        "kpx serves no /debug/pprof",
    );
    if let Some(ipt) = &c.iptables {
        add(
            set_true(&ipt.localhost_node_ports),
            "iptables.localhostNodePorts",
            "kpx never serves NodePorts on 127.0.0.1 (it does not set route_localnet)",
        );
        add(
            ipt.masquerade_bit.is_some(),
            "iptables.masqueradeBit",
            "kpx's chains use their own fixed masquerade mark",
        );
        add(
            set_true(&ipt.snat_node_internal_ip),
            "iptables.snatNodeInternalIP",
            "kpx masquerades to the egress interface's address",
        );
    }
    if let Some(ipvs) = c.ipvs.as_ref().filter(|_| mode != ProxyMode::Ipvs) {
        add(
            ipvs.exclude_cidrs.as_ref().is_some_and(|v| !v.is_empty()),
            "ipvs.excludeCIDRs",
            OTHER_MODE,
        );
        add(
            set_duration(&ipvs.min_sync_period),
            "ipvs.minSyncPeriod",
            OTHER_MODE,
        );
        add(set_str(&ipvs.scheduler), "ipvs.scheduler", OTHER_MODE);
        add(set_true(&ipvs.strict_arp), "ipvs.strictARP", OTHER_MODE);
        add(
            set_duration(&ipvs.sync_period),
            "ipvs.syncPeriod",
            OTHER_MODE,
        );
        add(
            set_duration(&ipvs.tcp_fin_timeout),
            "ipvs.tcpFinTimeout",
            OTHER_MODE,
        );
        add(
            set_duration(&ipvs.tcp_timeout),
            "ipvs.tcpTimeout",
            OTHER_MODE,
        );
        add(
            set_duration(&ipvs.udp_timeout),
            "ipvs.udpTimeout",
            OTHER_MODE,
        );
    }
    if let Some(log) = &c.logging {
        let why = "kpx logs through RUST_LOG";
        add(
            log.format
                .as_deref()
                .is_some_and(|f| !f.is_empty() && f != "text"),
            "logging.format",
            why,
        );
        add(set_value(&log.verbosity), "logging.verbosity", why);
        add(set_value(&log.vmodule), "logging.vmodule", why);
    }
    if let Some(nft) = &c.nftables {
        // In nftables mode only the mark is kpx's own; the rest is read.
        let other = mode != ProxyMode::Nftables;
        add(
            other && set_true(&nft.masquerade_all),
            "nftables.masqueradeAll",
            OTHER_MODE,
        );
        add(
            nft.masquerade_bit.is_some(),
            "nftables.masqueradeBit",
            if other {
                OTHER_MODE
            } else {
                "kpx's table uses its own fixed masquerade mark"
            },
        );
        add(
            other && set_duration(&nft.min_sync_period),
            "nftables.minSyncPeriod",
            OTHER_MODE,
        );
        add(
            other && set_duration(&nft.sync_period),
            "nftables.syncPeriod",
            OTHER_MODE,
        );
    }
    add(
        set_str(&c.port_range),
        "portRange",
        "unused by kube-proxy too (it was the userspace proxy's)",
    );
    add(
        set_str(&c.show_hidden_metrics_for_version),
        "showHiddenMetricsForVersion",
        "kpx has no hidden (deprecated) metrics",
    );
    add(
        set_true(&c.windows_run_as_service),
        "windowsRunAsService",
        WINDOWS,
    );
    if let Some(w) = &c.winkernel {
        add(set_true(&w.enable_dsr), "winkernel.enableDSR", WINDOWS);
        add(
            set_true(&w.forward_health_check_vip),
            "winkernel.forwardHealthCheckVip",
            WINDOWS,
        );
        add(set_str(&w.network_name), "winkernel.networkName", WINDOWS);
        add(
            set_str(&w.root_hns_endpoint_name),
            "winkernel.rootHnsEndpointName",
            WINDOWS,
        );
        add(set_str(&w.source_vip), "winkernel.sourceVip", WINDOWS);
    }
    for gate in c.feature_gates.iter().flatten().map(|(name, _)| name) {
        out.push(Unimplemented {
            field: format!("featureGates.{gate}"),
            why: "kpx has no feature gates",
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_are_written_as_go_writes_them() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(86400), "24h0m0s"),
            (Duration::from_secs(3600 + 2), "1h0m2s"),
            (Duration::from_micros(250), "250\u{b5}s"),
        ];
        for (d, text) in cases {
            assert_eq!(format_go_duration(d), text);
            assert_eq!(
                kpx_control::daemon::parse_duration(text),
                Ok(d),
                "{text} reads back"
            );
        }
    }
}
