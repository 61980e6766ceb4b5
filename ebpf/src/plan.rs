//! The map plan: from the Services wanted and what the maps hold, the ordered map writes that
//! get there (pure; `apply` performs them). The order is what keeps every packet's view whole:
//!
//! - a backend is written before any slot points at it, and deleted only after none does;
//! - a Service's slots are written before its entry, whose `count` makes them reachable; when
//!   it shrinks, the smaller count comes first and the slots beyond it go after;
//! - a Service's entry is deleted before its slots and its reverse-NAT entry;
//! - source ranges (`SVC_F_SOURCE_RANGES`) a frontend gains are written before its entry, those
//!   it loses deleted after it: while they change, a new connection meets the union of the old
//!   and new ranges, never a frontend flagged without the ranges it is being given.
//!
//! Backends are shared: the same address and port is one backend id whatever the Services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::layout::{
    address, ip, name_bytes, Backend, RevNat, ServiceKey, ServiceValue, SlotKey, FAMILY_V4,
};

/// A network a frontend admits new connections from (`kpx_src_range4`/`kpx_src_range6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    /// The network, host bits zero (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    pub family: u8,
    /// At most 32 (IPv4) or 128.
    pub prefix: u8,
}

impl SourceRange {
    /// The network `ip/prefix`, host bits cleared and the prefix capped at the family's width.
    pub fn new(ip: IpAddr, prefix: u8) -> Self {
        let (mut addr, family) = address(ip);
        let width = if family == FAMILY_V4 { 32 } else { 128 };
        let prefix = prefix.min(width);
        for (i, byte) in addr.iter_mut().enumerate() {
            let kept = u32::from(prefix).saturating_sub(8 * i as u32).min(8);
            *byte &= if kept == 0 { 0 } else { 0xffu8 << (8 - kept) };
        }
        Self {
            addr,
            family,
            prefix,
        }
    }

    /// Whether `source` lies in this network (what the trie lookup answers).
    pub fn contains(&self, source: IpAddr) -> bool {
        let candidate = Self::new(source, self.prefix);
        candidate.family == self.family && candidate.addr == self.addr
    }

    pub fn ip(&self) -> IpAddr {
        ip(&self.addr, self.family)
    }
}

/// One frontend as wanted: its flags, affinity and backends (in slot order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WantedService {
    /// The Service port this frontend belongs to (kept in `kpx_rev_nat` for `dump`).
    pub name: String,
    pub flags: u16,
    pub affinity_timeout: u32,
    pub backends: Vec<Backend>,
    /// With `SVC_F_SOURCE_RANGES`: the networks new connections may come from (empty: none).
    pub source_ranges: BTreeSet<SourceRange>,
}

pub type Wanted = BTreeMap<ServiceKey, WantedService>;

/// What the maps hold, as the last applied plan left them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<ServiceKey, (ServiceValue, Vec<u32>)>,
    pub backend_ids: BTreeMap<BackendIdentity, u32>,
    /// Each backend id's identity, and how many slots point at it.
    pub backends: BTreeMap<u32, (BackendIdentity, u32)>,
    /// The source ranges in the tries, by service id.
    pub source_ranges: BTreeMap<u32, BTreeSet<SourceRange>>,
    /// Ids freed by earlier plans (reused lowest first), and the next never-used ones.
    pub free_backend_ids: BTreeSet<u32>,
    pub next_backend_id: u32,
    pub free_service_ids: BTreeSet<u32>,
    pub next_service_id: u32,
}

impl Programmed {
    /// Rebuilds the bookkeeping (references, free ids) from `services` and `backend_ids`, as
    /// read back from the maps.
    pub fn recount(&mut self) {
        self.backends = self
            .backend_ids
            .iter()
            .map(|(identity, id)| (*id, (*identity, 0)))
            .collect();
        for (_, slots) in self.services.values() {
            for id in slots {
                if let Some((_, refs)) = self.backends.get_mut(id) {
                    *refs += 1;
                }
            }
        }
        let (free, next) = holes(self.backends.keys().copied());
        self.free_backend_ids = free;
        self.next_backend_id = next;
        let (free, next) = holes(self.services.values().map(|(v, _)| v.id));
        self.free_service_ids = free;
        self.next_service_id = next;
    }

    fn take_backend_id(&mut self) -> u32 {
        take(&mut self.free_backend_ids, &mut self.next_backend_id)
    }

    fn take_service_id(&mut self) -> u32 {
        take(&mut self.free_service_ids, &mut self.next_service_id)
    }
}

/// The ids below the largest in use that are free, and the id after the largest.
fn holes(used: impl Iterator<Item = u32>) -> (BTreeSet<u32>, u32) {
    let used: BTreeSet<u32> = used.collect();
    let next = used.last().map_or(1, |max| max + 1);
    ((1..next).filter(|id| !used.contains(id)).collect(), next)
}

fn take(free: &mut BTreeSet<u32>, next: &mut u32) -> u32 {
    if let Some(id) = free.pop_first() {
        return id;
    }
    *next = (*next).max(1);
    let id = *next;
    *next += 1;
    id
}

/// A backend's identity for sharing ids (the map value without its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendIdentity {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
}

impl From<&Backend> for BackendIdentity {
    fn from(b: &Backend) -> Self {
        Self {
            addr: b.addr,
            port: b.port,
            family: b.family,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutRevNat(u32, RevNat),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    DeleteSlot(SlotKey),
    DeleteRevNat(u32),
    DeleteBackend(u32),
    PutSourceRange(u32, SourceRange),
    DeleteSourceRange(u32, SourceRange),
}

fn slot(service_id: u32, slot: u32) -> SlotKey {
    SlotKey { service_id, slot }
}

/// The writes from `programmed` to `wanted`, and what the maps hold after them. Backends no
/// slot uses (left by an interrupted apply) are deleted too.
pub fn plan(wanted: &Wanted, programmed: &Programmed) -> (Vec<Op>, Programmed) {
    let mut next = programmed.clone();
    let keys: BTreeSet<ServiceKey> = wanted
        .keys()
        .chain(programmed.services.keys())
        .copied()
        .collect();
    let mut ops = plan_keys(wanted, &mut next, &keys);
    let orphans: Vec<u32> = next
        .backends
        .iter()
        .filter(|(_, (_, refs))| *refs == 0)
        .map(|(id, _)| *id)
        .collect();
    for id in orphans {
        forget_backend(&mut next, id);
        next.free_backend_ids.insert(id);
        ops.push(Op::DeleteBackend(id));
    }
    // Ranges of ids no frontend has (left by an interrupted delete).
    let ids: BTreeSet<u32> = next.services.values().map(|(v, _)| v.id).collect();
    let stale: Vec<u32> = next
        .source_ranges
        .keys()
        .filter(|id| !ids.contains(id))
        .copied()
        .collect();
    for id in stale {
        for range in next.source_ranges.remove(&id).unwrap_or_default() {
            ops.push(Op::DeleteSourceRange(id, range));
        }
    }
    (ops, next)
}

fn forget_backend(p: &mut Programmed, id: u32) {
    if let Some((identity, _)) = p.backends.remove(&id) {
        p.backend_ids.remove(&identity);
    }
}

/// The writes for the frontends `keys` only (a partial sync: its cost follows the change, not
/// the table), updating `programmed` to what the maps hold after them.
pub fn plan_keys(wanted: &Wanted, p: &mut Programmed, keys: &BTreeSet<ServiceKey>) -> Vec<Op> {
    let mut first = Vec::new(); // new backends
    let mut middle = Vec::new(); // per-Service writes
    let mut last = Vec::new(); // backends no longer used
    let mut unreferenced = BTreeSet::new();
    let mut freed_services = Vec::new();
    for key in keys {
        let old = p.services.get(key).cloned();
        let Some(w) = wanted.get(key) else {
            if let Some((value, slots)) = old {
                middle.push(Op::DeleteService(*key));
                for s in 1..=slots.len() as u32 {
                    middle.push(Op::DeleteSlot(slot(value.id, s)));
                }
                middle.push(Op::DeleteRevNat(value.id));
                for range in p.source_ranges.remove(&value.id).unwrap_or_default() {
                    middle.push(Op::DeleteSourceRange(value.id, range));
                }
                for id in slots {
                    unref(p, id, &mut unreferenced);
                }
                p.services.remove(key);
                freed_services.push(value.id);
            }
            continue;
        };
        let mut ids = Vec::with_capacity(w.backends.len());
        for b in &w.backends {
            let identity = BackendIdentity::from(b);
            let id = match p.backend_ids.get(&identity) {
                Some(id) => *id,
                None => {
                    let id = p.take_backend_id();
                    p.backend_ids.insert(identity, id);
                    p.backends.insert(id, (identity, 0));
                    first.push(Op::PutBackend(id, *b));
                    id
                }
            };
            if let Some((_, refs)) = p.backends.get_mut(&id) {
                *refs += 1;
            }
            ids.push(id);
        }
        let id = match &old {
            Some((value, _)) => value.id,
            None => p.take_service_id(),
        };
        let value = ServiceValue {
            id,
            count: ids.len() as u16,
            flags: w.flags,
            affinity_timeout: w.affinity_timeout,
        };
        let old_slots: Vec<u32> = old.as_ref().map_or(Vec::new(), |(_, s)| s.clone());
        let changed_slots = ids
            .iter()
            .enumerate()
            .filter(|(i, bid)| old_slots.get(*i) != Some(bid))
            .map(|(i, bid)| Op::PutSlot(slot(id, i as u32 + 1), *bid));
        // Diffed against what the tries hold under this id, even for a new frontend: an id
        // freed by an interrupted delete may still have ranges.
        let held = p.source_ranges.remove(&id).unwrap_or_default();
        let gained = w
            .source_ranges
            .difference(&held)
            .map(|r| Op::PutSourceRange(id, *r));
        let lost: Vec<Op> = held
            .difference(&w.source_ranges)
            .map(|r| Op::DeleteSourceRange(id, *r))
            .collect();
        if !w.source_ranges.is_empty() {
            p.source_ranges.insert(id, w.source_ranges.clone());
        }
        match &old {
            None => {
                // Not reachable yet: stale ranges go first.
                middle.extend(lost);
                middle.extend(gained);
                middle.extend(changed_slots);
                middle.push(Op::PutRevNat(
                    id,
                    RevNat {
                        addr: key.addr,
                        port: key.port,
                        family: key.family,
                        pad: 0,
                        name: name_bytes(&w.name),
                    },
                ));
                middle.push(Op::PutService(*key, value));
            }
            Some(_) if ids.len() < old_slots.len() => {
                middle.extend(gained);
                middle.push(Op::PutService(*key, value));
                middle.extend(changed_slots);
                for s in ids.len() + 1..=old_slots.len() {
                    middle.push(Op::DeleteSlot(slot(id, s as u32)));
                }
                middle.extend(lost);
            }
            Some((old_value, _)) => {
                middle.extend(changed_slots);
                middle.extend(gained);
                if *old_value != value {
                    middle.push(Op::PutService(*key, value));
                }
                middle.extend(lost);
            }
        }
        for b in old_slots {
            unref(p, b, &mut unreferenced);
        }
        p.services.insert(*key, (value, ids));
    }
    for id in unreferenced {
        if p.backends.get(&id).is_some_and(|(_, refs)| *refs == 0) {
            forget_backend(p, id);
            p.free_backend_ids.insert(id);
            last.push(Op::DeleteBackend(id));
        }
    }
    p.free_service_ids.extend(freed_services);
    first.extend(middle);
    first.extend(last);
    first
}

fn unref(p: &mut Programmed, id: u32, unreferenced: &mut BTreeSet<u32>) {
    if let Some((_, refs)) = p.backends.get_mut(&id) {
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            unreferenced.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(last: u8) -> ServiceKey {
        ServiceKey::new([198, 18, 128, last].into(), 80, 6)
    }

    fn backend(last: u8) -> Backend {
        Backend::new([198, 19, 1, last].into(), 8080)
    }

    fn wanted(entries: &[(u8, &[u8])]) -> Wanted {
        entries
            .iter()
            .map(|(f, bs)| {
                (
                    frontend(*f),
                    WantedService {
                        backends: bs.iter().map(|b| backend(*b)).collect(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// Ops as short text: `+b1 +s1/1 +r1 +S1(n=1)` and so on.
    fn text(ops: &[Op]) -> String {
        ops.iter()
            .map(|op| match op {
                Op::PutBackend(id, _) => format!("+b{id}"),
                Op::PutSlot(k, b) => format!("+s{}/{}=b{b}", k.service_id, k.slot),
                Op::PutRevNat(id, _) => format!("+r{id}"),
                Op::PutService(_, v) => format!("+S{}(n={})", v.id, v.count),
                Op::DeleteService(k) => format!("-S.{}", k.addr[3]),
                Op::DeleteSlot(k) => format!("-s{}/{}", k.service_id, k.slot),
                Op::DeleteRevNat(id) => format!("-r{id}"),
                Op::DeleteBackend(id) => format!("-b{id}"),
                Op::PutSourceRange(id, r) => format!("+R{id}:{}/{}", r.ip(), r.prefix),
                Op::DeleteSourceRange(id, r) => format!("-R{id}:{}/{}", r.ip(), r.prefix),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_new_service_is_reachable_only_once_its_backends_and_slots_are_in() {
        let (ops, state) = plan(&wanted(&[(9, &[10, 11])]), &Programmed::default());
        assert_eq!(text(&ops), "+b1 +b2 +s1/1=b1 +s1/2=b2 +r1 +S1(n=2)");
        // Nothing changed: nothing written.
        let (again, same) = plan(&wanted(&[(9, &[10, 11])]), &state);
        assert!(again.is_empty(), "{}", text(&again));
        assert_eq!(same, state);
    }

    #[test]
    fn growing_writes_the_slot_before_the_count_and_shrinking_the_count_first() {
        let (_, one) = plan(&wanted(&[(9, &[10])]), &Programmed::default());
        let (ops, two) = plan(&wanted(&[(9, &[10, 11])]), &one);
        assert_eq!(text(&ops), "+b2 +s1/2=b2 +S1(n=2)");
        let (ops, _) = plan(&wanted(&[(9, &[11])]), &two);
        assert_eq!(text(&ops), "+S1(n=1) +s1/1=b2 -s1/2 -b1");
    }

    #[test]
    fn backends_are_shared_and_deleted_last_and_a_removed_service_goes_entry_first() {
        let (_, both) = plan(
            &wanted(&[(9, &[10, 11]), (8, &[11])]),
            &Programmed::default(),
        );
        assert_eq!(both.backend_ids.len(), 2);
        let (ops, after) = plan(&wanted(&[(8, &[11])]), &both);
        let service_9 = both.services[&frontend(9)].0.id;
        let backend_10 = both.backend_ids[&BackendIdentity::from(&backend(10))];
        assert_eq!(
            text(&ops),
            format!("-S.9 -s{service_9}/1 -s{service_9}/2 -r{service_9} -b{backend_10}")
        );
        assert_eq!(after.backend_ids.len(), 1);
        // A new Service takes the lowest free id again.
        let (ops, _) = plan(&wanted(&[(8, &[11]), (7, &[])]), &after);
        assert_eq!(text(&ops), format!("+r{service_9} +S{service_9}(n=0)"));
    }

    #[test]
    fn a_replaced_backend_never_takes_the_id_being_deleted() {
        let (_, one) = plan(&wanted(&[(9, &[10])]), &Programmed::default());
        let (ops, two) = plan(&wanted(&[(9, &[11])]), &one);
        assert_eq!(text(&ops), "+b2 +s1/1=b2 -b1");
        // And the freed id is available to the next plan.
        let (ops, _) = plan(&wanted(&[(9, &[11, 12])]), &two);
        assert_eq!(text(&ops), "+b1 +s1/2=b1 +S1(n=2)");
    }

    #[test]
    fn a_partial_plan_writes_what_the_full_plan_writes_for_that_frontend() {
        let (_, before) = plan(
            &wanted(&[(9, &[10, 11]), (8, &[11, 12])]),
            &Programmed::default(),
        );
        let after = wanted(&[(9, &[10, 13]), (8, &[11, 12])]);
        let (full_ops, full_state) = plan(&after, &before);
        let mut partial_state = before.clone();
        let keys = [frontend(9)].into();
        let partial_ops = plan_keys(&after, &mut partial_state, &keys);
        assert_eq!(text(&partial_ops), text(&full_ops));
        // Backend 11 stays: the other Service still uses it.
        assert_eq!(text(&partial_ops), "+b4 +s2/2=b4");
        assert_eq!(partial_state, full_state);
    }

    #[test]
    fn affinity_and_flag_changes_rewrite_only_the_entry() {
        let (_, state) = plan(&wanted(&[(9, &[10])]), &Programmed::default());
        let mut w = wanted(&[(9, &[10])]);
        w.get_mut(&frontend(9)).expect("present").affinity_timeout = 10800;
        let (ops, _) = plan(&w, &state);
        assert_eq!(text(&ops), "+S1(n=1)");
    }

    /// A frontend's last octet, its backends' and its source networks.
    type Ranged<'a> = (u8, &'a [u8], &'a [(&'a str, u8)]);

    fn ranged(entries: &[Ranged<'_>]) -> Wanted {
        let mut w = wanted(&entries.iter().map(|(f, b, _)| (*f, *b)).collect::<Vec<_>>());
        for (f, _, nets) in entries {
            let e = w.get_mut(&frontend(*f)).expect("present");
            e.flags |= crate::layout::SVC_F_SOURCE_RANGES;
            e.source_ranges = nets
                .iter()
                .map(|(n, len)| SourceRange::new(n.parse().expect("ip"), *len))
                .collect();
        }
        w
    }

    #[test]
    fn a_source_range_is_the_network_with_its_host_bits_cleared() {
        let r = SourceRange::new("198.19.255.77".parse().expect("ip"), 20);
        assert_eq!((r.ip().to_string(), r.prefix), ("198.19.240.0".into(), 20));
        assert!(r.contains("198.19.255.1".parse().expect("ip")));
        assert!(!r.contains("198.19.224.1".parse().expect("ip")));
        assert!(!r.contains("2001:2::1".parse().expect("ip")));
        let all = SourceRange::new("2001:db8::1".parse().expect("ip"), 200);
        assert_eq!(all.prefix, 128);
        let none = SourceRange::new("10.1.2.3".parse().expect("ip"), 0);
        assert_eq!((none.addr, none.prefix), ([0; 16], 0));
        assert!(none.contains("198.19.0.1".parse().expect("ip")));
    }

    #[test]
    fn ranges_gained_go_before_the_entry_and_ranges_lost_after_it() {
        let (ops, one) = plan(
            &ranged(&[(9, &[10], &[("198.19.255.0", 24)])]),
            &Programmed::default(),
        );
        assert_eq!(text(&ops), "+b1 +R1:198.19.255.0/24 +s1/1=b1 +r1 +S1(n=1)");
        // The ranges change: the union holds while they do; the entry is unchanged.
        let (ops, two) = plan(&ranged(&[(9, &[10], &[("198.19.254.0", 24)])]), &one);
        assert_eq!(text(&ops), "+R1:198.19.254.0/24 -R1:198.19.255.0/24");
        // Unflagged: the entry first, then its ranges go.
        let (ops, three) = plan(&wanted(&[(9, &[10])]), &two);
        assert_eq!(text(&ops), "+S1(n=1) -R1:198.19.254.0/24");
        assert!(three.source_ranges.is_empty());
        // Flagged again while shrinking: ranges before the entry, slots after it.
        let (_, four) = plan(&wanted(&[(9, &[10, 11])]), &three);
        let (ops, _) = plan(&ranged(&[(9, &[11], &[("198.19.253.0", 24)])]), &four);
        assert_eq!(
            text(&ops),
            "+R1:198.19.253.0/24 +S1(n=1) +s1/1=b2 -s1/2 -b1"
        );
    }

    #[test]
    fn a_removed_frontend_takes_its_ranges_and_stale_ranges_are_cleared() {
        let (_, state) = plan(
            &ranged(&[
                (9, &[10], &[("198.19.255.0", 24)]),
                (8, &[10], &[("198.19.254.0", 24)]),
            ]),
            &Programmed::default(),
        );
        let id_9 = state.services[&frontend(9)].0.id;
        let (ops, after) = plan(&ranged(&[(8, &[10], &[("198.19.254.0", 24)])]), &state);
        assert_eq!(
            text(&ops),
            format!("-S.9 -s{id_9}/1 -r{id_9} -R{id_9}:198.19.255.0/24")
        );
        assert_eq!(after.source_ranges.len(), 1);
        // Ranges under an id no frontend has (an interrupted delete, read back) go with the
        // next full plan; a new frontend that takes such an id sheds them before its entry.
        let mut adopted = after.clone();
        adopted.source_ranges.insert(
            7,
            [SourceRange::new("10.0.0.0".parse().expect("ip"), 8)].into(),
        );
        adopted.recount();
        let (ops, _) = plan(&ranged(&[(8, &[10], &[("198.19.254.0", 24)])]), &adopted);
        assert_eq!(text(&ops), "-R7:10.0.0.0/8");
        let mut reused = after;
        reused.source_ranges.insert(
            id_9,
            [SourceRange::new("10.0.0.0".parse().expect("ip"), 8)].into(),
        );
        let (ops, _) = plan(
            &ranged(&[
                (8, &[10], &[("198.19.254.0", 24)]),
                (7, &[], &[("198.19.253.0", 24)]),
            ]),
            &reused,
        );
        assert_eq!(
            text(&ops),
            format!("-R{id_9}:10.0.0.0/8 +R{id_9}:198.19.253.0/24 +r{id_9} +S{id_9}(n=0)")
        );
    }

    #[test]
    fn a_partial_plan_writes_the_ranges_a_full_plan_writes() {
        let before_w = ranged(&[
            (9, &[10], &[("198.19.255.0", 24)]),
            (8, &[11], &[("198.19.254.0", 24)]),
        ]);
        let (_, before) = plan(&before_w, &Programmed::default());
        let after = ranged(&[
            (9, &[10], &[("198.19.253.0", 24), ("198.19.255.0", 25)]),
            (8, &[11], &[("198.19.254.0", 24)]),
        ]);
        let (full_ops, full_state) = plan(&after, &before);
        let mut partial_state = before.clone();
        let partial_ops = plan_keys(&after, &mut partial_state, &[frontend(9)].into());
        assert_eq!(text(&partial_ops), text(&full_ops));
        assert_eq!(partial_state, full_state);
    }
}
