//! Reading back what kpx programmed, per Service port, from `iptables-save`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::chains;

fn field<'a>(rule: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == flag {
            return words.next();
        }
    }
    None
}

fn comment(rule: &str) -> Option<String> {
    let start = rule.find("--comment ")? + "--comment ".len();
    let rest = &rule[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next().map(String::from)
    } else {
        rest.split_whitespace().next().map(String::from)
    }
}

/// `198.18.128.9:80` or `[2001:2:0:ff::9]:80` from a `-d` host and a port.
fn socket_address(host: &str, port: &str) -> String {
    let ip = host.trim_end_matches("/32").trim_end_matches("/128");
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Per Service port: its addresses (`-d ... --dport`), NodePort and DNAT targets.
pub fn read(nat: &str, filter: &str) -> Value {
    let rules: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut chain_targets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for rule in &rules {
        let chain = rule.split_whitespace().nth(1).unwrap_or("");
        if let Some(dest) = field(rule, "--to-destination") {
            let list = chain_targets.entry(chain).or_default();
            if !list.iter().any(|d| d == dest) {
                list.push(dest.to_string());
            }
        }
    }
    let mut services: BTreeMap<String, Value> = BTreeMap::new();
    for rule in &rules {
        let chain = rule.split_whitespace().nth(1).unwrap_or("");
        let Some(target) = field(rule, "-j") else {
            continue;
        };
        if chain != chains::SERVICES && chain != chains::NODEPORTS {
            continue;
        }
        if !target.starts_with("KPX-SVC-") && !target.starts_with("KPX-EXT-") {
            continue;
        }
        let Some(text) = comment(rule) else { continue };
        let name = text.split_whitespace().next().unwrap_or("").to_string();
        let entry = services.entry(name.clone()).or_insert_with(
            || json!({"service": name, "addresses": [], "nodePort": null, "endpoints": []}),
        );
        let port = field(rule, "--dport").unwrap_or("");
        if chain == chains::NODEPORTS {
            entry["nodePort"] = json!(port.parse::<u16>().ok());
        } else if let Some(dest) = field(rule, "-d") {
            let address = socket_address(dest, port);
            if let Some(list) = entry["addresses"].as_array_mut() {
                list.push(json!(address));
            }
        }
        if target.starts_with("KPX-SVC-") {
            entry["endpoints"] = json!(chain_targets.get(target).cloned().unwrap_or_default());
        }
    }
    for rule in filter
        .lines()
        .filter(|l| l.starts_with(&format!("-A {}", chains::SERVICES)))
    {
        let Some(text) = comment(rule) else { continue };
        let name = text.split_whitespace().next().unwrap_or("").to_string();
        let port = field(rule, "--dport").unwrap_or("");
        let address = socket_address(field(rule, "-d").unwrap_or(""), port);
        let verdict = if rule.contains("-j REJECT") {
            "reject"
        } else {
            "drop"
        };
        services.insert(name.clone(), json!({"service": name, "addresses": [address], "nodePort": null, "endpoints": [], "noEndpoints": verdict}));
    }
    json!({"backend": "iptables", "services": services.into_values().collect::<Vec<_>>()})
}
