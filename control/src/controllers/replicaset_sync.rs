//! The ReplicaSet / ReplicationController loop: reflectors over both kinds and Pods; a change
//! marks the workloads it can affect; each marked workload is decided (`replicaset::decide`)
//! and its pods adopted, created or deleted, its status written. Like kube-controller-manager
//! it waits to see its own creates and deletes in the pod cache (or 10 s) before deciding that
//! workload again, so a slow watch never makes it create twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use serde_json::json;

use super::cache::{key_of, Cache, Key};
use super::queue::{Backoff, RetryQueue};
use super::replicaset::{decide, owner_reference, Replicated};
use crate::client::events::{Involved, Recorder};
use crate::client::{reflector, Api, Client, ClientError, Patch, ReflectorOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ReplicaSet,
    ReplicationController,
}

/// Creates and deletes issued and not yet seen in the pod cache. Creates are the names the API
/// server gave the new pods: an adopted orphan's update (owner now this workload) is not one of
/// them (kube's expectations count pod additions only), else a pass could run before a new pod
/// is seen and create one more.
struct Expectations {
    creates: BTreeSet<String>,
    deletes: BTreeSet<String>,
    until: Instant,
}

/// Runs the controller until `shutdown` completes.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()>) {
    let mut sets = reflector(
        Api::<ReplicaSet>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut rcs = reflector(
        Api::<ReplicationController>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut pods = reflector(Api::<Pod>::all(client.clone()), ReflectorOptions::default());
    let mut set_cache = Cache::<ReplicaSet>::new();
    let mut rc_cache = Cache::<ReplicationController>::new();
    let mut pod_cache = Cache::<Pod>::new();
    let mut dirty: BTreeSet<(Kind, Key)> = BTreeSet::new();
    let mut expected: BTreeMap<(Kind, Key), Expectations> = BTreeMap::new();
    // A failed pass is retried after kube's controller backoff (5 ms doubling to 1000 s),
    // not on the next 20 ms round.
    let mut retries: RetryQueue<(Kind, Key)> = RetryQueue::new(Backoff::CONTROLLER);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let events = Recorder::new(client.clone(), "replicaset-controller", None);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(e) = sets.events.recv() => {
                dirty.extend(set_cache.apply(e).iter().map(|s| (Kind::ReplicaSet, key_of(s))));
            }
            Some(e) = rcs.events.recv() => {
                dirty.extend(rc_cache.apply(e).iter().map(|s| (Kind::ReplicationController, key_of(s))));
            }
            Some(e) = pods.events.recv() => {
                let deleted = matches!(e, crate::client::ReflectorEvent::Delete(_));
                for pod in pod_cache.apply(e) {
                    let (ns, name) = key_of(&pod);
                    let owner = pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
                    for (key, exp) in expected.iter_mut() {
                        if key.1.0 != ns {
                            continue;
                        }
                        if deleted || pod.metadata.deletion_timestamp.is_some() {
                            exp.deletes.remove(&name);
                        }
                        if owner.is_some_and(|o| o.name == key.1.1) || deleted {
                            exp.creates.remove(&name);
                        }
                    }
                    // Any workload of the namespace may own or select it.
                    dirty.extend(set_cache.objects.keys().filter(|k| k.0 == ns).map(|k| (Kind::ReplicaSet, k.clone())));
                    dirty.extend(rc_cache.objects.keys().filter(|k| k.0 == ns).map(|k| (Kind::ReplicationController, k.clone())));
                }
            }
            _ = tick.tick() => {
                dirty.extend(retries.due(Instant::now()));
                if dirty.is_empty() || !(set_cache.synced && rc_cache.synced && pod_cache.synced) {
                    continue;
                }
                let now = Instant::now();
                expected.retain(|_, e| (!e.creates.is_empty() || !e.deletes.is_empty()) && e.until > now);
                for item in std::mem::take(&mut dirty) {
                    if expected.contains_key(&item) {
                        dirty.insert(item); // still waiting to see its own writes
                        continue;
                    }
                    // A workload being deleted creates nothing more: its pods are the
                    // garbage collector's (or orphaned) now.
                    let workload: Option<Replicated> = match item.0 {
                        Kind::ReplicaSet => set_cache.objects.get(&item.1)
                            .filter(|o| o.metadata.deletion_timestamp.is_none())
                            .map(Replicated::from),
                        Kind::ReplicationController => rc_cache.objects.get(&item.1)
                            .filter(|o| o.metadata.deletion_timestamp.is_none())
                            .map(Replicated::from),
                    };
                    let Some(w) = workload else { retries.forget(&item); continue };
                    let namespace_pods: Vec<&Pod> = pod_cache.objects
                        .range((item.1.0.clone(), String::new())..)
                        .take_while(|((ns, _), _)| *ns == item.1.0)
                        .map(|(_, p)| p)
                        .collect();
                    match pass(&client, &events, &w, item.0, &namespace_pods).await {
                        Ok(Some(exp)) => { retries.forget(&item); expected.insert(item, exp); }
                        Ok(None) => retries.forget(&item),
                        Err(e) => {
                            let retry = retries.failed(item, Instant::now());
                            tracing::warn!(workload = %format!("{}/{}", w.namespace, w.name), error = %e, ?retry, "sync failed; retrying after a backoff");
                        }
                    }
                }
            }
        }
    }
}

/// One pass for `w`: adopt, create, delete, write status. Returns what to wait for.
async fn pass(
    client: &Client,
    events: &Arc<Recorder>,
    w: &Replicated,
    kind: Kind,
    pods: &[&Pod],
) -> Result<Option<Expectations>, ClientError> {
    let decision = decide(w, pods);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
    for name in &decision.adopt {
        let patch = json!({"metadata": {"ownerReferences": [owner_reference(w)]}});
        pod_api.patch(name, Patch::Merge, &patch).await?;
    }
    let about = Involved {
        kind: w.kind.to_string(),
        api_version: w.api_version.to_string(),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        uid: w.uid.clone(),
        field_path: None,
    };
    let mut creates = BTreeSet::new();
    for pod in &decision.create {
        // kube's replica_set.go: a refused create is a `FailedCreate` Warning on the workload.
        let created = pod_api.create(pod).await.inspect_err(|e| {
            events.warning(
                about.clone(),
                "FailedCreate",
                format!("Error creating: {e}"),
            );
        })?;
        let name = created.metadata.name.unwrap_or_default();
        creates.insert(name.clone());
        events.normal(
            about.clone(),
            "SuccessfulCreate",
            format!("Created pod: {name}"),
        );
    }
    for name in &decision.delete {
        match pod_api.delete(name).await {
            Ok(_) => events.normal(
                about.clone(),
                "SuccessfulDelete",
                format!("Deleted pod: {name}"),
            ),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let status = json!({"status": {
        "replicas": decision.status.replicas,
        "readyReplicas": decision.status.ready,
        "availableReplicas": decision.status.available,
        "fullyLabeledReplicas": decision.status.fully_labeled,
    }});
    // Only a new status is written: rewriting the same one would wake every watcher (and
    // this loop) for nothing.
    if decision.status != w.current {
        write_status(client, w, kind, &status).await?;
    }
    if decision.create.is_empty() && decision.delete.is_empty() {
        return Ok(None);
    }
    Ok(Some(Expectations {
        creates,
        deletes: decision.delete.iter().cloned().collect(),
        until: Instant::now() + Duration::from_secs(10),
    }))
}

async fn write_status(
    client: &Client,
    w: &Replicated,
    kind: Kind,
    status: &serde_json::Value,
) -> Result<(), ClientError> {
    match kind {
        Kind::ReplicaSet => {
            Api::<ReplicaSet>::namespaced(client.clone(), &w.namespace)
                .patch_status(&w.name, Patch::Merge, status)
                .await?;
        }
        Kind::ReplicationController => {
            Api::<ReplicationController>::namespaced(client.clone(), &w.namespace)
                .patch_status(&w.name, Patch::Merge, status)
                .await?;
        }
    }
    Ok(())
}

/// Starts the controller on a task (it runs for the life of the process).
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, std::future::pending()))
}
