//! Watching the API: reflectors over Services, EndpointSlices and this proxy's own Node,
//! merged into one stream of updates for the tracker. A re-list arrives as one reset with the
//! full state.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{
    reflector, Api, Client, ListParams, ReflectorEvent, ReflectorOptions, ReflectorStats,
};
use std::sync::Arc;
use tokio::sync::mpsc;

/// One change for the tracker. A (re)list arrives as `*Listing`, one `*Listed` per object, then
/// `*ListDone`: objects stream through one at a time instead of being buffered, so the proxy
/// never holds the whole typed list (at 10,000 Services that peak dominated its memory).
#[derive(Debug)]
pub enum Update {
    ServicesListing,
    ServiceListed(Service),
    ServicesListDone,
    ServiceApplied(Service),
    ServiceDeleted(Service),
    SlicesListing,
    SliceListed(EndpointSlice),
    SlicesListDone,
    SliceApplied(EndpointSlice),
    SliceDeleted(EndpointSlice),
    /// This node's Node object, listed or changed (its labels carry the zone).
    NodeApplied(Box<Node>),
    /// This node's Node object is gone (or not found by a re-list).
    NodeDeleted,
}

pub struct Watchers {
    pub updates: mpsc::Receiver<Update>,
    pub stats: Vec<Arc<ReflectorStats>>,
}

/// How one kind's reflector events become updates.
struct Mapping<K> {
    listing: Update,
    listed: fn(K) -> Update,
    list_done: Update,
    applied: fn(K) -> Update,
    deleted: fn(K) -> Update,
}

async fn forward<K: kpx_control::client::Object>(
    mut events: mpsc::Receiver<ReflectorEvent<K>>,
    tx: mpsc::Sender<Update>,
    m: fn() -> Mapping<K>,
) {
    while let Some(event) = events.recv().await {
        let map = m();
        let update = match event {
            ReflectorEvent::Init => map.listing,
            ReflectorEvent::InitApply(obj) => (map.listed)(obj),
            ReflectorEvent::InitDone => map.list_done,
            ReflectorEvent::Apply(obj) => (map.applied)(obj),
            ReflectorEvent::Delete(obj) => (map.deleted)(obj),
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

/// Starts watching the Services this proxy handles (kube-proxy's label selector:
/// [`SERVICE_WATCH_SELECTOR`](crate::model::service::SERVICE_WATCH_SELECTOR)), every
/// EndpointSlice and, when `node_name` is set, that one Node (a `metadata.name` field
/// selector, as kube-proxy's node informer), whose zone label topology routing needs.
pub fn start(client: &Client, node_name: &str) -> Watchers {
    let (tx, updates) = mpsc::channel(4096);
    let services = reflector(
        Api::<Service>::all(client.clone()),
        ReflectorOptions {
            params: ListParams {
                label_selector: Some(crate::model::service::SERVICE_WATCH_SELECTOR.to_string()),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let slices = reflector(
        Api::<EndpointSlice>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let mut stats = vec![services.stats.clone(), slices.stats.clone()];
    tokio::spawn(forward(services.events, tx.clone(), || Mapping {
        listing: Update::ServicesListing,
        listed: Update::ServiceListed,
        list_done: Update::ServicesListDone,
        applied: Update::ServiceApplied,
        deleted: Update::ServiceDeleted,
    }));
    if !node_name.is_empty() {
        let node = reflector(
            Api::<Node>::all(client.clone()),
            ReflectorOptions {
                params: ListParams {
                    field_selector: Some(format!("metadata.name={node_name}")),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        stats.push(node.stats.clone());
        tokio::spawn(forward_node(node.events, tx.clone()));
    }
    tokio::spawn(forward(slices.events, tx, || Mapping {
        listing: Update::SlicesListing,
        listed: Update::SliceListed,
        list_done: Update::SlicesListDone,
        applied: Update::SliceApplied,
        deleted: Update::SliceDeleted,
    }));
    Watchers { updates, stats }
}

/// The Node's events as updates: the list of one name holds it or not, so a re-list that
/// finds nothing means it was deleted while the watch was down.
async fn forward_node(mut events: mpsc::Receiver<ReflectorEvent<Node>>, tx: mpsc::Sender<Update>) {
    let mut listed = false;
    while let Some(event) = events.recv().await {
        let update = match event {
            ReflectorEvent::Init => {
                listed = false;
                continue;
            }
            ReflectorEvent::InitApply(node) | ReflectorEvent::Apply(node) => {
                listed = true;
                Update::NodeApplied(Box::new(node))
            }
            ReflectorEvent::InitDone if listed => continue,
            ReflectorEvent::InitDone | ReflectorEvent::Delete(_) => Update::NodeDeleted,
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(zone: &str) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "n1",
            "labels": {"topology.kubernetes.io/zone": zone}}}))
        .expect("node")
    }

    /// The updates `forward_node` makes of `events`, as text.
    async fn forwarded(events: Vec<ReflectorEvent<Node>>) -> Vec<String> {
        let (etx, erx) = mpsc::channel(16);
        let (tx, mut rx) = mpsc::channel(16);
        for e in events {
            etx.send(e).await.expect("send");
        }
        drop(etx);
        forward_node(erx, tx).await;
        let mut out = Vec::new();
        while let Some(u) = rx.recv().await {
            out.push(match u {
                Update::NodeApplied(n) => {
                    let labels = n.metadata.labels.unwrap_or_default();
                    format!("applied {}", labels.values().cloned().collect::<String>())
                }
                Update::NodeDeleted => "deleted".to_string(),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[tokio::test]
    async fn a_list_without_the_node_means_it_is_gone() {
        use ReflectorEvent::*;
        assert_eq!(
            forwarded(vec![Init, InitApply(node("a")), InitDone]).await,
            ["applied a"]
        );
        assert_eq!(forwarded(vec![Init, InitDone]).await, ["deleted"]);
        assert_eq!(
            forwarded(vec![
                Init,
                InitApply(node("a")),
                InitDone,
                Apply(node("b")),
                Delete(node("b")),
                Init,
                InitDone
            ])
            .await,
            ["applied a", "applied b", "deleted", "deleted"]
        );
    }
}
