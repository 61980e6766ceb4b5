//! The IPVS plan, traced: each family's plan (virtual servers, set members, the iptables part)
//! and a probe's first packet through the hooks and IPVS's lookups (`ipvs/trace.rs`).

use super::{node_ips, node_source, Case, From, Outcome, Probe, Runner, Seen};
use crate::ipvs::plan::{MarkAllocator, Plan, PlanConfig};
use crate::ipvs::rules;
use crate::ipvs::trace::{self, Packet, Path, Tables, Verdict};

pub fn config(case: &Case, ipv6: bool) -> PlanConfig {
    PlanConfig {
        ipv6,
        cluster_cidr: case.node.cidr(ipv6).map(str::to_string),
        masquerade_all: case.node.masquerade_all,
        nodeport_addresses: case.node.nodeport_addresses_of(ipv6),
        ..PlanConfig::default()
    }
}

struct Family {
    cfg: PlanConfig,
    plan: Plan,
    tables: Result<Tables, String>,
}

pub struct IpvsRunner {
    families: [Family; 2],
}

impl IpvsRunner {
    pub fn new(case: &Case) -> Self {
        Self::edited(case, |t| t)
    }

    fn edited(case: &Case, edit: impl Fn(String) -> String) -> Self {
        let state = case.state();
        let family = |ipv6: bool| {
            let cfg = config(case, ipv6);
            let plan = Plan::of(&cfg, &state, &node_ips(), &mut MarkAllocator::default());
            let text = edit(rules::text(&cfg, &plan.rules(), &[], &[]));
            Family {
                tables: Tables::parse(&text),
                cfg,
                plan,
            }
        };
        Self {
            families: [family(false), family(true)],
        }
    }
}

impl Runner for IpvsRunner {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn outcome(&self, probe: &Probe) -> Outcome {
        let ipv6 = probe.to.is_ipv6();
        let f = &self.families[usize::from(ipv6)];
        let tables = match &f.tables {
            Ok(t) => t,
            Err(e) => return odd(format!("<the plan is unreadable: {e}>")),
        };
        let local = node_ips();
        let (src, path) = match probe.from {
            From::Pod(ip) | From::RemotePod(ip) | From::Outside(ip) => {
                (super::ip(ip), Path::Arriving)
            }
            From::Node => (node_source(ipv6), Path::Node),
        };
        let packet = Packet {
            src,
            dst: probe.to,
            protocol: probe.protocol,
            dport: probe.port,
            local: &local,
        };
        match trace::trace(&f.cfg, &f.plan, tables, &packet, path) {
            Verdict::Balanced {
                endpoints,
                masquerade,
                persistence,
            } => Outcome::Reach {
                endpoints,
                seen: if masquerade { Seen::Node } else { Seen::Client },
                affinity: persistence,
            },
            Verdict::Reject => Outcome::Reject,
            Verdict::Drop => Outcome::Drop,
            // Another port of a Service address is no Service; IPVS mode refuses it (the
            // address is local to the node, kube-proxy's KUBE-IPVS-FILTER) where the other
            // backends let it through: both are "not a Service" to the table.
            Verdict::Passed | Verdict::Refused => Outcome::NotAService,
            Verdict::Error(e) => odd(format!("<{e}>")),
        }
    }
}

fn odd(why: String) -> Outcome {
    Outcome::Reach {
        endpoints: [why].into(),
        seen: Seen::Client,
        affinity: None,
    }
}

/// The runner can fail: plans without the masquerade or the reject give mismatches.
#[test]
fn a_broken_plan_fails_the_table() {
    for (what, edit) in [
        (
            "no masquerade",
            (|t: String| t.replace("-j MARK --or-mark 0x4000", "-j RETURN"))
                as fn(String) -> String,
        ),
        ("no reject", |t: String| {
            t.replace("dst,dst -j REJECT", "dst,dst -j RETURN")
        }),
        ("Services refused by the address filter", |t: String| {
            t.replace(
                "KPXV-FRONTENDS dst,dst -j RETURN",
                "KPXV-DROP dst,dst -j RETURN",
            )
        }),
        ("no firewall marks", |t: String| {
            t.replace("-j MARK --set-xmark", "-j RETURN --set-xmark")
        }),
    ] {
        let failures = super::run(|case| Box::new(IpvsRunner::edited(case, edit)));
        assert!(!failures.is_empty(), "{what}: the table still passes");
    }
}
