//! One request must not freeze the API server. The attacks: a YAML body nested `[` 200,000
//! deep (libyaml's time is quadratic in the flow depth: 40 s of one core in a release build,
//! then serde_yaml's "recursion limit exceeded"), and a strategic merge patch of 60,000
//! containers (the merge looked each item up by scanning the list: 56 s). Two at once on
//! kpx-control's two async workers froze everything, `/healthz` included.
//!
//! The servers here run on a two-worker runtime, as kpx-control does on this machine. Every
//! wait has a generous 60 s deadline; nothing asserts how long anything took.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

async fn send(
    client: &reqwest::Client,
    method: &str,
    url: String,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let response = tokio::time::timeout(
        DEADLINE,
        client
            .request(method.parse().expect("method"), url)
            .header("Content-Type", content_type)
            .body(body)
            .send(),
    )
    .await
    .expect("answered within the deadline")
    .expect("request");
    let code = response.status().as_u16();
    let text = tokio::time::timeout(DEADLINE, response.text())
        .await
        .expect("body within the deadline")
        .unwrap_or_default();
    (code, text)
}

async fn healthz(client: &reqwest::Client, base: &str) -> u16 {
    send(
        client,
        "GET",
        format!("{base}/healthz"),
        "text/plain",
        Vec::new(),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_nesting_bombs_are_refused_and_healthz_answers_meanwhile() {
    let server = TestServer::start().await;
    let base = server.url();
    let client = reqwest::Client::new();
    let bomb = format!("a: {}", "[".repeat(200_000)).into_bytes();
    let url = format!("{base}/api/v1/namespaces/default/pods");
    let bombs: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, bomb) = (client.clone(), url.clone(), bomb.clone());
            tokio::spawn(async move { send(&client, "POST", url, "application/yaml", bomb).await })
        })
        .collect();
    assert_eq!(healthz(&client, &base).await, 200);
    for bomb in bombs {
        let (code, text) = tokio::time::timeout(DEADLINE, bomb)
            .await
            .expect("the bomb is answered within the deadline")
            .expect("task");
        assert_eq!(code, 400, "{text}");
        assert!(text.contains("recursion limit exceeded"), "{text}");
    }
    // Nothing was stored, and ordinary YAML with brackets in its text still works.
    let (code, text) = send(
        &client,
        "GET",
        format!("{base}/api/v1/namespaces/default/pods"),
        "application/json",
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200, "{text}");
    let list: Value = serde_json::from_str(&text).expect("list");
    assert_eq!(list["items"], json!([]));
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: y\n  annotations:\n    note: \"[[[[\" # [[[\n    block: |\n      [[[[[[\nspec:\n  containers: [{name: c, image: \"x\"}]\n";
    let (code, text) = send(&client, "POST", url, "application/yaml", pod.into()).await;
    assert_eq!(code, 201, "{text}");
    let created: Value = serde_json::from_str(&text).expect("pod");
    assert_eq!(created["metadata"]["annotations"]["block"], "[[[[[[\n");
}

/// Two 60,000-container strategic merge patches (1.8 MB each, within the 3 MiB limit) are
/// answered, and a `/healthz` sent after them is answered before both are: the heavy work runs
/// off the async workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategic_merge_bombs_are_answered_and_healthz_is_not_stalled() {
    let server = TestServer::start().await;
    let base = server.url();
    let client = reqwest::Client::new();
    let pods = format!("{base}/api/v1/namespaces/default/pods");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pb"},
                     "spec": {"containers": [{"name": "c0", "image": "x"}]}});
    let (code, text) = send(
        &client,
        "POST",
        pods.clone(),
        "application/json",
        pod.to_string().into(),
    )
    .await;
    assert_eq!(code, 201, "{text}");
    let containers: Vec<Value> = (0..60_000)
        .map(|i| json!({"name": format!("c{i}"), "image": "x"}))
        .collect();
    let patch = serde_json::to_vec(&json!({"spec": {"containers": containers}})).expect("encode");
    assert!(patch.len() < 3 * 1024 * 1024);
    let url = format!("{pods}/pb");
    let (tx, mut answered) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    for _ in 0..2 {
        let (client, url, patch, tx) = (client.clone(), url.clone(), patch.clone(), tx.clone());
        tokio::spawn(async move {
            let (code, text) = send(
                &client,
                "PATCH",
                url,
                "application/strategic-merge-patch+json",
                patch,
            )
            .await;
            assert!(code == 200 || code == 422, "{code}: {text:.300}");
            let _ = tx.send("patch");
        });
    }
    {
        let (client, base, tx) = (client.clone(), base.clone(), tx.clone());
        tokio::spawn(async move {
            assert_eq!(healthz(&client, &base).await, 200);
            let _ = tx.send("healthz");
        });
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(what) = tokio::time::timeout(DEADLINE, answered.recv())
        .await
        .expect("answered within the deadline")
    {
        order.push(what);
    }
    assert_eq!(order.len(), 3, "a request task failed: {order:?}");
    let healthz_at = order.iter().position(|w| *w == "healthz");
    assert!(
        healthz_at.is_some_and(|i| i < 2),
        "/healthz was answered only after both patches: {order:?}"
    );
}
