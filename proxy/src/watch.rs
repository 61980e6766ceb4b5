//! Watching the API: reflectors over Services and EndpointSlices, merged into one stream of
//! updates for the tracker. A re-list arrives as one reset with the full state.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{
    reflector, Api, Client, ReflectorEvent, ReflectorOptions, ReflectorStats,
};
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug)]
pub enum Update {
    ServicesReset(Vec<Service>),
    ServiceApplied(Service),
    ServiceDeleted(Service),
    SlicesReset(Vec<EndpointSlice>),
    SliceApplied(EndpointSlice),
    SliceDeleted(EndpointSlice),
}

pub struct Watchers {
    pub updates: mpsc::Receiver<Update>,
    pub stats: Vec<Arc<ReflectorStats>>,
}

async fn forward<K: kpx_control::client::Object>(
    mut events: mpsc::Receiver<ReflectorEvent<K>>,
    tx: mpsc::Sender<Update>,
    reset: fn(Vec<K>) -> Update,
    applied: fn(K) -> Update,
    deleted: fn(K) -> Update,
) {
    let mut buffer: Option<Vec<K>> = None;
    while let Some(event) = events.recv().await {
        let update = match event {
            ReflectorEvent::Init => {
                buffer = Some(Vec::new());
                continue;
            }
            ReflectorEvent::InitApply(obj) => {
                buffer.get_or_insert_with(Vec::new).push(obj);
                continue;
            }
            ReflectorEvent::InitDone => reset(buffer.take().unwrap_or_default()),
            ReflectorEvent::Apply(obj) => applied(obj),
            ReflectorEvent::Delete(obj) => deleted(obj),
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
    tokio::spawn(forward(
        services.events,
        tx.clone(),
        Update::ServicesReset,
        Update::ServiceApplied,
        Update::ServiceDeleted,
    ));
    tokio::spawn(forward(
        slices.events,
        tx,
        Update::SlicesReset,
        Update::SliceApplied,
        Update::SliceDeleted,
    ));
    Watchers { updates, stats }
}
