//! Cascading deletion against a served API: a Deployment deleted in the background takes its
//! ReplicaSets and their pods with it; deleted with `propagationPolicy: Orphan` it leaves them
//! running, without the owner reference; `Foreground` deletes them before the owner goes.

mod common;

use common::{eventually, TestServer};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kpx_control::client::{Api, Client, ListParams};
use kpx_control::controllers::{deployment_sync, garbagecollector_sync, replicaset_sync};
use serde_json::json;

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}}))
    .expect("a Deployment")
}

async fn count(client: &Client, app: &str) -> (usize, usize) {
    let params = ListParams {
        label_selector: Some(format!("app={app}")),
        ..Default::default()
    };
    let sets = Api::<ReplicaSet>::namespaced(client.clone(), "default")
        .list(&params)
        .await
        .expect("list replicasets")
        .items
        .len();
    let pods = Api::<Pod>::namespaced(client.clone(), "default")
        .list(&params)
        .await
        .expect("list pods")
        .items
        .len();
    (sets, pods)
}

/// DELETE with a propagation policy, as `kubectl delete --cascade=…` sends it.
async fn delete(server: &TestServer, name: &str, policy: &str) -> u16 {
    reqwest::Client::new()
        .delete(format!(
            "{}/apis/apps/v1/namespaces/default/deployments/{name}",
            server.url()
        ))
        .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": policy}))
        .send()
        .await
        .expect("delete")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_deployment_cascades_as_its_propagation_policy_says() {
    let server = TestServer::start().await;
    let client = server.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    for name in ["background", "orphan", "foreground"] {
        deployments.create(&deployment(name)).await.expect("create");
    }
    let _workloads = (
        deployment_sync::spawn(client.clone()),
        replicaset_sync::spawn(client.clone()),
    );
    for name in ["background", "orphan", "foreground"] {
        eventually("a ReplicaSet and 2 pods", || async {
            (count(&client, name).await == (1, 2)).then_some(())
        })
        .await;
    }
    let _collector = garbagecollector_sync::spawn(client.clone());

    assert_eq!(delete(&server, "background", "Background").await, 200);
    eventually(
        "the ReplicaSet and pods of a deleted Deployment gone",
        || async { (count(&client, "background").await == (0, 0)).then_some(()) },
    )
    .await;

    assert_eq!(delete(&server, "orphan", "Orphan").await, 200);
    eventually("the orphaning Deployment gone", || async {
        deployments
            .get("orphan")
            .await
            .is_err_and(|e| e.is_not_found())
            .then_some(())
    })
    .await;
    let sets = Api::<ReplicaSet>::namespaced(client.clone(), "default")
        .list(&ListParams {
            label_selector: Some("app=orphan".into()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(sets.items.len(), 1, "the orphaned ReplicaSet stays");
    assert!(
        sets.items[0].metadata.owner_references.is_none()
            || sets.items[0]
                .metadata
                .owner_references
                .as_ref()
                .is_some_and(Vec::is_empty),
        "without its owner reference"
    );
    assert_eq!(count(&client, "orphan").await, (1, 2), "its pods stay too");

    assert_eq!(delete(&server, "foreground", "Foreground").await, 200);
    let held = deployments
        .get("foreground")
        .await
        .expect("held while dependents go");
    assert!(held.metadata.deletion_timestamp.is_some());
    eventually(
        "the foreground Deployment gone after its dependents",
        || async {
            let gone = deployments
                .get("foreground")
                .await
                .is_err_and(|e| e.is_not_found());
            (gone && count(&client, "foreground").await.0 == 0).then_some(())
        },
    )
    .await;

    assert_eq!(
        delete(&server, "background", "Sideways").await,
        422,
        "a policy not in the list is refused"
    );
}
