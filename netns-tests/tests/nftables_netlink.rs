//! `kpx_proxy::nftables::netlink` against the kernel, in a throwaway network namespace: a table
//! shaped like the nftables backend's is loaded with `nft -f`, then read back over netlink and
//! compared with what `nft list` shows, and elements are written over netlink and read back
//! with `nft`. The socket is opened on a thread that entered the namespace (never in the
//! namespace the test runs in).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

use kpx_control::netns::Entry;
use kpx_proxy::nftables::netlink::{
    address_pair_key, endpoint_data, slot_key, ElementOp, Family, Limits, Nft, NlError,
};

/// A namespace made for this test, removed on drop.
struct Scratch {
    name: String,
    entry: Entry,
}

impl Scratch {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!("kpx-nl-{tag}-{}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entry = Entry::open(&name)?;
        Ok(Scratch { name, entry })
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use std::io::Write;
        let mut cmd = self.entry.command("nft")?;
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.unwrap_or("").as_bytes())?;
        }
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` with a socket opened inside the namespace, on a thread of its own.
    fn with_nft<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Nft) -> Result<T, NlError> + Send + 'static,
    ) -> anyhow::Result<T> {
        Ok(self.entry.enter(move || -> Result<T, NlError> {
            let mut nft = Nft::open()?;
            f(&mut nft)
        })??)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn root_or_skip(tag: &str) -> bool {
    let required = std::env::var("KPX_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !required,
            "{tag}: network namespace tests need root (KPX_REQUIRE_NETNS=1)"
        );
        eprintln!("SKIPPED {tag}: network namespace tests need root");
        return false;
    }
    true
}

/// A table in the layout of the nftables backend (proxy/README, `nftables/render.rs`): base
/// chains, jump chains, verdict maps, a hairpin set, an endpoint shard map whose slot keys are
/// `numgen` values, a Service chain picking from it, and an anonymous set (which `sets()` must
/// not report).
const TABLE: &str = r#"
add table ip kpx { comment "kpx-proxy: Service load balancing" ; }
add chain ip kpx nat-prerouting { type nat hook prerouting priority -100 ; policy accept ; }
add chain ip kpx nat-output { type nat hook output priority -100 ; policy accept ; }
add chain ip kpx services
add chain ip kpx masquerading
add chain ip kpx mark-for-masquerade
add chain ip kpx reject-chain
add map ip kpx service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map ip kpx no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }
add set ip kpx nodeport-cidrs { type ipv4_addr ; flags interval ; }
add set ip kpx hairpin { type ipv4_addr . ipv4_addr ; }
add map ip kpx endpoints-0 { typeof numgen random mod 1 : ip daddr . tcp dport ; }
add rule ip kpx nat-prerouting jump services
add rule ip kpx nat-output jump services
add rule ip kpx services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kpx services ip daddr { 198.19.9.1, 198.19.9.2 } drop
add rule ip kpx mark-for-masquerade meta mark set meta mark | 0x4000
add rule ip kpx reject-chain meta l4proto tcp reject with tcp reset
add rule ip kpx reject-chain reject
add element ip kpx endpoints-0 { 0 : 198.18.1.5 . 8080, 1 : 198.18.2.7 . 8080, 65536 : 198.18.3.1 . 53 }
add chain ip kpx svc-1a2b3c4d-default/web/tcp/http
add rule ip kpx svc-1a2b3c4d-default/web/tcp/http ip daddr 198.19.0.10 tcp dport 80 ip saddr != 198.18.0.0/16 jump mark-for-masquerade
add rule ip kpx svc-1a2b3c4d-default/web/tcp/http meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @endpoints-0
add element ip kpx service-ips { 198.19.0.10 . tcp . 80 : goto svc-1a2b3c4d-default/web/tcp/http }
add element ip kpx no-endpoint-services { 198.19.0.11 . tcp . 80 : goto reject-chain }
add element ip kpx nodeport-cidrs { 198.18.0.0/24 }
add element ip kpx hairpin { 198.18.1.5 . 198.18.1.5 }
"#;

/// What `nft list` says about the table: chain names, named set names, rules per chain (from
/// `nft -a list chain`, whose rule lines carry `# handle N`) and element counts per set.
fn chains_by_nft(s: &Scratch) -> anyhow::Result<Vec<String>> {
    let out = s.nft(&["list", "chains", "ip"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .map(|l| l.trim_end_matches(" {").trim_matches('"').to_string())
        .collect())
}

fn sets_by_nft(s: &Scratch) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for kind in ["sets", "maps"] {
        let out = s.nft(&["list", kind, "ip"], None)?;
        names.extend(
            out.lines()
                .filter_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("set ").or_else(|| l.strip_prefix("map "))
                })
                .map(|l| l.trim_end_matches(" {").to_string()),
        );
    }
    Ok(names)
}

fn rule_counts_by_nft(s: &Scratch, chains: &[String]) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for chain in chains {
        let out = s.nft(&["-a", "list", "chain", "ip", "kpx", chain], None)?;
        let n = out
            .lines()
            .filter(|l| l.contains("# handle") && !l.trim_start().starts_with("chain "))
            .count();
        if n > 0 {
            counts.insert(chain.clone(), n);
        }
    }
    Ok(counts)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn names_and_counts_read_back_match_nft_list() -> anyhow::Result<()> {
    if !root_or_skip("names_and_counts_read_back_match_nft_list") {
        return Ok(());
    }
    let s = Scratch::new("names")?;
    assert_eq!(s.with_nft(|n| n.table(Family::Ip, "kpx"))?, None);
    s.nft(&["-f", "-"], Some(TABLE))?;

    let (handle, chains, sets, rules, counts, absent) = s.with_nft(|n| {
        let handle = n.table(Family::Ip, "kpx")?;
        let chains = n.chains(Family::Ip, "kpx")?;
        let sets = n.sets(Family::Ip, "kpx")?;
        let rules = n.rule_counts(Family::Ip, "kpx")?;
        let mut counts = BTreeMap::new();
        for set in &sets {
            counts.insert(set.clone(), n.element_count(Family::Ip, "kpx", set)?);
        }
        let absent = (
            n.table(Family::Ip6, "kpx")?,
            n.chains(Family::Ip6, "kpx")?,
            n.sets(Family::Ip6, "kpx").map_err(|e| e.errno()),
            n.rule_counts(Family::Ip6, "kpx")?,
            n.element_count(Family::Ip, "kpx", "no-such-set")
                .map_err(|e| e.errno()),
        );
        Ok((handle, chains, sets, rules, counts, absent))
    })?;

    assert!(handle.is_some(), "table ip kpx not found over netlink");
    let nft_chains = chains_by_nft(&s)?;
    assert_eq!(sorted(chains.clone()), sorted(nft_chains.clone()));
    assert_eq!(chains.len(), 7);
    // The anonymous set of `ip daddr { ... } drop` is not reported; named sets and maps are.
    assert_eq!(sorted(sets.clone()), sorted(sets_by_nft(&s)?));
    assert_eq!(
        sorted(sets),
        [
            "endpoints-0",
            "hairpin",
            "no-endpoint-services",
            "nodeport-cidrs",
            "service-ips"
        ]
    );
    assert_eq!(rules, rule_counts_by_nft(&s, &nft_chains)?);
    assert_eq!(rules.get("services"), Some(&2));
    assert_eq!(rules.get("svc-1a2b3c4d-default/web/tcp/http"), Some(&2));
    assert_eq!(rules.get("masquerading"), None, "a chain without rules");
    assert_eq!(counts["endpoints-0"], 3);
    assert_eq!(counts["service-ips"], 1);
    assert_eq!(counts["hairpin"], 1);
    // An interval set holds a range as its start and its end (and nft adds an interval end
    // at 0.0.0.0 before a first range that does not start there): kernel elements, not ranges.
    assert!(counts["nodeport-cidrs"] >= 2, "{counts:?}");
    assert_eq!(
        absent,
        (
            None,
            vec![],
            Err(Some(libc::ENOENT)),
            BTreeMap::new(),
            Err(Some(libc::ENOENT))
        )
    );

    // A re-created table has another handle.
    s.nft(&["-f", "-"], Some(&format!("delete table ip kpx\n{TABLE}")))?;
    let again = s.with_nft(|n| n.table(Family::Ip, "kpx"))?;
    assert!(
        again.is_some() && again != handle,
        "{handle:?} then {again:?}"
    );
    Ok(())
}

#[test]
fn commit_elements_replaces_an_endpoint_and_fails_as_a_whole() -> anyhow::Result<()> {
    if !root_or_skip("commit_elements_replaces_an_endpoint_and_fails_as_a_whole") {
        return Ok(());
    }
    let s = Scratch::new("elements")?;
    s.nft(&["-f", "-"], Some(TABLE))?;
    let ep = |a: &str, p| endpoint_data(a.parse::<IpAddr>().expect("an address"), p);
    let ip = |a: &str| a.parse::<IpAddr>().expect("an address");

    // Slot 1 moves from 198.18.2.7:8080 to 198.18.2.9:8081; the hairpin pair follows.
    let replace = vec![
        ElementOp::Delete {
            set: "endpoints-0".into(),
            key: slot_key(1),
        },
        ElementOp::Add {
            set: "endpoints-0".into(),
            key: slot_key(1),
            data: Some(ep("198.18.2.9", 8081)),
        },
        ElementOp::Add {
            set: "hairpin".into(),
            key: address_pair_key(ip("198.18.2.9"), ip("198.18.2.9")),
            data: None,
        },
    ];
    let (before, committed, after) = s.with_nft(move |n| {
        let before = n.generation()?;
        let committed = n.commit_elements(Family::Ip, "kpx", &replace)?;
        Ok((before, committed, n.generation()?))
    })?;
    assert_ne!(before, committed, "the generation moves on a commit");
    assert_eq!(
        committed, after,
        "the generation returned is the one after the commit"
    );
    let map = s.nft(&["list", "map", "ip", "kpx", "endpoints-0"], None)?;
    assert!(map.contains("1 : 198.18.2.9 . 8081"), "{map}");
    assert!(!map.contains("198.18.2.7"), "{map}");
    assert!(map.contains("65536 : 198.18.3.1 . 53"), "{map}");
    let hairpin = s.nft(&["list", "set", "ip", "kpx", "hairpin"], None)?;
    assert!(hairpin.contains("198.18.2.9 . 198.18.2.9"), "{hairpin}");

    // A batch whose second op deletes an absent element: ENOENT, naming that op, and the first
    // op (an add) is not applied either; the generation does not move.
    let failing = vec![
        ElementOp::Add {
            set: "endpoints-0".into(),
            key: slot_key(2),
            data: Some(ep("198.18.4.4", 80)),
        },
        ElementOp::Delete {
            set: "endpoints-0".into(),
            key: slot_key(7),
        },
    ];
    let (error, gen_before, gen_after, count) = s.with_nft(move |n| {
        let gen_before = n.generation()?;
        let error = n.commit_elements(Family::Ip, "kpx", &failing).err();
        // The socket still works after a refused batch.
        let gen_after = n.generation()?;
        let count = n.element_count(Family::Ip, "kpx", "endpoints-0")?;
        Ok((
            error.map(|e| (e.errno(), e.to_string())),
            gen_before,
            gen_after,
            count,
        ))
    })?;
    let (errno, message) = error.expect("deleting an absent element must fail");
    assert_eq!(errno, Some(libc::ENOENT), "{message}");
    assert!(
        message.contains("op 2 of 2") && message.contains("delete element ip kpx endpoints-0"),
        "{message}"
    );
    assert_eq!(gen_before, gen_after, "a refused batch commits nothing");
    assert_eq!(count, 3);
    let map = s.nft(&["list", "map", "ip", "kpx", "endpoints-0"], None)?;
    assert!(!map.contains("198.18.4.4"), "{map}");

    // Adding an existing key with other data is refused (replace = delete + add).
    let clash = vec![ElementOp::Add {
        set: "endpoints-0".into(),
        key: slot_key(0),
        data: Some(ep("198.18.6.6", 80)),
    }];
    let clash = s.with_nft(move |n| {
        Ok(n.commit_elements(Family::Ip, "kpx", &clash)
            .map_err(|e| e.errno()))
    })?;
    assert_eq!(clash, Err(Some(libc::EEXIST)));

    // A batch prepared at a generation someone else has since moved on from is refused as a
    // whole (ERESTART) and applies nothing; at the current generation it applies.
    let ops = vec![ElementOp::Add {
        set: "endpoints-0".into(),
        key: slot_key(3),
        data: Some(ep("198.18.5.5", 80)),
    }];
    let stale = s.with_nft(|n| n.generation())?;
    s.nft(
        &[
            "add",
            "element",
            "ip",
            "kpx",
            "hairpin",
            "{ 198.18.1.8 . 198.18.1.8 }",
        ],
        None,
    )?;
    let (refused, applied, now) = s.with_nft(move |n| {
        let refused = n
            .commit_elements_at(Family::Ip, "kpx", &ops, stale)
            .map_err(|e| e.errno());
        let current = n.generation()?;
        let applied = n.commit_elements_at(Family::Ip, "kpx", &ops, current)?;
        Ok((refused, applied, n.generation()?))
    })?;
    assert_eq!(refused, Err(Some(libc::ERESTART)));
    assert_eq!(applied, now);
    let map = s.nft(&["list", "map", "ip", "kpx", "endpoints-0"], None)?;
    assert!(map.contains("3 : 198.18.5.5 . 80"), "{map}");

    // A commit by someone else (nft) moves the generation too.
    let g1 = s.with_nft(|n| n.generation())?;
    s.nft(
        &[
            "add",
            "element",
            "ip",
            "kpx",
            "hairpin",
            "{ 198.18.1.9 . 198.18.1.9 }",
        ],
        None,
    )?;
    let g2 = s.with_nft(|n| n.generation())?;
    assert_ne!(g1, g2);
    Ok(())
}

#[test]
fn ipv6_elements_and_dump_limits() -> anyhow::Result<()> {
    if !root_or_skip("ipv6_elements_and_dump_limits") {
        return Ok(());
    }
    let s = Scratch::new("six")?;
    s.nft(
        &["-f", "-"],
        Some(
            "add table ip6 kpx\n\
             add chain ip6 kpx a\nadd chain ip6 kpx b\nadd chain ip6 kpx c\n\
             add set ip6 kpx hairpin { type ipv6_addr . ipv6_addr ; }\n\
             add map ip6 kpx endpoints-0 { typeof numgen random mod 1 : ip6 daddr . tcp dport ; }\n",
        ),
    )?;
    let a: IpAddr = "2001:2::5".parse()?;
    let ops = vec![
        ElementOp::Add {
            set: "endpoints-0".into(),
            key: slot_key(65537),
            data: Some(endpoint_data(a, 8443)),
        },
        ElementOp::Add {
            set: "hairpin".into(),
            key: address_pair_key(a, a),
            data: None,
        },
    ];
    let limited = s.with_nft(move |n| {
        n.commit_elements(Family::Ip6, "kpx", &ops)?;
        n.set_limits(Limits {
            max_messages: 2,
            ..Limits::default()
        });
        let limited = n.chains(Family::Ip6, "kpx").map_err(|e| e.to_string());
        n.set_limits(Limits::default());
        // The socket still answers after a dump cut short.
        assert_eq!(n.chains(Family::Ip6, "kpx")?.len(), 3);
        Ok(limited)
    })?;
    let message = limited.expect_err("three chains are more than two messages");
    assert!(message.contains("max_messages"), "{message}");
    let map = s.nft(&["list", "map", "ip6", "kpx", "endpoints-0"], None)?;
    assert!(map.contains("65537 : 2001:2::5 . 8443"), "{map}");
    let set = s.nft(&["list", "set", "ip6", "kpx", "hairpin"], None)?;
    assert!(set.contains("2001:2::5 . 2001:2::5"), "{set}");
    Ok(())
}
