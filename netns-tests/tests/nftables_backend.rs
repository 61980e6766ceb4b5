//! The nftables backend against the kernel, in a throwaway network namespace, without a lab:
//! full and partial syncs, what a full sync does with names that are not its own (flushed now,
//! deleted by housekeeping a second later), the elements-only path of an endpoint change, the
//! lost-state check (an element deleted, a chain flushed, the table deleted by someone else),
//! `dump`, and `cleanup` leaving other tables alone. The backend runs on a thread that entered
//! the namespace (never in the test's own).

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::netns::Entry;
use kpx_proxy::backend::{Backend, NodeState, SyncInput};
use kpx_proxy::model::{ChangeTracker, Changes, ProxyState};
use kpx_proxy::nftables::render::RenderConfig;
use kpx_proxy::nftables::NftablesBackend;
use serde_json::json;

struct Scratch {
    name: String,
    entry: Entry,
}

impl Scratch {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!("kpx-nftb-{tag}-{}", std::process::id());
        anyhow::ensure!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success());
        let entry = Entry::open(&name)?;
        Ok(Scratch { name, entry })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({"metadata": {"name": format!("web-{i}"), "namespace": "t"},
        "spec": {"clusterIP": format!("198.18.200.{}", i + 1), "ports": [{"name": "http", "port": 80}]}}))
    .expect("service")
}

fn slice(i: usize, first: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (first..first + 3)
        .map(|e| json!({"addresses": [format!("198.19.{i}.{}", e + 1)], "conditions": {"ready": true}, "nodeName": "other"}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": format!("web-{i}-1"), "namespace": "t", "labels": {"kubernetes.io/service-name": format!("web-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}))
    .expect("slice")
}

fn nft(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nft").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sync(
    backend: &mut NftablesBackend,
    state: &ProxyState,
    changes: &Changes,
    full: bool,
) -> anyhow::Result<kpx_proxy::backend::SyncReport> {
    Ok(backend.sync(SyncInput {
        state,
        changes,
        full,
        node: &NodeState::default(),
    })?)
}

/// Everything in one namespace, in order: each step starts from what the one before left.
fn scenario() -> anyhow::Result<()> {
    let mut backend = NftablesBackend::new(RenderConfig {
        cluster_cidr: Some("198.19.0.0/16".into()),
        ..Default::default()
    });
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..3 {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let (state, _) = tracker.snapshot(&ProxyState::default());
    // A table left with an object of another shape under one of kpx's names: the first full
    // sync fails on it, the next replaces the table.
    nft(&["add", "table", "ip", "kpx"])?;
    nft(&[
        "add",
        "map",
        "ip",
        "kpx",
        "service-ips",
        "{ type ipv4_addr : ipv4_addr ; }",
    ])?;
    anyhow::ensure!(
        sync(&mut backend, &state, &Changes::default(), true).is_err(),
        "a map of another type under kpx's name went unnoticed"
    );
    let report = sync(&mut backend, &state, &Changes::default(), true)?;
    anyhow::ensure!(report.chains_written == 3, "{report:?}");
    let listed = nft(&["list", "table", "ip", "kpx"])?;
    for needle in [
        "198.18.200.2 . tcp . 80 comment \"t/web-1:http/TCP\" : goto svc-",
        "198.19.1.3 . 8080",
        "dnat ip to numgen random mod 3 offset",
    ] {
        anyhow::ensure!(listed.contains(needle), "no {needle:?} in\n{listed}");
    }
    anyhow::ensure!(backend.lost_state().is_none(), "lost right after a sync");

    // Names that are not the plan's: flushed by the next full sync, deleted a second later.
    let foreign = "add chain ip kpx left-over\nadd rule ip kpx left-over counter\nadd map ip kpx left-map { type ipv4_addr : verdict ; }\nadd element ip kpx left-map { 198.18.9.9 : goto left-over }\n";
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(foreign.as_bytes())?;
    }
    anyhow::ensure!(child.wait()?.success(), "adding foreign names");
    anyhow::ensure!(
        backend.lost_state().is_none(),
        "someone adding names is not a loss"
    );
    let report = sync(&mut backend, &state, &Changes::default(), true)?;
    anyhow::ensure!(report.chains_deleted == 1, "{report:?}");
    let chain = nft(&["list", "chain", "ip", "kpx", "left-over"])?;
    anyhow::ensure!(!chain.contains("counter"), "not flushed:\n{chain}");
    backend.housekeeping()?;
    anyhow::ensure!(
        nft(&["list", "chain", "ip", "kpx", "left-over"]).is_ok(),
        "deleted before its grace second"
    );
    std::thread::sleep(Duration::from_millis(1100));
    backend.housekeeping()?;
    let listed = nft(&["list", "table", "ip", "kpx"])?;
    anyhow::ensure!(
        !listed.contains("left-over") && !listed.contains("left-map"),
        "stale names not deleted:\n{listed}"
    );

    // One endpoint moved: elements only (no chain written), and the kernel has the new one.
    tracker.apply_slice(slice(1, 1));
    let (next, changes) = tracker.snapshot(&state);
    let report = sync(&mut backend, &next, &changes, false)?;
    anyhow::ensure!(
        report.chains_written == 0 && !report.full,
        "an address change wrote chains: {report:?}"
    );
    let listed = nft(&["list", "table", "ip", "kpx"])?;
    anyhow::ensure!(
        listed.contains("198.19.1.4 . 8080") && !listed.contains("198.19.1.1 . 8080"),
        "the moved endpoint is not in the map:\n{listed}"
    );
    anyhow::ensure!(backend.lost_state().is_none(), "lost after a partial sync");
    let dump = backend.dump()?;
    anyhow::ensure!(dump.services.len() == 3, "{dump:?}");
    let web1 = dump
        .services
        .iter()
        .find(|s| s.service == "t/web-1:http/TCP")
        .ok_or_else(|| anyhow::anyhow!("web-1 not dumped: {dump:?}"))?;
    anyhow::ensure!(
        web1.addresses == ["198.18.200.2:80"]
            && web1.endpoints == ["198.19.1.2:8080", "198.19.1.3:8080", "198.19.1.4:8080"],
        "{web1:?}"
    );

    // Someone deletes an element, flushes a chain, deletes the table: each is noticed.
    nft(&[
        "delete",
        "element",
        "ip",
        "kpx",
        "service-ips",
        "{ 198.18.200.1 . tcp . 80 }",
    ])?;
    // A partial sync right after it (before any periodic check) notices and is full, so its
    // own commit cannot hide the loss.
    let report = sync(&mut backend, &next, &Changes::default(), false)?;
    anyhow::ensure!(
        report.full,
        "a partial sync over a foreign deletion: {report:?}"
    );
    let restored = nft(&["list", "map", "ip", "kpx", "service-ips"])?;
    anyhow::ensure!(
        restored.contains("198.18.200.1 . tcp . 80"),
        "not restored:\n{restored}"
    );
    nft(&["flush", "chain", "ip", "kpx", "masquerading"])?;
    let why = backend.lost_state();
    anyhow::ensure!(
        why.as_deref().is_some_and(|w| w.contains("masquerading")),
        "a flushed fixed chain: {why:?}"
    );
    sync(&mut backend, &next, &Changes::default(), true)?;
    anyhow::ensure!(
        backend.lost_state().is_none(),
        "still lost after a full sync"
    );
    let svc_chain = listed
        .lines()
        .find_map(|l| l.trim().strip_prefix("chain svc-"))
        .and_then(|l| l.split_whitespace().next())
        .map(|c| format!("svc-{c}"))
        .ok_or_else(|| anyhow::anyhow!("no service chain"))?;
    nft(&["flush", "chain", "ip", "kpx", &svc_chain])?;
    anyhow::ensure!(
        backend.lost_state().is_some(),
        "a flushed chain went unnoticed"
    );
    sync(&mut backend, &next, &Changes::default(), true)?;
    nft(&["delete", "table", "ip", "kpx"])?;
    anyhow::ensure!(
        backend.lost_state().is_some_and(|w| w.contains("deleted")),
        "a deleted table went unnoticed"
    );
    sync(&mut backend, &next, &Changes::default(), true)?;

    // Cleanup deletes kpx's tables and nothing else.
    nft(&["add", "table", "ip", "someone-else"])?;
    backend.cleanup()?;
    let tables = nft(&["list", "tables"])?;
    anyhow::ensure!(
        tables.contains("someone-else") && !tables.contains("table ip kpx"),
        "{tables}"
    );
    Ok(())
}

/// kube-proxy's nftables table, kpx's iptables chains and kpx's nftables table on one node:
/// each backend's syncs and cleanup leave the others exactly as they were.
fn coexistence() -> anyhow::Result<()> {
    use kpx_lab::bench::kube_nft::{full_sync, Layout, ServicePort};
    use kpx_proxy::iptables::exec::{Flavour, Tool};
    use kpx_proxy::iptables::IptablesBackend;

    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..3 {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let (state, _) = tracker.snapshot(&ProxyState::default());
    let kube: Vec<ServicePort> = (0..3)
        .map(|i| ServicePort {
            namespace: "t".into(),
            name: format!("web-{i}"),
            port_name: "http".into(),
            protocol: "tcp",
            cluster_ip: format!("198.18.200.{}", i + 1).parse().expect("vip"),
            port: 80,
            endpoints: (0..3)
                .map(|e| {
                    format!("198.19.{i}.{}:8080", e + 1)
                        .parse()
                        .expect("endpoint")
                })
                .collect(),
        })
        .collect();
    let text = full_sync(
        &Layout {
            cluster_cidr: Some("198.19.0.0/16".into()),
            ..Default::default()
        },
        &kube,
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())?;
    }
    anyhow::ensure!(child.wait()?.success(), "loading kube-proxy's layout");
    let kube_table = || nft(&["list", "table", "ip", "kube-proxy"]);
    let before = kube_table()?;

    let mut iptables = IptablesBackend::new(
        Tool {
            flavour: Flavour::Nft,
            ipv6: false,
        },
        kpx_proxy::iptables::render::RenderConfig {
            cluster_cidr: Some("198.19.0.0/16".into()),
            ..Default::default()
        },
    );
    let mut nftables = NftablesBackend::new(RenderConfig {
        cluster_cidr: Some("198.19.0.0/16".into()),
        ..Default::default()
    });
    let input = SyncInput {
        state: &state,
        changes: &Changes::default(),
        full: true,
        node: &NodeState::default(),
    };
    iptables.sync(input)?;
    nftables.sync(input)?;
    iptables.sync(input)?;
    nftables.sync(input)?;
    anyhow::ensure!(kube_table()? == before, "kube-proxy's table changed");
    anyhow::ensure!(
        iptables.dump()?.services.len() == 3 && nftables.dump()?.services.len() == 3,
        "a backend lost its Services beside the other"
    );
    anyhow::ensure!(nftables.lost_state().is_none() && iptables.lost_state().is_none());
    nftables.cleanup()?;
    anyhow::ensure!(
        kube_table()? == before,
        "nftables cleanup changed kube-proxy's table"
    );
    anyhow::ensure!(
        iptables.dump()?.services.len() == 3,
        "nftables cleanup touched kpx's iptables chains"
    );
    nftables.sync(input)?;
    iptables.cleanup()?;
    anyhow::ensure!(
        kube_table()? == before,
        "iptables cleanup changed kube-proxy's table"
    );
    anyhow::ensure!(
        nftables.dump()?.services.len() == 3 && nftables.lost_state().is_none(),
        "iptables cleanup touched kpx's nftables table"
    );
    Ok(())
}

#[test]
fn beside_kube_proxys_table_and_kpx_iptables_nothing_breaks() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("KPX_REQUIRE_NETNS").map_or(true, |v| v != "1"),
            "network namespace tests need root (KPX_REQUIRE_NETNS=1)"
        );
        eprintln!("SKIPPED: network namespace tests need root");
        return;
    }
    let scratch = Scratch::new("beside").expect("a scratch namespace");
    scratch
        .entry
        .enter(coexistence)
        .expect("entering the namespace")
        .expect("the scenario");
}

#[test]
fn syncs_foreign_names_elements_only_changes_lost_state_dump_and_cleanup() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("KPX_REQUIRE_NETNS").map_or(true, |v| v != "1"),
            "network namespace tests need root (KPX_REQUIRE_NETNS=1)"
        );
        eprintln!("SKIPPED: network namespace tests need root");
        return;
    }
    let scratch = Scratch::new("all").expect("a scratch namespace");
    scratch
        .entry
        .enter(scenario)
        .expect("entering the namespace")
        .expect("the scenario");
}
