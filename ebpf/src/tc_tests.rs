//! Packet-level tests of the tc program with `BPF_PROG_TEST_RUN`: a packet in, the rewritten
//! packet and the verdict out, with the maps written as the backend writes them.

use std::collections::BTreeSet;
use std::net::IpAddr;

use aya::maps::HashMap;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;

use crate::apply::{apply, set_config, set_node_addrs, ApplyError};
use crate::layout::*;
use crate::objects::{self, Capacity};
use crate::plan::{plan, Programmed, Wanted, WantedService};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// Loads the tc object, or says why the test cannot run (and fails when the suite demands
/// kernel tests, as `cargo xtask test` does).
fn load() -> Option<Ebpf> {
    load_with(&Capacity::default())
}

/// [`load`] with map capacities.
fn load_with(capacity: &Capacity) -> Option<Ebpf> {
    let required = std::env::var("KPX_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    if !nix_is_root() {
        assert!(!required, "BPF tests need root (KPX_REQUIRE_NETNS=1)");
        eprintln!("SKIPPED: loading BPF programs needs root");
        return None;
    }
    let mut ebpf = objects::load(objects::TC_LB, None, capacity).expect("load tc_lb");
    let program: &mut SchedClassifier = ebpf
        .program_mut("kpx_tc_lb")
        .expect("kpx_tc_lb in the object")
        .try_into()
        .expect("a classifier");
    program.load().expect("the verifier accepts kpx_tc_lb");
    Some(ebpf)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

/// Writes one Service through the map plan and its apply, as the backend does.
fn add_service(
    ebpf: &mut Ebpf,
    frontend: (&str, u16, u8),
    backends: &[(&str, u16)],
    affinity_timeout: u32,
) {
    let service = WantedService {
        name: format!("default/{}:{}", frontend.0, frontend.1),
        flags: 0,
        affinity_timeout,
        backends: backends
            .iter()
            .map(|(a, p)| Backend::new(ip(a), *p))
            .collect(),
        source_ranges: BTreeSet::new(),
    };
    add_service_with(ebpf, frontend, service);
}

/// Adds one Service (alone in its plan: ids restart at 1, so each test uses one per call
/// or distinct frontends written together).
fn add_service_with(ebpf: &mut Ebpf, frontend: (&str, u16, u8), service: WantedService) {
    let (addr, port, proto) = frontend;
    let key = ServiceKey::new(ip(addr), port, proto);
    let programmed = read_programmed(ebpf);
    let mut wanted: Wanted = programmed_as_wanted(ebpf, &programmed);
    wanted.insert(key, service);
    let (ops, _) = plan(&wanted, &programmed);
    apply(ebpf, &ops).expect("apply");
}

/// What the maps hold, read back (as a restarted proxy adopts them).
fn read_programmed(ebpf: &Ebpf) -> Programmed {
    crate::adopt::programmed(ebpf).expect("read the maps")
}

fn programmed_as_wanted(ebpf: &Ebpf, programmed: &Programmed) -> Wanted {
    let backends: HashMap<_, u32, Backend> =
        HashMap::try_from(ebpf.map("kpx_backends").expect("map")).expect("hash");
    programmed
        .services
        .iter()
        .map(|(key, (value, ids))| {
            (
                *key,
                WantedService {
                    name: String::new(),
                    flags: value.flags,
                    affinity_timeout: value.affinity_timeout,
                    backends: ids
                        .iter()
                        .map(|id| backends.get(id, 0).expect("backend"))
                        .collect(),
                    source_ranges: programmed
                        .source_ranges
                        .get(&value.id)
                        .cloned()
                        .unwrap_or_default(),
                },
            )
        })
        .collect()
}

/// Runs the program on `packet`; returns the verdict and the packet as it left.
fn run(ebpf: &Ebpf, packet: &[u8]) -> (u32, Vec<u8>) {
    let program: &SchedClassifier = ebpf
        .program("kpx_tc_lb")
        .expect("program")
        .try_into()
        .expect("classifier");
    let mut out = vec![0u8; packet.len() + 64];
    let mut options = TestRunOptions::new();
    options.data_in = Some(packet);
    options.data_out = Some(&mut out);
    let result = program.test_run(options).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying a TCP SYN or a UDP datagram, with correct checksums.
fn packet(src: (&str, u16), dst: (&str, u16), proto: u8) -> Vec<u8> {
    let (s, d) = (ip(src.0), ip(dst.0));
    let mut l4 = Vec::new();
    l4.extend(src.1.to_be_bytes());
    l4.extend(dst.1.to_be_bytes());
    if proto == TCP {
        l4.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend(((8 + 4) as u16).to_be_bytes());
        l4.extend([0, 0]);
    }
    l4.extend(b"ping");
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let pseudo: Vec<u8> = match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend([0x08, 0x00]);
            let total = (20 + l4.len()) as u16;
            let mut header = vec![0x45, 0];
            header.extend(total.to_be_bytes());
            header.extend([0, 0, 0x40, 0, 64, proto, 0, 0]);
            header.extend(s.octets());
            header.extend(d.octets());
            let csum = fold(sum16(&header));
            header[10..12].copy_from_slice(&csum.to_be_bytes());
            frame.extend(&header);
            [
                &s.octets()[..],
                &d.octets()[..],
                &[0, proto],
                &(l4.len() as u16).to_be_bytes(),
            ]
            .concat()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend([0x86, 0xdd]);
            frame.extend([0x60, 0, 0, 0]);
            frame.extend((l4.len() as u16).to_be_bytes());
            frame.extend([proto, 64]);
            frame.extend(s.octets());
            frame.extend(d.octets());
            [
                &s.octets()[..],
                &d.octets()[..],
                &(l4.len() as u32).to_be_bytes(),
                &[0, 0, 0, proto],
            ]
            .concat()
        }
        _ => panic!("mixed families"),
    };
    let csum = fold(sum16(&pseudo) + sum16(&l4));
    let at = if proto == TCP { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    frame.extend(l4);
    frame
}

/// Source and destination as the packet carries them, after checking its checksums.
fn addresses(frame: &[u8]) -> ((IpAddr, u16), (IpAddr, u16)) {
    let (l3, proto, s, d, l4) = if frame[12..14] == [0x08, 0x00] {
        let h = &frame[14..34];
        assert_eq!(fold(sum16(h)), 0, "IPv4 header checksum");
        let s: [u8; 4] = h[12..16].try_into().expect("4 bytes");
        let d: [u8; 4] = h[16..20].try_into().expect("4 bytes");
        (h, h[9], IpAddr::from(s), IpAddr::from(d), &frame[34..])
    } else {
        let h = &frame[14..54];
        let s: [u8; 16] = h[8..24].try_into().expect("16 bytes");
        let d: [u8; 16] = h[24..40].try_into().expect("16 bytes");
        (h, h[6], IpAddr::from(s), IpAddr::from(d), &frame[54..])
    };
    let _ = l3;
    let pseudo = match (s, d) {
        (IpAddr::V4(a), IpAddr::V4(b)) => [
            &a.octets()[..],
            &b.octets()[..],
            &[0, proto],
            &(l4.len() as u16).to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V6(a), IpAddr::V6(b)) => [
            &a.octets()[..],
            &b.octets()[..],
            &(l4.len() as u32).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat(),
        _ => unreachable!(),
    };
    assert_eq!(fold(sum16(&pseudo) + sum16(l4)), 0, "L4 checksum");
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    ((s, sport), (d, dport))
}

#[test]
fn dnat_then_reverse_nat_over_ipv4_tcp() {
    let Some(mut ebpf) = load() else { return };
    add_service(
        &mut ebpf,
        ("198.18.128.9", 80, TCP),
        &[("198.19.1.10", 8080)],
        0,
    );
    let syn = packet(("198.19.1.11", 40000), ("198.18.128.9", 80), TCP);
    let (verdict, out) = run(&ebpf, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses(&out),
        ((ip("198.19.1.11"), 40000), (ip("198.19.1.10"), 8080))
    );
    // The reply, from the backend, leaves with the Service's address as its source.
    let reply = packet(("198.19.1.10", 8080), ("198.19.1.11", 40000), TCP);
    let (verdict, out) = run(&ebpf, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses(&out),
        ((ip("198.18.128.9"), 80), (ip("198.19.1.11"), 40000))
    );
    // Both directions are in conntrack.
    let ct: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(ebpf.map("kpx_ct").expect("map")).expect("hash");
    let flags: BTreeSet<u32> = ct.iter().map(|e| e.expect("entry").1.flags).collect();
    assert_eq!(flags, BTreeSet::from([0, CT_F_REPLY]));
}

#[test]
fn traffic_that_is_not_for_a_service_passes_untouched() {
    let Some(mut ebpf) = load() else { return };
    add_service(
        &mut ebpf,
        ("198.18.128.9", 80, TCP),
        &[("198.19.1.10", 8080)],
        0,
    );
    for other in [
        packet(("198.19.1.11", 40000), ("198.18.128.9", 81), TCP),
        packet(("198.19.1.11", 40000), ("198.18.128.9", 80), UDP),
        packet(("198.19.1.11", 40000), ("198.19.1.10", 8080), TCP),
    ] {
        assert_eq!(run(&ebpf, &other), (TC_ACT_OK, other.clone()));
    }
}

#[test]
fn a_flow_keeps_its_backend_and_new_flows_spread() {
    let Some(mut ebpf) = load() else { return };
    let backends = [
        ("198.19.1.10", 8080),
        ("198.19.2.10", 8080),
        ("198.19.2.11", 8080),
    ];
    add_service(&mut ebpf, ("198.18.128.7", 80, TCP), &backends, 0);
    let flow = packet(("198.19.1.11", 40000), ("198.18.128.7", 80), TCP);
    let first = addresses(&run(&ebpf, &flow).1).1;
    for _ in 0..20 {
        assert_eq!(addresses(&run(&ebpf, &flow).1).1, first);
    }
    let mut seen = BTreeSet::new();
    for port in 0..300u16 {
        let p = packet(("198.19.1.11", 41000 + port), ("198.18.128.7", 80), TCP);
        seen.insert(addresses(&run(&ebpf, &p).1).1);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn session_affinity_sends_every_flow_of_a_client_to_one_backend() {
    let Some(mut ebpf) = load() else { return };
    let backends = [
        ("198.19.1.10", 8080),
        ("198.19.2.10", 8080),
        ("198.19.2.11", 8080),
    ];
    add_service(&mut ebpf, ("198.18.128.3", 80, TCP), &backends, 10800);
    let mut seen = BTreeSet::new();
    for port in 0..50u16 {
        let p = packet(("198.19.1.11", 42000 + port), ("198.18.128.3", 80), TCP);
        seen.insert(addresses(&run(&ebpf, &p).1).1);
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Another client gets its own choice, also sticky.
    let mut other = BTreeSet::new();
    for port in 0..20u16 {
        let p = packet(("198.19.1.12", 42000 + port), ("198.18.128.3", 80), TCP);
        other.insert(addresses(&run(&ebpf, &p).1).1);
    }
    assert_eq!(other.len(), 1, "{other:?}");
}

const TC_ACT_REDIRECT: u32 = 7;

/// The reply a rejecting program builds: Ethernet addresses swapped, from the Service to the
/// client, checksums right. Returns the IP protocol and the L4 (or ICMP) bytes.
fn rejection(frame: &[u8], service: IpAddr, client: IpAddr) -> (u8, Vec<u8>) {
    assert_eq!(frame[0..6], [2, 0, 0, 0, 0, 2], "back to the sender's MAC");
    assert_eq!(frame[6..12], [2, 0, 0, 0, 0, 1]);
    let (proto, s, d, l4) = if frame[12..14] == [0x08, 0x00] {
        let h = &frame[14..34];
        assert_eq!(fold(sum16(h)), 0, "IPv4 header checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([h[2], h[3]])),
            frame.len() - 14
        );
        let s: [u8; 4] = h[12..16].try_into().expect("4 bytes");
        let d: [u8; 4] = h[16..20].try_into().expect("4 bytes");
        (h[9], IpAddr::from(s), IpAddr::from(d), &frame[34..])
    } else {
        let h = &frame[14..54];
        assert_eq!(
            usize::from(u16::from_be_bytes([h[4], h[5]])),
            frame.len() - 54
        );
        let s: [u8; 16] = h[8..24].try_into().expect("16 bytes");
        let d: [u8; 16] = h[24..40].try_into().expect("16 bytes");
        (h[6], IpAddr::from(s), IpAddr::from(d), &frame[54..])
    };
    assert_eq!((s, d), (service, client));
    let pseudo = match (s, d) {
        (IpAddr::V4(a), IpAddr::V4(b)) if proto == TCP => [
            &a.octets()[..],
            &b.octets()[..],
            &[0, proto],
            &(l4.len() as u16).to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V4(_), IpAddr::V4(_)) => Vec::new(), // ICMPv4 has no pseudo-header
        (IpAddr::V6(a), IpAddr::V6(b)) => [
            &a.octets()[..],
            &b.octets()[..],
            &(l4.len() as u32).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat(),
        _ => unreachable!(),
    };
    assert_eq!(fold(sum16(&pseudo) + sum16(l4)), 0, "L4/ICMP checksum");
    (proto, l4.to_vec())
}

#[test]
fn a_tcp_syn_to_a_service_without_endpoints_is_answered_with_a_reset() {
    let Some(mut ebpf) = load() else { return };
    add_service(&mut ebpf, ("198.18.128.4", 80, TCP), &[], 0);
    let syn = packet(("198.19.1.11", 40000), ("198.18.128.4", 80), TCP);
    let (verdict, out) = run(&ebpf, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
    let (proto, tcp) = rejection(&out, ip("198.18.128.4"), ip("198.19.1.11"));
    assert_eq!(proto, TCP);
    assert_eq!(tcp.len(), 20, "a bare header");
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 80);
    assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
    assert_eq!(tcp[13], 0x14, "RST|ACK");
    // The SYN's sequence number was 1 and it carried 4 bytes: the reset acknowledges 1+4+1.
    assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 6);
}

#[test]
fn udp_to_a_service_without_endpoints_is_answered_with_port_unreachable() {
    let Some(mut ebpf) = load() else { return };
    add_service(&mut ebpf, ("198.18.128.4", 53, UDP), &[], 0);
    add_service(&mut ebpf, ("2001:2:0:ff::4", 53, UDP), &[], 0);
    let query = packet(("198.19.1.11", 5353), ("198.18.128.4", 53), UDP);
    let (verdict, out) = run(&ebpf, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (proto, icmp) = rejection(&out, ip("198.18.128.4"), ip("198.19.1.11"));
    assert_eq!(
        (proto, icmp[0], icmp[1]),
        (1, 3, 3),
        "ICMP port unreachable"
    );
    assert_eq!(
        icmp[8..],
        query[14..14 + 28],
        "quotes the IP header and 8 bytes"
    );

    let query6 = packet(("2001:2:0:101::11", 5353), ("2001:2:0:ff::4", 53), UDP);
    let (verdict, out) = run(&ebpf, &query6);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (proto, icmp) = rejection(&out, ip("2001:2:0:ff::4"), ip("2001:2:0:101::11"));
    assert_eq!(
        (proto, icmp[0], icmp[1]),
        (58, 1, 4),
        "ICMPv6 port unreachable"
    );
    assert_eq!(icmp[8..], query6[14..14 + 48]);
}

#[test]
fn without_endpoints_for_this_traffic_the_packet_is_dropped_not_rejected() {
    let Some(mut ebpf) = load() else { return };
    add_service_with(
        &mut ebpf,
        ("198.18.128.4", 80, TCP),
        WantedService {
            flags: SVC_F_DROP,
            ..Default::default()
        },
    );
    let syn = packet(("198.19.1.11", 40000), ("198.18.128.4", 80), TCP);
    assert_eq!(run(&ebpf, &syn).0, TC_ACT_SHOT);
}

fn node_setup(ebpf: &mut Ebpf) {
    let (node4, _) = address(ip("198.18.0.11"));
    let (node6, _) = address(ip("2001:2::11"));
    set_config(
        ebpf,
        &Config {
            node_ip4: node4,
            node_ip6: node6,
        },
    )
    .expect("config");
    let addrs = ["198.18.0.11", "2001:2::11"]
        .iter()
        .map(|a| NodeAddr::new(ip(a)))
        .collect();
    set_node_addrs(ebpf, &addrs).expect("node addresses");
}

#[test]
fn a_node_port_from_outside_is_masqueraded_and_its_reply_restored() {
    let Some(mut ebpf) = load() else { return };
    node_setup(&mut ebpf);
    add_service_with(
        &mut ebpf,
        ("0.0.0.0", 30080, TCP),
        WantedService {
            flags: SVC_F_NODEPORT | SVC_F_MASQUERADE,
            backends: vec![Backend::new(ip("198.19.2.10"), 8080)],
            ..Default::default()
        },
    );
    // From an external host to the node's address: to the backend, from the node.
    let syn = packet(("198.18.1.1", 45000), ("198.18.0.11", 30080), TCP);
    let (verdict, out) = run(&ebpf, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    let ((src, sport), dst) = addresses(&out);
    assert_eq!(src, ip("198.18.0.11"), "masqueraded to the node");
    assert_eq!(dst, (ip("198.19.2.10"), 8080));
    // The next packet of the flow takes the same translation.
    let (_, again) = run(&ebpf, &syn);
    assert_eq!(addresses(&again), addresses(&out));
    // The reply comes back to the node and leaves for the client, from the NodePort.
    let reply = packet(("198.19.2.10", 8080), ("198.18.0.11", sport), TCP);
    let (verdict, out) = run(&ebpf, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses(&out),
        ((ip("198.18.0.11"), 30080), (ip("198.18.1.1"), 45000))
    );
    // Not a node address: not a NodePort.
    let elsewhere = packet(("198.18.1.1", 45001), ("198.18.0.12", 30080), TCP);
    assert_eq!(run(&ebpf, &elsewhere).1, elsewhere);
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_masqueraded() {
    let Some(mut ebpf) = load() else { return };
    node_setup(&mut ebpf);
    add_service(
        &mut ebpf,
        ("2001:2:0:ff::9", 80, TCP),
        &[("2001:2:0:101::10", 8080)],
        0,
    );
    let syn = packet(("2001:2:0:101::10", 41000), ("2001:2:0:ff::9", 80), TCP);
    let (_, out) = run(&ebpf, &syn);
    let ((src, sport), dst) = addresses(&out);
    assert_eq!(
        src,
        ip("2001:2::11"),
        "hairpin traffic leaves the pod's own address"
    );
    assert_eq!(dst, (ip("2001:2:0:101::10"), 8080));
    let reply = packet(("2001:2:0:101::10", 8080), ("2001:2::11", sport), TCP);
    let (_, out) = run(&ebpf, &reply);
    assert_eq!(
        addresses(&out),
        ((ip("2001:2:0:ff::9"), 80), (ip("2001:2:0:101::10"), 41000))
    );
}

#[test]
fn dnat_then_reverse_nat_over_ipv6_udp() {
    let Some(mut ebpf) = load() else { return };
    add_service(
        &mut ebpf,
        ("2001:2:0:ff::6", 53, UDP),
        &[("2001:2:0:101::10", 5353)],
        0,
    );
    let query = packet(("2001:2:0:101::11", 33000), ("2001:2:0:ff::6", 53), UDP);
    let (verdict, out) = run(&ebpf, &query);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses(&out),
        (
            (ip("2001:2:0:101::11"), 33000),
            (ip("2001:2:0:101::10"), 5353)
        )
    );
    let answer = packet(("2001:2:0:101::10", 5353), ("2001:2:0:101::11", 33000), UDP);
    let (verdict, out) = run(&ebpf, &answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses(&out),
        ((ip("2001:2:0:ff::6"), 53), (ip("2001:2:0:101::11"), 33000))
    );
}

#[test]
fn a_full_map_is_an_error_naming_it_and_the_services_that_fit_keep_working() {
    let capacity = Capacity {
        entries: vec![("kpx_services", 2)],
    };
    let Some(mut ebpf) = load_with(&capacity) else {
        return;
    };
    let wanted: Wanted = (1..=3u8)
        .map(|i| {
            (
                ServiceKey::new([198, 18, 128, i].into(), 80, TCP),
                WantedService {
                    backends: vec![Backend::new([198, 19, 1, 10 + i].into(), 8080)],
                    ..Default::default()
                },
            )
        })
        .collect();
    let (ops, _) = plan(&wanted, &Programmed::default());
    let err = apply(&mut ebpf, &ops).expect_err("the third Service does not fit");
    assert!(
        matches!(
            err,
            ApplyError::Full {
                map: "kpx_services",
                capacity: 2
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "BPF map kpx_services is full (2 entries); raise its capacity"
    );
    let p = packet(("198.19.1.2", 40000), ("198.18.128.1", 80), TCP);
    let (verdict, out) = run(&ebpf, &p);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(addresses(&out).1, (ip("198.19.1.11"), 8080));
}

#[test]
fn a_direct_connection_reusing_a_balanced_flows_tuple_is_not_reverse_natted() {
    let Some(mut ebpf) = load() else { return };
    add_service(
        &mut ebpf,
        ("198.18.128.9", 80, TCP),
        &[("198.19.1.10", 8080)],
        0,
    );
    let balanced = packet(("198.19.1.11", 40000), ("198.18.128.9", 80), TCP);
    run(&ebpf, &balanced);
    // Later the client connects to the pod directly from the same port.
    let direct = packet(("198.19.1.11", 40000), ("198.19.1.10", 8080), TCP);
    assert_eq!(run(&ebpf, &direct).1, direct, "not a Service: untouched");
    let answer = packet(("198.19.1.10", 8080), ("198.19.1.11", 40000), TCP);
    assert_eq!(
        run(&ebpf, &answer).1,
        answer,
        "the pod's answer keeps its address"
    );
}

fn ranges(nets: &[(&str, u8)]) -> BTreeSet<crate::plan::SourceRange> {
    nets.iter()
        .map(|(net, prefix)| crate::plan::SourceRange::new(ip(net), *prefix))
        .collect()
}

/// A frontend flagged for loadBalancerSourceRanges, with these networks.
fn ranged(backends: &[(&str, u16)], nets: &[(&str, u8)]) -> WantedService {
    WantedService {
        flags: SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES,
        backends: backends
            .iter()
            .map(|(a, p)| Backend::new(ip(a), *p))
            .collect(),
        source_ranges: ranges(nets),
        ..Default::default()
    }
}

/// Replaces a frontend's source ranges through a plan, as a sync does.
fn set_ranges(ebpf: &mut Ebpf, frontend: (&str, u16, u8), nets: &[(&str, u8)]) {
    let programmed = read_programmed(ebpf);
    let mut wanted = programmed_as_wanted(ebpf, &programmed);
    let key = ServiceKey::new(ip(frontend.0), frontend.1, frontend.2);
    wanted.get_mut(&key).expect("the frontend").source_ranges = ranges(nets);
    let (ops, _) = plan(&wanted, &programmed);
    apply(ebpf, &ops).expect("apply");
}

#[test]
fn source_ranges_admit_new_connections_only_from_their_networks_in_both_families() {
    let Some(mut ebpf) = load() else { return };
    add_service_with(
        &mut ebpf,
        ("198.19.65.11", 80, TCP),
        ranged(
            &[("198.18.128.2", 8080)],
            &[("198.19.255.0", 24), ("198.18.128.3", 32)],
        ),
    );
    add_service_with(
        &mut ebpf,
        ("2001:2:0:2::11", 80, UDP),
        ranged(&[("2001:2:0:8000::2", 8080)], &[("2001:2:0:1::", 64)]),
    );
    for (src, admitted) in [
        ("198.19.255.1", true),
        ("198.19.255.254", true),
        ("198.18.128.3", true),
        ("198.18.128.4", false),
        ("198.19.254.1", false),
    ] {
        let syn = packet((src, 40000), ("198.19.65.11", 80), TCP);
        let (verdict, out) = run(&ebpf, &syn);
        if admitted {
            assert_eq!(verdict, TC_ACT_OK, "{src}");
            assert_eq!(addresses(&out).1, (ip("198.18.128.2"), 8080), "{src}");
        } else {
            assert_eq!(verdict, TC_ACT_SHOT, "{src} is in no range");
        }
    }
    let inside = packet(("2001:2:0:1::99", 5000), ("2001:2:0:2::11", 80), UDP);
    let (verdict, out) = run(&ebpf, &inside);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(addresses(&out).1, (ip("2001:2:0:8000::2"), 8080));
    let outside = packet(("2001:2:0:3::99", 5000), ("2001:2:0:2::11", 80), UDP);
    assert_eq!(run(&ebpf, &outside).0, TC_ACT_SHOT);
}

#[test]
fn source_ranges_come_before_the_reject_and_are_each_frontends_own() {
    let Some(mut ebpf) = load() else { return };
    // No endpoints: a source in the ranges is rejected, one outside them dropped.
    add_service_with(
        &mut ebpf,
        ("198.19.65.12", 80, TCP),
        ranged(&[], &[("198.19.255.0", 24)]),
    );
    let inside = packet(("198.19.255.1", 40000), ("198.19.65.12", 80), TCP);
    assert_eq!(run(&ebpf, &inside).0, TC_ACT_REDIRECT);
    let outside = packet(("198.19.254.1", 40000), ("198.19.65.12", 80), TCP);
    assert_eq!(run(&ebpf, &outside).0, TC_ACT_SHOT);
    // Flagged without ranges (none could be read): nobody, though the other frontend's
    // range would take the source in; unflagged: everybody.
    add_service_with(
        &mut ebpf,
        ("198.19.65.13", 80, TCP),
        ranged(&[("198.18.128.2", 8080)], &[]),
    );
    let syn = packet(("198.19.255.1", 40001), ("198.19.65.13", 80), TCP);
    assert_eq!(run(&ebpf, &syn).0, TC_ACT_SHOT);
    add_service(
        &mut ebpf,
        ("198.19.65.14", 80, TCP),
        &[("198.18.128.2", 8080)],
        0,
    );
    let syn = packet(("198.19.254.1", 40002), ("198.19.65.14", 80), TCP);
    assert_eq!(run(&ebpf, &syn).0, TC_ACT_OK);
}

#[test]
fn an_established_flow_is_not_asked_again_when_the_ranges_change() {
    let Some(mut ebpf) = load() else { return };
    let front = ("198.19.65.11", 80, TCP);
    add_service_with(
        &mut ebpf,
        front,
        ranged(&[("198.18.128.2", 8080)], &[("198.19.255.0", 24)]),
    );
    let first = packet(("198.19.255.1", 40000), ("198.19.65.11", 80), TCP);
    assert_eq!(run(&ebpf, &first).0, TC_ACT_OK);
    set_ranges(&mut ebpf, front, &[("198.19.253.0", 24)]);
    // The flow keeps going; a new one from the same client is refused.
    let (verdict, out) = run(&ebpf, &first);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(addresses(&out).1, (ip("198.18.128.2"), 8080));
    let second = packet(("198.19.255.1", 40001), ("198.19.65.11", 80), TCP);
    assert_eq!(run(&ebpf, &second).0, TC_ACT_SHOT);
    let moved = packet(("198.19.253.7", 40001), ("198.19.65.11", 80), TCP);
    assert_eq!(run(&ebpf, &moved).0, TC_ACT_OK);
}

#[test]
fn source_ranges_are_read_back_as_written_and_go_with_their_frontend() {
    let Some(mut ebpf) = load() else { return };
    let front = ("2001:2:0:2::11", 80, TCP);
    add_service_with(
        &mut ebpf,
        front,
        ranged(
            &[("2001:2:0:8000::2", 8080)],
            &[("2001:2:0:1::", 64), ("2001:db8::", 32)],
        ),
    );
    let programmed = read_programmed(&ebpf);
    let id = programmed.services[&ServiceKey::new(ip(front.0), front.1, front.2)]
        .0
        .id;
    assert_eq!(
        programmed.source_ranges.get(&id),
        Some(&ranges(&[("2001:2:0:1::", 64), ("2001:db8::", 32)]))
    );
    // Adopted as it is: nothing to write.
    let wanted = programmed_as_wanted(&ebpf, &programmed);
    assert!(plan(&wanted, &programmed).0.is_empty());
    // The frontend removed: its ranges go too, and the tries are empty.
    let (ops, _) = plan(&Wanted::new(), &programmed);
    apply(&mut ebpf, &ops).expect("apply");
    assert!(read_programmed(&ebpf).source_ranges.is_empty());
}

#[test]
fn a_full_source_range_trie_is_an_error_naming_it() {
    let capacity = Capacity {
        entries: vec![("kpx_src_range4", 2)],
    };
    let Some(mut ebpf) = load_with(&capacity) else {
        return;
    };
    let wanted: Wanted = [(
        ServiceKey::new(ip("198.19.65.11"), 80, TCP),
        ranged(
            &[("198.18.128.2", 8080)],
            &[
                ("198.19.255.0", 24),
                ("198.19.254.0", 24),
                ("198.19.253.0", 24),
            ],
        ),
    )]
    .into();
    let (ops, _) = plan(&wanted, &Programmed::default());
    let err = apply(&mut ebpf, &ops).expect_err("the third range does not fit");
    assert!(
        matches!(
            err,
            ApplyError::Full {
                map: "kpx_src_range4",
                capacity: 2
            }
        ),
        "{err}"
    );
    // The entry was never written: nothing half-open reaches the frontend unflagged.
    assert!(read_programmed(&ebpf).services.is_empty());
}
