//! Node lifecycle against a served API: a node whose heartbeat stops goes Ready=Unknown, its
//! pods stop being ready, then are evicted (short timings for the test).

mod common;

use std::time::Duration;

use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Node, Pod};
use kpx_control::client::{Api, Patch};
use kpx_control::controllers::nodelifecycle::Timing;
use kpx_control::controllers::nodelifecycle_sync;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_goes_unknown_its_pods_unready_then_evicted() {
    let server = TestServer::start().await;
    let client = server.client();
    let timing = Timing {
        grace: Duration::from_secs(1),
        eviction: Duration::from_secs(2),
    };
    let controller = nodelifecycle_sync::spawn(client.clone(), timing);
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-1"}})).expect("node");
    nodes.create(&node).await.expect("node");
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    nodes
        .patch_status("node-1", Patch::Merge, &json!({"status": {"conditions": [
            {"type": "Ready", "status": "True", "lastHeartbeatTime": now, "lastTransitionTime": now},
            {"type": "MemoryPressure", "status": "False"}]}}))
        .await
        .expect("node status");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx"}]}}))
    .expect("pod");
    pods.create(&pod).await.expect("pod");
    pods.patch_status(
        "web",
        Patch::Merge,
        &json!({"status": {"phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .await
    .expect("pod status");

    eventually("node Unknown", || async {
        let n = nodes.get("node-1").await.ok()?;
        let conditions = n.status?.conditions?;
        let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
        assert!(
            conditions.iter().any(|c| c.type_ == "MemoryPressure"),
            "other conditions kept"
        );
        (ready.status == "Unknown").then_some(())
    })
    .await;
    eventually("pod not ready", || async {
        let p = pods.get("web").await.ok()?;
        let ready = p
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (ready.status == "False").then_some(())
    })
    .await;
    eventually("pod evicted", || async {
        pods.get("web")
            .await
            .err()
            .filter(|e| e.is_not_found())
            .map(|_| ())
    })
    .await;
    controller.abort();
}
