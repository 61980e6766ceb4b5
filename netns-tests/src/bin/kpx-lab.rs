//! kpx-lab: run a kpx cluster on one machine, inside network namespaces.

use std::time::Duration;

use clap::{Parser, Subcommand};
use kpx_lab::cluster::ClusterOptions;

#[derive(Debug, Parser)]
#[command(
    name = "kpx-lab",
    version,
    about = "Run a kpx cluster on one machine, in network namespaces"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a cluster (API server with controllers and scheduler, a kubelet and a proxy per
    /// node) and keep it until Ctrl-C or `kpx-lab down`.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// iptables (= iptables-nft), iptables-legacy, nftables or ebpf.
        #[arg(long, default_value = "iptables")]
        proxy_mode: String,
        /// How often kubelets write their node's heartbeat (kubelet's default).
        #[arg(long, default_value = "10s", value_parser = kpx_control::daemon::parse_duration)]
        node_status_update_frequency: Duration,
        /// A node silent this long goes NotReady (its endpoints stop receiving traffic);
        /// kube-controller-manager's default.
        #[arg(long, default_value_t = kpx_lab::cluster::DEFAULT_GRACE_SECONDS)]
        node_monitor_grace_period_seconds: u32,
        /// A NotReady node's pods are deleted (and replaced elsewhere) after this long;
        /// Kubernetes' default (300 s).
        #[arg(long, default_value_t = kpx_lab::cluster::DEFAULT_EVICTION_SECONDS)]
        pod_eviction_timeout_seconds: u32,
        /// The nodes' zones in order (`zone-a,zone-b`: node 0 in zone-a, node 1 in zone-b),
        /// as `topology.kubernetes.io/zone` labels; nodes past the list get none.
        #[arg(long, value_delimiter = ',')]
        zones: Vec<String>,
    },
    /// The running labs: nodes, pods, and how to reach them.
    Status,
    /// Run a command inside a pod's network namespace: `kpx-lab exec POD -- CMD [ARGS]`.
    Exec {
        pod: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// The lab (when several run).
        #[arg(long)]
        lab: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The demo: a 2-node cluster, an nginx Deployment and its Service applied with kubectl,
    /// requests spreading over the pods, a scale-up, a rolling update, then down.
    Demo {
        /// iptables (= iptables-nft), iptables-legacy, nftables or ebpf; default: the first this
        /// machine runs of ebpf, iptables.
        #[arg(long)]
        proxy_mode: Option<String>,
        /// The kubectl to use (default: $KPX_KUBECTL, then kubectl on PATH).
        #[arg(long)]
        kubectl: Option<String>,
    },
    /// Every backend side by side on identical traffic: control plane (syncs, programming
    /// latency, CPU, memory, beside the loader alone) and data plane (latency, connection
    /// rate, throughput, UDP) against the pod IP directly; a table, JSON, CSV and plots.
    Bench(kpx_lab::bench::Options),
    /// Stop the running lab (`--all`: remove every lab, also what crashed labs left).
    Down {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        lab: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("warn");
    match Args::parse().command {
        Command::Up {
            nodes,
            proxy_mode,
            node_status_update_frequency,
            node_monitor_grace_period_seconds,
            pod_eviction_timeout_seconds,
            zones,
        } => {
            let options = ClusterOptions {
                heartbeat: node_status_update_frequency,
                grace_seconds: node_monitor_grace_period_seconds,
                eviction_seconds: pod_eviction_timeout_seconds,
                zones,
            };
            kpx_lab::cli::up(nodes, &proxy_mode, options).await
        }
        Command::Status => kpx_lab::cli::status().await,
        Command::Exec {
            pod,
            namespace,
            lab,
            command,
        } => {
            let code = kpx_lab::cli::exec(lab.as_deref(), &namespace, &pod, &command).await?;
            std::process::exit(code);
        }
        Command::Demo {
            proxy_mode,
            kubectl,
        } => kpx_lab::demo::run(proxy_mode.as_deref(), kubectl).await,
        Command::Bench(options) => {
            tokio::select! {
                result = kpx_lab::bench::main(options) => result,
                _ = kpx_control::daemon::shutdown() => {
                    // Dropping the benchmark removed its labs (Ctrl-C, or SIGTERM from a
                    // `timeout` or a test harness).
                    eprintln!("kpx-lab bench: interrupted; its labs are removed");
                    std::process::exit(130);
                }
            }
        }
        Command::Down { all, lab } => {
            if all {
                kpx_lab::cli::stop_all_labs();
                let removed = kpx_lab::lab::down(kpx_lab::lab::LAB_PREFIX)?;
                println!("removed {removed} network namespace(s)");
                Ok(())
            } else {
                kpx_lab::cli::down(lab.as_deref())
            }
        }
    }
}
