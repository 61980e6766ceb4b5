//! Issue 15, item 10: a Service whose slice the API refuses was rewritten ~50 times a second
//! forever. Now a Service of 5,000 ports is published (the slice limit is upstream's 20,000
//! ports, kubernetes/kubernetes#99795), and a refused write is retried with kube's backoff
//! (1 s doubling) and reported as a `FailedToUpdateEndpointSlices` Warning Event.

mod common;

use std::time::Duration;

use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, ListParams, Patch};
use kpx_control::controllers::endpointslice_sync;
use serde_json::json;

fn service(name: &str, ports: usize) -> Service {
    let ports: Vec<_> = (1..=ports)
        .map(|p| json!({"name": format!("p{p}"), "port": p, "targetPort": p}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"selector": {"app": "web"}, "ports": ports}}))
    .expect("service")
}

async fn slice_ports(api: &Api<EndpointSlice>, service: &str) -> Option<usize> {
    let list = api
        .list(&ListParams {
            label_selector: Some(format!("kubernetes.io/service-name={service}")),
            ..Default::default()
        })
        .await
        .ok()?;
    let slice = list.items.first()?;
    (!slice.endpoints.is_empty()).then(|| slice.ports.as_ref().map_or(0, Vec::len))
}

async fn failure_events(events: &Api<Event>, service: &str) -> Vec<Event> {
    events
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("FailedToUpdateEndpointSlices")
                && e.involved_object.name.as_deref() == Some(service)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_ports_are_published_and_a_refused_slice_backs_off_with_an_event() {
    let server = TestServer::start().await;
    let client = server.client();
    let controller = endpointslice_sync::spawn(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "web-a", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx"}]}}),
    )
    .expect("pod");
    pods.create(&pod).await.expect("create pod");
    pods.patch_status(
        "web-a",
        Patch::Merge,
        &json!({"status": {"phase": "Running", "podIP": "198.19.1.10", "podIPs": [{"ip": "198.19.1.10"}],
            "conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .await
    .expect("pod status");

    // The finding's Service: valid, and now published.
    services
        .create(&service("wide", 5000))
        .await
        .expect("create the 5,000-port Service");
    let published = eventually("the 5,000-port Service's slice", || async {
        slice_ports(&slices, "wide").await
    })
    .await;
    assert_eq!(published, 5000);

    // Past the API's limit the slice is refused: an Event says why, and the controller backs
    // off instead of rewriting it on every round.
    services
        .create(&service("wider", 20_001))
        .await
        .expect("create the 20,001-port Service");
    let first = eventually("a FailedToUpdateEndpointSlices event", || async {
        failure_events(&events, "wider").await.into_iter().next()
    })
    .await;
    let message = first.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("Error updating Endpoint Slices for Service default/wider: ")
            && message.contains("ports: Too many: 20001: must have at most 20000 items"),
        "{message}"
    );
    assert_eq!(first.type_.as_deref(), Some("Warning"));
    // Five seconds of backoff (1 s, 2 s, 4 s) leave room for at most four attempts; the old
    // loop made one every 20 ms round. (A slow machine only makes fewer.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events_now = failure_events(&events, "wider").await;
    let attempts: i32 = events_now.iter().map(|e| e.count.unwrap_or(1)).sum();
    assert!(
        (1..=5).contains(&attempts),
        "{attempts} failed writes in ~5 s: {events_now:?}"
    );
    assert_eq!(
        slice_ports(&slices, "wider").await,
        None,
        "nothing published"
    );
    controller.abort();
}
