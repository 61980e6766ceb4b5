//! kpx-kubelet: the node agent. It registers its Node and heartbeats, watches the pods bound to
//! it, and runs each as a network namespace with processes in it (no images: see
//! [`catalog`]). One worker task per pod ([`worker`]); every kernel effect in [`runtime`].

pub mod catalog;
pub mod ipam;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod pod_status;
pub mod probe;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod worker;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;

use crate::client::{reflector, Api, Client, ListParams, ReflectorEvent, ReflectorOptions};
use crate::netns::Netns;
use ipam::Ipam;
use metrics::Metrics;
use worker::{Message, Worker};

#[derive(Debug, Clone)]
pub struct Capacity {
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub node_ips: Vec<IpAddr>,
    /// One per IP family; pods get an address from each.
    pub pod_cidrs: Vec<IpNet>,
    pub labels: Vec<(String, String)>,
    pub capacity: Capacity,
    /// The bridge pods' veths join (it holds the first address of each pod CIDR).
    pub bridge: String,
    /// Pod namespaces are named this plus the pod UID's first 8 hex digits.
    pub netns_prefix: String,
    /// The node's cgroup (v2); pods get cgroups under it.
    pub cgroup_root: Option<PathBuf>,
    pub workload_binary: PathBuf,
    pub log_dir: PathBuf,
    pub status_update_period: Duration,
    /// The port of the kubelet API (container logs), reported in the Node's daemonEndpoints.
    pub kubelet_port: u16,
    /// Bearer tokens the kubelet API accepts (`--authentication-token-file`); `None`: it
    /// refuses every request.
    pub api_tokens: Option<Arc<crate::apiserver::auth::TokenAuthenticator>>,
    /// When container logs rotate (`--container-log-max-size`, `--container-log-max-files`).
    pub log_rotation: logs::Policy,
}

impl Config {
    /// A configuration for unit tests (nothing is created from it).
    pub fn for_tests() -> Self {
        Self {
            node_name: "node".into(),
            node_ips: vec![],
            pod_cidrs: vec![],
            labels: vec![],
            capacity: Capacity {
                cpu: "1".into(),
                memory: "1Gi".into(),
                pods: 110,
            },
            bridge: "cbr0".into(),
            netns_prefix: "kpx-test-".into(),
            cgroup_root: None,
            workload_binary: "kpx-workload".into(),
            log_dir: std::env::temp_dir(),
            status_update_period: Duration::from_secs(10),
            kubelet_port: 10250,
            api_tokens: None,
            log_rotation: logs::Policy::default(),
        }
    }
}

/// What every pod worker shares.
pub struct Shared {
    pub client: Client,
    pub config: Config,
    /// The node's own namespace (the kubelet runs in it): veths and the bridge.
    pub node: Netns,
    pub metrics: Metrics,
    /// Events about pods, as kubelet records them (`kubectl describe pod`).
    pub events: Arc<crate::client::events::Recorder>,
    ipam: Mutex<Ipam>,
}

impl Shared {
    pub fn allocate(&self) -> Result<Vec<IpAddr>, String> {
        self.ipam
            .lock()
            .map_err(|_| "IPAM lock poisoned".to_string())?
            .allocate()
    }

    /// Reserves addresses a pod already has (adopted after a kubelet restart).
    pub fn reserve(&self, ips: &[IpAddr]) -> bool {
        self.ipam.lock().is_ok_and(|mut ipam| ipam.reserve(ips))
    }

    pub fn release(&self, ips: &[IpAddr]) {
        if let Ok(mut ipam) = self.ipam.lock() {
            ipam.release(ips);
        }
    }
}

/// Where the kubelet serves: `/healthz` and `/metrics`, and the kubelet API (container logs,
/// over TLS).
#[derive(Default)]
pub struct Listeners {
    pub health: Option<tokio::net::TcpListener>,
    pub api: Option<server::ApiListener>,
}

/// Runs the kubelet until `shutdown` resolves. Pods keep running when it stops (as with
/// kubelet); a later kubelet of the same node removes them and starts them afresh.
pub async fn run(
    client: Client,
    config: Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let node = Netns::current()?;
    node.index(&config.bridge).await.with_context(|| {
        format!(
            "--bridge {}: no such bridge in this network namespace (kpx-lab creates cbr0 with \
             the first address of each pod CIDR)",
            config.bridge
        )
    })?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        ipam: Mutex::new(Ipam::new(config.pod_cidrs.clone())),
        events: crate::client::events::Recorder::new(
            client.clone(),
            "kubelet",
            Some(&config.node_name),
        ),
        config,
        node,
        metrics: Metrics::new(),
    });
    if let Some(listener) = listeners.health {
        tokio::spawn(metrics::serve(shared.clone(), listener));
    }
    if let Some(listener) = listeners.api {
        tokio::spawn(server::serve(shared.clone(), listener));
    }
    // Container logs are bounded on disk (a chatty pod would otherwise fill the filesystem the
    // store lives on), for adopted containers too: the pass walks the log directory.
    tokio::spawn(logs::monitor(
        shared.config.log_dir.clone(),
        shared.config.log_rotation,
    ));
    tokio::pin!(shutdown);
    let mut delay = Duration::from_millis(200);
    loop {
        match node::register(&client, &shared.config).await {
            Ok(()) => break,
            Err(e) => {
                shared.metrics.api_failures.inc();
                tracing::warn!(error = %e, "registering the node failed; retrying");
            }
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    tracing::info!(node = %shared.config.node_name, "node registered");
    tokio::spawn(heartbeats(shared.clone()));

    let params = ListParams {
        field_selector: Some(format!("spec.nodeName={}", shared.config.node_name)),
        ..Default::default()
    };
    let mut pods = reflector(
        Api::<Pod>::all(client),
        ReflectorOptions {
            params,
            ..Default::default()
        },
    );
    let mut workers: HashMap<String, mpsc::Sender<Message>> = HashMap::new();
    let mut listed: Option<BTreeSet<String>> = None;
    // The first list is held until it is complete: pods an earlier kubelet of this node left
    // running are adopted, what it left of the others removed, and only then anything started.
    let mut first: Option<Vec<Pod>> = Some(Vec::new());
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            event = pods.events.recv() => event,
        };
        let Some(event) = event else {
            anyhow::bail!("the pod watch ended");
        };
        match event {
            ReflectorEvent::Init => {
                listed = Some(BTreeSet::new());
                if let Some(pods) = &mut first {
                    pods.clear();
                }
            }
            ReflectorEvent::InitApply(pod) if first.is_some() => {
                if let Some(pods) = &mut first {
                    pods.push(pod);
                }
            }
            ReflectorEvent::InitDone if first.is_some() => {
                listed = None;
                let pods = first.take().unwrap_or_default();
                start_after_restart(&shared, &mut workers, pods).await;
            }
            ReflectorEvent::InitApply(pod) | ReflectorEvent::Apply(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(seen) = &mut listed {
                    seen.insert(uid.clone());
                }
                deliver(&shared, &mut workers, uid, pod).await;
            }
            ReflectorEvent::InitDone => {
                let seen = listed.take().unwrap_or_default();
                let gone: Vec<String> = workers
                    .keys()
                    .filter(|uid| !seen.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(tx) = workers.remove(&uid) {
                        let _ = tx.send(Message::Gone).await;
                    }
                }
            }
            ReflectorEvent::Delete(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(tx) = workers.remove(&uid) {
                    let _ = tx.send(Message::Gone).await;
                }
            }
        }
        workers.retain(|_, tx| !tx.is_closed());
        shared.metrics.pods.set(workers.len() as i64);
    }
}

/// The pods bound here when the kubelet starts: those whose sandbox an earlier kubelet left
/// are adopted with their running containers; what is left of any other pod is removed; then
/// the rest start.
async fn start_after_restart(
    shared: &Arc<Shared>,
    workers: &mut HashMap<String, mpsc::Sender<Message>>,
    pods: Vec<Pod>,
) {
    let mut kept = BTreeSet::new();
    let mut fresh = Vec::new();
    for pod in pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        let ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        let sandbox = (!finished && !ips.is_empty())
            .then(|| runtime::find_sandbox(&shared.config, &uid, &ips))
            .flatten();
        let Some(sandbox) = sandbox else {
            tracing::info!(pod = %pod.metadata.name.as_deref().unwrap_or(""), addresses = ips.len(), finished, "no sandbox to adopt; starting the pod afresh");
            fresh.push(pod);
            continue;
        };
        let name = sandbox.netns_name.clone();
        let (tx, rx) = mpsc::channel(16);
        match Worker::adopt(shared.clone(), pod.clone(), rx, sandbox) {
            Some(worker) => {
                tracing::info!(pod = %pod.metadata.name.as_deref().unwrap_or(""), "adopted a pod an earlier kubelet ran");
                kept.insert(name);
                workers.insert(uid, tx);
                tokio::spawn(worker.run());
            }
            None => {
                tracing::info!(pod = %pod.metadata.name.as_deref().unwrap_or(""), "its addresses are taken; starting the pod afresh");
                fresh.push(pod)
            }
        }
    }
    let removed = runtime::remove_leftovers(&shared.config, &kept);
    if removed > 0 {
        tracing::info!(namespaces = removed, "removed pods an earlier kubelet left");
    }
    for pod in fresh {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        deliver(shared, workers, uid, pod).await;
    }
}

/// Hands a pod to its worker, starting one for a pod not seen before (unless it already
/// finished: a kubelet does not run a Succeeded or Failed pod again).
async fn deliver(
    shared: &Arc<Shared>,
    workers: &mut HashMap<String, mpsc::Sender<Message>>,
    uid: String,
    pod: Pod,
) {
    if let Some(tx) = workers.get(&uid) {
        if tx.send(Message::Update(Box::new(pod))).await.is_ok() {
            return;
        }
        workers.remove(&uid);
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return;
    }
    let (tx, rx) = mpsc::channel(16);
    workers.insert(uid, tx);
    tokio::spawn(Worker::new(shared.clone(), pod, rx).run());
}

async fn heartbeats(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.status_update_period);
    loop {
        tick.tick().await;
        let result = node::heartbeat(&shared.client, &shared.config.node_name).await;
        match result {
            Ok(()) => shared.metrics.heartbeat_ok(),
            Err(e) if e.is_not_found() => {
                tracing::warn!("the Node object was deleted; registering again");
                if let Err(e) = node::register(&shared.client, &shared.config).await {
                    shared.metrics.api_failures.inc();
                    tracing::warn!(error = %e, "registering the node failed; retrying");
                }
            }
            Err(e) => {
                shared.metrics.api_failures.inc();
                tracing::warn!(error = %e, "the node heartbeat failed; retrying");
            }
        }
    }
}
