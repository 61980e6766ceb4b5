//! Zone hints for Services annotated `service.kubernetes.io/topology-mode: Auto` (or the
//! deprecated `service.kubernetes.io/topology-aware-hints`), pure: kube-controller-manager's
//! topology cache (`staging/src/k8s.io/endpointslice/topologycache`). Each zone gets a share
//! of a Service's ready endpoints in proportion to its ready nodes' allocatable CPU, no zone
//! more than 20% overloaded; when that is impossible (one zone, fewer endpoints than zones, a
//! node without zone or CPU, an endpoint without zone) no endpoint gets hints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointHints, ForZone};

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `overloadThreshold`: the most any endpoint may be overloaded.
const OVERLOAD_THRESHOLD: f64 = 0.2;

/// Whether the Service asks for topology-cache hints (the controller's `hintsEnabled`).
pub fn hints_enabled(annotations: Option<&BTreeMap<String, String>>) -> bool {
    let Some(a) = annotations else { return false };
    let value = a
        .get("service.kubernetes.io/topology-mode")
        .or_else(|| a.get("service.kubernetes.io/topology-aware-hints"));
    matches!(value.map(String::as_str), Some("Auto" | "auto"))
}

/// Each zone's share of the cluster's allocatable CPU (`TopologyCache.SetNodes`): ready nodes
/// only, control-plane nodes left out. `None` (insufficient node info) if any counted node has
/// no zone or no CPU, or fewer than two zones have any.
pub fn zone_ratios<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Option<BTreeMap<String, f64>> {
    let mut milli_by_zone: BTreeMap<String, u64> = BTreeMap::new();
    for node in nodes {
        let labels = node.metadata.labels.as_ref();
        let excluded = labels.is_some_and(|l| {
            l.contains_key("node-role.kubernetes.io/control-plane")
                || l.contains_key("node-role.kubernetes.io/master")
        });
        if excluded || !node_ready(node) {
            continue;
        }
        let zone = labels
            .and_then(|l| l.get(ZONE_LABEL))
            .filter(|z| !z.is_empty())?;
        let cpu = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("cpu"))
            .and_then(|q| milli_cpu(&q.0))
            .filter(|m| *m > 0)?;
        *milli_by_zone.entry(zone.clone()).or_default() += cpu;
    }
    let total: u64 = milli_by_zone.values().sum();
    if total == 0 || milli_by_zone.len() < 2 {
        return None;
    }
    Some(
        milli_by_zone
            .into_iter()
            .map(|(zone, m)| (zone, m as f64 / total as f64))
            .collect(),
    )
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// A CPU quantity in millicores: `2`, `1.5`, `500m` (the forms allocatable CPU takes).
fn milli_cpu(text: &str) -> Option<u64> {
    if let Some(m) = text.strip_suffix('m') {
        return m.parse().ok();
    }
    let cores: f64 = text.parse().ok()?;
    (cores.is_finite() && cores >= 0.0).then(|| (cores * 1000.0).round() as u64)
}

/// A zone's allocation of endpoints (`getAllocations`).
#[derive(Debug, Clone, Copy)]
struct Allocation {
    desired: f64,
}

fn allocations(
    ratios: &BTreeMap<String, f64>,
    endpoints: usize,
) -> Option<BTreeMap<&str, Allocation>> {
    if ratios.len() < 2 || ratios.len() > endpoints {
        return None;
    }
    let mut remaining = endpoints as i64;
    let mut out = BTreeMap::new();
    for (zone, ratio) in ratios {
        let desired = ratio * endpoints as f64;
        let minimum = (desired * (1.0 / (1.0 + OVERLOAD_THRESHOLD))).ceil();
        remaining -= minimum as i64;
        if remaining < 0 {
            return None;
        }
        out.insert(
            zone.as_str(),
            Allocation {
                desired: desired.max(minimum),
            },
        );
    }
    Some(out)
}

fn ready(e: &Endpoint) -> bool {
    e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
}

fn hint(zone: &str) -> Option<EndpointHints> {
    Some(EndpointHints {
        for_zones: Some(vec![ForZone {
            name: zone.to_string(),
        }]),
        for_nodes: None,
    })
}

/// The zone with the most left (`getMost`; ties go to the first in name order, where kube
/// takes whichever its map yields first).
fn most(zones: &BTreeMap<&str, f64>) -> Option<(String, f64)> {
    let mut best: Option<(&str, f64)> = None;
    for (z, n) in zones {
        if *n > best.map_or(0.0, |b| b.1) {
            best = Some((z, *n));
        }
    }
    best.map(|(z, n)| (z.to_string(), n))
}

/// Sets the zone hints of every endpoint of one address type (`TopologyCache.AddHints`):
/// each ready endpoint hinted for its own zone, then endpoints of zones with more than their
/// share re-hinted for zones with less. With no allocation possible, every hint is removed.
pub fn add_hints(endpoints: &mut [&mut Endpoint], ratios: Option<&BTreeMap<String, f64>>) {
    let total_ready = endpoints.iter().filter(|e| ready(e)).count();
    let Some(allocs) = ratios.and_then(|r| allocations(r, total_ready)) else {
        remove_hints(endpoints);
        return;
    };
    // Step 1: same-zone hints.
    let mut allocated: BTreeMap<String, usize> = BTreeMap::new();
    for e in endpoints.iter_mut() {
        if !ready(e) {
            e.hints = None;
            continue;
        }
        let Some(zone) = e.zone.clone().filter(|z| !z.is_empty()) else {
            remove_hints(endpoints);
            return;
        };
        *allocated.entry(zone.clone()).or_default() += 1;
        e.hints = hint(&zone);
    }
    // Step 2: how many each zone gives and receives (`getGivingAndReceivingZones`).
    let mut giving_desired: BTreeMap<&str, f64> = BTreeMap::new();
    let mut receiving_desired: BTreeMap<&str, f64> = BTreeMap::new();
    for (zone, a) in &allocs {
        let have = allocated.get(*zone).copied().unwrap_or(0) as f64;
        if have > a.desired {
            giving_desired.insert(zone, have - a.desired);
        } else if have < a.desired {
            receiving_desired.insert(zone, a.desired - have);
        }
    }
    let mut giving: BTreeMap<String, usize> = BTreeMap::new();
    let mut receiving: BTreeMap<String, usize> = BTreeMap::new();
    while let (Some((g, give)), Some((r, receive))) =
        (most(&giving_desired), most(&receiving_desired))
    {
        if (give < 1.0 && receive < 1.0) || give < 0.5 || receive < 0.5 {
            break;
        }
        *giving.entry(g.clone()).or_default() += 1;
        *receiving.entry(r.clone()).or_default() += 1;
        if let Some(v) = giving_desired.get_mut(g.as_str()) {
            *v -= 1.0;
        }
        if let Some(v) = receiving_desired.get_mut(r.as_str()) {
            *v -= 1.0;
        }
    }
    // Step 3: re-hint endpoints of giving zones for receiving ones (`redistributeHints`).
    for e in endpoints.iter_mut() {
        if giving.is_empty() || receiving.is_empty() {
            break;
        }
        if !ready(e) {
            continue;
        }
        let Some(zone) = e.zone.clone() else { continue };
        if giving.get(&zone).is_some_and(|n| *n > 0) {
            if let Some(to) = receiving
                .iter()
                .find(|(_, n)| **n > 0)
                .map(|(z, _)| z.clone())
            {
                e.hints = hint(&to);
                for (map, key) in [(&mut giving, &zone), (&mut receiving, &to)] {
                    if let Some(n) = map.get_mut(key) {
                        *n -= 1;
                        if *n == 0 {
                            map.remove(key);
                        }
                    }
                }
            }
        }
    }
}

fn remove_hints(endpoints: &mut [&mut Endpoint]) {
    for e in endpoints.iter_mut() {
        e.hints = None;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, zone: Option<&str>, cpu: &str, ready: bool) -> Node {
        let mut labels = json!({"kubernetes.io/hostname": name});
        if let Some(z) = zone {
            labels[ZONE_LABEL] = json!(z);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": cpu},
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("node")
    }

    fn endpoint(ip: &str, zone: &str, ready: bool) -> Endpoint {
        serde_json::from_value(json!({"addresses": [ip], "zone": zone,
            "conditions": {"ready": ready}}))
        .expect("endpoint")
    }

    /// Each endpoint's hinted zone (`-` for none).
    fn hinted(endpoints: &[Endpoint]) -> Vec<String> {
        endpoints
            .iter()
            .map(|e| {
                e.hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| {
                        z.iter()
                            .map(|z| z.name.clone())
                            .collect::<Vec<_>>()
                            .join("|")
                    })
                    .unwrap_or_else(|| "-".into())
            })
            .collect()
    }

    fn run(endpoints: &mut [Endpoint], ratios: Option<&BTreeMap<String, f64>>) -> Vec<String> {
        let mut refs: Vec<&mut Endpoint> = endpoints.iter_mut().collect();
        add_hints(&mut refs, ratios);
        hinted(endpoints)
    }

    #[test]
    fn the_annotation_is_auto_or_auto_lowercase() {
        let a = |k: &str, v: &str| Some([(k.to_string(), v.to_string())].into());
        assert!(hints_enabled(
            a("service.kubernetes.io/topology-mode", "Auto").as_ref()
        ));
        assert!(hints_enabled(
            a("service.kubernetes.io/topology-aware-hints", "auto").as_ref()
        ));
        assert!(!hints_enabled(
            a("service.kubernetes.io/topology-mode", "Disabled").as_ref()
        ));
        assert!(!hints_enabled(None));
    }

    #[test]
    fn ratios_follow_ready_nodes_cpu_and_need_two_zones() {
        let nodes = [
            node("n1", Some("a"), "2", true),
            node("n2", Some("b"), "1500m", true),
            node("n3", Some("b"), "500m", true),
            node("n4", None, "8", false),
        ];
        let r = zone_ratios(&nodes).expect("two zones");
        assert_eq!(r.get("a"), Some(&0.5));
        assert_eq!(r.get("b"), Some(&0.5));
        assert!(zone_ratios(&nodes[..1]).is_none(), "one zone");
        let unzoned = [
            node("n1", Some("a"), "2", true),
            node("n2", None, "2", true),
        ];
        assert!(zone_ratios(&unzoned).is_none(), "a ready node without zone");
    }

    #[test]
    fn hints_follow_zone_shares_and_redistribute_from_crowded_zones() {
        let ratios: BTreeMap<String, f64> = [("a".to_string(), 0.5), ("b".to_string(), 0.5)].into();
        // Balanced: each endpoint keeps its own zone.
        let mut eps = [
            endpoint("198.19.1.1", "a", true),
            endpoint("198.19.2.1", "b", true),
        ];
        assert_eq!(run(&mut eps, Some(&ratios)), ["a", "b"]);
        // Three in a, one in b: one of a's is given to b (desired 2 each).
        let mut eps = [
            endpoint("198.19.1.1", "a", true),
            endpoint("198.19.1.2", "a", true),
            endpoint("198.19.1.3", "a", true),
            endpoint("198.19.2.1", "b", true),
            endpoint("198.19.1.4", "a", false),
        ];
        assert_eq!(run(&mut eps, Some(&ratios)), ["b", "a", "a", "b", "-"]);
        // Fewer ready endpoints than zones, an endpoint without zone, no node info: none.
        let mut eps = [
            endpoint("198.19.1.1", "a", true),
            endpoint("198.19.2.1", "b", false),
        ];
        assert_eq!(run(&mut eps, Some(&ratios)), ["-", "-"]);
        let mut eps = [
            endpoint("198.19.1.1", "a", true),
            endpoint("198.19.2.1", "", true),
        ];
        assert_eq!(run(&mut eps, Some(&ratios)), ["-", "-"]);
        let mut eps = [
            endpoint("198.19.1.1", "a", true),
            endpoint("198.19.2.1", "b", true),
        ];
        assert_eq!(run(&mut eps, None), ["-", "-"]);
    }
}
