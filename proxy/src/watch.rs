//! Watching the API: reflectors over Services and EndpointSlices, merged into one stream of
//! updates for the tracker. A re-list arrives as one reset with the full state.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{
    reflector, Api, Client, ReflectorEvent, ReflectorOptions, ReflectorStats,
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

/// Starts watching all Services and EndpointSlices.
pub fn start(client: &Client) -> Watchers {
    let (tx, updates) = mpsc::channel(4096);
    let services = reflector(
        Api::<Service>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let slices = reflector(
        Api::<EndpointSlice>::all(client.clone()),
        ReflectorOptions::default(),
    );
    let stats = vec![services.stats.clone(), slices.stats.clone()];
    tokio::spawn(forward(services.events, tx.clone(), || Mapping {
        listing: Update::ServicesListing,
        listed: Update::ServiceListed,
        list_done: Update::ServicesListDone,
        applied: Update::ServiceApplied,
        deleted: Update::ServiceDeleted,
    }));
    tokio::spawn(forward(slices.events, tx, || Mapping {
        listing: Update::SlicesListing,
        listed: Update::SliceListed,
        list_done: Update::SlicesListDone,
        applied: Update::SliceApplied,
        deleted: Update::SliceDeleted,
    }));
    Watchers { updates, stats }
}
