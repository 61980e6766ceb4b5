//! The figures earlier issues promised, read off a run: each says what was promised, what this
//! run measured, and whether the promise holds.

use super::report::{count, number, Report, ScaleResult};

pub struct Promise {
    pub promise: String,
    pub measured: String,
    pub holds: bool,
}

fn ran<'a>(report: &'a Report, backend: &str) -> Option<&'a [ScaleResult]> {
    report
        .backend(backend)
        .filter(|b| b.not_run.is_none() && !b.scales.is_empty())
        .map(|b| b.scales.as_slice())
}

fn control(sc: &ScaleResult, key: &str) -> Option<f64> {
    sc.control.get(key).map(|s| s.median)
}

pub fn check(report: &Report) -> Vec<Promise> {
    let mut out = Vec::new();
    if let Some(scales) = ran(report, "ebpf") {
        // Every Service target against direct, at every scale.
        let ratios: Vec<(usize, &str, f64)> = scales
            .iter()
            .flat_map(|sc| {
                sc.targets.iter().filter_map(move |t| {
                    t.vs_direct
                        .get("newconn_p50_us")
                        .map(|r| (sc.services, t.target.as_str(), r.median))
                })
            })
            .collect();
        if let Some(worst) = ratios.iter().max_by(|a, b| a.2.total_cmp(&b.2)) {
            out.push(Promise {
                promise: "eBPF new-connection p50 at most 1.05× direct".into(),
                measured: format!(
                    "worst {:.2}× ({} Services, {}); all {}",
                    worst.2,
                    count(worst.0),
                    worst.1,
                    ratios
                        .iter()
                        .map(|r| format!("{:.2}", r.2))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                holds: worst.2 <= 1.05,
            });
        }
        if let (Some(first), Some(last)) = (scales.first(), scales.last()) {
            // Read against direct from the same stretch of time: the host moves absolute
            // latencies by ~25% for seconds at a time, which is not the table's doing.
            let at = |sc: &ScaleResult| {
                let t = sc.target("last").or_else(|| sc.target("first"))?;
                let ratio = t.vs_direct.get("newconn_p50_us")?.median;
                let p50 = t.metrics.get("newconn_p50_us")?.median;
                let direct = sc.target("direct")?.metrics.get("newconn_p50_us")?.median;
                Some((ratio, p50, direct))
            };
            if let (Some(a), Some(b)) = (at(first), at(last)) {
                if last.services > first.services {
                    let r = b.0 / a.0;
                    out.push(Promise {
                        promise: format!(
                            "eBPF flat from {} to {} Services (the last Service's p50 over direct within ±10%)",
                            count(first.services),
                            count(last.services)
                        ),
                        measured: format!(
                            "{:.2}× → {:.2}× direct ({r:.2}×; p50 {} → {} µs, direct {} → {} µs)",
                            a.0,
                            b.0,
                            number(a.1),
                            number(b.1),
                            number(a.2),
                            number(b.2)
                        ),
                        holds: (0.9..=1.1).contains(&r),
                    });
                }
            }
        }
        if let Some(sc) = scales.iter().find(|s| s.services == 10_000) {
            if let Some(ms) = control(sc, "full_sync_ms") {
                out.push(Promise {
                    promise: "eBPF full sync of 10,000 Services under 0.5 s".into(),
                    measured: format!("{} ms", number(ms)),
                    holds: ms < 500.0,
                });
            }
            if let Some(ms) = control(sc, "change_sync_ms") {
                out.push(Promise {
                    promise: "eBPF one endpoint changed among 10,000 Services under 5 ms".into(),
                    measured: format!("{} ms", number(ms)),
                    holds: ms < 5.0,
                });
            }
        }
    }
    for backend in ["iptables-nft", "iptables-legacy"] {
        let Some(scales) = ran(report, backend) else {
            continue;
        };
        for sc in scales.iter().filter(|s| s.services >= 1000) {
            if let Some(r) = &sc.full_vs_loader {
                out.push(Promise {
                    promise: format!(
                        "{backend} full sync of {} Services at most 1.2× iptables-restore alone",
                        count(sc.services)
                    ),
                    measured: format!("{:.2}× ({:.2}–{:.2})", r.median, r.min, r.max),
                    holds: r.median <= 1.2,
                });
            }
        }
        let Some(sc) = scales.iter().find(|s| s.services == 10_000) else {
            continue;
        };
        let (Some(change), Some(loader)) =
            (control(sc, "change_sync_ms"), control(sc, "loader_ms"))
        else {
            continue;
        };
        out.push(if backend == "iptables-nft" {
            Promise {
                promise: "iptables-nft one endpoint changed among 10,000 Services under 50 ms"
                    .into(),
                measured: format!("{} ms", number(change)),
                holds: change < 50.0,
            }
        } else {
            Promise {
                promise: "iptables-legacy one endpoint changed among 10,000 Services at most \
                          1.2× the whole table restored"
                    .into(),
                measured: format!(
                    "{} ms vs {} ms ({:.2}×)",
                    number(change),
                    number(loader),
                    change / loader
                ),
                holds: change <= 1.2 * loader,
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promises_are_read_off_the_report() {
        let report = crate::bench::report::tests::sample();
        let promises = check(&report);
        let ebpf = promises
            .iter()
            .find(|p| p.promise.starts_with("eBPF new-connection"))
            .expect("the eBPF ratio is checked");
        assert!(ebpf.holds, "{}", ebpf.measured);
        assert!(
            ebpf.measured.starts_with("worst 1.02×"),
            "{}",
            ebpf.measured
        );
        let flat = promises
            .iter()
            .find(|p| p.promise.starts_with("eBPF flat from 1 to 1,000"))
            .expect("flatness is checked");
        assert!(flat.holds, "{}", flat.measured);
    }
}
