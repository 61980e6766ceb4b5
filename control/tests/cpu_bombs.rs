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

/// Sends a whole request on its own connection and returns once it is written (so the server
/// has it, or will read it at once); the handle answers the status code.
async fn sent(
    address: std::net::SocketAddr,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> tokio::task::JoinHandle<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    stream.flush().await.expect("flush");
    tokio::spawn(async move {
        let mut answer = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("answered within the deadline")
            .expect("read");
        let text = String::from_utf8_lossy(&answer);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    })
}

/// Heavy but allowed: YAML of collections nested 251 deep (within the guard's bound), repeated
/// to 3 MB, costs libyaml seconds of CPU before serde_yaml's own recursion-limit 400. Two such
/// requests are fully sent first, then a `/healthz`: it is answered before either of them
/// (decoding runs on the blocking pool). A behaviour check, not a regression test for the pool:
/// the kernel's loopback buffers take a 3 MB body before the server reads it, so even with
/// inline decoding the health check can get in first; the bombs above are the regression tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_two_heavy_yaml_decodes_run() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let nest = format!("{}1{},", "[".repeat(250), "]".repeat(250));
    let body = format!("a: [{}1]", nest.repeat(3_000_000 / nest.len())).into_bytes();
    assert!(body.len() < 3 * 1024 * 1024);
    let path = "/api/v1/namespaces/default/pods";
    let (tx, mut answered) = tokio::sync::mpsc::unbounded_channel::<(&'static str, u16)>();
    for _ in 0..2 {
        let answer = sent(server.address, path, "application/yaml", &body).await;
        let tx = tx.clone();
        tokio::spawn(async move {
            let code = answer.await.expect("task");
            let _ = tx.send(("yaml", code));
        });
    }
    {
        let (client, base, tx) = (client.clone(), server.url(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(("healthz", healthz(&client, &base).await));
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
    for (what, code) in &order {
        assert_eq!(
            *code,
            if *what == "healthz" { 200 } else { 400 },
            "{order:?}"
        );
    }
    assert!(
        order
            .iter()
            .position(|(w, _)| *w == "healthz")
            .is_some_and(|i| i < 2),
        "/healthz was answered after both heavy decodes: {order:?}"
    );
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
