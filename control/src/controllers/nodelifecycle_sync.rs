//! The node lifecycle loop: every half second, each node's heartbeat is checked
//! (`nodelifecycle::decide`); a silent node is marked `Ready=Unknown`, its pods not ready (so
//! their endpoints stop receiving traffic), and past the eviction timeout its pods are deleted.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};

use super::cache::Cache;
use super::nodelifecycle::{decide, unknown_condition, Timing};
use crate::client::{reflector, Api, Client, ClientError, Patch, ReflectorOptions};

/// The object's conditions with the one of `type_` replaced (a merge patch replaces the list).
fn with_condition(conditions: Option<Vec<Value>>, new: Value) -> Vec<Value> {
    let type_ = new["type"].clone();
    let mut out: Vec<Value> = conditions
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["type"] != type_)
        .collect();
    out.push(new);
    out
}

fn conditions_of<T: serde::Serialize>(status: Option<&T>) -> Option<Vec<Value>> {
    let value = serde_json::to_value(status?).ok()?;
    value["conditions"].as_array().cloned()
}

/// Runs the controller until `shutdown` completes.
pub async fn run(client: Client, timing: Timing, shutdown: impl std::future::Future<Output = ()>) {
    let mut nodes = reflector(
        Api::<Node>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut pods = reflector(Api::<Pod>::all(client.clone()), ReflectorOptions::default());
    let mut node_cache = Cache::<Node>::new();
    let mut pod_cache = Cache::<Pod>::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(e) = nodes.events.recv() => { node_cache.apply(e); }
            Some(e) = pods.events.recv() => { pod_cache.apply(e); }
            _ = tick.tick() => {
                if !(node_cache.synced && pod_cache.synced) {
                    continue;
                }
                if let Err(e) = pass(&client, &node_cache, &pod_cache, timing).await {
                    tracing::warn!(error = %e, "node lifecycle pass failed; retrying");
                }
            }
        }
    }
}

async fn pass(
    client: &Client,
    nodes: &Cache<Node>,
    pods: &Cache<Pod>,
    timing: Timing,
) -> Result<(), ClientError> {
    let now = chrono::Utc::now();
    let all_pods: Vec<&Pod> = pods.objects.values().collect();
    let node_api: Api<Node> = Api::all(client.clone());
    for node in nodes.objects.values() {
        let action = decide(node, &all_pods, now, timing);
        let name = node.metadata.name.clone().unwrap_or_default();
        if action.mark_unknown {
            let heartbeat = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .and_then(|c| c.last_heartbeat_time.as_ref())
                .and_then(|t| super::nodelifecycle::to_chrono(&t.0));
            let conditions = with_condition(
                conditions_of(node.status.as_ref()),
                unknown_condition(now, heartbeat),
            );
            node_api
                .patch_status(
                    &name,
                    Patch::Merge,
                    &json!({"status": {"conditions": conditions}}),
                )
                .await?;
            tracing::warn!(node = %name, "node stopped posting its status: Ready=Unknown");
        }
        for (namespace, pod) in &action.unready_pods {
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let current = pods.objects.get(&(namespace.clone(), pod.clone()));
            let conditions = with_condition(
                conditions_of(current.and_then(|p| p.status.as_ref())),
                json!({"type": "Ready", "status": "False", "reason": "NodeNotReady",
                    "lastTransitionTime": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}),
            );
            match api
                .patch_status(
                    pod,
                    Patch::Merge,
                    &json!({"status": {"conditions": conditions}}),
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        for (namespace, pod) in &action.evict {
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            // The kubelet is gone and cannot confirm a graceful end: the pod object goes now.
            match api.delete_with_grace(pod, 0).await {
                Ok(_) => {
                    tracing::warn!(node = %name, pod = %format!("{namespace}/{pod}"), "evicted")
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Starts the controller on a task (it runs for the life of the process).
pub fn spawn(client: Client, timing: Timing) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, timing, std::future::pending()))
}
