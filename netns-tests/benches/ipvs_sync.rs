//! The IPVS backend's figures, on a kernel with IPVS (the VM's: `cargo xtask vm-test --benches
//! ipvs_sync`; a kernel without IPVS says so and skips), each round in a fresh network
//! namespace (root needed):
//! 1. full sync of N Services × 10 endpoints through `IpvsBackend`, beside the loaders of the
//!    same state timed together: `ipset restore` of the same sets (`ipset::full_text`) and
//!    `ipvsadm -R` of the same virtual and real servers (written in `ipvsadm -S` form from
//!    `Plan::of`); `ip -b` binding the same addresses is shown beside them, since kpx binds
//!    them too; rounds interleaved (loaders, kpx), medians with the range;
//! 2. one endpoint changed among N (`KPX_BENCH_CHANGES`, 30, each on another Service): the
//!    partial sync's time p50 / p90 / max and the IPVS netlink messages it sent, beside the
//!    eBPF backend's partial sync for the same changes in the same run (its maps loaded, as
//!    `ebpf_sync` does), and the netlink round trips kube-proxy's IPVS proxier makes for the
//!    same state on every sync (at least three per virtual server);
//! 3. first-packet latency (TCP connect + first byte) from a client namespace over a veth to
//!    a ClusterIP in the node's namespace and on to an endpoint namespace, beside connecting
//!    to the endpoint's address directly, at `KPX_BENCH_LATENCY_SCALES` (1,1000,10000)
//!    Services, `KPX_BENCH_CONNECTS` (200) connects each, interleaved, medians.
//!
//! A table and `ipvs_sync.json` (`KPX_BENCH_JSON` to put it elsewhere; the temporary
//! directory by default, since the VM's host root is read-only) are the output.
//!
//! Run: `cargo xtask vm-test --benches ipvs_sync` (`KPX_BENCH_SCALES=1000,10000`).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aya::Ebpf;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::netns::Entry;
use kpx_ebpf::apply::apply;
use kpx_ebpf::objects::{self, Capacity};
use kpx_ebpf::plan::{plan, plan_keys, Programmed};
use kpx_proxy::backend::{Backend, NodeState, SyncInput};
use kpx_proxy::ebpf::wanted::{NodeConfigs, WantedTable};
use kpx_proxy::ipvs::plan::{ip_port, MarkAllocator, Plan, PlanConfig, VsKey};
use kpx_proxy::ipvs::{ipset, IpvsBackend, IpvsConfig};
use kpx_proxy::model::{ChangeTracker, Changes, Protocol, ProxyState};
use kpx_proxy::netfilter::Tool;
use serde_json::{json, Value};

mod fixtures;

use fixtures::{median, service, slice, ENDPOINTS};

/// Full-sync rounds per scale (`KPX_BENCH_ROUNDS` for fewer where TCG makes a round long).
const ROUNDS: usize = 3;
const CLUSTER_CIDR: &str = "198.19.0.0/16";
/// The latency probe: a Service of its own with one endpoint that answers.
const PROBE_VIP: &str = "198.18.127.1";
const PROBE_ENDPOINT: &str = "198.18.2.2";
const PARENT_NETNS: &str = "KPX_BENCH_PARENT_NETNS";

fn own_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .expect("/proc/self/ns/net")
        .display()
        .to_string()
}

/// The modes that write IPVS and ipsets run only in a namespace of their own.
fn assert_not_parent_namespace() {
    let parent = std::env::var(PARENT_NETNS).expect("--inside is started by the benchmark");
    assert_ne!(
        own_netns(),
        parent,
        "the ipvs benchmark must not run in the namespace it was started from"
    );
}

fn config() -> IpvsConfig {
    IpvsConfig {
        plan: PlanConfig {
            cluster_cidr: Some(CLUSTER_CIDR.into()),
            ..PlanConfig::default()
        },
        iptables: Tool::detect(false),
        strict_arp: false,
        tcp_timeout: Duration::ZERO,
        tcpfin_timeout: Duration::ZERO,
        udp_timeout: Duration::ZERO,
        exclude_cidrs: Vec::new(),
    }
}

fn state_of(services: usize) -> (ChangeTracker, ProxyState, Changes) {
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..services {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let (state, changes) = tracker.snapshot(&ProxyState::default());
    (tracker, state, changes)
}

fn run_with_stdin(program: &str, args: &[&str], stdin: &str) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The plan's virtual and real servers as `ipvsadm -S -n` writes them, for `ipvsadm -R`.
fn ipvsadm_text(plan: &Plan) -> String {
    let mut out = String::new();
    for (key, vs) in plan.services() {
        let service = match key {
            VsKey::Addr { ip, port, protocol } => {
                let flag = match protocol {
                    Protocol::Tcp => "-t",
                    Protocol::Udp => "-u",
                    Protocol::Sctp => "--sctp-service",
                };
                format!("{flag} {}", ip_port(ip, port))
            }
            VsKey::Fwmark(mark) => format!("-f {mark}"),
        };
        let persistent = vs
            .persistence
            .map(|t| format!(" -p {t}"))
            .unwrap_or_default();
        let _ = writeln!(out, "-A {service} -s {}{persistent}", vs.scheduler);
        for (ip, port) in &vs.dests {
            let _ = writeln!(out, "-a {service} -r {} -m -w 1", ip_port(*ip, *port));
        }
    }
    out
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Inside a fresh namespace: the loaders of the state of `services`, timed.
fn loaders(services: usize) -> Value {
    assert_not_parent_namespace();
    let (_, state, _) = state_of(services);
    let cfg = config();
    let plan = Plan::of(&cfg.plan, &state, &[], &mut MarkAllocator::default());
    let ipvsadm = ipvsadm_text(&plan);
    let sets = ipset::full_text(false, &plan.members());
    let addresses: String = plan
        .addresses()
        .iter()
        .map(|ip| format!("address add {ip}/32 dev kpx-ipvs0\n"))
        .collect();
    let start = Instant::now();
    run_with_stdin("ipset", &["restore"], &sets);
    let ipset_ms = ms(start);
    let start = Instant::now();
    run_with_stdin("ipvsadm", &["-R"], &ipvsadm);
    let ipvsadm_ms = ms(start);
    run(&["ip", "link", "add", "kpx-ipvs0", "type", "dummy"]);
    let start = Instant::now();
    run_with_stdin("ip", &["-b", "-"], &addresses);
    let ip_ms = ms(start);
    let listed = run(&["ipvsadm", "-Ln"])
        .lines()
        .filter(|l| l.starts_with("TCP") || l.starts_with("UDP") || l.starts_with("FWM"))
        .count();
    assert_eq!(
        listed,
        plan.services().len(),
        "ipvsadm -R loaded another number of virtual servers"
    );
    json!({"ipsetMs": ipset_ms, "ipvsadmMs": ipvsadm_ms, "ipBatchMs": ip_ms,
        "virtualServers": plan.services().len(), "ipvsadmLines": ipvsadm.lines().count(),
        "ipsetLines": sets.lines().count(), "addresses": plan.addresses().len()})
}

/// `count` Services spread over the table, distinct.
fn spread_services(services: usize, count: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut k = 0;
    while out.len() < count.min(services) && k < 4 * services + count {
        let i = (k * 7919) % services;
        k += 1;
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn percentiles(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    json!({"p50Ms": at(0.5), "p90Ms": at(0.9), "maxMs": samples[samples.len() - 1],
        "changes": samples.len()})
}

/// Inside a fresh namespace: kpx's full sync of `services`, then (when `changes` > 0) one
/// endpoint changed on each of `changes` Services, a partial sync each.
fn kpx(services: usize, changes: usize) -> Value {
    assert_not_parent_namespace();
    let (mut tracker, mut state, changes0) = state_of(services);
    let mut backend = IpvsBackend::new(config(), true).expect("IpvsBackend::new");
    let start = Instant::now();
    let report = backend
        .sync(SyncInput {
            state: &state,
            changes: &changes0,
            full: true,
            node: &NodeState::default(),
        })
        .unwrap_or_else(|e| panic!("full sync: {e}"));
    let full_ms = ms(start);
    let mut out = json!({"fullMs": full_ms, "written": report.written.n,
        "messages": backend.ipvs_stats().0});
    if changes == 0 {
        return out;
    }
    let (mut times, mut messages, mut sendmsgs, mut written) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in spread_services(services, changes) {
        tracker.apply_slice(slice(i, 1));
        let (next, delta) = tracker.snapshot(&state);
        let before = backend.ipvs_stats();
        let start = Instant::now();
        let report = backend
            .sync(SyncInput {
                state: &next,
                changes: &delta,
                full: false,
                node: &NodeState::default(),
            })
            .unwrap_or_else(|e| panic!("partial sync: {e}"));
        times.push(ms(start));
        let after = backend.ipvs_stats();
        assert!(!report.full, "a partial sync turned full");
        messages.push(after.0 - before.0);
        sendmsgs.push(after.1 - before.1);
        written.push(report.written.n as u64);
        state = next;
    }
    let range = |v: &mut Vec<_>| {
        v.sort_unstable();
        json!([v[0], v[v.len() - 1]])
    };
    out["partial"] = percentiles(&mut times);
    out["partialMessages"] = range(&mut messages);
    out["partialSendmsgs"] = range(&mut sendmsgs);
    out["partialWritten"] = range(&mut written);
    out
}

fn load_ebpf(services: usize) -> anyhow::Result<Ebpf> {
    let n = (services as u32).max(1);
    let capacity = Capacity {
        entries: vec![
            ("kpx_services", n * 2),
            ("kpx_rev_nat", n * 2),
            ("kpx_slots", n * ENDPOINTS as u32 * 2),
            ("kpx_backends", n * ENDPOINTS as u32 * 2),
        ],
    };
    Ok(objects::load(objects::TC_LB, None, &capacity)?)
}

/// The eBPF backend's partial syncs for the same changes (maps only: nothing is attached, so
/// no namespace is needed), as `ebpf_sync` drives it.
fn ebpf_partials(services: usize, changes: usize) -> Value {
    let (mut tracker, state, _) = state_of(services);
    let mut ebpf = match load_ebpf(services) {
        Ok(e) => e,
        // Said in the table, and the ipvs figures still reported.
        Err(e) => return json!({"error": format!("the eBPF maps did not load: {e:#}")}),
    };
    let mut table = WantedTable::full(&state, NodeConfigs::default());
    let (ops, mut programmed) = plan(&table.wanted, &Programmed::default());
    apply(&mut ebpf, &ops).expect("apply");
    let mut previous = state;
    let (mut times, mut writes) = (Vec::new(), Vec::new());
    for i in spread_services(services, changes) {
        tracker.apply_slice(slice(i, 1));
        let (next, delta) = tracker.snapshot(&previous);
        let start = Instant::now();
        let touched = table.update(&next, &delta);
        let ops = plan_keys(&table.wanted, &mut programmed, &touched);
        apply(&mut ebpf, &ops).expect("apply");
        times.push(ms(start));
        writes.push(ops.len());
        previous = next;
    }
    writes.sort_unstable();
    let mut out = percentiles(&mut times);
    out["mapWrites"] = json!([writes[0], writes[writes.len() - 1]]);
    out
}

fn probe_service() -> (Service, EndpointSlice) {
    let svc = serde_json::from_value(json!({"metadata": {"name": "probe", "namespace": "bench"},
        "spec": {"clusterIP": PROBE_VIP, "ports": [{"name": "http", "port": 80}]}}))
    .expect("service");
    let slice = serde_json::from_value(json!({"metadata": {"name": "probe-1", "namespace": "bench",
        "labels": {"kubernetes.io/service-name": "probe"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [PROBE_ENDPOINT], "conditions": {"ready": true}, "nodeName": "other"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}))
    .expect("slice");
    (svc, slice)
}

/// One connect + first byte, in milliseconds.
fn connect_once(to: SocketAddr) -> std::io::Result<f64> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(ms(start))
}

/// Inside the node's namespace (the parent made the client and endpoint namespaces and their
/// veths): `services` Services (the probe among them) synced, then connects through the
/// probe's ClusterIP and to its endpoint directly, interleaved.
fn latency(services: usize, connects: usize, client: &str, endpoint: &str) -> Value {
    assert_not_parent_namespace();
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..services.saturating_sub(1) {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let (svc, sl) = probe_service();
    tracker.apply_service(svc);
    tracker.apply_slice(sl);
    let (state, changes) = tracker.snapshot(&ProxyState::default());
    let mut backend = IpvsBackend::new(config(), true).expect("IpvsBackend::new");
    backend
        .sync(SyncInput {
            state: &state,
            changes: &changes,
            full: true,
            node: &NodeState::default(),
        })
        .unwrap_or_else(|e| panic!("full sync: {e}"));

    let listener = Entry::open(endpoint)
        .expect("endpoint namespace")
        .enter(|| TcpListener::bind("0.0.0.0:8080"))
        .expect("entering")
        .expect("listening on 8080");
    // Answers every connection with one byte; ends with the process.
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"k");
        }
    });
    let vip: SocketAddr = format!("{PROBE_VIP}:80").parse().expect("addr");
    let direct: SocketAddr = format!("{PROBE_ENDPOINT}:8080").parse().expect("addr");
    let (mut via, mut straight) = Entry::open(client)
        .expect("client namespace")
        .enter(move || {
            let (mut via, mut straight) = (Vec::new(), Vec::new());
            // A few unmeasured connects first: ARP, the first conntrack and IPVS entries.
            for _ in 0..5 {
                connect_once(vip).expect("through the ClusterIP");
                connect_once(direct).expect("to the endpoint");
            }
            for _ in 0..connects {
                via.push(connect_once(vip).expect("through the ClusterIP"));
                straight.push(connect_once(direct).expect("to the endpoint"));
            }
            (via, straight)
        })
        .expect("entering");
    let (v, d) = (median(&mut via), median(&mut straight));
    json!({"services": services, "connects": connects, "viaClusterIpMs": v, "directMs": d,
        "ratio": v / d, "viaP90Ms": via[(via.len() - 1) * 9 / 10],
        "directP90Ms": straight[(straight.len() - 1) * 9 / 10]})
}

/// Namespaces deleted when a run ends, a failed one too.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> String {
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        self.0.push(name.clone());
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// The node's end of a veth to `peer` (whose end is `eth0`), both /24s, the peer routed
/// through the node.
fn wire(node: &str, peer: &str, link: &str, subnet: u8) {
    run(&[
        "ip", "-n", node, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
        peer,
    ]);
    let here = format!("198.18.{subnet}.1");
    run(&[
        "ip",
        "-n",
        node,
        "addr",
        "add",
        &format!("{here}/24"),
        "dev",
        link,
    ]);
    run(&["ip", "-n", node, "link", "set", link, "up"]);
    run(&[
        "ip",
        "-n",
        peer,
        "addr",
        "add",
        &format!("198.18.{subnet}.2/24"),
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
    run(&["ip", "-n", peer, "route", "add", "default", "via", &here]);
}

fn scales(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn ipvs_missing(spaces: &mut Namespaces) -> Option<String> {
    let ns = spaces.add(format!("kpx-bench-{}-ipvs-probe", std::process::id()));
    let entry = Entry::open(&ns).expect("the probe namespace");
    let why = entry
        .enter(|| {
            kpx_proxy::ipvs::netlink::Ipvs::open()
                .err()
                .map(|e| e.to_string())
        })
        .unwrap_or_else(|e| Some(e.to_string()));
    spaces.0.retain(|n| *n != ns);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    why
}

fn stat(values: &[f64]) -> Value {
    let mut v = values.to_vec();
    let m = median(&mut v);
    json!({"medianMs": m, "minMs": v[0], "maxMs": v[v.len() - 1], "rounds": v.len()})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--inside") {
        let mode = args[pos + 1].as_str();
        let services: usize = args[pos + 2].parse().expect("scale");
        let extra: usize = args[pos + 3].parse().expect("count");
        // The figures' file comes last, after the mode's own arguments.
        let out = args.last().expect("the figures' path");
        let value = match mode {
            "loaders" => loaders(services),
            "kpx" => kpx(services, extra),
            "latency" => latency(services, extra, &args[pos + 4], &args[pos + 5]),
            other => panic!("unknown mode {other}"),
        };
        std::fs::write(out, value.to_string()).expect("writing the figures");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the ipvs benchmark needs root (network namespaces)");
        return;
    }
    let mut spaces = Namespaces(Vec::new());
    if let Some(why) = ipvs_missing(&mut spaces) {
        eprintln!(
            "SKIPPED ipvs: the kernel has no IPVS here ({why}); run it in the VM: cargo xtask vm-test --benches ipvs_sync"
        );
        return;
    }
    let sync_scales = scales("KPX_BENCH_SCALES", "1000,10000");
    let latency_scales = scales("KPX_BENCH_LATENCY_SCALES", "1,1000,10000");
    let changes = env_usize("KPX_BENCH_CHANGES", 30);
    let connects = env_usize("KPX_BENCH_CONNECTS", 200);
    let rounds = env_usize("KPX_BENCH_ROUNDS", ROUNDS).max(1);
    let exe = std::env::current_exe().expect("exe");
    let tmp = tempfile::tempdir().expect("tempdir");
    let pid = std::process::id();
    let mut serial = 0;
    let mut inside = |spaces: &mut Namespaces, mode: &str, ns: &str, args: &[String]| -> Value {
        serial += 1;
        let out = tmp.path().join(format!("{mode}-{serial}.json"));
        let status = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .env(PARENT_NETNS, own_netns())
            .args(["--inside", mode])
            .args(args)
            .arg(&out)
            .status();
        for n in std::mem::take(&mut spaces.0) {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }
        assert!(status.is_ok_and(|s| s.success()), "{mode} {args:?} failed");
        serde_json::from_str(&std::fs::read_to_string(&out).expect("figures")).expect("json")
    };
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "ipvs backend benchmark (each round in a fresh network namespace; kernel {}, load {})",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        load().trim()
    );
    let mut rows = Vec::new();
    for &services in &sync_scales {
        let (mut ld, mut kp) = (Vec::new(), Vec::new());
        let (mut ipset_ms, mut ipvsadm_ms, mut ip_ms) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = Value::Null;
        let mut loaded = Value::Null;
        for round in 0..rounds {
            // kpx first: its figures are the ones a run cut short should still have.
            let ns = spaces.add(format!("kpx-bench-{pid}-ipvs-kpx{round}"));
            let partial = if round + 1 == rounds { changes } else { 0 };
            let k = inside(
                &mut spaces,
                "kpx",
                &ns,
                &[services.to_string(), partial.to_string()],
            );
            println!("ipvs {services:>6} x {ENDPOINTS}: round {round}: kpx {k}");
            kp.push(k["fullMs"].as_f64().expect("figure"));
            last = k;
            let ns = spaces.add(format!("kpx-bench-{pid}-ipvs-ld{round}"));
            let l = inside(
                &mut spaces,
                "loaders",
                &ns,
                &[services.to_string(), "0".into()],
            );
            println!("ipvs {services:>6} x {ENDPOINTS}: round {round}: loaders {l}");
            let f = |k: &str| l[k].as_f64().expect("figure");
            ipset_ms.push(f("ipsetMs"));
            ipvsadm_ms.push(f("ipvsadmMs"));
            ip_ms.push(f("ipBatchMs"));
            ld.push(f("ipsetMs") + f("ipvsadmMs"));
            loaded = l;
        }
        let ebpf = ebpf_partials(services, changes);
        let (kpx_fig, ld_fig) = (stat(&kp), stat(&ld));
        let ratio = kpx_fig["medianMs"].as_f64().unwrap_or(0.0)
            / ld_fig["medianMs"].as_f64().unwrap_or(1.0);
        let vs = loaded["virtualServers"].as_u64().unwrap_or(0);
        // kube-proxy's IPVS proxier, every sync: a GetVirtualServer and a GetRealServers per
        // virtual server, an address bind per Service address (EEXIST once bound), plus the
        // dumps of every virtual server and of the dummy's addresses.
        let kube = 3 * vs + 2;
        let partial_ratio = last["partial"]["p50Ms"].as_f64().unwrap_or(0.0)
            / ebpf["p50Ms"].as_f64().unwrap_or(1.0);
        println!(
            "ipvs {services:>6} x {ENDPOINTS}: kpx full sync {:.0} ms ({:.0}-{:.0}), loaders {:.0} ms ({:.0}-{:.0}: ipset restore {:.0} + ipvsadm -R {:.0}; ip -b addresses {:.0} more) -> {ratio:.2}x (medians of {rounds}), {vs} virtual servers, {} netlink messages (IPVS + ipset)",
            kpx_fig["medianMs"].as_f64().unwrap_or(0.0),
            kpx_fig["minMs"].as_f64().unwrap_or(0.0),
            kpx_fig["maxMs"].as_f64().unwrap_or(0.0),
            ld_fig["medianMs"].as_f64().unwrap_or(0.0),
            ld_fig["minMs"].as_f64().unwrap_or(0.0),
            ld_fig["maxMs"].as_f64().unwrap_or(0.0),
            median(&mut ipset_ms),
            median(&mut ipvsadm_ms),
            median(&mut ip_ms),
            last["messages"],
        );
        if let Some(e) = ebpf["error"].as_str() {
            println!("ipvs {services:>6} x {ENDPOINTS}: eBPF not measured: {e}");
        }
        println!(
            "ipvs {services:>6} x {ENDPOINTS}: one endpoint changed: kpx p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms ({} changes), {} netlink messages (IPVS + ipset), {} changes written | eBPF p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms, {} map writes -> {partial_ratio:.2}x eBPF | kube-proxy: >= {kube} netlink round trips every sync",
            last["partial"]["p50Ms"].as_f64().unwrap_or(0.0),
            last["partial"]["p90Ms"].as_f64().unwrap_or(0.0),
            last["partial"]["maxMs"].as_f64().unwrap_or(0.0),
            last["partial"]["changes"],
            last["partialMessages"],
            last["partialWritten"],
            ebpf["p50Ms"].as_f64().unwrap_or(0.0),
            ebpf["p90Ms"].as_f64().unwrap_or(0.0),
            ebpf["maxMs"].as_f64().unwrap_or(0.0),
            ebpf["mapWrites"],
        );
        rows.push(
            json!({"services": services, "endpointsPerService": ENDPOINTS,
            "kpxFullSync": kpx_fig, "loaders": ld_fig,
            "ipsetRestoreMedianMs": median(&mut ipset_ms),
            "ipvsadmRestoreMedianMs": median(&mut ipvsadm_ms),
            "ipBatchAddressesMedianMs": median(&mut ip_ms),
            "kpxOverLoaders": ratio, "loaded": loaded, "kpxLastRound": last,
            "ebpfPartial": ebpf, "partialOverEbpf": partial_ratio,
            "kubeProxyRoundTripsPerSync": kube, "load": load().trim()}),
        );
    }
    let mut lat = Vec::new();
    for &services in &latency_scales {
        let node = spaces.add(format!("kpx-bench-{pid}-ipvs-node"));
        let client = spaces.add(format!("kpx-bench-{pid}-ipvs-cl"));
        let endpoint = spaces.add(format!("kpx-bench-{pid}-ipvs-ep"));
        wire(&node, &client, "to-client", 1);
        wire(&node, &endpoint, "to-ep", 2);
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let l = inside(
            &mut spaces,
            "latency",
            &node,
            &[
                services.to_string(),
                connects.to_string(),
                client.clone(),
                endpoint.clone(),
            ],
        );
        println!(
            "ipvs first packet at {services:>6} Services: connect + first byte through the ClusterIP {:.3} ms, direct {:.3} ms -> {:.3}x (medians of {connects})",
            l["viaClusterIpMs"].as_f64().unwrap_or(0.0),
            l["directMs"].as_f64().unwrap_or(0.0),
            l["ratio"].as_f64().unwrap_or(0.0),
        );
        lat.push(l);
    }
    let report = json!({
        "benchmark": "ipvs_sync",
        "version": env!("CARGO_PKG_VERSION"),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "ipvsadm": Command::new("ipvsadm").arg("--version").output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        "scales": rows,
        "firstPacket": lat,
    });
    let path = std::env::var("KPX_BENCH_JSON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("ipvs_sync.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
        .expect("writing the report");
    println!("figures written to {}", path.display());
}
