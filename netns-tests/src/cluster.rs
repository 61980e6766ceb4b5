//! A cluster lab: the lab's fabric and nodes, with kpx-control running its controllers and
//! scheduler and a kpx-kubelet per node running the pods (each node's pod CIDR is its `cbr0`
//! network), so Deployments and Services applied with kubectl run as they would on a cluster.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kpx_control::client::{Api, ListParams};

use crate::lab::{binary, node_ip6, pod_net6, Lab, ProxyBackend};
use crate::netns::Entry;

/// Timings of a cluster lab: Kubernetes' defaults, so a busy machine (issue 15: load 7-9 on
/// 2 cores) does not make nodes `Unknown` and evict their pods mid-test. Tests of the node
/// lifecycle (a stopped kubelet → Unknown → evicted) set short timings themselves.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The kubelets' `--node-status-update-frequency` (kubelet's `nodeStatusUpdateFrequency`,
    /// default 10 s).
    pub heartbeat: Duration,
    /// kpx-control's `--node-monitor-grace-period-seconds` (kube-controller-manager's
    /// `--node-monitor-grace-period`, 40 s).
    pub grace_seconds: u32,
    /// kpx-control's `--pod-eviction-timeout-seconds` (kube-controller-manager's former
    /// `--pod-eviction-timeout`, and the taint-based `tolerationSeconds` the
    /// DefaultTolerationSeconds admission plugin adds: 300 s).
    pub eviction_seconds: u32,
    /// Node `i`'s zone (its kubelet's `--node-labels topology.kubernetes.io/zone=...`), for
    /// topology-aware routing; nodes past the end of the list get no zone label.
    pub zones: Vec<String>,
}

/// [`ClusterOptions`]' defaults, also `kpx-lab up`'s flag defaults.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
pub const DEFAULT_GRACE_SECONDS: u32 = 40;
pub const DEFAULT_EVICTION_SECONDS: u32 = 300;

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heartbeat: DEFAULT_HEARTBEAT,
            grace_seconds: DEFAULT_GRACE_SECONDS,
            eviction_seconds: DEFAULT_EVICTION_SECONDS,
            zones: Vec::new(),
        }
    }
}

impl ClusterOptions {
    pub(crate) fn api_args(&self) -> Vec<String> {
        vec![
            "--node-monitor-grace-period-seconds".into(),
            self.grace_seconds.to_string(),
            "--pod-eviction-timeout-seconds".into(),
            self.eviction_seconds.to_string(),
        ]
    }
}

/// Node `i`'s pod CIDRs: its `cbr0` networks, `198.19.i.0/24` and `2001:2:0:(100+i)::/64`.
fn pod_cidrs(i: u8) -> String {
    format!("198.19.{i}.0/24,{}/64", pod_net6(i, 0))
}

impl Lab {
    /// A cluster of `nodes` nodes: API server with controllers and scheduler, and a kubelet
    /// and a proxy per node. Returns once every node is Ready and every proxy has synced.
    pub async fn cluster(
        tag: &str,
        backend: ProxyBackend,
        nodes: usize,
        options: ClusterOptions,
    ) -> anyhow::Result<Self> {
        let mut lab = Self::build(tag, backend, nodes, 0, Some(options)).await?;
        match lab.wait_ready(READY_DEADLINE).await {
            Ok(()) => Ok(lab),
            Err(e) => Err(lab.failed_start(e)),
        }
    }

    /// (Re)starts node `i`'s kubelet, in the node's namespace and cgroup.
    pub fn start_kubelet(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_kubelet(i);
        let options = self.cluster.clone().context("not a cluster lab")?;
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&format!("kubelet-{}", node.name)))?;
        let mut entry = node.ns.entry()?;
        if let Some(cg) = &node.cgroup {
            entry = entry.in_cgroup(cg.clone());
        }
        let mut cmd = entry.command(binary("kpx-kubelet")?)?;
        cmd.arg("--kubeconfig")
            .arg(self.secret_path(&format!("kubelet-{}.kubeconfig", node.name)))
            .args(["--master", &format!("https://{}", self.api_address())])
            .arg("--authentication-token-file")
            .arg(self.secret_path("kubelet-tokens.csv"))
            .args(["--hostname-override", &node.name])
            .args([
                "--node-ip",
                &format!("{},{}", node.ip, node_ip6(node.index)),
            ])
            .args(["--pod-cidr", &pod_cidrs(node.index)])
            .args(["--netns-prefix", &format!("{}-n{}-", self.name, node.index)])
            .args([
                "--node-status-update-frequency",
                &format!("{}ms", options.heartbeat.as_millis()),
            ])
            .arg("--pod-log-dir")
            .arg(self.dir().join(&node.name).join("pods"))
            // The kubelet API's self-signed serving certificate, kept across restarts of the
            // kubelet and removed with the lab.
            .arg("--cert-dir")
            .arg(self.dir().join(&node.name).join("pki"));
        if let Some(zone) = options.zones.get(i) {
            cmd.arg("--node-labels")
                .arg(format!("topology.kubernetes.io/zone={zone}"));
        }
        match &node.cgroup {
            Some(cg) => cmd.arg("--cgroup-root").arg(cg),
            None => cmd.args(["--cgroup-root", "none"]),
        };
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting kpx-kubelet in {}", node.ns.name))?;
        self.nodes[i].kubelet = Some(child);
        Ok(())
    }

    /// The process id of node `i`'s kubelet, if it runs (for resource figures).
    pub fn kubelet_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].kubelet.as_ref().map(std::process::Child::id)
    }

    /// Stops node `i`'s kubelet (SIGTERM); its pods keep running, as with kubelet. On purpose:
    /// supervision does not restart it until `start_kubelet`.
    pub fn stop_kubelet(&mut self, i: usize) {
        self.supervisor
            .stopped(crate::supervise::Component::Kubelet(i));
        if let Some(child) = self.nodes[i].kubelet.take() {
            crate::lab::terminate(child);
        }
    }

    /// Waits until every node is registered and Ready and every proxy has synced; on time-out
    /// the error names each node, kubelet and proxy that was not ready, and why if known.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let nodes = Api::<NodeObject>::all(self.client());
        loop {
            let not_ready = self.not_ready(&nodes).await;
            if not_ready.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the lab's nodes did not all become Ready within {timeout:?}:\n  {}",
                    not_ready.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What is not ready yet, one line each: unregistered or not-Ready nodes (with the Ready
    /// condition's reason and message), exited kubelets and proxies (with their exit status),
    /// proxies that do not answer or have not synced.
    async fn not_ready(&mut self, nodes: &Api<NodeObject>) -> Vec<String> {
        let mut out = Vec::new();
        let listed = nodes.list(&ListParams::default()).await;
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            match &listed {
                Err(e) => {
                    if i == 0 {
                        out.push(format!("the API does not list nodes: {e}"));
                    }
                }
                Ok(list) => {
                    let node = list
                        .items
                        .iter()
                        .find(|n| n.metadata.name.as_deref() == Some(name.as_str()));
                    match node {
                        None => out.push(format!("{name}: not registered by its kubelet")),
                        Some(n) if !node_ready(n) => {
                            out.push(format!("{name}: {}", ready_condition(n)));
                        }
                        Some(_) => {}
                    }
                }
            }
            if let Some(child) = self.nodes[i].kubelet.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    out.push(format!(
                        "{name}: kpx-kubelet exited ({status}); the end of its log:\n{}",
                        crate::lab::log_tail(&self.log_path(&format!("kubelet-{name}")), 10)
                    ));
                }
            }
            if let Some(status) = self.proxy_exit(i) {
                out.push(format!(
                    "{name}: kpx-proxy exited ({status}); the end of its log:\n{}",
                    crate::lab::log_tail(&self.log_path(&format!("proxy-{name}")), 10)
                ));
                continue;
            }
            match crate::traffic::local_get(&self.nodes[i].ns, 10249, "/metrics") {
                Ok((200, metrics)) => {
                    let synced = crate::traffic::metric_value(
                        &metrics,
                        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                    )
                    .is_some_and(|t| t > 0.0);
                    if !synced {
                        out.push(format!("{name}: kpx-proxy has not synced yet"));
                    }
                }
                Ok((code, _)) => out.push(format!("{name}: kpx-proxy /metrics answered {code}")),
                Err(e) => out.push(format!("{name}: kpx-proxy /metrics does not answer: {e:#}")),
            }
        }
        out
    }

    /// Enters a pod the kubelets run (its network namespace, and its node's cgroup so socket
    /// load balancing applies to what runs there).
    pub fn pod_entry(&self, pod: &Pod) -> anyhow::Result<Entry> {
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .context("the pod is not scheduled")?;
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == node_name)
            .with_context(|| format!("no node {node_name} in this lab"))?;
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let name = format!(
            "{}-n{}-{}",
            self.name,
            node.index,
            kpx_control::kubelet::runtime::short_uid(uid)
        );
        let entry = Entry::open(&name)?;
        Ok(match &node.cgroup {
            Some(cg) => entry.in_cgroup(cg.clone()),
            None => entry,
        })
    }

    /// The API server's address inside the lab.
    pub fn api_address(&self) -> String {
        crate::lab::api_address()
    }
}

/// How long a cluster lab may take to have every node Ready and every proxy synced. Seconds
/// on an idle machine; generous so a busy one (or an eBPF lab right after another's teardown)
/// is not mistaken for a broken start.
const READY_DEADLINE: Duration = Duration::from_secs(120);

/// The node's Ready condition as a line: status, reason and message.
fn ready_condition(node: &NodeObject) -> String {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        None => "no Ready condition yet".into(),
        Some(c) => format!(
            "Ready={} ({}: {})",
            c.status,
            c.reason.as_deref().unwrap_or("no reason"),
            c.message.as_deref().unwrap_or("no message")
        ),
    }
}

pub fn node_ready(node: &NodeObject) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_cidrs_read_like_their_nodes() {
        assert_eq!(super::pod_cidrs(2), "198.19.2.0/24,2001:2:0:102::/64");
    }
}
