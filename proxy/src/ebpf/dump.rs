//! Reading back what the maps hold, per Service port, in the same shape as the iptables dump
//! (`services`: addresses, NodePort, endpoints), plus the conntrack entries.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{HashMap, MapData, MapError};
use aya::Ebpf;
use kpx_ebpf::layout::{
    ip, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceValue, SlotKey, CT_F_REPLY, CT_F_SNAT,
    SVC_F_DROP, SVC_F_NODEPORT,
};
use serde_json::{json, Value};

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

pub fn read(ebpf: &Ebpf) -> Result<Value, MapError> {
    let services: HashMap<_, ServiceKey, ServiceValue> = map(ebpf, "kpx_services")?;
    let slots: HashMap<_, SlotKey, u32> = map(ebpf, "kpx_slots")?;
    let backends: HashMap<_, u32, Backend> = map(ebpf, "kpx_backends")?;
    let names: HashMap<_, u32, RevNat> = map(ebpf, "kpx_rev_nat")?;
    let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
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
        let svc = by_name.entry(name.clone()).or_insert_with(
            || json!({"service": name, "addresses": [], "endpoints": [], "frontends": []}),
        );
        let port = u16::from_be(key.port);
        let frontend = if value.flags & SVC_F_NODEPORT != 0 {
            svc["nodePort"] = json!(port);
            format!("*:{port}")
        } else {
            let address = socket(ip(&key.addr, key.family), port);
            if let Some(list) = svc["addresses"].as_array_mut() {
                list.push(json!(address));
            }
            address
        };
        if let Some(list) = svc["frontends"].as_array_mut() {
            list.push(
                json!({"frontend": frontend, "id": value.id, "flags": value.flags,
                "affinityTimeout": value.affinity_timeout, "endpoints": endpoints}),
            );
        }
        if let Some(list) = svc["endpoints"].as_array_mut() {
            for e in endpoints {
                if !list.iter().any(|x| x == &json!(e)) {
                    list.push(json!(e));
                }
            }
        }
        if value.count == 0 && svc["endpoints"].as_array().is_some_and(Vec::is_empty) {
            svc["noEndpoints"] = json!(if value.flags & SVC_F_DROP != 0 {
                "DROP"
            } else {
                "REJECT"
            });
        }
    }
    for svc in by_name.values_mut() {
        for field in ["addresses", "endpoints"] {
            if let Some(list) = svc[field].as_array_mut() {
                list.sort_by_key(|v| v.to_string());
            }
        }
    }
    let ct: HashMap<_, CtKey, CtValue> = map(ebpf, "kpx_ct")?;
    let mut flows = Vec::new();
    for entry in ct.iter().take(10_000) {
        let (key, value) = entry?;
        flows.push(json!({
            "from": socket(ip(&key.src, key.family), u16::from_be(key.sport)),
            "to": socket(ip(&key.dst, key.family), u16::from_be(key.dport)),
            "protocol": match key.proto { 6 => "TCP", 17 => "UDP", _ => "?" },
            "direction": if value.flags & CT_F_REPLY != 0 { "reply" } else { "forward" },
            "masqueraded": value.flags & CT_F_SNAT != 0,
            "backendId": value.backend_id,
            "serviceId": value.service_id,
        }));
    }
    Ok(json!({
        "backend": "ebpf",
        "services": by_name.into_values().collect::<Vec<_>>(),
        "conntrack": flows,
    }))
}
