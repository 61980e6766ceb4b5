//! The scheduler's loop: reflectors over Pods and Nodes; whenever either changed (and every
//! second for pods left unschedulable), every pod without a node is placed, oldest first,
//! through the binding subresource. Each placement is counted on its node before the next pod
//! is placed, so a burst spreads; a pod that fits nowhere gets `PodScheduled=False` with the
//! reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;

use super::cache::{Cache, Key};
use super::queue::{Backoff, RetryQueue};
use super::scheduler::{pick, NodeState};

use crate::client::events::{Involved, Recorder};
use crate::client::{reflector, Api, Client, ClientError, Patch, ReflectorOptions};

pub const SCHEDULER_NAME: &str = "default-scheduler";

fn pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.node_name.as_ref()).is_none()
        && pod.metadata.deletion_timestamp.is_none()
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|n| n == SCHEDULER_NAME)
}

fn unschedulable_message(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
        .message
        .as_deref()
}

/// Runs the scheduler until `shutdown` completes.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()>) {
    let mut pods = reflector(Api::<Pod>::all(client.clone()), ReflectorOptions::default());
    let mut nodes = reflector(
        Api::<Node>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut pod_cache = Cache::<Pod>::new();
    let mut node_cache = Cache::<Node>::new();
    let mut changed = false;
    let mut last_pass = Instant::now();
    // Pods bound but not yet seen bound in the cache (kube-scheduler's "assumed" pods): counted
    // on their node so the next placement does not ignore them.
    let mut assumed: BTreeMap<Key, (String, Instant)> = BTreeMap::new();
    // A failed pass is retried after a backoff (5 ms doubling), not on the next 20 ms round;
    // the once-a-second pass still runs.
    let mut retries: RetryQueue<()> = RetryQueue::new(Backoff::CONTROLLER);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let events = Recorder::new(client.clone(), "default-scheduler", None);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(e) = pods.events.recv() => { changed |= !pod_cache.apply(e).is_empty(); }
            Some(e) = nodes.events.recv() => { changed |= !node_cache.apply(e).is_empty(); }
            _ = tick.tick() => {
                let retry = !retries.due(Instant::now()).is_empty();
                let due = changed || retry || last_pass.elapsed() > Duration::from_secs(1);
                if !(due && pod_cache.synced && node_cache.synced) {
                    continue;
                }
                changed = false;
                last_pass = Instant::now();
                assumed.retain(|key, (_, at)| {
                    let bound = pod_cache.objects.get(key).is_none_or(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some());
                    !bound && at.elapsed() < Duration::from_secs(30)
                });
                match pass(&client, &events, &pod_cache, &node_cache, &mut assumed).await {
                    Ok(()) => retries.forget(&()),
                    Err(e) => {
                        let retry = retries.failed((), Instant::now());
                        tracing::warn!(error = %e, ?retry, "scheduling pass failed; retrying after a backoff");
                    }
                }
            }
        }
    }
}

async fn pass(
    client: &Client,
    events: &Arc<Recorder>,
    pods: &Cache<Pod>,
    nodes: &Cache<Node>,
    assumed: &mut BTreeMap<Key, (String, Instant)>,
) -> Result<(), ClientError> {
    let mut states: Vec<NodeState> = nodes.objects.values().map(NodeState::new).collect();
    let mut waiting: Vec<&Pod> = Vec::new();
    for (key, pod) in &pods.objects {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .or_else(|| assumed.get(key).map(|(n, _)| n.as_str()));
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        match node {
            Some(n) if !terminal => {
                if let Some(state) = states
                    .iter_mut()
                    .find(|s| s.node.metadata.name.as_deref() == Some(n))
                {
                    state.add(pod);
                }
            }
            None if pending(pod) => waiting.push(pod),
            _ => {}
        }
    }
    waiting.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.clone().map(|t| t.0),
            p.metadata.name.clone(),
        )
    });
    for pod in waiting {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match pick(pod, &states) {
            Ok(i) => {
                let node = states[i].node.metadata.name.clone().unwrap_or_default();
                let binding = json!({"apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name, "namespace": namespace},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
                match api.post_subresource(&name, "binding", &binding).await {
                    Ok(_) => {
                        events.normal(
                            Involved::of(pod),
                            "Scheduled",
                            format!("Successfully assigned {namespace}/{name} to {node}"),
                        );
                        states[i].add(pod);
                        assumed.insert((namespace.clone(), name.clone()), (node, Instant::now()));
                    }
                    // Bound or deleted meanwhile: the next pass sees it.
                    Err(e) if e.is_conflict() || e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Err(message) => {
                if unschedulable_message(pod) == Some(message.as_str()) {
                    continue;
                }
                events.warning(Involved::of(pod), "FailedScheduling", message.clone());
                let status = json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False",
                    "reason": "Unschedulable", "message": message}]}});
                match api.patch_status(&name, Patch::Merge, &status).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Starts the scheduler on a task (it runs for the life of the process).
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, std::future::pending()))
}
