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
        err("mode: kernelspace"),
        "mode \"kernelspace\": Windows only (allowed: iptables, ebpf, nftables, ipvs)"
    );
    assert_eq!(
        err("ipvs:\n  scheduler: fifo"),
        "ipvs.scheduler \"fifo\": allowed values: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh"
    );
    assert_eq!(
        err("ipvs:\n  excludeCIDRs: [198.18.0.0/24, 198.18.1.0]"),
        "ipvs.excludeCIDRs \"198.18.0.0/24,198.18.1.0\": \"198.18.1.0\": not a CIDR (e.g. 198.18.0.0/24 or 2001:2::/64)"
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
    let fields: Vec<String> = unimplemented_fields(&c, ProxyMode::Iptables)
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

const IPVS_FILE: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
iptables:
  masqueradeAll: true
  syncPeriod: 5m0s
ipvs:
  excludeCIDRs: [198.18.200.0/24, "2001:2:ff::/64"]
  minSyncPeriod: 2s
  scheduler: mh
  strictARP: true
  syncPeriod: 1m0s
  tcpFinTimeout: 30s
  tcpTimeout: 15m0s
  udpTimeout: 10s
nftables:
  syncPeriod: 45s
"#;

#[test]
fn the_ipvs_section_is_read_in_ipvs_mode_and_only_reported_in_others() {
    let (s, unimplemented) = resolve(&[], Some(IPVS_FILE)).expect("valid");
    assert_eq!(s.mode, ProxyMode::Ipvs);
    let fields: Vec<&str> = unimplemented.iter().map(|u| u.field.as_str()).collect();
    assert_eq!(
        fields,
        ["nftables.syncPeriod"],
        "the ipvs section is implemented"
    );
    assert_eq!(s.ipvs.scheduler(), "mh");
    assert!(s.ipvs.strict_arp);
    assert_eq!(s.ipvs.tcp_timeout, Duration::from_secs(900));
    assert_eq!(s.ipvs.tcpfin_timeout, Duration::from_secs(30));
    assert_eq!(s.ipvs.udp_timeout, Duration::from_secs(10));
    let cidrs: Vec<String> = s
        .ipvs
        .exclude_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(cidrs, ["198.18.200.0/24", "2001:2:ff::/64"]);
    // The periods are the ipvs section's; masqueradeAll is the iptables section's (the ipvs
    // section has none), as in kube-proxy's conversion.
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    assert!(s.masquerade_all);

    // The same file in another mode: every set ipvs field is named as another mode's.
    let (s, unimplemented) =
        resolve(&["--proxy-mode", "nftables"], Some(IPVS_FILE)).expect("valid");
    assert_eq!(s.mode, ProxyMode::Nftables);
    let iptables_file = IPVS_FILE.replace("mode: ipvs", "mode: iptables");
    let (s, unimplemented_iptables) = resolve(&[], Some(&iptables_file)).expect("valid");
    assert_eq!(
        s.sync_period,
        Duration::from_secs(300),
        "the iptables section's"
    );
    let fields: Vec<&str> = unimplemented_iptables
        .iter()
        .filter(|u| u.why == "only read in another proxy mode")
        .map(|u| u.field.as_str())
        .collect();
    assert_eq!(
        fields,
        [
            "ipvs.excludeCIDRs",
            "ipvs.minSyncPeriod",
            "ipvs.scheduler",
            "ipvs.strictARP",
            "ipvs.syncPeriod",
            "ipvs.tcpFinTimeout",
            "ipvs.tcpTimeout",
            "ipvs.udpTimeout",
            "nftables.syncPeriod",
        ]
    );
    // What is another mode's follows the mode a flag chose.
    let fields: Vec<&str> = unimplemented.iter().map(|u| u.field.as_str()).collect();
    assert!(fields.contains(&"ipvs.scheduler"), "{fields:?}");
    assert!(!fields.contains(&"nftables.syncPeriod"), "{fields:?}");
}

#[test]
fn the_nftables_section_is_not_reported_in_nftables_mode() {
    let file = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nnftables:\n  syncPeriod: 45s\n  masqueradeBit: 14\n";
    let (s, unimplemented) = resolve(&[], Some(file)).expect("valid");
    assert_eq!(s.sync_period, Duration::from_secs(45));
    let fields: Vec<(&str, &str)> = unimplemented
        .iter()
        .map(|u| (u.field.as_str(), u.why))
        .collect();
    assert_eq!(
        fields,
        [(
            "nftables.masqueradeBit",
            "kpx's table uses its own fixed masquerade mark"
        )]
    );
}

#[test]
fn ipvs_flags_override_the_file_and_the_ipvs_periods_only_count_in_ipvs_mode() {
    let (s, _) = resolve(
        &[
            "--ipvs-scheduler",
            "rr",
            "--ipvs-udp-timeout",
            "0s",
            "--ipvs-exclude-cidrs",
            "198.18.7.0/24",
            "--ipvs-sync-period",
            "10s",
            "--min-sync-period",
            "3s",
        ],
        Some(IPVS_FILE),
    )
    .expect("valid");
    assert_eq!(s.ipvs.scheduler(), "rr");
    assert_eq!(
        s.ipvs.udp_timeout,
        Duration::ZERO,
        "0s given: keep the kernel's"
    );
    assert_eq!(
        s.ipvs.tcp_timeout,
        Duration::from_secs(900),
        "not given: the file's"
    );
    assert!(
        s.ipvs.strict_arp,
        "a bool flag left false does not override the file"
    );
    assert_eq!(s.ipvs.exclude_cidrs.len(), 1);
    assert_eq!(
        s.sync_period,
        Duration::from_secs(10),
        "--ipvs-sync-period wins in ipvs mode"
    );
    assert_eq!(
        s.min_sync_period,
        Duration::from_secs(3),
        "--min-sync-period, no --ipvs-min-sync-period"
    );
    let (s, _) = resolve(
        &[
            "--proxy-mode",
            "ipvs",
            "--sync-period",
            "20s",
            "--ipvs-min-sync-period",
            "0s",
        ],
        None,
    )
    .expect("valid");
    assert_eq!(
        (s.sync_period, s.min_sync_period),
        (Duration::from_secs(20), Duration::ZERO)
    );
    assert_eq!(s.ipvs.scheduler, "", "kube-proxy's default: empty");
    assert_eq!(s.ipvs.scheduler(), "rr", "which is rr");
    let (s, _) = resolve(
        &["--proxy-mode", "iptables", "--ipvs-sync-period", "10s"],
        None,
    )
    .expect("valid");
    assert_eq!(
        s.sync_period,
        Duration::from_secs(30),
        "not read in iptables mode"
    );
}

#[test]
fn write_config_to_round_trips_the_ipvs_section() {
    let (s, _) = resolve(
        &["--ipvs-tcp-timeout", "5m", "--ipvs-strict-arp"],
        Some(IPVS_FILE),
    )
    .expect("valid");
    let written = to_yaml(&s.to_file());
    let back = parse_file("written", &written).expect("what kpx writes, kpx reads");
    let mut again = Settings::defaults();
    let unimplemented = again.apply_file(back).expect("valid");
    assert_eq!(
        unimplemented
            .iter()
            .map(|u| u.field.as_str())
            .collect::<Vec<_>>(),
        ["nftables.syncPeriod"]
    );
    again.file = s.file.clone();
    assert_eq!(again, s, "{written}");
    assert!(written.contains("scheduler: mh"), "{written}");
    assert!(written.contains("tcpTimeout: 5m0s"), "{written}");
    assert!(written.contains("strictARP: true"), "{written}");
    // A flag given in another mode is written too, so the file says what was asked.
    let (s, _) = resolve(&["--ipvs-scheduler", "sh"], None).expect("valid");
    assert_eq!(s.mode, ProxyMode::Iptables);
    let back = parse_file("written", &to_yaml(&s.to_file())).expect("valid");
    assert_eq!(back.ipvs.and_then(|i| i.scheduler).as_deref(), Some("sh"));
}

#[test]
fn each_family_gets_its_own_ipvs_config() {
    use crate::netfilter::{Flavour, Tool};
    let (s, _) = resolve(
        &["--cluster-cidr", "198.18.64.0/18,2001:2:40::/56"],
        Some(IPVS_FILE),
    )
    .expect("valid");
    let v4 = Tool {
        flavour: Flavour::Legacy,
        ipv6: false,
    };
    let c = start::ipvs_config(&s, false, v4).expect("valid");
    assert!(!c.plan.ipv6);
    assert_eq!(c.plan.scheduler, "mh");
    assert_eq!(c.plan.cluster_cidr.as_deref(), Some("198.18.64.0/18"));
    assert!(c.plan.masquerade_all);
    assert_eq!(c.iptables, v4);
    assert!(c.strict_arp);
    assert_eq!(
        (c.tcp_timeout, c.tcpfin_timeout, c.udp_timeout),
        (
            Duration::from_secs(900),
            Duration::from_secs(30),
            Duration::from_secs(10)
        )
    );
    let excluded: Vec<String> = c.exclude_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(excluded, ["198.18.200.0/24"], "IPv4's only");
    let v6 = Tool {
        flavour: Flavour::Legacy,
        ipv6: true,
    };
    let c = start::ipvs_config(&s, true, v6).expect("valid");
    assert!(c.plan.ipv6);
    assert_eq!(c.plan.cluster_cidr.as_deref(), Some("2001:2:40::/56"));
    let excluded: Vec<String> = c.exclude_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(excluded, ["2001:2:ff::/64"]);
    // Without a scheduler anywhere: kube-proxy's rr.
    let c = start::ipvs_config(&Settings::defaults(), false, v4).expect("valid");
    assert_eq!(c.plan.scheduler, "rr");
    // A bad scheduler that reached the settings some other way is still refused.
    let mut bad = Settings::defaults();
    bad.ipvs.scheduler = "fifo".into();
    let err = start::ipvs_config(&bad, false, v4)
        .expect_err("fifo")
        .to_string();
    assert!(
        err.starts_with("--ipvs-scheduler \"fifo\": allowed values: rr,"),
        "{err}"
    );
}
