//! Reading back what the pinned maps hold, so a restarted proxy continues from there: its
//! first plan writes only the difference, and traffic using the entries never sees a flush.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData};
use aya::Ebpf;

use crate::apply::{ApplyError, SRC_RANGE4, SRC_RANGE6};
use crate::layout::{
    Backend, ServiceKey, ServiceValue, SlotKey, SrcRange4, SrcRange6, FAMILY_V4, FAMILY_V6,
    SRC_RANGE_ID_BITS,
};
use crate::plan::{BackendIdentity, Programmed, SourceRange};

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

/// The keys of a source-range trie, as (service id, range).
fn read_trie<K: aya::Pod>(
    ebpf: &Ebpf,
    map: &'static str,
    unpack: impl Fn(&K) -> (u32, [u8; 16]),
    family: u8,
) -> Result<Vec<(u32, SourceRange)>, ApplyError> {
    let handle = ebpf.map(map).ok_or(ApplyError::Missing(map))?;
    let trie: LpmTrie<&MapData, K, u8> =
        LpmTrie::try_from(handle).map_err(|source| ApplyError::Map { map, source })?;
    trie.keys()
        .map(|key| {
            let key: Key<K> = key.map_err(|source| ApplyError::Map { map, source })?;
            let (id, addr) = unpack(&key.data());
            // A prefix shorter than the id (no writer of kpx's makes one) reads as /0, which
            // the next plan replaces by what is wanted.
            let prefix = key.prefix_len().saturating_sub(SRC_RANGE_ID_BITS);
            let prefix = u8::try_from(prefix).unwrap_or(u8::MAX);
            Ok((
                id,
                SourceRange {
                    addr,
                    family,
                    prefix,
                },
            ))
        })
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
    out.source_ranges = source_ranges(ebpf)?;
    out.recount();
    Ok(out)
}

/// The source ranges in the tries, by service id.
pub fn source_ranges(ebpf: &Ebpf) -> Result<BTreeMap<u32, BTreeSet<SourceRange>>, ApplyError> {
    let v4 = read_trie(
        ebpf,
        SRC_RANGE4,
        |k: &SrcRange4| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&k.addr);
            (k.service_id, addr)
        },
        FAMILY_V4,
    )?;
    let v6 = read_trie(
        ebpf,
        SRC_RANGE6,
        |k: &SrcRange6| (k.service_id, k.addr),
        FAMILY_V6,
    )?;
    let mut out: BTreeMap<u32, BTreeSet<SourceRange>> = BTreeMap::new();
    for (id, range) in v4.into_iter().chain(v6) {
        out.entry(id).or_default().insert(range);
    }
    Ok(out)
}
