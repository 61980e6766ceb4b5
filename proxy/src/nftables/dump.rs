//! `dump` for the nftables backend: what kpx's table holds, read back from `nft list table`
//! (the listing a person reads), per Service port in the shape every backend dumps.

use std::collections::BTreeMap;

use super::chains;
use crate::backend::{Dump, DumpedService};

/// One element of a listed map: key, comment, value.
fn elements(block: &str) -> Vec<(String, Option<String>, String)> {
    let Some(start) = block.find("elements = {") else {
        return Vec::new();
    };
    let rest = &block[start + "elements = {".len()..];
    let Some(end) = rest.find('}') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Elements are separated by ", " (commas never occur inside a kpx key, value or comment).
    for item in rest[..end].split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (key, value) = match item.rsplit_once(" : ") {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (item, ""),
        };
        let (key, comment) = match key.split_once(" comment \"") {
            Some((k, c)) => (k.trim(), Some(c.trim_end_matches('"').to_string())),
            None => (key, None),
        };
        out.push((key.to_string(), comment, value.to_string()));
    }
    out
}

/// The listing's blocks: `(kind, name) -> body`.
fn blocks(text: &str) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    let mut current: Option<((String, String), String)> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some((kind, name)) = trimmed
            .strip_suffix(" {")
            .and_then(|head| head.split_once(' '))
            .filter(|(kind, _)| matches!(*kind, "chain" | "map" | "set"))
        {
            current = Some(((kind.to_string(), name.to_string()), String::new()));
            continue;
        }
        if trimmed == "}" {
            if let Some((k, body)) = current.take() {
                out.insert(k, body);
            }
            continue;
        }
        if let Some((_, body)) = current.as_mut() {
            body.push_str(trimmed);
            body.push('\n');
        }
    }
    out
}

fn comment(rule: &str) -> Option<String> {
    let (_, rest) = rule.split_once("comment \"")?;
    Some(rest.split('"').next()?.to_string())
}

/// What one chain leads to: its Service port (from the pick rule's comment) and endpoints.
fn chain_endpoints(
    blocks: &BTreeMap<(String, String), String>,
    slots: &BTreeMap<(String, u32), String>,
    chain: &str,
    depth: usize,
) -> (Option<String>, Vec<String>) {
    let Some(body) = blocks.get(&("chain".to_string(), chain.to_string())) else {
        return (None, Vec::new());
    };
    let mut service = None;
    let mut endpoints = Vec::new();
    for rule in body.lines() {
        if let Some(pick) = rule.split_once(" to numgen random mod ") {
            let mut words = pick.1.split_whitespace();
            let n: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let offset: u32 = match (words.next(), words.next()) {
                (Some("offset"), Some(o)) => o.parse().unwrap_or(0),
                _ => 0,
            };
            let map = pick
                .1
                .split_once("map @")
                .map(|(_, m)| m.split_whitespace().next().unwrap_or("").to_string())
                .unwrap_or_default();
            for slot in offset..offset.saturating_add(n) {
                if let Some(ep) = slots.get(&(map.clone(), slot)) {
                    endpoints.push(ep.clone());
                }
            }
            service = service.or_else(|| comment(rule));
        } else if let Some((_, to)) = rule
            .split_once(" dnat ip to ")
            .or_else(|| rule.split_once(" dnat ip6 to "))
            .or_else(|| rule.split_once(" dnat to "))
        {
            if let Some(to) = to.split_whitespace().next() {
                endpoints.push(to.to_string());
            }
            service = service
                .or_else(|| comment(rule).map(|c| c.trim_end_matches(" affinity").to_string()));
        } else if let Some((_, target)) = rule.split_once("goto ") {
            if depth < 3 {
                let target = target.split_whitespace().next().unwrap_or("");
                let (s, eps) = chain_endpoints(blocks, slots, target, depth + 1);
                service = service.or(s);
                endpoints.extend(eps);
            }
        }
    }
    (service, endpoints)
}

fn address(ip: &str, port: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Reads an `nft list table` listing of kpx's table.
pub fn read(text: &str) -> Dump {
    let blocks = blocks(text);
    // Endpoint slots: (map, slot) -> "ip:port".
    let mut slots = BTreeMap::new();
    for ((kind, name), body) in &blocks {
        if kind == "map" && name.starts_with("endpoints-") {
            for (key, _, value) in elements(body) {
                let Ok(slot) = key.parse::<u32>() else {
                    continue;
                };
                if let Some((ip, port)) = value.split_once(" . ") {
                    slots.insert((name.clone(), slot), address(ip.trim(), port.trim()));
                }
            }
        }
    }
    let mut services: BTreeMap<String, DumpedService> = BTreeMap::new();
    for (map, nodeport, refused) in [
        (chains::SERVICE_IPS, false, false),
        (chains::SERVICE_NODEPORTS, true, false),
        (chains::NO_ENDPOINT_SERVICES, false, true),
        (chains::NO_ENDPOINT_NODEPORTS, true, true),
    ] {
        let Some(body) = blocks.get(&("map".to_string(), map.to_string())) else {
            continue;
        };
        for (key, comment, value) in elements(body) {
            let parts: Vec<&str> = key.split(" . ").map(str::trim).collect();
            let (chain_service, endpoints) = match value.strip_prefix("goto ") {
                Some(chain) if !refused => chain_endpoints(&blocks, &slots, chain, 0),
                _ => (None, Vec::new()),
            };
            let Some(name) = comment.or(chain_service) else {
                continue;
            };
            let s = services
                .entry(name.clone())
                .or_insert_with(|| DumpedService {
                    service: name,
                    ..Default::default()
                });
            match (nodeport, parts.as_slice()) {
                (true, [_, port]) => s.node_port = port.parse().ok(),
                (false, [ip, _, port]) => s.addresses.push(address(ip, port)),
                _ => {}
            }
            s.endpoints.extend(endpoints);
            if refused {
                s.no_endpoints = Some(if value == "drop" { "drop" } else { "reject" }.to_string());
            }
        }
    }
    Dump {
        backend: "nftables".into(),
        services: services.into_values().collect(),
        conntrack: Vec::new(),
    }
    .sorted()
}
