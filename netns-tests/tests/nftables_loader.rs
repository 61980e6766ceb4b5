//! `kpx-lab bench`'s "loader alone" for nftables: what kpx programmed, as `nft list table`
//! prints it, loads again with `nft -f` into an empty namespace, and its size counts the
//! table's rules and elements. Run against kpx's own plan (`render::full_text`) loaded into a
//! throwaway namespace.

use kpx_lab::bench::loader::{nft_size, Programmed};
use kpx_lab::netns::Netns;
use kpx_proxy::model::{ChangeTracker, ProxyState};
use kpx_proxy::nftables::render::{self, RenderConfig};
use serde_json::json;

fn state() -> ProxyState {
    let mut tracker = ChangeTracker::new("this-node");
    for i in 0..3u8 {
        tracker.apply_service(
            serde_json::from_value(json!({"metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
                "spec": {"clusterIP": format!("198.18.128.{}", i + 1),
                    "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}}))
            .expect("service"),
        );
        tracker.apply_slice(
            serde_json::from_value(json!({"metadata": {"name": format!("svc-{i}-1"), "namespace": "bench",
                    "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": [format!("198.19.1.{}", 10 + i)], "conditions": {"ready": true}, "nodeName": "other"},
                    {"addresses": [format!("198.19.2.{}", 10 + i)], "conditions": {"ready": true}, "nodeName": "other"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]}))
            .expect("slice"),
        );
    }
    tracker.snapshot(&ProxyState::default()).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_kpx_programmed_loads_again_alone() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("KPX_REQUIRE_NETNS").map_or(true, |v| v != "1"),
            "nftables_loader needs root (KPX_REQUIRE_NETNS=1)"
        );
        eprintln!("SKIPPED nftables_loader: network namespaces need root");
        return;
    }
    let cfg = RenderConfig {
        cluster_cidr: Some("198.19.0.0/16".into()),
        ..Default::default()
    };
    let text = render::full_text(&cfg, &state());
    let pid = std::process::id();
    let node = Netns::create(&format!("kpx-nftld-{pid}-a"))
        .await
        .expect("namespace");
    let mut load = node
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    std::io::Write::write_all(&mut load.stdin.take().expect("stdin"), text.as_bytes())
        .expect("plan");
    assert!(load.wait().expect("nft").success(), "kpx's plan:\n{text}");
    let listed = node
        .command("nft")
        .args(["list", "table", "ip", "kpx"])
        .output()
        .expect("nft list");
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();

    // Rules of the plan: one `add rule` line each; elements: what its `add element` lines
    // hold (one per comma-separated item), as the listing shows them.
    let rules = text.lines().filter(|l| l.starts_with("add rule ")).count();
    let elements: usize = text
        .lines()
        .filter(|l| l.starts_with("add element "))
        .filter_map(|l| Some(l[l.find('{')? + 1..l.rfind('}')?].split(',').count()))
        .sum();
    let size = nft_size(&listed);
    assert!(elements > 0, "{text}");
    assert_eq!(
        size,
        rules + elements,
        "{rules} rules and {elements} elements in the plan\n{listed}"
    );
    let programmed = Programmed::Nftables(vec![listed.clone()]);
    assert_eq!(programmed.size(), size);
    let took = programmed
        .load_alone(&format!("kpx-nftld-{pid}-b"))
        .await
        .unwrap_or_else(|e| panic!("the listing does not load alone: {e:#}\n{listed}"));
    assert!(took > std::time::Duration::ZERO);
}
