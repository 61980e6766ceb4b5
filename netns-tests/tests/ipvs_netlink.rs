//! kpx-proxy's IPVS netlink client and the kpx-ipvs0 dummy link against a real kernel, each
//! test in a fresh network namespace (IPVS tables are per namespace). Needs root and a kernel
//! with IP_VS and the dummy link type: the host kernel here has neither, so these skip with the
//! reason there and run in `cargo xtask vm-test --tests ipvs_netlink --backends ipvs` (Debian's
//! 6.1). With `ipvs` in KPX_BACKENDS a missing feature is a failure, not a skip.
//! `ipvsadm -Sn` (when installed) checks what was written independently of kpx's reader.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kpx_control::netns::Netns;
use kpx_proxy::ipvs::dummy::{self, DummyError, DummyLink};
use kpx_proxy::ipvs::netlink::{
    Dest, Ipvs, IpvsError, Op, Service, ServiceKey, Timeouts, IP_VS_SVC_F_PERSISTENT,
    IP_VS_SVC_F_SCHED_MH_FALLBACK, IP_VS_SVC_F_SCHED_MH_PORT,
};

fn required() -> bool {
    std::env::var("KPX_BACKENDS").is_ok_and(|v| v.split(',').any(|b| b == "ipvs"))
}

fn root_or_skip(tag: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let strict = std::env::var("KPX_REQUIRE_NETNS").is_ok_and(|v| v == "1") || required();
    assert!(!strict, "{tag}: network namespace tests need root");
    eprintln!("SKIPPED {tag}: network namespace tests need root");
    false
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

async fn namespace(tag: &str) -> Netns {
    Netns::create(&format!("kpxh-{tag}-{}", std::process::id()))
        .await
        .expect("namespace")
}

/// Opens IPVS inside `ns`; `None` (the test skips) when the kernel has none.
fn open_or_skip(tag: &str) -> Option<Ipvs> {
    match Ipvs::open() {
        Ok(ipvs) => Some(ipvs),
        Err(IpvsError::Unavailable(reason)) => {
            assert!(!required(), "{tag}: ipvs is in KPX_BACKENDS but {reason}");
            eprintln!("SKIPPED {tag}: {reason}");
            None
        }
        Err(e) => panic!("{tag}: opening IPVS: {e}"),
    }
}

fn dest(addr: &str, port: u16, weight: u32) -> Dest {
    Dest {
        addr: ip(addr),
        port,
        weight,
        active_conns: 0,
        inactive_conns: 0,
    }
}

/// (addr, port, weight) of each destination, sorted.
fn dest_set(dests: &[Dest]) -> BTreeSet<(IpAddr, u16, u32)> {
    dests.iter().map(|d| (d.addr, d.port, d.weight)).collect()
}

fn ipvsadm_save(ns: &Netns) -> Option<String> {
    let out = ns.command("ipvsadm").arg("-Sn").output().ok()?;
    if !out.status.success() {
        eprintln!(
            "ipvsadm -Sn failed, not cross-checked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mh() -> Service {
    Service {
        key: ServiceKey::Addr {
            addr: ip("198.18.100.10"),
            port: 80,
            protocol: libc::IPPROTO_TCP as u8,
        },
        scheduler: "mh".into(),
        flags: IP_VS_SVC_F_SCHED_MH_FALLBACK | IP_VS_SVC_F_SCHED_MH_PORT,
        timeout: 0,
        netmask: 0xffff_ffff,
    }
}

fn rr_persistent_v6() -> Service {
    Service {
        key: ServiceKey::Addr {
            addr: ip("2001:2::10"),
            port: 53,
            protocol: libc::IPPROTO_UDP as u8,
        },
        scheduler: "rr".into(),
        flags: IP_VS_SVC_F_PERSISTENT,
        timeout: 10800,
        netmask: 128,
    }
}

fn fwmark() -> Service {
    Service {
        key: ServiceKey::Fwmark {
            ipv6: false,
            mark: 0x4001,
        },
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
        netmask: 0xffff_ffff,
    }
}

/// With KPX_IPVS_RECORD=1, prints what the kernel answered since the last call, as lines
/// `KPX-RECORD <name> <hex>` (the recorded replies under proxy/src/ipvs/testdata/ come from
/// these lines of a VM run).
fn dump_recorded(ipvs: &mut Ipvs, name: &str) {
    let recorded = ipvs.take_recorded();
    if std::env::var("KPX_IPVS_RECORD").is_ok_and(|v| v == "1") {
        for (i, datagram) in recorded.iter().enumerate() {
            let hex: String = datagram.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("KPX-RECORD {name}.{i} {hex}");
        }
    }
    ipvs.record();
}

fn missing_key() -> ServiceKey {
    ServiceKey::Fwmark {
        ipv6: true,
        mark: 99,
    }
}

fn ok(results: &[Result<(), i32>]) {
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_destinations_are_written_read_back_and_deleted() {
    let tag = "ipvs_netlink";
    if !root_or_skip(tag) {
        return;
    }
    let ns = namespace("ipvs").await;
    // The socket belongs to the namespace it is created in, wherever it is used from.
    let Some(mut ipvs) = ns.enter(move || open_or_skip(tag)).expect("enter") else {
        return;
    };
    ipvs.record();
    let info = ipvs.info().expect("info");
    dump_recorded(&mut ipvs, "info");
    eprintln!(
        "IPVS {} (conn table {}), family id {}, window {}",
        info.version_text(),
        info.conn_tab_size,
        ipvs.family_id(),
        ipvs.window()
    );
    assert!(info.version >= 0x010200, "{info:?}");

    // Timeouts: a zero keeps the kernel's value.
    let before = ipvs.timeouts().expect("timeouts");
    dump_recorded(&mut ipvs, "config");
    ipvs.set_timeouts(&Timeouts {
        tcp: 901,
        tcp_fin: 0,
        udp: 301,
    })
    .expect("set timeouts");
    let after = ipvs.timeouts().expect("timeouts");
    assert_eq!(
        after,
        Timeouts {
            tcp: 901,
            tcp_fin: before.tcp_fin,
            udp: 301
        }
    );

    // Three services, then their destinations (mh's sorted), each op its own ACK.
    let (mh, rr, fw) = (mh(), rr_persistent_v6(), fwmark());
    let (m0, s0) = ipvs.stats();
    let mut ops = vec![
        Op::NewService(mh.clone()),
        Op::NewService(rr.clone()),
        Op::NewService(fw.clone()),
    ];
    for a in ["198.18.1.1", "198.18.1.2", "198.18.1.3"] {
        ops.push(Op::NewDest(mh.key, dest(a, 8080, 1)));
    }
    ops.push(Op::NewDest(rr.key, dest("2001:2::1:1", 5353, 1)));
    ops.push(Op::NewDest(rr.key, dest("2001:2::1:2", 5353, 2)));
    ops.push(Op::NewDest(fw.key, dest("198.18.1.1", 0, 1)));
    ok(&ipvs.apply(&ops).expect("apply"));
    let (m1, s1) = ipvs.stats();
    assert_eq!(
        (m1 - m0, s1 - s0),
        (ops.len() as u64, 1),
        "one sendmsg for the whole batch"
    );

    ipvs.take_recorded();
    ipvs.record();
    let mut services = ipvs.services().expect("dump");
    dump_recorded(&mut ipvs, "services");
    services.sort_by_key(|s| s.key);
    let mut want = vec![mh.clone(), rr.clone(), fw.clone()];
    want.sort_by_key(|s| s.key);
    assert_eq!(services, want);
    assert_eq!(
        dest_set(&ipvs.dests(&mh.key).expect("dests")),
        dest_set(&[
            dest("198.18.1.1", 8080, 1),
            dest("198.18.1.2", 8080, 1),
            dest("198.18.1.3", 8080, 1)
        ])
    );
    let v6_dests = ipvs.dests(&rr.key).expect("dests");
    dump_recorded(&mut ipvs, "dests");
    assert_eq!(
        dest_set(&v6_dests),
        dest_set(&[dest("2001:2::1:1", 5353, 1), dest("2001:2::1:2", 5353, 2)])
    );
    if let Some(saved) = ipvsadm_save(&ns) {
        eprintln!("ipvsadm -Sn:\n{saved}");
        for line in [
            "-A -t 198.18.100.10:80 -s mh -b mh-fallback,mh-port",
            "-a -t 198.18.100.10:80 -r 198.18.1.2:8080 -m -w 1",
            "-A -u [2001:2::10]:53 -s rr -p 10800",
            "-a -u [2001:2::10]:53 -r [2001:2::1:2]:5353 -m -w 2",
            "-A -f 16385 -s rr",
        ] {
            assert!(
                saved.lines().any(|l| l.trim() == line),
                "no {line:?} in\n{saved}"
            );
        }
    }

    // A batch with failures in the middle: each op has its own result, the others apply.
    let batch = vec![
        Op::SetDest(mh.key, dest("198.18.1.1", 8080, 0)),
        Op::NewDest(mh.key, dest("198.18.1.2", 8080, 1)), // exists: EEXIST
        Op::DelDest(mh.key, ip("198.18.1.3"), 8080),
        Op::DelDest(mh.key, ip("198.18.9.9"), 8080), // never added: ENOENT
        Op::NewDest(mh.key, dest("198.18.1.4", 8080, 1)),
        Op::NewDest(mh.key, dest("2001:2::1:9", 8080, 1)), // IPv6 on an IPv4 NAT service: EINVAL
        Op::NewDest(missing_key(), dest("198.18.1.1", 8080, 1)), // no such service: ESRCH
        Op::SetService(Service {
            scheduler: "rr".into(),
            flags: 0,
            ..mh.clone()
        }),
    ];
    let results = ipvs.apply(&batch).expect("apply");
    dump_recorded(&mut ipvs, "batch");
    eprintln!("batch results: {results:?}");
    assert_eq!(results[0], Ok(()));
    assert_eq!(results[1], Err(-libc::EEXIST));
    assert_eq!(results[2], Ok(()));
    assert_eq!(results[3], Err(-libc::ENOENT));
    assert_eq!(results[4], Ok(()));
    assert_eq!(results[5], Err(-libc::EINVAL));
    assert_eq!(results[6], Err(-libc::ESRCH));
    assert_eq!(results[7], Ok(()));
    assert_eq!(
        dest_set(&ipvs.dests(&mh.key).expect("dests")),
        dest_set(&[
            dest("198.18.1.1", 8080, 0),
            dest("198.18.1.2", 8080, 1),
            dest("198.18.1.4", 8080, 1)
        ])
    );
    let edited = ipvs
        .services()
        .expect("dump")
        .into_iter()
        .find(|s| s.key == mh.key)
        .expect("mh service");
    assert_eq!((edited.scheduler.as_str(), edited.flags), ("rr", 0));

    // A service that is not there has no destinations (the kernel ends the dump empty).
    assert_eq!(ipvs.dests(&missing_key()).expect("dests"), vec![]);

    // Deleting a service takes its destinations with it; a second delete is ESRCH (the
    // kernel's answer to any command on a missing service; ENOENT is for a missing
    // destination).
    let results = ipvs
        .apply(&[
            Op::DelService(mh.key),
            Op::DelService(rr.key),
            Op::DelService(fw.key),
            Op::DelService(fw.key),
        ])
        .expect("apply");
    assert_eq!(results, vec![Ok(()), Ok(()), Ok(()), Err(-libc::ESRCH)]);
    assert_eq!(ipvs.services().expect("dump"), vec![]);
    if let Some(saved) = ipvsadm_save(&ns) {
        assert_eq!(saved.trim(), "", "everything was deleted");
    }
    ipvs.set_timeouts(&before).expect("restore timeouts");
}

/// More operations than one datagram holds: every one is answered exactly once, and the
/// number of sendmsg calls is what the window and datagram size make it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_pipelined_and_every_ack_accounted_for() {
    let tag = "ipvs_netlink large batch";
    if !root_or_skip(tag) {
        return;
    }
    let ns = namespace("ipvsb").await;
    let Some(mut ipvs) = ns.enter(move || open_or_skip(tag)).expect("enter") else {
        return;
    };
    // mh rebuilds its lookup table (65,537 slots) on every destination change; rr does not:
    // the two times say what a destination costs the kernel beyond the netlink messages.
    let rr = Service {
        key: ServiceKey::Addr {
            addr: ip("198.18.100.20"),
            port: 80,
            protocol: libc::IPPROTO_TCP as u8,
        },
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
        netmask: 0xffff_ffff,
    };
    for service in [mh(), rr] {
        batch(&mut ipvs, &service);
    }
}

fn batch(ipvs: &mut Ipvs, service: &Service) {
    let mut ops = vec![Op::NewService(service.clone())];
    let count = 4000u32;
    for i in 0..count {
        let addr = IpAddr::from([198, 18, 2 + (i / 250) as u8, 1 + (i % 250) as u8]);
        ops.push(Op::NewDest(
            service.key,
            Dest {
                addr,
                port: 8080,
                weight: 1,
                active_conns: 0,
                inactive_conns: 0,
            },
        ));
    }
    // One duplicate near the end must fail alone.
    ops.push(Op::NewDest(service.key, dest("198.18.2.1", 8080, 1)));
    let (m0, s0) = ipvs.stats();
    let started = std::time::Instant::now();
    let results = ipvs.apply(&ops).expect("apply");
    let took = started.elapsed();
    let (m1, s1) = ipvs.stats();
    eprintln!(
        "{}: {} ops: {} messages in {} sendmsg calls (window {}), {took:?} (TCG)",
        service.scheduler,
        ops.len(),
        m1 - m0,
        s1 - s0,
        ipvs.window()
    );
    assert_eq!(results.len(), ops.len());
    ok(&results[..ops.len() - 1]);
    assert_eq!(results[ops.len() - 1], Err(-libc::EEXIST));
    assert_eq!(m1 - m0, ops.len() as u64);
    let per_call = (ops.len() as u64).div_ceil(s1 - s0);
    assert!(
        s1 - s0 < ops.len() as u64 / 10,
        "{} sendmsg calls for {} ops",
        s1 - s0,
        ops.len()
    );
    assert!(per_call <= ipvs.window() as u64);
    let started = std::time::Instant::now();
    let dumped = ipvs.dests(&service.key).expect("dests").len();
    eprintln!(
        "{}: dumping {dumped} destinations took {:?} (TCG)",
        service.scheduler,
        started.elapsed()
    );
    assert_eq!(dumped, count as usize);
    // One endpoint changed in that table: one message, one sendmsg (kube-proxy's IPVS mode
    // re-reads every virtual and real server of the node instead).
    let (m0, s0) = ipvs.stats();
    let results = ipvs
        .apply(&[Op::SetDest(service.key, dest("198.18.2.7", 8080, 0))])
        .expect("apply");
    ok(&results);
    assert_eq!(ipvs.stats(), (m0 + 1, s0 + 1));
    let results = ipvs.apply(&[Op::DelService(service.key)]).expect("apply");
    ok(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpx_ipvs0_is_a_dummy_link_kept_down_with_host_addresses() {
    let tag = "kpx-ipvs0";
    if !root_or_skip(tag) {
        return;
    }
    let ns = namespace("dummy").await;
    let mut link = ns
        .enter(DummyLink::open)
        .expect("enter")
        .expect("rtnetlink socket");
    assert_eq!(link.link().expect("get link"), None);
    let index = match link.ensure() {
        Ok(index) => index,
        Err(DummyError::NoDummy) => {
            assert!(
                !required(),
                "{tag}: ipvs is in KPX_BACKENDS but the kernel has no dummy link type"
            );
            eprintln!("SKIPPED {tag}: the kernel has no dummy link type (CONFIG_DUMMY)");
            return;
        }
        Err(e) => panic!("{tag}: {e}"),
    };
    let state = link.link().expect("get link").expect("the link");
    assert_eq!(state.index, index);
    assert_eq!(state.kind.as_deref(), Some("dummy"));
    assert!(!state.up);
    // Idempotent.
    assert_eq!(link.ensure().expect("ensure again"), index);

    let (v4, v6) = (ip("198.18.100.10"), ip("2001:2::10"));
    assert!(link.add_address(index, v4).expect("add v4"));
    assert!(link.add_address(index, v6).expect("add v6"));
    assert!(!link.add_address(index, v4).expect("add v4 again"));
    let listed: BTreeSet<_> = link.addresses(index).expect("list").into_iter().collect();
    assert_eq!(listed, BTreeSet::from([v4, v6]));
    let out = ns
        .command("ip")
        .args(["-o", "addr", "show", "dev", dummy::IFNAME])
        .output()
        .expect("ip addr");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("198.18.100.10/32"), "{text}");
    assert!(text.contains("2001:2::10/128"), "{text}");
    assert!(!text.contains("tentative"), "NODAD: {text}");

    assert!(link.del_address(index, v4).expect("del v4"));
    assert!(!link.del_address(index, v4).expect("del v4 again"));
    assert_eq!(link.addresses(index).expect("list"), vec![v6]);

    // Someone takes it up: ensure takes it down again.
    let up = ns
        .command("ip")
        .args(["link", "set", dummy::IFNAME, "up"])
        .status()
        .expect("ip link set up");
    assert!(up.success());
    assert!(link.link().expect("get").expect("link").up);
    assert_eq!(link.ensure().expect("ensure"), index);
    assert!(!link.link().expect("get").expect("link").up);

    assert!(link.delete().expect("delete"));
    assert!(!link.delete().expect("delete again"));
    assert_eq!(link.link().expect("get link"), None);
}
