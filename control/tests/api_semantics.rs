//! List, watch and write semantics through the typed client and raw HTTP: resourceVersion,
//! selectors, paging, bookmarks, 410 on compacted history, subresources, graceful deletion.

mod common;

use std::time::Duration;

use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Pod, Service};
use kpx_control::apiserver::Options;
use kpx_control::client::{
    reflector, Api, ListParams, Patch, ReflectorEvent, ReflectorOptions, WatchEvent,
};
use kpx_control::store::EmbeddedStoreOptions;
use serde_json::{json, Value};

fn svc(name: &str, labels: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": name}},
    }))
    .expect("service")
}

async fn raw_lines(url: &str) -> Vec<Value> {
    let text = reqwest::get(url)
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[tokio::test]
async fn watch_from_a_compacted_revision_gets_a_410_error_event() {
    let history = EmbeddedStoreOptions {
        history_limit: 5,
        ..Default::default()
    };
    let server = TestServer::start_with(history, Options::default()).await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    for i in 0..10 {
        api.create(&svc(&format!("s{i}"), json!({})))
            .await
            .expect("create");
    }
    let url = format!(
        "{}/api/v1/namespaces/default/services?watch=true&resourceVersion=1",
        server.url()
    );
    let lines = raw_lines(&url).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "ERROR");
    assert_eq!(lines[0]["object"]["code"], 410);
    assert_eq!(lines[0]["object"]["reason"], "Expired");
    let err = api
        .watch(&ListParams::default(), "1", 5)
        .await
        .expect("watch")
        .next()
        .await
        .expect("event")
        .expect_err("must be refused");
    assert!(err.is_gone(), "{err}");
}

#[tokio::test]
async fn watch_delivers_changes_after_the_version_with_bookmarks_and_selector_transitions() {
    let options = Options {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let server = TestServer::start_with(EmbeddedStoreOptions::default(), options).await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    api.create(&svc("a", json!({"tier": "front"})))
        .await
        .expect("create");
    let list = api.list(&ListParams::default()).await.expect("list");
    let selected = ListParams {
        label_selector: Some("tier=front".into()),
        ..Default::default()
    };
    let mut watch = api
        .watch(&selected, &list.metadata.resource_version, 30)
        .await
        .expect("watch");
    api.create(&svc("b", json!({"tier": "back"})))
        .await
        .expect("create b");
    api.patch(
        "b",
        Patch::Merge,
        &json!({"metadata": {"labels": {"tier": "front"}}}),
    )
    .await
    .expect("into selection");
    api.patch(
        "a",
        Patch::Merge,
        &json!({"metadata": {"labels": {"tier": "back"}}}),
    )
    .await
    .expect("out of selection");
    api.delete("b").await.expect("delete");
    let mut seen = Vec::new();
    let mut bookmark = None;
    while seen.len() < 3 || bookmark.is_none() {
        match tokio::time::timeout(common::patience(), watch.next())
            .await
            .expect("event in time")
            .expect("open")
            .expect("ok")
        {
            WatchEvent::Added(s) => {
                seen.push(format!("ADDED {}", s.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Modified(s) => {
                seen.push(format!("MODIFIED {}", s.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Deleted(s) => {
                seen.push(format!("DELETED {}", s.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Bookmark(rv) => bookmark = Some(rv),
        }
    }
    assert_eq!(seen[..3], ["ADDED b", "DELETED a", "DELETED b"]);
    let rv: i64 = bookmark.expect("bookmark").parse().expect("numeric");
    assert!(rv >= list.metadata.resource_version.parse::<i64>().expect("rv"));
}

#[tokio::test]
async fn list_pages_are_a_consistent_snapshot_and_selectors_filter() {
    let server = TestServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    for i in 0..7 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        api.create(&svc(&format!("s{i}"), json!({"tier": tier})))
            .await
            .expect("create");
    }
    let mut params = ListParams {
        limit: Some(3),
        ..Default::default()
    };
    let first = api.list(&params).await.expect("first page");
    assert_eq!(first.items.len(), 3);
    // Changes after the first page do not show in the following pages.
    api.delete("s6").await.expect("delete");
    api.create(&svc("s9", json!({}))).await.expect("create");
    let mut names: Vec<String> = first
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    params.continue_token = first.metadata.continue_token.clone();
    loop {
        let page = api.list(&params).await.expect("page");
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().filter_map(|s| s.metadata.name.clone()));
        match page.metadata.continue_token.filter(|t| !t.is_empty()) {
            Some(t) => params.continue_token = Some(t),
            None => break,
        }
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    let odd = api
        .list(&ListParams {
            label_selector: Some("tier in (odd)".into()),
            field_selector: Some("metadata.name!=s3".into()),
            ..Default::default()
        })
        .await
        .expect("selected");
    let names: Vec<_> = odd
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["s1", "s5"]);
    let all: Api<Service> = Api::all(server.client());
    assert_eq!(
        all.list(&ListParams::default())
            .await
            .expect("all")
            .items
            .len(),
        7
    );
}

async fn next<K>(events: &mut tokio::sync::mpsc::Receiver<ReflectorEvent<K>>) -> ReflectorEvent<K> {
    tokio::time::timeout(common::patience(), events.recv())
        .await
        .expect("event in time")
        .expect("open")
}

#[tokio::test]
async fn the_reflector_lists_then_watches_and_loses_nothing_in_a_burst() {
    let history = EmbeddedStoreOptions {
        history_limit: 3,
        ..Default::default()
    };
    let server = TestServer::start_with(history, Options::default()).await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    api.create(&svc("before", json!({}))).await.expect("create");
    let mut r = reflector(api.clone(), ReflectorOptions::default());
    assert!(matches!(next(&mut r.events).await, ReflectorEvent::Init));
    assert!(
        matches!(next(&mut r.events).await, ReflectorEvent::InitApply(s) if s.metadata.name.as_deref() == Some("before"))
    );
    assert!(matches!(
        next(&mut r.events).await,
        ReflectorEvent::InitDone
    ));
    api.create(&svc("after", json!({}))).await.expect("create");
    assert!(
        matches!(next(&mut r.events).await, ReflectorEvent::Apply(s) if s.metadata.name.as_deref() == Some("after"))
    );
    api.delete("before").await.expect("delete");
    assert!(
        matches!(next(&mut r.events).await, ReflectorEvent::Delete(s) if s.metadata.name.as_deref() == Some("before"))
    );
    // A burst larger than the watcher's buffer makes it lag: it must re-list, not lose events.
    let burst = (0..64).map(|i| {
        let api = api.clone();
        async move { api.create(&svc(&format!("b{i}"), json!({}))).await }
    });
    for result in futures::future::join_all(burst).await {
        result.expect("create");
    }
    let mut names = std::collections::BTreeSet::new();
    while names.len() < 65 {
        match next(&mut r.events).await {
            // Falling behind the server's buffer ends in a re-list: a full state again.
            ReflectorEvent::Init => names.clear(),
            ReflectorEvent::InitApply(s) | ReflectorEvent::Apply(s) => {
                names.insert(s.metadata.name.unwrap_or_default());
            }
            ReflectorEvent::Delete(s) => {
                names.remove(&s.metadata.name.unwrap_or_default());
            }
            ReflectorEvent::InitDone => {}
        }
    }
    assert!(names.contains("after") && names.contains("b63"));
}

#[tokio::test]
async fn status_is_a_subresource_and_generation_follows_the_spec() {
    let server = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-"},
        "spec": {"containers": [{"name": "c", "image": "agnhost"}]},
        "status": {"phase": "Running"},
    }))
    .expect("pod");
    let created = pods.create(&pod).await.expect("create");
    let name = created.metadata.name.clone().expect("generated name");
    assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    assert_eq!(
        created.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending"),
        "status is not set on create"
    );
    // The main resource ignores status; /status changes only status.
    let mut changed = created.clone();
    changed.status.as_mut().expect("status").phase = Some("Running".into());
    let after = pods.replace(&name, &changed).await.expect("put");
    assert_eq!(
        after.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    let patched = pods
        .patch_status(&name, Patch::Merge, &json!({"status": {"phase": "Running", "podIP": "198.18.0.5"}, "spec": {"nodeName": "ignored"}}))
        .await
        .expect("status patch");
    assert_eq!(
        patched.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("198.18.0.5")
    );
    assert_eq!(
        patched.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        None
    );
}

#[tokio::test]
async fn scheduled_pods_delete_gracefully_and_finalizers_hold_objects() {
    let server = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "agnhost"}]},
    }))
    .expect("pod");
    pods.create(&pod).await.expect("create");
    let bind = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}});
    let url = format!("{}/api/v1/namespaces/default/pods/p/binding", server.url());
    let code = reqwest::Client::new()
        .post(&url)
        .json(&bind)
        .send()
        .await
        .expect("bind")
        .status();
    assert_eq!(code.as_u16(), 201);
    let marked = pods.delete_with_grace("p", 20).await.expect("delete");
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 20);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let still = pods
        .get("p")
        .await
        .expect("still there until the kubelet confirms");
    assert_eq!(
        still.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("n1")
    );
    // The kubelet reports the containers stopping: the pod stays until it confirms.
    pods.patch_status(
        "p",
        Patch::Merge,
        &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
    )
    .await
    .expect("status while terminating");
    pods.get("p")
        .await
        .expect("a status update does not end a graceful deletion");
    pods.delete_with_grace("p", 0).await.expect("confirm");
    assert!(pods
        .get("p")
        .await
        .expect_err("must be refused")
        .is_not_found());

    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let mut held = svc("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    services.create(&held).await.expect("create");
    services.delete("held").await.expect("delete marks");
    let marked = services.get("held").await.expect("held by its finalizer");
    assert!(marked.metadata.deletion_timestamp.is_some());
    services
        .patch(
            "held",
            Patch::Json,
            &json!([{"op": "remove", "path": "/metadata/finalizers"}]),
        )
        .await
        .expect("remove finalizer");
    eventually("the service goes once its finalizer is removed", || {
        let services = services.clone();
        async move {
            services
                .get("held")
                .await
                .err()
                .filter(|e| e.is_not_found())
        }
    })
    .await;
}

#[tokio::test]
async fn strategic_merge_patch_merges_service_ports_by_port() {
    let server = TestServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    api.create(&svc("web", json!({}))).await.expect("create");
    let patched = api
        .patch(
            "web",
            Patch::StrategicMerge,
            &json!({"spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        )
        .await
        .expect("patch");
    let ports: Vec<i32> = patched
        .spec
        .expect("spec")
        .ports
        .expect("ports")
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [80, 53]);
}

#[tokio::test]
async fn deployments_scale_through_the_scale_subresource() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let url = format!(
        "{}/apis/apps/v1/namespaces/default/deployments",
        server.url()
    );
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}},
    });
    let created: Value = http
        .post(&url)
        .json(&deployment)
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    assert_eq!(created["spec"]["replicas"], 1, "defaulted");
    assert_eq!(created["metadata"]["generation"], 1);
    let scale_url = format!("{url}/web/scale");
    let scale: Value = http
        .get(&scale_url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (scale["kind"].as_str(), scale["spec"]["replicas"].as_i64()),
        (Some("Scale"), Some(1))
    );
    assert_eq!(scale["status"]["selector"], "app=web");
    let response = http
        .patch(&scale_url)
        .header("Content-Type", "application/merge-patch+json")
        .body(json!({"spec": {"replicas": 3}}).to_string())
        .send()
        .await
        .expect("patch");
    assert_eq!(response.status().as_u16(), 200);
    let now: Value = http
        .get(format!("{url}/web"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(now["spec"]["replicas"], 3);
    assert_eq!(
        now["metadata"]["generation"], 2,
        "a spec change bumps the generation"
    );
    let refused = http
        .put(&scale_url)
        .json(&json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web"}, "spec": {"replicas": -1}}))
        .send()
        .await
        .expect("put");
    assert_eq!(refused.status().as_u16(), 422);
}
