//! The messages against bytes the kernel and conntrack(8) exchanged. `testdata/dump-ipv4.bin`
//! and `dump-ipv6.bin` are the datagrams `conntrack -L -f ipv4` / `-f ipv6` received
//! (`strace -xx -e trace=recvmsg -e read=3`, Linux 6.18, in a throwaway namespace with an
//! nft DNAT rule 198.18.100.10:53 → 198.18.1.1:5353 and [2001:2::2]:53 → [2001:2::1]:5353):
//!
//! ```text
//! udp src=198.18.0.1 dst=198.18.1.1 sport=40002 dport=9999 src=198.18.1.1 dst=198.18.0.1 sport=9999 dport=40002
//! udp src=198.18.0.1 dst=198.18.100.10 sport=40000 dport=53 src=198.18.1.1 dst=198.18.0.1 sport=5353 dport=40000
//! tcp ESTABLISHED src=198.18.0.1 dst=198.18.1.1 sport=40001 dport=80 src=198.18.1.1 dst=198.18.0.1 sport=80 dport=40001 [ASSURED]
//! udp src=2001:2::1 dst=2001:2::2 sport=40003 dport=53 src=2001:2::1 dst=2001:2::1 sport=5353 dport=40003
//! ```

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::conntrack::filter::Matcher;
use crate::model::{ConntrackCleanup, Protocol};

const DUMP_V4: &[u8] = include_bytes!("testdata/dump-ipv4.bin");
const DUMP_V6: &[u8] = include_bytes!("testdata/dump-ipv6.bin");
/// The sequence number conntrack(8) used in the recorded dumps.
const RECORDED_SEQ: u32 = 0x6b0f_c3d7;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn flows(datagram: &[u8]) -> Vec<Flow> {
    answers(datagram)
        .expect("recorded answer")
        .into_iter()
        .filter_map(|(_, answer)| match answer {
            Answer::Entry(flow) => Some(flow.expect("readable entry")),
            _ => None,
        })
        .collect()
}

#[test]
fn the_dump_request_is_the_one_conntrack_sends() {
    // conntrack -L -f ipv4 sent exactly these 20 bytes (its sequence number reused).
    assert_eq!(
        hex(&dump_request(false, RECORDED_SEQ, None)),
        "1400000001010103d7c30f6b0000000002000000"
    );
    // IPv6: the same with nfgen_family AF_INET6 (10).
    assert_eq!(
        hex(&dump_request(true, RECORDED_SEQ, None)),
        "1400000001010103d7c30f6b000000000a000000"
    );
    // An empty kernel filter is no filter.
    assert_eq!(
        dump_request(false, 1, Some(&KernelFilter::default())),
        dump_request(false, 1, None)
    );
}

#[test]
fn the_filtered_dump_request_names_its_fields_and_their_flags() {
    let filter = KernelFilter {
        protocol: Some(17),
        orig_dst_port: Some(53),
        orig_dst: Some(ip("10.96.0.53")),
        reply_src: Some(ip("198.18.1.1")),
    };
    let bytes = dump_request(false, 1, Some(&filter));
    let expected = [
        // nlmsghdr: 92 bytes, CTNETLINK << 8 | IPCTNL_MSG_CT_GET, REQUEST | DUMP, seq 1
        "5c000000", "0101", "0103", "01000000", "00000000",
        // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0
        "02000000",
        // CTA_TUPLE_ORIG (nested): CTA_TUPLE_IP { CTA_IP_V4_DST 10.96.0.53 }
        "24000180", "0c000180", "08000200", "0a600035",
        //   CTA_TUPLE_PROTO { CTA_PROTO_NUM 17, CTA_PROTO_DST_PORT 53 }
        "14000280", "05000100", "11000000", "06000300", "00350000",
        // CTA_TUPLE_REPLY (nested): CTA_TUPLE_IP { CTA_IP_V4_SRC 198.18.1.1 }
        "10000280", "0c000180", "08000100", "c6120101",
        // CTA_FILTER (nested, flag set: nla_parse_nested needs it)
        "14001980",
        //   CTA_FILTER_ORIG_FLAGS = IP_DST | PROTO_NUM | PROTO_DST_PORT (host order)
        "08000100", "2a000000", //   CTA_FILTER_REPLY_FLAGS = IP_SRC
        "08000200", "01000000",
    ]
    .concat();
    assert_eq!(hex(&bytes), expected);

    // Protocol alone (NodePort cleanups of several ports): no port flag, no address.
    let filter = KernelFilter {
        protocol: Some(17),
        ..KernelFilter::default()
    };
    let expected = [
        "38000000", "0101", "0103", "02000000", "00000000", "0a000000",
        // CTA_TUPLE_ORIG { CTA_TUPLE_PROTO { CTA_PROTO_NUM 17 } }
        "10000180", "0c000280", "05000100", "11000000", "14001980", "08000100", "08000000",
        "08000200", "00000000",
    ]
    .concat();
    assert_eq!(hex(&dump_request(true, 2, Some(&filter))), expected);
}

#[test]
fn recorded_dumps_parse_into_their_flows() {
    let v4 = flows(DUMP_V4);
    assert_eq!(v4.len(), 3);
    let dnated = &v4[1];
    assert_eq!(
        *dnated,
        Flow {
            protocol: 17,
            orig: Tuple {
                src: ip("198.18.0.1"),
                dst: ip("198.18.100.10"),
                src_port: 40000,
                dst_port: 53,
            },
            reply: Tuple {
                src: ip("198.18.1.1"),
                dst: ip("198.18.0.1"),
                src_port: 5353,
                dst_port: 40000,
            },
            zone: None,
            orig_zone: None,
            id: Some(0x5022_a959),
        }
    );
    assert_eq!(v4[0].orig.dst_port, 9999);
    assert_eq!(v4[0].reply.src, ip("198.18.1.1"));
    // The TCP entry carries CTA_PROTOINFO (state, window scales): still read.
    assert_eq!(v4[2].protocol, 6);
    assert_eq!(v4[2].orig.dst_port, 80);

    let v6 = flows(DUMP_V6);
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].orig.dst, ip("2001:2::2"));
    assert_eq!(v6[0].reply.src, ip("2001:2::1"));
    assert_eq!(v6[0].reply.src_port, 5353);
    assert!(v6[0].ipv6());

    // Every datagram ends the dump with NLMSG_DONE, error 0, on the request's sequence.
    for dump in [DUMP_V4, DUMP_V6] {
        let all = answers(dump).expect("recorded answer");
        assert_eq!(all.last(), Some(&(RECORDED_SEQ, Answer::Done(0))));
        assert!(all.iter().all(|(seq, _)| *seq == RECORDED_SEQ));
    }
}

#[test]
fn the_recorded_entries_match_the_cleanups_that_name_them() {
    let v4 = flows(DUMP_V4);
    let cleanups = [
        // The DNATed flow, by Service address and endpoint.
        ConntrackCleanup::Endpoint {
            vip: ip("198.18.100.10"),
            port: 53,
            protocol: Protocol::Udp,
            endpoint: ip("198.18.1.1"),
        },
        // An endpoint that answered nothing: matches no entry.
        ConntrackCleanup::Endpoint {
            vip: ip("198.18.100.10"),
            port: 53,
            protocol: Protocol::Udp,
            endpoint: ip("198.18.1.2"),
        },
    ];
    let refs: Vec<&ConntrackCleanup> = cleanups.iter().collect();
    let matcher = Matcher::new(false, &refs);
    let matched: Vec<bool> = v4.iter().map(|f| matcher.matches(f)).collect();
    assert_eq!(matched, [false, true, false]);

    // A UDP NodePort-like cleanup on 9999 takes the plain flow, not the TCP one.
    let by_port = ConntrackCleanup::NodePort {
        ipv6: false,
        node_port: 9999,
        protocol: Protocol::Udp,
    };
    let matcher = Matcher::new(false, &[&by_port]);
    let matched: Vec<bool> = v4.iter().map(|f| matcher.matches(f)).collect();
    assert_eq!(matched, [true, false, false]);

    // The IPv6 entry, by Service address, only for an IPv6 matcher.
    let v6 = flows(DUMP_V6);
    let service = ConntrackCleanup::Service {
        vip: ip("2001:2::2"),
        port: 53,
        protocol: Protocol::Udp,
    };
    assert!(Matcher::new(true, &[&service]).matches(&v6[0]));
    assert!(!Matcher::new(false, &[&service]).matches(&v6[0]));
}

#[test]
fn a_delete_names_the_recorded_original_tuple_and_id() {
    let v4 = flows(DUMP_V4);
    let bytes = delete_request(&v4[1], 0x6b0f_c3e6);
    // The original tuple exactly as the kernel dumped it (bytes 20..72 of the entry's
    // message: after nlmsghdr and nfgenmsg, CTA_TUPLE_ORIG comes first).
    let entry = &DUMP_V4[0xa4..0xa4 + 0xa4];
    let dumped_tuple = &entry[20..72];
    assert_eq!(&bytes[20..72], dumped_tuple);
    let expected = [
        // nlmsghdr: 80 bytes, CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE, REQUEST | ACK
        "50000000", "0201", "0500", "e6c30f6b", "00000000", "02000000",
        // CTA_TUPLE_ORIG { IP { V4_SRC 198.18.0.1, V4_DST 198.18.100.10 },
        //                  PROTO { NUM 17, SRC_PORT 40000, DST_PORT 53 } }
        "34000180", "14000180", "08000100", "c6120001", "08000200", "c612640a", "1c000280",
        "05000100", "11000000", "06000200", "9c400000", "06000300", "00350000",
        // CTA_ID (big-endian)
        "08000c00", "5022a959",
    ]
    .concat();
    assert_eq!(hex(&bytes), expected);
}

#[test]
fn a_delete_in_a_zone_carries_the_zone() {
    let mut flow = flows(DUMP_V6).remove(0);
    flow.zone = Some(7);
    flow.orig_zone = None;
    flow.id = None;
    let bytes = delete_request(&flow, 9);
    let hex = hex(&bytes);
    // CTA_ZONE 7 after the tuple: length 6, type 18, big-endian 7, padded to 4 bytes; no
    // CTA_ID.
    assert!(hex.ends_with("0600120000070000"), "{hex}");
    assert!(!hex.contains("08000c00"));
    // And it is read back from a dump the same way (parse what was emitted, as a dump
    // entry: the attributes are the same).
    let mut entry = bytes.clone();
    entry[4..6].copy_from_slice(&0x0100u16.to_le_bytes()); // IPCTNL_MSG_CT_NEW
    let reply = raw(&ConntrackAttribute::CtaTupleReply(vec![
        CtTuple::Ip(vec![
            IPTuple::SourceAddress(flow.reply.src),
            IPTuple::DestinationAddress(flow.reply.dst),
        ]),
        CtTuple::Proto(vec![ProtoTuple::Protocol(17.into())]),
    ]));
    let mut extra = vec![0; reply.buffer_len()];
    reply.emit(&mut extra);
    entry.extend_from_slice(&extra);
    let length = entry.len() as u32;
    entry[..4].copy_from_slice(&length.to_le_bytes());
    let parsed = answers(&entry).expect("one entry");
    let Answer::Entry(Some(back)) = &parsed[0].1 else {
        panic!("{parsed:?}")
    };
    assert_eq!(back.zone, Some(7));
    assert_eq!(back.orig, flow.orig);
}

#[test]
fn acknowledgements_carry_the_request_sequence_and_errno() {
    // A capped ACK as the kernel sent it to conntrack -D (NLMSG_ERROR, NLM_F_CAPPED, error 0,
    // then the request's header only).
    let ack = [
        "24000000", "0200", "0001", "e6c30f6b", "984e07a0", "00000000", "94000000", "0201", "0500",
        "e6c30f6b", "00000000",
    ]
    .concat();
    let ack = decode(&ack);
    assert_eq!(answers(&ack).expect("ack"), [(0x6b0f_c3e6, Answer::Ack(0))]);
    // ENOENT (the entry is gone): -2.
    let mut enoent = ack.clone();
    enoent[16..20].copy_from_slice(&(-2i32).to_le_bytes());
    // Two messages in one datagram, each read.
    let mut both = ack.clone();
    both.extend_from_slice(&enoent);
    assert_eq!(
        answers(&both).expect("acks"),
        [
            (0x6b0f_c3e6, Answer::Ack(0)),
            (0x6b0f_c3e6, Answer::Ack(-libc::ENOENT))
        ]
    );
}

#[test]
fn a_datagram_whose_lengths_do_not_fit_is_refused_and_a_bad_entry_is_skipped() {
    // Cut inside the second message: its length says more than there is.
    let cut = &DUMP_V4[..0xa4 + 40];
    assert!(answers(cut).is_err());
    // An entry without its reply tuple (the first attribute kept, the length shortened).
    let mut entry = DUMP_V4[..0xa4].to_vec();
    entry.truncate(20 + 52);
    entry[..4].copy_from_slice(&(72u32).to_le_bytes());
    assert_eq!(
        answers(&entry).expect("framing is fine"),
        [(RECORDED_SEQ, Answer::Entry(None))]
    );
    // An entry whose attribute claims more than the message holds: unreadable, skipped.
    let mut bad = DUMP_V4[..0xa4].to_vec();
    bad[20..22].copy_from_slice(&0x00f0u16.to_le_bytes());
    assert_eq!(
        answers(&bad).expect("framing is fine"),
        [(RECORDED_SEQ, Answer::Entry(None))]
    );
}

fn decode(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Runs `f` on a thread in a network namespace of its own (unshared, so removed when the
/// thread ends; the process's namespace is untouched). `None` without root.
fn in_fresh_namespace<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Option<Result<T, String>> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: ctnetlink needs root");
        return None;
    }
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare: {e}"))?;
        f()
    });
    Some(thread.join().expect("namespace thread"))
}

#[test]
fn every_acknowledgement_is_counted_across_windows_and_absent_entries_are_gone() {
    // More flows than one window holds, none of them in the new namespace's empty table: each
    // delete is answered ENOENT, and every answer of every window is counted once.
    let template = flows(DUMP_V4).remove(1);
    let count = DELETE_WINDOW * 2 + 7;
    let absent: Vec<Flow> = (0..count)
        .map(|i| {
            let mut flow = template.clone();
            flow.orig.src_port = 20000 + i as u16;
            flow
        })
        .collect();
    let Some(result) = in_fresh_namespace(move || {
        let mut conn =
            Conn::open(Instant::now() + Duration::from_secs(30)).map_err(|e| e.to_string())?;
        let dump = match conn.dump(false, None, 10, |_| true) {
            Ok(dump) => dump,
            Err(DumpError::Refused(code)) => return Err(format!("refused {code}")),
            Err(DumpError::Failed(e)) => return Err(e.to_string()),
        };
        let deleted = conn.delete(&absent).map_err(|e| e.to_string())?;
        Ok((dump.entries, deleted))
    }) else {
        return;
    };
    assert_eq!(
        result,
        Ok((
            0,
            Deleted {
                deleted: 0,
                gone: count
            }
        ))
    );
}
