//! Golden bytes for every request (taken from what nft 1.0.6 sends, `strace -e sendmsg -xx nft
//! -f` in a throwaway namespace, with the differences named), and parses of answers recorded
//! from kernel 6.18 in one. No root needed.

use super::*;

/// Hex with spaces and line breaks for reading; `|` separates the parts named in comments.
fn h(text: &str) -> Vec<u8> {
    let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digits"))
        .collect()
}

#[test]
fn keys_and_data_in_nfts_register_layout() {
    // nft sent `01 00 01 00` for slot 65537 of `typeof numgen random mod N`: host order.
    assert_eq!(slot_key(65537), 65537u32.to_ne_bytes().to_vec());
    if cfg!(target_endian = "little") {
        assert_eq!(slot_key(65537), h("01000100"));
        assert_eq!(slot_key(2), h("02000000"));
    }
    // `198.18.2.9 . 8081`: address, then the port in network order padded to 4 bytes.
    assert_eq!(
        endpoint_data("198.18.2.9".parse().expect("an address"), 8081),
        h("c6120209 1f910000")
    );
    assert_eq!(
        endpoint_data("2001:2::5".parse().expect("an address"), 443),
        h("20010002000000000000000000000005 01bb0000")
    );
    // The hairpin key nft sent for `198.18.1.5 . 198.18.1.6`.
    assert_eq!(
        address_pair_key(
            "198.18.1.5".parse().expect("an address"),
            "198.18.1.6".parse().expect("an address")
        ),
        h("c6120105 c6120106")
    );
    assert_eq!(
        address_pair_key(
            "2001:2::5".parse().expect("an address"),
            "2001:2::6".parse().expect("an address")
        ),
        h("20010002000000000000000000000005 20010002000000000000000000000006")
    );
}

#[test]
fn getgen_as_nft_sends_it() {
    // nlmsghdr: len 20, NFNL_SUBSYS_NFTABLES<<8|NFT_MSG_GETGEN, NLM_F_REQUEST, seq | nfgenmsg
    // AF_UNSPEC, NFNETLINK_V0, res_id 0 (nft: the same with seq 0).
    assert_eq!(
        encode_getgen(7),
        h("14000000 100a 0100 07000000 00000000 | 00 00 0000")
    );
}

#[test]
fn gettable_of_one_table() {
    // NFT_MSG_GETTABLE, NLM_F_REQUEST (no dump), AF_INET | NFTA_TABLE_NAME "kpx".
    assert_eq!(
        encode_gettable(Family::Ip, "kpx", 1),
        h("1c000000 010a 0100 01000000 00000000 | 02 00 0000 | 0800 0100 6b707800")
    );
    assert_eq!(
        encode_gettable(Family::Ip6, "kpx", 1),
        h("1c000000 010a 0100 01000000 00000000 | 0a 00 0000 | 0800 0100 6b707800")
    );
}

#[test]
fn dump_requests() {
    // nft's cache dumps: NLM_F_REQUEST|NLM_F_DUMP (0x301); chains by family only.
    assert_eq!(
        encode_dump(Family::Ip, Dump::Chains, 3),
        h("14000000 040a 0103 03000000 00000000 | 02 00 0000")
    );
    // Sets and rules of one table: NFTA_SET_TABLE / NFTA_RULE_TABLE "kpx".
    assert_eq!(
        encode_dump(Family::Ip, Dump::Sets { table: "kpx" }, 3),
        h("1c000000 0a0a 0103 03000000 00000000 | 02 00 0000 | 0800 0100 6b707800")
    );
    assert_eq!(
        encode_dump(Family::Ip6, Dump::Rules { table: "kpx" }, 3),
        h("1c000000 070a 0103 03000000 00000000 | 0a 00 0000 | 0800 0100 6b707800")
    );
    // Elements of one set: NFTA_SET_ELEM_LIST_TABLE "kpx", NFTA_SET_ELEM_LIST_SET "endpoints-0".
    assert_eq!(
        encode_dump(
            Family::Ip,
            Dump::Elements {
                table: "kpx",
                set: "endpoints-0"
            },
            3
        ),
        h(
            "2c000000 0d0a 0103 03000000 00000000 | 02 00 0000 | 0800 0100 6b707800
           | 1000 0200 656e64706f696e74732d3000"
        )
    );
}

#[test]
fn element_batch_as_nft_sends_it_with_acks_and_the_generation() {
    let ops = [
        ElementOp::Delete {
            set: "endpoints-0".into(),
            key: h("01000100"),
        },
        ElementOp::Add {
            set: "endpoints-0".into(),
            key: h("01000100"),
            data: Some(h("c6120209 1f910000")),
        },
        ElementOp::Delete {
            set: "hairpin".into(),
            key: h("c6120105 c6120106"),
        },
    ];
    let batch = encode_batch(Family::Ip, "kpx", &ops, 100, 0x0102_0304);
    let expected = [
        // NFNL_MSG_BATCH_BEGIN, res_id NFNL_SUBSYS_NFTABLES (10) as nft sends it, plus
        // NFNL_BATCH_GENID (nft 1.0.6 sends none).
        "1c000000 1000 0100 64000000 00000000 | 00 00 000a | 0800 0100 01020304",
        // NFT_MSG_DELSETELEM: nft's bytes but NLM_F_REQUEST|NLM_F_ACK (nft: REQUEST only) |
        // table | set | NFTA_SET_ELEM_LIST_ELEMENTS { NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY {
        // NFTA_DATA_VALUE 01000100 } } }.
        "40000000 0e0a 0500 65000000 00000000 | 02 00 0000 | 0800 0100 6b707800
         | 1000 0200 656e64706f696e74732d3000 | 1400 0380 1000 0180 0c00 0180 0800 0100 01000100",
        // NFT_MSG_NEWSETELEM: REQUEST|ACK|CREATE; nft also sends NFTA_SET_ELEM_LIST_SET_ID,
        // which only a set created in the same batch needs | key | NFTA_SET_ELEM_DATA {
        // NFTA_DATA_VALUE c6120209 1f910000 }.
        "50000000 0c0a 0504 66000000 00000000 | 02 00 0000 | 0800 0100 6b707800
         | 1000 0200 656e64706f696e74732d3000
         | 2400 0380 2000 0180 0c00 0180 0800 0100 01000100 1000 0280 0c00 0100 c6120209 1f910000",
        // The hairpin delete, as nft's but with NLM_F_ACK.
        "40000000 0e0a 0500 67000000 00000000 | 02 00 0000 | 0800 0100 6b707800
         | 0c00 0200 68616972 70696e00 | 1800 0380 1400 0180 1000 0180 0c00 0100 c6120105 c6120106",
        // NFNL_MSG_BATCH_END.
        "14000000 1100 0100 68000000 00000000 | 00 00 000a",
    ];
    let expected: Vec<u8> = expected.iter().flat_map(|m| h(m)).collect();
    assert_eq!(hex(&batch), hex(&expected));
}

#[test]
fn an_op_is_described_as_nft_would_write_it() {
    let add = ElementOp::Add {
        set: "endpoints-0".into(),
        key: h("01000100"),
        data: Some(h("c6120209 1f910000")),
    };
    assert_eq!(
        add.describe(Family::Ip, "kpx"),
        "add element ip kpx endpoints-0 { 0x01000100 : 0xc61202091f910000 }"
    );
    let delete = ElementOp::Delete {
        set: "hairpin".into(),
        key: h("c6120105"),
    };
    assert_eq!(
        delete.describe(Family::Ip6, "kpx"),
        "delete element ip6 kpx hairpin { 0xc6120105 }"
    );
}

// Answers recorded from kernel 6.18 (a table loaded with nft, read with the requests above).

/// The payload (nfgenmsg + attributes) of each message of a recorded datagram.
fn payloads(datagram: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    for_each_message("test", datagram, &mut |m| {
        out.push((m.kind, m.flags, m.payload.to_vec()));
        Ok(false)
    })
    .expect("parses");
    out
}

#[test]
fn parses_the_generation() {
    // NFT_MSG_NEWGEN: NFTA_GEN_ID 3, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME "python3".
    let answer = h(
        "300000000f0a0000010000008e4d00000000000308000100000000030800020000004d8e\
                    0c000300707974686f6e3300",
    );
    let messages = payloads(&answer);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0, nft_type(NFT_MSG_NEWGEN));
    assert_eq!(
        parse_gen("get generation", &messages[0].2).expect("parses"),
        3
    );
}

#[test]
fn parses_a_table_and_an_absent_one() {
    // NFT_MSG_NEWTABLE: name "kpx", flags, use 5, handle 1, NFTA_TABLE_USERDATA (the comment).
    let answer = h(
        "60000000000a0000010000008e4d000002000003080001006b70780008000300000000050c\
                    000400000000000000000108000200000000002800060000226b70782d70726f78793a2053\
                    657276696365206c6f61642062616c616e63696e6700",
    );
    let messages = payloads(&answer);
    assert_eq!(
        parse_table("get table", &messages[0].2).expect("parses"),
        ("kpx", 1)
    );
    // NLMSG_ERROR -ENOENT answering GETTABLE seq 1 (its header echoed; NETLINK_CAP_ACK unset).
    let absent = h(
        "3400000002000000010000008e4d0000feffffff20000000010a01000100000000000000\
                    02000000090001006e6f706500000000",
    );
    let messages = payloads(&absent);
    assert_eq!(messages[0].0, NLMSG_ERROR);
    assert_eq!(
        error_code("get table", &messages[0].2).expect("parses"),
        libc::ENOENT
    );
    assert_eq!(error_seq("get table", &messages[0].2).expect("parses"), 1);
}

#[test]
fn parses_chains_sets_and_rules() {
    // NFT_MSG_NEWCHAIN (NLM_F_MULTI): table "kpx", name "services", handle 1, use 3.
    let chain = h(
        "40000000030a0200010000008e4d000002000003080001006b7078000d0003007365727669\
                   636573000000000c00020000000000000000010800060000000003",
    );
    let messages = payloads(&chain);
    assert_eq!(messages[0].1 & NLM_F_MULTIPART, NLM_F_MULTIPART);
    assert_eq!(
        parse_chain("list chains", &messages[0].2).expect("parses"),
        ("kpx", "services")
    );

    // NFT_MSG_NEWSET "endpoints-0": flags NFT_SET_MAP (8) — a named map.
    let map = h(
        "ec000000090a0200010000008e4d000002000003080001006b70780010000200656e64706f69\
                 6e74732d30000c001000000000000000000508000300000000080800040000000004080005000000\
                 000408000600000001cd080007000000000868000d00000401000000010400000000031a00041700\
                 00000112000401000000010401000000020400000000043400040d000000012c0014000407000000\
                 010c00040c00000001040c0000000114000407000000010c00040800000001040200000006040000\
                 0000040009001700130030786666666666666666383235303837343000000800140000000002",
    );
    let messages = payloads(&map);
    assert_eq!(
        parse_set("list sets", &messages[0].2).expect("parses"),
        ("kpx", "endpoints-0", false)
    );
    // "__set0" of `ip daddr { ... } drop`: flags ANONYMOUS|CONSTANT (3).
    let anonymous = h(
        "98000000090a0200010000008e4d000002000003080001006b7078000b0002005f5f736574\
                       3000000c001000000000000000000808000300000000030800040000000007080005000000\
                       000420000d000004020000000314000407000000010c00040c00000001040c0000000c0009\
                       0008000100000000021700130030786666666666666666383235303835633000000800140000\
                       000002",
    );
    let messages = payloads(&anonymous);
    assert_eq!(
        parse_set("list sets", &messages[0].2).expect("parses"),
        ("kpx", "__set0", true)
    );

    // NFT_MSG_NEWRULE in "nat-output" (`jump services`): only table and chain are read.
    let rule = h(
        "7c000000060a0208010000008e4d000002000003080001006b7078000f0002006e61742d6f75\
                  7470757400000c000300000000000000000644000400400001000e000100696d6d6564696174\
                  650000002c0002000800010000000000200002001c00020008000100fffffffd0d0002007365\
                  72766963657300000000",
    );
    let messages = payloads(&rule);
    assert_eq!(
        parse_rule("list rules", &messages[0].2).expect("parses"),
        ("kpx", "nat-output")
    );
}

#[test]
fn counts_elements_across_the_messages_of_a_dump() {
    // One datagram as the kernel sent it: two elements, then an empty list, then NLMSG_DONE.
    let dump = h(
        "700000000c0a0200010000008e4d000002000003080001006b70780010000200656e64706f69\
                  6e74732d300044000300200001000c0001000800010000000000100002000c000100c6120105\
                  1f900000200001000c0001000800010001000100100002000c000100c61202091f9100003000\
                  00000c0a0200010000008e4d000002000003080001006b70780010000200656e64706f696e74\
                  732d3000040003001400000003000200010000008e4d000000000000",
    );
    let messages = payloads(&dump);
    assert_eq!(messages.len(), 3);
    let counts: Vec<_> = messages[..2]
        .iter()
        .map(|(_, _, body)| parse_elements("list elements", body).expect("parses"))
        .collect();
    assert_eq!(
        counts,
        [("kpx", "endpoints-0", 2), ("kpx", "endpoints-0", 0)]
    );
    assert_eq!(messages[2].0, NLMSG_DONE);
    assert_eq!(
        error_code("list elements", &messages[2].2).expect("parses"),
        0
    );
}

#[test]
fn malformed_answers_are_errors_not_panics() {
    // An attribute longer than its message.
    let body = h("02000003 2000 0100 6b707800");
    assert!(matches!(
        parse_chain("list chains", &body),
        Err(NlError::Malformed { .. })
    ));
    // No chain name.
    let body = h("02000003 0800 0100 6b707800");
    let err = parse_chain("list chains", &body).expect_err("malformed");
    assert_eq!(
        err.to_string(),
        "nf_tables list chains: malformed answer: no NFTA_CHAIN_NAME"
    );
    // Shorter than nfgenmsg; a truncated netlink header; a 3-byte generation.
    assert!(parse_gen("get generation", &h("0200")).is_err());
    assert!(for_each_message("x", &h("30000000 0f0a"), &mut |_| Ok(false)).is_err());
    assert!(parse_gen("get generation", &h("00000003 0700 0100 000003")).is_err());
}

#[test]
fn the_generation_after_a_commit_skips_zero() {
    assert_eq!(next_generation(3), 4);
    assert_eq!(next_generation(u32::MAX), 1);
}

#[test]
fn bad_names_and_keys_are_refused_before_anything_is_sent() {
    let err = check_name("table name", "kp\0x").expect_err("a NUL inside");
    assert_eq!(
        err.to_string(),
        "nf_tables: invalid table name \"kp\\0x\": 1 to 255 bytes without NUL (NFT_NAME_MAXLEN)"
    );
    assert!(check_name("set name", "").is_err());
    assert!(check_name("set name", &"s".repeat(256)).is_err());
    assert!(check_name("set name", &"s".repeat(255)).is_ok());
    assert!(check_name("chain name", "svc-1a2b3c4d-default/web/tcp/http").is_ok());
    let err = check_ops(&[ElementOp::Delete {
        set: "hairpin".into(),
        key: vec![],
    }])
    .expect_err("an empty key");
    assert!(
        matches!(
            err,
            NlError::Invalid {
                field: "element key",
                ..
            }
        ),
        "{err}"
    );
    assert!(check_ops(&[ElementOp::Add {
        set: "endpoints-0".into(),
        key: slot_key(1),
        data: None,
    }])
    .is_ok());
}

#[test]
fn a_socket_can_move_to_the_backends_thread() {
    // The backend keeps one Nft and may run its syncs on another thread than the one that
    // opened it (the namespace stays the one it was opened in).
    fn is_send<T: Send>() {}
    is_send::<Nft>();
    is_send::<NlError>();
}
