//! The garbage collector's loop: caches of every kind that owns or is owned (Deployments,
//! ReplicaSets, ReplicationControllers, Pods, Services, EndpointSlices); after a change, one
//! `garbagecollector::decide` pass, whose deletions are confirmed with the API first (an owner
//! missing from a cache may only be late in its watch).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, ReplicationController, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::{NamespaceResourceScope, Resource};
use serde_json::{json, Value};

use super::cache::Cache;
use super::garbagecollector::{decide, Action, Item, OwnerRef};
use super::queue::{Backoff, RetryQueue};
use crate::client::{reflector, Api, Client, ClientError, Object, Patch, ReflectorOptions};

const WATCHED: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "ReplicationController",
    "Pod",
    "Service",
    "EndpointSlice",
];

fn item_of<K: Object>(obj: &K) -> Item {
    let m = obj.metadata();
    Item {
        kind: K::KIND.to_string(),
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        owners: m
            .owner_references
            .iter()
            .flatten()
            .map(|o| OwnerRef {
                uid: o.uid.clone(),
                kind: o.kind.clone(),
                name: o.name.clone(),
            })
            .collect(),
        deleting: m.deletion_timestamp.is_some(),
        finalizers: m.finalizers.clone().unwrap_or_default(),
    }
}

/// One reflector-fed cache per watched kind.
struct Caches {
    deployments: Cache<Deployment>,
    replicasets: Cache<ReplicaSet>,
    controllers: Cache<ReplicationController>,
    pods: Cache<Pod>,
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
}

impl Caches {
    fn synced(&self) -> bool {
        self.deployments.synced
            && self.replicasets.synced
            && self.controllers.synced
            && self.pods.synced
            && self.services.synced
            && self.slices.synced
    }

    /// The full owner references of a cached object.
    fn owner_refs(&self, item: &Item) -> Vec<OwnerReference> {
        fn of<K: Object>(cache: &Cache<K>, item: &Item) -> Vec<OwnerReference> {
            cache
                .objects
                .get(&(item.namespace.clone(), item.name.clone()))
                .and_then(|o| o.metadata().owner_references.clone())
                .unwrap_or_default()
        }
        match item.kind.as_str() {
            "Deployment" => of(&self.deployments, item),
            "ReplicaSet" => of(&self.replicasets, item),
            "ReplicationController" => of(&self.controllers, item),
            "Pod" => of(&self.pods, item),
            "Service" => of(&self.services, item),
            _ => of(&self.slices, item),
        }
    }

    fn items(&self) -> Vec<Item> {
        let mut out = Vec::new();
        out.extend(self.deployments.objects.values().map(item_of));
        out.extend(self.replicasets.objects.values().map(item_of));
        out.extend(self.controllers.objects.values().map(item_of));
        out.extend(self.pods.objects.values().map(item_of));
        out.extend(self.services.objects.values().map(item_of));
        out.extend(self.slices.objects.values().map(item_of));
        out
    }
}

/// What to do to one object, whatever its kind.
enum Op {
    /// Its uid, or None when it does not exist.
    Uid,
    Delete,
    Patch(Value),
}

async fn run_op<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    op: Op,
) -> Result<Option<String>, ClientError>
where
    K: Object + Resource<Scope = NamespaceResourceScope>,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    match op {
        Op::Uid => match api.get(name).await {
            Ok(obj) => Ok(obj.metadata().uid.clone()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        },
        Op::Delete => match api.delete(name).await {
            Ok(_) => Ok(None),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        },
        Op::Patch(patch) => match api.patch(name, Patch::Merge, &patch).await {
            Ok(_) => Ok(None),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        },
    }
}

async fn on_kind(
    client: &Client,
    kind: &str,
    namespace: &str,
    name: &str,
    op: Op,
) -> Result<Option<String>, ClientError> {
    match kind {
        "Deployment" => run_op::<Deployment>(client, namespace, name, op).await,
        "ReplicaSet" => run_op::<ReplicaSet>(client, namespace, name, op).await,
        "ReplicationController" => {
            run_op::<ReplicationController>(client, namespace, name, op).await
        }
        "Pod" => run_op::<Pod>(client, namespace, name, op).await,
        "Service" => run_op::<Service>(client, namespace, name, op).await,
        "EndpointSlice" => run_op::<EndpointSlice>(client, namespace, name, op).await,
        // An owner of a kind not served here exists as far as the collector knows.
        _ => Ok(Some(String::new())),
    }
}

/// Carries out one action; `refs` are the object's owner references as cached.
async fn apply(
    client: &Client,
    action: Action,
    refs: Vec<OwnerReference>,
) -> Result<(), ClientError> {
    match action {
        Action::Delete { item, owners } => {
            for owner in &owners {
                let uid =
                    on_kind(client, &owner.kind, &item.namespace, &owner.name, Op::Uid).await?;
                if uid.as_deref() == Some(owner.uid.as_str()) {
                    return Ok(()); // only late in its watch
                }
            }
            tracing::info!(kind = %item.kind, namespace = %item.namespace, name = %item.name, "deleting: its owners are gone");
            on_kind(client, &item.kind, &item.namespace, &item.name, Op::Delete).await?;
        }
        Action::DeleteDependent { item } => {
            tracing::info!(kind = %item.kind, namespace = %item.namespace, name = %item.name, "deleting: its owner is being deleted in the foreground");
            on_kind(client, &item.kind, &item.namespace, &item.name, Op::Delete).await?;
        }
        Action::DropOwners { item, uids } => {
            let remaining: Vec<&OwnerReference> =
                refs.iter().filter(|o| !uids.contains(&o.uid)).collect();
            let patch = json!({"metadata": {"ownerReferences": remaining}});
            patch_metadata(client, &item, patch).await?;
        }
        Action::RemoveFinalizer { item, finalizer } => {
            let rest: Vec<&String> = item.finalizers.iter().filter(|f| *f != finalizer).collect();
            patch_metadata(client, &item, json!({"metadata": {"finalizers": rest}})).await?;
        }
    }
    Ok(())
}

async fn patch_metadata(client: &Client, item: &Item, patch: Value) -> Result<(), ClientError> {
    on_kind(
        client,
        &item.kind,
        &item.namespace,
        &item.name,
        Op::Patch(patch),
    )
    .await
    .map(drop)
}

/// Runs the collector until `shutdown` completes.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()>) {
    let options = ReflectorOptions::default;
    let mut deployments = reflector(Api::<Deployment>::all(client.clone()), options());
    let mut replicasets = reflector(Api::<ReplicaSet>::all(client.clone()), options());
    let mut controllers = reflector(Api::<ReplicationController>::all(client.clone()), options());
    let mut pods = reflector(Api::<Pod>::all(client.clone()), options());
    let mut services = reflector(Api::<Service>::all(client.clone()), options());
    let mut slices = reflector(Api::<EndpointSlice>::all(client.clone()), options());
    let mut caches = Caches {
        deployments: Cache::new(),
        replicasets: Cache::new(),
        controllers: Cache::new(),
        pods: Cache::new(),
        services: Cache::new(),
        slices: Cache::new(),
    };
    let mut dirty = true;
    // A failed step is retried after a backoff (5 ms doubling), not on every 200 ms round.
    let mut retries: RetryQueue<()> = RetryQueue::new(Backoff::CONTROLLER);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(e) = deployments.events.recv() => { caches.deployments.apply(e); dirty = true; }
            Some(e) = replicasets.events.recv() => { caches.replicasets.apply(e); dirty = true; }
            Some(e) = controllers.events.recv() => { caches.controllers.apply(e); dirty = true; }
            Some(e) = pods.events.recv() => { caches.pods.apply(e); dirty = true; }
            Some(e) = services.events.recv() => { caches.services.apply(e); dirty = true; }
            Some(e) = slices.events.recv() => { caches.slices.apply(e); dirty = true; }
            _ = tick.tick() => {
                dirty |= !retries.due(Instant::now()).is_empty();
                if !dirty || !caches.synced() {
                    continue;
                }
                dirty = false;
                let mut failed = false;
                for action in decide(&caches.items(), WATCHED) {
                    let refs = match &action {
                        Action::DropOwners { item, .. } => caches.owner_refs(item),
                        _ => Vec::new(),
                    };
                    if let Err(e) = apply(&client, action, refs).await {
                        // Seen again on a later pass.
                        tracing::warn!(error = %e, "garbage collection step failed; retrying after a backoff");
                        failed = true;
                    }
                }
                if failed {
                    retries.failed((), Instant::now());
                } else {
                    retries.forget(&());
                }
            }
        }
    }
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, std::future::pending()))
}
