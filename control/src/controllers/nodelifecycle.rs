//! The node lifecycle decision, pure: a node whose kubelet stopped posting its status (its
//! Ready condition's heartbeat older than the grace period) becomes `Ready=Unknown` and its
//! pods stop being ready; past the eviction timeout its pods are deleted, so their controllers
//! replace them on other nodes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// kube-controller-manager's `--node-monitor-grace-period` (40 s).
    pub grace: Duration,
    /// How long after that its pods are evicted (kube: 300 s of NoExecute toleration).
    pub eviction: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(40),
            eviction: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Action {
    /// Set the node's Ready condition to Unknown.
    pub mark_unknown: bool,
    /// Pods on the node whose Ready condition must become False.
    pub unready_pods: Vec<(String, String)>,
    /// Pods on the node to delete (evicted).
    pub evict: Vec<(String, String)>,
}

/// A Kubernetes timestamp as chrono's.
pub fn to_chrono(t: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32)
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The condition written when the kubelet went silent.
pub fn unknown_condition(
    since: DateTime<Utc>,
    last_heartbeat: Option<DateTime<Utc>>,
) -> serde_json::Value {
    serde_json::json!({
        "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
        "lastTransitionTime": since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "lastHeartbeatTime": last_heartbeat.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    })
}

/// What to do about `node` at `now`, given the pods bound to it.
pub fn decide(node: &Node, pods: &[&Pod], now: DateTime<Utc>, timing: Timing) -> Action {
    let mut action = Action::default();
    let Some(ready) = ready_condition(node) else {
        return action;
    };
    let heartbeat = ready
        .last_heartbeat_time
        .as_ref()
        .or(ready.last_transition_time.as_ref())
        .and_then(|t| to_chrono(&t.0));
    let Some(heartbeat) = heartbeat else {
        return action;
    };
    let silent = (now - heartbeat).to_std().unwrap_or(Duration::ZERO);
    if silent <= timing.grace {
        return action;
    }
    action.mark_unknown = ready.status != "Unknown";
    let name = node.metadata.name.as_deref();
    let on_node = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == name);
    for pod in on_node {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        if silent > timing.grace + timing.eviction {
            action.evict.push(key);
        } else if pod_ready(pod) {
            action.unready_pods.push(key);
        }
    }
    action
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(status: &str, heartbeat: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "node-1"},
            "status": {"conditions": [{"type": "Ready", "status": status, "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}))
        .expect("node")
    }

    fn pod(name: &str, node: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
        .expect("pod")
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("time")
    }

    #[test]
    fn a_silent_node_goes_unknown_then_its_pods_are_evicted() {
        let timing = Timing {
            grace: Duration::from_secs(40),
            eviction: Duration::from_secs(300),
        };
        let n = node("True", "2026-01-01T00:00:00Z");
        let (a, b, other) = (
            pod("a", "node-1", true),
            pod("b", "node-1", false),
            pod("c", "node-2", true),
        );
        let pods = [&a, &b, &other];
        // Within the grace period: nothing.
        assert_eq!(
            decide(&n, &pods, at("2026-01-01T00:00:30Z"), timing),
            Action::default()
        );
        // Past it: Unknown, and the ready pod on it stops being ready.
        let past = decide(&n, &pods, at("2026-01-01T00:01:00Z"), timing);
        assert!(past.mark_unknown);
        assert_eq!(
            past.unready_pods,
            [("default".to_string(), "a".to_string())]
        );
        assert!(past.evict.is_empty());
        // Already Unknown: not written again.
        let unknown = node("Unknown", "2026-01-01T00:00:00Z");
        assert!(!decide(&unknown, &pods, at("2026-01-01T00:01:00Z"), timing).mark_unknown);
        // Past the eviction timeout: every pod on the node goes, none elsewhere.
        let evicted = decide(&unknown, &pods, at("2026-01-01T00:06:00Z"), timing);
        assert_eq!(
            evicted.evict,
            [
                ("default".to_string(), "a".to_string()),
                ("default".to_string(), "b".to_string())
            ]
        );
    }
}
