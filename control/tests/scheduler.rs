//! The scheduler against a served API: spreading a controller's replicas over nodes, an
//! unschedulable pod told why, and scheduled once a node fits.

mod common;

use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Node, Pod};
use kpx_control::client::{Api, Patch};
use kpx_control::controllers::scheduler_sync;
use serde_json::json;

async fn add_node(nodes: &Api<Node>, name: &str) {
    let node: Node = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}),
    )
    .expect("node");
    nodes.create(&node).await.expect("create node");
    let status = json!({"status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True"}]}});
    nodes
        .patch_status(name, Patch::Merge, &status)
        .await
        .expect("node status");
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_spread_and_an_unschedulable_pod_says_why() {
    let server = TestServer::start().await;
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    add_node(&nodes, "node-1").await;
    add_node(&nodes, "node-2").await;
    // Started once both nodes exist, so no pod is placed while only one is known.
    let scheduler = scheduler_sync::spawn(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..4 {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("web-{i}"),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs-1", "controller": true}]},
            "spec": {"containers": [{"name": "c", "image": "nginx", "resources": {"requests": {"cpu": "100m"}}}]}}))
        .expect("pod");
        pods.create(&pod).await.expect("create pod");
    }
    let placed = eventually("4 pods bound", || async {
        let mut on = Vec::new();
        for i in 0..4 {
            on.push(node_of(&pods.get(&format!("web-{i}")).await.ok()?)?);
        }
        Some(on)
    })
    .await;
    let on_1 = placed.iter().filter(|n| *n == "node-1").count();
    assert_eq!(on_1, 2, "spread 2/2: {placed:?}");

    let picky: Pod = serde_json::from_value(json!({"metadata": {"name": "picky"},
        "spec": {"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "c", "image": "nginx"}]}}))
    .expect("pod");
    pods.create(&picky).await.expect("create");
    let message = eventually("PodScheduled=False", || async {
        let pod = pods.get("picky").await.ok()?;
        let c = pod
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled")?;
        (c.status == "False" && c.reason.as_deref() == Some("Unschedulable")).then_some(c.message?)
    })
    .await;
    assert_eq!(
        message,
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    );
    nodes
        .patch(
            "node-2",
            Patch::Merge,
            &json!({"metadata": {"labels": {"disk": "ssd"}}}),
        )
        .await
        .expect("label node");
    let node = eventually("picky bound", || async {
        node_of(&pods.get("picky").await.ok()?)
    })
    .await;
    assert_eq!(node, "node-2");
    scheduler.abort();
}
