//! The EndpointSlice controller's decision, pure: for one Service with a selector, the slices
//! that should exist (its selected pods' addresses, per IP family and per set of resolved
//! ports, at most 100 endpoints each) and the writes that turn the existing slices into them —
//! updating slices in place rather than recreating them, as kube-controller-manager does.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, Pod, Service,
    ServicePort,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// A slice's port set: (name, port, protocol), in the Service's port order.
type Ports = Vec<(String, i32, String)>;
/// Slices are grouped by address type and resolved ports.
type SliceKey = (String, Ports);

/// One write the controller makes.
#[derive(Debug, Clone, PartialEq)]
pub enum SliceOp {
    Create(EndpointSlice),
    /// Replace the named slice's content (its name and resourceVersion are kept).
    Update(EndpointSlice),
    Delete(String),
}

/// Whether `selector` (matchLabels semantics: every pair equal) selects `labels`.
pub fn selects(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod's address of a family ("IPv4" / "IPv6").
fn pod_ip(pod: &Pod, family: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    let mut ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.clone());
    }
    ips.into_iter()
        .find(|ip| ip.contains(':') == (family == "IPv6"))
}

/// The pod's port for a Service port: a number as is, a name looked up in the pod's
/// containers (absent: the pod does not serve this port).
fn resolve(port: &ServicePort, pod: &Pod) -> Option<i32> {
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// Which topology hints a Service's `spec.trafficDistribution` asks for (kube's
/// `staging/src/k8s.io/endpointslice/trafficdist`: `PreferClose` and `PreferSameZone` give
/// zone hints, `PreferSameNode` (kube 1.33+) zone and node hints; any other value or none
/// gives none, and stale hints are removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HintsFor {
    None,
    Zone,
    ZoneAndNode,
}

impl HintsFor {
    fn of(service: &Service) -> Self {
        // The topology-mode annotation wins over the field (the reconciler's
        // `canUseTrafficDistribution`, KEP-4444): its hints come from the topology cache.
        if super::topologycache::hints_enabled(service.metadata.annotations.as_ref()) {
            return HintsFor::None;
        }
        match service
            .spec
            .as_ref()
            .and_then(|s| s.traffic_distribution.as_deref())
        {
            Some("PreferClose" | "PreferSameZone") => HintsFor::Zone,
            Some("PreferSameNode") => HintsFor::ZoneAndNode,
            _ => HintsFor::None,
        }
    }

    /// `preferCloseHeuristic.update`: a ready endpoint is hinted for its own zone (if known)
    /// and, for `PreferSameNode`, its own node; others get no hints.
    fn hints(self, ready: bool, zone: Option<&str>, node: Option<&str>) -> Option<EndpointHints> {
        if !ready || self == HintsFor::None {
            return None;
        }
        let for_zones = zone.map(|z| {
            vec![ForZone {
                name: z.to_string(),
            }]
        });
        let for_nodes = node.filter(|_| self == HintsFor::ZoneAndNode).map(|n| {
            vec![ForNode {
                name: n.to_string(),
            }]
        });
        (for_zones.is_some() || for_nodes.is_some()).then_some(EndpointHints {
            for_zones,
            for_nodes,
        })
    }
}

/// The slices a Service should have: `(address type, ports) → endpoints`, sorted.
fn wanted(
    service: &Service,
    pods: &[&Pod],
    zone_of: &dyn Fn(&str) -> Option<String>,
) -> BTreeMap<SliceKey, Vec<Endpoint>> {
    let mut out: BTreeMap<SliceKey, Vec<Endpoint>> = BTreeMap::new();
    let Some(spec) = service.spec.as_ref() else {
        return out;
    };
    let Some(selector) = spec.selector.as_ref() else {
        return out;
    };
    let namespace = service.metadata.namespace.as_deref();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let families: Vec<String> = match &spec.ip_families {
        Some(f) if !f.is_empty() => f.clone(),
        _ => vec!["IPv4".into()],
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let hints_for = HintsFor::of(service);
    for pod in pods {
        if pod.metadata.namespace.as_deref() != namespace
            || !selects(selector, pod.metadata.labels.as_ref())
            || pod_terminal(pod)
        {
            continue;
        }
        let resolved: Ports = ports
            .iter()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    resolve(p, pod)?,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ))
            })
            .collect();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = pod_ready(pod);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let zone = node.as_deref().and_then(zone_of);
        let endpoint_ready = publish_not_ready || (ready && !terminating);
        let hints = hints_for.hints(endpoint_ready, zone.as_deref(), node.as_deref());
        for family in &families {
            let Some(ip) = pod_ip(pod, family) else {
                continue;
            };
            out.entry((family.clone(), resolved.clone()))
                .or_default()
                .push(Endpoint {
                    addresses: vec![ip],
                    conditions: Some(EndpointConditions {
                        ready: Some(endpoint_ready),
                        serving: Some(publish_not_ready || ready),
                        terminating: Some(terminating),
                    }),
                    node_name: node.clone(),
                    zone: zone.clone(),
                    hints: hints.clone(),
                    target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                        kind: Some("Pod".into()),
                        namespace: pod.metadata.namespace.clone(),
                        name: pod.metadata.name.clone(),
                        uid: pod.metadata.uid.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
        }
    }
    for endpoints in out.values_mut() {
        endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
    }
    out
}

fn slice_ports(ports: &[(String, i32, String)]) -> Vec<EndpointPort> {
    ports
        .iter()
        .map(|(name, port, protocol)| EndpointPort {
            name: Some(name.clone()),
            port: Some(*port),
            protocol: Some(protocol.clone()),
            app_protocol: None,
        })
        .collect()
}

fn key_of(slice: &EndpointSlice) -> SliceKey {
    let ports = slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or(0),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .collect();
    (slice.address_type.clone(), ports)
}

/// The legacy `Endpoints` of `service` (for old clients), mirroring what its slices of the
/// primary IP family hold: ready endpoints as addresses, the others (not terminating) as
/// notReadyAddresses, one subset per set of resolved ports. None for a Service without a
/// selector: its Endpoints, if any, are someone else's.
pub fn legacy_endpoints(
    service: &Service,
    pods: &[&Pod],
    zone_of: &dyn Fn(&str) -> Option<String>,
) -> Option<Endpoints> {
    let spec = service.spec.as_ref()?;
    spec.selector.as_ref()?;
    let primary = spec
        .ip_families
        .as_ref()
        .and_then(|f| f.first().cloned())
        .unwrap_or_else(|| "IPv4".into());
    let mut subsets = Vec::new();
    for ((family, ports), endpoints) in wanted(service, pods, zone_of) {
        if family != primary {
            continue;
        }
        let address = |e: &Endpoint| EndpointAddress {
            ip: e.addresses[0].clone(),
            node_name: e.node_name.clone(),
            target_ref: e.target_ref.clone(),
            hostname: None,
        };
        let conditions = |e: &Endpoint| e.conditions.clone().unwrap_or_default();
        let ready: Vec<EndpointAddress> = endpoints
            .iter()
            .filter(|e| conditions(e).ready == Some(true))
            .map(address)
            .collect();
        let not_ready: Vec<EndpointAddress> = endpoints
            .iter()
            .filter(|e| {
                conditions(e).ready != Some(true) && conditions(e).terminating != Some(true)
            })
            .map(address)
            .collect();
        if ready.is_empty() && not_ready.is_empty() {
            continue;
        }
        subsets.push(EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, protocol)| CoreEndpointPort {
                        name: (!name.is_empty()).then(|| name.clone()),
                        port: *port,
                        protocol: Some(protocol.clone()),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        });
    }
    Some(Endpoints {
        metadata: ObjectMeta {
            name: service.metadata.name.clone(),
            namespace: service.metadata.namespace.clone(),
            labels: service.metadata.labels.clone(),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    })
}

/// The slices of `service` this controller manages, among `slices`.
pub fn managed<'a>(
    service: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<&'a EndpointSlice> {
    let name = service.metadata.name.as_deref();
    slices
        .into_iter()
        .filter(|s| {
            let labels = s.metadata.labels.as_ref();
            s.metadata.namespace == service.metadata.namespace
                && labels
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == name
                && labels
                    .and_then(|l| l.get(MANAGED_BY_LABEL))
                    .map(String::as_str)
                    == Some(CONTROLLER_NAME)
        })
        .collect()
}

/// The writes that make `existing` (this Service's managed slices) what `service` and `pods`
/// call for. A Service without a selector gets none of its slices touched but managed ones
/// deleted (someone else owns its endpoints).
pub fn reconcile(
    service: &Service,
    pods: &[&Pod],
    existing: &[&EndpointSlice],
    zone_of: &dyn Fn(&str) -> Option<String>,
) -> Vec<SliceOp> {
    reconcile_with_zones(service, pods, existing, zone_of, None)
}

/// [`reconcile`] knowing each zone's share of the cluster's CPU
/// ([`topologycache::zone_ratios`](super::topologycache::zone_ratios)), which Services
/// annotated `service.kubernetes.io/topology-mode: Auto` need for their hints (without it they
/// get none, as kube's controller without sufficient node information).
pub fn reconcile_with_zones(
    service: &Service,
    pods: &[&Pod],
    existing: &[&EndpointSlice],
    zone_of: &dyn Fn(&str) -> Option<String>,
    zone_ratios: Option<&BTreeMap<String, f64>>,
) -> Vec<SliceOp> {
    let name = service.metadata.name.clone().unwrap_or_default();
    let mut wanted_slices: Vec<EndpointSlice> = Vec::new();
    let mut by_key = wanted(service, pods, zone_of);
    if super::topologycache::hints_enabled(service.metadata.annotations.as_ref()) {
        // Hints are allocated per address type, over all of its slices (`SliceInfo`).
        let families: BTreeSet<String> = by_key.keys().map(|(f, _)| f.clone()).collect();
        for family in families {
            let mut endpoints: Vec<&mut Endpoint> = by_key
                .iter_mut()
                .filter(|((f, _), _)| *f == family)
                .flat_map(|(_, eps)| eps.iter_mut())
                .collect();
            super::topologycache::add_hints(&mut endpoints, zone_ratios);
        }
    }
    for ((family, ports), endpoints) in by_key {
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            wanted_slices.push(EndpointSlice {
                address_type: family.clone(),
                endpoints: chunk.to_vec(),
                ports: Some(slice_ports(&ports)),
                metadata: ObjectMeta::default(),
            });
        }
    }
    // A Service with a selector but no endpoints still has one (empty) slice per family, so
    // clients can tell "no endpoints" from "not yet reconciled".
    if wanted_slices.is_empty()
        && service
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some()
    {
        let family = service
            .spec
            .as_ref()
            .and_then(|s| s.ip_families.as_ref())
            .and_then(|f| f.first().cloned())
            .unwrap_or_else(|| "IPv4".into());
        wanted_slices.push(EndpointSlice {
            address_type: family,
            endpoints: Vec::new(),
            ports: Some(Vec::new()),
            metadata: ObjectMeta::default(),
        });
    }
    let mut ops = Vec::new();
    let mut unused: Vec<&EndpointSlice> = existing.to_vec();
    unused.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let labels: BTreeMap<String, String> = [
        (SERVICE_NAME_LABEL.to_string(), name.clone()),
        (MANAGED_BY_LABEL.to_string(), CONTROLLER_NAME.to_string()),
    ]
    .into();
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: name.clone(),
        uid: service.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut kept = BTreeSet::new();
    for mut slice in wanted_slices {
        // Reuse a slice of the same family and ports first, then any other (update in place).
        let key = key_of(&slice);
        let reuse = unused.iter().position(|s| key_of(s) == key).or_else(|| {
            unused
                .iter()
                .position(|s| s.address_type == slice.address_type)
        });
        match reuse.map(|i| unused.remove(i)) {
            Some(old) => {
                kept.insert(old.metadata.name.clone());
                let same = old.endpoints == slice.endpoints
                    && old.ports == slice.ports
                    && old.metadata.labels.as_ref() == Some(&labels);
                if !same {
                    slice.metadata = old.metadata.clone();
                    slice.metadata.labels = Some(labels.clone());
                    ops.push(SliceOp::Update(slice));
                }
            }
            None => {
                slice.metadata = ObjectMeta {
                    generate_name: Some(format!("{name}-")),
                    namespace: service.metadata.namespace.clone(),
                    labels: Some(labels.clone()),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                };
                ops.push(SliceOp::Create(slice));
            }
        }
    }
    for old in unused {
        if let Some(n) = &old.metadata.name {
            ops.push(SliceOp::Delete(n.clone()));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn service(spec: Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "default", "uid": "u1"}, "spec": spec}),
        )
        .expect("service")
    }

    fn pod(name: &str, ip: &str, labels: Value, ready: bool, extra: Value) -> Pod {
        let mut p = json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        if let (Some(target), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if let (Some(Value::Object(into)), Value::Object(from)) = (target.get_mut(k), v) {
                    into.extend(from.clone());
                }
            }
        }
        serde_json::from_value(p).expect("pod")
    }

    fn zone(node: &str) -> Option<String> {
        (node == "node-1").then(|| "zone-a".to_string())
    }

    /// Ops as text: `create IPv4 [http:8080/TCP] 198.19.1.10(ready) ...`.
    fn text(ops: &[SliceOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                SliceOp::Delete(name) => format!("delete {name}"),
                SliceOp::Create(s) | SliceOp::Update(s) => {
                    let verb = if matches!(op, SliceOp::Create(_)) {
                        "create"
                    } else {
                        "update"
                    };
                    let ports: Vec<String> = s
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| {
                            format!(
                                "{}:{}/{}",
                                p.name.clone().unwrap_or_default(),
                                p.port.unwrap_or(0),
                                p.protocol.clone().unwrap_or_default()
                            )
                        })
                        .collect();
                    let eps: Vec<String> = s
                        .endpoints
                        .iter()
                        .map(|e| {
                            let c = e.conditions.clone().unwrap_or_default();
                            let mut flags = Vec::new();
                            if c.ready == Some(true) {
                                flags.push("ready");
                            }
                            if c.serving == Some(true) {
                                flags.push("serving");
                            }
                            if c.terminating == Some(true) {
                                flags.push("terminating");
                            }
                            format!("{}({})", e.addresses[0], flags.join(","))
                        })
                        .collect();
                    let name = s.metadata.name.clone().unwrap_or_else(|| {
                        format!("{}*", s.metadata.generate_name.clone().unwrap_or_default())
                    });
                    format!(
                        "{verb} {name} {} [{}] {}",
                        s.address_type,
                        ports.join(" "),
                        eps.join(" ")
                    )
                }
            })
            .collect()
    }

    #[test]
    fn selected_pods_become_one_slice_with_conditions_node_and_zone() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
        );
        let pods = [
            pod("b", "198.19.1.11", json!({"app": "web"}), true, json!({})),
            pod("a", "198.19.1.10", json!({"app": "web"}), true, json!({})),
            pod("c", "198.19.1.12", json!({"app": "web"}), false, json!({})),
            pod(
                "d",
                "198.19.1.13",
                json!({"app": "web"}),
                true,
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
            pod("x", "198.19.1.14", json!({"app": "other"}), true, json!({})),
            pod(
                "f",
                "198.19.1.15",
                json!({"app": "web"}),
                true,
                json!({"status": {"phase": "Succeeded"}}),
            ),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let ops = reconcile(&svc, &refs, &[], &zone);
        assert_eq!(
            text(&ops),
            ["create web-* IPv4 [http:8080/TCP] 198.19.1.10(ready,serving) 198.19.1.11(ready,serving) 198.19.1.12() 198.19.1.13(serving,terminating)"]
        );
        let SliceOp::Create(slice) = &ops[0] else {
            panic!("create")
        };
        let first = &slice.endpoints[0];
        assert_eq!(first.node_name.as_deref(), Some("node-1"));
        assert_eq!(first.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            first.target_ref.as_ref().and_then(|r| r.name.as_deref()),
            Some("a")
        );
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(SERVICE_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        assert_eq!(
            labels.get(MANAGED_BY_LABEL).map(String::as_str),
            Some(CONTROLLER_NAME)
        );
    }

    #[test]
    fn legacy_endpoints_mirror_ready_and_not_ready_addresses() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
        );
        let pods = [
            pod("a", "198.19.1.10", json!({"app": "web"}), true, json!({})),
            pod("c", "198.19.1.12", json!({"app": "web"}), false, json!({})),
            pod(
                "d",
                "198.19.1.13",
                json!({"app": "web"}),
                true,
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let endpoints = legacy_endpoints(&svc, &refs, &zone).expect("a selector");
        let subsets = endpoints.subsets.expect("one subset");
        let ips = |a: &Option<Vec<EndpointAddress>>| -> Vec<String> {
            a.iter().flatten().map(|x| x.ip.clone()).collect()
        };
        assert_eq!(ips(&subsets[0].addresses), ["198.19.1.10"]);
        assert_eq!(
            ips(&subsets[0].not_ready_addresses),
            ["198.19.1.12"],
            "terminating ones are left out"
        );
        assert_eq!(subsets[0].ports.as_ref().map(|p| p[0].port), Some(8080));
        assert!(
            legacy_endpoints(&service(json!({"ports": [{"port": 80}]})), &refs, &zone).is_none()
        );
    }

    #[test]
    fn publish_not_ready_addresses_makes_every_endpoint_ready() {
        let svc = service(
            json!({"selector": {"app": "web"}, "publishNotReadyAddresses": true, "ports": [{"port": 80}]}),
        );
        let pods = [pod(
            "c",
            "198.19.1.12",
            json!({"app": "web"}),
            false,
            json!({}),
        )];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert_eq!(
            text(&reconcile(&svc, &refs, &[], &zone)),
            ["create web-* IPv4 [:80/TCP] 198.19.1.12(ready,serving)"]
        );
    }

    #[test]
    fn a_named_port_resolves_per_pod_and_large_services_split_at_100() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
        );
        let mut pods: Vec<Pod> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    &format!("198.19.{}.{}", 1 + i / 200, 10 + i % 200),
                    json!({"app": "web"}),
                    true,
                    json!({}),
                )
            })
            .collect();
        pods.push(pod("other-port", "198.19.9.9", json!({"app": "web"}), true,
            json!({"spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"name": "http", "containerPort": 9090}]}]}})));
        let refs: Vec<&Pod> = pods.iter().collect();
        let ops = reconcile(&svc, &refs, &[], &zone);
        let sizes: Vec<(i32, usize)> = ops
            .iter()
            .map(|op| match op {
                SliceOp::Create(s) => (
                    s.ports.as_ref().map_or(0, |p| p[0].port.unwrap_or(0)),
                    s.endpoints.len(),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [(8080, 100), (8080, 100), (8080, 50), (9090, 1)]);
    }

    #[test]
    fn slices_are_updated_in_place_and_left_alone_when_nothing_changed() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}),
        );
        let pods = [
            pod("a", "198.19.1.10", json!({"app": "web"}), true, json!({})),
            pod("b", "198.19.1.11", json!({"app": "web"}), true, json!({})),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let SliceOp::Create(mut existing) = reconcile(&svc, &refs, &[], &zone).remove(0) else {
            panic!("create")
        };
        existing.metadata.name = Some("web-abcde".into());
        existing.metadata.resource_version = Some("7".into());
        assert!(
            reconcile(&svc, &refs, &[&existing], &zone).is_empty(),
            "nothing changed"
        );
        let ops = reconcile(&svc, &refs[..1], &[&existing], &zone);
        assert_eq!(
            text(&ops),
            ["update web-abcde IPv4 [:8080/TCP] 198.19.1.10(ready,serving)"]
        );
        let SliceOp::Update(updated) = &ops[0] else {
            panic!("update")
        };
        assert_eq!(updated.metadata.resource_version.as_deref(), Some("7"));
        // Every pod gone: the slice stays, empty; the selector removed: the slice goes.
        assert_eq!(
            text(&reconcile(&svc, &[], &[&existing], &zone)),
            ["update web-abcde IPv4 [] "]
        );
        let headless = service(json!({"ports": [{"port": 80}]}));
        assert_eq!(
            text(&reconcile(&headless, &refs, &[&existing], &zone)),
            ["delete web-abcde"]
        );
    }

    /// Each endpoint's `zone` and hints as text: `198.19.1.10 zone-a z=zone-a n=node-1`.
    fn hints_text(ops: &[SliceOp]) -> Vec<String> {
        ops.iter()
            .flat_map(|op| match op {
                SliceOp::Create(s) | SliceOp::Update(s) => s.endpoints.clone(),
                SliceOp::Delete(_) => Vec::new(),
            })
            .map(|e| {
                let h = e.hints.clone().unwrap_or_default();
                let zones: Vec<String> = h
                    .for_zones
                    .iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect();
                let nodes: Vec<String> = h
                    .for_nodes
                    .iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect();
                format!(
                    "{} {} z={} n={}",
                    e.addresses[0],
                    e.zone.clone().unwrap_or_else(|| "-".into()),
                    zones.join("|"),
                    nodes.join("|")
                )
            })
            .collect()
    }

    #[test]
    fn traffic_distribution_sets_hints_as_kube_controller_manager() {
        let on = |node: &str| json!({"spec": {"nodeName": node}});
        let pods = [
            pod(
                "a",
                "198.19.1.10",
                json!({"app": "web"}),
                true,
                on("node-1"),
            ),
            pod(
                "b",
                "198.19.2.10",
                json!({"app": "web"}),
                true,
                on("node-2"),
            ),
            pod(
                "c",
                "198.19.1.11",
                json!({"app": "web"}),
                false,
                on("node-1"),
            ),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let with = |distribution: Value| {
            let mut spec = json!({"selector": {"app": "web"}, "ports": [{"port": 80}]});
            spec["trafficDistribution"] = distribution;
            hints_text(&reconcile(&service(spec), &refs, &[], &zone))
        };
        // trafficdist.preferCloseHeuristic: ready endpoints get their own zone; node-2 has no
        // zone label, so its endpoint gets no zone hint; unready ones get none.
        let close = [
            "198.19.1.10 zone-a z=zone-a n=",
            "198.19.1.11 zone-a z= n=",
            "198.19.2.10 - z= n=",
        ];
        assert_eq!(with(json!("PreferClose")), close);
        assert_eq!(with(json!("PreferSameZone")), close);
        assert_eq!(
            with(json!("PreferSameNode")),
            [
                "198.19.1.10 zone-a z=zone-a n=node-1",
                "198.19.1.11 zone-a z= n=",
                "198.19.2.10 - z= n=node-2",
            ]
        );
        // defaultHeuristic: no hints.
        let none = [
            "198.19.1.10 zone-a z= n=",
            "198.19.1.11 zone-a z= n=",
            "198.19.2.10 - z= n=",
        ];
        assert_eq!(with(Value::Null), none);
        assert_eq!(with(json!("SomethingElse")), none);
    }

    #[test]
    fn hints_follow_a_changed_traffic_distribution() {
        let pods = [pod(
            "a",
            "198.19.1.10",
            json!({"app": "web"}),
            true,
            json!({}),
        )];
        let refs: Vec<&Pod> = pods.iter().collect();
        let close = service(
            json!({"selector": {"app": "web"}, "trafficDistribution": "PreferClose", "ports": [{"port": 80}]}),
        );
        let SliceOp::Create(mut existing) = reconcile(&close, &refs, &[], &zone).remove(0) else {
            panic!("create")
        };
        existing.metadata.name = Some("web-abcde".into());
        assert!(
            reconcile(&close, &refs, &[&existing], &zone).is_empty(),
            "hints in place"
        );
        let plain = service(json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}));
        let ops = reconcile(&plain, &refs, &[&existing], &zone);
        assert_eq!(
            hints_text(&ops),
            ["198.19.1.10 zone-a z= n="],
            "stale hints removed"
        );
        assert!(matches!(ops[0], SliceOp::Update(_)));
    }

    #[test]
    fn the_topology_mode_annotation_wins_over_traffic_distribution() {
        let on = |node: &str| json!({"spec": {"nodeName": node}});
        let pods = [
            pod(
                "a",
                "198.19.1.10",
                json!({"app": "web"}),
                true,
                on("node-1"),
            ),
            pod(
                "b",
                "198.19.2.10",
                json!({"app": "web"}),
                true,
                on("node-2"),
            ),
        ];
        let refs: Vec<&Pod> = pods.iter().collect();
        let mut svc = service(
            json!({"selector": {"app": "web"}, "trafficDistribution": "PreferSameNode", "ports": [{"port": 80}]}),
        );
        svc.metadata.annotations = Some(
            [(
                "service.kubernetes.io/topology-mode".to_string(),
                "Auto".to_string(),
            )]
            .into(),
        );
        let zones =
            |node: &str| Some(if node == "node-1" { "zone-a" } else { "zone-b" }.to_string());
        let ratios: BTreeMap<String, f64> =
            [("zone-a".to_string(), 0.5), ("zone-b".to_string(), 0.5)].into();
        assert_eq!(
            hints_text(&reconcile_with_zones(
                &svc,
                &refs,
                &[],
                &zones,
                Some(&ratios)
            )),
            [
                "198.19.1.10 zone-a z=zone-a n=",
                "198.19.2.10 zone-b z=zone-b n="
            ],
            "the topology cache's zone hints, no node hints"
        );
        assert_eq!(
            hints_text(&reconcile_with_zones(&svc, &refs, &[], &zones, None)),
            ["198.19.1.10 zone-a z= n=", "198.19.2.10 zone-b z= n="],
            "no node information: no hints"
        );
    }
}
