//! Reading back what the maps hold, per Service port, in the same shape as the iptables dump
//! (`services`: addresses, NodePort, endpoints), plus the conntrack entries; each frontend
//! with its id, flags and source ranges.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{HashMap, MapData, MapError};
use aya::Ebpf;
use kpx_ebpf::apply::ApplyError;
use kpx_ebpf::layout::{
    ip, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceValue, SlotKey, CT_F_REPLY, CT_F_SNAT,
    SVC_F_DROP, SVC_F_NODEPORT,
};

use crate::backend::{Dump, DumpedFlow, DumpedFrontend, DumpedService};

fn map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a Ebpf,
    name: &str,
) -> Result<HashMap<&'a MapData, K, V>, MapError> {
    let handle = ebpf.map(name).ok_or(MapError::InvalidName {
        name: name.to_string(),
    })?;
    HashMap::try_from(handle)
}

/// How many entries a map holds.
pub fn count(ebpf: &Ebpf, name: &str) -> Result<usize, MapError> {
    let handle = ebpf.map(name).ok_or(MapError::InvalidName {
        name: name.to_string(),
    })?;
    let keys: HashMap<&MapData, ServiceKey, ServiceValue> = HashMap::try_from(handle)?;
    Ok(keys.keys().count())
}

fn socket(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The source ranges in the tries, as `network/prefix` by service id.
fn source_ranges(ebpf: &Ebpf) -> Result<BTreeMap<u32, Vec<String>>, MapError> {
    let by_id = kpx_ebpf::adopt::source_ranges(ebpf).map_err(|e| match e {
        ApplyError::Map { source, .. } => source,
        // As `map` above says a missing map (a read never fills one).
        ApplyError::Missing(map) | ApplyError::Full { map, .. } => MapError::InvalidName {
            name: map.to_string(),
        },
    })?;
    Ok(by_id
        .into_iter()
        .map(|(id, ranges)| {
            let texts = ranges
                .iter()
                .map(|r| format!("{}/{}", r.ip(), r.prefix))
                .collect();
            (id, texts)
        })
        .collect())
}

pub fn read(ebpf: &Ebpf) -> Result<Dump, MapError> {
    let ranges = source_ranges(ebpf)?;
    let services: HashMap<_, ServiceKey, ServiceValue> = map(ebpf, "kpx_services")?;
    let slots: HashMap<_, SlotKey, u32> = map(ebpf, "kpx_slots")?;
    let backends: HashMap<_, u32, Backend> = map(ebpf, "kpx_backends")?;
    let names: HashMap<_, u32, RevNat> = map(ebpf, "kpx_rev_nat")?;
    let mut by_name: BTreeMap<String, DumpedService> = BTreeMap::new();
    // Per Service port: whether some entry has backends, and what an empty one does.
    let mut verdicts: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for entry in services.iter() {
        let (key, value) = entry?;
        let name = names
            .get(&value.id, 0)
            .map(|r| r.name())
            .unwrap_or_else(|_| format!("<service id {}>", value.id));
        let mut endpoints = Vec::new();
        for slot in 1..=u32::from(value.count) {
            let Ok(id) = slots.get(
                &SlotKey {
                    service_id: value.id,
                    slot,
                },
                0,
            ) else {
                continue;
            };
            if let Ok(b) = backends.get(&id, 0) {
                endpoints.push(socket(ip(&b.addr, b.family), u16::from_be(b.port)));
            }
        }
        let svc = by_name
            .entry(name.clone())
            .or_insert_with(|| DumpedService {
                service: name.clone(),
                ..DumpedService::default()
            });
        let port = u16::from_be(key.port);
        if value.flags & SVC_F_NODEPORT != 0 {
            svc.node_port = Some(port);
        } else if !key.is_internal() {
            svc.addresses.push(socket(ip(&key.addr, key.family), port));
        }
        svc.frontends.push(DumpedFrontend {
            frontend: crate::ebpf::wanted::describe(&key),
            id: value.id,
            flags: value.flags,
            affinity_timeout: value.affinity_timeout,
            endpoints: endpoints.clone(),
            source_ranges: ranges.get(&value.id).cloned().unwrap_or_default(),
        });
        svc.endpoints.extend(endpoints);
        let seen = verdicts.entry(name).or_insert((false, false));
        seen.0 |= value.count > 0;
        seen.1 |= value.count == 0 && value.flags & SVC_F_DROP != 0;
    }
    for (name, (any, drop)) in verdicts {
        if let (false, Some(svc)) = (any, by_name.get_mut(&name)) {
            svc.no_endpoints = Some(if drop { "drop" } else { "reject" }.to_string());
        }
    }
    let ct: HashMap<_, CtKey, CtValue> = map(ebpf, "kpx_ct")?;
    let mut flows = Vec::new();
    for entry in ct.iter().take(10_000) {
        let (key, value) = entry?;
        flows.push(DumpedFlow {
            from: socket(ip(&key.src, key.family), u16::from_be(key.sport)),
            to: socket(ip(&key.dst, key.family), u16::from_be(key.dport)),
            protocol: match key.proto {
                6 => "TCP",
                17 => "UDP",
                _ => "?",
            }
            .to_string(),
            direction: if value.flags & CT_F_REPLY != 0 {
                "reply"
            } else {
                "forward"
            }
            .to_string(),
            masqueraded: value.flags & CT_F_SNAT != 0,
            backend_id: value.backend_id,
            service_id: value.service_id,
        });
    }
    Ok(Dump {
        backend: "ebpf".into(),
        services: by_name.into_values().collect(),
        conntrack: flows,
    }
    .sorted())
}
