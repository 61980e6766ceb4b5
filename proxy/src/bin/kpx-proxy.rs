//! kpx-proxy: a kube-proxy. Flags are named as kube-proxy names them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use k8s_openapi::api::core::v1::Node;
use kpx_control::client::{Api, Client, ClientConfig};
use kpx_ebpf::objects::Capacity;
use kpx_proxy::cleanup::{CleanupTargets, Running};
use kpx_proxy::config::{start, KpxFlags, KubeProxyFlags, ProxyMode, Settings};
use kpx_proxy::iptables::exec::{Flavour, Tool};
use kpx_proxy::metrics::{Health, Metrics};
use kpx_proxy::runner::{Runner, RunnerConfig};
use kpx_proxy::{serve, watch};

#[derive(Debug, Parser)]
#[command(
    name = "kpx-proxy",
    version,
    about = "A kube-proxy: Service load balancing through kernel backends"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    kube: KubeProxyFlags,
    #[command(flatten)]
    kpx: KpxFlags,
    /// The API server's address (overrides the kubeconfig's server).
    #[arg(long)]
    master: Option<String>,
    /// Remove what every proxy mode left (iptables and ip6tables of both flavours, the eBPF
    /// pins under --bpf-pin-dir, kpx's nftables tables, the IPVS mode's virtual servers,
    /// kpx-ipvs0, chains and ipsets), then exit.
    #[arg(long)]
    cleanup: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what is programmed, per Service port (read back from the kernel).
    Dump {
        /// As JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn client_config(settings: &Settings, args: &Args) -> anyhow::Result<ClientConfig> {
    kpx_control::daemon::client_config(settings.kubeconfig.as_deref(), args.master.as_deref())
}

/// Whether flag `id` (its clap id, the field name) was given on the command line, before or
/// after the subcommand; a default or an environment variable does not count.
fn given(matches: &ArgMatches, id: &str) -> bool {
    let explicit = |m: &ArgMatches| {
        matches!(
            m.try_get_raw(id).ok().and_then(|_| m.value_source(id)),
            Some(ValueSource::CommandLine)
        )
    };
    explicit(matches) || matches.subcommand().is_some_and(|(_, sub)| explicit(sub))
}

/// The node's primary IPs from its Node object, for `--nodeport-addresses primary` without
/// `--node-ip`: the first InternalIP of each family, else its ExternalIP, as kube-proxy's
/// `detectNodeIPs` (`utilnode.GetNodeHostIPs`). kube-proxy waits for the Node object too; the
/// wait is for a node agent registering, not a timing expectation.
async fn node_primary_ips(client: &Client, node_name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last_error = match nodes.get(node_name).await {
            Ok(node) => {
                let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
                let mut ips: Vec<IpAddr> = Vec::new();
                for kind in ["InternalIP", "ExternalIP"] {
                    for a in addresses.iter().filter(|a| a.type_ == kind) {
                        if let Ok(ip) = a.address.parse::<IpAddr>() {
                            if !ips.iter().any(|have| have.is_ipv6() == ip.is_ipv6()) {
                                ips.push(ip);
                            }
                        }
                    }
                }
                if !ips.is_empty() {
                    return Ok(ips);
                }
                format!("Node {node_name} has no InternalIP or ExternalIP")
            }
            Err(e) => format!("reading Node {node_name}: {e}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("nodePortAddresses \"primary\": the node's primary IPs are unknown ({last_error}); give --node-ip or bindAddress");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `oomScoreAdj`, as kube-proxy applies it to its own process (a failure is logged, not
/// fatal, as there).
fn apply_oom_score_adj(value: Option<i32>) {
    if let Some(value) = value {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", value.to_string()) {
            tracing::warn!(value, error = %e, "cannot set oomScoreAdj");
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("info");
    kpx_control::daemon::raise_fd_limit();
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    limit_malloc_arenas();
    let (mut settings, unimplemented) = Settings::resolve(&args.kube, |id| given(&matches, id))?;
    for field in &unimplemented {
        tracing::warn!(field = %field.field, why = field.why, "configuration field accepted but not implemented by kpx");
    }
    if let Some(path) = &args.kube.write_config_to {
        settings.write_file(path)?;
        tracing::info!(path = %path.display(), "wrote the effective configuration");
        return Ok(());
    }
    if args.cleanup {
        return cleanup(&args);
    }
    if settings.mode == ProxyMode::Ebpf && args.command.is_some() {
        return ebpf_offline(&args);
    }
    let node_name = settings
        .hostname_override
        .clone()
        .unwrap_or_else(kpx_control::daemon::hostname);
    if args.command.is_some() {
        // Neither needs to know where NodePorts answer (and "primary" may need the API).
        settings.nodeport_addresses = Default::default();
    } else if settings.nodeport_addresses.is_primary() && settings.node_ips.is_empty() {
        let client = Client::new(&client_config(&settings, &args)?)?;
        settings.node_ips = node_primary_ips(&client, &node_name).await?;
    }
    if args.command.is_none() {
        cleanup_other_modes(&settings, &args);
    }
    let backend = start::backend(&settings, &args.kpx)?;
    if let Some(Command::Dump { json }) = &args.command {
        let dump = backend.dump()?;
        if *json {
            println!("{}", serde_json::to_string_pretty(&dump)?);
        } else {
            print_dump(&dump);
        }
        return Ok(());
    }
    apply_oom_score_adj(settings.oom_score_adj);
    let client = Client::new(&client_config(&settings, &args)?)?;
    let metrics = Arc::new(Metrics::new(backend.name()));
    let health = Arc::new(Health::new(settings.sync_period));
    tokio::spawn({
        let (address, health) = (settings.healthz_bind_address, health.clone());
        let hard_fail = settings.bind_address_hard_fail;
        async move {
            if let Err(e) = serve::serve_health(address, health).await {
                tracing::error!(%address, error = %e, "healthz server failed");
                if hard_fail {
                    // bindAddressHardFail: kube-proxy exits when it cannot serve.
                    std::process::exit(1);
                }
            }
        }
    });
    tokio::spawn({
        let (address, metrics) = (settings.metrics_bind_address, metrics.clone());
        let hard_fail = settings.bind_address_hard_fail;
        async move {
            if let Err(e) = serve::serve_metrics(address, metrics).await {
                tracing::error!(%address, error = %e, "metrics server failed");
                if hard_fail {
                    std::process::exit(1);
                }
            }
        }
    });
    tracing::info!(node = %node_name, server = %client.server(), backend = backend.name(), "starting");
    let watchers = watch::start(&client, &node_name);
    let runner = Runner::new(
        backend,
        RunnerConfig {
            node_name,
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            full_sync_period: Duration::from_secs(3600),
            protected: kpx_proxy::runner::protected_addresses(client.server(), &settings.node_ips)
                .await,
        },
        metrics,
        health.clone(),
    )
    .with_health_check(kpx_proxy::healthcheck::HealthCheckServer::new(
        settings
            .nodeport_cidrs()?
            .iter()
            .map(|c| (c.addr(), c.prefix_len()))
            .collect(),
        health,
    ));
    runner
        .run(watchers.updates, kpx_control::daemon::shutdown())
        .await;
    tracing::info!("stopped; rules stay in place (use --cleanup to remove them)");
    Ok(())
}

/// `dump` in ebpf mode works on the pins alone: nothing is attached, and a node where nothing
/// is pinned stays that way.
fn ebpf_offline(args: &Args) -> anyhow::Result<()> {
    let pin_dir = args.kpx.bpf_pin_dir.clone();
    if !pin_dir.join("kpx_services").exists() {
        bail!(
            "nothing is programmed under {} (see --bpf-pin-dir)",
            pin_dir.display()
        );
    }
    let ebpf = kpx_ebpf::objects::load(
        kpx_ebpf::objects::TC_LB,
        Some(&pin_dir),
        &Capacity::default(),
    )?;
    let dump = kpx_proxy::ebpf::dump::read(&ebpf)?;
    if let Some(Command::Dump { json: true }) = &args.command {
        println!("{}", serde_json::to_string_pretty(&dump)?);
    } else {
        print_dump(&dump);
    }
    Ok(())
}

/// glibc gives every thread that allocates its own arena (up to 8 per core); the proxy's heap
/// is built by a few threads in turn, so extra arenas only hold freed memory. Two suffice.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning and is thread-safe; it runs before the
    // proxy allocates its working set, so the arenas created for it follow the limit.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn print_dump(dump: &kpx_proxy::backend::Dump) {
    println!(
        "{:<36} {:<24} {:<9} ENDPOINTS",
        "SERVICE", "ADDRESS", "NODEPORT"
    );
    for svc in &dump.services {
        let endpoints = match &svc.no_endpoints {
            Some(verdict) => format!("<none: {verdict}>"),
            None => svc.endpoints.join(","),
        };
        let node_port = svc.node_port.map_or("-".to_string(), |p| p.to_string());
        println!(
            "{:<36} {:<24} {:<9} {}",
            svc.service,
            svc.addresses.join(","),
            node_port,
            endpoints
        );
    }
}

/// `--cleanup`: what every mode left, whatever `--proxy-mode` says (kube-proxy's
/// `platformCleanup`).
fn cleanup(args: &Args) -> anyhow::Result<()> {
    let targets = CleanupTargets::every_mode(args.kpx.bpf_pin_dir.clone());
    let report = kpx_proxy::cleanup::cleanup_all(&targets).inspect_err(|e| e.report.log())?;
    report.log();
    tracing::info!(removed = %report, "cleanup done");
    Ok(())
}

/// At start, what the other modes left (kube-proxy's `platformCleanup(mode, false)`), best
/// effort: a failure is a warning and the mode starts anyway, as in kube-proxy's `Options.Run`.
fn cleanup_other_modes(settings: &Settings, args: &Args) {
    let running = match settings.mode {
        ProxyMode::Ebpf => Running::Ebpf,
        ProxyMode::Nftables => Running::Nftables,
        ProxyMode::Ipvs => Running::Ipvs,
        ProxyMode::Iptables => Running::Iptables(match Flavour::parse(&args.kpx.iptables_mode) {
            Some(Some(flavour)) => flavour,
            Some(None) => Tool::detect(false).flavour,
            // Starting the backend names the bad value.
            None => return,
        }),
    };
    let targets = CleanupTargets::left_by_others(running, args.kpx.bpf_pin_dir.clone());
    match kpx_proxy::cleanup::cleanup_all(&targets) {
        Ok(report) => report.log(),
        Err(e) => {
            e.report.log();
            tracing::warn!(error = %e, "removing what other proxy modes left");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<(Args, ArgMatches), clap::Error> {
        let matches = Args::command().try_get_matches_from(argv)?;
        Ok((Args::from_arg_matches(&matches)?, matches))
    }

    #[test]
    fn cidr_flags_take_one_cidr_per_family_and_name_the_flag_when_wrong() {
        let (args, _) = parse(&[
            "kpx-proxy",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
        ])
        .expect("valid CIDRs");
        let cidrs = args.kube.cluster_cidr.expect("given");
        assert_eq!(cidrs.to_string(), "10.244.0.0/16,fd00:10:244::/56");
        assert_eq!(cidrs.of_family(false).map(|c| c.prefix_len()), Some(16));
        let err = parse(&["kpx-proxy", "--cluster-cidr", "10.244.0.0/33"]).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("--cluster-cidr"), "{text}");
        assert!(text.contains("the prefix length must be 0 to 32"), "{text}");
        let err = parse(&["kpx-proxy", "--cluster-cidr", "10.0.0.0/8,10.244.0.0/16"])
            .expect_err("two IPv4 CIDRs");
        assert!(
            err.to_string().contains("at most one CIDR per IP family"),
            "{err}"
        );
        let err = parse(&["kpx-proxy", "--nodeport-addresses", "eth0"]).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("--nodeport-addresses"), "{text}");
        assert!(text.contains("\"eth0\": not a CIDR"), "{text}");
        let (args, _) = parse(&["kpx-proxy", "--proxy-mode", "ipvs"]).expect("ipvs is a mode");
        assert_eq!(args.kube.proxy_mode, ProxyMode::Ipvs);
        let err = parse(&["kpx-proxy", "--proxy-mode", "userspace"]).expect_err("not a mode");
        assert!(
            err.to_string()
                .contains("[possible values: iptables, ebpf, nftables, ipvs]"),
            "{err}"
        );
    }

    #[test]
    fn ipvs_flags_parse_as_kube_proxys_and_bad_values_name_the_flag() {
        let (args, m) = parse(&[
            "kpx-proxy",
            "--proxy-mode",
            "ipvs",
            "--ipvs-scheduler",
            "mh",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout",
            "15m",
            "--ipvs-tcpfin-timeout",
            "30s",
            "--ipvs-udp-timeout",
            "10s",
            "--ipvs-exclude-cidrs",
            "198.18.100.0/24,2001:2:1::/64",
            "--ipvs-min-sync-period",
            "2s",
            "--ipvs-sync-period",
            "1m",
        ])
        .expect("valid");
        let (s, _) = Settings::resolve(&args.kube, |id| given(&m, id)).expect("valid");
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
        assert_eq!(cidrs, ["198.18.100.0/24", "2001:2:1::/64"]);
        assert_eq!(
            (s.min_sync_period, s.sync_period),
            (Duration::from_secs(2), Duration::from_secs(60))
        );
        let (args, _) = parse(&["kpx-proxy"]).expect("defaults");
        let i = &args.kube.ipvs;
        assert_eq!(
            i.ipvs_scheduler, "",
            "kube-proxy's default: empty, meaning rr"
        );
        assert_eq!(
            (i.ipvs_min_sync_period, i.ipvs_sync_period),
            (Duration::from_secs(1), Duration::from_secs(30))
        );
        assert_eq!(i.ipvs_tcp_timeout, Duration::ZERO);
        for (argv, says) in [
            (
                ["--ipvs-scheduler", "fifo"],
                "allowed values: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh",
            ),
            (["--ipvs-exclude-cidrs", "198.18.0.0/33"], "not a CIDR"),
            (["--ipvs-sync-period", "0s"], "must be greater than 0"),
            (["--ipvs-udp-timeout", "10x"], ""),
        ] {
            let err = parse(&["kpx-proxy", argv[0], argv[1]])
                .expect_err(argv[1])
                .to_string();
            assert!(err.contains(argv[0]), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn a_flag_counts_as_given_only_on_the_command_line_on_either_side_of_the_subcommand() {
        let (_, m) = parse(&["kpx-proxy", "--proxy-mode", "ebpf", "dump"]).expect("valid");
        assert!(given(&m, "proxy_mode"));
        assert!(!given(&m, "sync_period"), "a default is not given");
        let (_, m) = parse(&["kpx-proxy", "dump", "--proxy-mode", "ebpf"]).expect("valid");
        assert!(given(&m, "proxy_mode"));
        let (_, m) = parse(&["kpx-proxy"]).expect("valid");
        assert!(!given(&m, "proxy_mode"));
        assert!(!given(&m, "no_such_flag"));
    }
}
