//! Topology fields through the API server and the EndpointSlice controller: what kube-proxy
//! needs for topology-aware routing (`trafficDistribution`, EndpointSlice `zone` and
//! `hints.forZones` / `hints.forNodes`) survives a write and a read, the controller fills it
//! from the Node's zone label, and the proxy's Service selector (kube-proxy's
//! `!service-proxy-name,!headless`) reports a Service that gains the label as deleted.

mod common;

use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, ListParams, Patch, WatchEvent};
use kpx_control::controllers::endpointslice_sync;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_distribution_and_hints_round_trip() {
    let server = TestServer::start().await;
    let client = server.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"trafficDistribution": "PreferSameNode", "ports": [{"port": 80}]}}))
    .expect("service");
    services.create(&svc).await.expect("create service");
    let read = services.get("web").await.expect("get service");
    assert_eq!(
        read.spec.and_then(|s| s.traffic_distribution).as_deref(),
        Some("PreferSameNode")
    );
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["198.19.1.10"], "nodeName": "node-1", "zone": "zone-a",
            "hints": {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-1"}]}}],
        "ports": [{"port": 8080}],
    }))
    .expect("slice");
    slices.create(&slice).await.expect("create slice");
    let read = slices.get("web-x").await.expect("get slice");
    let ep = &read.endpoints[0];
    assert_eq!(ep.zone.as_deref(), Some("zone-a"));
    assert_eq!(
        ep.hints, slice.endpoints[0].hints,
        "forZones and forNodes kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_fills_zone_and_hints_from_the_nodes_label() {
    let server = TestServer::start().await;
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-1",
        "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))
    .expect("node");
    nodes.create(&node).await.expect("create node");
    let controller = endpointslice_sync::spawn(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-a", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx"}]}}))
    .expect("pod");
    pods.create(&pod).await.expect("create pod");
    let status = json!({"status": {"phase": "Running", "podIP": "198.19.1.10",
        "podIPs": [{"ip": "198.19.1.10"}], "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status("web-a", Patch::Merge, &status)
        .await
        .expect("pod status");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "trafficDistribution": "PreferSameNode",
            "ports": [{"port": 80}]}}))
    .expect("service");
    services.create(&svc).await.expect("create service");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let hinted = |zone: &'static str| {
        let slices = slices.clone();
        move || {
            let slices = slices.clone();
            async move {
                let list = slices.list(&ListParams::default()).await.ok()?;
                let ep = list.items.first()?.endpoints.first()?.clone();
                let hints = ep.hints.clone()?;
                let zones: Vec<String> = hints.for_zones?.into_iter().map(|z| z.name).collect();
                let nodes: Vec<String> = hints.for_nodes?.into_iter().map(|n| n.name).collect();
                (ep.zone.as_deref() == Some(zone) && zones == [zone] && nodes == ["node-1"])
                    .then_some(())
            }
        }
    };
    eventually("zone-a and node-1 hints", hinted("zone-a")).await;
    // The node moves zone: the slice follows (kube's controller re-reconciles on node changes).
    nodes
        .patch(
            "node-1",
            Patch::Merge,
            &json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-b"}}}),
        )
        .await
        .expect("relabel node");
    eventually("zone-b hints", hinted("zone-b")).await;
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_selector_drops_a_service_labelled_headless() {
    let server = TestServer::start().await;
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
    )
    .expect("service");
    services.create(&svc).await.expect("create service");
    let params = ListParams {
        label_selector: Some(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless".into(),
        ),
        ..Default::default()
    };
    let list = services.list(&params).await.expect("list");
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.clone();
    let mut watch = services.watch(&params, &rv, 30).await.expect("watch");
    services
        .patch(
            "web",
            Patch::Merge,
            &json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}),
        )
        .await
        .expect("label");
    loop {
        match watch.next().await {
            Some(Ok(WatchEvent::Deleted(gone))) => {
                assert_eq!(gone.metadata.name.as_deref(), Some("web"));
                break;
            }
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            other => panic!("expected DELETED, got {other:?}"),
        }
    }
    assert!(services.list(&params).await.expect("list").items.is_empty());
}
