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
/// answered (the merge was quadratic in the list: 56 s in a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategic_merge_bombs_are_answered() {
    let server = TestServer::start().await;
    let base = server.url();
    let client = reqwest::Client::new();
    let pods = format!("{base}/api/v1/namespaces/default/pods");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pb"},
                     "spec": {"containers": [{"name": "c0", "image": "x"}]}});
    let (code, text) = send(&client, "POST", pods.clone(), JSON, pod.to_string().into()).await;
    assert_eq!(code, 201, "{text}");
    let patch =
        serde_json::to_vec(&json!({"spec": {"containers": containers(60_000)}})).expect("encode");
    assert!(patch.len() < 3 * 1024 * 1024);
    let url = format!("{pods}/pb");
    let patches: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, patch) = (client.clone(), url.clone(), patch.clone());
            tokio::spawn(async move { send(&client, "PATCH", url, SMP, patch).await })
        })
        .collect();
    assert_eq!(healthz(&client, &base).await, 200);
    for patch in patches {
        let (code, text) = tokio::time::timeout(DEADLINE, patch)
            .await
            .expect("the patch is answered within the deadline")
            .expect("task");
        assert!(code == 200 || code == 422, "{code}: {text:.300}");
    }
}

/// Heavy work with a tiny body: a small patch of a stored 10,000-container pod decodes,
/// patches and validates about 2 MB. Four of them at once (dry-run, so nothing conflicts) and then
/// a `/healthz`: the health check is answered before the second patch is (the work runs on the
/// blocking pool). This checks behaviour only: on a test machine the patches are too quick for
/// the ordering to tell inline work from pooled work, so it is not a regression test for that;
/// the bombs above are (they outlast the deadline when the work is quadratic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_patches_do_not_stall_healthz() {
    let server = TestServer::start().await;
    let base = server.url();
    let client = reqwest::Client::new();
    let pods = format!("{base}/api/v1/namespaces/default/pods");
    // 10,000 containers: with the defaults filled in, patching it stays under the 3 MiB bound.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big"},
                     "spec": {"containers": containers(10_000)}});
    let body = serde_json::to_vec(&pod).expect("encode");
    let (code, text) = send(&client, "POST", pods.clone(), JSON, body).await;
    assert_eq!(code, 201, "{text:.300}");
    let url = format!("{pods}/big?dryRun=All");
    let (tx, mut answered) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    for i in 0..4 {
        let (client, url, tx) = (client.clone(), url.clone(), tx.clone());
        let patch = json!({"metadata": {"labels": {"n": i.to_string()}}}).to_string();
        tokio::spawn(async move {
            let (code, text) = send(&client, "PATCH", url, SMP, patch.into()).await;
            assert_eq!(code, 200, "{text:.300}");
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
    assert_eq!(order.len(), 5, "a request task failed: {order:?}");
    let healthz_at = order.iter().position(|w| *w == "healthz");
    assert!(
        healthz_at.is_some_and(|i| i < 2),
        "/healthz waited for the heavy patches: {order:?}"
    );
}

const JSON: &str = "application/json";
const SMP: &str = "application/strategic-merge-patch+json";

fn containers(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"name": format!("c{i}"), "image": "x"}))
        .collect()
}
