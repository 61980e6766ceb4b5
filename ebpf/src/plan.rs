//! The map plan: from the Services wanted and what the maps hold, the ordered map writes that
//! get there (pure; `apply` performs them). The order is what keeps every packet's view whole:
//!
//! - a backend is written before any slot points at it, and deleted only after none does;
//! - a Service's slots are written before its entry, whose `count` makes them reachable; when
//!   it shrinks, the smaller count comes first and the slots beyond it go after;
//! - a Service's entry is deleted before its slots and its reverse-NAT entry.
//!
//! Backends are shared: the same address and port is one backend id whatever the Services.

use std::collections::{BTreeMap, BTreeSet};

use crate::layout::{name_bytes, Backend, RevNat, ServiceKey, ServiceValue, SlotKey};

/// One frontend as wanted: its flags, affinity and backends (in slot order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WantedService {
    /// The Service port this frontend belongs to (kept in `kpx_rev_nat` for `dump`).
    pub name: String,
    pub flags: u16,
    pub affinity_timeout: u32,
    pub backends: Vec<Backend>,
}

pub type Wanted = BTreeMap<ServiceKey, WantedService>;

/// What the maps hold, as the last applied plan left them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<ServiceKey, (ServiceValue, Vec<u32>)>,
    pub backend_ids: BTreeMap<BackendIdentity, u32>,
    /// Each backend id's identity, and how many slots point at it.
    pub backends: BTreeMap<u32, (BackendIdentity, u32)>,
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
        match &old {
            None => {
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
                middle.push(Op::PutService(*key, value));
                middle.extend(changed_slots);
                for s in ids.len() + 1..=old_slots.len() {
                    middle.push(Op::DeleteSlot(slot(id, s as u32)));
                }
            }
            Some((old_value, _)) => {
                middle.extend(changed_slots);
                if *old_value != value {
                    middle.push(Op::PutService(*key, value));
                }
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
}
