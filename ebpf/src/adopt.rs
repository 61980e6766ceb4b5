//! Reading back what the pinned maps hold, so a restarted proxy continues from there: its
//! first plan writes only the difference, and traffic using the entries never sees a flush.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData};
use aya::Ebpf;

use crate::apply::ApplyError;
use crate::layout::{Backend, ServiceKey, ServiceValue, SlotKey};
use crate::plan::{BackendIdentity, Programmed};

fn read<K: aya::Pod + Ord, V: aya::Pod>(
    ebpf: &Ebpf,
    map: &'static str,
) -> Result<BTreeMap<K, V>, ApplyError> {
    let handle = ebpf.map(map).ok_or(ApplyError::Missing(map))?;
    let hash: HashMap<&MapData, K, V> =
        HashMap::try_from(handle).map_err(|source| ApplyError::Map { map, source })?;
    hash.iter()
        .map(|entry| entry.map_err(|source| ApplyError::Map { map, source }))
        .collect()
}

/// The Services, slots and backends in the maps, as the plan describes them. Slots past a
/// Service's count (left by an interrupted shrink) are kept, so the next plan deletes them;
/// so are backends no slot uses.
pub fn programmed(ebpf: &Ebpf) -> Result<Programmed, ApplyError> {
    let services: BTreeMap<ServiceKey, ServiceValue> = read(ebpf, "kpx_services")?;
    let slots: BTreeMap<SlotKey, u32> = read(ebpf, "kpx_slots")?;
    let backends: BTreeMap<u32, Backend> = read(ebpf, "kpx_backends")?;
    let mut by_service: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (slot, backend) in &slots {
        by_service
            .entry(slot.service_id)
            .or_default()
            .insert(slot.slot, *backend);
    }
    let mut out = Programmed::default();
    for (key, value) in services {
        let found = by_service.remove(&value.id).unwrap_or_default();
        let last = found
            .keys()
            .copied()
            .max()
            .unwrap_or(0)
            .max(u32::from(value.count));
        // A hole (a slot never written) reads as backend 0, which no backend has: the next
        // plan rewrites it.
        let ids = (1..=last)
            .map(|s| found.get(&s).copied().unwrap_or(0))
            .collect();
        out.services.insert(key, (value, ids));
    }
    for (id, backend) in backends {
        out.backend_ids.insert(BackendIdentity::from(&backend), id);
    }
    out.recount();
    Ok(out)
}
