//! kpx-proxy's conntrack cleanup over ctnetlink, against the kernel's table in a fresh network
//! namespace: entries made with `conntrack -I` (DNATed ones by giving a reply source other than
//! the original destination, as a DNAT rule leaves them), then `conntrack::clear_with`, then
//! `conntrack -L`: exactly the entries the cleanups match are gone, the others stay. Run with the
//! kernel filter, without it (the userspace filtering an old kernel gets), and with a cap.
//! The `conntrack` tool only sets up and checks; kpx-proxy does not run it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kpx_control::netns::Netns;
use kpx_proxy::conntrack::{self, Options, Report};
use kpx_proxy::model::{ConntrackCleanup, Protocol};

fn root_or_skip(tag: &str) -> bool {
    let required = std::env::var("KPX_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        !required,
        "{tag}: network namespace tests need root (KPX_REQUIRE_NETNS=1)"
    );
    eprintln!("SKIPPED {tag}: network namespace tests need root");
    false
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// One entry to create: `sport` identifies it in `conntrack -L`.
struct Entry {
    protocol: &'static str,
    src: &'static str,
    sport: u16,
    dst: &'static str,
    dport: u16,
    /// Who answers (the endpoint a DNAT chose, or `dst` itself).
    reply_src: &'static str,
    reply_sport: u16,
}

const V4_CLIENT: &str = "198.18.0.1";
const V6_CLIENT: &str = "2001:2::1";

/// The table: which entries the cleanups below delete is in `deleted`.
fn entries() -> Vec<Entry> {
    let e = |protocol, src, sport, dst, dport, reply_src, reply_sport| Entry {
        protocol,
        src,
        sport,
        dst,
        dport,
        reply_src,
        reply_sport,
    };
    vec![
        // To the Service 198.18.100.10:53, DNATed to endpoint 1 (gone) and 2 (kept).
        e(
            "udp",
            V4_CLIENT,
            40000,
            "198.18.100.10",
            53,
            "198.18.1.1",
            5353,
        ),
        e(
            "udp",
            V4_CLIENT,
            40001,
            "198.18.100.10",
            53,
            "198.18.1.2",
            5353,
        ),
        // Another port of that Service, still served by endpoint 1.
        e(
            "udp",
            V4_CLIENT,
            40002,
            "198.18.100.10",
            54,
            "198.18.1.1",
            5354,
        ),
        // A Service without endpoints (rejected, not DNATed).
        e(
            "udp",
            V4_CLIENT,
            40003,
            "198.18.100.11",
            53,
            "198.18.100.11",
            53,
        ),
        // NodePort 30053 on a node address, DNATed to endpoint 1 (gone) and 2 (kept).
        e(
            "udp",
            V4_CLIENT,
            40004,
            "198.18.0.2",
            30053,
            "198.18.1.1",
            5353,
        ),
        e(
            "udp",
            V4_CLIENT,
            40005,
            "198.18.0.2",
            30053,
            "198.18.1.2",
            5353,
        ),
        // TCP to the same Service and endpoint: never a UDP cleanup's.
        e(
            "tcp",
            V4_CLIENT,
            40006,
            "198.18.100.10",
            53,
            "198.18.1.1",
            5353,
        ),
        // NodePort 30054 without endpoints, on another node address.
        e(
            "udp",
            V4_CLIENT,
            40007,
            "198.18.0.3",
            30054,
            "198.18.0.3",
            30054,
        ),
        // IPv6: a Service's endpoint gone and kept, and a NodePort without endpoints.
        e(
            "udp",
            V6_CLIENT,
            40000,
            "2001:2::100",
            53,
            "2001:2::10",
            5353,
        ),
        e(
            "udp",
            V6_CLIENT,
            40001,
            "2001:2::100",
            53,
            "2001:2::11",
            5353,
        ),
        e(
            "udp",
            V6_CLIENT,
            40002,
            "2001:2::3",
            30053,
            "2001:2::3",
            30053,
        ),
    ]
}

/// The cleanups of one sync, of every kind and both families.
fn cleanups() -> Vec<ConntrackCleanup> {
    vec![
        ConntrackCleanup::Endpoint {
            vip: ip("198.18.100.10"),
            port: 53,
            protocol: Protocol::Udp,
            endpoint: ip("198.18.1.1"),
        },
        ConntrackCleanup::Service {
            vip: ip("198.18.100.11"),
            port: 53,
            protocol: Protocol::Udp,
        },
        ConntrackCleanup::NodePortEndpoint {
            node_port: 30053,
            protocol: Protocol::Udp,
            endpoint: ip("198.18.1.1"),
        },
        ConntrackCleanup::NodePort {
            ipv6: false,
            node_port: 30054,
            protocol: Protocol::Udp,
        },
        ConntrackCleanup::Endpoint {
            vip: ip("2001:2::100"),
            port: 53,
            protocol: Protocol::Udp,
            endpoint: ip("2001:2::10"),
        },
        ConntrackCleanup::NodePort {
            ipv6: true,
            node_port: 30053,
            protocol: Protocol::Udp,
        },
    ]
}

/// (family, source port) of the entries `cleanups()` deletes.
fn deleted() -> BTreeSet<(&'static str, u16)> {
    [
        ("ipv4", 40000),
        ("ipv4", 40003),
        ("ipv4", 40004),
        ("ipv4", 40007),
        ("ipv6", 40000),
        ("ipv6", 40002),
    ]
    .into()
}

fn all() -> BTreeSet<(&'static str, u16)> {
    entries().iter().map(|e| (family(e.src), e.sport)).collect()
}

fn family(address: &str) -> &'static str {
    if address.contains(':') {
        "ipv6"
    } else {
        "ipv4"
    }
}

fn run(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let out = ns.command("conntrack").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "conntrack {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn create(ns: &Netns) -> anyhow::Result<()> {
    for e in entries() {
        let (sport, dport, reply_sport) = (
            e.sport.to_string(),
            e.dport.to_string(),
            e.reply_sport.to_string(),
        );
        let mut args = vec![
            "-I",
            "-p",
            e.protocol,
            "-s",
            e.src,
            "-d",
            e.dst,
            "--sport",
            &sport,
            "--dport",
            &dport,
            "-r",
            e.reply_src,
            "-q",
            e.src,
            "--reply-port-src",
            &reply_sport,
            "--reply-port-dst",
            &sport,
            "--timeout",
            "600",
        ];
        if e.protocol == "tcp" {
            args.extend(["--state", "ESTABLISHED"]);
        }
        run(ns, &args)?;
    }
    Ok(())
}

/// (family, original source port) of every entry in the namespace's table.
fn listed(ns: &Netns) -> anyhow::Result<BTreeSet<(&'static str, u16)>> {
    let mut out = BTreeSet::new();
    for family in ["ipv4", "ipv6"] {
        for line in run(ns, &["-L", "-f", family])?.lines() {
            // The first sport= is the original direction's.
            let sport = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("sport="))
                .ok_or_else(|| anyhow::anyhow!("no sport in {line:?}"))?;
            out.insert((family, sport.parse()?));
        }
    }
    Ok(out)
}

fn clear_in(
    ns: &Netns,
    cleanups: Vec<ConntrackCleanup>,
    options: Options,
) -> anyhow::Result<Result<Report, String>> {
    ns.enter(move || conntrack::clear_with(cleanups, &options).map_err(|e| e.to_string()))
}

/// Linux 5.8 added the dump filter (`CTA_FILTER`); before it the kernel dumps everything.
fn kernel_filters() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_deletes_exactly_the_matching_entries_with_and_without_the_kernel_filter() {
    if !root_or_skip("conntrack_netlink") {
        return;
    }
    let ns = Netns::create(&format!("kpx-ct-{}", std::process::id()))
        .await
        .expect("namespace");
    let expected_left: BTreeSet<_> = all().difference(&deleted()).copied().collect();

    for kernel_filter in [true, false] {
        create(&ns).expect("entries");
        assert_eq!(listed(&ns).expect("list"), all(), "before clearing");
        let options = Options {
            kernel_filter,
            ..Options::default()
        };
        let report = clear_in(&ns, cleanups(), options)
            .expect("enter")
            .expect("clear");
        assert_eq!(report.deleted, deleted().len(), "{report:?}");
        assert_eq!(report.gone, 0, "{report:?}");
        assert_eq!(
            listed(&ns).expect("list"),
            expected_left,
            "kernel_filter={kernel_filter}"
        );
        // The cleanups share only their protocol, so a filtering kernel leaves out the TCP
        // entry; without the filter, every entry of both families is read.
        if kernel_filter && kernel_filters() {
            assert_eq!(report.kernel_filtered, 2, "{report:?}");
            assert_eq!(report.dumped, all().len() - 1, "{report:?}");
        } else if !kernel_filter {
            assert_eq!(report.kernel_filtered, 0, "{report:?}");
            assert_eq!(report.dumped, all().len(), "{report:?}");
        }
        // A second call finds nothing more to delete.
        let again = clear_in(&ns, cleanups(), Options::default())
            .expect("enter")
            .expect("clear");
        assert_eq!(again.deleted, 0, "{again:?}");
        run(&ns, &["-F"]).expect("flush");
        run(&ns, &["-F", "-f", "ipv6"]).expect("flush ipv6");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cleanup_is_filtered_by_the_kernel_to_its_own_entries() {
    if !root_or_skip("conntrack_netlink") {
        return;
    }
    let ns = Netns::create(&format!("kpx-ct1-{}", std::process::id()))
        .await
        .expect("namespace");
    create(&ns).expect("entries");
    // Protocol, Service address and port, and endpoint: all four in the kernel's filter, so
    // the dump returns the one entry (an ignored or refused filter would return all 8 IPv4
    // entries).
    let one = vec![ConntrackCleanup::Endpoint {
        vip: ip("198.18.100.10"),
        port: 53,
        protocol: Protocol::Udp,
        endpoint: ip("198.18.1.2"),
    }];
    let report = clear_in(&ns, one, Options::default())
        .expect("enter")
        .expect("clear");
    assert_eq!(report.deleted, 1, "{report:?}");
    if kernel_filters() {
        assert_eq!(report.dumped, 1, "{report:?}");
    }
    let mut left = all();
    left.remove(&("ipv4", 40001));
    assert_eq!(listed(&ns).expect("list"), left);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_past_the_cap_is_an_error_naming_it() {
    if !root_or_skip("conntrack_netlink") {
        return;
    }
    let ns = Netns::create(&format!("kpx-ct2-{}", std::process::id()))
        .await
        .expect("namespace");
    create(&ns).expect("entries");
    let options = Options {
        max_entries: 2,
        kernel_filter: false,
        ..Options::default()
    };
    let err = clear_in(&ns, cleanups(), options)
        .expect("enter")
        .expect_err("8 IPv4 entries pass a cap of 2");
    assert!(err.contains("cap of 2 entries"), "{err}");
    // Bad input changes nothing: a NodePort 0 is refused before any dump.
    let before = listed(&ns).expect("list");
    let bad = vec![ConntrackCleanup::NodePort {
        ipv6: false,
        node_port: 0,
        protocol: Protocol::Udp,
    }];
    let err = clear_in(&ns, bad, Options::default())
        .expect("enter")
        .expect_err("node_port 0");
    assert!(err.contains("node_port is 0"), "{err}");
    assert_eq!(listed(&ns).expect("list"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_matches_are_deleted_over_several_windows_of_deletes() {
    if !root_or_skip("conntrack_netlink") {
        return;
    }
    let ns = Netns::create(&format!("kpx-ct3-{}", std::process::id()))
        .await
        .expect("namespace");
    // 300 flows to NodePort 30099 (more than two windows of pipelined deletes), and the
    // table's other entries beside them.
    create(&ns).expect("entries");
    const MANY: u16 = 300;
    for i in 0..MANY {
        let sport = (41000 + i).to_string();
        run(
            &ns,
            &[
                "-I",
                "-p",
                "udp",
                "-s",
                V4_CLIENT,
                "-d",
                "198.18.0.2",
                "--sport",
                &sport,
                "--dport",
                "30099",
                "-r",
                "198.18.1.5",
                "-q",
                V4_CLIENT,
                "--reply-port-src",
                "5353",
                "--reply-port-dst",
                &sport,
                "--timeout",
                "600",
            ],
        )
        .expect("entry");
    }
    let cleanup = vec![ConntrackCleanup::NodePort {
        ipv6: false,
        node_port: 30099,
        protocol: Protocol::Udp,
    }];
    let report = clear_in(&ns, cleanup, Options::default())
        .expect("enter")
        .expect("clear");
    assert_eq!(report.deleted, usize::from(MANY), "{report:?}");
    assert_eq!(listed(&ns).expect("list"), all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ipv6_cleanup_deletes_its_entry_through_the_kernel_filter() {
    if !root_or_skip("conntrack_netlink") {
        return;
    }
    let ns = Netns::create(&format!("kpx-ct4-{}", std::process::id()))
        .await
        .expect("namespace");
    create(&ns).expect("entries");
    // An IPv6 address in the kernel's filter would hide exactly this entry (its IPv6
    // comparison is inverted), so the filter is protocol and port: the two IPv6 entries to
    // port 53.
    let one = vec![ConntrackCleanup::Endpoint {
        vip: ip("2001:2::100"),
        port: 53,
        protocol: Protocol::Udp,
        endpoint: ip("2001:2::11"),
    }];
    let report = clear_in(&ns, one, Options::default())
        .expect("enter")
        .expect("clear");
    assert_eq!(report.deleted, 1, "{report:?}");
    if kernel_filters() {
        assert_eq!(report.dumped, 2, "{report:?}");
    }
    let mut left = all();
    left.remove(&("ipv6", 40001));
    assert_eq!(listed(&ns).expect("list"), left);
}
