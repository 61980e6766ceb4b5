use super::*;
use crate::conformance::cases;

#[test]
fn every_case_plans_sorted_destinations_and_binds_every_service_address() {
    for case in cases::all() {
        let state = case.state();
        for ipv6 in [false, true] {
            let cfg = crate::conformance::ipvs_config(&case, ipv6);
            let plan = Plan::of(
                &cfg,
                &state,
                &crate::conformance::node_ips(),
                &mut MarkAllocator::default(),
            );
            for (key, vs) in plan.services() {
                let mut sorted = vs.dests.clone();
                sorted.sort();
                assert_eq!(vs.dests, sorted, "{}: {key}", case.name);
            }
            for ip in plan.addresses() {
                assert_eq!(ip.is_ipv6(), ipv6, "{}", case.name);
            }
        }
    }
}

#[test]
fn marks_stay_with_their_frontend_and_are_reused_once_free() {
    let mut a = MarkAllocator::default();
    let p = |port| Portal {
        ip: crate::conformance::ip("198.18.1.1"),
        port,
        protocol: Protocol::Tcp,
    };
    assert_eq!(a.id(&p(80)), 1);
    assert_eq!(a.id(&p(81)), 2);
    assert_eq!(a.id(&p(80)), 1);
    a.release(&p(80));
    assert_eq!(a.id(&p(82)), 1);
}

/// `loadBalancerSourceRanges`: the frontend in `LB-FIREWALL`, each allowed network in
/// `LB-SOURCE-CIDR` — and the load-balancer IP itself when a range takes in a node address:
/// the node's connection to the IP it binds on kpx-ipvs0 leaves from that IP, and is let in
/// only then (traced from that source on the node's path).
#[test]
fn source_ranges_are_set_members_and_admit_the_node_from_the_lb_ip_when_a_range_takes_it_in() {
    use super::super::rules;
    use super::super::trace::{self, Packet, Path, Tables, Verdict};
    let lb = "198.19.65.10";
    for (prefix, node_in_ranges) in [
        ("loadBalancerSourceRanges:", false),
        ("loadBalancerSourceRanges_with", true),
    ] {
        let case = cases::all()
            .into_iter()
            .find(|c| c.name.replace(' ', "_").starts_with(prefix))
            .unwrap_or_else(|| panic!("no case {prefix}"));
        let cfg = crate::conformance::ipvs_config(&case, false);
        let plan = Plan::of(
            &cfg,
            &case.state(),
            &crate::conformance::node_ips(),
            &mut MarkAllocator::default(),
        );
        let members = plan.members();
        assert!(members[&SetKind::Firewalled].contains(&format!("{lb},tcp:80")));
        assert!(members[&SetKind::SourceRanges].contains(&format!("{lb},tcp:80,198.19.255.0/24")));
        let itself = format!("{lb},tcp:80,{lb}");
        assert_eq!(
            members[&SetKind::SourceRanges].contains(&itself),
            node_in_ranges,
            "{prefix}: {:?}",
            members[&SetKind::SourceRanges]
        );
        let tables = Tables::parse(&rules::text(&cfg, &plan.rules(), &[], &[])).expect("rules");
        let local = crate::conformance::node_ips();
        let from_lb = Packet {
            src: crate::conformance::ip(lb),
            dst: crate::conformance::ip(lb),
            protocol: Protocol::Tcp,
            dport: 80,
            local: &local,
        };
        let verdict = trace::trace(&cfg, &plan, &tables, &from_lb, Path::Node);
        assert_eq!(
            matches!(verdict, Verdict::Balanced { .. }),
            node_in_ranges,
            "{prefix}: {verdict:?}"
        );
        if !node_in_ranges {
            assert_eq!(verdict, Verdict::Drop);
        }
    }
}
