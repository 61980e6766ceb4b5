//! The ReplicaSet / ReplicationController controller against a served API.

mod common;

use common::{eventually, TestServer};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use kpx_control::client::{Api, ListParams, Patch};
use kpx_control::controllers::replicaset_sync;
use serde_json::json;

/// Live pods owned by the workload with uid `owner`.
async fn owned(pods: &Api<Pod>, owner: &str) -> Vec<Pod> {
    pods.list(&ListParams::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == owner && o.controller == Some(true))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sets_create_scale_adopt_and_report() {
    let server = TestServer::start().await;
    let client = server.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // An orphan that matches: adopted, counted as one of the replicas.
    let orphan: Pod = serde_json::from_value(
        json!({"metadata": {"name": "orphan", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]}}),
    )
    .expect("pod");
    pods.create(&orphan).await.expect("orphan");
    // Started after the orphan exists, so the orphan is in its first list of pods.
    let controller = replicaset_sync::spawn(client.clone());
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let rs: ReplicaSet = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}}))
    .expect("rs");
    let rs = sets.create(&rs).await.expect("create rs");
    let uid = rs.metadata.uid.clone().expect("uid");
    // The orphan is adopted and counts as one of the three.
    eventually("3 pods owned, the orphan among them", || async {
        let o = owned(&pods, &uid).await;
        let adopted = o
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("orphan"));
        (o.len() == 3 && adopted).then_some(())
    })
    .await;
    eventually("status.replicas 3", || async {
        let s = sets.get("web").await.ok()?.status?;
        (s.replicas == 3).then_some(())
    })
    .await;
    // Steady: no more pods appear.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(owned(&pods, &uid).await.len(), 3, "no extra pods");

    sets.patch("web", Patch::Merge, &json!({"spec": {"replicas": 1}}))
        .await
        .expect("scale");
    eventually("scaled to 1", || async {
        (owned(&pods, &uid).await.len() == 1).then_some(())
    })
    .await;

    // A ReplicationController from the Kubernetes documentation, unchanged.
    let rcs: Api<ReplicationController> = Api::namespaced(client.clone(), "default");
    let rc: ReplicationController = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "nginx"},
        "spec": {"replicas": 3, "selector": {"app": "nginx"},
            "template": {"metadata": {"name": "nginx", "labels": {"app": "nginx"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx", "ports": [{"containerPort": 80}]}]}}}}))
    .expect("rc");
    let rc = rcs.create(&rc).await.expect("create rc");
    let rc_uid = rc.metadata.uid.clone().expect("uid");
    eventually("3 nginx pods", || async {
        (owned(&pods, &rc_uid).await.len() == 3).then_some(())
    })
    .await;
    controller.abort();
}
