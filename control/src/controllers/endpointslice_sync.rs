//! The EndpointSlice controller's loop: reflectors over Services, Pods, EndpointSlices and
//! Nodes feed caches; every change marks the Services it can affect; marked Services are
//! reconciled (`endpointslice::reconcile`) and the writes made through the API. A write that
//! fails is retried with kube's per-Service backoff (`queue::Backoff::ENDPOINTSLICE`) and
//! reported as a `FailedToUpdateEndpointSlices` Warning Event on the Service, as
//! kube-controller-manager's endpointslice controller does.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::cache::{key_of, Cache, Key};
use super::endpointslice::{
    legacy_endpoints, managed, reconcile_with_zones, SliceOp, SERVICE_NAME_LABEL,
};
use super::queue::{Backoff, Retry, RetryQueue};
use super::topologycache::zone_ratios;
use crate::client::events::{Involved, Recorder};
use crate::client::{reflector, Api, Client, ReflectorOptions};

/// Runs the controller until `shutdown` completes.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()>) {
    let mut services = reflector(
        Api::<Service>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut pods = reflector(Api::<Pod>::all(client.clone()), ReflectorOptions::default());
    let mut slices = reflector(
        Api::<EndpointSlice>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut nodes = reflector(
        Api::<Node>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let (mut svc_cache, mut pod_cache) = (Cache::<Service>::new(), Cache::<Pod>::new());
    let (mut slice_cache, mut node_cache) = (Cache::<EndpointSlice>::new(), Cache::<Node>::new());
    let mut dirty: BTreeSet<Key> = BTreeSet::new();
    let mut retries: RetryQueue<Key> = RetryQueue::new(Backoff::ENDPOINTSLICE);
    let events = Recorder::new(client.clone(), "endpoint-slice-controller", None);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(e) = services.events.recv() => {
                dirty.extend(svc_cache.apply(e).iter().map(key_of));
            }
            Some(e) = pods.events.recv() => {
                // A pod can matter to any Service of its namespace (old or new labels).
                let namespaces: BTreeSet<String> = pod_cache.apply(e).iter().map(|p| key_of(p).0).collect();
                dirty.extend(svc_cache.objects.keys().filter(|(ns, _)| namespaces.contains(ns)).cloned());
            }
            Some(e) = slices.events.recv() => {
                for slice in slice_cache.apply(e) {
                    let owner = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned();
                    if let Some(service) = owner {
                        dirty.insert((key_of(&slice).0, service));
                    }
                }
            }
            Some(e) = nodes.events.recv() => {
                if !node_cache.apply(e).is_empty() {
                    dirty.extend(svc_cache.objects.keys().cloned());
                }
            }
            _ = tick.tick() => {
                dirty.extend(retries.due(Instant::now()));
                if dirty.is_empty() || !(svc_cache.synced && pod_cache.synced && slice_cache.synced && node_cache.synced) {
                    continue;
                }
                let zone_of = |node: &str| {
                    node_cache.objects.get(&(String::new(), node.to_string()))
                        .and_then(|n| n.metadata.labels.as_ref())
                        .and_then(|l| l.get("topology.kubernetes.io/zone").cloned())
                };
                let zone_ratios = zone_ratios(node_cache.objects.values());
                for key in std::mem::take(&mut dirty) {
                    // Only this namespace's slices: the cache is ordered by namespace.
                    let namespace_slices = || {
                        slice_cache
                            .objects
                            .range((key.0.clone(), String::new())..)
                            .take_while(|((ns, _), _)| *ns == key.0)
                            .map(|(_, s)| s)
                    };
                    let Some(service) = svc_cache.objects.get(&key) else {
                        // A deleted Service's slices go with it at once (the garbage collector
                        // would also remove them, as they are owned by it, a moment later).
                        let gone = Service {
                            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                                namespace: Some(key.0.clone()),
                                name: Some(key.1.clone()),
                                ..Default::default()
                            },
                            ..Default::default()
                        };
                        let existing = managed(&gone, namespace_slices());
                        let ops: Vec<SliceOp> = existing.iter().filter_map(|s| s.metadata.name.clone()).map(SliceOp::Delete).collect();
                        let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), &key.0);
                        let gone_endpoints = match endpoints.delete(&key.1).await {
                            Ok(_) => true,
                            Err(e) => e.is_not_found(),
                        };
                        if write(&client, &key.0, ops).await.is_err() || !gone_endpoints {
                            retries.failed(key, Instant::now());
                        } else {
                            retries.forget(&key);
                        }
                        continue;
                    };
                    let pods: Vec<&Pod> = pod_cache.objects.range((key.0.clone(), String::new())..).take_while(|((ns, _), _)| *ns == key.0).map(|(_, p)| p).collect();
                    let existing = managed(service, namespace_slices());
                    let ops = reconcile_with_zones(service, &pods, &existing, &zone_of, zone_ratios.as_ref());
                    let mirror = legacy_endpoints(service, &pods, &zone_of);
                    let written = match write(&client, &key.0, ops).await {
                        Ok(()) => write_endpoints(&client, &key, mirror).await,
                        Err(e) => Err(e),
                    };
                    match written {
                        Ok(()) => retries.forget(&key),
                        Err(e) => failed(&mut retries, &events, service, key, &e),
                    }
                }
            }
        }
    }
}

/// A refused or failed write: retried after the backoff (dropped after `maxRetries`, until
/// the next change), and said on the Service as kube's controller says it.
fn failed(
    retries: &mut RetryQueue<Key>,
    events: &Arc<Recorder>,
    service: &Service,
    key: Key,
    error: &crate::client::ClientError,
) {
    let name = format!("{}/{}", key.0, key.1);
    match retries.failed(key, Instant::now()) {
        Retry::After(delay, failures) => {
            tracing::warn!(service = %name, error = %error, failures, retry_in = ?delay, "writing EndpointSlices failed; retrying after a backoff");
        }
        Retry::Dropped(failures) => {
            tracing::error!(service = %name, error = %error, failures, "writing EndpointSlices failed too often; dropping the Service until it or its pods change");
        }
    }
    events.warning(
        Involved::of(service),
        "FailedToUpdateEndpointSlices",
        format!("Error updating Endpoint Slices for Service {name}: {error}"),
    );
}

/// Makes the Service's legacy Endpoints `wanted` (created, replaced when different).
async fn write_endpoints(
    client: &Client,
    key: &Key,
    wanted: Option<Endpoints>,
) -> Result<(), crate::client::ClientError> {
    let Some(mut wanted) = wanted else {
        return Ok(());
    };
    let api: Api<Endpoints> = Api::namespaced(client.clone(), &key.0);
    match api.get(&key.1).await {
        Ok(current) => {
            if current.subsets == wanted.subsets
                && current.metadata.labels == wanted.metadata.labels
            {
                return Ok(());
            }
            wanted.metadata.resource_version = current.metadata.resource_version;
            api.replace(&key.1, &wanted).await.map(|_| ())
        }
        Err(e) if e.is_not_found() => api.create(&wanted).await.map(|_| ()),
        Err(e) => Err(e),
    }
}

async fn write(
    client: &Client,
    namespace: &str,
    ops: Vec<SliceOp>,
) -> Result<(), crate::client::ClientError> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    for op in ops {
        match op {
            SliceOp::Create(slice) => {
                api.create(&slice).await?;
            }
            SliceOp::Update(slice) => {
                let name = slice.metadata.name.clone().unwrap_or_default();
                api.replace(&name, &slice).await?;
            }
            SliceOp::Delete(name) => match api.delete(&name).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            },
        }
    }
    Ok(())
}

/// Starts the controller on a task (it runs for the life of the process).
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(client, std::future::pending()))
}
