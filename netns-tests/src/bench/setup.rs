//! One backend's bench lab: a node running kpx-proxy with that backend, a client pod, the
//! server pods every Service's endpoints point at (plus two spares for network programming),
//! iperf3 beside the first server and on the client pod's loopback (the host reference), and the
//! Services themselves:
//!
//! - `svc-NNNNN`: port 80 → 8080 over `endpoints` servers; the benchmark fills N of them, so
//!   `svc-00000` is first in the proxy's table and `svc-{N-1}` last;
//! - `svc-NNNNN-s` beside each measured one (sorted right after it): iperf3 (5201/TCP) and
//!   UDP (9000) to the first server alone, because iperf3's control and data connections must
//!   reach the same server — one established flow costs the same whatever the endpoint count;
//! - `svc-probe`: the Service whose endpoints change, for the one-endpoint sync and network
//!   programming latency.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::Api;
use serde_json::{json, Value};

use super::cpus::Placement;
use super::loads::Client;
use crate::lab::{Lab, ProxyBackend};
use crate::netns::{Enter, Entry};

const NAMESPACE: &str = "default";
pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;
pub const UDP_PORT: u16 = 9000;
/// The client pod's loopback: the host reference's traffic stays inside the client pod, where
/// no backend has a rule or a map entry on its path (eBPF's connect hook looks and finds no
/// Service).
pub const LOOPBACK_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// The pods' HTTP port (kpx-workload's default), which Services' port 80 targets.
pub const POD_HTTP_PORT: u16 = 8080;

pub struct BenchLab {
    pub backend: ProxyBackend,
    pub lab: Lab,
    pub endpoints: usize,
    /// Services filled so far (svc-00000 … svc-{filled-1}).
    pub filled: usize,
    twins: BTreeSet<usize>,
    /// Which spare the probe Service points at now (0 or 1).
    probe_spare: usize,
    /// iperf3 servers: beside the first server, and on the client pod's loopback.
    iperf: Vec<Child>,
    /// Where the clients and servers run.
    pub placement: Placement,
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn server_name(k: usize) -> String {
    format!("server-{:02}", k + 1)
}

fn spare_name(k: usize) -> String {
    format!("spare-{}", ["a", "b"][k])
}

impl BenchLab {
    pub async fn start(
        backend: ProxyBackend,
        endpoints: usize,
        placement: Placement,
    ) -> anyhow::Result<Self> {
        let tag = match backend {
            ProxyBackend::IptablesNft => "bench-nft",
            ProxyBackend::IptablesLegacy => "bench-legacy",
            ProxyBackend::Ebpf => "bench-ebpf",
            ProxyBackend::Nftables => "bench-nftables",
            ProxyBackend::Ipvs => "bench-ipvs",
        };
        let mut lab = Lab::start(tag, backend, 1, 0).await?;
        // kube-proxy's default: the periodic check for lost rules, not a test's quick one.
        lab.proxy_sync_period = "30s".into();
        lab.add_pod(0, "client").await?;
        for k in 0..endpoints {
            lab.add_pod(0, &server_name(k)).await?;
        }
        for k in 0..2 {
            lab.add_pod(0, &spare_name(k)).await?;
        }
        let mut server = lab.pod(&server_name(0)).ns.entry()?;
        if let Some(cg) = &lab.nodes[0].cgroup {
            // With the pod's other processes, so the lab's cgroup kill takes it too.
            server = server.in_cgroup(cg.clone());
        }
        for pod in lab.pods.iter() {
            if let Some(pid) = pod.pid() {
                placement.pin_process(pid)?;
            }
        }
        let client = lab.pod("client").ns.entry()?;
        let client = match &lab.nodes[0].cgroup {
            Some(cg) => client.in_cgroup(cg.clone()),
            None => client,
        };
        let mut iperf = Vec::new();
        for (entry, bind) in [(server, None), (client, Some(LOOPBACK_IP))] {
            let mut cmd = entry.command("iperf3")?;
            placement.pin_command(&mut cmd)?;
            cmd.args(["-s", "-p", &IPERF_PORT.to_string()]);
            if let Some(address) = bind {
                cmd.args(["-B", &address.to_string()]);
            }
            iperf.push(
                cmd.stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting iperf3 -s (apt-get install iperf3)")?,
            );
        }
        let mut bench = Self {
            backend,
            lab,
            endpoints,
            filled: 0,
            twins: BTreeSet::new(),
            probe_spare: 0,
            iperf,
            placement,
        };
        bench.create_probe().await?;
        Ok(bench)
    }

    /// Where clients run: the client pod's namespace, in the node's cgroup like any pod.
    pub fn client(&self) -> anyhow::Result<Client> {
        let entry = self.lab.pod("client").ns.entry()?;
        let entry = match &self.lab.nodes[0].cgroup {
            Some(cg) => entry.in_cgroup(cg.clone()),
            None => entry,
        };
        Ok(Client {
            entry,
            placement: self.placement,
        })
    }

    pub fn node(&self) -> anyhow::Result<Entry> {
        self.lab.nodes[0].entry()
    }

    fn ip(&self, pod: &str) -> IpAddr {
        self.lab.pod(pod).ip.into()
    }

    /// The first server's address: the stream twins' only endpoint.
    pub fn direct(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(&server_name(0)), port)
    }

    /// Every server's HTTP address: direct new-connection traffic spreads over the same pods
    /// a Service's does (one hot server process would flatter the direct line).
    pub fn direct_all(&self) -> Vec<SocketAddr> {
        self.servers()
            .iter()
            .map(|p| SocketAddr::new(self.ip(p), POD_HTTP_PORT))
            .collect()
    }

    fn slice(&self, name: &str, pods: &[String], ports: Value) -> anyhow::Result<EndpointSlice> {
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|p| json!({"addresses": [self.ip(p).to_string()], "conditions": {"ready": true}, "nodeName": "node-1", "targetRef": {"kind": "Pod", "name": p, "namespace": NAMESPACE}}))
            .collect();
        Ok(serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}))?)
    }

    async fn create_service(
        &self,
        name: &str,
        ports: Value,
        slice: EndpointSlice,
    ) -> anyhow::Result<()> {
        let services: Api<Service> = Api::namespaced(self.lab.client(), NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(self.lab.client(), NAMESPACE);
        let svc: Service =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"ports": ports}}))?;
        services
            .create(&svc)
            .await
            .with_context(|| format!("creating Service {name}"))?;
        slices
            .create(&slice)
            .await
            .with_context(|| format!("creating the EndpointSlice of {name}"))?;
        Ok(())
    }

    fn servers(&self) -> Vec<String> {
        (0..self.endpoints).map(server_name).collect()
    }

    /// Services `filled..n`, 16 writes in flight.
    pub async fn fill(&mut self, n: usize) -> anyhow::Result<()> {
        let servers = self.servers();
        let this = &*self;
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(self.filled..n)
            .map(|i| {
                let servers = servers.clone();
                async move {
                    let name = service_name(i);
                    let slice = this.slice(
                        &name,
                        &servers,
                        json!([{"name": "http", "port": POD_HTTP_PORT, "protocol": "TCP"}]),
                    )?;
                    this.create_service(
                        &name,
                        json!([{"name": "http", "port": HTTP_PORT, "targetPort": POD_HTTP_PORT}]),
                        slice,
                    )
                    .await
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<()>>()?;
        self.filled = self.filled.max(n);
        Ok(())
    }

    /// Service `i`'s stream twin (iperf3 and UDP to the first server), made once.
    pub async fn ensure_twin(&mut self, i: usize) -> anyhow::Result<()> {
        if !self.twins.insert(i) {
            return Ok(());
        }
        let name = format!("{}-s", service_name(i));
        let slice = self.slice(
            &name,
            &[server_name(0)],
            json!([{"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"}, {"name": "udp", "port": UDP_PORT, "protocol": "UDP"}]),
        )?;
        self.create_service(
            &name,
            json!([{"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"}, {"name": "udp", "port": UDP_PORT, "protocol": "UDP"}]),
            slice,
        )
        .await
    }

    fn probe_pods(&self, spare: usize) -> Vec<String> {
        let mut pods: Vec<String> = self.servers().into_iter().skip(1).collect();
        pods.push(spare_name(spare));
        pods
    }

    async fn create_probe(&mut self) -> anyhow::Result<()> {
        let slice = self.slice(
            "svc-probe",
            &self.probe_pods(0),
            json!([{"name": "http", "port": POD_HTTP_PORT, "protocol": "TCP"}]),
        )?;
        self.create_service(
            "svc-probe",
            json!([{"name": "http", "port": HTTP_PORT, "targetPort": POD_HTTP_PORT}]),
            slice,
        )
        .await
    }

    pub async fn vip(&self, name: &str) -> anyhow::Result<IpAddr> {
        let services: Api<Service> = Api::namespaced(self.lab.client(), NAMESPACE);
        let svc = services.get(name).await?;
        let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
        ip.parse()
            .with_context(|| format!("Service {name} has no ClusterIP"))
    }

    /// Waits until an HTTP request to `target` is answered from the client (the proxy has
    /// programmed it).
    pub async fn wait_answering(
        &mut self,
        target: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let run = super::loads::new_connections(&self.client()?, &[target], 3, 1).await;
            if run.is_ok_and(|r| r.failed == 0) {
                return Ok(());
            }
            // A proxy that died will not program anything: say so now, not after `within`.
            if let Some(status) = self.lab.proxy_exit(0) {
                anyhow::bail!(
                    "kpx-proxy ({} backend) exited ({status}) before {target} answered\n{}",
                    self.backend.name(),
                    self.lab.proxy_logs()
                );
            }
            anyhow::ensure!(
                started.elapsed() < within,
                "{target} did not answer within {within:?} ({} backend)\n{}",
                self.backend.name(),
                self.lab.proxy_logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The proxy's Prometheus metrics.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (code, body) = crate::traffic::local_get(&self.lab.nodes[0], 10249, "/metrics")?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }

    /// The spare the next endpoint change brings in.
    pub fn next_probe_spare(&self) -> String {
        spare_name(1 - self.probe_spare)
    }

    /// The spare the probe Service points at now, with its address.
    pub fn current_probe_spare(&self) -> String {
        let name = spare_name(self.probe_spare);
        format!("{name} at {}", self.ip(&name))
    }

    /// Points the probe Service at the other spare (one endpoint replaced); returns the
    /// write's wall-clock time.
    pub async fn swap_probe_endpoint(&mut self) -> anyhow::Result<SystemTime> {
        let next = 1 - self.probe_spare;
        let mut slice = self.slice(
            "svc-probe",
            &self.probe_pods(next),
            json!([{"name": "http", "port": POD_HTTP_PORT, "protocol": "TCP"}]),
        )?;
        let slices: Api<EndpointSlice> = Api::namespaced(self.lab.client(), NAMESPACE);
        let current = slices.get("svc-probe-1").await?;
        slice.metadata.resource_version = current.metadata.resource_version;
        let written = SystemTime::now();
        slices.replace("svc-probe-1", &slice).await?;
        self.probe_spare = next;
        Ok(written)
    }

    /// What the proxy has programmed for `service` (`kpx-proxy dump`, its row only), for the
    /// note when an endpoint change is not served: it tells a change the proxy never applied
    /// from one applied but not reached.
    pub fn programmed_row(&self, service: &str) -> String {
        let out = match self
            .lab
            .proxy_command(0)
            .and_then(|mut c| Ok(c.arg("dump").output()?))
        {
            Ok(out) => out,
            Err(e) => return format!("kpx-proxy dump could not run: {e:#}"),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<&str> = text.lines().filter(|l| l.contains(service)).collect();
        if rows.is_empty() {
            format!(
                "kpx-proxy dump shows no {service} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        } else {
            rows.join("\n")
        }
    }

    /// `kpx-proxy --cleanup` then a fresh start: the next sync is a full one from empty tables
    /// or maps.
    pub fn restart_proxy_from_empty(&mut self) -> anyhow::Result<()> {
        self.lab.stop_proxy(0);
        let out = self
            .lab
            .proxy_command(0)?
            .arg("--cleanup")
            .stdout(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "kpx-proxy --cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.lab.start_proxy(0)
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        for mut child in self.iperf.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU seconds (user + system, its own and its waited-for children's: the proxy's
/// iptables-restore runs count) and peak resident set (MiB) of a process.
pub fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at state: utime, stime, cutime
    // and cstime are the 12th to 15th of those.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<f64>().ok())
        .sum::<Option<f64>>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((ticks / hz.max(1.0), status_kib(pid, "VmHWM:")? / 1024.0))
}

/// A size field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_usage() {
        // The resident set now, then the peak: the peak only grows, so it is read second (the
        // test harness's other threads allocate meanwhile).
        let now = status_kib(std::process::id(), "VmRSS:").expect("VmRSS");
        let (cpu, rss) = process_usage(std::process::id()).expect("usage");
        assert!(cpu >= 0.0 && rss > 0.0);
        assert!(now > 0.0 && now <= rss * 1024.0);
    }
}
