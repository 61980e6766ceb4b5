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
