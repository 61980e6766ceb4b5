//! The Deployment loop: reflectors over Deployments and ReplicaSets; a change marks the
//! Deployment it concerns; each marked Deployment is planned (`deployment::plan`) and its
//! ReplicaSets created, scaled or deleted, its status written when it changed. ReplicaSet
//! names come from the template hash, so a create repeated from a stale cache is a harmless
//! conflict.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use serde_json::json;

use super::cache::{key_of, Cache, Key};
use super::deployment::plan;
use super::queue::{Backoff, RetryQueue};
use crate::client::events::{Involved, Recorder};
use crate::client::{reflector, Api, Client, ClientError, Patch, ReflectorOptions};

/// Runs the controller until `shutdown` completes.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()>) {
    let mut deployments = reflector(
        Api::<Deployment>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut sets = reflector(
        Api::<ReplicaSet>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut d_cache = Cache::<Deployment>::new();
    let mut rs_cache = Cache::<ReplicaSet>::new();
    let mut dirty: BTreeSet<Key> = BTreeSet::new();
    // A failed pass is retried after kube's controller backoff (5 ms doubling to 1000 s),
    // not on the next 20 ms round.
    let mut retries: RetryQueue<Key> = RetryQueue::new(Backoff::CONTROLLER);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let events = Recorder::new(client.clone(), "deployment-controller", None);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(e) = deployments.events.recv() => {
                dirty.extend(d_cache.apply(e).iter().map(key_of));
            }
            Some(e) = sets.events.recv() => {
                for rs in rs_cache.apply(e) {
                    let ns = key_of(&rs).0;
                    for owner in rs.metadata.owner_references.iter().flatten() {
                        if owner.kind == "Deployment" && owner.controller == Some(true) {
                            dirty.insert((ns.clone(), owner.name.clone()));
                        }
                    }
                }
            }
            _ = tick.tick() => {
                dirty.extend(retries.due(Instant::now()));
                if dirty.is_empty() || !(d_cache.synced && rs_cache.synced) {
                    continue;
                }
                for key in std::mem::take(&mut dirty) {
                    // A Deployment being deleted makes no more ReplicaSets.
                    let Some(d) = d_cache.objects.get(&key)
                        .filter(|d| d.metadata.deletion_timestamp.is_none()) else { retries.forget(&key); continue };
                    let sets: Vec<&ReplicaSet> = rs_cache.objects
                        .range((key.0.clone(), String::new())..)
                        .take_while(|((ns, _), _)| *ns == key.0)
                        .map(|(_, rs)| rs)
                        .collect();
                    match pass(&client, &events, d, &sets).await {
                        Ok(()) => retries.forget(&key),
                        Err(e) => {
                            let name = format!("{}/{}", key.0, key.1);
                            let retry = retries.failed(key, Instant::now());
                            tracing::warn!(deployment = %name, error = %e, ?retry, "sync failed; retrying after a backoff");
                        }
                    }
                }
            }
        }
    }
}

async fn pass(
    client: &Client,
    events: &Arc<Recorder>,
    d: &Deployment,
    sets: &[&ReplicaSet],
) -> Result<(), ClientError> {
    let namespace = d.metadata.namespace.clone().unwrap_or_default();
    let mut step = plan(d, sets);
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &namespace);
    if let Some(mut rs) = step.create.take() {
        let name = rs.metadata.name.clone().unwrap_or_default();
        if let (Some(spec), Some(n)) = (rs.spec.as_mut(), step.scale.remove(&name)) {
            spec.replicas = Some(n);
        }
        let replicas = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        match api.create(&rs).await {
            Ok(_) => events.normal(
                Involved::of(d),
                "ScalingReplicaSet",
                format!("Scaled up replica set {name} to {replicas}"),
            ),
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
    }
    for (name, replicas) in &step.scale {
        let before = sets
            .iter()
            .find(|rs| rs.metadata.name.as_deref() == Some(name.as_str()))
            .and_then(|rs| rs.spec.as_ref().and_then(|s| s.replicas))
            .unwrap_or(0);
        api.patch(name, Patch::Merge, &json!({"spec": {"replicas": replicas}}))
            .await?;
        let way = if *replicas > before { "up" } else { "down" };
        events.normal(
            Involved::of(d),
            "ScalingReplicaSet",
            format!("Scaled {way} replica set {name} from {before} to {replicas}"),
        );
    }
    for name in &step.delete {
        match api.delete(name).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    if d.status.as_ref() != Some(&step.status) {
        Api::<Deployment>::namespaced(client.clone(), &namespace)
            .patch_status(
                d.metadata.name.as_deref().unwrap_or_default(),
                Patch::Merge,
                &json!({"status": step.status}),
            )
            .await?;
    }
    Ok(())
}

/// Starts the controller on a task (it runs for the life of the process).
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, std::future::pending()))
}
