//! The interpreter on hand-written rulesets in the shape of `/work/briefs/nft-layout.md` (what
//! `render.rs` emits), so it is tested before and apart from the renderer.

use std::net::IpAddr;

use super::*;

/// The example of nft-layout.md: a full sync from empty.
const LAYOUT: &str = r#"
add table ip kpx { comment "kpx-proxy: Service load balancing" ; }
add chain ip kpx nat-prerouting { type nat hook prerouting priority -100 ; policy accept ; }
add chain ip kpx nat-output { type nat hook output priority -100 ; policy accept ; }
add chain ip kpx nat-postrouting { type nat hook postrouting priority 100 ; policy accept ; }
add chain ip kpx filter-input { type filter hook input priority -90 ; policy accept ; }
add chain ip kpx filter-forward { type filter hook forward priority -90 ; policy accept ; }
add chain ip kpx filter-output { type filter hook output priority -90 ; policy accept ; }
add chain ip kpx services
add chain ip kpx masquerading
add chain ip kpx mark-for-masquerade
add chain ip kpx reject-chain
add chain ip kpx endpoints-check
add map ip kpx service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kpx service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add map ip kpx no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "..." ; }
add map ip kpx no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "..." ; }
add set ip kpx nodeport-cidrs { type ipv4_addr ; flags interval ; comment "--nodeport-addresses" ; }
add set ip kpx hairpin { type ipv4_addr . ipv4_addr ; comment "..." ; }
add map ip kpx endpoints-0 { typeof numgen random mod 1 : ip daddr . tcp dport ; comment "..." ; }
flush chain ip kpx nat-prerouting
add rule ip kpx nat-prerouting jump services
add rule ip kpx nat-output jump services
add rule ip kpx nat-postrouting jump masquerading
add rule ip kpx filter-input ct state new jump endpoints-check
add rule ip kpx filter-forward ct state invalid drop
add rule ip kpx filter-forward ct state new jump endpoints-check
add rule ip kpx filter-output ct state new jump endpoints-check
add rule ip kpx endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kpx endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kpx services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kpx services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
add rule ip kpx masquerading ct status dnat ip saddr . ip daddr @hairpin masquerade comment "hairpin: a pod reaching itself through a Service"
add rule ip kpx masquerading meta mark & 0x4000 == 0 return
add rule ip kpx masquerading meta mark set meta mark ^ 0x4000
add rule ip kpx masquerading masquerade fully-random
add rule ip kpx mark-for-masquerade meta mark set meta mark | 0x4000
add rule ip kpx reject-chain meta l4proto tcp reject with tcp reset
add rule ip kpx reject-chain reject
add element ip kpx endpoints-0 { 0 : 198.18.1.5 . 8080, 1 : 198.18.2.7 . 8080 }
add chain ip kpx svc-1a2b3c4d-default/web/tcp/http
add rule ip kpx svc-1a2b3c4d-default/web/tcp/http ip daddr 198.19.0.10 tcp dport 80 ip saddr != 198.18.0.0/16 jump mark-for-masquerade comment "default/web:http cluster IP"
add rule ip kpx svc-1a2b3c4d-default/web/tcp/http meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @endpoints-0 comment "default/web:http"
add element ip kpx service-ips { 198.19.0.10 . tcp . 80 : goto svc-1a2b3c4d-default/web/tcp/http }
add element ip kpx no-endpoint-services { 198.19.0.11 . tcp . 80 : goto reject-chain }
add element ip kpx no-endpoint-nodeports { tcp . 30081 : drop }
add element ip kpx hairpin { 198.18.1.5 . 198.18.1.5 }
"#;

const SVC: &str = "svc-1a2b3c4d-default/web/tcp/http";
const NODE: &str = "198.18.0.10";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address in a test")
}

fn loaded() -> Ruleset {
    let mut rs = Ruleset::new();
    if let Err(e) = rs.apply(LAYOUT) {
        panic!("the layout of nft-layout.md does not load: {e}");
    }
    rs
}

fn go(rs: &Ruleset, from: &str, to: &str, proto: &str, port: u16, path: Path) -> Vec<String> {
    let local = [ip(NODE)];
    let packet = Packet {
        src: ip(from),
        dst: ip(to),
        protocol: proto,
        dport: port,
        local: &local,
    };
    describe(&trace(rs, &packet, path))
}

/// Applies `text` expecting the kernel to refuse it; returns the error.
fn refused(rs: &mut Ruleset, text: &str) -> LoadError {
    let before = rs.listing();
    match rs.apply(text) {
        Ok(()) => panic!("accepted, the kernel would refuse it:\n{text}"),
        Err(e) => {
            assert_eq!(
                rs.listing(),
                before,
                "a refused transaction changed the table"
            );
            e
        }
    }
}

#[test]
fn a_pod_reaches_either_endpoint_unmasqueraded() {
    let rs = loaded();
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "tcp", 80, Path::Forwarded),
        [
            "DNAT to 198.18.1.5:8080 p=0.50",
            "DNAT to 198.18.2.7:8080 p=0.50"
        ]
    );
}

#[test]
fn a_client_off_the_cluster_cidr_is_masqueraded() {
    let rs = loaded();
    assert_eq!(
        go(
            &rs,
            "198.19.255.1",
            "198.19.0.10",
            "tcp",
            80,
            Path::Forwarded
        ),
        [
            "DNAT to 198.18.1.5:8080 p=0.50 masquerade",
            "DNAT to 198.18.2.7:8080 p=0.50 masquerade"
        ]
    );
}

#[test]
fn a_pod_reaching_itself_is_masqueraded_by_the_hairpin_set() {
    let rs = loaded();
    assert_eq!(
        go(&rs, "198.18.1.5", "198.19.0.10", "tcp", 80, Path::Forwarded),
        [
            "DNAT to 198.18.1.5:8080 p=0.50 masquerade",
            "DNAT to 198.18.2.7:8080 p=0.50"
        ]
    );
}

#[test]
fn the_node_reaches_the_cluster_ip_through_output() {
    let rs = loaded();
    let local = [ip(NODE)];
    let packet = Packet {
        src: ip(NODE),
        dst: ip("198.19.0.10"),
        protocol: "tcp",
        dport: 80,
        local: &local,
    };
    let out = trace(&rs, &packet, Path::Node);
    assert_eq!(
        describe(&out),
        [
            "DNAT to 198.18.1.5:8080 p=0.50",
            "DNAT to 198.18.2.7:8080 p=0.50"
        ]
    );
    assert_eq!(
        out[0].chains,
        [
            "nat-output",
            "services",
            SVC,
            "filter-output",
            "endpoints-check",
            "nat-postrouting",
            "masquerading"
        ]
    );
}

#[test]
fn another_port_or_protocol_is_not_a_service() {
    let rs = loaded();
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "udp", 80, Path::Forwarded),
        ["accepted p=1.00"]
    );
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "tcp", 81, Path::Forwarded),
        ["accepted p=1.00"]
    );
}

#[test]
fn no_endpoints_rejects_tcp_with_a_reset_and_a_nodeport_drops() {
    let rs = loaded();
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.11", "tcp", 80, Path::Forwarded),
        ["reject with tcp reset p=1.00"]
    );
    assert_eq!(
        go(&rs, "198.19.255.1", NODE, "tcp", 30081, Path::Forwarded),
        ["drop p=1.00"]
    );
    assert_eq!(
        go(&rs, NODE, NODE, "tcp", 30081, Path::Node),
        ["drop p=1.00"]
    );
    // Loopback is excluded, as kube-proxy excludes it (`ip daddr != 127.0.0.0/8`).
    assert_eq!(
        go(&rs, "127.0.0.1", "127.0.0.1", "tcp", 30081, Path::Node),
        ["accepted p=1.00"]
    );
}

#[test]
fn a_missing_slot_breaks_the_dnat_rule() {
    let mut rs = loaded();
    rs.apply("delete element ip kpx endpoints-0 { 1 }")
        .expect("deleting a present element");
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "tcp", 80, Path::Forwarded),
        ["DNAT to 198.18.1.5:8080 p=0.50", "accepted p=0.50"]
    );
}

#[test]
fn a_partial_sync_replaces_an_endpoint_by_two_element_operations() {
    let mut rs = loaded();
    rs.apply(
        "delete element ip kpx endpoints-0 { 1 }\n\
         add element ip kpx endpoints-0 { 1 : 198.18.2.9 . 8080 }",
    )
    .expect("an endpoint replaced");
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "tcp", 80, Path::Forwarded),
        [
            "DNAT to 198.18.1.5:8080 p=0.50",
            "DNAT to 198.18.2.9:8080 p=0.50"
        ]
    );
    // A Service port's chain rewritten: add (idempotent), flush, its rules.
    rs.apply(&format!(
        "add chain ip kpx {SVC}\nflush chain ip kpx {SVC}\n\
         add rule ip kpx {SVC} meta l4proto tcp dnat ip to 198.18.1.5:8080"
    ))
    .expect("a chain rewritten");
    assert_eq!(
        go(
            &rs,
            "198.19.255.1",
            "198.19.0.10",
            "tcp",
            80,
            Path::Forwarded
        ),
        ["DNAT to 198.18.1.5:8080 p=1.00"]
    );
}

#[test]
fn a_removed_service_port_chain_is_deleted_only_once_unreferenced() {
    let mut rs = loaded();
    let e = refused(&mut rs, &format!("delete chain ip kpx {SVC}"));
    assert!(
        e.reason.contains("EBUSY") && e.reason.contains("service-ips"),
        "{e}"
    );
    // The sync drops the reference and flushes; the housekeeping tick deletes.
    rs.apply(&format!(
        "delete element ip kpx service-ips {{ 198.19.0.10 . tcp . 80 }}\nflush chain ip kpx {SVC}"
    ))
    .expect("the reference dropped");
    rs.apply(&format!("delete chain ip kpx {SVC}"))
        .expect("an unreferenced chain deleted");
    assert_eq!(rs.rules("ip", "kpx", SVC), None);
    // A rule's jump is a reference too.
    let e = refused(&mut rs, "delete chain ip kpx services");
    assert!(e.reason.contains("EBUSY"), "{e}");
}

#[test]
fn references_to_what_does_not_exist_are_refused_with_the_line() {
    let mut rs = loaded();
    let e = refused(
        &mut rs,
        "add chain ip kpx a\nadd rule ip kpx a jump nowhere",
    );
    assert_eq!(e.line, 2, "{e}");
    assert!(e.reason.contains("\"nowhere\""), "{e}");
    let e = refused(
        &mut rs,
        "add rule ip kpx services ip daddr @no-such-set accept",
    );
    assert!(e.reason.contains("@no-such-set"), "{e}");
    let e = refused(
        &mut rs,
        "add element ip kpx service-ips { 198.19.0.20 . tcp . 80 : goto svc-gone }",
    );
    assert!(e.reason.contains("svc-gone"), "{e}");
    let e = refused(&mut rs, "add rule ip kpx nowhere accept");
    assert!(e.reason.contains("does not exist"), "{e}");
    let e = refused(&mut rs, "add rule ip kpx services jump nat-output");
    assert!(e.reason.contains("base chain"), "{e}");
    let e = refused(&mut rs, "add chain ip other c");
    assert!(e.reason.contains("table ip other"), "{e}");
}

#[test]
fn deleting_an_absent_element_or_a_used_set_is_refused() {
    let mut rs = loaded();
    let e = refused(&mut rs, "delete element ip kpx endpoints-0 { 7 }");
    assert!(e.reason.contains("ENOENT"), "{e}");
    let e = refused(&mut rs, "delete map ip kpx service-ips");
    assert!(e.reason.contains("EBUSY"), "{e}");
    let e = refused(
        &mut rs,
        "add element ip kpx endpoints-0 { 0 : 198.18.9.9 . 8080 }",
    );
    assert!(e.reason.contains("another value"), "{e}");
    // Adding an element again with the same value is a no-op, as `nft add element` is.
    rs.apply("add element ip kpx endpoints-0 { 0 : 198.18.1.5 . 8080 }")
        .expect("an equal element added again");
    assert_eq!(rs.element_count("ip", "kpx", "endpoints-0"), Some(2));
    let e = refused(&mut rs, "add element ip kpx hairpin { 198.18.1.5 }");
    assert!(e.reason.contains("part(s)"), "{e}");
    let e = refused(
        &mut rs,
        "add element ip kpx hairpin { 198.18.0.0/16 . 198.18.1.5 }",
    );
    assert!(e.reason.contains("interval"), "{e}");
}

#[test]
fn a_chain_added_twice_keeps_its_hook_or_is_refused() {
    let mut rs = loaded();
    rs.apply(
        "add chain ip kpx nat-prerouting { type nat hook prerouting priority -100 ; policy accept ; }\n\
         add chain ip kpx nat-prerouting\nadd table ip kpx",
    )
    .expect("the same declarations again");
    let e = refused(
        &mut rs,
        "add chain ip kpx nat-prerouting { type nat hook output priority -100 ; }",
    );
    assert!(e.reason.contains("cannot change"), "{e}");
    let e = refused(
        &mut rs,
        "add chain ip kpx services { type nat hook output priority -100 ; }",
    );
    assert!(e.reason.contains("regular chain"), "{e}");
    let e = refused(
        &mut rs,
        "add chain ip kpx x { type nat hook input priority dstnat ; }",
    );
    assert!(e.reason.contains("write a number"), "{e}");
}

#[test]
fn what_the_interpreter_does_not_know_fails_naming_the_token() {
    let mut rs = loaded();
    for (text, token) in [
        (
            "add rule ip kpx services ip daddr 198.19.0.1 log prefix x",
            "\"log\"",
        ),
        ("add rule ip kpx services tcp sport 80 accept", "\"tcp\""),
        (
            "add rule ip kpx services ip daddr { 198.19.0.1, 198.19.0.2 } accept",
            "\"{\"",
        ),
        ("add counter ip kpx c", "\"add counter\""),
        ("add rule inet kpx services accept", "\"inet\""),
        ("add set ip kpx s { type ether_addr ; }", "\"ether_addr\""),
        ("add rule ip kpx services ip6 daddr ::1 accept", "ip6 daddr"),
        ("add rule ip kpx services accept extra", "\"extra\""),
    ] {
        let e = refused(&mut rs, text);
        assert!(e.reason.contains(token), "{text}: {e}");
    }
}

#[test]
fn the_commit_validates_hooks_loops_and_dependencies() {
    let mut rs = loaded();
    // DNAT reached from a filter chain.
    let e = refused(
        &mut rs,
        "add chain ip kpx bad\nadd rule ip kpx bad meta l4proto tcp dnat ip to 198.18.1.5:80\n\
         add rule ip kpx endpoints-check jump bad",
    );
    assert_eq!(e.line, 0, "{e}");
    assert!(e.reason.contains("dnat"), "{e}");
    // Masquerade reached from prerouting.
    let e = refused(
        &mut rs,
        "add chain ip kpx bad\nadd rule ip kpx bad masquerade\nadd rule ip kpx services jump bad",
    );
    assert!(e.reason.contains("masquerade"), "{e}");
    // A loop through a verdict map.
    let e = refused(
        &mut rs,
        &format!("add rule ip kpx {SVC} ip daddr . meta l4proto . th dport vmap @service-ips"),
    );
    assert!(e.reason.contains("loop"), "{e}");
    // A port mapping without a transport protocol match (nft refuses it).
    let e = refused(
        &mut rs,
        &format!("add rule ip kpx {SVC} dnat ip to 198.18.1.5:80"),
    );
    assert!(e.reason.contains("l4proto"), "{e}");
    // A dnat in a filter chain's own rule is refused as well as one reached by a jump.
    let e = refused(
        &mut rs,
        "add rule ip kpx filter-input meta l4proto tcp dnat ip to 198.18.1.5:80",
    );
    assert!(e.reason.contains("dnat"), "{e}");
}

#[test]
fn session_affinity_sticks_once_recorded() {
    let mut rs = loaded();
    let chain = "svc-5e6f7a8b-default/sticky/tcp/80";
    let a = format!("{chain}-ep-11111111");
    let b = format!("{chain}-ep-22222222");
    rs.apply(&format!(
        "add chain ip kpx {chain}\n\
         add set ip kpx {a} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}\n\
         add set ip kpx {b} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}\n\
         add rule ip kpx {chain} ip saddr @{a} update @{a} {{ ip saddr }} meta l4proto tcp dnat ip to 198.18.1.5:8080\n\
         add rule ip kpx {chain} ip saddr @{b} update @{b} {{ ip saddr }} meta l4proto tcp dnat ip to 198.18.2.7:8080\n\
         add rule ip kpx {chain} numgen random mod 2 == 0 update @{a} {{ ip saddr }} meta l4proto tcp dnat ip to 198.18.1.5:8080\n\
         add rule ip kpx {chain} update @{b} {{ ip saddr }} meta l4proto tcp dnat ip to 198.18.2.7:8080\n\
         add element ip kpx service-ips {{ 198.19.0.20 . tcp . 80 : goto {chain} }}"
    ))
    .expect("an affinity Service");
    let local = [ip(NODE)];
    let packet = Packet {
        src: ip("198.18.3.3"),
        dst: ip("198.19.0.20"),
        protocol: "tcp",
        dport: 80,
        local: &local,
    };
    let first = trace(&rs, &packet, Path::Forwarded);
    assert_eq!(
        describe(&first),
        [
            "DNAT to 198.18.1.5:8080 p=0.50 affinity=10800s",
            "DNAT to 198.18.2.7:8080 p=0.50 affinity=10800s"
        ]
    );
    let Some(to_b) = first
        .iter()
        .find(|o| o.dnat.as_deref() == Some("198.18.2.7:8080"))
    else {
        panic!("no way to 198.18.2.7");
    };
    rs.record(to_b);
    assert_eq!(
        describe(&trace(&rs, &packet, Path::Forwarded)),
        ["DNAT to 198.18.2.7:8080 p=1.00 affinity=10800s"]
    );
    // Another client is not stuck.
    assert_eq!(
        go(&rs, "198.18.3.4", "198.19.0.20", "tcp", 80, Path::Forwarded).len(),
        2
    );
}

#[test]
fn ipv6_tables_dnat_to_bracketed_endpoints() {
    let mut rs = Ruleset::new();
    rs.apply(
        "add table ip6 kpx\n\
         add chain ip6 kpx nat-prerouting { type nat hook prerouting priority -100 ; policy accept ; }\n\
         add chain ip6 kpx services\n\
         add chain ip6 kpx svc-1\n\
         add map ip6 kpx service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; }\n\
         add map ip6 kpx endpoints-0 { typeof numgen random mod 1 : ip6 daddr . tcp dport ; }\n\
         add rule ip6 kpx nat-prerouting jump services\n\
         add rule ip6 kpx services ip6 daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip6 kpx svc-1 meta l4proto tcp dnat ip6 to numgen random mod 1 offset 65536 map @endpoints-0\n\
         add element ip6 kpx endpoints-0 { 65536 : 2001:2::5 . 8080 }\n\
         add element ip6 kpx service-ips { 2001:2:1::10 . tcp . 80 : goto svc-1 }",
    )
    .expect("an IPv6 table");
    assert_eq!(
        go(
            &rs,
            "2001:2::99",
            "2001:2:1::10",
            "tcp",
            80,
            Path::Forwarded
        ),
        ["DNAT to [2001:2::5]:8080 p=1.00"]
    );
    // The IPv4 tables do not see IPv6 packets, and the other way round.
    assert_eq!(
        go(
            &loaded(),
            "2001:2::99",
            "2001:2:1::10",
            "tcp",
            80,
            Path::Forwarded
        ),
        ["accepted p=1.00"]
    );
}

#[test]
fn base_chains_of_a_hook_run_in_priority_order_across_tables_and_nat_once() {
    let mut rs = loaded();
    // A second table whose prerouting nat chain runs first (-110) and DNATs elsewhere: the
    // kernel sets up the NAT binding once, so kpx's nat chain does not run after it.
    rs.apply(
        "add table ip other\n\
         add chain ip other pre { type nat hook prerouting priority -110 ; }\n\
         add rule ip other pre ip daddr 198.19.0.10 meta l4proto tcp dnat ip to 198.18.7.7:80",
    )
    .expect("a second table");
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "tcp", 80, Path::Forwarded),
        ["DNAT to 198.18.7.7:80 p=1.00"]
    );
    // A filter chain dropping everything at forward, policy drop.
    rs.apply("add chain ip other fwd { type filter hook forward priority 0 ; policy drop ; }")
        .expect("a drop policy");
    assert_eq!(
        go(&rs, "198.18.3.3", "198.19.0.10", "tcp", 80, Path::Forwarded),
        ["drop after DNAT to 198.18.7.7:80 p=1.00"]
    );
}

#[test]
fn a_table_deleted_and_loaded_again_is_the_same() {
    let mut rs = loaded();
    let before = rs.listing();
    rs.apply("delete table ip kpx").expect("the table deleted");
    assert_eq!(rs.listing(), "");
    rs.apply(LAYOUT).expect("loaded again");
    assert_eq!(rs.listing(), before);
}

/// nft 1.0.6 reads an existing map's `typeof` back from the kernel and refuses a DNAT rule
/// whose protocol differs from the `dport` there (`th` included); in the transaction that
/// declares the map it does not. Each step as this machine's nft answered it.
#[test]
fn a_slot_maps_typeof_protocol_must_match_once_the_map_exists() {
    let declare = |value: &str| {
        format!(
            "add table ip t\n\
             add chain ip t pre {{ type nat hook prerouting priority -100 ; }}\n\
             add map ip t m {{ typeof numgen random mod 1 : {value} ; }}\n\
             add element ip t m {{ 0 : 198.18.1.4 . 80 }}\n\
             add rule ip t pre meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @m"
        )
    };
    let again = "add rule ip t pre meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @m";
    let mut rs = Ruleset::new();
    rs.apply(&declare("ip daddr . th dport"))
        .expect("th dport: the first load passes");
    let e = refused(&mut rs, again);
    assert!(e.reason.contains("tcp vs. th"), "{e}");
    let e = refused(&mut rs, &declare("ip daddr . th dport"));
    assert!(e.reason.contains("tcp vs. th"), "a full plan again: {e}");

    let mut rs = Ruleset::new();
    rs.apply(&declare("ip daddr . tcp dport"))
        .expect("tcp dport: the first load");
    rs.apply(again).expect("tcp dport: a tcp rule later");
    rs.apply(&declare("ip daddr . tcp dport"))
        .expect("tcp dport: the full plan again");
    let e = refused(
        &mut rs,
        "add rule ip t pre meta l4proto udp dnat ip to numgen random mod 2 offset 0 map @m",
    );
    assert!(e.reason.contains("udp vs. tcp"), "{e}");
}

/// `flush set` of a map (and `flush map` of a set) is refused, `delete` takes either word, as
/// this machine's nft 1.0.6 answers.
#[test]
fn flush_names_the_kind_delete_does_not() {
    let mut rs = loaded();
    let e = refused(&mut rs, "flush set ip kpx endpoints-0");
    assert!(e.reason.contains("ENOENT"), "{e}");
    let e = refused(&mut rs, "flush map ip kpx hairpin");
    assert!(e.reason.contains("ENOENT"), "{e}");
    rs.apply(
        "add map ip kpx m { typeof numgen random mod 1 : ip daddr . tcp dport ; }\n\
         add set ip kpx s { type ipv4_addr ; }\n\
         delete set ip kpx m\ndelete map ip kpx s",
    )
    .expect("delete with either word");
    assert_eq!(rs.element_count("ip", "kpx", "m"), None);
    assert_eq!(rs.element_count("ip", "kpx", "s"), None);
}
