use super::*;
use crate::conformance::cases;

fn cfg_for(case: &crate::conformance::Case, ipv6: bool) -> RenderConfig {
    RenderConfig {
        ipv6,
        cluster_cidr: case.node.cidr(ipv6).map(str::to_string),
        masquerade_all: case.node.masquerade_all,
        nodeport_addresses: case
            .node
            .nodeport_addresses
            .iter()
            .filter(|c| c.contains(':') == ipv6)
            .map(|c| c.to_string())
            .collect(),
        conntrack_tcp_be_liberal: false,
    }
}

/// Every case's full plan, written to `$KPX_NFT_PLANS` when set (to load them into a
/// throwaway namespace by hand: `nft -c -f`).
#[test]
fn every_case_renders_and_mentions_each_service_port() {
    let dir = std::env::var_os("KPX_NFT_PLANS").map(std::path::PathBuf::from);
    for case in cases::all() {
        let state = case.state();
        for ipv6 in [false, true] {
            let text = full_text(&cfg_for(&case, ipv6), &state);
            assert!(text.starts_with(&format!(
                "add table {} kpx",
                if ipv6 { "ip6" } else { "ip" }
            )));
            if let Some(dir) = &dir {
                let name = format!(
                    "{}-{}.nft",
                    case.name.replace([' ', '/'], "_"),
                    if ipv6 { 6 } else { 4 }
                );
                std::fs::write(dir.join(name), &text).expect("writing a plan");
            }
        }
    }
}

/// The plan text of a few cases, byte for byte (`KPX_UPDATE_SNAPSHOTS=1` rewrites the files
/// under `src/nftables/testdata/` after a deliberate change; review their diff).
#[test]
fn plans_match_their_snapshots() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/nftables/testdata");
    let update = std::env::var("KPX_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1");
    let wanted = [
        ("cluster_IP:", false, "cluster-ip-4.nft"),
        (
            "externalTrafficPolicy_Local_with_local_endpoints",
            false,
            "etp-local-4.nft",
        ),
        ("session_affinity", true, "affinity-6.nft"),
        ("no_endpoints:", false, "no-endpoints-4.nft"),
    ];
    for (prefix, ipv6, file) in wanted {
        let case = cases::all()
            .into_iter()
            .find(|c| c.name.replace(' ', "_").starts_with(prefix))
            .unwrap_or_else(|| panic!("no case {prefix}"));
        let text = full_text(&cfg_for(&case, ipv6), &case.state());
        let path = dir.join(file);
        if update {
            std::fs::write(&path, &text).expect("writing a snapshot");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (KPX_UPDATE_SNAPSHOTS=1 writes it)", path.display())
        });
        assert_eq!(
            text, want,
            "{file} differs (KPX_UPDATE_SNAPSHOTS=1 rewrites it)"
        );
    }
}

fn web_state(
    tracker: &mut crate::model::ChangeTracker,
    first: usize,
    count: usize,
    previous: &ProxyState,
) -> (ProxyState, Changes) {
    let svc = serde_json::json!({"metadata": {"name": "web", "namespace": "t"},
        "spec": {"clusterIP": "198.18.200.1", "ports": [{"name": "http", "port": 80}]}});
    let endpoints: Vec<_> = (first..first + count)
        .map(|e| serde_json::json!({"addresses": [format!("198.19.0.{}", e + 1)], "conditions": {"ready": true}, "nodeName": "other"}))
        .collect();
    let slice = serde_json::json!({"metadata": {"name": "web-1", "namespace": "t", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    tracker.apply_service(serde_json::from_value(svc).expect("service"));
    tracker.apply_slice(serde_json::from_value(slice).expect("slice"));
    tracker.snapshot(previous)
}

/// One address of ten replaced: one delete and one add in the endpoint map, nothing else —
/// the other nine keep their slots — and the plan says it is elements only (the netlink path).
/// One endpoint added: the chain's `mod N` is rewritten, so the plan is not elements only.
#[test]
fn an_address_swap_is_two_element_changes_and_a_new_endpoint_rewrites_the_chain() {
    let cfg = RenderConfig::default();
    let mut tracker = crate::model::ChangeTracker::new("this-node");
    let (a, _) = web_state(&mut tracker, 0, 10, &ProxyState::default());
    let mut applied = Applied::default();
    plan(
        &cfg,
        &a,
        &Changes::default(),
        true,
        &Existing::default(),
        &mut applied,
    );

    let (b, changes) = web_state(&mut tracker, 1, 10, &a);
    let p = plan(
        &cfg,
        &b,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    let ops = p.elements_only.expect("an address swap is elements only");
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(matches!(
        &ops[0],
        ElementChange::Delete(MapId::Endpoints(..), Key::Slot(_))
    ));
    assert!(
        matches!(&ops[1], ElementChange::Add(e) if e.value == Some(Value::Endpoint("198.19.0.11".parse().expect("an address"), 8080)))
    );
    assert_eq!((p.rules_written, p.chains_written), (0, 0));

    let (c, changes) = web_state(&mut tracker, 1, 11, &b);
    let p = plan(
        &cfg,
        &c,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    assert!(p.elements_only.is_none(), "{}", p.text);
    assert!(p.text.contains("numgen random mod 11"), "{}", p.text);
    assert_eq!(p.chains_written, 1);
}
