//! IPVS and rtnetlink messages byte for byte, without root. Every expected message below was
//! written by hand from the layouts, not copied from the encoder's output:
//! - `struct nlmsghdr` (16 bytes): length u32, type u16 (the family id; 0x24 here, what nlctrl
//!   would have assigned), flags u16 (NLM_F_REQUEST 0x1 | NLM_F_ACK 0x4 = 0x5; a dump is
//!   NLM_F_REQUEST | NLM_F_DUMP = 0x301), sequence u32 (7), port id u32 (0: the kernel fills it);
//! - `struct genlmsghdr` (4 bytes): cmd u8, version u8 (IPVS_GENL_VERSION 1), reserved u16;
//! - `struct nlattr` (4 bytes): length u16 (header included, padding not), type u16 (with
//!   NLA_F_NESTED 0x8000 for IPVS_CMD_ATTR_SERVICE/DEST), the value padded to 4 bytes;
//! - ip_vs.h: addresses are 16 bytes (`union nf_inet_addr`, IPv4 in the first 4), ports
//!   `__be16`, AF and protocol u16, the rest u32 in host order (little-endian here), FLAGS is
//!   `struct ip_vs_flags { __u32 flags; __u32 mask; }`, NETMASK is `__be32` (an IPv4 mask in
//!   network order; an IPv6 prefix length as a plain number).
//!
//! Host-order fields make these tests little-endian only.
#![cfg(target_endian = "little")]

use std::net::IpAddr;

use super::dummy;
use super::netlink::*;

const FAMILY: u16 = 0x24;
const SEQ: u32 = 7;

/// Hex pairs, whitespace ignored, `#` to the end of the line a comment.
fn hex(spec: &str) -> Vec<u8> {
    let digits: String = spec
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect();
    assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn check(op: &Op, expected: &str) {
    let got = encode(op, FAMILY, SEQ);
    let want = hex(expected);
    assert_eq!(
        got.len(),
        u32::from_ne_bytes(got[..4].try_into().expect("length")) as usize,
        "nlmsg_len must be the message's length"
    );
    assert_eq!(
        hexdump(&got),
        hexdump(&want),
        "{op:?}\n(left: encoded, right: expected)"
    );
}

fn hexdump(b: &[u8]) -> String {
    b.chunks(4)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

fn v4_tcp() -> ServiceKey {
    ServiceKey::Addr {
        addr: ip("198.18.100.10"),
        port: 80,
        protocol: libc::IPPROTO_TCP as u8,
    }
}

fn v6_udp() -> ServiceKey {
    ServiceKey::Addr {
        addr: ip("2001:2::10"),
        port: 53,
        protocol: libc::IPPROTO_UDP as u8,
    }
}

/// The service part every v4_tcp() message carries.
const V4_TCP_KEY: &str = "
    06 00 01 00  02 00 00 00                          # IPVS_SVC_ATTR_AF: AF_INET (2), 2 bytes padding
    06 00 02 00  06 00 00 00                          # IPVS_SVC_ATTR_PROTOCOL: IPPROTO_TCP (6)
    14 00 03 00  c6 12 64 0a  00 00 00 00             # IPVS_SVC_ATTR_ADDR: 20 bytes, 198.18.100.10
                 00 00 00 00  00 00 00 00             #   and 12 zero bytes of the union
    06 00 04 00  00 50 00 00                          # IPVS_SVC_ATTR_PORT: 80 big-endian
";

const V6_UDP_KEY: &str = "
    06 00 01 00  0a 00 00 00                          # AF: AF_INET6 (10)
    06 00 02 00  11 00 00 00                          # PROTOCOL: IPPROTO_UDP (17)
    14 00 03 00  20 01 00 02  00 00 00 00             # ADDR: 2001:2::10
                 00 00 00 00  00 00 00 10
    06 00 04 00  00 35 00 00                          # PORT: 53
";

#[test]
fn new_service_ipv4_tcp_rr() {
    let op = Op::NewService(Service {
        key: v4_tcp(),
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
        netmask: 0xffff_ffff,
    });
    check(
        &op,
        &format!(
            "68 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00   # nlmsghdr: 104 bytes, REQUEST|ACK, seq 7
             01 01 00 00                                          # IPVS_CMD_NEW_SERVICE, version 1
             54 00 01 80                                          # IPVS_CMD_ATTR_SERVICE|NESTED, 84 bytes
             {V4_TCP_KEY}
             07 00 06 00  72 72 00 00                             # SCHED_NAME: \"rr\\0\", 1 byte padding
             0c 00 07 00  00 00 00 00  ff ff ff ff                # FLAGS: flags 0, mask all ones
             08 00 08 00  00 00 00 00                             # TIMEOUT: 0 (no persistence)
             08 00 09 00  ff ff ff ff                             # NETMASK: 255.255.255.255"
        ),
    );
}

#[test]
fn new_service_ipv6_udp_mh_with_fallback_and_port_flags() {
    let op = Op::NewService(Service {
        key: v6_udp(),
        scheduler: "mh".into(),
        flags: IP_VS_SVC_F_SCHED_MH_FALLBACK | IP_VS_SVC_F_SCHED_MH_PORT,
        timeout: 0,
        netmask: 128,
    });
    check(
        &op,
        &format!(
            "68 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00
             01 01 00 00
             54 00 01 80
             {V6_UDP_KEY}
             07 00 06 00  6d 68 00 00                             # SCHED_NAME: \"mh\\0\"
             0c 00 07 00  18 00 00 00  ff ff ff ff                # FLAGS: SCHED1|SCHED2 (0x08|0x10)
             08 00 08 00  00 00 00 00                             # TIMEOUT 0
             08 00 09 00  80 00 00 00                             # NETMASK: prefix length 128"
        ),
    );
}

#[test]
fn set_service_ipv4_persistent() {
    let op = Op::SetService(Service {
        key: ServiceKey::Addr {
            addr: ip("198.18.100.11"),
            port: 443,
            protocol: libc::IPPROTO_TCP as u8,
        },
        scheduler: "rr".into(),
        flags: IP_VS_SVC_F_PERSISTENT,
        timeout: 10800,
        netmask: 0xffff_ffff,
    });
    check(
        &op,
        "68 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00
         02 01 00 00                                          # IPVS_CMD_SET_SERVICE
         54 00 01 80
         06 00 01 00  02 00 00 00
         06 00 02 00  06 00 00 00
         14 00 03 00  c6 12 64 0b  00 00 00 00  00 00 00 00  00 00 00 00   # 198.18.100.11
         06 00 04 00  01 bb 00 00                             # PORT: 443 = 0x01bb
         07 00 06 00  72 72 00 00
         0c 00 07 00  01 00 00 00  ff ff ff ff                # FLAGS: IP_VS_SVC_F_PERSISTENT
         08 00 08 00  30 2a 00 00                             # TIMEOUT: 10800 s = 0x2a30
         08 00 09 00  ff ff ff ff",
    );
}

#[test]
fn new_service_ipv6_fwmark() {
    let op = Op::NewService(Service {
        key: ServiceKey::Fwmark {
            ipv6: true,
            mark: 0x4001,
        },
        scheduler: "sh".into(),
        flags: 0,
        timeout: 0,
        netmask: 128,
    });
    check(
        &op,
        "4c 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00   # 76 bytes
         01 01 00 00
         38 00 01 80                                          # 56 bytes of service
         06 00 01 00  0a 00 00 00                             # AF_INET6
         08 00 05 00  01 40 00 00                             # IPVS_SVC_ATTR_FWMARK: 0x4001, host order
         07 00 06 00  73 68 00 00                             # \"sh\\0\"
         0c 00 07 00  00 00 00 00  ff ff ff ff
         08 00 08 00  00 00 00 00
         08 00 09 00  80 00 00 00",
    );
}

#[test]
fn del_service_by_address_and_by_fwmark() {
    check(
        &Op::DelService(v4_tcp()),
        &format!(
            "44 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00   # 68 bytes
             03 01 00 00                                          # IPVS_CMD_DEL_SERVICE
             30 00 01 80                                          # the key only: 48 bytes
             {V4_TCP_KEY}"
        ),
    );
    check(
        &Op::DelService(ServiceKey::Fwmark {
            ipv6: false,
            mark: 7,
        }),
        "28 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00
         03 01 00 00
         14 00 01 80
         06 00 01 00  02 00 00 00
         08 00 05 00  07 00 00 00",
    );
}

#[test]
fn new_dest_ipv4_masquerade() {
    let op = Op::NewDest(
        v4_tcp(),
        Dest {
            addr: ip("198.18.1.1"),
            port: 8080,
            weight: 1,
            active_conns: 99, // read back only: not written
            inactive_conns: 99,
        },
    );
    check(
        &op,
        &format!(
            "8c 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00   # 140 bytes
             05 01 00 00                                          # IPVS_CMD_NEW_DEST
             30 00 01 80
             {V4_TCP_KEY}
             48 00 02 80                                          # IPVS_CMD_ATTR_DEST|NESTED, 72 bytes
             14 00 01 00  c6 12 01 01  00 00 00 00  00 00 00 00  00 00 00 00   # DEST_ATTR_ADDR 198.18.1.1
             06 00 02 00  1f 90 00 00                             # DEST_ATTR_PORT 8080 = 0x1f90
             08 00 03 00  00 00 00 00                             # FWD_METHOD: IP_VS_CONN_F_MASQ (0)
             08 00 04 00  01 00 00 00                             # WEIGHT 1
             08 00 05 00  00 00 00 00                             # U_THRESH 0 (none)
             08 00 06 00  00 00 00 00                             # L_THRESH 0
             06 00 0b 00  02 00 00 00                             # ADDR_FAMILY: AF_INET"
        ),
    );
}

#[test]
fn set_dest_ipv6_weight_zero() {
    let op = Op::SetDest(
        v6_udp(),
        Dest {
            addr: ip("2001:2::1:1"),
            port: 5353,
            weight: 0,
            active_conns: 0,
            inactive_conns: 0,
        },
    );
    check(
        &op,
        &format!(
            "8c 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00
             06 01 00 00                                          # IPVS_CMD_SET_DEST
             30 00 01 80
             {V6_UDP_KEY}
             48 00 02 80
             14 00 01 00  20 01 00 02  00 00 00 00  00 00 00 00  00 01 00 01   # 2001:2::1:1
             06 00 02 00  14 e9 00 00                             # 5353 = 0x14e9
             08 00 03 00  00 00 00 00
             08 00 04 00  00 00 00 00                             # WEIGHT 0 (draining)
             08 00 05 00  00 00 00 00
             08 00 06 00  00 00 00 00
             06 00 0b 00  0a 00 00 00                             # AF_INET6"
        ),
    );
}

#[test]
fn del_dest_ipv4() {
    check(
        &Op::DelDest(v4_tcp(), ip("198.18.1.1"), 8080),
        &format!(
            "6c 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00   # 108 bytes
             07 01 00 00                                          # IPVS_CMD_DEL_DEST
             30 00 01 80
             {V4_TCP_KEY}
             28 00 02 80                                          # address, port, family: 40 bytes
             14 00 01 00  c6 12 01 01  00 00 00 00  00 00 00 00  00 00 00 00
             06 00 02 00  1f 90 00 00
             06 00 0b 00  02 00 00 00"
        ),
    );
}

#[test]
fn requests_without_an_op() {
    let eq = |got: Vec<u8>, want: &str| assert_eq!(hexdump(&got), hexdump(&hex(want)));
    eq(
        encode_dump_services(FAMILY, SEQ),
        "14 00 00 00  24 00 01 03  07 00 00 00  00 00 00 00   # REQUEST|DUMP (0x301)
         04 01 00 00                                          # IPVS_CMD_GET_SERVICE",
    );
    eq(
        encode_dump_dests(
            FAMILY,
            SEQ,
            &ServiceKey::Fwmark {
                ipv6: false,
                mark: 7,
            },
        ),
        "28 00 00 00  24 00 01 03  07 00 00 00  00 00 00 00
         08 01 00 00                                          # IPVS_CMD_GET_DEST
         14 00 01 80  06 00 01 00  02 00 00 00  08 00 05 00  07 00 00 00",
    );
    eq(
        encode_set_timeouts(
            FAMILY,
            SEQ,
            &Timeouts {
                tcp: 900,
                tcp_fin: 0,
                udp: 300,
            },
        ),
        "24 00 00 00  24 00 05 00  07 00 00 00  00 00 00 00
         0c 01 00 00                                          # IPVS_CMD_SET_CONFIG
         08 00 04 00  84 03 00 00                             # TIMEOUT_TCP 900; tcp_fin 0 is left out
         08 00 06 00  2c 01 00 00                             # TIMEOUT_UDP 300",
    );
    eq(
        encode_resolve(SEQ),
        "20 00 00 00  10 00 05 00  07 00 00 00  00 00 00 00   # to nlctrl (GENL_ID_CTRL 0x10)
         03 02 00 00                                          # CTRL_CMD_GETFAMILY, version 2
         09 00 02 00  49 50 56 53  00 00 00 00                # CTRL_ATTR_FAMILY_NAME \"IPVS\\0\"",
    );
}

/// The nested value of `kind` in the first message of `datagram`.
fn nested_of(datagram: &[u8], kind: u16) -> Vec<u8> {
    let frames = frames(datagram).expect("frames");
    let Frame::Message { payload, .. } = &frames[0].1 else {
        panic!("not a message: {frames:?}")
    };
    let (_, top) = genl_split(payload).expect("genl");
    top_attribute(top, kind)
        .expect("attributes")
        .expect("the nested attribute")
        .to_vec()
}

#[test]
fn encoded_services_and_dests_decode_to_themselves() {
    let services = [
        Service {
            key: v4_tcp(),
            scheduler: "rr".into(),
            flags: IP_VS_SVC_F_PERSISTENT,
            timeout: 10800,
            netmask: 0xffff_ff00,
        },
        Service {
            key: v6_udp(),
            scheduler: "mh".into(),
            flags: IP_VS_SVC_F_SCHED_MH_PORT,
            timeout: 0,
            netmask: 64,
        },
        Service {
            key: ServiceKey::Fwmark {
                ipv6: false,
                mark: 0xdead_beef,
            },
            scheduler: "wlc".into(),
            flags: 0,
            timeout: 0,
            netmask: 0xffff_ffff,
        },
        Service {
            key: ServiceKey::Addr {
                addr: ip("198.18.0.1"),
                port: 9999,
                protocol: libc::IPPROTO_SCTP as u8,
            },
            scheduler: "sh".into(),
            flags: 0,
            timeout: 0,
            netmask: 0xffff_ffff,
        },
    ];
    for s in services {
        let bytes = encode(&Op::NewService(s.clone()), FAMILY, 1);
        assert_eq!(decode_service(&nested_of(&bytes, 1)).expect("decode"), s);
    }
    for (key, addr) in [(v4_tcp(), "198.18.1.2"), (v6_udp(), "2001:2::1:2")] {
        let dest = Dest {
            addr: ip(addr),
            port: 65535,
            weight: 0x7fff_ffff,
            active_conns: 0,
            inactive_conns: 0,
        };
        let bytes = encode(&Op::SetDest(key, dest.clone()), FAMILY, 1);
        let nested = nested_of(&bytes, 2);
        assert_eq!(decode_dest(&nested, key.ipv6()).expect("decode"), dest);
        // Without IPVS_DEST_ATTR_ADDR_FAMILY (kernels before 4.14) the service's family counts.
        assert_eq!(
            decode_dest(&nested[..nested.len() - 8], key.ipv6()).expect("decode"),
            dest
        );
    }
}

#[test]
fn the_kernels_hashed_flag_is_not_read_back() {
    let mut s = Service {
        key: v4_tcp(),
        scheduler: "rr".into(),
        flags: IP_VS_SVC_F_HASHED | IP_VS_SVC_F_ONEPACKET,
        timeout: 0,
        netmask: 0xffff_ffff,
    };
    let bytes = encode(&Op::NewService(s.clone()), FAMILY, 1);
    s.flags = IP_VS_SVC_F_ONEPACKET;
    assert_eq!(decode_service(&nested_of(&bytes, 1)).expect("decode"), s);
}

#[test]
fn bad_answers_are_errors_not_guesses() {
    // An AF of 7, an address of 3 bytes, a service with neither fwmark nor address.
    let af7 = hex("06 00 01 00  07 00 00 00  08 00 05 00  01 00 00 00");
    assert!(decode_service(&af7).is_err());
    let short = hex("06 00 01 00  02 00 00 00  06 00 02 00  06 00 00 00
                     07 00 03 00  c6 12 64 00  06 00 04 00  00 50 00 00");
    assert!(decode_service(&short).is_err());
    let no_key = hex("06 00 01 00  02 00 00 00");
    assert!(decode_service(&no_key).is_err());
    // An attribute claiming more bytes than there are.
    assert!(decode_service(&hex("40 00 01 00  02 00 00 00")).is_err());
    // A netlink message longer than its datagram, shorter than its header, of length 0
    // (which would never advance), an NLMSG_ERROR without its code.
    assert!(frames(&hex("40 00 00 00  02 00 00 00  01 00 00 00  00 00 00 00")).is_err());
    assert!(frames(&hex("04 00 00 00  02 00 00 00  01 00 00 00  00 00 00 00")).is_err());
    assert!(frames(&hex("00 00 00 00  02 00 00 00  01 00 00 00  00 00 00 00")).is_err());
    assert!(frames(&hex("10 00 00 00  02 00 00 00  01 00 00 00  00 00 00 00")).is_err());
    assert!(genl_split(&[1, 1]).is_err());
}

#[test]
fn acks_and_dump_ends_are_told_apart_in_one_datagram() {
    let datagram = hex(
        "24 00 00 00  02 00 00 01  05 00 00 00  00 00 00 00   # NLMSG_ERROR, CAPPED, seq 5
         00 00 00 00                                          #   error 0: an ACK
         10 00 00 00  24 00 01 00  07 00 00 00  00 00 00 00   #   (the copied request header)
         24 00 00 00  02 00 00 01  06 00 00 00  00 00 00 00   # seq 6
         ef ff ff ff                                          #   -17: EEXIST
         10 00 00 00  24 00 01 00  06 00 00 00  00 00 00 00
         14 00 00 00  03 00 02 00  08 00 00 00  00 00 00 00   # NLMSG_DONE, MULTI, seq 8
         00 00 00 00",
    );
    assert_eq!(
        frames(&datagram).expect("frames"),
        vec![
            (5, Frame::Ack(0)),
            (6, Frame::Ack(-libc::EEXIST)),
            (8, Frame::Done(0))
        ]
    );
}

#[test]
fn dummy_link_and_address_messages() {
    let eq = |got: Vec<u8>, want: &str| assert_eq!(hexdump(&got), hexdump(&hex(want)));
    // struct ifinfomsg (16 bytes): family u8, pad u8, type u16, index i32, flags u32, change u32.
    eq(
        dummy::encode_new_link("kpx-ipvs0", SEQ),
        "40 00 00 00  10 00 05 06  07 00 00 00  00 00 00 00   # 64 bytes, RTM_NEWLINK (16), REQUEST|ACK|EXCL|CREATE
         00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00   # ifinfomsg: all zero: no IFF_UP
         0e 00 03 00  6b 70 78 2d  69 70 76 73  30 00 00 00   # IFLA_IFNAME \"kpx-ipvs0\\0\"
         10 00 12 00  0a 00 01 00  64 75 6d 6d  79 00 00 00   # IFLA_LINKINFO { IFLA_INFO_KIND \"dummy\" }",
    );
    eq(
        dummy::encode_set_down(5, SEQ),
        "20 00 00 00  13 00 05 00  07 00 00 00  00 00 00 00   # RTM_SETLINK (19)
         00 00 00 00  05 00 00 00  00 00 00 00  01 00 00 00   # index 5, flags 0, change IFF_UP",
    );
    // struct ifaddrmsg (8 bytes): family, prefixlen, flags, scope, index u32.
    eq(
        dummy::encode_new_address(5, ip("198.18.100.10"), SEQ),
        "28 00 00 00  14 00 05 06  07 00 00 00  00 00 00 00   # RTM_NEWADDR (20), EXCL|CREATE
         02 20 00 00  05 00 00 00                             # AF_INET, /32, scope universe, index 5
         08 00 02 00  c6 12 64 0a                             # IFA_LOCAL
         08 00 01 00  c6 12 64 0a                             # IFA_ADDRESS",
    );
    eq(
        dummy::encode_new_address(5, ip("2001:2::10"), SEQ),
        "34 00 00 00  14 00 05 06  07 00 00 00  00 00 00 00   # 52 bytes
         0a 80 02 00  05 00 00 00                             # AF_INET6, /128, IFA_F_NODAD
         14 00 01 00  20 01 00 02  00 00 00 00  00 00 00 00  00 00 00 10   # IFA_ADDRESS
         08 00 08 00  02 00 00 00                             # IFA_FLAGS: IFA_F_NODAD",
    );
    eq(
        dummy::encode_del_address(5, ip("198.18.100.10"), SEQ),
        "28 00 00 00  15 00 05 00  07 00 00 00  00 00 00 00   # RTM_DELADDR (21)
         02 20 00 00  05 00 00 00
         08 00 02 00  c6 12 64 0a
         08 00 01 00  c6 12 64 0a",
    );
    eq(
        dummy::encode_del_link(5, SEQ),
        "20 00 00 00  11 00 05 00  07 00 00 00  00 00 00 00   # RTM_DELLINK (17)
         00 00 00 00  05 00 00 00  00 00 00 00  00 00 00 00",
    );
}

/// The datagrams of a recorded answer (testdata/*.hex: `#` comments, one datagram a line).
fn recorded(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(hex)
        .collect()
}

/// The nested `kind` value of every IPVS message (family 32 in the recording) of `text`, and
/// the dump ends seen.
fn recorded_entries(text: &str, kind: u16) -> (Vec<Vec<u8>>, Vec<(u32, i32)>) {
    let (mut entries, mut ends) = (Vec::new(), Vec::new());
    for datagram in recorded(text) {
        for (seq, frame) in frames(&datagram).expect("frames") {
            match frame {
                Frame::Message { kind: 32, payload } => {
                    let (_, top) = genl_split(&payload).expect("genl");
                    let nested = top_attribute(top, kind).expect("attrs").expect("entry");
                    entries.push(nested.to_vec());
                }
                Frame::Done(code) | Frame::Ack(code) => ends.push((seq, code)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (entries, ends)
}

#[test]
fn recorded_service_dump_of_kernel_6_1() {
    let (entries, ends) = recorded_entries(include_str!("testdata/services.hex"), 1);
    // One datagram with the three services, a second with NLMSG_DONE (seq 15).
    assert_eq!(ends, vec![(15, 0)]);
    let mut services: Vec<Service> = entries
        .iter()
        .map(|e| decode_service(e).expect("decode"))
        .collect();
    services.sort_by_key(|s| s.key);
    assert_eq!(
        services,
        vec![
            Service {
                key: v4_tcp(),
                scheduler: "mh".into(),
                flags: IP_VS_SVC_F_SCHED_MH_FALLBACK | IP_VS_SVC_F_SCHED_MH_PORT,
                timeout: 0,
                netmask: 0xffff_ffff,
            },
            Service {
                key: v6_udp(),
                scheduler: "rr".into(),
                // The kernel answers 0x3: PERSISTENT and its own HASHED, dropped.
                flags: IP_VS_SVC_F_PERSISTENT,
                timeout: 10800,
                netmask: 128,
            },
            Service {
                key: ServiceKey::Fwmark {
                    ipv6: false,
                    mark: 0x4001,
                },
                scheduler: "rr".into(),
                flags: 0,
                timeout: 0,
                netmask: 0xffff_ffff,
            },
        ]
    );
}

#[test]
fn recorded_destination_dumps_of_kernel_6_1() {
    let (entries, ends) = recorded_entries(include_str!("testdata/dests.hex"), 2);
    assert_eq!(ends, vec![(16, 0), (17, 0)]);
    let dests: Vec<(IpAddr, u16, u32)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            // The first three are the IPv4 mh service's, the last two the IPv6 one's.
            let d = decode_dest(e, i >= 3).expect("decode");
            assert_eq!((d.active_conns, d.inactive_conns), (0, 0));
            (d.addr, d.port, d.weight)
        })
        .collect();
    let mut sorted = dests.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            (ip("198.18.1.1"), 8080, 1),
            (ip("198.18.1.2"), 8080, 1),
            (ip("198.18.1.3"), 8080, 1),
            (ip("2001:2::1:1"), 5353, 1),
            (ip("2001:2::1:2"), 5353, 2),
        ]
    );
    // The family comes from IPVS_DEST_ATTR_ADDR_FAMILY, which 6.1 sends: told the wrong
    // service family, the addresses still read right.
    assert_eq!(
        decode_dest(&entries[0], true).expect("decode").addr,
        dests[0].0
    );
}

#[test]
fn recorded_info_config_and_acks_of_kernel_6_1() {
    let answer = |text: &str| -> Vec<u8> {
        let datagrams = recorded(text);
        let frames = frames(&datagrams[0]).expect("frames");
        let Frame::Message { payload, .. } = &frames[0].1 else {
            panic!("{frames:?}")
        };
        // Then the ACK, in a datagram of its own.
        assert_eq!(
            super::netlink::frames(&datagrams[1]).expect("ack")[0].1,
            Frame::Ack(0)
        );
        genl_split(payload).expect("genl").1.to_vec()
    };
    let info = decode_info(&answer(include_str!("testdata/info.hex"))).expect("info");
    assert_eq!(info.version_text(), "1.2.1");
    assert_eq!(info.conn_tab_size, 4096);
    assert_eq!(
        decode_timeouts(&answer(include_str!("testdata/config.hex"))).expect("config"),
        Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300
        }
    );
    // One capped ACK per datagram, in order, each with the op's errno.
    let acks: Vec<(u32, Frame)> = recorded(include_str!("testdata/batch.hex"))
        .iter()
        .flat_map(|d| frames(d).expect("frames"))
        .collect();
    let codes: Vec<i32> = acks
        .iter()
        .map(|(_, f)| match f {
            Frame::Ack(c) => *c,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            0,
            -libc::EEXIST,
            0,
            -libc::ENOENT,
            0,
            -libc::EINVAL,
            -libc::ESRCH,
            0
        ]
    );
    let seqs: Vec<u32> = acks.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0x12..0x1a).collect::<Vec<_>>());
}
