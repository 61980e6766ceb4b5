//! The IPVS backend against a kernel with IPVS (the VM's: this host has none, and the test says
//! so and skips), in throwaway network namespaces, without a lab: a full sync and what
//! `ipvsadm -Ln` then shows, a partial sync's constant number of messages, graceful
//! termination (TCP drained at weight 0 then deleted by housekeeping, UDP deleted at once),
//! virtual servers that are not kpx's left alone, lost state found and repaired, `dump`, `mh`
//! giving the same table whatever the history, and `cleanup` leaving nothing of kpx's.

use std::process::Command;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_lab::scratch::ScratchNetns;
use kpx_proxy::backend::{Backend, NodeState, SyncInput, SyncReport};
use kpx_proxy::ipvs::plan::PlanConfig;
use kpx_proxy::ipvs::{IpvsBackend, IpvsConfig};
use kpx_proxy::model::{ChangeTracker, Changes, ProxyState};
use kpx_proxy::netfilter::Tool;
use serde_json::json;

fn service(i: usize, protocol: &str) -> Service {
    serde_json::from_value(
        json!({"metadata": {"name": format!("web-{i}"), "namespace": "t"},
        "spec": {"clusterIP": format!("198.18.200.{}", i + 1),
                 "ports": [{"name": "p", "port": 80, "protocol": protocol}]}}),
    )
    .expect("service")
}

fn slice(i: usize, endpoints: &[u8], protocol: &str) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|e| json!({"addresses": [format!("198.19.{i}.{e}")], "conditions": {"ready": true}, "nodeName": "other"}))
        .collect();
    serde_json::from_value(
        json!({"metadata": {"name": format!("web-{i}-1"), "namespace": "t",
            "labels": {"kubernetes.io/service-name": format!("web-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}]}),
    )
    .expect("slice")
}

fn config(scheduler: &str) -> IpvsConfig {
    IpvsConfig {
        plan: PlanConfig {
            cluster_cidr: Some("198.19.0.0/16".into()),
            scheduler: scheduler.into(),
            ..PlanConfig::default()
        },
        iptables: Tool::detect(false),
        strict_arp: false,
        tcp_timeout: std::time::Duration::ZERO,
        tcpfin_timeout: std::time::Duration::ZERO,
        udp_timeout: std::time::Duration::ZERO,
        exclude_cidrs: vec!["198.18.98.0/24".parse().expect("cidr")],
    }
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
        node: &NodeState::default(),
    })?)
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

/// `ipvsadm -Ln` of one virtual server: its real servers as `ip:port weight`, in list order.
fn listed(vip: &str) -> anyhow::Result<Vec<String>> {
    let text =
        run(&["ipvsadm", "-Ln", "-t", vip]).or_else(|_| run(&["ipvsadm", "-Ln", "-u", vip]))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-> "))
        .filter(|l| !l.starts_with("RemoteAddress"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", w[0], w.get(2).copied().unwrap_or("?"))
        })
        .collect())
}

fn scenario() -> anyhow::Result<()> {
    run(&["ip", "link", "set", "lo", "up"])?;
    let mut backend = IpvsBackend::new(config("rr"), true)?;
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..3 {
        tracker.apply_service(service(i, "TCP"));
        tracker.apply_slice(slice(i, &[1, 2, 3], "TCP"));
    }
    tracker.apply_service(service(3, "UDP"));
    tracker.apply_slice(slice(3, &[1, 2], "UDP"));
    let (state, _) = tracker.snapshot(&ProxyState::default());
    // Someone else's virtual servers: one on an address of no Service, one excluded.
    run(&["ipvsadm", "-A", "-t", "198.18.99.1:80", "-s", "rr"])?;
    run(&["ipvsadm", "-A", "-t", "198.18.98.1:80", "-s", "rr"])?;

    let report = sync(&mut backend, &state, &Changes::default(), true)?;
    anyhow::ensure!(report.total.n == 4, "{report:?}");
    anyhow::ensure!(
        listed("198.18.200.1:80")?
            == [
                "198.19.0.1:8080 1",
                "198.19.0.2:8080 1",
                "198.19.0.3:8080 1"
            ],
        "real servers in ascending list order: {:?}",
        listed("198.18.200.1:80")?
    );
    let link = run(&["ip", "-o", "addr", "show", "dev", "kpx-ipvs0"])?;
    anyhow::ensure!(
        link.contains("198.18.200.1/32") && link.contains("198.18.200.4/32"),
        "{link}"
    );
    let state_line = run(&["ip", "-o", "link", "show", "kpx-ipvs0"])?;
    anyhow::ensure!(!state_line.contains(",UP"), "kpx-ipvs0 is up: {state_line}");
    anyhow::ensure!(backend.lost_state().is_none(), "lost right after a sync");

    // One endpoint replaced: two messages, the old one drained at weight 0.
    tracker.apply_slice(slice(0, &[1, 2, 4], "TCP"));
    let (state2, changes) = tracker.snapshot(&state);
    let report = sync(&mut backend, &state2, &changes, false)?;
    anyhow::ensure!(
        report.written.n == 2,
        "messages for one endpoint replaced: {report:?}"
    );
    let now = listed("198.18.200.1:80")?;
    anyhow::ensure!(
        now.contains(&"198.19.0.3:8080 0".to_string()),
        "not drained: {now:?}"
    );
    anyhow::ensure!(
        now.contains(&"198.19.0.4:8080 1".to_string()),
        "not added: {now:?}"
    );
    // No connection uses it: housekeeping deletes it.
    backend.housekeeping()?;
    let now = listed("198.18.200.1:80")?;
    anyhow::ensure!(
        !now.iter().any(|l| l.starts_with("198.19.0.3:")),
        "drained one kept: {now:?}"
    );

    // UDP: deleted at once.
    tracker.apply_slice(slice(3, &[1], "UDP"));
    let (state3, changes) = tracker.snapshot(&state2);
    sync(&mut backend, &state3, &changes, false)?;
    anyhow::ensure!(
        listed("198.18.200.4:80")? == ["198.19.3.1:8080 1"],
        "{:?}",
        listed("198.18.200.4:80")?
    );

    // A virtual server of kpx's deleted by someone: found, and a full sync brings it back.
    run(&["ipvsadm", "-D", "-t", "198.18.200.2:80"])?;
    let lost = backend.lost_state();
    anyhow::ensure!(
        lost.as_deref().is_some_and(|l| l.contains("198.18.200.2")),
        "{lost:?}"
    );
    sync(&mut backend, &state3, &Changes::default(), true)?;
    anyhow::ensure!(listed("198.18.200.2:80")?.len() == 3, "not repaired");
    // A stale one on kpx-ipvs0's address, left by an earlier run: deleted by a full sync.
    run(&["ipvsadm", "-A", "-t", "198.18.200.1:81", "-s", "rr"])?;
    sync(&mut backend, &state3, &Changes::default(), true)?;
    anyhow::ensure!(
        run(&["ipvsadm", "-Ln", "-t", "198.18.200.1:81"]).is_err(),
        "stale kept"
    );
    for foreign in ["198.18.99.1:80", "198.18.98.1:80"] {
        anyhow::ensure!(
            run(&["ipvsadm", "-Ln", "-t", foreign]).is_ok(),
            "{foreign} was deleted"
        );
    }

    let dump = backend.dump()?;
    let web = dump
        .services
        .iter()
        .find(|s| s.service == "t/web-0:p/TCP")
        .ok_or_else(|| anyhow::anyhow!("not in the dump: {dump:?}"))?;
    anyhow::ensure!(web.addresses == ["198.18.200.1:80"], "{web:?}");
    anyhow::ensure!(web.endpoints.len() == 3, "{web:?}");

    backend.cleanup()?;
    let left = run(&["ipvsadm", "-Ln"])?;
    anyhow::ensure!(!left.contains("198.18.200."), "kpx's servers left:\n{left}");
    anyhow::ensure!(
        left.contains("198.18.99.1:80"),
        "someone else's server deleted:\n{left}"
    );
    anyhow::ensure!(
        run(&["ip", "link", "show", "kpx-ipvs0"]).is_err(),
        "kpx-ipvs0 left"
    );
    Ok(())
}

/// `mh` in one namespace reached by a history: the real servers' list order, which is the
/// order the kernel builds the Maglev table from.
fn mh_order(history: Vec<Vec<u8>>) -> anyhow::Result<Vec<String>> {
    run(&["ip", "link", "set", "lo", "up"])?;
    let mut backend = IpvsBackend::new(config("mh"), true)?;
    let mut tracker = ChangeTracker::new("this-node");
    tracker.apply_service(service(0, "TCP"));
    let mut state = ProxyState::default();
    for (n, endpoints) in history.iter().enumerate() {
        tracker.apply_slice(slice(0, endpoints, "TCP"));
        let (next, changes) = tracker.snapshot(&state);
        sync(&mut backend, &next, &changes, n == 0)?;
        state = next;
    }
    let order = listed("198.18.200.1:80")?;
    backend.cleanup()?;
    Ok(order)
}

fn ipvs_missing(tag: &str) -> Option<String> {
    let (_guard, entry) = match ScratchNetns::new("ipvsb", tag) {
        Ok(s) => s,
        Err(e) => panic!("a scratch namespace: {e:#}"),
    };
    entry
        .enter(|| {
            kpx_proxy::ipvs::netlink::Ipvs::open()
                .err()
                .map(|e| e.to_string())
        })
        .unwrap_or_else(|e| Some(e.to_string()))
}

#[test]
fn the_ipvs_backend_programs_drains_repairs_and_cleans_up() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    if let Some(why) = ipvs_missing("probe-main") {
        eprintln!(
            "SKIPPED ipvs: the kernel has no IPVS here ({why}); `cargo xtask vm-test` runs it"
        );
        return;
    }
    let (_guard, entry) = ScratchNetns::new("ipvsb", "main").expect("namespace");
    entry
        .enter(scenario)
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn maglev_tables_are_the_same_on_every_node_whatever_the_history() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    if let Some(why) = ipvs_missing("probe-mh") {
        eprintln!(
            "SKIPPED ipvs: the kernel has no IPVS here ({why}); `cargo xtask vm-test` runs it"
        );
        return;
    }
    let (_a, node_a) = ScratchNetns::new("ipvsb", "mh-a").expect("namespace");
    let (_b, node_b) = ScratchNetns::new("ipvsb", "mh-b").expect("namespace");
    let a = node_a
        .enter(|| mh_order(vec![vec![1, 2, 3]]))
        .expect("entering")
        .expect("node a");
    let b = node_b
        .enter(|| mh_order(vec![vec![3], vec![3, 1], vec![3, 1, 2]]))
        .expect("entering")
        .expect("node b");
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a, b, "the two nodes' mh destinations differ in order");
}
