//! The eBPF plan's map entries, through an interpreter of the lookups the programs make
//! (`ebpf/bpf/lb.h`, `sock_lb.bpf.c`, `tc_lb.bpf.c`): the node's and pods' sockets go through
//! socket LB at connect time; what it leaves alone, and every packet from another machine,
//! through the tc program. Keep it in step with the C code: it is the C code's contract.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kpx_ebpf::layout::{
    self, Backend, ServiceKey, ServiceValue, SlotKey, SVC_F_DROP, SVC_F_INTERNAL, SVC_F_MASQUERADE,
    SVC_F_MASQ_PODS, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES,
};
use kpx_ebpf::plan::{plan, plan_keys, Op, Programmed, SourceRange, Wanted, WantedService};

use super::{endpoint_text, Case, From, Node, Outcome, Probe, Runner, Seen};
use crate::ebpf::wanted::{self, NodeConfigs};
use crate::model::frontend::NodeConfig;
use crate::model::Protocol;

pub struct EbpfRunner {
    wanted: Wanted,
    node: Node,
}

/// The frontend model's view of a case's node, as `EbpfConfig::node_configs` gives it.
fn node_configs(case: &Case) -> NodeConfigs {
    let of = |ipv6: bool| NodeConfig {
        cluster_cidr: case.node.parsed_cidr(ipv6),
        masquerade_all: case.node.masquerade_all,
        node_ips: Vec::new(),
    };
    [of(false), of(true)]
}

impl EbpfRunner {
    pub fn new(case: &Case) -> Self {
        Self {
            wanted: wanted::wanted(&case.state(), &node_configs(case)),
            node: case.node.clone(),
        }
    }

    /// `from_pod_network` in lb.h.
    fn in_pod_network(&self, ip: IpAddr) -> bool {
        self.node
            .parsed_cidr(ip.is_ipv6())
            .is_some_and(|(net, len)| crate::cidr::contains(net, len, &ip))
    }

    /// `lookup_service` in lb.h.
    fn lookup(&self, probe: &Probe, internal: bool) -> Option<&WantedService> {
        let proto = match probe.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => return None,
        };
        let key = ServiceKey::new(probe.to, probe.port, proto);
        let svc = match self.wanted.get(&key) {
            Some(svc) => svc,
            None => {
                // kpx_node_addrs: the addresses NodePorts answer on (backend.rs refresh_node).
                if !super::node_ips().contains(&probe.to)
                    || !wanted::answers_nodeports(&probe.to, &self.node.nodeport_cidrs())
                {
                    return None;
                }
                let any = if probe.to.is_ipv6() {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                };
                let svc = self.wanted.get(&ServiceKey::new(any, probe.port, proto))?;
                if svc.flags & SVC_F_NODEPORT == 0 {
                    return None;
                }
                svc
            }
        };
        if !internal || svc.flags & SVC_F_INTERNAL == 0 {
            return Some(svc);
        }
        let mut inner = ServiceKey::new(probe.to, probe.port, proto);
        if !self.wanted.contains_key(&inner) {
            inner.addr = [0; 16];
        }
        Some(self.wanted.get(&inner.internal()).unwrap_or(svc))
    }

    fn reach(svc: &WantedService, seen: Seen) -> Outcome {
        Outcome::Reach {
            endpoints: svc
                .backends
                .iter()
                .map(|b| endpoint_text(layout::ip(&b.addr, b.family), u16::from_be(b.port)))
                .collect(),
            seen,
            affinity: (svc.affinity_timeout != 0).then_some(svc.affinity_timeout),
        }
    }

    /// `source_admitted` in lb.h: the trie under the entry's id holds the entry's ranges.
    fn admitted(svc: &WantedService, src: IpAddr) -> bool {
        svc.flags & SVC_F_SOURCE_RANGES == 0 || svc.source_ranges.iter().any(|r| r.contains(src))
    }

    fn no_backends(svc: &WantedService) -> Outcome {
        if svc.flags & SVC_F_DROP != 0 {
            Outcome::Drop
        } else {
            Outcome::Reject
        }
    }

    /// `load_balance` in tc_lb.bpf.c, for a packet from `src`.
    fn tc(&self, probe: &Probe, src: IpAddr) -> Outcome {
        let pod = self.in_pod_network(src);
        let Some(svc) = self.lookup(probe, pod) else {
            return Outcome::NotAService;
        };
        // Every probe is a new connection: the ranges are asked before anything else.
        if !Self::admitted(svc, src) {
            return Outcome::Drop;
        }
        if svc.backends.is_empty() {
            return Self::no_backends(svc);
        }
        let masq_bit = if pod {
            SVC_F_MASQ_PODS
        } else {
            SVC_F_MASQUERADE
        };
        let hairpin = svc
            .backends
            .iter()
            .any(|b| layout::ip(&b.addr, b.family) == src);
        let seen = if svc.flags & masq_bit != 0 || hairpin {
            Seen::Node
        } else {
            Seen::Client
        };
        Self::reach(svc, seen)
    }

    /// `translate` in sock_lb.bpf.c, for a socket of the node (`node`) or of a pod.
    fn sock(&self, probe: &Probe, node: bool, pod_src: Option<IpAddr>) -> Outcome {
        let pods_known = self.node.parsed_cidr(probe.to.is_ipv6()).is_some();
        let Some(svc) = self.lookup(probe, node || pods_known) else {
            return Outcome::NotAService;
        };
        let to_tc = |this: &Self| match pod_src {
            Some(src) => this.tc(probe, src),
            None => Outcome::NotAService,
        };
        if svc.flags & SVC_F_SOURCE_RANGES != 0 {
            // A pod's packets are judged by tc; the node's socket by the address it sends
            // from: unbound, as every probe's is, the node's (kpx_config).
            if !node {
                return to_tc(self);
            }
            if !Self::admitted(svc, super::node_source(probe.to.is_ipv6())) {
                return Outcome::Drop;
            }
        }
        if !node && svc.flags & SVC_F_MASQ_PODS != 0 {
            return to_tc(self);
        }
        if svc.backends.is_empty() {
            if svc.flags & SVC_F_DROP != 0 && !node {
                return to_tc(self);
            }
            return Self::no_backends(svc);
        }
        Self::reach(svc, if node { Seen::Node } else { Seen::Client })
    }
}

impl Runner for EbpfRunner {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn outcome(&self, probe: &Probe) -> Outcome {
        match probe.from {
            // Pods sit in the node's cgroup: their sockets go through socket LB first.
            From::Pod(ip) => self.sock(probe, false, Some(super::ip(ip))),
            From::Node => self.sock(probe, true, None),
            From::RemotePod(ip) | From::Outside(ip) => self.tc(probe, super::ip(ip)),
        }
    }
}

/// The maps as a sequence of plan writes leaves them (what `apply` does to the kernel's).
#[derive(Default)]
struct Maps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<SlotKey, u32>,
    backends: BTreeMap<u32, Backend>,
    names: BTreeMap<u32, String>,
    ranges: BTreeSet<(u32, SourceRange)>,
}

impl Maps {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::PutSlot(k, id) => {
                self.slots.insert(*k, *id);
            }
            Op::PutRevNat(id, r) => {
                self.names.insert(*id, r.name());
            }
            Op::PutService(k, v) => {
                self.services.insert(*k, *v);
            }
            Op::DeleteService(k) => {
                self.services.remove(k);
            }
            Op::DeleteSlot(k) => {
                self.slots.remove(k);
            }
            Op::DeleteRevNat(id) => {
                self.names.remove(id);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(id);
            }
            Op::PutSourceRange(id, r) => {
                self.ranges.insert((*id, *r));
            }
            Op::DeleteSourceRange(id, r) => {
                self.ranges.remove(&(*id, *r));
            }
        }
    }

    /// The ranges the tries hold under `id`.
    fn ranges_of(&self, id: u32) -> BTreeSet<SourceRange> {
        self.ranges
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, r)| *r)
            .collect()
    }

    /// What the programs see, as the interpreter reads it; an entry whose slots or backends
    /// are not all in place is an error (a packet could pick a missing slot).
    fn wanted(&self) -> Result<Wanted, String> {
        self.services
            .iter()
            .map(|(key, value)| {
                let backends = (1..=u32::from(value.count))
                    .map(|slot| {
                        let id = self.slots.get(&SlotKey {
                            service_id: value.id,
                            slot,
                        });
                        id.and_then(|id| self.backends.get(id))
                            .copied()
                            .ok_or_else(|| {
                                format!(
                                    "{}: slot {slot} or its backend missing",
                                    wanted::describe(key)
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((
                    *key,
                    WantedService {
                        name: self.names.get(&value.id).cloned().unwrap_or_default(),
                        flags: value.flags,
                        affinity_timeout: value.affinity_timeout,
                        backends,
                        source_ranges: self.ranges_of(value.id),
                    },
                ))
            })
            .collect()
    }
}

/// A partial sync (the frontends the changes touch, `plan_keys`) or a full one (`plan`, from
/// what the maps hold), run as writes on the maps the full plan of case A left, for every pair
/// of cases (their Services share names, so B changes, adds and removes Service ports of A):
/// after every single write each entry's slots and backends are in place and a flagged
/// frontend's trie holds at least the ranges A and B both give it (and nothing neither gives
/// it); after the last, the maps answer every probe of B as the table wants, and hold what a
/// full plan of B would.
fn second_sync_of_every_pair(full: bool) -> Vec<String> {
    use crate::model::{ChangeTracker, ProxyState};
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
    let mut failures = Vec::new();
    let all = super::cases::all();
    for a in &all {
        for b in &all {
            let pair = format!("{:?} -> {:?}", a.name, b.name);
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
            let (state_b, changes) = tracker.snapshot(&state_a);
            // The node's configuration does not change between two syncs: B's for both.
            let nodes = node_configs(b);
            let mut table = wanted::WantedTable::full(&state_a, nodes.clone());
            let (first, mut programmed) = plan(&table.wanted, &Programmed::default());
            let mut maps = Maps::default();
            for op in &first {
                maps.apply(op);
            }
            let wanted_a = table.wanted.clone();
            let second = if full {
                table = wanted::WantedTable::full(&state_b, nodes.clone());
                let (ops, next) = plan(&table.wanted, &programmed);
                programmed = next;
                ops
            } else {
                let touched = table.update(&state_b, &changes);
                plan_keys(&table.wanted, &mut programmed, &touched)
            };
            let wanted_b = wanted::wanted(&state_b, &nodes);
            if table.wanted != wanted_b {
                failures.push(format!("{pair}: the table after the changes is not B's"));
                continue;
            }
            let mut broken = None;
            for (n, op) in second.iter().enumerate() {
                maps.apply(op);
                if let Err(e) = maps.wanted() {
                    broken = Some(format!("{pair}: after write {n} ({op:?}): {e}"));
                    break;
                }
                for (key, value) in &maps.services {
                    if value.flags & SVC_F_SOURCE_RANGES == 0 {
                        continue;
                    }
                    let held = maps.ranges_of(value.id);
                    // The ranges a state gives the frontend, when it flags it.
                    let given = |w: &Wanted| {
                        w.get(key)
                            .filter(|s| s.flags & SVC_F_SOURCE_RANGES != 0)
                            .map(|s| s.source_ranges.clone())
                    };
                    let (in_a, in_b) = (given(&wanted_a), given(&wanted_b));
                    // Flagged, it must hold what every state flagging it agrees on.
                    let must: Option<BTreeSet<SourceRange>> = match (&in_a, &in_b) {
                        (Some(x), Some(y)) => Some(x.intersection(y).copied().collect()),
                        (Some(x), None) | (None, Some(x)) => Some(x.clone()),
                        (None, None) => None,
                    };
                    let either: BTreeSet<SourceRange> =
                        in_a.iter().chain(in_b.iter()).flatten().copied().collect();
                    if !must.is_some_and(|m| held.is_superset(&m) && held.is_subset(&either)) {
                        broken = Some(format!(
                            "{pair}: after write {n} ({op:?}): {} holds ranges {held:?}",
                            wanted::describe(key)
                        ));
                    }
                }
                if broken.is_some() {
                    break;
                }
            }
            if let Some(b) = broken {
                failures.push(b);
                continue;
            }
            if programmed != plan(&wanted_b, &programmed).1 {
                failures.push(format!("{pair}: the bookkeeping is not a full plan's of B"));
            }
            let held = match maps.wanted() {
                Ok(w) => w,
                Err(e) => {
                    failures.push(format!("{pair}: {e}"));
                    continue;
                }
            };
            // Names aside (the maps keep them per id), the maps hold B's frontends.
            let unnamed = |w: &Wanted| -> Wanted {
                w.iter()
                    .map(|(k, v)| {
                        let mut v = v.clone();
                        v.name.clear();
                        (*k, v)
                    })
                    .collect()
            };
            if unnamed(&held) != unnamed(&wanted_b) {
                failures.push(format!("{pair}: the maps do not hold B's frontends"));
            }
            let leftover: Vec<_> = maps
                .ranges
                .iter()
                .filter(|(id, _)| !maps.services.values().any(|v| v.id == *id))
                .collect();
            if !leftover.is_empty() {
                failures.push(format!("{pair}: ranges of no frontend: {leftover:?}"));
            }
            let runner = EbpfRunner {
                wanted: held,
                node: b.node.clone(),
            };
            for probe in &b.probes {
                let got = runner.outcome(probe);
                if !super::satisfies(&got, &probe.want) {
                    failures.push(format!(
                        "{pair}: {:?} -> {}:{}/{}: got {got}, want {}",
                        probe.from, probe.to, probe.port, probe.protocol, probe.want
                    ));
                }
            }
        }
    }
    failures
}

#[test]
fn a_partial_sync_on_the_maps_of_a_full_plan_leaves_the_full_plan_of_the_new_state() {
    let failures = second_sync_of_every_pair(false);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_full_sync_on_the_maps_of_a_full_plan_leaves_the_full_plan_of_the_new_state() {
    let failures = second_sync_of_every_pair(true);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The pair walk is not a check that cannot fail: writes in the wrong order, or a lost write,
/// are caught.
#[test]
fn a_plan_writing_ranges_after_the_entry_or_losing_one_fails() {
    let case = super::cases::all()
        .into_iter()
        .find(|c| c.name.starts_with("loadBalancerSourceRanges:"))
        .expect("the source-ranges case");
    let wanted_b = wanted::wanted(&case.state(), &node_configs(&case));
    let (ops, _) = plan(&wanted_b, &Programmed::default());
    let first_range = ops
        .iter()
        .position(|o| matches!(o, Op::PutSourceRange(..)))
        .expect("ranges written");
    let entry = ops
        .iter()
        .position(|o| matches!(o, Op::PutService(_, v) if v.flags & SVC_F_SOURCE_RANGES != 0))
        .expect("a flagged entry");
    assert!(first_range < entry, "{ops:?}");
    // Without the range writes, the maps drop what the table wants reached.
    let mut maps = Maps::default();
    for op in ops.iter().filter(|o| !matches!(o, Op::PutSourceRange(..))) {
        maps.apply(op);
    }
    let runner = EbpfRunner {
        wanted: maps.wanted().expect("slots in place"),
        node: case.node.clone(),
    };
    assert!(case
        .probes
        .iter()
        .any(|p| !super::satisfies(&runner.outcome(p), &p.want)));
}
