//! `kpx-lab bench` end to end at a tiny scale (a few seconds per cell): every backend this
//! kernel runs is measured, the others are rows saying why; every column is in the JSON and
//! the CSV, and the plots are written. Bad options are refused before anything is built.

use std::process::Command;

use kpx_lab::bench::full_syncs_per_round;
use kpx_lab::bench::report::{is_service, Report, CONTROL, CSV_HEADER, DATA, LOOPBACK};
use kpx_lab::lab::{binary, ALL_BACKENDS};

/// Endpoint changes per control round in the smoke run (the default's 12 would only add time).
const CHANGES_PER_ROUND: usize = 3;

fn root_or_skip(tag: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("KPX_REQUIRE_NETNS").map_or(true, |v| v != "1"),
        "{tag} needs root (KPX_REQUIRE_NETNS=1)"
    );
    eprintln!("SKIPPED {tag}: kpx-lab bench needs root");
    false
}

#[test]
fn a_tiny_bench_measures_every_backend_and_writes_every_output() {
    if !root_or_skip("bench smoke run") {
        return;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let run = Command::new(binary("kpx-lab").expect("kpx-lab built"))
        .args(["bench", "--services", "1,3", "--endpoints-per-service", "2"])
        .args([
            "--rounds",
            "2",
            "--connections",
            "50",
            "--keepalive-requests",
            "50",
        ])
        .args(["--udp-requests", "50", "--tcp-seconds", "1"])
        .args(["--endpoint-changes", &CHANGES_PER_ROUND.to_string()])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("kpx-lab bench runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "kpx-lab bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for column in [
        "full sync ms",
        "loader alone ms",
        "new-conn p50 µs",
        "UDP req/s",
    ] {
        assert!(stdout.contains(column), "{column} missing from\n{stdout}");
    }
    let report: Report = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("report.json")).expect("report.json"),
    )
    .expect("a report");
    let mut expected_rows = 0;
    for name in ALL_BACKENDS.iter().map(|b| b.name()) {
        let b = report
            .backend(name)
            .unwrap_or_else(|| panic!("no row for {name}"));
        let supported = ALL_BACKENDS
            .iter()
            .find(|x| x.name() == name)
            .is_some_and(|x| x.unsupported().is_none());
        if !supported {
            let why = b.not_run.as_deref().unwrap_or_default();
            assert!(!why.is_empty(), "{name} neither ran nor says why");
            assert!(stdout.contains(&format!("not run: {why}")), "{stdout}");
            expected_rows += 1;
            continue;
        }
        assert_eq!(b.not_run, None, "{name}");
        let scales: Vec<usize> = b.scales.iter().map(|s| s.services).collect();
        assert_eq!(scales, vec![1, 3], "{name}");
        for sc in &b.scales {
            for m in CONTROL {
                let s = sc
                    .control
                    .get(m.key)
                    .unwrap_or_else(|| panic!("{name} at {}: no {}", sc.services, m.key));
                // Several endpoint changes per round; several full syncs (with their loader
                // run, CPU and memory) at these small scales.
                let per_round = if matches!(m.key, "change_sync_ms" | "programming_ms") {
                    CHANGES_PER_ROUND
                } else {
                    full_syncs_per_round(sc.services)
                };
                assert_eq!(
                    s.samples.len(),
                    2 * per_round,
                    "{name} {}: values per round",
                    m.key
                );
                // A figure counted in steps (proxy CPU, 10 ms ticks) may read zero steps at
                // this tiny scale; every other one is a real, positive measurement.
                if m.resolution > 0.0 {
                    assert!(
                        s.samples.iter().all(|v| *v >= 0.0),
                        "{name} {}: {s:?}",
                        m.key
                    );
                } else {
                    assert!(s.median > 0.0, "{name} {}: {s:?}", m.key);
                }
                expected_rows += 1;
            }
            assert!(
                sc.full_vs_loader.is_some(),
                "{name}: no ratio to the loader"
            );
            assert!(sc.programmed > 0, "{name}: nothing programmed");
            let targets: Vec<&str> = sc.targets.iter().map(|t| t.target.as_str()).collect();
            let want: &[&str] = if sc.services == 1 {
                &["loopback", "direct", "first"]
            } else {
                &["loopback", "direct", "first", "middle", "last"]
            };
            assert_eq!(targets, want, "{name} at {}", sc.services);
            for t in &sc.targets {
                for m in DATA {
                    let s = t.metrics.get(m.key).unwrap_or_else(|| {
                        panic!("{name} {} at {}: no {}", t.target, sc.services, m.key)
                    });
                    assert_eq!(s.samples.len(), 2, "{name} {} {}", t.target, m.key);
                    if m.key != "failed_requests" {
                        assert!(s.median > 0.0, "{name} {} {}: {s:?}", t.target, m.key);
                    }
                    // Services against direct; everything but the host reference itself
                    // against the loopback.
                    if m.key != "failed_requests" {
                        let service = is_service(&t.target);
                        assert_eq!(
                            t.vs_direct.contains_key(m.key),
                            service,
                            "{name} {} {} ×direct",
                            t.target,
                            m.key
                        );
                        assert_eq!(
                            t.vs_loopback.contains_key(m.key),
                            t.target != LOOPBACK,
                            "{name} {} {} ×loopback",
                            t.target,
                            m.key
                        );
                    }
                    expected_rows += 1;
                }
            }
        }
    }
    let csv = std::fs::read_to_string(out.path().join("report.csv")).expect("report.csv");
    let rows: Vec<&str> = csv.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows[0], CSV_HEADER);
    assert_eq!(rows.len() - 1, expected_rows, "{csv}");
    assert!(
        csv.starts_with("# kpx-lab") && csv.contains("kernel "),
        "{csv}"
    );
    for plot in ["latency", "conn-rate", "sync"] {
        for ext in ["svg", "png"] {
            let path = out.path().join(format!("{plot}.{ext}"));
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{} missing or empty", path.display());
        }
    }
    // The run rendered again and compared with itself: every figure agrees.
    let json = out.path().join("report.json");
    let again = Command::new(binary("kpx-lab").expect("kpx-lab built"))
        .arg("bench")
        .arg("--from")
        .arg(&json)
        .arg("--compare")
        .arg(&json)
        .arg("--out")
        .arg(out.path().join("again"))
        .output()
        .expect("kpx-lab bench --from runs");
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{text}");
    let all = text
        .lines()
        .find(|l| l.starts_with("all figures"))
        .unwrap_or_else(|| panic!("no agreement total in\n{text}"));
    let (within, of) = all
        .split_whitespace()
        .nth(2)
        .and_then(|f| f.split_once('/'))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(of.parse::<usize>().is_ok_and(|n| n > 0), "{all}");
    assert_eq!(within, of, "{text}");
    let after_host = all
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .unwrap_or_else(|| panic!("no after-host total in {all}"));
    assert_eq!(after_host.0, after_host.1, "{text}");
    assert!(
        text.contains("×direct") && text.contains("×loader") && text.contains("after host"),
        "{text}"
    );
}

#[test]
fn bad_options_name_the_option_and_change_nothing() {
    let out = tempfile::tempdir().expect("tempdir");
    let target = out.path().join("never");
    for (args, says) in [
        (vec!["--services", "0"], "--services"),
        (
            vec!["--backends", "ipvs,bogus"],
            "allowed values: iptables-nft, iptables-legacy, ebpf, nftables, ipvs",
        ),
        (vec!["--rounds", "0"], "--rounds 0: allowed values: 1 to 20"),
        (
            vec!["--endpoint-changes", "0"],
            "--endpoint-changes 0: allowed values: 1 to 100",
        ),
        (
            vec!["--endpoints-per-service", "500"],
            "--endpoints-per-service",
        ),
        (
            vec!["--compare", "/nonexistent/report.json"],
            "--compare /nonexistent/report.json",
        ),
    ] {
        let run = Command::new(binary("kpx-lab").expect("kpx-lab built"))
            .arg("bench")
            .args(&args)
            .arg("--out")
            .arg(&target)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!target.exists(), "{args:?} created {}", target.display());
    }
}
