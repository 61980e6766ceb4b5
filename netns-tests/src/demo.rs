//! `kpx-lab demo` (`cargo xtask demo`): a 2-node cluster in network namespaces; the nginx
//! Deployment from the Kubernetes documentation and a Service for it applied with kubectl;
//! requests from a client pod spreading over the nginx pods; a scale-up; a rolling update to
//! another image; then everything removed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Pod, Service};
use kpx_control::client::{Api, ListParams};

use crate::cluster::ClusterOptions;
use crate::lab::{Lab, ProxyBackend};

/// The nginx Deployment from the Kubernetes documentation (`controllers/nginx-deployment.yaml`),
/// unchanged; the cluster tests apply it too.
pub const DOCS_NGINX_DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  labels:
    app: nginx
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        ports:
        - containerPort: 80
";

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: my-nginx
spec:
  selector:
    app: nginx
  ports:
  - protocol: TCP
    port: 80
    targetPort: 80
";

const CLIENT: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  containers:
  - name: client
    image: busybox:1.28
    command: ['sleep', '3600']
";

const REQUESTS: usize = 300;

fn step(text: &str) {
    println!("\n==> {text}");
}

struct Kubectl<'a> {
    binary: String,
    kubeconfig: &'a Path,
}

impl Kubectl<'_> {
    /// Runs kubectl, showing the command and its output.
    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("$ kubectl {}", args.join(" "));
        let status = Command::new(&self.binary)
            .args(args)
            .env("KUBECONFIG", self.kubeconfig)
            .status()
            .with_context(|| format!("running {}", self.binary))?;
        if !status.success() {
            bail!("kubectl {} failed", args.join(" "));
        }
        Ok(())
    }

    /// `kubectl rollout status` of the demo's Deployment.
    fn rollout(&self, timeout: &str) -> anyhow::Result<()> {
        self.run(&[
            "rollout",
            "status",
            "deployment/nginx-deployment",
            &format!("--timeout={timeout}"),
        ])
    }

    fn apply(&self, dir: &Path, file: &str, yaml: &str) -> anyhow::Result<()> {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        println!("# {file}:");
        for line in yaml.lines() {
            println!("#   {line}");
        }
        self.run(&["apply", "-f", &path.display().to_string()])
    }
}

/// The first backend this machine runs, of ebpf and iptables.
fn default_backend() -> anyhow::Result<ProxyBackend> {
    for b in [
        ProxyBackend::Ebpf,
        ProxyBackend::IptablesNft,
        ProxyBackend::IptablesLegacy,
    ] {
        if b.unsupported().is_none() {
            return Ok(b);
        }
    }
    bail!("no proxy backend runs on this machine (root, iptables or BPF needed)")
}

fn kubectl_binary(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("KPX_KUBECTL").ok())
        .unwrap_or_else(|| "kubectl".into())
}

pub async fn run(proxy_mode: Option<&str>, kubectl: Option<String>) -> anyhow::Result<()> {
    let backend = match proxy_mode {
        Some(mode) => crate::cli::parse_backend(mode)?,
        None => default_backend()?,
    };
    step(&format!(
        "kpx-lab up --nodes 2 --proxy-mode {}: API server, controllers, scheduler; a kubelet and a proxy per node",
        backend.name()
    ));
    let started = Instant::now();
    let lab = Lab::cluster("demo", backend, 2, ClusterOptions::default()).await?;
    println!(
        "    lab {} ready in {:.2} s (network namespaces {}-*)",
        lab.name,
        started.elapsed().as_secs_f64(),
        lab.name
    );
    let kubectl = Kubectl {
        binary: kubectl_binary(kubectl),
        kubeconfig: &lab.kubeconfig(),
    };
    let outcome = tokio::select! {
        result = scenario(&lab, &kubectl) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\n    interrupted");
            Ok(())
        }
    };
    step("kpx-lab down");
    let name = lab.name.clone();
    drop(lab);
    let left = crate::netns::list(&format!("{name}-")).len();
    println!("    lab {name} removed ({left} network namespaces left)");
    outcome
}

async fn scenario(lab: &Lab, kubectl: &Kubectl<'_>) -> anyhow::Result<()> {
    step("the nodes (each a network namespace, registered by its kpx-kubelet)");
    kubectl.run(&["get", "nodes", "-o", "wide"])?;

    step("the nginx Deployment from the Kubernetes documentation, a Service for it, and a client pod");
    kubectl.apply(lab.dir(), "nginx-deployment.yaml", DOCS_NGINX_DEPLOYMENT)?;
    kubectl.apply(lab.dir(), "my-nginx.yaml", SERVICE)?;
    kubectl.apply(lab.dir(), "client.yaml", CLIENT)?;
    kubectl.rollout("60s")?;
    wait_running(lab, "client").await?;
    kubectl.run(&["get", "pods", "-o", "wide"])?;
    kubectl.run(&["get", "service", "my-nginx"])?;

    step(&format!(
        "{REQUESTS} requests from pod client to the Service's ClusterIP"
    ));
    spread(lab).await?;
    kubectl.run(&["logs", "deployment/nginx-deployment", "--tail=3"])?;

    step("scaling to 5 replicas");
    kubectl.run(&["scale", "deployment/nginx-deployment", "--replicas=5"])?;
    kubectl.rollout("60s")?;
    spread(lab).await?;

    step("a rolling update to nginx:1.16.1 (maxSurge 25%, maxUnavailable 25%)");
    kubectl.run(&[
        "set",
        "image",
        "deployment/nginx-deployment",
        "nginx=nginx:1.16.1",
    ])?;
    kubectl.rollout("90s")?;
    kubectl.run(&["get", "replicasets", "-o", "wide"])?;
    spread(lab).await?;
    Ok(())
}

async fn wait_running(lab: &Lab, name: &str) -> anyhow::Result<Pod> {
    let pods = Api::<Pod>::namespaced(lab.client(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pod = pods.get(name).await?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase == Some("Running") {
            return Ok(pod);
        }
        if Instant::now() > deadline {
            bail!("pod {name} is not running after 30 s (phase {phase:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends the requests from the client pod and prints which pod answered how often.
async fn spread(lab: &Lab) -> anyhow::Result<()> {
    let client = wait_running(lab, "client").await?;
    let svc = Api::<Service>::namespaced(lab.client(), "default")
        .get("my-nginx")
        .await?;
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .context("my-nginx has no ClusterIP")?;
    let target = SocketAddr::new(ip.parse()?, 80);
    let entry = lab.pod_entry(&client)?;
    let outcomes = crate::traffic::http(&entry, target, REQUESTS, Duration::from_secs(2))?;
    let pods = Api::<Pod>::namespaced(lab.client(), "default")
        .list(&ListParams::default())
        .await?;
    let describe = |name: &str| {
        pods.items
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .map(|p| {
                let node = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                let image = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                (node, image)
            })
            .unwrap_or_default()
    };
    let counts: BTreeMap<String, usize> = crate::traffic::spread(&outcomes);
    println!(
        "    {:<36} {:<8} {:<14} {:>8} {:>6}",
        "ANSWERED BY", "NODE", "IMAGE", "REQUESTS", "SHARE"
    );
    for (pod, n) in &counts {
        let (node, image) = describe(pod);
        println!(
            "    {pod:<36} {node:<8} {image:<14} {n:>8} {:>5.1}%",
            100.0 * *n as f64 / outcomes.len() as f64
        );
    }
    let failed = outcomes.iter().filter(|o| o.pod().is_none()).count();
    if failed > 0 {
        bail!("{failed} of {REQUESTS} requests failed: {counts:?}");
    }
    Ok(())
}
