use std::collections::BTreeSet;

use expect_test::expect;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use super::*;
use crate::iptables::chains;
use crate::model::ChangeTracker;

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec}))
        .expect("service")
}

fn slice(service: &str, endpoints: &[(&str, &str)], port: Value) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-1"), "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [port],
    }))
    .expect("slice")
}

fn cfg() -> RenderConfig {
    RenderConfig {
        cluster_cidr: Some("198.18.128.0/17".into()),
        ..Default::default()
    }
}

fn cluster() -> ChangeTracker {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
    ));
    t.apply_slice(slice(
        "web",
        &[("198.18.128.2", "n1"), ("198.18.129.2", "n2")],
        json!({"name": "http", "port": 8080}),
    ));
    t.apply_service(service(
        "empty",
        json!({"clusterIP": "10.96.0.11", "ports": [{"port": 53, "protocol": "UDP"}]}),
    ));
    t.apply_service(service(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.12", "externalTrafficPolicy": "Local",
        "sessionAffinity": "ClientIP", "ports": [{"port": 80, "nodePort": 30080}]}),
    ));
    t.apply_slice(slice(
        "np",
        &[("198.18.128.3", "n1")],
        json!({"port": 8080}),
    ));
    t
}

/// The full plan of `state` with `cfg`, into tables holding nothing of kpx's.
fn full_plan_with(cfg: &RenderConfig, state: &ProxyState, changes: &Changes) -> Plan {
    plan(
        cfg,
        state,
        changes,
        &Fragments::new(),
        true,
        &BTreeSet::new(),
        &[],
    )
}

/// The full plan of everything `t` holds, from empty tables, and the state it renders.
fn full_plan_from_empty(t: &mut ChangeTracker) -> (Plan, ProxyState) {
    let (state, changes) = t.snapshot(&ProxyState::default());
    (full_plan_with(&cfg(), &state, &changes), state)
}

#[test]
fn full_plan() {
    let mut t = cluster();
    let (state, changes) = t.snapshot(&ProxyState::default());
    let existing: BTreeSet<String> = ["KPX-SVC-GONE".to_string()].into();
    let plan = plan(
        &cfg(),
        &state,
        &changes,
        &Fragments::new(),
        true,
        &existing,
        &chains::JUMPS[..1],
    );
    expect![[r#"
        *filter
        :KPX-SERVICES - [0:0]
        :KPX-EXTERNAL-SERVICES - [0:0]
        :KPX-NODEPORTS - [0:0]
        :KPX-FORWARD - [0:0]
        :KPX-PROXY-FIREWALL - [0:0]
        :KPX-PROXY-CANARY - [0:0]
        -A KPX-PROXY-CANARY -j RETURN
        -A KPX-FORWARD -m conntrack --ctstate INVALID -m comment --comment "kpx: drop packets conntrack marks INVALID" -j DROP
        -A KPX-FORWARD -m comment --comment "kpx forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPX-FORWARD -m comment --comment "kpx forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        -A KPX-SERVICES -d 10.96.0.11/32 -p udp -m udp --dport 53 -m comment --comment "ns/empty/UDP has no endpoints" -j REJECT --reject-with icmp-port-unreachable
        COMMIT
        *nat
        :KPX-SERVICES - [0:0]
        :KPX-NODEPORTS - [0:0]
        :KPX-POSTROUTING - [0:0]
        :KPX-MARK-MASQ - [0:0]
        :KPX-PROXY-CANARY - [0:0]
        :KPX-EXT-SPPMRL3VLYWNTCXH - [0:0]
        :KPX-SVC-EMZIA3F3AUVSPVV2 - [0:0]
        :KPX-SVC-HU7XKBSX5JJPFAMG - [0:0]
        :KPX-SVL-2VVLB7UUXYMD23GY - [0:0]
        :KPX-SVC-GONE - [0:0]
        -I PREROUTING 1 -m comment --comment "kpx service portals" -j KPX-SERVICES
        -A KPX-PROXY-CANARY -j RETURN
        -A KPX-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPX-POSTROUTING -s 198.18.128.2/32 -d 198.18.128.2/32 -m comment --comment "hairpin" -j MASQUERADE
        -A KPX-POSTROUTING -s 198.18.128.3/32 -d 198.18.128.3/32 -m comment --comment "hairpin" -j MASQUERADE
        -A KPX-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPX-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPX-POSTROUTING -m comment --comment "kpx service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPX-SERVICES -d 10.96.0.12/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/np/TCP cluster IP" -j KPX-SVC-EMZIA3F3AUVSPVV2
        -A KPX-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "ns/web:http/TCP cluster IP" -j KPX-SVC-HU7XKBSX5JJPFAMG
        -A KPX-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment "ns/np/TCP" -j KPX-EXT-SPPMRL3VLYWNTCXH
        -A KPX-SERVICES -m comment --comment "kpx service nodeports" -m addrtype --dst-type LOCAL -j KPX-NODEPORTS
        -A KPX-EXT-SPPMRL3VLYWNTCXH -s 198.18.128.0/17 -m comment --comment "pod traffic for ns/np/TCP external destinations" -j KPX-SVC-EMZIA3F3AUVSPVV2
        -A KPX-EXT-SPPMRL3VLYWNTCXH -m comment --comment "masquerade LOCAL traffic for ns/np/TCP external destinations" -m addrtype --src-type LOCAL -j KPX-MARK-MASQ
        -A KPX-EXT-SPPMRL3VLYWNTCXH -m comment --comment "route LOCAL traffic for ns/np/TCP external destinations" -m addrtype --src-type LOCAL -j KPX-SVC-EMZIA3F3AUVSPVV2
        -A KPX-EXT-SPPMRL3VLYWNTCXH -j KPX-SVL-2VVLB7UUXYMD23GY
        -A KPX-SVC-EMZIA3F3AUVSPVV2 -d 10.96.0.12/32 -p tcp -m tcp --dport 80 ! -s 198.18.128.0/17 -m comment --comment "ns/np/TCP cluster IP" -j KPX-MARK-MASQ
        -A KPX-SVC-EMZIA3F3AUVSPVV2 -p tcp -m comment --comment "ns/np/TCP affinity" -m recent --name KPX-SEP-RFPU36D6RB3XRZQ7 --rcheck --seconds 10800 --reap -j DNAT --to-destination 198.18.128.3:8080
        -A KPX-SVC-EMZIA3F3AUVSPVV2 -p tcp -m comment --comment "ns/np/TCP" -m recent --name KPX-SEP-RFPU36D6RB3XRZQ7 --set -j DNAT --to-destination 198.18.128.3:8080
        -A KPX-SVC-HU7XKBSX5JJPFAMG -d 10.96.0.10/32 -p tcp -m tcp --dport 80 ! -s 198.18.128.0/17 -m comment --comment "ns/web:http/TCP cluster IP" -j KPX-MARK-MASQ
        -A KPX-SVC-HU7XKBSX5JJPFAMG -p tcp -m comment --comment "ns/web:http/TCP" -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 198.18.128.2:8080
        -A KPX-SVC-HU7XKBSX5JJPFAMG -p tcp -m comment --comment "ns/web:http/TCP" -j DNAT --to-destination 198.18.129.2:8080
        -A KPX-SVL-2VVLB7UUXYMD23GY -p tcp -m comment --comment "ns/np/TCP affinity" -m recent --name KPX-SEP-RFPU36D6RB3XRZQ7 --rcheck --seconds 10800 --reap -j DNAT --to-destination 198.18.128.3:8080
        -A KPX-SVL-2VVLB7UUXYMD23GY -p tcp -m comment --comment "ns/np/TCP" -m recent --name KPX-SEP-RFPU36D6RB3XRZQ7 --set -j DNAT --to-destination 198.18.128.3:8080
        -X KPX-SVC-GONE
        COMMIT
    "#]]
    .assert_eq(&plan.restore);
}

#[test]
fn one_endpoint_change_rewrites_only_that_chain() {
    let mut t = cluster();
    let (first, state) = full_plan_from_empty(&mut t);
    t.apply_slice(slice(
        "web",
        &[("198.18.128.2", "n1"), ("198.18.129.9", "n2")],
        json!({"name": "http", "port": 8080}),
    ));
    let (state, changes) = t.snapshot(&state);
    let next = plan(
        &cfg(),
        &state,
        &changes,
        &first.fragments,
        false,
        &BTreeSet::new(),
        &[],
    );
    expect![[r#"
        *nat
        :KPX-SVC-HU7XKBSX5JJPFAMG - [0:0]
        -A KPX-SVC-HU7XKBSX5JJPFAMG -d 10.96.0.10/32 -p tcp -m tcp --dport 80 ! -s 198.18.128.0/17 -m comment --comment "ns/web:http/TCP cluster IP" -j KPX-MARK-MASQ
        -A KPX-SVC-HU7XKBSX5JJPFAMG -p tcp -m comment --comment "ns/web:http/TCP" -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 198.18.128.2:8080
        -A KPX-SVC-HU7XKBSX5JJPFAMG -p tcp -m comment --comment "ns/web:http/TCP" -j DNAT --to-destination 198.18.129.9:8080
        COMMIT
    "#]]
    .assert_eq(&next.restore);
    assert_eq!((next.chains_written, next.rules_written), (1, 3));

    // Scaling to zero moves the Service from the nat dispatch to a filter reject.
    t.apply_slice(slice("web", &[], json!({"name": "http", "port": 8080})));
    let (state, changes) = t.snapshot(&state);
    let empty = plan(
        &cfg(),
        &state,
        &changes,
        &next.fragments,
        false,
        &BTreeSet::new(),
        &[],
    );
    assert!(empty.restore.contains("-A KPX-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http/TCP has no endpoints\" -j REJECT"));
    let chain = first
        .fragments
        .values()
        .flat_map(|f| f.digests.iter())
        .map(|(c, _, _)| c.clone())
        .find(|c| next.restore.contains(c.as_str()))
        .expect("web's chain");
    assert!(
        empty.restore.contains(&format!("-X {chain}")),
        "{}",
        empty.restore
    );
    assert!(!empty.restore.contains(&format!("-j {chain}")));
}

fn traced(restore: &str, src: &str, dst: &str, protocol: &str, dport: u16) -> Vec<String> {
    use crate::iptables::trace::{describe, trace, Packet};
    let local: Vec<std::net::IpAddr> = ["198.18.0.11".parse().expect("ip")].to_vec();
    let packet = Packet {
        src: src.parse().expect("src"),
        dst: dst.parse().expect("dst"),
        protocol,
        dport,
        local: &local,
    };
    describe(&trace(restore, &packet))
}

#[test]
fn packets_through_the_full_plan() {
    let restore = full_plan_from_empty(&mut cluster()).0.restore;
    // From a pod to a ClusterIP: either endpoint, evenly, keeping the pod's address.
    assert_eq!(
        traced(&restore, "198.18.128.9", "10.96.0.10", "tcp", 80),
        [
            "DNAT to 198.18.128.2:8080 p=0.50",
            "DNAT to 198.18.129.2:8080 p=0.50"
        ]
    );
    // From the node itself: masqueraded so replies come back through it.
    assert_eq!(
        traced(&restore, "198.18.0.11", "10.96.0.10", "tcp", 80),
        [
            "DNAT to 198.18.128.2:8080 p=0.50 masquerade",
            "DNAT to 198.18.129.2:8080 p=0.50 masquerade"
        ]
    );
    // A Service without endpoints: rejected, never silently dropped.
    assert_eq!(
        traced(&restore, "198.18.128.9", "10.96.0.11", "udp", 53),
        ["REJECT p=1.00"]
    );
    // The wrong port of a Service: no rule.
    assert_eq!(
        traced(&restore, "198.18.128.9", "10.96.0.10", "tcp", 81),
        ["no rule p=1.00"]
    );
    // NodePort with externalTrafficPolicy Local from outside: the local endpoint, source kept.
    assert_eq!(
        traced(&restore, "203.0.113.7", "198.18.0.11", "tcp", 30080),
        ["DNAT to 198.18.128.3:8080 p=1.00"]
    );
    // The same NodePort from the node itself: masqueraded, to the cluster-wide endpoints.
    assert_eq!(
        traced(&restore, "198.18.0.11", "198.18.0.11", "tcp", 30080),
        ["DNAT to 198.18.128.3:8080 p=1.00 masquerade"]
    );
}

/// A dual-stack Service (both ClusterIPs, an IPv4 and an IPv6 slice): each family's plan holds
/// only its own addresses, with IPv6 syntax (`/128`, `[addr]:port`, icmp6 rejects).
#[test]
fn each_family_renders_only_its_own_addresses() {
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service(
        "dual",
        json!({"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
        "ipFamilies": ["IPv4", "IPv6"], "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
    ));
    t.apply_slice(slice(
        "dual",
        &[("198.18.128.4", "n1")],
        json!({"name": "http", "port": 8080}),
    ));
    let mut v6_slice: Value = serde_json::to_value(slice(
        "dual",
        &[("fd00:10::4", "n1"), ("fd00:10::5", "n2")],
        json!({"name": "http", "port": 8080}),
    ))
    .expect("test data is valid");
    v6_slice["metadata"]["name"] = json!("dual-v6");
    v6_slice["addressType"] = json!("IPv6");
    t.apply_slice(serde_json::from_value(v6_slice).expect("test data is valid"));
    t.apply_service(service(
        "v6-empty",
        json!({"clusterIP": "fd00::21", "clusterIPs": ["fd00::21"], "ipFamilies": ["IPv6"],
        "ports": [{"port": 53, "protocol": "UDP"}]}),
    ));
    let (state, changes) = t.snapshot(&ProxyState::default());
    let v6 = RenderConfig {
        ipv6: true,
        cluster_cidr: Some("fd00:10::/64".into()),
        ..Default::default()
    };
    let plan6 = full_plan_with(&v6, &state, &changes);
    expect![[r#"
        *filter
        :KPX-SERVICES - [0:0]
        :KPX-EXTERNAL-SERVICES - [0:0]
        :KPX-NODEPORTS - [0:0]
        :KPX-FORWARD - [0:0]
        :KPX-PROXY-FIREWALL - [0:0]
        :KPX-PROXY-CANARY - [0:0]
        -A KPX-PROXY-CANARY -j RETURN
        -A KPX-FORWARD -m conntrack --ctstate INVALID -m comment --comment "kpx: drop packets conntrack marks INVALID" -j DROP
        -A KPX-FORWARD -m comment --comment "kpx forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KPX-FORWARD -m comment --comment "kpx forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        -A KPX-SERVICES -d fd00::21/128 -p udp -m udp --dport 53 -m comment --comment "ns/v6-empty/UDP has no endpoints" -j REJECT --reject-with icmp6-port-unreachable
        COMMIT
        *nat
        :KPX-SERVICES - [0:0]
        :KPX-NODEPORTS - [0:0]
        :KPX-POSTROUTING - [0:0]
        :KPX-MARK-MASQ - [0:0]
        :KPX-PROXY-CANARY - [0:0]
        :KPX-EXT-BUTFEI65FHB6QTVV - [0:0]
        :KPX-SVC-M6CWKSMZ5PYYT4NJ - [0:0]
        -A KPX-PROXY-CANARY -j RETURN
        -A KPX-MARK-MASQ -j MARK --or-mark 0x4000
        -A KPX-POSTROUTING -s fd00:10::4/128 -d fd00:10::4/128 -m comment --comment "hairpin" -j MASQUERADE
        -A KPX-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KPX-POSTROUTING -j MARK --xor-mark 0x4000
        -A KPX-POSTROUTING -m comment --comment "kpx service traffic requiring SNAT" -j MASQUERADE --random-fully
        -A KPX-SERVICES -d fd00::20/128 -p tcp -m tcp --dport 80 -m comment --comment "ns/dual:http/TCP cluster IP" -j KPX-SVC-M6CWKSMZ5PYYT4NJ
        -A KPX-NODEPORTS -p tcp -m tcp --dport 30090 -m comment --comment "ns/dual:http/TCP" -j KPX-EXT-BUTFEI65FHB6QTVV
        -A KPX-SERVICES -m comment --comment "kpx service nodeports" -m addrtype --dst-type LOCAL -j KPX-NODEPORTS
        -A KPX-EXT-BUTFEI65FHB6QTVV -m comment --comment "masquerade traffic for ns/dual:http/TCP external destinations" -j KPX-MARK-MASQ
        -A KPX-EXT-BUTFEI65FHB6QTVV -j KPX-SVC-M6CWKSMZ5PYYT4NJ
        -A KPX-SVC-M6CWKSMZ5PYYT4NJ -d fd00::20/128 -p tcp -m tcp --dport 80 ! -s fd00:10::/64 -m comment --comment "ns/dual:http/TCP cluster IP" -j KPX-MARK-MASQ
        -A KPX-SVC-M6CWKSMZ5PYYT4NJ -p tcp -m comment --comment "ns/dual:http/TCP" -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination [fd00:10::4]:8080
        -A KPX-SVC-M6CWKSMZ5PYYT4NJ -p tcp -m comment --comment "ns/dual:http/TCP" -j DNAT --to-destination [fd00:10::5]:8080
        COMMIT
    "#]]
    .assert_eq(&plan6.restore);
    let plan4 = full_plan_with(&cfg(), &state, &changes);
    assert!(
        plan4.restore.contains("-d 10.96.0.20/32"),
        "{}",
        plan4.restore
    );
    assert!(plan4.restore.contains("--to-destination 198.18.128.4:8080"));
    assert!(!plan4.restore.contains("fd00"), "{}", plan4.restore);
}

#[test]
fn chains_are_declared_and_written_in_name_order() {
    // iptables-nft-restore inserts each declared chain into a cache sorted by name; declared in
    // Service order (hashed names, so random) a 10,000-Service restore took twice as long.
    let mut t = ChangeTracker::new("n1");
    for i in 0..50 {
        let name = format!("svc-{i:02}");
        t.apply_service(service(
            &name,
            json!({"clusterIP": format!("10.96.1.{i}"), "ports": [{"name": "http", "port": 80}]}),
        ));
        t.apply_slice(slice(
            &name,
            &[("198.18.128.2", "n1")],
            json!({"name": "http", "port": 8080}),
        ));
    }
    let (plan, _) = full_plan_from_empty(&mut t);
    let nat = plan.restore.split("*nat\n").nth(1).expect("a nat table");
    let declared: Vec<&str> = nat
        .lines()
        .filter_map(|l| l.strip_prefix(":KPX-SVC-"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(declared.len(), 50);
    assert!(declared.windows(2).all(|w| w[0] < w[1]), "{declared:?}");
    let mut written: Vec<&str> = nat
        .lines()
        .filter_map(|l| l.strip_prefix("-A KPX-SVC-"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    written.dedup();
    assert_eq!(written, declared);
}

#[test]
fn the_rule_count_is_the_rules_a_full_restore_writes() {
    // Two --nodeport-addresses CIDRs (two dispatch rules) and a two-port Service whose local
    // endpoint's hairpin rule is written once: the count used to say 9 fixed rules and one
    // hairpin rule per port.
    let mut t = ChangeTracker::new("n1");
    t.apply_service(service(
        "multi",
        json!({"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [
            {"name": "a", "port": 80, "nodePort": 30001},
            {"name": "b", "port": 81, "nodePort": 30002}]}),
    ));
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "multi-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "multi"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["198.18.128.9"], "nodeName": "n1", "conditions": {"ready": true}}],
        "ports": [{"name": "a", "port": 8080}, {"name": "b", "port": 8081}],
    }))
    .expect("slice");
    t.apply_slice(slice);
    let (state, changes) = t.snapshot(&ProxyState::default());
    for liberal in [false, true] {
        let cfg = RenderConfig {
            nodeport_addresses: vec!["198.18.0.0/24".into(), "198.18.1.0/24".into()],
            conntrack_tcp_be_liberal: liberal,
            ..cfg()
        };
        let plan = full_plan_with(&cfg, &state, &changes);
        let written = plan
            .restore
            .lines()
            .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
            .count();
        assert_eq!(plan.rules_total, written, "{}", plan.restore);
        let filter_section = &plan.restore[..plan.restore.find("*nat").unwrap_or(0)];
        let filter_written = filter_section
            .lines()
            .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
            .count();
        assert_eq!(plan.filter_rules_total, filter_written, "per table");
        assert_eq!(
            plan.restore.contains("--ctstate INVALID"),
            !liberal,
            "INVALID drop only without --conntrack-tcp-be-liberal"
        );
    }
}

fn firewalled(t: &mut ChangeTracker, ranges: &[&str]) {
    let mut svc = service(
        "lb",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.30", "loadBalancerSourceRanges": ranges,
        "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}),
    );
    svc.status = Some(
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.18.64.30"}]}}))
            .expect("status"),
    );
    t.apply_service(svc);
    t.apply_slice(slice(
        "lb",
        &[("198.18.129.2", "n2")],
        json!({"name": "http", "port": 8080}),
    ));
}

/// `loadBalancerSourceRanges`: one RETURN per range and one DROP in `KPX-PROXY-FIREWALL`, on
/// the original destination; widening the ranges is a partial sync of the filter table alone
/// (the nat chains stay), and the trace follows each step.
#[test]
fn source_ranges_are_filter_rules_a_partial_sync_rewrites() {
    let mut t = ChangeTracker::new("n1");
    firewalled(&mut t, &["198.18.0.201/32"]);
    let (first, state) = full_plan_from_empty(&mut t);
    let firewall: Vec<&str> = first
        .restore
        .lines()
        .filter(|l| l.starts_with("-A KPX-PROXY-FIREWALL"))
        .collect();
    expect![[r#"
        [
            "-A KPX-PROXY-FIREWALL -s 198.18.0.201/32 -p tcp -m conntrack --ctorigdst 198.18.64.30/32 --ctorigdstport 80 -m comment --comment \"ns/lb:http/TCP loadBalancerSourceRanges\" -j RETURN",
            "-A KPX-PROXY-FIREWALL -p tcp -m conntrack --ctorigdst 198.18.64.30/32 --ctorigdstport 80 -m comment --comment \"ns/lb:http/TCP source not in loadBalancerSourceRanges\" -j DROP",
        ]
    "#]]
    .assert_debug_eq(&firewall);
    assert_eq!(
        traced(&first.restore, "198.18.0.201", "198.18.64.30", "tcp", 80),
        ["DNAT to 198.18.129.2:8080 p=1.00 masquerade"]
    );
    assert_eq!(
        traced(&first.restore, "198.18.0.202", "198.18.64.30", "tcp", 80),
        ["DROP p=1.00"]
    );
    // The NodePort and the cluster IP are not guarded.
    assert_eq!(
        traced(&first.restore, "198.18.0.202", "198.18.0.11", "tcp", 30090),
        ["DNAT to 198.18.129.2:8080 p=1.00 masquerade"]
    );

    firewalled(&mut t, &["198.18.0.201/32", "198.18.0.202/32"]);
    let (state, changes) = t.snapshot(&state);
    let next = plan(
        &cfg(),
        &state,
        &changes,
        &first.fragments,
        false,
        &BTreeSet::new(),
        &[],
    );
    assert!(
        next.restore.starts_with("*filter\n") && !next.restore.contains("*nat"),
        "{}",
        next.restore
    );
    assert_eq!(
        next.restore.matches("-j RETURN\n").count(),
        3,
        "the canary and two ranges: {}",
        next.restore
    );
    let mut tables = first.restore.clone();
    // The partial restore replaces the filter table's chains: trace the filter of the new
    // text with the nat of the first.
    let nat = tables.split_off(tables.find("*nat").expect("nat"));
    let applied = format!("{}{nat}", next.restore);
    assert_eq!(
        traced(&applied, "198.18.0.202", "198.18.64.30", "tcp", 80),
        ["DNAT to 198.18.129.2:8080 p=1.00 masquerade"]
    );
    assert_eq!(
        traced(&applied, "198.18.0.203", "198.18.64.30", "tcp", 80),
        ["DROP p=1.00"]
    );
}
