//! The nftables plan, interpreted: the full plan of each family (`render::full_text`) applied
//! to the in-memory nftables (`nftables/trace.rs`), which refuses what the kernel would, and
//! each probe traced through the hooks its packet passes (a pod's or an outside client's:
//! prerouting, then input or forward and postrouting; the node's: output, postrouting).

use std::collections::BTreeSet;

use super::{node_ips, node_source, Case, From, Outcome, Probe, Runner, Seen};
use crate::nftables::render::{self, RenderConfig};
use crate::nftables::trace::{self, Packet, Path, Ruleset};

pub fn config(case: &Case, ipv6: bool) -> RenderConfig {
    RenderConfig {
        ipv6,
        cluster_cidr: case.node.cidr(ipv6).map(str::to_string),
        masquerade_all: case.node.masquerade_all,
        nodeport_addresses: case.node.nodeport_addresses_of(ipv6),
        conntrack_tcp_be_liberal: false,
    }
}

pub struct NftablesRunner {
    /// Both families' tables, or why the interpreter refused the plan.
    ruleset: Result<Ruleset, String>,
}

impl NftablesRunner {
    pub fn new(case: &Case) -> Self {
        Self::edited(case, |text| text)
    }

    /// The plan with `edit` applied to each family's text first (to show the table catches a
    /// broken plan).
    fn edited(case: &Case, edit: impl Fn(String) -> String) -> Self {
        let state = case.state();
        let mut ruleset = Ruleset::new();
        let mut loaded = Ok(());
        for ipv6 in [false, true] {
            let text = edit(render::full_text(&config(case, ipv6), &state));
            if let Err(e) = ruleset.apply(&text) {
                loaded = Err(format!("the {} plan is refused: {e}", family(ipv6)));
                break;
            }
        }
        Self {
            ruleset: loaded.map(|()| ruleset),
        }
    }
}

fn family(ipv6: bool) -> &'static str {
    if ipv6 {
        "ip6"
    } else {
        "ip"
    }
}

/// An outcome no Kubernetes promise has, so the table reports it as a mismatch with `why`.
fn odd(why: String) -> Outcome {
    Outcome::Reach {
        endpoints: [why].into(),
        seen: Seen::Client,
        affinity: None,
    }
}

/// Every way the probe's first packet can go (with a probability above zero).
fn trace_probe(ruleset: &Ruleset, probe: &Probe) -> Vec<trace::Outcome> {
    let ipv6 = probe.to.is_ipv6();
    let local = node_ips();
    let (src, path) = match probe.from {
        From::Pod(ip) | From::RemotePod(ip) | From::Outside(ip) => (super::ip(ip), Path::Forwarded),
        From::Node => (node_source(ipv6), Path::Node),
    };
    let packet = Packet {
        src,
        dst: probe.to,
        protocol: probe.protocol.lower(),
        dport: probe.port,
        local: &local,
    };
    trace::trace(ruleset, &packet, path)
        .into_iter()
        .filter(|o| o.probability > 1e-9)
        .collect()
}

impl Runner for NftablesRunner {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn outcome(&self, probe: &Probe) -> Outcome {
        let ruleset = match &self.ruleset {
            Ok(r) => r,
            Err(e) => return odd(format!("<{e}>")),
        };
        let outcomes = trace_probe(ruleset, probe);
        if let Some(e) = outcomes.iter().find_map(|o| {
            o.verdict
                .as_deref()
                .filter(|v| v.starts_with("error"))
                .map(str::to_string)
        }) {
            return odd(format!("<{e}>"));
        }
        let dnat: BTreeSet<String> = outcomes.iter().filter_map(|o| o.dnat.clone()).collect();
        if !dnat.is_empty() {
            if outcomes.iter().any(|o| o.dnat.is_none()) {
                return odd(format!(
                    "<some ways not DNATed: {}>",
                    trace::describe(&outcomes).join(", ")
                ));
            }
            if outcomes.iter().any(|o| o.verdict.is_some()) {
                return odd(format!(
                    "<dropped or rejected after DNAT: {}>",
                    trace::describe(&outcomes).join(", ")
                ));
            }
            let masqueraded = outcomes.iter().all(|o| o.masquerade);
            if !masqueraded && outcomes.iter().any(|o| o.masquerade) {
                return odd(format!(
                    "<masqueraded on some ways only: {}>",
                    trace::describe(&outcomes).join(", ")
                ));
            }
            return Outcome::Reach {
                endpoints: dnat,
                seen: if masqueraded {
                    Seen::Node
                } else {
                    Seen::Client
                },
                affinity: outcomes.iter().find_map(|o| o.affinity),
            };
        }
        match outcomes.iter().find_map(|o| o.verdict.as_deref()) {
            Some(v) if v.starts_with("reject") => Outcome::Reject,
            Some("drop") => Outcome::Drop,
            _ => Outcome::NotAService,
        }
    }
}

/// The table is not passed by a runner that cannot fail: plans missing the masquerade, or
/// whose DNAT goes to one slot only, or that the kernel would refuse, give mismatches.
#[test]
fn a_broken_plan_fails_the_table() {
    for (what, edit) in [
        (
            "no masquerade",
            (|t: String| t.replace(" masquerade fully-random", " accept")) as fn(String) -> String,
        ),
        ("one slot only", |t: String| {
            t.replace("numgen random mod 2 offset", "numgen random mod 1 offset")
        }),
        ("no reject", |t: String| {
            t.replace("reject with tcp reset", "accept")
                .replace("reject-chain reject", "reject-chain accept")
        }),
        ("a dangling goto", |t: String| {
            t.replace("add chain ip kpx reject-chain\n", "")
        }),
    ] {
        let failures = super::run(|case| Box::new(NftablesRunner::edited(case, edit)));
        assert!(!failures.is_empty(), "{what}: the table still passes");
    }
}

#[test]
fn a_partial_sync_on_a_full_plan_is_the_full_plan_of_the_new_state() {
    let failures = second_sync_of_every_pair(Second::Partial);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_full_resync_on_a_full_plan_is_the_full_plan_of_the_new_state() {
    let failures = second_sync_of_every_pair(Second::Full);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The full sync after a failed one: the table deleted and written again in one transaction
/// (`NftablesBackend::sync`'s `recreate`: `add table`, `delete table`, the full plan).
#[test]
fn a_full_sync_replacing_the_table_is_the_full_plan_of_the_new_state() {
    let failures = second_sync_of_every_pair(Second::Recreate);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Second {
    Partial,
    /// Over the existing table, given the names it holds.
    Full,
    /// Replacing the table.
    Recreate,
}

/// A partial sync, a full resync over the existing table (given the names it holds), or one
/// replacing the table, applied on top of the full plan of state A leaves what the full plan of state B would
/// (once the housekeeping tick has deleted what went stale), for every pair of cases taken as
/// A and B (their Services share names, so B changes, adds and removes Service ports of A);
/// right after the sync, before housekeeping, every probe of B already gets what the table
/// wants.
fn second_sync_of_every_pair(mode: Second) -> Vec<String> {
    let full = mode != Second::Partial;
    use crate::model::{ChangeTracker, Changes, ProxyState};
    use crate::nftables::render::{Applied, Existing};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let services = |c: &Case| -> Vec<Service> {
        c.services
            .iter()
            .map(|v| serde_json::from_value(v.clone()).expect("a Service in a case"))
            .collect()
    };
    let slices = |c: &Case| -> Vec<EndpointSlice> {
        c.slices
            .iter()
            .map(|v| serde_json::from_value(v.clone()).expect("a slice in a case"))
            .collect()
    };
    // `$KPX_NFT_PARTIALS`: where to write each pair's transactions in order (to replay them
    // into a throwaway namespace's kernel by hand: `unshare -n sh -c 'for f in …; do nft -f
    // $f; done'`).
    let dump = std::env::var_os("KPX_NFT_PARTIALS").map(std::path::PathBuf::from);
    let mut failures = Vec::new();
    let all = super::cases::all();
    for (i, a) in all.iter().enumerate() {
        for (j, b) in all.iter().enumerate() {
            let sync = match mode {
                Second::Partial => "partial sync",
                Second::Full => "full resync",
                Second::Recreate => "full sync replacing the table",
            };
            let mut tracker = ChangeTracker::new(super::NODE);
            if let Some(zone) = b.node.zone {
                let labels = [("topology.kubernetes.io/zone".to_string(), zone.to_string())].into();
                tracker.set_node_labels(Some(&labels));
            }
            tracker.reset_services(services(a));
            tracker.reset_slices(slices(a));
            let (state_a, _) = tracker.snapshot(&ProxyState::default());
            tracker.reset_services(services(b));
            tracker.reset_slices(slices(b));
            let (state_b, mut changes) = tracker.snapshot(&state_a);
            if full {
                changes = Changes::default();
            }
            let mut ruleset = Ruleset::new();
            let mut fresh = Ruleset::new();
            let pair = format!("{:?} -> {:?}", a.name, b.name);
            let step = |rs: &mut Ruleset, what: &str, text: &str| {
                rs.apply(text)
                    .map_err(|e| format!("{pair}: {what} refused: {e}"))
            };
            let mut result = Ok(());
            for ipv6 in [false, true] {
                let cfg = config(b, ipv6);
                let mut applied = Applied::default();
                let full_a = render::plan(
                    &cfg,
                    &state_a,
                    &Changes::default(),
                    true,
                    &Existing::default(),
                    &mut applied,
                );
                result = step(&mut ruleset, "full plan of A", &full_a.text);
                if result.is_err() {
                    break;
                }
                // A full resync is given the names the table holds (as the backend reads them
                // back over netlink).
                let existing = if mode == Second::Full {
                    let (chains, sets) = ruleset.names(family(ipv6), "kpx");
                    Existing { chains, sets }
                } else {
                    Existing::default()
                };
                let mut second =
                    render::plan(&cfg, &state_b, &changes, full, &existing, &mut applied);
                if mode == Second::Recreate {
                    let fam = family(ipv6);
                    second.text = format!(
                        "add table {fam} kpx\ndelete table {fam} kpx\n{}",
                        second.text
                    );
                }
                // The housekeeping tick's transactions (stale sets, then stale chains),
                // applied after the probes below.
                let stale = render::stale_text(&cfg, &applied);
                if let Some(dir) = &dump {
                    let fam = if ipv6 { 6 } else { 4 };
                    for (n, text) in [
                        (1, &full_a.text),
                        (2, &second.text),
                        (3, &stale[0]),
                        (4, &stale[1]),
                    ] {
                        let name = format!("{i:02}-{j:02}-{fam}-{}-{n}.nft", mode as u8);
                        std::fs::write(dir.join(name), text).expect("writing a transaction");
                    }
                }
                result =
                    step(&mut ruleset, &format!("{sync} A -> B"), &second.text).and_then(|()| {
                        step(
                            &mut fresh,
                            "full plan of B",
                            &render::full_text(&cfg, &state_b),
                        )
                    });
                if result.is_err() {
                    break;
                }
                let runner = NftablesRunner {
                    ruleset: Ok(ruleset.clone()),
                };
                for probe in b.probes.iter().filter(|p| p.to.is_ipv6() == ipv6) {
                    let got = runner.outcome(probe);
                    if !super::satisfies(&got, &probe.want) {
                        failures.push(format!(
                            "{pair}: after the {sync}, {:?} -> {}:{}/{}: got {got}, want {}",
                            probe.from, probe.to, probe.port, probe.protocol, probe.want
                        ));
                    }
                }
                result = step(&mut ruleset, "housekeeping (sets)", &stale[0])
                    .and_then(|()| step(&mut ruleset, "housekeeping (chains)", &stale[1]));
                if result.is_err() {
                    break;
                }
            }
            match result {
                Err(e) => failures.push(e),
                // Slots are allocated by history in a partial sync and afresh in a full one,
                // and shard maps once declared stay (`Applied::shards_declared`): compared by
                // what the DNAT rules pick, everything else as written.
                Ok(()) if ruleset.listing_by_behaviour() != fresh.listing_by_behaviour() => {
                    failures.push(format!(
                        "{pair}: full A + {sync} A -> B + housekeeping differs from full B:\n{}",
                        difference(
                            &ruleset.listing_by_behaviour(),
                            &fresh.listing_by_behaviour()
                        )
                    ))
                }
                Ok(()) => {}
            }
        }
    }
    failures
}

/// The lines only one of two listings has, marked `-` (partial) and `+` (full).
fn difference(partial: &str, full: &str) -> String {
    let p: BTreeSet<&str> = partial.lines().collect();
    let f: BTreeSet<&str> = full.lines().collect();
    let mut out: Vec<String> = p.difference(&f).map(|l| format!("  - {l}")).collect();
    out.extend(f.difference(&p).map(|l| format!("  + {l}")));
    out.join("\n")
}

/// Session affinity holds, not only its timeout: after the first connection of a probe that
/// wants affinity went one way (each way in turn) and its `update @set` was recorded, the
/// same client's next connection goes that way only (kube-proxy's `ip saddr @affinity-…`
/// check before the random pick).
#[test]
fn a_client_with_affinity_sticks_to_its_first_endpoint() {
    let mut checked = 0;
    for case in super::cases::all() {
        let Ok(ruleset) = NftablesRunner::new(&case).ruleset else {
            panic!("{}: the plan is refused", case.name);
        };
        for probe in &case.probes {
            let Outcome::Reach {
                affinity: Some(seconds),
                ..
            } = probe.want
            else {
                continue;
            };
            let first = trace_probe(&ruleset, probe);
            assert!(first.len() > 1, "{}: {probe:?}: one way only", case.name);
            for way in &first {
                let mut after = ruleset.clone();
                after.record(way);
                let next = trace_probe(&after, probe);
                assert_eq!(
                    trace::describe(&next),
                    trace::describe(&[trace::Outcome {
                        probability: 1.0,
                        ..way.clone()
                    }]),
                    "{}: {:?} -> {}:{}: after going to {:?}",
                    case.name,
                    probe.from,
                    probe.to,
                    probe.port,
                    way.dnat
                );
                assert_eq!(next[0].affinity, Some(seconds));
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "only {checked} ways checked");
}
