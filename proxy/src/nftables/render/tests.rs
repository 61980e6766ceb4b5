use super::*;
use crate::conformance::cases;

fn cfg_for(case: &crate::conformance::Case, ipv6: bool) -> RenderConfig {
    RenderConfig {
        ipv6,
        cluster_cidr: case.node.cidr(ipv6).map(str::to_string),
        masquerade_all: case.node.masquerade_all,
        nodeport_addresses: case.node.nodeport_addresses_of(ipv6),
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
        ("loadBalancerSourceRanges:", false, "source-ranges-4.nft"),
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

fn service_json(name: &str, ip: &str, local: bool) -> serde_json::Value {
    let mut spec = serde_json::json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80, "nodePort": 30080}]});
    if local {
        spec["type"] = "NodePort".into();
        spec["externalTrafficPolicy"] = "Local".into();
    }
    serde_json::json!({"metadata": {"name": name, "namespace": "t"}, "spec": spec})
}

fn slice_json(name: &str, endpoints: &[(&str, &str)]) -> serde_json::Value {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(ip, node)| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node}))
        .collect();
    serde_json::json!({"metadata": {"name": format!("{name}-1"), "namespace": "t", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// A Service port's two endpoint sets at the same slot number in different shards (the
/// cluster's in the second shard, this node's in a slot freed in the first): a changed remote
/// address is still deleted and added (the diff is per map and key, not per key).
#[test]
fn two_sets_at_one_slot_number_in_two_shards_still_see_their_changes() {
    let cfg = RenderConfig::default();
    let mut tracker = crate::model::ChangeTracker::new("this-node");
    let apply = |tracker: &mut crate::model::ChangeTracker,
                 svc: serde_json::Value,
                 slice: serde_json::Value| {
        tracker.apply_service(serde_json::from_value(svc).expect("service"));
        tracker.apply_slice(serde_json::from_value(slice).expect("slice"));
    };
    for i in 0..64 {
        let name = format!("a{i:02}");
        apply(
            &mut tracker,
            service_json(&name, &format!("198.18.1.{}", i + 1), false),
            slice_json(&name, &[(&format!("198.19.1.{}", i + 1), "other")]),
        );
    }
    apply(
        &mut tracker,
        service_json("x", "198.18.2.1", true),
        slice_json("x", &[("198.19.2.1", "other")]),
    );
    let (s1, _) = tracker.snapshot(&ProxyState::default());
    let mut applied = Applied::default();
    plan(
        &cfg,
        &s1,
        &Changes::default(),
        true,
        &Existing::default(),
        &mut applied,
    );

    // a00 goes (its slot 0 of endpoints-tcp-0 is free), x gains a local endpoint (svl-x takes it).
    let a00: k8s_openapi::api::discovery::v1::EndpointSlice =
        serde_json::from_value(slice_json("a00", &[])).expect("slice");
    tracker.delete_slice(&a00);
    let svc: k8s_openapi::api::core::v1::Service =
        serde_json::from_value(service_json("a00", "198.18.1.1", false)).expect("service");
    tracker.delete_service(&svc);
    apply(
        &mut tracker,
        service_json("x", "198.18.2.1", true),
        slice_json("x", &[("198.19.2.1", "other"), ("198.19.2.9", "this-node")]),
    );
    let (s2, changes) = tracker.snapshot(&s1);
    let p = plan(
        &cfg,
        &s2,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    assert!(
        p.text
            .contains("add element ip kpx endpoints-tcp-0 { 0 : 198.19.2.9 . 8080"),
        "{}",
        p.text
    );

    // The remote endpoint moves: deleted and added in endpoints-tcp-1, whatever sits at slot 0
    // of endpoints-tcp-0.
    apply(
        &mut tracker,
        service_json("x", "198.18.2.1", true),
        slice_json("x", &[("198.19.2.2", "other"), ("198.19.2.9", "this-node")]),
    );
    let (s3, changes) = tracker.snapshot(&s2);
    let p = plan(
        &cfg,
        &s3,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    assert!(
        p.text
            .contains("delete element ip kpx endpoints-tcp-1 { 0 }"),
        "{}",
        p.text
    );
    assert!(
        p.text
            .contains("add element ip kpx endpoints-tcp-1 { 0 : 198.19.2.2 . 8080 }"),
        "{}",
        p.text
    );
}

/// The longest names Kubernetes allows (namespace and Service 63 characters, port name 15):
/// every comment stays within nft's 128 characters.
#[test]
fn comments_of_the_longest_names_fit_nfts_limit() {
    let ns = "n".repeat(63);
    let name = "s".repeat(63);
    let svc = serde_json::json!({"metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "198.18.3.1", "type": "NodePort", "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
                 "ports": [{"name": "abcdefghijklmno", "port": 80, "nodePort": 30090}]}});
    let slice = serde_json::json!({"metadata": {"name": format!("{name}-1"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["198.19.3.1"], "conditions": {"ready": true}, "nodeName": "this-node"}],
        "ports": [{"name": "abcdefghijklmno", "port": 8080, "protocol": "TCP"}]});
    let mut tracker = crate::model::ChangeTracker::new("this-node");
    tracker.apply_service(serde_json::from_value(svc).expect("service"));
    tracker.apply_slice(serde_json::from_value(slice).expect("slice"));
    let (state, _) = tracker.snapshot(&ProxyState::default());
    let cfg = RenderConfig {
        cluster_cidr: Some("198.19.0.0/16".into()),
        ..Default::default()
    };
    let text = full_text(&cfg, &state);
    let mut comments = 0;
    for part in text.split("comment \"").skip(1) {
        let comment = part.split('"').next().unwrap_or_default();
        assert!(
            comment.len() <= 128,
            "{} characters: {comment}",
            comment.len()
        );
        comments += 1;
    }
    assert!(comments > 5 && text.contains('~'), "{text}");
}

/// A full sync finding an endpoint shard it no longer uses empties it (its kind known from
/// its name) and marks it stale; a partial sync needing that shard again takes it back.
#[test]
fn a_stale_shard_is_emptied_and_taken_back_when_needed_again() {
    let cfg = RenderConfig::default();
    let mut tracker = crate::model::ChangeTracker::new("this-node");
    let apply = |tracker: &mut crate::model::ChangeTracker, i: usize| {
        let name = format!("b{i:02}");
        tracker.apply_service(
            serde_json::from_value(service_json(&name, &format!("198.18.4.{}", i + 1), false))
                .expect("service"),
        );
        tracker.apply_slice(
            serde_json::from_value(slice_json(
                &name,
                &[(&format!("198.19.4.{}", i + 1), "other")],
            ))
            .expect("slice"),
        );
    };
    apply(&mut tracker, 0);
    let (s1, _) = tracker.snapshot(&ProxyState::default());
    let existing = Existing {
        chains: BTreeSet::new(),
        sets: ["endpoints-tcp-1".to_string()].into(),
    };
    let mut applied = Applied::default();
    let p = plan(
        &cfg,
        &s1,
        &Changes::default(),
        true,
        &existing,
        &mut applied,
    );
    assert!(
        p.text.contains("flush map ip kpx endpoints-tcp-1\n"),
        "{}",
        p.text
    );
    assert!(applied.stale_sets.contains("endpoints-tcp-1"));
    for i in 1..65 {
        apply(&mut tracker, i);
    }
    let (s2, changes) = tracker.snapshot(&s1);
    let p = plan(
        &cfg,
        &s2,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    assert!(
        p.text.contains("add map ip kpx endpoints-tcp-1 "),
        "{}",
        p.text
    );
    assert!(
        !applied.stale_sets.contains("endpoints-tcp-1"),
        "still to be deleted"
    );
}

fn firewalled_state(
    tracker: &mut crate::model::ChangeTracker,
    ranges: &[&str],
    previous: &ProxyState,
) -> (ProxyState, Changes) {
    let svc = serde_json::json!({"metadata": {"name": "lb", "namespace": "t"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.18.200.1", "loadBalancerSourceRanges": ranges,
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.64.30"}]}}});
    let slice = serde_json::json!({"metadata": {"name": "lb-1", "namespace": "t", "labels": {"kubernetes.io/service-name": "lb"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["198.19.0.1"], "conditions": {"ready": true}, "nodeName": "other"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    tracker.apply_service(serde_json::from_value(svc).expect("service"));
    tracker.apply_slice(serde_json::from_value(slice).expect("slice"));
    tracker.snapshot(previous)
}

/// What a first packet from `src` to the load-balancer IP ends as, in `rs`.
fn to_lb(rs: &super::super::trace::Ruleset, src: &str) -> Vec<String> {
    let local: Vec<IpAddr> = vec!["198.18.0.10".parse().expect("ip")];
    let packet = super::super::trace::Packet {
        src: src.parse().expect("ip"),
        dst: "198.18.64.30".parse().expect("ip"),
        protocol: "tcp",
        dport: 80,
        local: &local,
    };
    super::super::trace::describe(&super::super::trace::trace(
        rs,
        &packet,
        super::super::trace::Path::Forwarded,
    ))
}

/// Widening the ranges rewrites the Service port's firewall chain and nothing else; removing
/// them takes its `firewall-ips` element out and leaves the chain to housekeeping. Each
/// partial plan applied on top of the last (in the interpreter that refuses what the kernel
/// would) lets exactly the sources of the ranges in.
#[test]
fn a_change_of_source_ranges_rewrites_only_the_firewall_chain() {
    let cfg = RenderConfig::default();
    let mut tracker = crate::model::ChangeTracker::new("this-node");
    let mut rs = super::super::trace::Ruleset::new();
    let (a, _) = firewalled_state(&mut tracker, &["198.18.0.201/32"], &ProxyState::default());
    let mut applied = Applied::default();
    let full = plan(
        &cfg,
        &a,
        &Changes::default(),
        true,
        &Existing::default(),
        &mut applied,
    );
    rs.apply(&full.text).expect("the full plan loads");
    assert_eq!(
        to_lb(&rs, "198.18.0.201"),
        ["DNAT to 198.19.0.1:8080 p=1.00 masquerade"]
    );
    assert_eq!(to_lb(&rs, "198.18.0.202"), ["drop p=1.00"]);

    let (b, changes) = firewalled_state(&mut tracker, &["198.18.0.201/32", "198.18.0.202/32"], &a);
    let p = plan(
        &cfg,
        &b,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    assert_eq!((p.chains_written, p.elements_written), (1, 0), "{}", p.text);
    let fw = chains::firewall_chain(&b.entries.keys().next().expect("a port").clone(), 0);
    assert!(
        p.text.lines().all(|l| l.contains(&fw)),
        "only the firewall chain is written:\n{}",
        p.text
    );
    rs.apply(&p.text).expect("the partial plan loads");
    assert_eq!(
        to_lb(&rs, "198.18.0.202"),
        ["DNAT to 198.19.0.1:8080 p=1.00 masquerade"]
    );
    assert_eq!(to_lb(&rs, "198.18.0.203"), ["drop p=1.00"]);

    let (c, changes) = firewalled_state(&mut tracker, &[], &b);
    let p = plan(
        &cfg,
        &c,
        &changes,
        false,
        &Existing::default(),
        &mut applied,
    );
    assert!(
        p.text
            .contains(&format!("delete element ip kpx {}", chains::FIREWALL_IPS)),
        "{}",
        p.text
    );
    assert!(applied.stale_chains.contains(&fw));
    rs.apply(&p.text).expect("the partial plan loads");
    assert_eq!(
        to_lb(&rs, "198.18.0.203"),
        ["DNAT to 198.19.0.1:8080 p=1.00 masquerade"]
    );
}
