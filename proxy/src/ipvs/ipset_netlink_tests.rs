//! ipset messages byte for byte, without root. Every expected message below was written by hand
//! from the layouts (and checked once against what `strace ipset -exist add …` shows ipset
//! 7.17 sending), not copied from the encoder's output:
//! - `struct nlmsghdr` (16 bytes): length u32, type u16 (`NFNL_SUBSYS_IPSET << 8 | cmd`:
//!   0x0609 ADD, 0x060a DEL, 0x0601 PROTOCOL, 0x0607 LIST), flags u16 (NLM_F_REQUEST 0x1 |
//!   NLM_F_ACK 0x4 = 0x5 — no NLM_F_EXCL 0x200, which would make an existing member an error;
//!   a dump is NLM_F_REQUEST | NLM_F_DUMP = 0x301), sequence u32 (7), port id u32 (0);
//! - `struct nfgenmsg` (4 bytes): family u8 (AF_INET 2, as ipset(8)), version u8
//!   (NFNETLINK_V0), res_id `__be16` 0;
//! - `struct nlattr` (4 bytes): length u16 (header included, padding not), type u16 with
//!   NLA_F_NESTED 0x8000 (DATA, IP, IP2) or NLA_F_NET_BYTEORDER 0x4000 (addresses, ports,
//!   FLAGS); the value padded to 4 bytes;
//! - ip_set.h: PROTOCOL 1 (u8), SETNAME 2 (NUL-terminated), FLAGS 6, DATA 7; inside DATA:
//!   IP 1, PORT 4 (`__be16`), PROTO 7 (u8), IP2 20, COMMENT 26 (NUL-terminated); inside IP:
//!   IPADDR_IPV4 1 (4 bytes), IPADDR_IPV6 2 (16 bytes).
//!
//! Host-order header fields make these tests little-endian only.
#![cfg(target_endian = "little")]

use super::*;
use crate::ipvs::netlink::Frame;

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

fn hexdump(b: &[u8]) -> String {
    b.chunks(4)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

fn same(got: &[u8], expected: &str, what: &str) {
    assert_eq!(
        got.len(),
        u32::from_ne_bytes(got[..4].try_into().expect("length")) as usize,
        "nlmsg_len must be the message's length"
    );
    assert_eq!(
        hexdump(got),
        hexdump(&hex(expected)),
        "{what}\n(left: encoded, right: expected)"
    );
}

fn check(op: Op, kind: SetKind, ipv6: bool, text: &str, expected: &str) {
    let change = Change::new(op, kind, ipv6, text).expect("member");
    let got = encode(&change, 7, SEQ).expect("encoded");
    same(&got, expected, &change.to_string());
}

#[test]
fn add_hash_ip_port_ipv4() {
    check(
        Op::Add,
        SetKind::Reject,
        false,
        "198.18.1.1,tcp:80",
        "4c 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00   # nlmsghdr: 76 bytes, ADD, REQUEST|ACK, seq 7
         02 00 00 00                                          # nfgenmsg: AF_INET, V0, res_id 0
         05 00 01 00  07 00 00 00                             # PROTOCOL: 7, 3 bytes padding
         10 00 02 00  4b 50 58 56  2d 52 45 4a  45 43 54 00   # SETNAME: \"KPXV-REJECT\\0\"
         20 00 07 80                                          # DATA|NESTED: 32 bytes
         0c 00 01 80                                          #   IP|NESTED: 12 bytes
         08 00 01 40  c6 12 01 01                             #     IPADDR_IPV4|NET_BYTEORDER: 198.18.1.1
         06 00 04 40  00 50 00 00                             #   PORT|NET_BYTEORDER: 80 big-endian
         05 00 07 00  06 00 00 00                             #   PROTO: IPPROTO_TCP (6)",
    );
}

#[test]
fn add_frontend_with_its_comment() {
    check(
        Op::Add,
        SetKind::Frontends,
        false,
        "198.18.200.2,tcp:80 comment \"t/busy:http/TCP\"",
        "64 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00   # 100 bytes, ADD
         02 00 00 00
         05 00 01 00  07 00 00 00                             # PROTOCOL 7
         13 00 02 00  4b 50 58 56  2d 46 52 4f  4e 54 45 4e   # SETNAME: 19 bytes, \"KPXV-FRONTENDS\\0\"
                      44 53 00 00                             #   and 1 byte padding
         34 00 07 80                                          # DATA: 52 bytes
         0c 00 01 80  08 00 01 40  c6 12 c8 02                #   IP: 198.18.200.2
         06 00 04 40  00 50 00 00                             #   PORT: 80
         05 00 07 00  06 00 00 00                             #   PROTO: TCP
         14 00 1a 00  74 2f 62 75  73 79 3a 68  74 74 70 2f   #   COMMENT: 20 bytes, \"t/busy:http/TCP\\0\"
                      54 43 50 00",
    );
}

#[test]
fn a_delete_leaves_the_comment_out() {
    // The kernel keys members without their comment: a delete names the key only.
    check(
        Op::Del,
        SetKind::Frontends,
        false,
        "198.18.200.2,tcp:80 comment \"t/busy:http/TCP\"",
        "50 00 00 00  0a 06 05 00  07 00 00 00  00 00 00 00   # 80 bytes, DEL
         02 00 00 00
         05 00 01 00  07 00 00 00
         13 00 02 00  4b 50 58 56  2d 46 52 4f  4e 54 45 4e
                      44 53 00 00
         20 00 07 80                                          # DATA: 32 bytes, no COMMENT
         0c 00 01 80  08 00 01 40  c6 12 c8 02
         06 00 04 40  00 50 00 00
         05 00 07 00  06 00 00 00",
    );
}

#[test]
fn add_hash_ip_port_net_ipv4() {
    // loadBalancerSourceRanges: the frontend, then the allowed network as IP2 and CIDR2
    // (IPSET_ATTR_CIDR2 21, a u8; `hash_ipportnet4_uadt` takes the host's length without it).
    check(
        Op::Add,
        SetKind::SourceRanges,
        false,
        "198.19.64.10,tcp:80,198.19.255.0/24",
        "68 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00   # 104 bytes, ADD
         02 00 00 00
         05 00 01 00  07 00 00 00                             # PROTOCOL 7
         18 00 02 00  4b 50 58 56  2d 4c 42 2d  53 4f 55 52   # SETNAME: 24 bytes,
                      43 45 2d 43  49 44 52 00                #   \"KPXV-LB-SOURCE-CIDR\\0\"
         34 00 07 80                                          # DATA: 52 bytes
         0c 00 01 80  08 00 01 40  c6 13 40 0a                #   IP: 198.19.64.10
         06 00 04 40  00 50 00 00                             #   PORT: 80
         05 00 07 00  06 00 00 00                             #   PROTO: TCP
         0c 00 14 80  08 00 01 40  c6 13 ff 00                #   IP2|NESTED: 198.19.255.0
         05 00 15 00  18 00 00 00                             #   CIDR2: 24",
    );
}

#[test]
fn a_source_network_is_written_as_ipset_prints_it_and_refused_with_host_bits() {
    // A host: without its length, as `ipset list` shows it, whether written with /32 or not.
    let host = parse(
        SetKind::SourceRanges,
        false,
        "198.19.64.10,tcp:80,198.18.0.5/32",
    )
    .expect("host");
    assert_eq!(host.to_string(), "198.19.64.10,tcp:80,198.18.0.5");
    assert_eq!(
        host.key,
        Key::IpPortNet(
            "198.19.64.10".parse().expect("ip"),
            Protocol::Tcp,
            80,
            "198.18.0.5".parse().expect("ip"),
            32
        )
    );
    let e = parse(
        SetKind::SourceRanges,
        false,
        "198.19.64.10,tcp:80,198.18.0.5/24",
    )
    .expect_err("host bits");
    assert!(
        e.to_string()
            .contains("host bits set (the network is 198.18.0.0/24)"),
        "{e}"
    );
    let e = parse(
        SetKind::SourceRanges,
        false,
        "198.19.64.10,tcp:80,198.18.0.0/33",
    )
    .expect_err("length");
    assert!(
        e.to_string().contains("not a prefix length (1 to 32)"),
        "{e}"
    );
    let e = parse(
        SetKind::SourceRanges,
        true,
        "2001:2::1,tcp:80,198.18.0.0/16",
    )
    .expect_err("family");
    assert!(
        e.to_string().contains("not of the set's family inet6"),
        "{e}"
    );
}

#[test]
fn add_hash_ip_port_ip_ipv6() {
    check(
        Op::Add,
        SetKind::Hairpin,
        true,
        "2001:2::5,udp:53,2001:2::5",
        "74 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00   # 116 bytes, ADD
         02 00 00 00                                          # AF_INET even for an inet6 set
         05 00 01 00  07 00 00 00
         14 00 02 00  4b 50 58 56  36 2d 4c 4f  4f 50 2d 42   # SETNAME: \"KPXV6-LOOP-BACK\\0\"
                      41 43 4b 00
         44 00 07 80                                          # DATA: 68 bytes
         18 00 01 80                                          #   IP: 24 bytes
         14 00 02 40  20 01 00 02  00 00 00 00                #     IPADDR_IPV6|NET_BYTEORDER
                      00 00 00 00  00 00 00 05                #       2001:2::5
         06 00 04 40  00 35 00 00                             #   PORT: 53
         05 00 07 00  11 00 00 00                             #   PROTO: IPPROTO_UDP (17)
         18 00 14 80                                          #   IP2|NESTED: 24 bytes
         14 00 02 40  20 01 00 02  00 00 00 00
                      00 00 00 00  00 00 00 05",
    );
}

#[test]
fn add_hash_ip_ipv6() {
    check(
        Op::Add,
        SetKind::Addresses,
        true,
        "2001:2::1",
        "4c 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00   # 76 bytes, ADD
         02 00 00 00
         05 00 01 00  07 00 00 00
         14 00 02 00  4b 50 58 56  36 2d 41 44  44 52 45 53   # SETNAME: \"KPXV6-ADDRESSES\\0\"
                      53 45 53 00
         1c 00 07 80                                          # DATA: 28 bytes
         18 00 01 80  14 00 02 40  20 01 00 02  00 00 00 00   #   IP > IPV6: 2001:2::1
                      00 00 00 00  00 00 00 01",
    );
}

#[test]
fn delete_bitmap_port_and_sctp() {
    check(
        Op::Del,
        SetKind::HealthCheckNodePorts,
        false,
        "30000",
        "48 00 00 00  0a 06 05 00  07 00 00 00  00 00 00 00   # 72 bytes, DEL
         02 00 00 00
         05 00 01 00  07 00 00 00
         20 00 02 00  4b 50 58 56  2d 48 45 41  4c 54 48 2d   # SETNAME: 32 bytes,
                      43 48 45 43  4b 2d 4e 4f  44 45 2d 50   #   \"KPXV-HEALTH-CHECK-NODE-PORT\\0\"
                      4f 52 54 00
         0c 00 07 80                                          # DATA: 12 bytes
         06 00 04 40  75 30 00 00                             #   PORT: 30000 (0x7530), no PROTO",
    );
    check(
        Op::Add,
        SetKind::Reject,
        false,
        "198.18.1.1,sctp:9",
        "4c 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00
         02 00 00 00
         05 00 01 00  07 00 00 00
         10 00 02 00  4b 50 58 56  2d 52 45 4a  45 43 54 00
         20 00 07 80
         0c 00 01 80  08 00 01 40  c6 12 01 01
         06 00 04 40  00 09 00 00                             #   PORT: 9
         05 00 07 00  84 00 00 00                             #   PROTO: IPPROTO_SCTP (132)",
    );
}

#[test]
fn protocol_query_and_name_listing() {
    same(
        &encode_protocol(SEQ),
        "1c 00 00 00  01 06 05 00  07 00 00 00  00 00 00 00   # 28 bytes, PROTOCOL, REQUEST|ACK
         02 00 00 00
         05 00 01 00  06 00 00 00                             # PROTOCOL: 6, the minimum kpx speaks",
        "IPSET_CMD_PROTOCOL",
    );
    same(
        &encode_list_names(7, SEQ),
        "24 00 00 00  07 06 01 03  07 00 00 00  00 00 00 00   # 36 bytes, LIST, REQUEST|DUMP
         02 00 00 00
         05 00 01 00  07 00 00 00                             # PROTOCOL: 7
         08 00 06 40  00 00 00 02                             # FLAGS|NET_BYTEORDER: LIST_SETNAME (2), be32",
        "IPSET_CMD_LIST names",
    );
}

#[test]
fn the_kernels_answers_are_read() {
    // What 6.x answers IPSET_CMD_PROTOCOL with (after the nlmsghdr): nfgenmsg, PROTOCOL 7,
    // PROTOCOL_MIN 6.
    let answer = hex("02 00 00 00  05 00 01 00  07 00 00 00  05 00 0a 00  06 00 00 00");
    assert_eq!(decode_protocol(&answer), Ok((7, 6)));
    // A kernel before protocol 7 sends no minimum.
    let old = hex("02 00 00 00  05 00 01 00  06 00 00 00");
    assert_eq!(decode_protocol(&old), Ok((6, 6)));
    assert!(decode_protocol(&hex("02 00 00 00")).is_err());
    // One LIST answer: PROTOCOL 7, SETNAME "S\0".
    let listed = hex("02 00 00 00  05 00 01 00  07 00 00 00  06 00 02 00  53 00 00 00");
    assert_eq!(decode_set_name(&listed).as_deref(), Ok("S"));
}

#[test]
fn an_error_ack_names_the_set_the_member_and_the_errno() {
    // Two capped ACKs in one datagram (NLMSG_ERROR 2, NLM_F_CAPPED 0x100): seq 7 refused with
    // -ENOENT (no such set), seq 8 accepted; each with the 16-byte header of its request.
    let datagram = hex(
        "24 00 00 00  02 00 00 01  07 00 00 00  00 00 00 00   # nlmsghdr: 36 bytes, NLMSG_ERROR, CAPPED, seq 7
         fe ff ff ff                                          # error: -2 (ENOENT)
         4c 00 00 00  09 06 05 00  07 00 00 00  00 00 00 00   # the request's header
         24 00 00 00  02 00 00 01  08 00 00 00  00 00 00 00   # seq 8
         00 00 00 00                                          # error 0: an ACK
         4c 00 00 00  09 06 05 00  08 00 00 00  00 00 00 00",
    );
    let frames = netlink::frames(&datagram).expect("frames");
    assert_eq!(frames, vec![(7, Frame::Ack(-2)), (8, Frame::Ack(0))]);
    let change = Change::new(Op::Add, SetKind::Reject, false, "198.18.1.1,tcp:80").expect("member");
    let Frame::Ack(code) = frames[0].1 else {
        panic!("not an ACK")
    };
    assert_eq!(
        IpsetError::refused(&change, code).to_string(),
        "ipset add KPXV-REJECT 198.18.1.1,tcp:80: ENOENT: no such set (errno 2)"
    );
    // ipset's own codes by name; type-specific ones by the set's type.
    assert_eq!(
        errno_text(-4352, Some(SetType::HashIpPort)),
        "IPSET_ERR_HASH_FULL: the set is full (maxelem) (errno 4352)"
    );
    assert_eq!(
        errno_text(-4352, Some(SetType::BitmapPort)),
        "IPSET_ERR_BITMAP_RANGE: the member is outside the set's range (errno 4352)"
    );
    assert!(errno_text(-4097, None).starts_with("IPSET_ERR_PROTOCOL:"));
    assert!(errno_text(-4112, None).starts_with("IPSET_ERR_COMMENT:"));
    assert!(errno_text(-4115, None).starts_with("IPSET_ERR_BITMASK_NETMASK_EXCL:"));
    assert!(errno_text(-4355, Some(SetType::HashIpPortIp)).starts_with("IPSET_ERR_MISSING_PROTO:"));
    assert_eq!(
        errno_text(-libc::EINVAL, None),
        format!("{} (errno 22)", std::io::Error::from_raw_os_error(22))
    );
}

#[test]
fn bad_member_text_is_refused_with_what_is_wrong() {
    let bad = |kind, ipv6, text: &str| parse(kind, ipv6, text).expect_err(text).to_string();
    assert_eq!(
        bad(SetKind::Reject, false, "198.18.1.1,tcp"),
        "member \"198.18.1.1,tcp\" of ipset KPXV-REJECT (hash:ip,port): \"tcp\" is not PROTO:PORT"
    );
    assert!(bad(SetKind::Reject, false, "198.18.1.1").ends_with("want IP,PROTO:PORT"));
    assert!(bad(SetKind::Reject, false, "198.18.1.1,icmp:1").contains("want tcp, udp or sctp"));
    assert!(bad(SetKind::Reject, false, "198.18.1.1,tcp:65536").contains("is not a port"));
    assert!(
        bad(SetKind::Reject, false, "2001:2::1,tcp:80").contains("not of the set's family inet")
    );
    assert!(bad(SetKind::Addresses, true, "198.18.1.1").contains("family inet6"));
    assert!(bad(SetKind::Addresses, false, "198.18.1").contains("is not an IP address"));
    assert!(bad(SetKind::Hairpin, false, "198.18.1.1,tcp:80").ends_with("want IP,PROTO:PORT,IP"));
    assert!(bad(SetKind::HealthCheckNodePorts, false, "tcp:30000").contains("is not a port"));
    assert!(
        bad(SetKind::Reject, false, "198.18.1.1,tcp:80 comment \"x\"")
            .contains("created without comments")
    );
    assert!(
        bad(SetKind::Frontends, false, "198.18.1.1,tcp:80 comment x").contains("double quotes")
    );
    assert!(bad(
        SetKind::Frontends,
        false,
        "198.18.1.1,tcp:80 comment \"a\"b\""
    )
    .contains("a quote or a NUL"));
    let long = format!("198.18.1.1,tcp:80 comment \"{}\"", "x".repeat(256));
    assert!(bad(SetKind::Frontends, false, &long).contains("more than the kernel's 255"));
    let huge = "1".repeat(10_000);
    let e = bad(SetKind::Addresses, false, &huge);
    assert!(
        e.contains("10000 bytes, more than 512") && e.len() < 700,
        "{e}"
    );
    // At the limits: accepted.
    let ok = format!("198.18.1.1,tcp:80 comment \"{}\"", "x".repeat(255));
    assert!(parse(SetKind::Frontends, false, &ok).is_ok());
    assert!(parse(SetKind::HealthCheckNodePorts, true, "65535").is_ok());
}

#[test]
fn members_read_back_as_they_were_written() {
    for (kind, ipv6, text) in [
        (
            SetKind::Frontends,
            false,
            "198.18.0.10,tcp:30080 comment \"t/web:http/TCP nodeport\"",
        ),
        (SetKind::Hairpin, true, "2001:2::5,udp:53,2001:2::5"),
        (SetKind::Addresses, false, "198.18.200.1"),
        (SetKind::HealthCheckNodePorts, false, "30000"),
        (SetKind::Marked, true, "2001:2::1,sctp:9"),
        (SetKind::Firewalled, false, "198.19.64.10,tcp:80"),
        (
            SetKind::SourceRanges,
            false,
            "198.19.64.10,tcp:80,198.19.255.0/24",
        ),
        (
            SetKind::SourceRanges,
            false,
            "198.19.64.10,udp:53,198.19.64.10",
        ),
        (
            SetKind::SourceRanges,
            true,
            "2001:2::1,tcp:443,2001:db8::/32",
        ),
    ] {
        let member = parse(kind, ipv6, text).expect(text);
        assert_eq!(member.to_string(), text);
    }
}

#[test]
fn each_kinds_type_is_the_one_it_is_created_with() {
    for kind in SetKind::ALL {
        for ipv6 in [false, true] {
            let args = kind.create_args(ipv6);
            let created_type = args.split_whitespace().next().expect("a type");
            assert_eq!(created_type, SetType::of(kind).name(), "{kind:?}");
            assert_eq!(
                args.split_whitespace().any(|w| w == "comment"),
                has_comment(kind),
                "{kind:?}"
            );
        }
    }
}

#[test]
fn a_set_name_too_long_for_the_kernel_is_refused() {
    let mut change = Change::new(Op::Add, SetKind::Addresses, false, "198.18.1.1").expect("member");
    change.set = "X".repeat(32);
    let e = encode(&change, 7, SEQ).expect_err("32 bytes");
    assert!(e.to_string().contains("1 to 31 bytes"), "{e}");
}
