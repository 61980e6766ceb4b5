//! The IPVS mode's host part against this kernel (which has no IPVS, so the virtual servers are
//! tested in the VM): the ipsets of one `ipset restore` and the iptables part, both flavours, in
//! a throwaway network namespace. Real connections show what they do: a Service without
//! endpoints is refused even though something listens on its port, another port of a Service
//! address is refused while the node's own address still answers, and a partial sync's member
//! edits (over netlink) take effect; `cleanup_all` leaves nothing of kpx's behind.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::netns::Entry;
use kpx_proxy::ipvs::layout::{SetKind, JUMPS};
use kpx_proxy::ipvs::plan::{MarkAllocator, Plan, PlanConfig};
use kpx_proxy::ipvs::{ipset, ipset_netlink, rules};
use kpx_proxy::model::{ChangeTracker, ProxyState};
use kpx_proxy::netfilter::{Flavour, Tool};
use serde_json::json;

const NODE_IP: &str = "198.18.0.10";
const EMPTY_VIP: &str = "198.18.200.1";
const BUSY_VIP: &str = "198.18.200.2";
/// Load-balancer IPs of Services without endpoints and with `loadBalancerSourceRanges`: one
/// whose range takes in the node (so the IP itself, the source of the node's connections to
/// it, is admitted: refused as any Service without endpoints), one whose range does not
/// (dropped before the reject).
const ADMITTING_LB: &str = "198.18.64.31";
const CLOSED_LB: &str = "198.18.64.32";

struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn state() -> ProxyState {
    let mut tracker = ChangeTracker::new("this-node");
    for (name, ip) in [("empty", EMPTY_VIP), ("busy", BUSY_VIP)] {
        let svc: Service =
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "t"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}))
            .expect("service");
        tracker.apply_service(svc);
    }
    for (name, cluster_ip, lb, range) in [
        ("admitting", "198.18.200.3", ADMITTING_LB, "198.18.0.0/24"),
        ("closed", "198.18.200.4", CLOSED_LB, "198.18.99.0/24"),
    ] {
        let svc: Service =
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "t"},
            "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip, "loadBalancerSourceRanges": [range],
                     "ports": [{"name": "http", "port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": lb}]}}}))
            .expect("service");
        tracker.apply_service(svc);
    }
    let slice: EndpointSlice = serde_json::from_value(json!({"metadata": {"name": "busy-1", "namespace": "t",
            "labels": {"kubernetes.io/service-name": "busy"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["198.19.1.1"], "conditions": {"ready": true}, "nodeName": "other"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}))
    .expect("slice");
    tracker.apply_slice(slice);
    tracker.snapshot(&ProxyState::default()).0
}

/// Whether a TCP connection to `ip:port` is accepted.
fn connects(ip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// Whether a TCP connection to `ip:port` is refused (a reset or ICMP unreachable, at once),
/// not accepted and not left hanging until the timeout.
fn refused(ip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Whether a TCP connection to `ip:port` gets no answer at all (dropped) within a second.
fn dropped(ip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut
    )
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything inside the namespace (this thread entered it).
fn scenario(tool: Tool) -> anyhow::Result<()> {
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    for ip in [NODE_IP, EMPTY_VIP, BUSY_VIP, ADMITTING_LB, CLOSED_LB] {
        run(Command::new("ip").args(["addr", "add", &format!("{ip}/32"), "dev", "lo"]))?;
    }
    // Listeners on every address: without kpx's rules every connection below would succeed.
    let _http = TcpListener::bind("0.0.0.0:80")?;
    let _other = TcpListener::bind("0.0.0.0:2222")?;
    anyhow::ensure!(
        connects(EMPTY_VIP, 80) && connects(BUSY_VIP, 2222),
        "listeners"
    );

    let cfg = PlanConfig {
        cluster_cidr: Some("198.19.0.0/16".into()),
        ..PlanConfig::default()
    };
    let node_ips = [NODE_IP.parse()?];
    let plan = Plan::of(&cfg, &state(), &node_ips, &mut MarkAllocator::default());
    ipset::restore(&ipset::full_text(false, &plan.members()))
        .map_err(|e| anyhow::anyhow!("ipset restore: {e}"))?;
    tool.restore(&rules::text(&cfg, &plan.rules(), JUMPS, &[]))
        .map_err(|e| anyhow::anyhow!("iptables-restore: {e}"))?;

    let reject = ipset::members(&SetKind::Reject.name(false)).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        reject.contains(&format!("{EMPTY_VIP},tcp:80")),
        "{reject:?}"
    );
    let frontends = ipset::members(&SetKind::Frontends.name(false)).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        frontends
            .iter()
            .any(|m| m.contains("comment \"t/busy:http/TCP\"")),
        "the frontend's comment names its Service port: {frontends:?}"
    );
    anyhow::ensure!(
        refused(EMPTY_VIP, 80),
        "a Service without endpoints was not refused at once"
    );
    anyhow::ensure!(
        refused(BUSY_VIP, 2222),
        "another port of a Service address was not refused (the node's listener answered, or it hung)"
    );
    anyhow::ensure!(
        connects(NODE_IP, 2222),
        "the node's own address was filtered"
    );
    // loadBalancerSourceRanges, on the node's own connections (mangle OUTPUT, where IPVS
    // would take them): they leave from the load-balancer IP, bound here.
    anyhow::ensure!(
        refused(ADMITTING_LB, 80),
        "a load-balancer IP whose range takes in the node did not admit the node (then refuse: no endpoints)"
    );
    anyhow::ensure!(
        dropped(CLOSED_LB, 80),
        "a load-balancer IP whose ranges leave the node out was not dropped"
    );

    // A partial sync's member edit: the empty Service gone from REJECT (as when it gets an
    // endpoint) and its frontend kept.
    // (over netlink, as the backend's partial sync writes members).
    let del = ipset_netlink::Change::new(
        ipset_netlink::Op::Del,
        SetKind::Reject,
        false,
        &format!("{EMPTY_VIP},tcp:80"),
    )?;
    ipset_netlink::Ipset::open()
        .and_then(|mut set| set.write(&[del]))
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(connects(EMPTY_VIP, 80), "the reject member was not removed");

    // Writing the same part again (a later full sync) is accepted: the jumps are found.
    let saved = tool.save_all().map_err(anyhow::Error::msg)?;
    let missing = kpx_proxy::netfilter::jump::missing(JUMPS, |_| saved.as_str());
    anyhow::ensure!(missing.is_empty(), "jumps not found again: {missing:?}");
    tool.restore(&rules::text(&cfg, &plan.rules(), &missing, &[]))
        .map_err(anyhow::Error::msg)?;

    let removed = kpx_proxy::ipvs::cleanup_all().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!removed.is_empty(), "cleanup said it removed nothing");
    let saved = tool.save_all().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!saved.contains("KPXV-"), "chains left:\n{saved}");
    let names = ipset::names().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(names.is_empty(), "sets left: {names:?}");
    anyhow::ensure!(!kpx_proxy::ipvs::leftovers_present(), "leftovers reported");
    Ok(())
}

#[test]
fn the_sets_and_the_iptables_part_refuse_what_they_must_on_both_flavours() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    let mut ran = 0;
    for flavour in [Flavour::Nft, Flavour::Legacy] {
        let tool = Tool {
            flavour,
            ipv6: false,
        };
        let name = format!("kpx-ipvsh-{}-{}", flavour.name(), std::process::id());
        let created = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(created.is_ok_and(|s| s.success()), "ip netns add {name}");
        let guard = Scratch(name.clone());
        let entry = Entry::open(&name).expect("namespace");
        if let Some(why) = entry
            .enter(move || tool.unusable())
            .expect("entering the namespace")
        {
            eprintln!("SKIPPED iptables-{}: {why}", flavour.name());
            continue;
        }
        entry
            .enter(move || scenario(tool))
            .expect("entering the namespace")
            .unwrap_or_else(|e| panic!("iptables-{}: {e:#}", flavour.name()));
        drop(guard);
        ran += 1;
    }
    assert!(ran > 0, "no iptables flavour works here");
}
