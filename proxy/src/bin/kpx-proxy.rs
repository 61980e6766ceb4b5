//! kpx-proxy: a kube-proxy. Flags are named as kube-proxy names them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kpx_control::client::{Client, ClientConfig};
use kpx_ebpf::objects::Capacity;
use kpx_proxy::backend::Backend;
use kpx_proxy::cleanup::{CleanupTargets, Running};
use kpx_proxy::dual_stack::DualStack;
use kpx_proxy::ebpf::{EbpfBackend, EbpfConfig};
use kpx_proxy::iptables::exec::{Flavour, Tool};
use kpx_proxy::iptables::render::RenderConfig;
use kpx_proxy::iptables::IptablesBackend;
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
    /// Which proxy mode to use: iptables or ebpf (ipvs and nftables follow).
    #[arg(long, default_value = "iptables", global = true)]
    proxy_mode: String,
    /// ebpf: this instance's directory on a bpffs; its maps and links are pinned there, so a
    /// restarted proxy adopts them and traffic flows while it is down.
    #[arg(long, default_value = "/sys/fs/bpf/kpx", global = true)]
    bpf_pin_dir: PathBuf,
    /// ebpf: the cgroup v2 directory whose processes get socket-level load balancing
    /// (default: the cgroup v2 root; "none": per-packet load balancing only).
    #[arg(long, global = true)]
    cgroup_root: Option<String>,
    /// ebpf: a map's capacity, NAME=ENTRIES (repeatable), e.g. kpx_services=131072.
    #[arg(long = "bpf-map-size", value_name = "NAME=ENTRIES")]
    bpf_map_sizes: Vec<String>,
    /// The node's addresses (one per family, comma-separated): the source of masqueraded
    /// traffic in ebpf mode; default: the first address of each family on the node.
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<String>,
    /// Which iptables to drive: auto (the one already in use), nft or legacy.
    #[arg(long, default_value = "auto", global = true)]
    iptables_mode: String,
    /// Path to a kubeconfig file; without it and --master, the in-cluster config is used.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server's address (overrides the kubeconfig's server).
    #[arg(long)]
    master: Option<String>,
    /// The name of this node (endpoints on it are local); defaults to the hostname.
    #[arg(long)]
    hostname_override: Option<String>,
    /// The pod network, one CIDR per IP family (comma-separated): traffic to a ClusterIP from
    /// outside it is masqueraded.
    #[arg(long)]
    cluster_cidr: Option<String>,
    /// Masquerade all traffic sent to Service cluster IPs.
    #[arg(long)]
    masquerade_all: bool,
    /// CIDRs NodePorts answer on (comma-separated, any family); default: every local address.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// The shortest time between two syncs (e.g. 1s, 500ms, 0s).
    #[arg(long, default_value = "1s", value_parser = kpx_control::daemon::parse_duration)]
    min_sync_period: Duration,
    /// How often rules are checked and refreshed even without changes.
    #[arg(long, default_value = "30s", value_parser = kpx_control::daemon::parse_duration)]
    sync_period: Duration,
    /// Address of /healthz and /livez.
    #[arg(long, default_value = "127.0.0.1:10256")]
    healthz_bind_address: SocketAddr,
    /// Address of /metrics.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// Remove what every proxy mode left (iptables and ip6tables of both flavours, the eBPF
    /// pins under --bpf-pin-dir), then exit.
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

/// `--node-ip`, parsed.
fn node_ips(args: &Args) -> anyhow::Result<Vec<std::net::IpAddr>> {
    args.node_ip
        .iter()
        .map(|ip| {
            ip.parse().map_err(|_| {
                anyhow::anyhow!("--node-ip {ip:?}: not an IP address (e.g. 10.0.0.5,fd00::5)")
            })
        })
        .collect()
}

fn client_config(args: &Args) -> anyhow::Result<ClientConfig> {
    kpx_control::daemon::client_config(args.kubeconfig.as_deref(), args.master.as_deref())
}

/// The backend `--proxy-mode` names, started.
fn backend(args: &Args) -> anyhow::Result<Box<dyn Backend>> {
    match args.proxy_mode.as_str() {
        "iptables" => Ok(Box::new(iptables_backend(args)?)),
        "ebpf" => Ok(Box::new(EbpfBackend::start(ebpf_config(args)?)?)),
        other => bail!("--proxy-mode {other:?}: allowed values: iptables, ebpf"),
    }
}

fn ebpf_config(args: &Args) -> anyhow::Result<EbpfConfig> {
    let cgroup = match args.cgroup_root.as_deref() {
        Some("none") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => Some(kpx_control::netns::cgroup2_root().context(
            "--cgroup-root: no cgroup v2 file system is mounted; give a cgroup v2 directory or \"none\"",
        )?),
    };
    let mut capacity = Capacity::default();
    for entry in &args.bpf_map_sizes {
        let parsed = entry.split_once('=').and_then(|(name, size)| {
            let name = kpx_ebpf::objects::MAPS.iter().find(|m| **m == name)?;
            Some((*name, size.parse::<u32>().ok().filter(|s| *s > 0)?))
        });
        match parsed {
            Some(pair) => capacity.entries.push(pair),
            None => bail!(
                "--bpf-map-size {entry:?}: want NAME=ENTRIES with ENTRIES > 0 and NAME one of {}",
                kpx_ebpf::objects::MAPS.join(", ")
            ),
        }
    }
    let mut node_ips = Vec::new();
    for ip in &args.node_ip {
        node_ips.push(ip.parse().map_err(|_| {
            anyhow::anyhow!("--node-ip {ip:?}: not an IP address (e.g. 10.0.0.5,fd00::5)")
        })?);
    }
    let nodeport_cidrs = cidrs("--nodeport-addresses", args.nodeport_addresses.iter())?
        .into_iter()
        .map(|(cidr, _)| {
            let (ip, len) = cidr
                .split_once('/')
                .expect("cidrs() checked ADDRESS/PREFIX");
            (
                ip.parse().expect("cidrs() checked the address"),
                len.parse().expect("cidrs() checked the prefix"),
            )
        })
        .collect();
    Ok(EbpfConfig {
        pin_dir: args.bpf_pin_dir.clone(),
        cgroup,
        node_ips,
        nodeport_cidrs,
        capacity,
    })
}

/// The iptables backend of each IP family this node can program: IPv4, and IPv6 too when
/// ip6tables works here (dual-stack, as kube-proxy runs when both families are usable).
fn iptables_backend(args: &Args) -> anyhow::Result<DualStack<IptablesBackend>> {
    let flavour = Flavour::parse(&args.iptables_mode).with_context(|| {
        format!(
            "--iptables-mode {:?}: allowed values: auto, nft, legacy",
            args.iptables_mode
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
    let cluster_cidrs = cidrs("--cluster-cidr", args.cluster_cidr.iter())?;
    if cluster_cidrs.iter().filter(|(_, ipv6)| *ipv6).count() > 1
        || cluster_cidrs.iter().filter(|(_, ipv6)| !*ipv6).count() > 1
    {
        bail!(
            "--cluster-cidr: at most one CIDR per IP family (e.g. 10.244.0.0/16,fd00:10:244::/56)"
        );
    }
    let nodeport_addresses = cidrs("--nodeport-addresses", args.nodeport_addresses.iter())?;
    let config = |ipv6: bool| RenderConfig {
        ipv6,
        cluster_cidr: cluster_cidrs
            .iter()
            .find(|(_, family)| *family == ipv6)
            .map(|(cidr, _)| cidr.clone()),
        masquerade_all: args.masquerade_all,
        nodeport_addresses: nodeport_addresses
            .iter()
            .filter(|(_, family)| *family == ipv6)
            .map(|(cidr, _)| cidr.clone())
            .collect(),
    };
    let secondary = match v6.unusable() {
        None => Some(IptablesBackend::new(v6, config(true))),
        Some(why) => {
            tracing::warn!(reason = %why, "IPv6 Services are not programmed (IPv4 only)");
            None
        }
    };
    Ok(DualStack::new(
        IptablesBackend::new(v4, config(false)),
        secondary,
    ))
}

/// CIDRs from a comma-separated flag, each with its family (true for IPv6).
fn cidrs<'a>(
    flag: &str,
    values: impl Iterator<Item = &'a String>,
) -> anyhow::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for cidr in values.flat_map(|v| v.split(',')).map(str::trim) {
        if cidr.is_empty() {
            continue;
        }
        let (address, prefix) = cidr.split_once('/').unwrap_or((cidr, ""));
        let address: std::net::IpAddr = address.parse().map_err(|_| {
            anyhow::anyhow!("{flag} {cidr:?}: not a CIDR (want ADDRESS/PREFIX, e.g. 10.0.0.0/8)")
        })?;
        let max = if address.is_ipv6() { 128 } else { 32 };
        match prefix.parse::<u8>() {
            Ok(len) if len <= max => out.push((cidr.to_string(), address.is_ipv6())),
            _ => bail!("{flag} {cidr:?}: the prefix length must be 0 to {max}"),
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("info");
    kpx_control::daemon::raise_fd_limit();
    let args = Args::parse();
    limit_malloc_arenas();
    if args.cleanup {
        return cleanup(&args);
    }
    if args.proxy_mode == "ebpf" && args.command.is_some() {
        return ebpf_offline(&args);
    }
    if args.command.is_none() {
        cleanup_other_modes(&args)?;
    }
    let backend = backend(&args)?;
    if let Some(Command::Dump { json }) = &args.command {
        let dump = backend.dump()?;
        if *json {
            println!("{}", serde_json::to_string_pretty(&dump)?);
        } else {
            print_dump(&dump);
        }
        return Ok(());
    }
    let client = Client::new(&client_config(&args)?)?;
    let node_name = args
        .hostname_override
        .clone()
        .unwrap_or_else(kpx_control::daemon::hostname);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(args.sync_period));
    tokio::spawn({
        let (address, health) = (args.healthz_bind_address, health.clone());
        async move {
            if let Err(e) = serve::serve_health(address, health).await {
                tracing::error!(%address, error = %e, "healthz server failed");
            }
        }
    });
    tokio::spawn({
        let (address, metrics) = (args.metrics_bind_address, metrics.clone());
        async move {
            if let Err(e) = serve::serve_metrics(address, metrics).await {
                tracing::error!(%address, error = %e, "metrics server failed");
            }
        }
    });
    tracing::info!(node = %node_name, server = %client.server(), backend = backend.name(), "starting");
    let watchers = watch::start(&client);
    let runner = Runner::new(
        backend,
        RunnerConfig {
            node_name,
            min_sync_period: args.min_sync_period,
            sync_period: args.sync_period,
            full_sync_period: Duration::from_secs(3600),
            protected: kpx_proxy::runner::protected_addresses(client.server(), &node_ips(&args)?)
                .await,
        },
        metrics,
        health,
    );
    runner
        .run(watchers.updates, kpx_control::daemon::shutdown())
        .await;
    tracing::info!("stopped; rules stay in place (use --cleanup to remove them)");
    Ok(())
}

/// `--cleanup`, as kube-proxy's: what every mode left (iptables of both flavours and families,
/// the eBPF pins under `--bpf-pin-dir`), whatever `--proxy-mode` says; an error if any failed.
fn cleanup(args: &Args) -> anyhow::Result<()> {
    let targets = CleanupTargets::every_mode(args.bpf_pin_dir.clone());
    let report = kpx_proxy::cleanup::cleanup_all(&targets).inspect_err(|e| e.report.log())?;
    report.log();
    tracing::info!(removed = %report, "cleanup done");
    Ok(())
}

/// At start, what the other modes left (kube-proxy's `platformCleanup(mode, false)`), best
/// effort: a failure is a warning and the mode starts anyway, as in kube-proxy's `Options.Run`.
fn cleanup_other_modes(args: &Args) -> anyhow::Result<()> {
    let running = match args.proxy_mode.as_str() {
        "ebpf" => Running::Ebpf,
        "iptables" => Running::Iptables(match Flavour::parse(&args.iptables_mode) {
            Some(Some(flavour)) => flavour,
            Some(None) => Tool::detect(false).flavour,
            // backend() names the bad value.
            None => return Ok(()),
        }),
        _ => return Ok(()),
    };
    let targets = CleanupTargets::left_by_others(running, args.bpf_pin_dir.clone());
    match kpx_proxy::cleanup::cleanup_all(&targets) {
        Ok(report) => report.log(),
        Err(e) => {
            e.report.log();
            tracing::warn!(error = %e, "removing what other proxy modes left");
        }
    }
    Ok(())
}

/// `dump` in ebpf mode works on the pins alone: nothing is attached, and a node where nothing
/// is pinned stays that way.
fn ebpf_offline(args: &Args) -> anyhow::Result<()> {
    let pin_dir = args.bpf_pin_dir.clone();
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

fn print_dump(dump: &serde_json::Value) {
    println!(
        "{:<36} {:<24} {:<9} ENDPOINTS",
        "SERVICE", "ADDRESS", "NODEPORT"
    );
    for svc in dump["services"].as_array().into_iter().flatten() {
        let addresses: Vec<&str> = svc["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        let endpoints: Vec<&str> = svc["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        let endpoints = match svc["noEndpoints"].as_str() {
            Some(verdict) => format!("<none: {verdict}>"),
            None => endpoints.join(","),
        };
        let node_port = svc["nodePort"]
            .as_u64()
            .map_or("-".to_string(), |p| p.to_string());
        println!(
            "{:<36} {:<24} {:<9} {}",
            svc["service"].as_str().unwrap_or(""),
            addresses.join(","),
            node_port,
            endpoints
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_flags_take_one_cidr_per_family_and_name_the_flag_when_wrong() {
        let given = ["10.244.0.0/16,fd00:10:244::/56".to_string()];
        let parsed = cidrs("--cluster-cidr", given.iter()).expect("valid CIDRs");
        assert_eq!(
            parsed,
            vec![
                ("10.244.0.0/16".to_string(), false),
                ("fd00:10:244::/56".to_string(), true)
            ]
        );
        let err =
            cidrs("--cluster-cidr", ["10.244.0.0/33".to_string()].iter()).expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "--cluster-cidr \"10.244.0.0/33\": the prefix length must be 0 to 32"
        );
        let err = cidrs("--nodeport-addresses", ["eth0".to_string()].iter()).expect_err("invalid");
        assert!(err
            .to_string()
            .starts_with("--nodeport-addresses \"eth0\": not a CIDR"));
    }
}
