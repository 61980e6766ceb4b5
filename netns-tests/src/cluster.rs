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

/// Timings of a cluster lab: faster than Kubernetes' defaults, so a lab reacts in seconds.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The kubelets' `--node-status-update-frequency`.
    pub heartbeat: Duration,
    /// kpx-control's `--node-monitor-grace-period-seconds`.
    pub grace_seconds: u32,
    /// kpx-control's `--pod-eviction-timeout-seconds`.
    pub eviction_seconds: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(2),
            grace_seconds: 10,
            eviction_seconds: 30,
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
        let lab = Self::build(tag, backend, nodes, 0, Some(options)).await?;
        lab.wait_ready(Duration::from_secs(30)).await?;
        Ok(lab)
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
            .arg(self.dir().join(&node.name).join("pods"));
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

    /// Stops node `i`'s kubelet (SIGTERM); its pods keep running, as with kubelet.
    pub fn stop_kubelet(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].kubelet.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Waits until every node is registered and Ready and every proxy has synced.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let nodes = Api::<NodeObject>::all(self.client());
        loop {
            let ready = match nodes.list(&ListParams::default()).await {
                Ok(list) => list.items.iter().filter(|n| node_ready(n)).count() == self.nodes.len(),
                Err(_) => false,
            };
            if ready && self.proxies_healthy()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the lab's nodes did not all become Ready within {timeout:?}; see the logs in {}",
                    self.dir().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every proxy has programmed the kernel at least once (its last-sync metric is set).
    fn proxies_healthy(&self) -> anyhow::Result<bool> {
        for node in &self.nodes {
            let Ok((200, metrics)) = crate::traffic::local_get(&node.ns, 10249, "/metrics") else {
                return Ok(false);
            };
            let synced = crate::traffic::metric_value(
                &metrics,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            )
            .is_some_and(|t| t > 0.0);
            if !synced {
                return Ok(false);
            }
        }
        Ok(true)
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
