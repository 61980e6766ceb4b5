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
