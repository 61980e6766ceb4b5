//! kpx-kubelet: the node agent. Registers its Node, heartbeats, and runs the pods bound to it
//! as network namespaces with processes in them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use kpx_control::client::Client;
use kpx_control::kubelet::{Capacity, Config};

#[derive(Debug, Parser)]
#[command(
    name = "kpx-kubelet",
    version,
    about = "Run a node's pods as processes in network namespaces"
)]
struct Args {
    /// Path to a kubeconfig file; without it and --master, the in-cluster config is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's address (overrides the kubeconfig's server).
    #[arg(long)]
    master: Option<String>,
    /// The node's name; defaults to the hostname.
    #[arg(long)]
    hostname_override: Option<String>,
    /// The node's addresses (comma-separated, one per family), reported as InternalIP.
    #[arg(long, value_delimiter = ',', required = true)]
    node_ip: Vec<IpAddr>,
    /// The node's pod CIDRs (comma-separated, one per family): pods get an address from each.
    #[arg(long, value_delimiter = ',', required = true)]
    pod_cidr: Vec<IpNet>,
    /// Labels for the Node (`key=value,...`).
    #[arg(long, value_delimiter = ',')]
    node_labels: Vec<String>,
    /// The bridge pods are attached to; it holds the first address of each pod CIDR.
    #[arg(long, default_value = "cbr0")]
    bridge: String,
    /// Pod namespaces are named this plus 8 hex digits of the pod UID.
    #[arg(long, default_value = "kpx-pod-")]
    netns_prefix: String,
    /// The cgroup (v2) pods' cgroups are made under, or `none`; defaults to the kubelet's own.
    #[arg(long)]
    cgroup_root: Option<String>,
    /// The built-in workload binary; defaults to `kpx-workload` next to this binary.
    #[arg(long)]
    workload_binary: Option<PathBuf>,
    /// Where container output is written (`<ns>_<pod>_<uid>/<container>/<restarts>.log`).
    #[arg(long, default_value = "/var/log/kpx-pods")]
    pod_log_dir: PathBuf,
    /// A container's log is rotated once it reaches this size (a resource quantity: `10Mi`,
    /// `1Gi`, plain bytes), as the kubelet's flag; checked every 10 s.
    #[arg(long, default_value = "10Mi")]
    container_log_max_size: String,
    /// At most this many log files (the live one and rotated pieces) are kept per container
    /// attempt; at least 2.
    #[arg(long, default_value_t = 5)]
    container_log_max_files: usize,
    /// Allocatable CPU reported for the node.
    #[arg(long, default_value = "2")]
    cpu: String,
    /// Allocatable memory reported for the node.
    #[arg(long, default_value = "8Gi")]
    memory: String,
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// How often the node's Ready heartbeat is written.
    #[arg(long, default_value = "10s", value_parser = kpx_control::daemon::parse_duration)]
    node_status_update_frequency: Duration,
    /// `/healthz` and `/metrics` (kubelet's healthz port); `0` turns them off.
    #[arg(long, default_value = "127.0.0.1:10248")]
    healthz_bind_address: String,
    /// Address of the kubelet API the API server proxies `kubectl logs` to.
    #[arg(long, default_value = "0.0.0.0")]
    address: std::net::IpAddr,
    /// Port of the kubelet API; 0 turns it off.
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// Bearer tokens the kubelet API accepts (kube-apiserver's token file format; only the
    /// token column matters): the API server's --kubelet-client-token-file token. Without it
    /// the kubelet API refuses every request.
    #[arg(long)]
    authentication_token_file: Option<PathBuf>,
    /// The kubelet API's serving certificate (PEM, the chain); with --tls-private-key-file.
    /// Without both, a self-signed one in --cert-dir is used (generated on first start).
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long)]
    tls_private_key_file: Option<PathBuf>,
    /// Where the self-signed serving certificate is kept (`kubelet.crt`, `kubelet.key`, mode
    /// 0600); ignored with --tls-cert-file.
    #[arg(long, default_value = "/var/lib/kubelet/pki")]
    cert_dir: PathBuf,
    /// Bounds of the kubelet API's connections (as kpx-control's): a request's header must
    /// arrive within this (a TLS handshake too).
    #[arg(long, default_value = "32s", value_parser = kpx_control::daemon::parse_duration)]
    header_read_timeout: Duration,
    /// A kubelet API connection with no request for this long is closed.
    #[arg(long, default_value = "90s", value_parser = kpx_control::daemon::parse_duration)]
    idle_connection_timeout: Duration,
    /// At most this many kubelet API connections at once; 0: from the fd limit.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
}

/// The cgroup (v2) this process runs in, as a path under the cgroup2 mount.
fn own_cgroup() -> Option<PathBuf> {
    let root = kpx_control::netns::cgroup2_root()?;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(path.trim_start_matches('/')))
}

fn config(args: &Args) -> anyhow::Result<Config> {
    let families = |ips: &[bool]| {
        ips.iter().filter(|v4| **v4).count() <= 1 && ips.iter().filter(|v4| !**v4).count() <= 1
    };
    anyhow::ensure!(
        families(
            &args
                .pod_cidr
                .iter()
                .map(|c| matches!(c, IpNet::V4(_)))
                .collect::<Vec<_>>()
        ),
        "--pod-cidr {:?}: at most one CIDR per IP family",
        args.pod_cidr
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let labels = args
        .node_labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--node-labels {l:?}: expected key=value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cgroup_root = match args.cgroup_root.as_deref() {
        Some("none") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => own_cgroup(),
    };
    let workload_binary = match &args.workload_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the kubelet's directory")?
            .join("kpx-workload"),
    };
    anyhow::ensure!(
        workload_binary.is_file(),
        "the built-in workload {} does not exist: build it (cargo build --bins) or pass --workload-binary",
        workload_binary.display()
    );
    Ok(Config {
        node_name: args
            .hostname_override
            .clone()
            .unwrap_or_else(kpx_control::daemon::hostname),
        node_ips: args.node_ip.clone(),
        pod_cidrs: args.pod_cidr.clone(),
        labels,
        capacity: Capacity {
            cpu: args.cpu.clone(),
            memory: args.memory.clone(),
            pods: args.max_pods,
        },
        bridge: args.bridge.clone(),
        netns_prefix: args.netns_prefix.clone(),
        cgroup_root,
        workload_binary,
        log_dir: args.pod_log_dir.clone(),
        status_update_period: args.node_status_update_frequency,
        kubelet_port: args.port,
        log_rotation: kpx_control::kubelet::logs::Policy::parse(
            &args.container_log_max_size,
            args.container_log_max_files,
        )?,
        api_tokens: match &args.authentication_token_file {
            Some(path) => Some(std::sync::Arc::new(
                kpx_control::apiserver::auth::TokenAuthenticator::from_file(path)
                    .context("--authentication-token-file")?,
            )),
            None => None,
        },
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("info");
    let args = Args::parse();
    // Before the connection limit is derived from it (see `--max-connections`).
    kpx_control::daemon::raise_fd_limit();
    // Containers' output is for this user only, as the kubelet keeps /var/log/pods.
    kpx_control::daemon::create_private_dir(&args.pod_log_dir, "--pod-log-dir").with_context(
        || {
            format!(
                "--pod-log-dir {}: cannot create it",
                args.pod_log_dir.display()
            )
        },
    )?;
    let config = config(&args)?;
    let client = Client::new(&kpx_control::daemon::client_config(
        args.kubeconfig.as_deref(),
        args.master.as_deref(),
    )?)?;
    let health = if args.healthz_bind_address == "0" {
        None
    } else {
        let address: SocketAddr = args.healthz_bind_address.parse().with_context(|| {
            format!(
                "--healthz-bind-address {:?}: expected IP:PORT or 0",
                args.healthz_bind_address
            )
        })?;
        Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("--healthz-bind-address {address}: cannot bind"))?,
        )
    };
    let api = if args.port == 0 {
        None
    } else {
        let address = SocketAddr::new(args.address, args.port);
        let hosts: Vec<String> = std::iter::once(config.node_name.clone())
            .chain(config.node_ips.iter().map(ToString::to_string))
            .collect();
        let (tls, origin) = kpx_control::kubelet::tls::serving_acceptor(
            args.tls_cert_file.as_deref(),
            args.tls_private_key_file.as_deref(),
            &args.cert_dir,
            &hosts,
        )
        .context("the kubelet API's serving certificate")?;
        tracing::info!(?origin, cert_dir = %args.cert_dir.display(), "kubelet API serving certificate");
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| {
                format!(
                    "--address {} --port {}: cannot bind",
                    args.address, args.port
                )
            })?;
        Some(kpx_control::kubelet::server::ApiListener {
            listener,
            tls,
            limits: kpx_control::serve::Limits::from_flags(
                args.max_connections,
                args.header_read_timeout,
                args.idle_connection_timeout,
            ),
        })
    };
    tracing::info!(node = %config.node_name, server = %client.server(), "starting");
    let listeners = kpx_control::kubelet::Listeners { health, api };
    kpx_control::kubelet::run(client, config, listeners, kpx_control::daemon::shutdown()).await
}
