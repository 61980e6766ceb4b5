//! The IPVS backend's partial syncs keep exact books: after every partial sync, what the
//! kernel holds (IPVS virtual and real servers, kpx's ipsets and their members, the addresses
//! on kpx-ipvs0, kpx's iptables chains) is what a full sync of the same state then leaves —
//! a full sync reads the kernel back and writes the difference, so any member, address or
//! server the partial sync's reference counts got wrong shows as a difference.
//!
//! The history is a fixed pseudo-random walk (seeded, so a failure replays) over Services that
//! share pods, an external IP and a port, switch `externalTrafficPolicy` (firewall-mark servers
//! and per-frontend chains), lose and regain every endpoint (the reject set), use UDP
//! (deleted at once) and TCP (drained), and are deleted and created again. Needs IPVS (the
//! VM's kernel: `cargo xtask vm-test --tests ipvs_partial`); on this host it says so and skips.

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_lab::scratch::ScratchNetns;
use kpx_proxy::backend::{Backend, NodeAddress, NodeState, SyncInput, SyncReport};
use kpx_proxy::ipvs::plan::PlanConfig;
use kpx_proxy::ipvs::{IpvsBackend, IpvsConfig};
use kpx_proxy::model::{ChangeTracker, Changes, ProxyState};
use kpx_proxy::netfilter::Tool;
use serde_json::{json, Value};

const NODE: &str = "this-node";
const NODE_IP: &str = "198.18.0.10";
const EXTERNAL_IP: &str = "198.18.64.1";
const SERVICES: usize = 5;
const STEPS: usize = 12;
const SEED: u64 = 0x6b70_7876;

/// xorshift64*: deterministic, so a failing step can be replayed from the seed.
struct Walk(u64);

impl Walk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One Service's shape in the walk.
#[derive(Clone, Debug)]
struct Shape {
    udp: bool,
    external_ip: bool,
    node_port: bool,
    local: bool,
    affinity: bool,
    /// Pods (from one pool of six, shared between Services) and whether each is on this node.
    endpoints: Vec<(u8, bool)>,
}

fn service(i: usize, s: &Shape) -> Service {
    let protocol = if s.udp { "UDP" } else { "TCP" };
    let mut port = json!({"name": "p", "port": 80, "protocol": protocol, "targetPort": 8080});
    let mut spec = json!({
        "clusterIP": format!("198.18.200.{}", i + 1),
        "type": if s.node_port { "NodePort" } else { "ClusterIP" },
    });
    if s.node_port {
        port["nodePort"] = json!(30080 + i);
        spec["externalTrafficPolicy"] = json!(if s.local { "Local" } else { "Cluster" });
    }
    if s.external_ip {
        spec["externalIPs"] = json!([EXTERNAL_IP]);
        if !s.node_port {
            spec["externalTrafficPolicy"] = json!(if s.local { "Local" } else { "Cluster" });
        }
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 600}});
    }
    spec["ports"] = json!([port]);
    serde_json::from_value(
        json!({"metadata": {"name": format!("web-{i}"), "namespace": "t"}, "spec": spec}),
    )
    .expect("a Service the walk builds")
}

fn slice(i: usize, s: &Shape) -> EndpointSlice {
    let protocol = if s.udp { "UDP" } else { "TCP" };
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|(pod, local)| {
            json!({"addresses": [format!("198.19.0.{pod}")], "conditions": {"ready": true},
                   "nodeName": if *local { NODE } else { "other" }})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("web-{i}-1"), "namespace": "t",
                     "labels": {"kubernetes.io/service-name": format!("web-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
    }))
    .expect("a slice the walk builds")
}

fn random_shape(walk: &mut Walk) -> Shape {
    let mut endpoints = Vec::new();
    for pod in 1..=6u8 {
        if walk.below(2) == 0 {
            endpoints.push((pod, walk.below(2) == 0));
        }
    }
    Shape {
        udp: walk.below(4) == 0,
        external_ip: walk.below(3) == 0,
        node_port: walk.below(3) == 0,
        local: walk.below(2) == 0,
        affinity: walk.below(5) == 0,
        endpoints,
    }
}

fn config() -> IpvsConfig {
    IpvsConfig {
        plan: PlanConfig {
            cluster_cidr: Some("198.19.0.0/16".into()),
            scheduler: "rr".into(),
            ..PlanConfig::default()
        },
        iptables: Tool::detect(false),
        strict_arp: false,
        tcp_timeout: std::time::Duration::ZERO,
        tcpfin_timeout: std::time::Duration::ZERO,
        udp_timeout: std::time::Duration::ZERO,
        exclude_cidrs: Vec::new(),
    }
}

fn node() -> NodeState {
    NodeState {
        addresses: vec![NodeAddress {
            interface: "eth0".into(),
            ip: NODE_IP.parse().expect("an address"),
        }],
    }
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything of kpx's the kernel holds, as sorted lines (counters dropped).
fn kernel_state(tool: &Tool) -> anyhow::Result<BTreeSet<String>> {
    let mut lines = BTreeSet::new();
    for l in run(&["ipvsadm", "-Sn"])?.lines() {
        lines.insert(format!("ipvs {l}"));
    }
    for l in run(&["ipset", "save"])?.lines() {
        if l.contains(" KPXV-") {
            // A full sync swaps in sets made afresh: their hash seed differs, nothing else.
            let l = match l.split_once(" initval ") {
                Some((head, _)) => head,
                None => l,
            };
            lines.insert(format!("ipset {l}"));
        }
    }
    for l in run(&["ip", "-o", "addr", "show", "dev", "kpx-ipvs0"])?.lines() {
        if let Some(addr) = l.split_whitespace().skip_while(|w| *w != "inet").nth(1) {
            lines.insert(format!("addr {addr}"));
        }
    }
    for l in run(&[&tool.binary("-save")])?.lines() {
        if l.contains("KPXV") {
            let l = if l.starts_with(':') {
                l.split(' ').take(2).collect::<Vec<_>>().join(" ")
            } else {
                l.to_string()
            };
            lines.insert(format!("iptables {l}"));
        }
    }
    Ok(lines)
}

fn difference(partial: &BTreeSet<String>, full: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for l in partial.difference(full) {
        out.push_str(&format!("  only after the partial sync: {l}\n"));
    }
    for l in full.difference(partial) {
        out.push_str(&format!("  only after the full sync:    {l}\n"));
    }
    out
}

fn sync(
    backend: &mut IpvsBackend,
    state: &ProxyState,
    changes: &Changes,
    full: bool,
) -> anyhow::Result<SyncReport> {
    Ok(backend.sync(SyncInput {
        state,
        changes,
        full,
        node: &node(),
    })?)
}

fn walk() -> anyhow::Result<()> {
    run(&["ip", "link", "set", "lo", "up"])?;
    let cfg = config();
    let tool = cfg.iptables;
    let mut backend = IpvsBackend::new(cfg, true)?;
    let mut tracker = ChangeTracker::new(NODE);
    let mut walk = Walk(SEED);
    let mut shapes: Vec<Option<Shape>> = (0..SERVICES).map(|_| None).collect();
    for (i, shape) in shapes.iter_mut().enumerate() {
        let s = random_shape(&mut walk);
        tracker.apply_service(service(i, &s));
        tracker.apply_slice(slice(i, &s));
        *shape = Some(s);
    }
    let (mut state, _) = tracker.snapshot(&ProxyState::default());
    sync(&mut backend, &state, &Changes::default(), true)?;
    for step in 0..STEPS {
        let i = walk.below(SERVICES as u64) as usize;
        let what = match (&shapes[i], walk.below(6)) {
            (None, _) => {
                let s = random_shape(&mut walk);
                tracker.apply_service(service(i, &s));
                tracker.apply_slice(slice(i, &s));
                shapes[i] = Some(s);
                "created again"
            }
            (Some(s), 0) => {
                tracker.delete_slice(&slice(i, s));
                tracker.delete_service(&service(i, s));
                shapes[i] = None;
                "deleted"
            }
            (Some(s), 1) => {
                let mut s = s.clone();
                s.endpoints.clear();
                tracker.apply_slice(slice(i, &s));
                shapes[i] = Some(s);
                "lost every endpoint"
            }
            (Some(s), 2) => {
                let mut s = s.clone();
                s.local = !s.local;
                s.external_ip = true;
                tracker.apply_service(service(i, &s));
                shapes[i] = Some(s);
                "switched externalTrafficPolicy"
            }
            (Some(s), _) => {
                let endpoints = random_shape(&mut walk).endpoints;
                let s = Shape {
                    endpoints,
                    ..s.clone()
                };
                tracker.apply_slice(slice(i, &s));
                shapes[i] = Some(s);
                "endpoints changed"
            }
        };
        let (next, changes) = tracker.snapshot(&state);
        let report = sync(&mut backend, &next, &changes, false)?;
        anyhow::ensure!(!report.full, "step {step}: the partial sync turned full");
        state = next;
        let after_partial = kernel_state(&tool)?;
        sync(&mut backend, &state, &Changes::default(), true)?;
        let after_full = kernel_state(&tool)?;
        anyhow::ensure!(
            after_partial == after_full,
            "step {step} (seed {SEED:#x}): web-{i} {what} ({:?}); the partial sync left the \
             kernel other than a full sync does:\n{}",
            shapes[i],
            difference(&after_partial, &after_full)
        );
        anyhow::ensure!(
            backend.lost_state().is_none(),
            "step {step}: lost state right after a sync: {:?}",
            backend.lost_state()
        );
    }
    backend.cleanup()?;
    Ok(())
}

#[test]
fn partial_syncs_leave_the_kernel_as_a_full_sync_does() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    let (_guard, entry) = ScratchNetns::new("ipvsp", "walk").expect("a scratch namespace");
    let missing = entry
        .enter(|| {
            kpx_proxy::ipvs::netlink::Ipvs::open()
                .err()
                .map(|e| e.to_string())
        })
        .expect("entering the namespace");
    if let Some(why) = missing {
        eprintln!(
            "SKIPPED ipvs: the kernel has no IPVS here ({why}); `cargo xtask vm-test` runs it"
        );
        return;
    }
    entry
        .enter(walk)
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("{e:#}"));
}
