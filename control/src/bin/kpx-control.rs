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
    /// Watch events kept in memory for watchers resuming from an older resourceVersion.
    #[arg(long, default_value_t = 20_000)]
    watch_history: usize,
    /// Bytes of keys and values the watch history may hold (events older than the budget are
    /// dropped, and resuming from them gets 410 Expired). Watchers read this history in place,
    /// so it bounds what every watcher together keeps. The default holds 20,000 ordinary
    /// objects and over 40 of the largest (3 MiB).
    #[arg(long, default_value_t = kpx_control::store::DEFAULT_HISTORY_BYTES)]
    watch_history_bytes: usize,
    /// Bytes of encoded events one watch may have waiting for a client that does not read.
    /// While it is full the watcher waits; once the history drops an event it has not read, it
    /// gets an ERROR (410 Expired) and the stream ends, and the client re-lists.
    #[arg(long, default_value_t = apiserver::WATCH_BUFFER_BYTES)]
    watch_buffer_bytes: usize,
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
                history_bytes: args.watch_history_bytes,
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
        watch_buffer_bytes: args.watch_buffer_bytes.max(1),
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
