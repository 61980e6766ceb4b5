//! The scheduler's decision, pure: for a pod without a node, the nodes that can run it
//! (filters: node ready and schedulable, taints tolerated, nodeSelector and required node
//! affinity, resource requests within allocatable, host ports free) and the best of them
//! (scores: least allocated, and fewest replicas of the same controller), or why none fits,
//! worded as kube-scheduler words it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// CPU in millicores and memory in bytes, from a Kubernetes quantity.
pub fn millis(q: &Quantity) -> i64 {
    let s = q.0.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<f64>().map_or(0, |v| v as i64);
    }
    s.parse::<f64>().map_or(0, |v| (v * 1000.0) as i64)
}

pub fn bytes(q: &Quantity) -> i64 {
    let s = q.0.trim();
    const UNITS: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (unit, factor) in UNITS {
        if let Some(n) = s.strip_suffix(unit) {
            return n.parse::<f64>().map_or(0, |v| (v * factor) as i64);
        }
    }
    s.parse::<f64>().map_or(0, |v| v as i64)
}

/// What a pod asks for: CPU millicores, memory bytes, host ports `(protocol, port)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub cpu: i64,
    pub memory: i64,
    pub host_ports: Vec<(String, i32)>,
}

pub fn request(pod: &Pod) -> Request {
    let mut r = Request::default();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        if let Some(req) = c.resources.as_ref().and_then(|x| x.requests.as_ref()) {
            r.cpu += req.get("cpu").map_or(0, millis);
            r.memory += req.get("memory").map_or(0, bytes);
        }
        for p in c.ports.iter().flatten() {
            if let Some(hp) = p.host_port.filter(|p| *p > 0) {
                r.host_ports
                    .push((p.protocol.clone().unwrap_or_else(|| "TCP".into()), hp));
            }
        }
    }
    r
}

/// A node as the scheduler sees it, with what its pods already use.
#[derive(Debug, Clone)]
pub struct NodeState<'a> {
    pub node: &'a Node,
    pub used: Request,
    pub pods: usize,
    /// Pods on the node per controller uid (for spreading).
    pub by_owner: BTreeMap<String, usize>,
}

impl<'a> NodeState<'a> {
    pub fn new(node: &'a Node) -> Self {
        Self {
            node,
            used: Request::default(),
            pods: 0,
            by_owner: BTreeMap::new(),
        }
    }

    /// Accounts `pod` as running here.
    pub fn add(&mut self, pod: &Pod) {
        let r = request(pod);
        self.used.cpu += r.cpu;
        self.used.memory += r.memory;
        self.used.host_ports.extend(r.host_ports);
        self.pods += 1;
        if let Some(uid) = owner_uid(pod) {
            *self.by_owner.entry(uid).or_default() += 1;
        }
    }

    fn allocatable(&self, what: &str) -> Option<&Quantity> {
        let status = self.node.status.as_ref()?;
        status
            .allocatable
            .as_ref()
            .or(status.capacity.as_ref())?
            .get(what)
    }
}

fn owner_uid(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn tolerated(pod: &Pod, taint: &Taint) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.tolerations.iter().flatten())
        .any(|t| {
            let key_ok = match t.key.as_deref() {
                None | Some("") => t.operator.as_deref() == Some("Exists"),
                Some(k) => k == taint.key,
            };
            let value_ok = t.operator.as_deref() == Some("Exists")
                || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
            let effect_ok = t
                .effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == taint.effect);
            key_ok && value_ok && effect_ok
        })
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn affinity_matches(pod: &Pod, labels: &BTreeMap<String, String>) -> bool {
    let spec = pod.spec.as_ref();
    let selector_ok = spec
        .and_then(|s| s.node_selector.as_ref())
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let required = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    // Terms are ORed, the expressions of a term ANDed.
    let affinity_ok = required.is_none_or(|r| {
        r.node_selector_terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|e| requirement_matches(e, labels))
        })
    });
    selector_ok && affinity_ok
}

/// Why `node` cannot run `pod`, as kube-scheduler's reason, or None if it can.
pub fn unfit(pod: &Pod, state: &NodeState) -> Option<String> {
    let node = state.node;
    if !node_ready(node) {
        return Some("node(s) were not ready".into());
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Some("node(s) were unschedulable".into());
    }
    for taint in node.spec.iter().flat_map(|s| s.taints.iter().flatten()) {
        if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute") && !tolerated(pod, taint) {
            return Some(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.as_deref().unwrap_or("")
            ));
        }
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if !affinity_matches(pod, &labels) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    let want = request(pod);
    if let Some(cpu) = state.allocatable("cpu") {
        if state.used.cpu + want.cpu > millis(cpu) {
            return Some("Insufficient cpu".into());
        }
    }
    if let Some(memory) = state.allocatable("memory") {
        if state.used.memory + want.memory > bytes(memory) {
            return Some("Insufficient memory".into());
        }
    }
    if let Some(pods) = state.allocatable("pods") {
        if state.pods as i64 + 1 > millis(pods) / 1000 {
            return Some("Too many pods".into());
        }
    }
    if want
        .host_ports
        .iter()
        .any(|p| state.used.host_ports.contains(p))
    {
        return Some("node(s) didn't have free ports for the requested pod ports".into());
    }
    None
}

/// Higher is better: the share of CPU and memory left after the pod (0–100), minus a spread
/// penalty for every replica of the same controller already there.
pub fn score(pod: &Pod, state: &NodeState) -> i64 {
    let want = request(pod);
    let left = |used: i64, alloc: Option<i64>| match alloc {
        Some(a) if a > 0 => ((a - used).max(0) * 100) / a,
        _ => 100,
    };
    let cpu = left(
        state.used.cpu + want.cpu,
        state.allocatable("cpu").map(millis),
    );
    let memory = left(
        state.used.memory + want.memory,
        state.allocatable("memory").map(bytes),
    );
    let same_owner = owner_uid(pod)
        .and_then(|uid| state.by_owner.get(&uid).copied())
        .unwrap_or(0);
    (cpu + memory) / 2 - 10 * same_owner as i64
}

/// The node for `pod`, or the `PodScheduled=False` message: `0/3 nodes are available: 1
/// Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector.`
pub fn pick<'a>(pod: &Pod, nodes: &[NodeState<'a>]) -> Result<usize, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(i64, usize)> = None;
    for (i, state) in nodes.iter().enumerate() {
        match unfit(pod, state) {
            Some(why) => *reasons.entry(why).or_default() += 1,
            None => {
                let s = score(pod, state);
                // Ties go to the first node by name (nodes come sorted).
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i));
                }
            }
        }
    }
    match best {
        Some((_, i)) => Ok(i),
        None => {
            let parts: Vec<String> = reasons
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            Err(format!(
                "0/{} nodes are available: {}.",
                nodes.len(),
                parts.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn node(name: &str, labels: Value, cpu: &str, memory: &str, extra: Value) -> Node {
        let mut n = json!({"metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]}});
        if let Some(spec) = extra.get("spec") {
            n["spec"] = spec.clone();
        }
        serde_json::from_value(n).expect("node")
    }

    fn pod(spec: Value) -> Pod {
        let mut s = json!({"containers": [{"name": "c", "image": "nginx"}]});
        if let (Some(into), Some(from)) = (s.as_object_mut(), spec.as_object()) {
            into.extend(from.clone());
        }
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "default"}, "spec": s}),
        )
        .expect("pod")
    }

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(millis(&Quantity("250m".into())), 250);
        assert_eq!(millis(&Quantity("2".into())), 2000);
        assert_eq!(bytes(&Quantity("128Mi".into())), 134_217_728);
        assert_eq!(bytes(&Quantity("1G".into())), 1_000_000_000);
    }

    #[test]
    fn every_filter_names_its_reason_and_the_message_counts_them() {
        let nodes = [
            node("a-small", json!({"disk": "ssd"}), "500m", "1Gi", json!({})),
            node(
                "b-tainted",
                json!({"disk": "ssd"}),
                "4",
                "8Gi",
                json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
            ),
            node("c-hdd", json!({"disk": "hdd"}), "4", "8Gi", json!({})),
        ];
        let states: Vec<NodeState> = nodes.iter().map(NodeState::new).collect();
        let p = pod(json!({"nodeSelector": {"disk": "ssd"},
            "containers": [{"name": "c", "image": "nginx", "resources": {"requests": {"cpu": "1"}}}]}));
        assert_eq!(
            pick(&p, &states),
            Err("0/3 nodes are available: 1 Insufficient cpu, 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint {dedicated: db}.".into())
        );
        // Tolerating the taint makes b fit.
        let tolerant = pod(
            json!({"nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
            "containers": [{"name": "c", "image": "nginx", "resources": {"requests": {"cpu": "1"}}}]}),
        );
        assert_eq!(pick(&tolerant, &states), Ok(1));
        // Required node affinity: In / NotIn.
        let affine = pod(
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["hdd"]}]}]}}}}),
        );
        assert_eq!(pick(&affine, &states), Ok(2));
    }

    #[test]
    fn host_ports_collide_and_scores_prefer_the_emptier_node_and_spread_replicas() {
        let nodes = [
            node("n1", json!({}), "4", "8Gi", json!({})),
            node("n2", json!({}), "4", "8Gi", json!({})),
        ];
        let mut states: Vec<NodeState> = nodes.iter().map(NodeState::new).collect();
        let busy = pod(
            json!({"containers": [{"name": "c", "image": "nginx", "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}, "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
        );
        states[0].add(&busy);
        let p = pod(
            json!({"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
        );
        assert_eq!(
            unfit(&p, &states[0]).as_deref(),
            Some("node(s) didn't have free ports for the requested pod ports")
        );
        let plain = pod(json!({}));
        assert_eq!(pick(&plain, &states), Ok(1), "the less allocated node");
        // Replicas of one controller spread: with one already on n2, the next goes to n1.
        let mut replica = pod(json!({}));
        replica.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "web".into(),
                uid: "rs-1".into(),
                controller: Some(true),
                block_owner_deletion: None,
            },
        ]);
        let empty: Vec<NodeState> = nodes.iter().map(NodeState::new).collect();
        let mut spread = empty.clone();
        spread[0].add(&replica);
        assert_eq!(pick(&replica, &spread), Ok(1));
        spread[1].add(&replica);
        spread[1].add(&replica);
        assert_eq!(pick(&replica, &spread), Ok(0));
    }
}
