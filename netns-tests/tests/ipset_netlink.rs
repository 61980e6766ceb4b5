//! The IPVS mode's ipset members over netlink against this kernel, in a throwaway network
//! namespace (root): the sets created by the backend's own `ipset restore` text, members added
//! and deleted over NETLINK_NETFILTER and compared with what `ipset list` prints (and members
//! written by `ipset restore` deleted over netlink), every set type and both families, `-exist`
//! semantics (add twice, delete what is gone), a comment rewritten by a second add, a refusal
//! that names its set while the other changes of the same datagram apply, a change large enough
//! for several datagrams, and the set names read by a LIST dump as `ipset list -n` prints them.
//! Where the kernel has IPVS (the VM's; this host's has none, and the test says so and skips),
//! the IPVS backend's partial sync itself: one endpoint replaced is one ipset delete and one
//! add in one `sendmsg`, counted in the sync's messages.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Instant;

use kpx_control::netns::Entry;
use kpx_proxy::ipvs::ipset;
use kpx_proxy::ipvs::ipset_netlink::{Change, Ipset, IpsetError, Op};
use kpx_proxy::ipvs::layout::SetKind;

struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn members_of(kind: SetKind, ipv6: bool) -> anyhow::Result<BTreeSet<String>> {
    ipset::members(&kind.name(ipv6)).map_err(anyhow::Error::msg)
}

/// One member per kind and family, as `plan.rs` writes them.
fn one_of_each(n: u8) -> Vec<(SetKind, bool, String)> {
    let mut out = Vec::new();
    for ipv6 in [false, true] {
        let ip = if ipv6 {
            format!("2001:2::{n:x}")
        } else {
            format!("198.18.7.{n}")
        };
        let port = 8000 + u16::from(n);
        out.extend([
            (SetKind::Addresses, ipv6, ip.clone()),
            (SetKind::Reject, ipv6, format!("{ip},tcp:{port}")),
            (SetKind::Drop, ipv6, format!("{ip},udp:{port}")),
            (SetKind::MasqAll, ipv6, format!("{ip},sctp:{port}")),
            (SetKind::MasqOffCluster, ipv6, format!("{ip},tcp:{port}")),
            (SetKind::Marked, ipv6, format!("{ip},tcp:{port}")),
            (
                SetKind::Frontends,
                ipv6,
                format!("{ip},tcp:{port} comment \"t/svc-{n}:http/TCP\""),
            ),
            (SetKind::Hairpin, ipv6, format!("{ip},udp:{port},{ip}")),
            (SetKind::Firewalled, ipv6, format!("{ip},tcp:{port}")),
            // A network, and a host (which ipset(8) prints without its prefix length).
            (
                SetKind::SourceRanges,
                ipv6,
                if ipv6 {
                    format!("{ip},tcp:{port},2001:2:{n:x}::/48")
                } else {
                    format!("{ip},tcp:{port},198.18.{n}.0/24")
                },
            ),
            (SetKind::SourceRanges, ipv6, format!("{ip},tcp:{port},{ip}")),
            (
                SetKind::HealthCheckNodePorts,
                ipv6,
                format!("{}", 30000 + u16::from(n)),
            ),
        ]);
    }
    out
}

fn changes(op: Op, members: &[(SetKind, bool, String)]) -> anyhow::Result<Vec<Change>> {
    members
        .iter()
        .map(|(kind, ipv6, text)| Change::new(op, *kind, *ipv6, text).map_err(Into::into))
        .collect()
}

/// What `ipset list` shows of every kind and family.
fn listed() -> anyhow::Result<BTreeSet<(SetKind, bool, String)>> {
    let mut out = BTreeSet::new();
    for ipv6 in [false, true] {
        for kind in SetKind::ALL {
            for m in members_of(kind, ipv6)? {
                out.insert((kind, ipv6, m));
            }
        }
    }
    Ok(out)
}

fn scenario() -> anyhow::Result<()> {
    // The sets as a full sync makes them, holding the members of number 1.
    let initial = one_of_each(1);
    for ipv6 in [false, true] {
        let mut by_kind: BTreeMap<SetKind, BTreeSet<String>> = BTreeMap::new();
        for (kind, v6, text) in &initial {
            if *v6 == ipv6 {
                by_kind.entry(*kind).or_default().insert(text.clone());
            }
        }
        ipset::restore(&ipset::full_text(ipv6, &by_kind))
            .map_err(|e| anyhow::anyhow!("ipset restore: {e}"))?;
    }
    // bitmap:port has no family: both families' members sit in their own set.
    let expected: BTreeSet<_> = initial.iter().cloned().collect();
    anyhow::ensure!(listed()? == expected, "after restore: {:?}", listed()?);

    let mut set = Ipset::open().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        (6..=7).contains(&set.protocol()),
        "protocol {}",
        set.protocol()
    );
    eprintln!("ipset protocol {}", set.protocol());

    // Names by LIST dump, as `ipset list -n` prints them.
    let names: BTreeSet<String> = set
        .names()
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .collect();
    let cli = ipset::names().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(names == cli, "netlink {names:?} vs ipset list -n {cli:?}");
    anyhow::ensure!(names.len() == 2 * SetKind::ALL.len(), "{names:?}");

    // Add number 2 over netlink; twice (-exist: the second time is accepted, changes nothing).
    let second = one_of_each(2);
    let adds = changes(Op::Add, &second)?;
    let started = Instant::now();
    set.write(&adds).map_err(anyhow::Error::msg)?;
    let one_change = started.elapsed();
    set.write(&adds).map_err(anyhow::Error::msg)?;
    let expected: BTreeSet<_> = initial.iter().chain(&second).cloned().collect();
    let got = listed()?;
    anyhow::ensure!(
        got == expected,
        "after netlink adds:\nmissing {:?}\nextra {:?}",
        expected.difference(&got).collect::<Vec<_>>(),
        got.difference(&expected).collect::<Vec<_>>()
    );

    // Delete what `ipset restore` added, over netlink, and again (already gone: accepted).
    let dels = changes(Op::Del, &initial)?;
    set.write(&dels).map_err(anyhow::Error::msg)?;
    set.write(&dels).map_err(anyhow::Error::msg)?;
    let expected: BTreeSet<_> = second.iter().cloned().collect();
    anyhow::ensure!(
        listed()? == expected,
        "after netlink deletes: {:?}",
        listed()?
    );

    // The reverse: what netlink added, deleted by `ipset restore` text.
    let (kind, ipv6, text) = &second[1];
    ipset::restore(&format!("del {} {text} -exist\n", kind.name(*ipv6)))
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        !members_of(*kind, *ipv6)?.contains(text),
        "restore did not delete {text}"
    );

    // A second add of a frontend with another comment rewrites the comment (as a restore's
    // `add … -exist` does).
    let frontend = "198.18.7.2,tcp:8002";
    set.write(&[Change::new(
        Op::Add,
        SetKind::Frontends,
        false,
        &format!("{frontend} comment \"t/other:http/TCP\""),
    )?])
    .map_err(anyhow::Error::msg)?;
    let frontends = members_of(SetKind::Frontends, false)?;
    anyhow::ensure!(
        frontends.contains(&format!("{frontend} comment \"t/other:http/TCP\"")),
        "{frontends:?}"
    );

    // A refusal names the set, the member and the errno; the other changes of the datagram
    // are applied anyway.
    let mut wrong = Change::new(Op::Add, SetKind::Reject, false, "198.18.7.9,tcp:9")?;
    wrong.set = "KPXV-NO-SUCH-SET".into();
    let fine = Change::new(Op::Add, SetKind::Reject, false, "198.18.7.10,tcp:10")?;
    let results = set
        .apply(&[wrong.clone(), fine.clone()])
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(results == vec![Err(-libc::ENOENT), Ok(())], "{results:?}");
    let e = set.write(&[wrong, fine]).expect_err("a missing set");
    let text = e.to_string();
    anyhow::ensure!(
        matches!(e, IpsetError::Refused { errno, .. } if errno == -libc::ENOENT)
            && text.contains("KPXV-NO-SUCH-SET")
            && text.contains("198.18.7.9,tcp:9")
            && text.contains("no such set"),
        "{text}"
    );
    anyhow::ensure!(
        members_of(SetKind::Reject, false)?.contains("198.18.7.10,tcp:10"),
        "the change beside the refused one was not applied"
    );
    // An IPv6 member in an IPv4 set is the kernel's refusal, named too (parse checks the
    // family first; this skips it to see what the kernel says).
    let mut family = Change::new(Op::Add, SetKind::Addresses, true, "2001:2::99")?;
    family.set = SetKind::Addresses.name(false);
    let e = set.write(&[family]).expect_err("the wrong family");
    eprintln!("an IPv6 member in an inet set: {e}");
    anyhow::ensure!(e.to_string().contains("KPXV-ADDRESSES 2001:2::99"), "{e}");

    // Many members: several datagrams, every ACK accounted for.
    let many: Vec<(SetKind, bool, String)> = (0..3000u32)
        .map(|i| {
            let ip = format!("198.18.{}.{}", 100 + i / 250, 1 + i % 250);
            (
                SetKind::Hairpin,
                false,
                format!("{ip},tcp:{},{ip}", 1000 + i),
            )
        })
        .collect();
    let (_, sends_before) = set.stats();
    let started = Instant::now();
    set.write(&changes(Op::Add, &many)?)
        .map_err(anyhow::Error::msg)?;
    let many_time = started.elapsed();
    let (_, sends_after) = set.stats();
    let hairpin = members_of(SetKind::Hairpin, false)?;
    anyhow::ensure!(
        many.iter().all(|(_, _, m)| hairpin.contains(m)),
        "not every one of 3000 members is listed ({} listed)",
        hairpin.len()
    );
    anyhow::ensure!(
        sends_after - sends_before > 1,
        "3000 members in {} sendmsg",
        sends_after - sends_before
    );
    set.write(&changes(Op::Del, &many)?)
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        members_of(SetKind::Hairpin, false)?.len() == hairpin.len() - many.len(),
        "the 3000 members were not all deleted"
    );

    // For the report, not asserted: the same one-member-per-set change by process.
    let text: String = second
        .iter()
        .map(|(k, v6, m)| format!("add {} {m} -exist\n", k.name(*v6)))
        .collect();
    let started = Instant::now();
    ipset::restore(&text).map_err(anyhow::Error::msg)?;
    let by_process = started.elapsed();
    eprintln!(
        "{} members over netlink: {one_change:?}; by ipset restore: {by_process:?}; \
         3000 members over netlink: {many_time:?} in {} sendmsg calls",
        second.len(),
        sends_after - sends_before
    );
    Ok(())
}

#[test]
fn members_written_over_netlink_are_what_ipset_lists() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (network namespaces, CAP_NET_ADMIN for ipset)");
        return;
    }
    let name = format!("kpxh-ipsetnl-{}", std::process::id());
    let created = Command::new("ip").args(["netns", "add", &name]).status();
    assert!(created.is_ok_and(|s| s.success()), "ip netns add {name}");
    let _guard = Scratch(name.clone());
    let entry = Entry::open(&name).expect("namespace");
    entry
        .enter(scenario)
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn service(ip: &str) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(
        serde_json::json!({"metadata": {"name": "web", "namespace": "t"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}}),
    )
    .expect("service")
}

fn slice(endpoints: &[u8]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|e| serde_json::json!({"addresses": [format!("198.19.0.{e}")], "conditions": {"ready": true}, "nodeName": "other"}))
        .collect();
    serde_json::from_value(
        serde_json::json!({"metadata": {"name": "web-1", "namespace": "t",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}]}),
    )
    .expect("slice")
}

fn hairpin_of(endpoints: &[u8]) -> BTreeSet<String> {
    endpoints
        .iter()
        .map(|e| format!("198.19.0.{e},tcp:8080,198.19.0.{e}"))
        .collect()
}

/// The backend's partial sync (which needs IPVS: the VM's kernel) writing its members over
/// netlink: one endpoint replaced is one delete and one add, in one `sendmsg`.
fn partial_sync() -> anyhow::Result<Option<String>> {
    use kpx_proxy::backend::{Backend, NodeState, SyncInput};
    use kpx_proxy::ipvs::plan::PlanConfig;
    use kpx_proxy::ipvs::{IpvsBackend, IpvsConfig};
    use kpx_proxy::model::{ChangeTracker, Changes, ProxyState};

    if let Err(e) = kpx_proxy::ipvs::netlink::Ipvs::open() {
        return Ok(Some(e.to_string()));
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    anyhow::ensure!(up.success(), "ip link set lo up");
    let cfg = IpvsConfig {
        plan: PlanConfig {
            cluster_cidr: Some("198.19.0.0/16".into()),
            ..PlanConfig::default()
        },
        iptables: kpx_proxy::netfilter::Tool::detect(false),
        strict_arp: false,
        tcp_timeout: std::time::Duration::ZERO,
        tcpfin_timeout: std::time::Duration::ZERO,
        udp_timeout: std::time::Duration::ZERO,
        exclude_cidrs: Vec::new(),
    };
    let mut backend = IpvsBackend::new(cfg, true)?;
    let node = NodeState::default();
    let mut tracker = ChangeTracker::new("this-node");
    tracker.apply_service(service("198.18.200.1"));
    tracker.apply_slice(slice(&[1, 2, 3]));
    let (state, _) = tracker.snapshot(&ProxyState::default());
    backend.sync(SyncInput {
        state: &state,
        changes: &Changes::default(),
        full: true,
        node: &node,
    })?;
    let hairpin = members_of(SetKind::Hairpin, false)?;
    anyhow::ensure!(hairpin == hairpin_of(&[1, 2, 3]), "{hairpin:?}");

    tracker.apply_slice(slice(&[1, 2, 4]));
    let (state2, changes) = tracker.snapshot(&state);
    let before = backend.ipset_stats();
    let report = backend.sync(SyncInput {
        state: &state2,
        changes: &changes,
        full: false,
        node: &node,
    })?;
    let after = backend.ipset_stats();
    anyhow::ensure!(!report.full, "{report:?}");
    let hairpin = members_of(SetKind::Hairpin, false)?;
    anyhow::ensure!(hairpin == hairpin_of(&[1, 2, 4]), "{hairpin:?}");
    anyhow::ensure!(
        (after.0 - before.0, after.1 - before.1) == (2, 1),
        "one endpoint replaced: {} ipset messages in {} sendmsg, want 2 in 1",
        after.0 - before.0,
        after.1 - before.1
    );
    anyhow::ensure!(
        report.messages == report.written.n + 2,
        "the sync's messages count the ipset ones: {report:?}"
    );
    eprintln!(
        "one endpoint replaced: {} messages ({} IPVS, 2 ipset)",
        report.messages, report.written.n
    );

    // No endpoint left: the frontend goes into REJECT, by the same path.
    tracker.apply_slice(slice(&[]));
    let (state3, changes) = tracker.snapshot(&state2);
    backend.sync(SyncInput {
        state: &state3,
        changes: &changes,
        full: false,
        node: &node,
    })?;
    let reject = members_of(SetKind::Reject, false)?;
    anyhow::ensure!(reject.contains("198.18.200.1,tcp:80"), "{reject:?}");
    anyhow::ensure!(
        members_of(SetKind::Hairpin, false)?.is_empty(),
        "hairpin members left"
    );
    // The lost-state check reads the set names over netlink.
    anyhow::ensure!(backend.lost_state().is_none(), "{:?}", backend.lost_state());
    backend.cleanup()?;
    Ok(None)
}

#[test]
fn the_ipvs_backends_partial_sync_writes_members_over_netlink() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    let name = format!("kpxh-ipsetnl-b-{}", std::process::id());
    let created = Command::new("ip").args(["netns", "add", &name]).status();
    assert!(created.is_ok_and(|s| s.success()), "ip netns add {name}");
    let _guard = Scratch(name.clone());
    let entry = Entry::open(&name).expect("namespace");
    let skipped = entry
        .enter(partial_sync)
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(why) = skipped {
        eprintln!(
            "SKIPPED ipvs: the kernel has no IPVS here ({why}); `cargo xtask vm-test` runs it"
        );
    }
}
