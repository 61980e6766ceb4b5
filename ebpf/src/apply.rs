//! Performs a [`plan`](crate::plan) against the loaded maps, in the plan's order. A write that
//! fails names the map; a full map says so (the Services written before it keep working).

use std::collections::BTreeSet;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError};
use aya::Ebpf;

use crate::layout::{
    Backend, Clients, Config, NodeAddr, RevNat, ServiceKey, ServiceValue, SlotKey, SrcRange4,
    SrcRange6, FAMILY_V4, SRC_RANGE_ID_BITS,
};
use crate::plan::{Op, SourceRange};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("BPF map {map} is full ({capacity} entries); raise its capacity")]
    Full { map: &'static str, capacity: u32 },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF map {0} is missing from the loaded object")]
    Missing(&'static str),
}

fn open<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    map: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>, ApplyError> {
    let handle = ebpf.map_mut(map).ok_or(ApplyError::Missing(map))?;
    HashMap::try_from(handle).map_err(|source| ApplyError::Map { map, source })
}

fn open_trie<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    map: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, u8>, ApplyError> {
    let handle = ebpf.map_mut(map).ok_or(ApplyError::Missing(map))?;
    LpmTrie::try_from(handle).map_err(|source| ApplyError::Map { map, source })
}

pub const SRC_RANGE4: &str = "kpx_src_range4";
pub const SRC_RANGE6: &str = "kpx_src_range6";

/// The trie key of a frontend's source range, by family.
pub enum SrcRangeKey {
    V4(Key<SrcRange4>),
    V6(Key<SrcRange6>),
}

impl SrcRangeKey {
    pub fn new(service_id: u32, range: &SourceRange) -> Self {
        let prefix = SRC_RANGE_ID_BITS + u32::from(range.prefix);
        if range.family == FAMILY_V4 {
            let mut addr = [0u8; 4];
            addr.copy_from_slice(&range.addr[..4]);
            Self::V4(Key::new(prefix, SrcRange4 { service_id, addr }))
        } else {
            Self::V6(Key::new(
                prefix,
                SrcRange6 {
                    service_id,
                    addr: range.addr,
                },
            ))
        }
    }
}

/// One map write's outcome: its error with the map's name.
type Written = Result<(), (&'static str, MapError)>;

/// Writes (`put`) or deletes one source range; the inner error is the write's, to be told
/// apart from a full trie.
fn source_range(
    ebpf: &mut Ebpf,
    service_id: u32,
    range: &SourceRange,
    put: bool,
) -> Result<Written, ApplyError> {
    let (map, result) = match SrcRangeKey::new(service_id, range) {
        SrcRangeKey::V4(key) => {
            let mut trie = open_trie::<SrcRange4>(ebpf, SRC_RANGE4)?;
            let r = if put {
                trie.insert(&key, 1, 0)
            } else {
                trie.remove(&key)
            };
            (SRC_RANGE4, r)
        }
        SrcRangeKey::V6(key) => {
            let mut trie = open_trie::<SrcRange6>(ebpf, SRC_RANGE6)?;
            let r = if put {
                trie.insert(&key, 1, 0)
            } else {
                trie.remove(&key)
            };
            (SRC_RANGE6, r)
        }
    };
    Ok(match result {
        // Deleting what is already gone is not an error, as for the hash maps.
        Err(e) if !put && gone(&e) => Ok(()),
        other => other.map_err(|e| (map, e)),
    })
}

fn capacity(ebpf: &Ebpf, map: &'static str) -> u32 {
    ebpf.map(map)
        .and_then(|m| match m {
            aya::maps::Map::HashMap(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::LpmTrie(d) => d.info().ok().map(|i| i.max_entries()),
            _ => None,
        })
        .unwrap_or(0)
}

/// Maps an insert error: E2BIG from a hash map means it is full, ENOSPC from an LPM trie.
fn insert_error(ebpf: &Ebpf, map: &'static str, source: MapError) -> ApplyError {
    if let MapError::SyscallError(e) = &source {
        if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
            return ApplyError::Full {
                map,
                capacity: capacity(ebpf, map),
            };
        }
    }
    ApplyError::Map { map, source }
}

/// Whether a delete failed only because the key was not there: aya's `remove` reports the
/// kernel's ENOENT as a syscall error, not as `KeyNotFound`.
fn gone(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Deleting what is already gone is not an error (a restarted proxy may replay deletes).
fn removed(result: Result<(), MapError>, map: &'static str) -> Result<(), ApplyError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if gone(&e) => Ok(()),
        Err(source) => Err(ApplyError::Map { map, source }),
    }
}

/// Applies `ops` in order; stops at the first failure (the plan's order keeps what was
/// written consistent).
pub fn apply(ebpf: &mut Ebpf, ops: &[Op]) -> Result<(), ApplyError> {
    for op in ops {
        let result = match op {
            Op::PutBackend(id, b) => open::<u32, Backend>(ebpf, "kpx_backends")?
                .insert(id, b, 0)
                .map_err(|e| ("kpx_backends", e)),
            Op::PutSlot(k, id) => open::<SlotKey, u32>(ebpf, "kpx_slots")?
                .insert(k, id, 0)
                .map_err(|e| ("kpx_slots", e)),
            Op::PutRevNat(id, r) => open::<u32, RevNat>(ebpf, "kpx_rev_nat")?
                .insert(id, r, 0)
                .map_err(|e| ("kpx_rev_nat", e)),
            Op::PutService(k, v) => open::<ServiceKey, ServiceValue>(ebpf, "kpx_services")?
                .insert(k, v, 0)
                .map_err(|e| ("kpx_services", e)),
            Op::DeleteService(k) => {
                let r = open::<ServiceKey, ServiceValue>(ebpf, "kpx_services")?.remove(k);
                removed(r, "kpx_services")?;
                Ok(())
            }
            Op::DeleteSlot(k) => {
                removed(
                    open::<SlotKey, u32>(ebpf, "kpx_slots")?.remove(k),
                    "kpx_slots",
                )?;
                Ok(())
            }
            Op::DeleteRevNat(id) => {
                let r = open::<u32, RevNat>(ebpf, "kpx_rev_nat")?.remove(id);
                removed(r, "kpx_rev_nat")?;
                Ok(())
            }
            Op::DeleteBackend(id) => {
                removed(
                    open::<u32, Backend>(ebpf, "kpx_backends")?.remove(id),
                    "kpx_backends",
                )?;
                Ok(())
            }
            Op::PutSourceRange(id, range) => source_range(ebpf, *id, range, true)?,
            Op::DeleteSourceRange(id, range) => source_range(ebpf, *id, range, false)?,
        };
        if let Err((map, source)) = result {
            return Err(insert_error(ebpf, map, source));
        }
    }
    Ok(())
}

/// Writes the node's masquerade addresses (`kpx_config`), read by the tc program.
pub fn set_config(ebpf: &mut Ebpf, config: &Config) -> Result<(), ApplyError> {
    let map = "kpx_config";
    let handle = ebpf.map_mut(map).ok_or(ApplyError::Missing(map))?;
    let mut array: Array<&mut MapData, Config> =
        Array::try_from(handle).map_err(|source| ApplyError::Map { map, source })?;
    array
        .set(0, config, 0)
        .map_err(|source| ApplyError::Map { map, source })
}

/// The digest of the programs whose links are pinned (`kpx_version`; 0: none recorded).
pub fn programs_version(ebpf: &Ebpf) -> Result<u64, ApplyError> {
    let map = "kpx_version";
    let handle = ebpf.map(map).ok_or(ApplyError::Missing(map))?;
    let array: Array<&MapData, u64> =
        Array::try_from(handle).map_err(|source| ApplyError::Map { map, source })?;
    array
        .get(&0, 0)
        .map_err(|source| ApplyError::Map { map, source })
}

/// Records the digest of the programs whose links are pinned.
pub fn set_programs_version(ebpf: &mut Ebpf, version: u64) -> Result<(), ApplyError> {
    let map = "kpx_version";
    let handle = ebpf.map_mut(map).ok_or(ApplyError::Missing(map))?;
    let mut array: Array<&mut MapData, u64> =
        Array::try_from(handle).map_err(|source| ApplyError::Map { map, source })?;
    array
        .set(0, version, 0)
        .map_err(|source| ApplyError::Map { map, source })
}

/// Writes how the programs tell the node, pods and outside clients apart.
pub fn set_clients(ebpf: &mut Ebpf, clients: &Clients) -> Result<(), ApplyError> {
    let map = "kpx_clients";
    let handle = ebpf.map_mut(map).ok_or(ApplyError::Missing(map))?;
    let mut array: Array<&mut MapData, Clients> =
        Array::try_from(handle).map_err(|source| ApplyError::Map { map, source })?;
    array
        .set(0, clients, 0)
        .map_err(|source| ApplyError::Map { map, source })
}

/// Makes `kpx_node_addrs` (the addresses NodePorts answer on) exactly `addrs`.
pub fn set_node_addrs(ebpf: &mut Ebpf, addrs: &BTreeSet<NodeAddr>) -> Result<(), ApplyError> {
    let map = "kpx_node_addrs";
    let mut hash = open::<NodeAddr, u8>(ebpf, map)?;
    let present: BTreeSet<NodeAddr> = hash.keys().filter_map(Result::ok).collect();
    for gone in present.difference(addrs) {
        removed(hash.remove(gone), map)?;
    }
    let mut failed = None;
    for new in addrs.difference(&present) {
        if let Err(source) = hash.insert(new, 1, 0) {
            failed = Some(source);
            break;
        }
    }
    match failed {
        Some(source) => Err(insert_error(ebpf, map, source)),
        None => Ok(()),
    }
}
