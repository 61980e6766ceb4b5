//! The Deployment controller (with the ReplicaSet controller under it) against a served API:
//! the Deployment from the Kubernetes documentation, a rolling update, the status
//! `kubectl rollout status` waits for. Pods become Ready through their status, written here as
//! a kubelet would write it.

mod common;

use std::time::Duration;

use common::{eventually, TestServer};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kpx_control::client::{Api, ListParams, Patch};
use kpx_control::controllers::{deployment_sync, replicaset_sync};
use serde_json::json;

/// Marks every pod Ready, as the node's kubelet would once its containers run.
fn ready_every_pod(pods: Api<Pod>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for pod in list.items {
                    let ready = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    if ready || pod.metadata.deletion_timestamp.is_some() {
                        continue;
                    }
                    n += 1;
                    let ip = format!("198.19.{}.{}", 1 + n / 200, 10 + n % 200);
                    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "conditions": [{"type": "Ready", "status": "True"}]}});
                    let _ = pods
                        .patch_status(
                            pod.metadata.name.as_deref().unwrap_or_default(),
                            Patch::Merge,
                            &status,
                        )
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_rolls_out_and_rolls_to_a_new_image() {
    let server = TestServer::start().await;
    let client = server.client();
    let controllers = [
        replicaset_sync::spawn(client.clone()),
        deployment_sync::spawn(client.clone()),
    ];
    let kubelet = ready_every_pod(Api::namespaced(client.clone(), "default"));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "nginx-deployment", "labels": {"app": "nginx"}},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "nginx"}},
            "template": {"metadata": {"labels": {"app": "nginx"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx:1.14.2", "ports": [{"containerPort": 80}]}]}}}}))
    .expect("deployment");
    deployments.create(&d).await.expect("create");

    // What `kubectl rollout status` waits for.
    let rolled_out = |generation: i64| {
        let deployments = deployments.clone();
        move || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get("nginx-deployment").await.ok()?;
                let s = d.status?;
                let progressing = s
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "Progressing")?;
                (s.observed_generation >= Some(generation)
                    && s.updated_replicas == Some(3)
                    && s.replicas == Some(3)
                    && s.available_replicas == Some(3)
                    && progressing.reason.as_deref() == Some("NewReplicaSetAvailable"))
                .then_some(())
            }
        }
    };
    eventually("rolled out", rolled_out(1)).await;

    deployments
        .patch("nginx-deployment", Patch::Merge, &json!({"spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1.16.1"}]}}}}))
        .await
        .expect("new image");
    eventually("rolled out again", rolled_out(2)).await;
    let list = sets.list(&ListParams::default()).await.expect("list").items;
    assert_eq!(list.len(), 2, "one ReplicaSet per revision");
    let mut by_revision: Vec<(String, i32)> = list
        .iter()
        .map(|rs| {
            (
                rs.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("deployment.kubernetes.io/revision").cloned())
                    .unwrap_or_default(),
                rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(-1),
            )
        })
        .collect();
    by_revision.sort();
    assert_eq!(by_revision, [("1".to_string(), 0), ("2".to_string(), 3)]);
    kubelet.abort();
    for c in controllers {
        c.abort();
    }
}
