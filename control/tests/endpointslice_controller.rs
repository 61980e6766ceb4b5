//! The EndpointSlice controller against a served API: pods and Services written as any client
//! would, slices and their changes read back.

mod common;

use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, ListParams, Patch};
use kpx_control::controllers::endpointslice_sync;
use serde_json::json;

async fn add_pod(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx",
            "ports": [{"name": "http", "containerPort": 8080}]}]}}))
    .expect("pod");
    pods.create(&pod).await.expect("create pod");
    set_ready(pods, name, ip, ready).await;
}

async fn set_ready(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) {
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    pods.patch_status(name, Patch::Merge, &status)
        .await
        .expect("pod status");
}

/// The web Service's slices: `(name, [(address, ready)])`, sorted.
async fn slices(api: &Api<EndpointSlice>) -> Vec<(String, Vec<(String, bool)>)> {
    let list = api
        .list(&ListParams {
            label_selector: Some("kubernetes.io/service-name=web".into()),
            ..Default::default()
        })
        .await
        .expect("list slices");
    let mut out: Vec<(String, Vec<(String, bool)>)> = list
        .items
        .iter()
        .map(|s| {
            let eps = s
                .endpoints
                .iter()
                .map(|e| {
                    let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                    (e.addresses[0].clone(), ready)
                })
                .collect();
            (s.metadata.name.clone().unwrap_or_default(), eps)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_follow_pods_in_place_and_split_past_100() {
    let server = TestServer::start().await;
    let client = server.client();
    let controller = endpointslice_sync::spawn(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    add_pod(&pods, "web-a", "198.19.1.10", true).await;
    add_pod(&pods, "web-b", "198.19.1.11", false).await;
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
    .expect("service");
    services.create(&svc).await.expect("create service");

    let first = eventually("a slice with both pods", || async {
        let s = slices(&api).await;
        (s.len() == 1 && s[0].1.len() == 2).then_some(s)
    })
    .await;
    assert_eq!(
        first[0].1,
        vec![("198.19.1.10".into(), true), ("198.19.1.11".into(), false)]
    );
    let full: EndpointSlice = api.get(&first[0].0).await.expect("slice");
    assert_eq!(
        full.ports.as_ref().and_then(|p| p[0].port),
        Some(8080),
        "the named port resolved"
    );

    // Readiness changes update the same slice.
    set_ready(&pods, "web-b", "198.19.1.11", true).await;
    let name = first[0].0.clone();
    eventually("web-b ready, in place", || async {
        let s = slices(&api).await;
        (s == vec![(
            name.clone(),
            vec![("198.19.1.10".into(), true), ("198.19.1.11".into(), true)],
        )])
        .then_some(())
    })
    .await;
    // A graceful delete makes the pod terminating: no longer ready, still listed.
    pods.delete("web-a").await.expect("delete pod");
    eventually("web-a terminating", || async {
        let s = slices(&api).await;
        (s == vec![(
            name.clone(),
            vec![("198.19.1.10".into(), false), ("198.19.1.11".into(), true)],
        )])
        .then_some(())
    })
    .await;
    let slice = api.get(&name).await.expect("slice");
    let conditions = slice.endpoints[0].conditions.clone().unwrap_or_default();
    assert_eq!(
        (conditions.serving, conditions.terminating),
        (Some(true), Some(true))
    );
    // Gone for good (grace period 0): its endpoint leaves the slice.
    pods.delete_with_grace("web-a", 0)
        .await
        .expect("force delete");
    eventually("web-a gone", || async {
        let s = slices(&api).await;
        (s == vec![(name.clone(), vec![("198.19.1.11".into(), true)])]).then_some(())
    })
    .await;

    // 150 pods: two slices, none over 100.
    for i in 0..150 {
        add_pod(
            &pods,
            &format!("many-{i:03}"),
            &format!("198.19.2.{i}"),
            true,
        )
        .await;
    }
    eventually("151 endpoints in slices of at most 100", || async {
        let s = slices(&api).await;
        let total: usize = s.iter().map(|(_, e)| e.len()).sum();
        (total == 151 && s.len() == 2 && s.iter().all(|(_, e)| e.len() <= 100)).then_some(())
    })
    .await;

    // The Service gone: its slices go.
    services.delete("web").await.expect("delete service");
    eventually("slices removed", || async {
        slices(&api).await.is_empty().then_some(())
    })
    .await;
    controller.abort();
}
