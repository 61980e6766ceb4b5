//! The configuration as kube-proxy's users write it: kubeadm's ConfigMap, flags over the file,
//! strict field names, the fields kpx only accepts, and `--write-config-to` read back.

use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use super::file::{unimplemented_fields, Unimplemented};
use super::settings::{parse_file, to_yaml};
use super::*;

const KUBEADM_CONFIGMAP: &str = include_str!("testdata/kubeadm-kube-proxy-configmap.yaml");

/// `config.conf` of kubeadm's ConfigMap, as the DaemonSet mounts it.
fn kubeadm_config_conf() -> String {
    super::settings::config_conf_of_configmap(KUBEADM_CONFIGMAP).expect("the fixture")
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    kube: KubeProxyFlags,
}

/// The settings for `argv`, with `file` as `--config` when given.
fn resolve(
    argv: &[&str],
    file: Option<&str>,
) -> Result<(Settings, Vec<Unimplemented>), ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.conf");
    let mut argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    argv.insert(0, "kpx-proxy".into());
    if let Some(text) = file {
        std::fs::write(&path, text).expect("write the file");
        argv.push("--config".into());
        argv.push(path.display().to_string());
    }
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .expect("valid flags");
    let cli = Cli::from_arg_matches(&matches).expect("valid flags");
    Settings::resolve(&cli.kube, |id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
    })
}

#[test]
fn kubeadms_configmap_parses_with_kube_proxys_defaults_and_no_warnings() {
    let (settings, unimplemented) =
        resolve(&[], Some(&kubeadm_config_conf())).expect("kubeadm's file");
    assert_eq!(
        unimplemented,
        vec![],
        "every field kubeadm writes is empty or implemented"
    );
    assert_eq!(settings.mode, ProxyMode::Iptables, "mode \"\" is iptables");
    assert_eq!(settings.cluster_cidrs.to_string(), "10.244.0.0/16");
    assert_eq!(settings.nodeport_addresses, NodePortAddresses::default());
    // 0s in the file is kube-proxy's "unset": its defaults, 30s and 1s.
    assert_eq!(settings.sync_period, Duration::from_secs(30));
    assert_eq!(settings.min_sync_period, Duration::from_secs(1));
    assert_eq!(
        settings.kubeconfig.as_deref(),
        Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert!(
        settings.node_ips.is_empty(),
        "bindAddress 0.0.0.0 overrides nothing"
    );
    assert_eq!(settings.hostname_override, None);
    assert_eq!(settings.healthz_bind_address.to_string(), "127.0.0.1:10256");
    assert_eq!(settings.metrics_bind_address.to_string(), "127.0.0.1:10249");
}

#[test]
fn every_implemented_field_is_read() {
    let file = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ebpf
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
detectLocalMode: ClusterCIDR
nodePortAddresses: [primary]
bindAddress: 198.18.0.11
iptables:
  masqueradeAll: true
  syncPeriod: 1m0s
  minSyncPeriod: 500ms
healthzBindAddress: 0.0.0.0
metricsBindAddress: "[::1]:9999"
bindAddressHardFail: true
hostnameOverride: node-1
clientConnection:
  kubeconfig: /etc/kpx/kubeconfig
  qps: 50
  burst: 100
oomScoreAdj: -999
"#;
    let (s, unimplemented) = resolve(&[], Some(file)).expect("valid");
    assert_eq!(unimplemented, vec![], "qps and burst are accepted silently");
    assert_eq!(s.mode, ProxyMode::Ebpf);
    assert_eq!(
        s.cluster_cidrs.to_string(),
        "10.244.0.0/16,fd00:10:244::/56"
    );
    assert!(s.nodeport_addresses.is_primary());
    assert_eq!(
        s.node_ips,
        vec!["198.18.0.11".parse::<std::net::IpAddr>().expect("ip")]
    );
    let cidrs: Vec<String> = s
        .nodeport_cidrs()
        .expect("primary")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(cidrs, ["198.18.0.11/32"]);
    assert!(s.masquerade_all);
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_millis(500));
    assert_eq!(
        s.healthz_bind_address.to_string(),
        "0.0.0.0:10256",
        "the port is appended"
    );
    assert_eq!(s.metrics_bind_address.to_string(), "[::1]:9999");
    assert!(s.bind_address_hard_fail);
    assert_eq!(s.hostname_override.as_deref(), Some("node-1"));
    assert_eq!(s.oom_score_adj, Some(-999));
}

#[test]
fn a_flag_given_on_the_command_line_overrides_the_file_and_a_default_does_not() {
    let file = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ebpf
clusterCIDR: 10.244.0.0/16
iptables:
  syncPeriod: 1m0s
  minSyncPeriod: 5s
  masqueradeAll: true
hostnameOverride: from-file
"#;
    // No flags: the file wins over every default (--sync-period's 30s, --proxy-mode's iptables).
    let (s, _) = resolve(&[], Some(file)).expect("valid");
    assert_eq!(
        (s.mode, s.sync_period),
        (ProxyMode::Ebpf, Duration::from_secs(60))
    );
    assert!(s.masquerade_all);
    // Given flags win, even when they spell the default value.
    let (s, _) = resolve(
        &[
            "--proxy-mode",
            "iptables",
            "--sync-period",
            "30s",
            "--cluster-cidr",
            "10.0.0.0/8",
            "--hostname-override",
            "from-flag",
        ],
        Some(file),
    )
    .expect("valid");
    assert_eq!(s.mode, ProxyMode::Iptables);
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.cluster_cidrs.to_string(), "10.0.0.0/8");
    assert_eq!(s.hostname_override.as_deref(), Some("from-flag"));
    assert_eq!(
        s.min_sync_period,
        Duration::from_secs(5),
        "not given: the file's"
    );
    assert!(
        s.masquerade_all,
        "a bool flag left false does not override the file"
    );
}

#[test]
fn an_unknown_field_is_refused_with_its_name_and_nothing_is_applied() {
    for (text, name) in [
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCidr: 10.0.0.0/8\n", "clusterCidr"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  masqueradeALL: true\n", "masqueradeALL"),
        // Removed from kube-proxy (the userspace proxy's): strict decoding refuses it too.
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nudpIdleTimeout: 250ms\n", "udpIdleTimeout"),
    ] {
        let err = resolve(&[], Some(text)).expect_err(name).to_string();
        assert!(err.contains(&format!("unknown field `{name}`")), "{err}");
    }
    let err = resolve(&[], Some("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  syncPeriod: 30x\n"))
        .expect_err("a bad duration")
        .to_string();
    assert!(
        err.contains("iptables.syncPeriod") || err.contains("unknown unit"),
        "{err}"
    );
}

#[test]
fn bad_values_name_the_field_the_value_and_what_is_allowed() {
    let with = |body: &str| {
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}\n"
        )
    };
    let err = |body: &str| resolve(&[], Some(&with(body))).expect_err(body).to_string();
    assert_eq!(
        err("mode: ipvs"),
        "mode \"ipvs\": not implemented by kpx yet (allowed: iptables, ebpf, nftables)"
    );
    assert!(err("detectLocalMode: NodeCIDR")
        .starts_with("detectLocalMode \"NodeCIDR\": kpx tells pod traffic by clusterCIDR only"));
    assert_eq!(
        err("clusterCIDR: 10.244.0.0/33"),
        "clusterCIDR \"10.244.0.0/33\": the prefix length must be 0 to 32"
    );
    assert!(err("clusterCIDR: 10.0.0.0/8,10.244.0.0/16").contains("at most one CIDR per IP family"));
    assert!(err("nodePortAddresses: [primary, 10.0.0.0/8]")
        .starts_with("nodePortAddresses \"primary,10.0.0.0/8\""));
    assert!(err("healthzBindAddress: localhost:10256")
        .starts_with("healthzBindAddress \"localhost:10256\": not an address"));
    assert!(err("oomScoreAdj: -2000").contains("-1000 to 1000"));
    let wrong_version =
        "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n";
    assert!(resolve(&[], Some(wrong_version))
        .expect_err("v1beta1")
        .to_string()
        .starts_with("apiVersion \"kubeproxy.config.k8s.io/v1beta1\""));
}

#[test]
fn known_fields_kpx_does_not_implement_are_listed_once_each() {
    let file = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpEstablishedTimeout: 24h0m0s
  tcpCloseWaitTimeout: 1h0m0s
  tcpBeLiberal: true
  udpTimeout: 30s
  udpStreamTimeout: 5m0s
iptables:
  masqueradeBit: 14
  localhostNodePorts: true
ipvs:
  scheduler: rr
  strictARP: true
nftables:
  syncPeriod: 30s
winkernel:
  networkName: l2bridge
featureGates:
  TopologyAwareHints: true
logging:
  verbosity: 4
configSyncPeriod: 15m0s
enableProfiling: true
portRange: 30000-32767
showHiddenMetricsForVersion: "1.29"
"#;
    let c = parse_file("test", file).expect("valid");
    let fields: Vec<String> = unimplemented_fields(&c)
        .into_iter()
        .map(|u| u.field)
        .collect();
    assert_eq!(
        fields,
        [
            "configSyncPeriod",
            "conntrack.maxPerCore",
            "conntrack.min",
            "conntrack.tcpCloseWaitTimeout",
            "conntrack.tcpEstablishedTimeout",
            "conntrack.udpStreamTimeout",
            "conntrack.udpTimeout",
            "enableProfiling",
            "iptables.localhostNodePorts",
            "iptables.masqueradeBit",
            "ipvs.scheduler",
            "ipvs.strictARP",
            "logging.verbosity",
            "nftables.syncPeriod",
            "portRange",
            "showHiddenMetricsForVersion",
            "winkernel.networkName",
            "featureGates.TopologyAwareHints",
        ]
    );
    // And resolve hands the same list to the binary, which warns once per field.
    let (settings, listed) = resolve(&[], Some(file)).expect("accepted");
    assert_eq!(listed.len(), fields.len());
    // tcpBeLiberal is implemented: it leaves the INVALID drop rule out, as in kube-proxy.
    assert!(settings.conntrack_tcp_be_liberal);
}

#[test]
fn write_config_to_writes_the_effective_configuration_and_it_reads_back_the_same() {
    let (s, _) = resolve(
        &[
            "--proxy-mode",
            "ebpf",
            "--min-sync-period",
            "0s",
            "--nodeport-addresses",
            "198.18.0.0/15,2001:2::/48",
            "--node-ip",
            "198.18.0.11",
        ],
        Some(&kubeadm_config_conf()),
    )
    .expect("valid");
    let written = to_yaml(&s.to_file());
    let back = parse_file("written", &written).expect("what kpx writes, kpx reads");
    let mut again = Settings::defaults();
    again.apply_file(back.clone()).expect("valid");
    // minSyncPeriod 0s is "unset" in a v1alpha1 file (kube-proxy's defaulting), so it reads
    // back as the 1s default: a limit of the file format, not of the writer.
    assert_eq!(again.min_sync_period, Duration::from_secs(1));
    again.min_sync_period = s.min_sync_period;
    again.file = s.file.clone();
    assert_eq!(again, s, "{written}");
    assert!(written.contains("mode: ebpf"), "{written}");
    assert!(written.contains("syncPeriod: 30s"), "{written}");
    assert!(written.contains("clusterCIDR: 10.244.0.0/16"), "{written}");
    // The fields kpx does not implement are written back as they were read.
    assert_eq!(back.ipvs, s.file.as_ref().and_then(|f| f.ipvs.clone()));
    // Through the file system, as the flag does.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.yaml");
    s.write_file(&path).expect("write");
    let (from_disk, _) =
        resolve(&[], Some(&std::fs::read_to_string(&path).expect("read"))).expect("valid");
    assert_eq!(from_disk.mode, ProxyMode::Ebpf);
    assert_eq!(from_disk.nodeport_addresses, s.nodeport_addresses);
}

#[test]
fn kubeconfig_from_the_environment_fills_in_but_never_overrides_the_file() {
    // $KUBECONFIG reaches clap as the flag's value with a non-command-line source: `given`
    // says no. Simulated here so no test touches the process environment.
    let cli = Cli::try_parse_from(["kpx-proxy", "--kubeconfig", "/from/env"]).expect("valid");
    let not_given = |_: &str| false;
    let mut from_file = Settings::defaults();
    from_file
        .apply_file(parse_file("test", &kubeadm_config_conf()).expect("valid"))
        .expect("valid");
    from_file.apply_flags(&cli.kube, not_given).expect("valid");
    assert_eq!(
        from_file.kubeconfig.as_deref(),
        Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    let mut no_file = Settings::defaults();
    no_file.apply_flags(&cli.kube, not_given).expect("valid");
    assert_eq!(
        no_file.kubeconfig.as_deref(),
        Some(std::path::Path::new("/from/env"))
    );
}

#[test]
fn hard_fail_and_oom_score_adj_flags_override_the_file_and_are_range_checked() {
    let file = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\noomScoreAdj: -999\n";
    let (s, _) = resolve(
        &["--oom-score-adj", "-500", "--bind-address-hard-fail"],
        Some(file),
    )
    .expect("valid");
    assert_eq!(s.oom_score_adj, Some(-500));
    assert!(s.bind_address_hard_fail);
    let err = Cli::try_parse_from(["kpx-proxy", "--oom-score-adj", "-1001"]).expect_err("range");
    assert!(err.to_string().contains("--oom-score-adj"), "{err}");
}
