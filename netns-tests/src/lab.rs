//! A lab: a cluster in network namespaces. The API server runs in this process, listening
//! inside the fabric namespace (for nodes) and on a loopback port (for the host); one kpx-proxy
//! runs in each node namespace; pods are namespaces behind veths on a node bridge, running the
//! built-in workload. Addresses come from 198.18.0.0/15:
//!
//! ```text
//!  fabric  198.18.0.0/24   br0 198.18.0.1 (API server), node i 198.18.0.(10+i), external k 198.18.0.(200+k)
//!          2001:2::/64     br0 2001:2::1, node i 2001:2::(10+i), external k 2001:2::(200+k)
//!  pods    198.19.0.0/16   node i: cbr0 198.19.i.1/24, pod j 198.19.i.(10+j)
//!          2001:2:0:100::/56  node i: cbr0 2001:2:0:(100+i)::1/64, pod j 2001:2:0:(100+i)::(10+j)
//!  services 198.18.128.0/17 and 2001:2:0:ff::/112 (ClusterIPs, dual-stack),
//!          external IPs 198.18.64.0/24 (routed to node 1)
//! ```
//!
//! (IPv6 numbers are written in decimal above and used as hex digits: node 1 is 2001:2::11.)
//!
//! Everything carries the lab's name and is removed on drop; `kpx-lab down --all` removes what
//! a crashed lab left.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use kpx_control::client::{Client, ClientConfig};

use crate::netns::Netns;

/// Every lab's name starts with this; `kpx-lab down --all` removes namespaces that do.
pub const LAB_PREFIX: &str = "kpx-";
pub const SERVICE_RANGE: &str = "198.18.128.0/17";
pub const SERVICE_RANGE_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0), 112);
pub const CLUSTER_CIDR: &str = "198.19.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "2001:2:0:100::/56";
pub const EXTERNAL_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 64, 0), 24);
const API_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const FABRIC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);

/// Node `i`'s IPv6 address on the fabric.
pub fn node_ip6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, hex_decimal(10 + u16::from(i)))
}

/// External host `k`'s IPv6 address on the fabric.
pub fn external_ip6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, hex_decimal(200 + u16::from(k)))
}

/// Node `i`'s IPv6 pod network (a /64); `host` 1 is its bridge.
pub(crate) fn pod_net6(i: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        2,
        0,
        hex_decimal(100 + u16::from(i)),
        0,
        0,
        0,
        hex_decimal(host),
    )
}

/// 123 → 0x123, so IPv6 addresses read like their IPv4 twins (node 11 ↔ 2001:2::11).
fn hex_decimal(n: u16) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}
const API_PORT: u16 = 6443;

/// How long kpx-control may take to answer after its start. It answers in milliseconds on an
/// idle machine; at load 7-9 on 2 cores it took over 5 s (issue 15), so this is a deadline for
/// a process that is making no progress at all, not an expectation.
const API_START_DEADLINE: Duration = Duration::from_secs(60);

/// The last `lines` lines of a log file, for error messages (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The API server's address inside a lab (nodes reach it over the fabric).
pub fn api_address() -> String {
    format!("{API_ADDRESS}:{API_PORT}")
}

/// How a lab's proxies program the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyBackend {
    IptablesNft,
    IptablesLegacy,
    Ebpf,
    /// kube-proxy's nftables mode: tables `ip kpx` and `ip6 kpx` in the node's namespace.
    Nftables,
    /// kube-proxy's ipvs mode: IPVS virtual servers, `kpx-ipvs0`, ipsets and `KPXV-` chains in
    /// the node's namespace.
    Ipvs,
}

impl ProxyBackend {
    pub fn name(self) -> &'static str {
        match self {
            ProxyBackend::IptablesNft => "iptables-nft",
            ProxyBackend::IptablesLegacy => "iptables-legacy",
            ProxyBackend::Ebpf => "ebpf",
            ProxyBackend::Nftables => "nftables",
            ProxyBackend::Ipvs => "ipvs",
        }
    }

    /// The proxy mode as kube-proxy names it (`--proxy-mode`, a KubeProxyConfiguration's
    /// `mode`): both iptables loaders are mode `iptables`.
    pub fn mode(self) -> &'static str {
        match self {
            ProxyBackend::IptablesNft | ProxyBackend::IptablesLegacy => "iptables",
            ProxyBackend::Ebpf => "ebpf",
            ProxyBackend::Nftables => "nftables",
            ProxyBackend::Ipvs => "ipvs",
        }
    }

    /// The counter of failed syncs, by kube-proxy's metric names
    /// (`pkg/proxy/metrics/metrics.go`: `IPTablesRestoreFailuresTotal`,
    /// `NFTablesSyncFailuresTotal`); `None` for ebpf, whose failures are not injected. ipvs:
    /// kube-proxy's IPVS proxier counts its iptables-restore failures there, and the lab's
    /// injected failure is an iptables-restore one.
    pub fn sync_failures_metric(self) -> Option<&'static str> {
        match self {
            ProxyBackend::IptablesNft | ProxyBackend::IptablesLegacy | ProxyBackend::Ipvs => {
                Some("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
            }
            ProxyBackend::Nftables => {
                Some("kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
            }
            ProxyBackend::Ebpf => None,
        }
    }

    /// The flags that select this backend (`kpx-proxy` adds the node's own for ebpf).
    pub fn args(self) -> Vec<&'static str> {
        match self {
            ProxyBackend::IptablesNft => vec!["--proxy-mode", "iptables", "--iptables-mode", "nft"],
            ProxyBackend::IptablesLegacy => {
                vec!["--proxy-mode", "iptables", "--iptables-mode", "legacy"]
            }
            ProxyBackend::Ebpf => vec!["--proxy-mode", "ebpf"],
            ProxyBackend::Nftables => vec!["--proxy-mode", "nftables"],
            ProxyBackend::Ipvs => vec!["--proxy-mode", "ipvs"],
        }
    }

    /// Why this kernel cannot run the backend, if it cannot (checked in a scratch namespace:
    /// an iptables chain, or an nftables table, created there and dropped with it; for ipvs,
    /// whether the namespace has IPVS at all).
    pub fn unsupported(self) -> Option<String> {
        let probe: &[&str] = match self {
            // /proc/net/ip_vs is per network namespace: it is there once ip_vs is loaded.
            ProxyBackend::Ipvs => &["test", "-e", "/proc/net/ip_vs"],
            ProxyBackend::IptablesNft => &["iptables-nft", "-t", "nat", "-N", "KPX-PROBE"],
            ProxyBackend::IptablesLegacy => &["iptables-legacy", "-t", "nat", "-N", "KPX-PROBE"],
            // A nat chain too: the backend's base chains need nft_chain_nat.
            ProxyBackend::Nftables => &[
                "nft",
                "add table ip kpx-probe ; add chain ip kpx-probe p { type nat hook prerouting priority -100 ; }",
            ],
            ProxyBackend::Ebpf => {
                if kpx_control::netns::cgroup2_root().is_none() {
                    return Some("no cgroup v2 file system is mounted".into());
                }
                return kpx_ebpf::features::check_kernel().err();
            }
        };
        let tool = probe[0];
        let name = format!(
            "{LAB_PREFIX}probe-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let created = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status();
        if !created.is_ok_and(|s| s.success()) {
            return Some("cannot create a network namespace (root needed)".into());
        }
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &name])
            .args(probe)
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        match out {
            Ok(o) if o.status.success() => None,
            Ok(_) if self == ProxyBackend::Ipvs => Some(ipvs_missing()),
            // `ip netns exec` reports a missing program as its own failure.
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No such file") => {
                Some(format!("{tool} is not installed"))
            }
            Ok(o) => Some(format!(
                "{tool} does not work here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("{tool} is not installed: {e}")),
        }
    }
}

/// Why a namespace has no IPVS: the kernel has none, or its module is not loaded (loading a
/// module is the node's business, not the lab's).
fn ipvs_missing() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let listed = ["modules.dep", "modules.builtin"].iter().any(|f| {
        std::fs::read_to_string(format!("/lib/modules/{}/{f}", release.trim()))
            .is_ok_and(|t| t.contains("/ip_vs.ko"))
    });
    if listed {
        "ip_vs is not loaded (modprobe ip_vs and the scheduler's ip_vs_rr)".into()
    } else {
        "the kernel has no IPVS (ip_vs)".into()
    }
}

pub const ALL_BACKENDS: &[ProxyBackend] = &[
    ProxyBackend::IptablesNft,
    ProxyBackend::IptablesLegacy,
    ProxyBackend::Ebpf,
    ProxyBackend::Nftables,
    ProxyBackend::Ipvs,
];

/// Mount points under a lab's directory (its bpffs), for `down`.
fn lab_mounts(prefix: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .filter(|path| {
            Path::new(path)
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with(prefix))
        })
        .collect()
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub index: u8,
    /// The node's cgroup (v2): its processes, and the clients tests run from it.
    pub cgroup: Option<PathBuf>,
    proxy: Option<Child>,
    pub(crate) kubelet: Option<Child>,
}

impl crate::netns::Enter for Node {
    fn entry(&self) -> anyhow::Result<crate::netns::Entry> {
        let entry = self.ns.entry()?;
        Ok(match &self.cgroup {
            Some(cg) => entry.in_cgroup(cg.clone()),
            None => entry,
        })
    }
}

pub struct Pod {
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: Netns,
    workload: Option<Child>,
}

impl Pod {
    /// The process id of the pod's workload, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.workload.as_ref().map(Child::id)
    }
}

pub struct Lab {
    pub name: String,
    pub backend: ProxyBackend,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub externals: Vec<Netns>,
    pub fabric: Netns,
    /// The API as the host reaches it: a loopback port relayed into the fabric.
    pub api_url: String,
    api: Option<Child>,
    relay: Option<tokio::task::JoinHandle<()>>,
    pod_counts: Vec<u8>,
    /// `<cgroup2>/<lab name>`, holding one cgroup per node.
    cgroup: Option<PathBuf>,
    /// The lab's own bpffs (ebpf backend), unmounted on drop.
    bpffs: Option<PathBuf>,
    /// Extra flags for kpx-control (a cluster lab's controller timings).
    pub(crate) api_args: Vec<String>,
    /// Set when kubelets run the pods (`Lab::cluster`).
    pub(crate) cluster: Option<crate::cluster::ClusterOptions>,
    /// The proxies' `--sync-period` from their next (re)start: short in tests, so lost rules
    /// come back quickly; kube-proxy's 30 s in benchmarks.
    pub proxy_sync_period: String,
    /// Per node: a KubeProxyConfiguration its proxy reads with `--config` instead of taking
    /// the mode, kubeconfig, cluster CIDR and periods as flags (`use_proxy_config`).
    proxy_configs: Vec<Option<PathBuf>>,
    /// Restarts of crashed components (`supervise.rs`), while the lab is supervised.
    pub(crate) supervisor: crate::supervise::Supervisor,
    /// Every component's identity (written into the lab's directory by `write_credentials`).
    pub(crate) credentials: Credentials,
}

/// The lab's identities, one bearer token each (kube-apiserver's static token file), and the
/// CA of the API server's certificate. The lab never serves anything unauthenticated: a local
/// user without the admin kubeconfig (mode 0600) gets only health and version.
pub(crate) struct Credentials {
    pub(crate) admin: String,
    pub(crate) proxy: String,
    /// (node name, token) per node's kubelet.
    pub(crate) kubelets: Vec<(String, String)>,
    /// What kpx-control presents to kubelets for `pods/log`.
    pub(crate) kubelet_client: String,
    pub(crate) ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Credentials {
    fn generate(nodes: usize) -> anyhow::Result<Self> {
        use kpx_control::apiserver::auth::random_token;
        let hosts = [
            API_ADDRESS.to_string(),
            "127.0.0.1".into(),
            "localhost".into(),
        ];
        let cert = kpx_control::apiserver::tls::self_signed(&hosts)?;
        Ok(Self {
            admin: random_token(),
            proxy: random_token(),
            kubelets: (1..=nodes)
                .map(|i| (format!("node-{i}"), random_token()))
                .collect(),
            kubelet_client: random_token(),
            ca_pem: cert.ca_pem,
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
        })
    }
}

/// The binaries built next to this one (target/debug or target/release).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` first",
        exe.display()
    )
}

impl Lab {
    /// A lab of `nodes` nodes and `externals` hosts outside the cluster, with proxies running.
    pub async fn start(
        tag: &str,
        backend: ProxyBackend,
        nodes: usize,
        externals: usize,
    ) -> anyhow::Result<Self> {
        Self::build(tag, backend, nodes, externals, None).await
    }

    /// `start` with extra kpx-control flags: for tests of what a failing start reports.
    pub async fn start_with_api_args(
        tag: &str,
        backend: ProxyBackend,
        nodes: usize,
        externals: usize,
        api_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::build_with(tag, backend, nodes, externals, None, api_args).await
    }

    /// The fabric, the API server, the nodes and their proxies (and kubelets in a cluster).
    pub(crate) async fn build(
        tag: &str,
        backend: ProxyBackend,
        nodes: usize,
        externals: usize,
        cluster: Option<crate::cluster::ClusterOptions>,
    ) -> anyhow::Result<Self> {
        Self::build_with(tag, backend, nodes, externals, cluster, Vec::new()).await
    }

    async fn build_with(
        tag: &str,
        backend: ProxyBackend,
        nodes: usize,
        externals: usize,
        cluster: Option<crate::cluster::ClusterOptions>,
        extra_api_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        let name = format!(
            "{LAB_PREFIX}{tag}-{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let fabric = Netns::create(&format!("{name}-fab")).await?;
        fabric.add_bridge("br0").await?;
        fabric.add_address("br0", API_ADDRESS.into(), 24).await?;
        fabric.add_address("br0", FABRIC_V6.into(), 64).await?;

        // Kept bound until the relay takes it: a port picked free and bound again later could
        // be taken meanwhile (another lab, or any client's ephemeral port).
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let host_port = listener.local_addr()?.port();
        let api_url = format!("https://127.0.0.1:{host_port}");
        let mut lab = Self {
            name: name.clone(),
            backend,
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            externals: Vec::new(),
            fabric,
            api_url,
            api: None,
            relay: None,
            pod_counts: Vec::new(),
            cgroup: None,
            bpffs: None,
            // External IPs only from the lab's external range (kpx-control allows none by
            // default); the cluster lab's controller timings and the caller's flags after that.
            api_args: [format!(
                "--service-external-ip-cidrs={}/{}",
                EXTERNAL_RANGE.0, EXTERNAL_RANGE.1
            )]
            .into_iter()
            .chain(cluster.as_ref().map(|c| c.api_args()).unwrap_or_default())
            .chain(extra_api_args)
            .collect(),
            cluster,
            proxy_sync_period: "2s".into(),
            proxy_configs: Vec::new(),
            supervisor: crate::supervise::Supervisor::default(),
            credentials: Credentials::generate(nodes)?,
        };
        lab.write_credentials()?;
        match lab.bring_up(listener, nodes, externals).await {
            Ok(()) => {
                // Supervision counts each component's run from here.
                let _ = lab.components();
                Ok(lab)
            }
            Err(e) => Err(lab.failed_start(e)),
        }
    }

    /// Everything `build` starts once the lab value exists (so a failure drops it).
    async fn bring_up(
        &mut self,
        listener: std::net::TcpListener,
        nodes: usize,
        externals: usize,
    ) -> anyhow::Result<()> {
        let lab = self;
        let name = lab.name.clone();
        if let Some(root) = kpx_control::netns::cgroup2_root() {
            let dir = root.join(&name);
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating the lab's cgroup {}", dir.display()))?;
            lab.cgroup = Some(dir);
        }
        if lab.backend == ProxyBackend::Ebpf {
            let dir = lab.dir.path().join("bpffs");
            std::fs::create_dir(&dir)?;
            let out = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "mounting a bpffs at {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            lab.bpffs = Some(dir);
        }
        lab.relay = Some(tokio::spawn(relay(listener, lab.fabric.entry()?)));
        lab.start_api().await?;
        for i in 1..=nodes {
            lab.add_node(i as u8).await?;
        }
        for k in 1..=externals {
            lab.add_external(k as u8).await?;
        }
        lab.write_fault_wrappers()?;
        for i in 0..lab.nodes.len() {
            if lab.cluster.is_some() {
                lab.start_kubelet(i)?;
            }
            lab.start_proxy(i)?;
        }
        Ok(())
    }

    /// A start that failed: the lab's directory (its logs) is kept, everything else
    /// (processes, namespaces, cgroups, mounts) is removed as the lab drops, and the error
    /// says where the logs are.
    pub(crate) fn failed_start(mut self, error: anyhow::Error) -> anyhow::Error {
        self.dir.disable_cleanup(true);
        let dir = self.dir.path().to_path_buf();
        drop(self);
        error.context(format!(
            "the lab did not start; its logs are kept in {} (`kpx-lab down --all` removes it)",
            dir.display()
        ))
    }

    /// The store directory of the lab's kpx-control.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A file of the lab's credentials, in its directory.
    pub(crate) fn secret_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The admin kubeconfig for the host (the API through the loopback relay): what users and
    /// tests' kubectl use. Mode 0600, as every credential file of the lab.
    pub fn kubeconfig(&self) -> PathBuf {
        self.secret_path("kubeconfig")
    }

    /// Writes the token files, the API server's certificate and every component's kubeconfig,
    /// each created 0600: kube-apiserver's `--token-auth-file` (`tokens.csv`: the admin in
    /// system:masters, `system:kube-proxy`, `system:node:<node>` in system:nodes per kubelet),
    /// the token kpx-control shows kubelets and the kubelets' accepted-token file.
    fn write_credentials(&self) -> anyhow::Result<()> {
        use kpx_control::apiserver::auth::{kubeconfig_yaml, write_private};
        let c = &self.credentials;
        let mut tokens = format!(
            "{},kpx-lab-admin,kpx-lab-admin,system:masters\n{},system:kube-proxy,system:kube-proxy\n",
            c.admin, c.proxy
        );
        for (node, token) in &c.kubelets {
            tokens.push_str(&format!(
                "{token},system:node:{node},system:node:{node},system:nodes\n"
            ));
        }
        let write = |name: &str, text: &str| {
            let path = self.secret_path(name);
            write_private(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("tokens.csv", &tokens)?;
        write("kubelet-client.token", &format!("{}\n", c.kubelet_client))?;
        write(
            "kubelet-tokens.csv",
            &format!(
                "{},kube-apiserver-kubelet-client,kube-apiserver-kubelet-client\n",
                c.kubelet_client
            ),
        )?;
        write("apiserver.crt", &c.cert_pem)?;
        write("apiserver.key", &c.key_pem)?;
        write("ca.crt", &c.ca_pem)?;
        let fabric = format!("https://{API_ADDRESS}:{API_PORT}");
        let admin = kubeconfig_yaml(
            &self.name,
            &self.api_url,
            &c.ca_pem,
            "kpx-lab-admin",
            &c.admin,
            Some("default"),
        );
        write("kubeconfig", &admin)?;
        let proxy = kubeconfig_yaml(
            &self.name,
            &fabric,
            &c.ca_pem,
            "system:kube-proxy",
            &c.proxy,
            None,
        );
        write("proxy.kubeconfig", &proxy)?;
        for (node, token) in &c.kubelets {
            let user = format!("system:node:{node}");
            let text = kubeconfig_yaml(&self.name, &fabric, &c.ca_pem, &user, token, None);
            write(&format!("kubelet-{node}.kubeconfig"), &text)?;
        }
        Ok(())
    }

    /// Starts kpx-control inside the fabric namespace and waits until it answers.
    pub async fn start_api(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path("kpx-control"))?;
        let child = self
            .fabric
            .command(binary("kpx-control")?)
            .args([
                "--bind-address",
                &API_ADDRESS.to_string(),
                "--port",
                &API_PORT.to_string(),
            ])
            .arg("--data-dir")
            .arg(self.store_dir())
            .arg("--token-auth-file")
            .arg(self.secret_path("tokens.csv"))
            .arg("--kubelet-client-token-file")
            .arg(self.secret_path("kubelet-client.token"))
            .arg("--tls-cert-file")
            .arg(self.secret_path("apiserver.crt"))
            .arg("--tls-private-key-file")
            .arg(self.secret_path("apiserver.key"))
            .args([
                "--service-cluster-ip-range",
                &format!(
                    "{SERVICE_RANGE},{}/{}",
                    SERVICE_RANGE_V6.0, SERVICE_RANGE_V6.1
                ),
            ])
            .args(&self.api_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting kpx-control")?;
        self.api = Some(child);
        self.wait_api().await
    }

    /// Waits for kpx-control to answer: a generous deadline (a busy machine may take seconds
    /// to start it), but at once an error with its exit status and log when it has exited.
    async fn wait_api(&mut self) -> anyhow::Result<()> {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + API_START_DEADLINE;
        loop {
            if client.version().await.is_ok() {
                return Ok(());
            }
            let log = self.log_path("kpx-control");
            let exited = match self.api.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => bail!("kpx-control was stopped while starting"),
            };
            if let Some(status) = exited {
                self.api = None;
                bail!(
                    "kpx-control exited while starting ({status}); the end of {}:\n{}",
                    log.display(),
                    log_tail(&log, 20)
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "kpx-control did not answer within {API_START_DEADLINE:?} (still running); \
                     the end of {}:\n{}",
                    log.display(),
                    log_tail(&log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` of the API server: its watches break as in a crash. On purpose: it is not
    /// restarted by supervision until `start_api`.
    pub fn kill_api(&mut self) {
        self.supervisor.stopped(crate::supervise::Component::Api);
        if let Some(mut child) = self.api.take() {
            // std's kill does nothing once the child was reaped (its pid may be reused).
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The API server's process handle, for supervision.
    pub(crate) fn api_slot(&mut self) -> &mut Option<Child> {
        &mut self.api
    }

    /// Node `i`'s proxy's process handle, for supervision.
    pub(crate) fn proxy_slot(&mut self, i: usize) -> &mut Option<Child> {
        &mut self.nodes[i].proxy
    }

    /// A client of the lab's API as its admin (through the loopback relay).
    pub fn client(&self) -> Client {
        let config = ClientConfig {
            server: self.api_url.clone(),
            ca_pem: Some(self.credentials.ca_pem.clone().into_bytes()),
            token: Some(self.credentials.admin.clone()),
            ..Default::default()
        };
        Client::new(&config)
            .expect("a loopback URL, a generated CA and a hex token are a valid client config")
    }

    async fn add_node(&mut self, i: u8) -> anyhow::Result<()> {
        let name = format!("node-{i}");
        let ns = Netns::create(&format!("{}-n{i}", self.name)).await?;
        let cgroup = match &self.cgroup {
            Some(root) => {
                let dir = root.join(&name);
                std::fs::create_dir(&dir)?;
                Some(dir)
            }
            None => None,
        };
        let ip = Ipv4Addr::new(198, 18, 0, 10 + i);
        ns.add_veth("eth0", &self.fabric, "fab0", &format!("n{i}"))
            .await?;
        self.fabric.attach(&format!("n{i}"), "br0").await?;
        let ip6 = node_ip6(i);
        ns.add_address("eth0", ip.into(), 24).await?;
        ns.add_address("eth0", ip6.into(), 64).await?;
        ns.add_bridge("cbr0").await?;
        ns.add_address("cbr0", Ipv4Addr::new(198, 19, i, 1).into(), 24)
            .await?;
        ns.add_address("cbr0", pod_net6(i, 1).into(), 64).await?;
        // Local traffic to a ClusterIP needs a route before its DNAT in OUTPUT.
        let (svc, svc_len) = (Ipv4Addr::new(198, 18, 128, 0), 17);
        ns.add_route(svc.into(), svc_len, None, Some("eth0"))
            .await?;
        ns.add_route(
            SERVICE_RANGE_V6.0.into(),
            SERVICE_RANGE_V6.1,
            None,
            Some("eth0"),
        )
        .await?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for other in &self.nodes {
            ns.add_route(
                pod_net6(other.index, 0).into(),
                64,
                Some(other.ip6.into()),
                None,
            )
            .await?;
            other
                .ns
                .add_route(pod_net6(i, 0).into(), 64, Some(ip6.into()), None)
                .await?;
            ns.add_route(
                Ipv4Addr::new(198, 19, other.index, 0).into(),
                24,
                Some(other.ip.into()),
                None,
            )
            .await?;
            other
                .ns
                .add_route(
                    Ipv4Addr::new(198, 19, i, 0).into(),
                    24,
                    Some(ip.into()),
                    None,
                )
                .await?;
        }
        self.nodes.push(Node {
            name,
            ns,
            ip,
            ip6,
            index: i,
            cgroup,
            proxy: None,
            kubelet: None,
        });
        self.pod_counts.push(0);
        Ok(())
    }

    async fn add_external(&mut self, k: u8) -> anyhow::Result<()> {
        let ns = Netns::create(&format!("{}-x{k}", self.name)).await?;
        ns.add_veth("eth0", &self.fabric, "fab0", &format!("x{k}"))
            .await?;
        self.fabric.attach(&format!("x{k}"), "br0").await?;
        ns.add_address("eth0", Ipv4Addr::new(198, 18, 0, 200 + k).into(), 24)
            .await?;
        ns.add_address("eth0", external_ip6(k).into(), 64).await?;
        if let Some(first) = self.nodes.first() {
            // External and load-balancer IPs are announced by node 1.
            ns.add_route(
                EXTERNAL_RANGE.0.into(),
                EXTERNAL_RANGE.1,
                Some(first.ip.into()),
                None,
            )
            .await?;
        }
        self.externals.push(ns);
        Ok(())
    }

    fn log(&self, name: &str) -> anyhow::Result<Stdio> {
        Ok(std::fs::File::create(self.dir.path().join(format!("{name}.log")))?.into())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Wrappers in front of the restore tools that fail while `fail_restores(true)` is in
    /// effect, so tests can watch the proxy keep old rules and retry.
    fn write_fault_wrappers(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.dir.path().join("bin");
        std::fs::create_dir_all(&bin)?;
        for tool in [
            "iptables-nft-restore",
            "iptables-legacy-restore",
            "ip6tables-nft-restore",
            "ip6tables-legacy-restore",
            // The nftables backend's loader: every `nft` run fails, its reads too (the
            // backend reads names back over netlink, not through nft).
            "nft",
        ] {
            let real = ["/usr/sbin", "/sbin", "/usr/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists());
            let Some(real) = real else { continue };
            let script = format!(
                "#!/bin/sh\nif [ -e {flag} ]; then echo 'kpx-lab: injected restore failure' >&2; exit 1; fi\nexec {real} \"$@\"\n",
                flag = self.dir.path().join("fail-restore").display(),
                real = real.display()
            );
            let path = bin.join(tool);
            std::fs::write(&path, script)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// Makes every iptables-restore (and `nft` run) of this lab's proxies fail (or work again).
    pub fn fail_restores(&self, fail: bool) -> anyhow::Result<()> {
        let flag = self.dir.path().join("fail-restore");
        if fail {
            std::fs::write(flag, "")?;
        } else if flag.exists() {
            std::fs::remove_file(flag)?;
        }
        Ok(())
    }

    /// (Re)starts the proxy of node `i`.
    pub fn start_proxy(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_proxy(i);
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&format!("proxy-{}", node.name)))?;
        let err = log.try_clone()?;
        let mut cmd = self.proxy_command(i)?;
        // As kubeadm's DaemonSet: --hostname-override stays a flag (one file serves every node).
        cmd.args(["--master", &format!("https://{API_ADDRESS}:{API_PORT}")])
            .args(["--hostname-override", &node.name]);
        if self.proxy_config(i).is_none() {
            cmd.arg("--kubeconfig")
                .arg(self.secret_path("proxy.kubeconfig"))
                .args([
                    "--cluster-cidr",
                    &format!("{CLUSTER_CIDR},{CLUSTER_CIDR_V6}"),
                ])
                .args([
                    "--min-sync-period",
                    "0s",
                    "--sync-period",
                    &self.proxy_sync_period,
                ]);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.dir.path().join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting kpx-proxy in {}", node.ns.name))?;
        self.nodes[i].proxy = Some(child);
        Ok(())
    }

    /// How node `i`'s proxy ended, if it has.
    pub fn proxy_exit(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].proxy.as_mut()?.try_wait().ok().flatten()
    }

    /// The process id of node `i`'s proxy, while it runs.
    pub fn proxy_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].proxy.as_ref().map(Child::id)
    }

    /// The bpffs directory node `i`'s proxy pins its maps in (ebpf labs).
    pub fn pin_dir(&self, i: usize) -> Option<PathBuf> {
        self.bpffs.as_ref().map(|d| d.join(&self.nodes[i].name))
    }

    /// Makes node `i`'s proxy read `file` (a KubeProxyConfiguration) with `--config` from its
    /// next (re)start, and `dump` / `--cleanup` runs too; `None` goes back to flags.
    pub fn use_proxy_config(&mut self, i: usize, file: Option<PathBuf>) {
        if self.proxy_configs.len() <= i {
            self.proxy_configs.resize(i + 1, None);
        }
        self.proxy_configs[i] = file;
    }

    fn proxy_config(&self, i: usize) -> Option<&PathBuf> {
        self.proxy_configs.get(i).and_then(Option::as_ref)
    }

    /// `kpx-proxy` in node `i` with the lab's backend flags (for `dump`, `--cleanup`, runs).
    pub fn proxy_command(&self, i: usize) -> anyhow::Result<std::process::Command> {
        let node = &self.nodes[i];
        // setns rather than `ip netns exec`, whose fresh /sys hides the cgroup v2 mount.
        let mut cmd = node.ns.entry()?.command(binary("kpx-proxy")?)?;
        match self.proxy_config(i) {
            // The file names the mode; the other backend flags are kpx's own.
            Some(file) => {
                let args = self.backend.args();
                let flags = args.chunks(2).filter(|pair| pair[0] != "--proxy-mode");
                cmd.arg("--config").arg(file).args(flags.flatten());
            }
            None => {
                cmd.args(self.backend.args());
            }
        }
        // Every mode gets the lab's own pin directory: starting in another mode (and
        // `--cleanup`) removes the eBPF mode's pins there, never under the host's /sys/fs/bpf.
        let pins = match self.pin_dir(i) {
            Some(pins) => pins,
            None if self.backend == ProxyBackend::Ebpf => bail!("the ebpf lab has no bpffs"),
            None => self.dir.path().join("bpffs").join(&node.name),
        };
        cmd.arg("--bpf-pin-dir").arg(pins);
        if self.backend == ProxyBackend::Ebpf {
            match &node.cgroup {
                Some(cg) => cmd.arg("--cgroup-root").arg(cg),
                None => cmd.args(["--cgroup-root", "none"]),
            };
        }
        Ok(cmd)
    }

    /// Removes what node `i`'s proxy programmed behind its back: flushes the nat and filter
    /// tables (iptables), every chain of kpx's tables (nftables: `nft flush table` empties the
    /// chains and keeps the maps and their elements, as `iptables -F` keeps the chains), or
    /// deletes every Service frontend from the pinned map (ebpf), or clears the IPVS table
    /// (`ipvsadm -C`: every virtual server, as a foreign tool would).
    pub fn flush_programmed(&self, i: usize) -> anyhow::Result<()> {
        let tool = match self.backend {
            ProxyBackend::Ipvs => {
                let status = self.nodes[i].ns.command("ipvsadm").arg("-C").status()?;
                anyhow::ensure!(status.success(), "ipvsadm -C (is ipvsadm installed?)");
                return Ok(());
            }
            ProxyBackend::IptablesNft => "iptables-nft",
            ProxyBackend::IptablesLegacy => "iptables-legacy",
            ProxyBackend::Nftables => {
                let ns = &self.nodes[i].ns;
                let status = ns
                    .command("nft")
                    .args(["flush", "table", "ip", "kpx"])
                    .status()?;
                anyhow::ensure!(status.success(), "flushing table ip kpx");
                // The IPv6 table exists once the proxy has synced that family.
                let _ = ns
                    .command("nft")
                    .args(["flush", "table", "ip6", "kpx"])
                    .stderr(Stdio::null())
                    .status();
                return Ok(());
            }
            ProxyBackend::Ebpf => {
                let pin = self
                    .pin_dir(i)
                    .context("the ebpf lab has no bpffs")?
                    .join("kpx_services");
                let data = aya::maps::MapData::from_pin(&pin)?;
                let mut map: aya::maps::HashMap<
                    aya::maps::MapData,
                    kpx_ebpf::layout::ServiceKey,
                    kpx_ebpf::layout::ServiceValue,
                > = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
                let keys: Vec<_> = map.keys().filter_map(Result::ok).collect();
                for key in keys {
                    map.remove(&key)?;
                }
                return Ok(());
            }
        };
        for table in ["nat", "filter"] {
            let status = self.nodes[i]
                .ns
                .command(tool)
                .args(["-t", table, "-F"])
                .status()?;
            anyhow::ensure!(status.success(), "flushing {table}");
        }
        Ok(())
    }

    /// `kill -9` of node `i`'s proxy: nothing of it runs its exit path. On purpose: it is not
    /// restarted by supervision until `start_proxy`.
    pub fn kill_proxy(&mut self, i: usize) {
        self.supervisor
            .stopped(crate::supervise::Component::Proxy(i));
        if let Some(mut child) = self.nodes[i].proxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `i`'s proxy (SIGTERM); on purpose, as `kill_proxy`.
    pub fn stop_proxy(&mut self, i: usize) {
        self.supervisor
            .stopped(crate::supervise::Component::Proxy(i));
        if let Some(child) = self.nodes[i].proxy.take() {
            terminate(child);
        }
    }

    /// A pod on node `node` running the workload, made by the lab itself (labs without
    /// kubelets; in a cluster, create Pods through the API); returns its index in `pods`.
    pub async fn add_pod(&mut self, node: usize, name: &str) -> anyhow::Result<usize> {
        anyhow::ensure!(
            self.cluster.is_none(),
            "add_pod is for labs without kubelets: create a Pod through the API instead"
        );
        self.pod_counts[node] += 1;
        let j = self.pod_counts[node];
        let n = &self.nodes[node];
        let ns = Netns::create(&format!("{}-n{}-p{j}", self.name, n.index)).await?;
        let ip = Ipv4Addr::new(198, 19, n.index, 10 + j);
        let ip6 = pod_net6(n.index, 10 + u16::from(j));
        n.ns.add_veth(&format!("p{j}"), &ns, &format!("t{j}"), "eth0")
            .await?;
        n.ns.attach(&format!("p{j}"), "cbr0").await?;
        n.ns.hairpin(&format!("p{j}")).await?;
        ns.add_address("eth0", ip.into(), 24).await?;
        ns.add_address("eth0", ip6.into(), 64).await?;
        ns.add_route(
            Ipv4Addr::UNSPECIFIED.into(),
            0,
            Some(Ipv4Addr::new(198, 19, n.index, 1).into()),
            None,
        )
        .await?;
        ns.add_route(
            Ipv6Addr::UNSPECIFIED.into(),
            0,
            Some(pod_net6(n.index, 1).into()),
            None,
        )
        .await?;
        let mut entry = ns.entry()?;
        if let Some(cg) = &n.cgroup {
            entry = entry.in_cgroup(cg.clone());
        }
        let workload = entry
            .command(binary("kpx-workload")?)?
            .args(["--name", name])
            .stdout(Stdio::null())
            .stderr(self.log(&format!("pod-{name}"))?)
            .spawn()?;
        self.pods.push(Pod {
            name: name.to_string(),
            node,
            ip,
            ip6,
            ns,
            workload: Some(workload),
        });
        let index = self.pods.len() - 1;
        // Ready once its HTTP port answers locally.
        for _ in 0..200 {
            let target = SocketAddr::from((ip, 8080));
            let ok = self.pods[index].ns.enter(move || {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok()
            })?;
            if ok {
                return Ok(index);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("pod {name} did not start listening")
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    /// Stops a pod's workload (its address stops answering).
    pub fn stop_pod(&mut self, name: &str) {
        if let Some(pod) = self.pods.iter_mut().find(|p| p.name == name) {
            if let Some(mut child) = pod.workload.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn node_of(&self, pod: &str) -> &Node {
        &self.nodes[self.pod(pod).node]
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The proxy logs, for failure messages.
    pub fn proxy_logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(self.log_path(&format!("proxy-{}", n.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `iptables-save` (of the lab's flavour) in a node, for failure messages and checks;
    /// in an nftables lab `nft list ruleset` (kpx's tables and anyone else's); in an ipvs lab
    /// `ipvsadm -Ln` then `iptables-save` (the IPVS table, then the iptables part).
    pub fn iptables_save(&self, node: usize) -> String {
        let mut cmd = match self.backend {
            ProxyBackend::IptablesNft => self.nodes[node].ns.command("iptables-nft-save"),
            ProxyBackend::IptablesLegacy | ProxyBackend::Ebpf => {
                self.nodes[node].ns.command("iptables-legacy-save")
            }
            ProxyBackend::Nftables => {
                let mut cmd = self.nodes[node].ns.command("nft");
                cmd.args(["list", "ruleset"]);
                cmd
            }
            ProxyBackend::Ipvs => {
                let mut cmd = self.nodes[node].ns.command("sh");
                cmd.args(["-c", "ipvsadm -Ln; iptables-save"]);
                cmd
            }
        };
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    pub fn external_ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            EXTERNAL_RANGE.0.octets()[0],
            EXTERNAL_RANGE.0.octets()[1],
            EXTERNAL_RANGE.0.octets()[2],
            n,
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.kubelet.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Every process the lab placed in its cgroups: pods' containers, clients, proxies.
        if let Some(root) = &self.cgroup {
            let _ = std::fs::write(root.join("cgroup.kill"), "1");
        }
        for i in 0..self.nodes.len() {
            if let Some(mut child) = self.nodes[i].proxy.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for pod in &mut self.pods {
            if let Some(mut child) = pod.workload.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.kill_api();
        if let Some(relay) = self.relay.take() {
            relay.abort();
        }
        // Namespaces are deleted as their `Netns` values drop, pods first.
        self.pods.clear();
        // Pods made by kubelets are namespaces no `Netns` value owns.
        for node in &self.nodes {
            let _ = down_namespaces(&format!("{}-n{}-", self.name, node.index));
        }
        self.externals.clear();
        self.nodes.clear();
        // Unmounting the bpffs drops the pinned links and maps with it.
        if let Some(dir) = self.bpffs.take() {
            let _ = std::process::Command::new("umount").arg(&dir).status();
        }
        if let Some(root) = self.cgroup.take() {
            // Killed processes leave their cgroups a moment after the kill.
            for _ in 0..50 {
                remove_cgroup(&root);
                if !root.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// SIGTERM to a child, then reaps it; nothing is signalled if it has already exited and been
/// reaped (its process id may belong to another process by now).
pub(crate) fn terminate(mut child: Child) {
    if let Ok(None) = child.try_wait() {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let _ = child.wait();
}

/// Relays loopback connections on the host to the API server inside the fabric: the outbound
/// socket is created inside the fabric namespace, so the host needs no route into the lab.
async fn relay(listener: std::net::TcpListener, fabric: crate::netns::Entry) {
    let fabric = Arc::new(fabric);
    let Ok(listener) = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    else {
        return;
    };
    while let Ok((mut inbound, _)) = listener.accept().await {
        let fabric = fabric.clone();
        tokio::spawn(async move {
            let target = SocketAddr::from((API_ADDRESS, API_PORT));
            let connected = tokio::task::spawn_blocking(move || {
                fabric.enter(move || {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
                })
            })
            .await;
            let Ok(Ok(Ok(stream))) = connected else {
                return;
            };
            if stream.set_nonblocking(true).is_err() {
                return;
            }
            if let Ok(mut outbound) = tokio::net::TcpStream::from_std(stream) {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Removes a lab's cgroup and those under it (nodes, pods, containers), deepest first; each
/// is empty once its processes are gone.
fn remove_cgroup(root: &Path) {
    if let Ok(children) = std::fs::read_dir(root) {
        for child in children.flatten() {
            if child.path().is_dir() {
                remove_cgroup(&child.path());
            }
        }
    }
    let _ = std::fs::remove_dir(root);
}

/// Removes every namespace (and the processes in it) whose name starts with `prefix`, and the
/// labs' bpffs mounts and cgroups.
pub fn down(prefix: &str) -> anyhow::Result<usize> {
    let count = down_namespaces(prefix)?;
    for mount in lab_mounts(prefix) {
        let _ = std::process::Command::new("umount").arg(&mount).status();
    }
    // The directories of labs whose process died (their bpffs is unmounted by now).
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(prefix) && entry.path().is_dir() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    if let Some(root) = kpx_control::netns::cgroup2_root() {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
                for _ in 0..50 {
                    remove_cgroup(&entry.path());
                    if !entry.path().exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    Ok(count)
}

/// Kills the processes in every namespace whose name starts with `prefix`, and removes them.
fn down_namespaces(prefix: &str) -> anyhow::Result<usize> {
    let names = crate::netns::list(prefix);
    for name in &names {
        crate::netns::kill_processes(name);
        crate::netns::delete(name)?;
    }
    Ok(names.len())
}
