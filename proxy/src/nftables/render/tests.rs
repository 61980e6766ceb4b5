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
