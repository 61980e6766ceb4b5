//! kpx-control: the API server on the embedded store.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kpx_control::api::allocator::ServiceNetwork;
use kpx_control::apiserver::{self, ApiServer, Options};
use kpx_control::store::{EmbeddedStore, EmbeddedStoreOptions, Store};

/// A Kubernetes-compatible API server (Services, EndpointSlices, Pods, Nodes, workloads) on a
/// durable embedded store.
#[derive(Debug, Parser)]
#[command(name = "kpx-control", version)]
struct Args {
    /// Address to serve the API on. Only loopback unless --insecure-bind-any is given: the API
    /// is plain HTTP without authentication.
    #[arg(long, env = "KPX_BIND_ADDRESS", default_value = "127.0.0.1")]
    bind_address: IpAddr,
    /// Port to serve the API on (0 picks a free one; the address is printed on start).
    #[arg(long, env = "KPX_PORT", default_value_t = 8080)]
    port: u16,
    /// Allow binding a non-loopback address, exposing an unauthenticated API.
    #[arg(long)]
    insecure_bind_any: bool,
    /// Directory of the embedded store.
    #[arg(long, env = "KPX_DATA_DIR", default_value = "/var/lib/kpx-control")]
    data_dir: PathBuf,
    /// CIDR(s) ClusterIPs are allocated from: one, or one per IP family for dual-stack.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: String,
    /// Port range NodePorts are allocated from.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// CIDR(s) a Service's spec.externalIPs may come from (comma-separated). Empty (the
    /// default): no new external IP is accepted, as kube-apiserver's DenyServiceExternalIPs
    /// admission plugin — an external IP makes every node capture traffic to that address
    /// (CVE-2020-8554).
    #[arg(long, default_value = "", value_parser = parse_cidrs)]
    service_external_ip_cidrs: Cidrs,
    /// Watch events kept in memory for watchers resuming from an older resourceVersion.
    #[arg(long, default_value_t = 20_000)]
    watch_history: usize,
    /// Seconds between BOOKMARK events on idle watches that asked for them.
    #[arg(long, default_value_t = 10)]
    bookmark_interval_seconds: u64,
    /// Controllers to run beside the API server (kube-controller-manager's): a comma-separated
    /// list of endpointslice, replicaset (ReplicaSets and ReplicationControllers), deployment,
    /// nodelifecycle, scheduler, garbagecollector (cascading deletion), or none.
    #[arg(
        long,
        default_value = "endpointslice,replicaset,deployment,nodelifecycle,scheduler,garbagecollector"
    )]
    controllers: String,
    /// Seconds a node may stay silent before it is marked Ready=Unknown.
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_period_seconds: u64,
    /// Seconds after that before the silent node's pods are evicted.
    #[arg(long, default_value_t = 300)]
    pod_eviction_timeout_seconds: u64,
}

/// A comma-separated CIDR list (clap needs one type for the whole flag value).
#[derive(Debug, Clone)]
struct Cidrs(Vec<ipnet::IpNet>);

fn parse_cidrs(text: &str) -> Result<Cidrs, String> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| format!("{c:?} is not a CIDR (e.g. 192.0.2.0/24 or 2001:db8::/64)"))
        })
        .collect::<Result<_, _>>()
        .map(Cidrs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("info");
    let args = Args::parse();
    if !args.bind_address.is_loopback() && !args.insecure_bind_any {
        bail!(
            "--bind-address {}: refusing a non-loopback address for an unauthenticated API; \
             pass --insecure-bind-any to allow it",
            args.bind_address
        );
    }
    let network = ServiceNetwork::parse(
        &args.service_cluster_ip_range,
        &args.service_node_port_range,
    )
    .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("--data-dir {}: cannot create it", args.data_dir.display()))?;
    let db = args.data_dir.join("kpx.redb");
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(
            &db,
            EmbeddedStoreOptions {
                history_limit: args.watch_history,
                ..Default::default()
            },
        )
        .with_context(|| format!("opening the store at {}", db.display()))?,
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.bind_address, args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.bind_address, args.port))?;
    let address = listener.local_addr()?;
    let controllers: Vec<&str> = args
        .controllers
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "none")
        .collect();
    const KNOWN: [&str; 6] = [
        "endpointslice",
        "replicaset",
        "deployment",
        "nodelifecycle",
        "scheduler",
        "garbagecollector",
    ];
    if let Some(unknown) = controllers.iter().find(|c| !KNOWN.contains(c)) {
        bail!(
            "--controllers {unknown:?}: allowed values: {}, none",
            KNOWN.join(", ")
        );
    }
    let options = Options {
        service_network: network,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_seconds.max(1)),
        advertise_address: Some(address),
        service_external_ip_cidrs: args.service_external_ip_cidrs.0.clone(),
        ..Default::default()
    };
    let server = ApiServer::new(store, options)
        .await
        .map_err(|e| anyhow::anyhow!("starting the API server: {e}"))?;
    // The first line on stdout is the address, for scripts and tests that pass --port 0.
    println!("kpx-control listening on http://{address}");
    tracing::info!(%address, store = %db.display(), revision = server.store().current_revision(), "serving");
    if !controllers.is_empty() {
        // The controllers use the API like any client, through the address just bound.
        let url = format!("http://{address}");
        let client =
            kpx_control::client::Client::new(&kpx_control::client::ClientConfig::from_url(&url))?;
        use kpx_control::controllers::*;
        for name in &controllers {
            match *name {
                "endpointslice" => drop(endpointslice_sync::spawn(client.clone())),
                "replicaset" => drop(replicaset_sync::spawn(client.clone())),
                "deployment" => drop(deployment_sync::spawn(client.clone())),
                "scheduler" => drop(scheduler_sync::spawn(client.clone())),
                "garbagecollector" => drop(garbagecollector_sync::spawn(client.clone())),
                "nodelifecycle" => drop(nodelifecycle_sync::spawn(
                    client.clone(),
                    nodelifecycle::Timing {
                        grace: Duration::from_secs(args.node_monitor_grace_period_seconds),
                        eviction: Duration::from_secs(args.pod_eviction_timeout_seconds),
                    },
                )),
                _ => unreachable!("checked against KNOWN above"),
            }
        }
        tracing::info!(controllers = %controllers.join(","), "controllers running");
    }
    apiserver::serve(listener, server, kpx_control::daemon::shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}
