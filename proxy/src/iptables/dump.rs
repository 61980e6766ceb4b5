//! Reading back what kpx programmed, per Service port, from `iptables-save`.

use std::collections::BTreeMap;

use super::chains;
use crate::backend::{Dump, DumpedService};

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

/// Per Service port: its addresses (`-d ... --dport`), NodePort and DNAT targets (through
/// its `KPX-EXT-*` chain when it has one), and what its traffic gets without endpoints.
pub fn read(nat: &str, filter: &str) -> Dump {
    let rules: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut chain_targets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut chain_jumps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for rule in &rules {
        let chain = rule.split_whitespace().nth(1).unwrap_or("");
        if let Some(dest) = field(rule, "--to-destination") {
            let list = chain_targets.entry(chain).or_default();
            if !list.iter().any(|d| d == dest) {
                list.push(dest.to_string());
            }
        } else if let Some(target) = field(rule, "-j").filter(|t| is_endpoint_chain(t)) {
            chain_jumps.entry(chain).or_default().push(target);
        }
    }
    let endpoints_of = |chain: &str| -> Vec<String> {
        let mut out: Vec<String> = chain_targets.get(chain).cloned().unwrap_or_default();
        for next in chain_jumps.get(chain).into_iter().flatten() {
            out.extend(chain_targets.get(next).cloned().unwrap_or_default());
        }
        out
    };
    let mut services: BTreeMap<String, DumpedService> = BTreeMap::new();
    for rule in &rules {
        let chain = rule.split_whitespace().nth(1).unwrap_or("");
        let Some(target) = field(rule, "-j") else {
            continue;
        };
        if chain != chains::SERVICES && chain != chains::NODEPORTS {
            continue;
        }
        if !is_endpoint_chain(target) && !target.starts_with("KPX-EXT-") {
            continue;
        }
        let Some(text) = comment(rule) else { continue };
        let name = text.split_whitespace().next().unwrap_or("").to_string();
        let entry = services
            .entry(name.clone())
            .or_insert_with(|| DumpedService {
                service: name,
                ..DumpedService::default()
            });
        let port = field(rule, "--dport").unwrap_or("");
        if chain == chains::NODEPORTS {
            entry.node_port = port.parse::<u16>().ok();
        } else if let Some(dest) = field(rule, "-d") {
            entry.addresses.push(socket_address(dest, port));
        }
        entry.endpoints.extend(endpoints_of(target));
    }
    for rule in filter.lines().filter(|l| {
        l.starts_with(&format!("-A {} ", chains::SERVICES))
            || l.starts_with(&format!("-A {} ", chains::EXTERNAL_SERVICES))
    }) {
        let Some(text) = comment(rule) else { continue };
        let name = text.split_whitespace().next().unwrap_or("").to_string();
        let entry = services
            .entry(name.clone())
            .or_insert_with(|| DumpedService {
                service: name,
                ..DumpedService::default()
            });
        let port = field(rule, "--dport").unwrap_or("");
        match field(rule, "-d") {
            Some(dest) => entry.addresses.push(socket_address(dest, port)),
            None => entry.node_port = entry.node_port.or(port.parse().ok()),
        }
        if entry.endpoints.is_empty() {
            entry.no_endpoints = Some(
                if rule.contains("-j REJECT") {
                    "reject"
                } else {
                    "drop"
                }
                .to_string(),
            );
        }
    }
    Dump {
        backend: "iptables".into(),
        services: services.into_values().collect(),
        conntrack: Vec::new(),
    }
    .sorted()
}

/// A chain holding one endpoint set's DNAT rules.
fn is_endpoint_chain(chain: &str) -> bool {
    chain.starts_with("KPX-SVC-") || chain.starts_with("KPX-SVL-")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

    use super::*;
    use crate::iptables::render::{plan, Fragments, RenderConfig};
    use crate::model::{ChangeTracker, ProxyState};

    /// The table section of a restore text.
    fn table<'a>(restore: &'a str, name: &str) -> &'a str {
        let start = restore.find(&format!("*{name}\n")).unwrap_or(restore.len());
        let rest = &restore[start..];
        &rest[..rest.find("COMMIT").unwrap_or(rest.len())]
    }

    #[test]
    fn every_endpoint_chain_and_verdict_reads_back() {
        let mut t = ChangeTracker::new("n1");
        let svc = |name: &str, spec: serde_json::Value| -> Service {
            serde_json::from_value(
                json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec}),
            )
            .expect("service")
        };
        t.apply_service(svc("local", json!({"clusterIP": "10.96.0.1", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]})));
        t.apply_service(svc("np", json!({"type": "NodePort", "clusterIP": "10.96.0.2", "externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]})));
        t.apply_service(svc(
            "empty",
            json!({"clusterIP": "10.96.0.3", "ports": [{"port": 80}]}),
        ));
        for name in ["local", "np"] {
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["198.18.128.2"], "nodeName": "n1"}, {"addresses": ["198.18.129.2"], "nodeName": "n2"}],
            }))
            .expect("slice");
            t.apply_slice(slice);
        }
        let (state, changes) = t.snapshot(&ProxyState::default());
        let cfg = RenderConfig {
            cluster_cidr: Some("198.18.128.0/17".into()),
            ..RenderConfig::default()
        };
        let restore = plan(
            &cfg,
            &state,
            &changes,
            &Fragments::new(),
            true,
            &BTreeSet::new(),
            &[],
        )
        .restore;
        let dump = read(table(&restore, "nat"), table(&restore, "filter"));
        let rows: Vec<String> = dump
            .services
            .iter()
            .map(|s| {
                format!(
                    "{} {:?} {:?} {:?} {:?}",
                    s.service, s.addresses, s.node_port, s.endpoints, s.no_endpoints
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                r#"ns/empty/TCP ["10.96.0.3:80"] None [] Some("reject")"#,
                r#"ns/local/TCP ["10.96.0.1:80"] None ["198.18.128.2:8080"] None"#,
                r#"ns/np/TCP ["10.96.0.2:80"] Some(30080) ["198.18.128.2:8080", "198.18.129.2:8080"] None"#,
            ]
        );
    }
}
