//! Hostile and careless requests over real HTTP, answered as kube-apiserver answers them, with
//! nothing stored when refused: JSON patches that grow the document per operation or carry
//! more than 10,000 operations, booleans as the Python client sends them (`watch=True`), an
//! unknown `dryRun`, a changed `metadata.uid`, and the `status.replicas` kube always writes.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};

async fn send(
    method: &str,
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let response = reqwest::Client::new()
        .request(method.parse().expect("method"), url)
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let code = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (code, body)
}

async fn get(url: &str) -> (u16, Value) {
    send("GET", url, "application/json", Vec::new()).await
}

const JSON: &str = "application/json";
const JSON_PATCH: &str = "application/json-patch+json";

fn configless_service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"a": "b"}},
           "spec": {"ports": [{"port": 80}]}})
}

async fn create_service(server: &TestServer, name: &str) -> Value {
    let url = format!("{}/api/v1/namespaces/default/services", server.url());
    let (code, body) = send("POST", &url, JSON, configless_service(name).to_string()).await;
    assert_eq!(code, 201, "{body}");
    body
}

fn service_url(server: &TestServer, name: &str) -> String {
    format!("{}/api/v1/namespaces/default/services/{name}", server.url())
}

/// The attack of issue 15: 26 `copy` ops of the document root (1.4 KB of patch) doubled the
/// object per op and OOM-killed kpx-control. Now the copies are refused once together they
/// pass kube's 3 MiB, before the big value is built; the stored object is unchanged. The
/// 18-op variant (663 MB and a 200 before) and copies of a growing subtree too.
#[tokio::test]
async fn doubling_copy_patches_are_refused_and_store_nothing() {
    let server = TestServer::start().await;
    let created = create_service(&server, "web").await;
    let url = service_url(&server, "web");
    let attacks: Vec<(&str, Vec<Value>)> = vec![
        (
            "26 copies of the root",
            (0..26)
                .map(|i| json!({"op": "copy", "from": "", "path": format!("/metadata/annotations~1x{i}")}))
                .collect(),
        ),
        (
            "18 copies of the root into labels",
            std::iter::once(json!({"op": "add", "path": "/metadata/annotations", "value": {}}))
                .chain((0..18).map(|i| {
                    json!({"op": "copy", "from": "", "path": format!("/metadata/annotations/c{i}")})
                }))
                .collect(),
        ),
        (
            "26 copies of a growing subtree",
            std::iter::once(json!({"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}))
                .chain((0..26).map(|i| {
                    json!({"op": "copy", "from": "/metadata/annotations", "path": format!("/metadata/annotations/g{i}")})
                }))
                .collect(),
        ),
    ];
    for (what, ops) in attacks {
        let body = serde_json::to_vec(&ops).expect("encode");
        assert!(
            body.len() < 4096,
            "{what}: the attack is small ({} bytes)",
            body.len()
        );
        let (code, status) = send("PATCH", &url, JSON_PATCH, body).await;
        assert_eq!(code, 422, "{what}: {status}");
        let message = status["message"].as_str().unwrap_or("");
        assert!(
            message.contains("accumulated size increase of copy"),
            "{what}: {message}"
        );
    }
    let (code, now) = get(&url).await;
    assert_eq!(code, 200);
    assert_eq!(
        now["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"],
        "nothing was written"
    );
    assert!(now["metadata"].get("annotations").is_none(), "{now}");
    // The server is still serving.
    let (code, _) = get(&format!("{}/api/v1/namespaces", server.url())).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn more_than_ten_thousand_patch_operations_is_413() {
    let server = TestServer::start().await;
    let created = create_service(&server, "web").await;
    let url = service_url(&server, "web");
    let op = json!({"op": "test", "path": "/metadata/name", "value": "web"});
    let ops: Vec<Value> = std::iter::repeat_n(op.clone(), 10_001).collect();
    let (code, status) = send(
        "PATCH",
        &url,
        JSON_PATCH,
        serde_json::to_vec(&ops).expect("encode"),
    )
    .await;
    assert_eq!(code, 413, "{status}");
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    assert_eq!(
        status["message"],
        "Request entity too large: The allowed maximum operations in a JSON patch is 10000, got 10001"
    );
    // Exactly 10,000 is allowed (and changes nothing: only tests).
    let mut ops: Vec<Value> = std::iter::repeat_n(op, 9_999).collect();
    ops.push(json!({"op": "add", "path": "/metadata/labels/c", "value": "d"}));
    let (code, patched) = send(
        "PATCH",
        &url,
        JSON_PATCH,
        serde_json::to_vec(&ops).expect("encode"),
    )
    .await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["metadata"]["labels"]["c"], "d");
    assert_ne!(
        patched["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
}

/// Reads the first line of a watch stream (or the whole body, for a list) with a deadline.
async fn first_watch_event(url: &str) -> Result<Value, (u16, Value)> {
    let response = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .expect("request");
    let code = response.status().as_u16();
    if code != 200 {
        return Err((code, response.json().await.unwrap_or(Value::Null)));
    }
    let mut response = response;
    let mut buffered = Vec::new();
    let read = async {
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            buffered.extend_from_slice(&chunk);
            if let Some(end) = buffered.iter().position(|b| *b == b'\n') {
                return serde_json::from_slice::<Value>(&buffered[..end]).expect("event");
            }
        }
        serde_json::from_slice::<Value>(&buffered).expect("body")
    };
    Ok(tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the first event within 60 s"))
}

/// The Python client sends `watch=True`; kpx answered a list and the client looped. kube
/// converts booleans with `Convert_Slice_string_To_bool`: `True`, `1`, `yes` are all true,
/// `false`/`0` (any case) false.
#[tokio::test]
async fn watch_true_and_one_stream_a_watch() {
    let server = TestServer::start().await;
    create_service(&server, "web").await;
    let base = format!("{}/api/v1/namespaces/default/services", server.url());
    for value in ["True", "1", "true", "TRUE", "t", "yes"] {
        let event = first_watch_event(&format!("{base}?watch={value}"))
            .await
            .unwrap_or_else(|e| panic!("watch={value}: {e:?}"));
        assert_eq!(event["type"], "ADDED", "watch={value}: {event}");
        assert_eq!(event["object"]["metadata"]["name"], "web");
    }
    for value in ["False", "0", "FALSE"] {
        let list = first_watch_event(&format!("{base}?watch={value}"))
            .await
            .unwrap_or_else(|e| panic!("watch={value}: {e:?}"));
        assert_eq!(list["kind"], "ServiceList", "watch={value}: {list}");
    }
    // The other booleans of a watch take the same values: bookmarks with `True`.
    let url = format!("{base}?watch=True&allowWatchBookmarks=True&sendInitialEvents=True&resourceVersionMatch=NotOlderThan");
    let event = first_watch_event(&url).await.expect("watch");
    assert_eq!(event["type"], "ADDED", "{event}");
}

/// kube's `ValidateDryRun`: only `All`; anything else is a 422 on the options object and
/// writes nothing (`all` performed the real write before).
#[tokio::test]
async fn unknown_dry_run_values_are_refused_and_write_nothing() {
    let server = TestServer::start().await;
    let list = format!("{}/api/v1/namespaces/default/services", server.url());
    let (code, status) = send(
        "POST",
        &format!("{list}?dryRun=all"),
        JSON,
        configless_service("ghost").to_string(),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["reason"], "Invalid");
    assert_eq!(
        status["message"],
        r#"CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: []string{"all"}: supported values: "All""#
    );
    assert_eq!(status["details"]["causes"][0]["field"], "dryRun");
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldValueNotSupported"
    );
    let (code, _) = get(&service_url(&server, "ghost")).await;
    assert_eq!(code, 404, "the refused create stored nothing");

    let created = create_service(&server, "web").await;
    let url = service_url(&server, "web");
    let (code, _) = send(
        "PATCH",
        &format!("{url}?dryRun=yes"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"a":"changed"}}}"#,
    )
    .await;
    assert_eq!(code, 422);
    let mut replaced = created.clone();
    replaced["metadata"]["labels"]["a"] = json!("changed");
    let (code, status) = send(
        "PUT",
        &format!("{url}?dryRun=ALL"),
        JSON,
        replaced.to_string(),
    )
    .await;
    assert_eq!(code, 422);
    assert!(status["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("UpdateOptions.meta.k8s.io"));
    let (code, _) = send("DELETE", &format!("{url}?dryRun=all"), JSON, Vec::new()).await;
    assert_eq!(code, 422);
    // kubectl delete --dry-run=server sends dryRun in the DeleteOptions body.
    let (code, status) = send("DELETE", &url, JSON, r#"{"dryRun":["all"]}"#).await;
    assert_eq!(code, 422, "{status}");
    let (code, deleted) = send("DELETE", &url, JSON, r#"{"dryRun":["All"]}"#).await;
    assert_eq!(code, 200, "{deleted}");
    let (code, now) = get(&url).await;
    assert_eq!(code, 200, "a dry-run delete keeps the object");
    assert_eq!(now["metadata"]["labels"]["a"], "b");
    assert_eq!(
        now["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
    // `All` itself still works as a dry run.
    let (code, _) = send(
        "POST",
        &format!("{list}?dryRun=All"),
        JSON,
        configless_service("ghost").to_string(),
    )
    .await;
    assert_eq!(code, 201);
    let (code, _) = get(&service_url(&server, "ghost")).await;
    assert_eq!(code, 404);
}

/// kube's `ValidateObjectMetaUpdate`: `metadata.uid` is immutable (422), by PUT or patch; a
/// changed name or namespace is a 400 (the URL decides); a changed creationTimestamp is
/// ignored (`rest.BeforeUpdate` resets it).
#[tokio::test]
async fn a_changed_uid_is_refused_and_other_identity_fields_as_kube() {
    let server = TestServer::start().await;
    let created = create_service(&server, "web").await;
    let url = service_url(&server, "web");
    let uid = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let mut changed = created.clone();
    changed["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000001");
    let (code, status) = send("PUT", &url, JSON, changed.to_string()).await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["details"]["causes"][0]["field"], "metadata.uid");
    assert_eq!(
        status["details"]["causes"][0]["message"],
        r#"Invalid value: "00000000-0000-0000-0000-000000000001": field is immutable"#
    );
    let (code, _) = send(
        "PATCH",
        &url,
        "application/merge-patch+json",
        r#"{"metadata":{"uid":"x"}}"#,
    )
    .await;
    assert_eq!(code, 422);
    let (code, _) = send(
        "PATCH",
        &url,
        JSON_PATCH,
        r#"[{"op":"replace","path":"/metadata/uid","value":"y"}]"#,
    )
    .await;
    assert_eq!(code, 422);
    let (code, _) = send(
        "PATCH",
        &format!("{url}/status"),
        "application/merge-patch+json",
        r#"{"metadata":{"uid":"z"}}"#,
    )
    .await;
    assert_eq!(code, 422, "status too");

    let mut renamed = created.clone();
    renamed["metadata"]["name"] = json!("other");
    let (code, _) = send("PUT", &url, JSON, renamed.to_string()).await;
    assert_eq!(code, 400);
    let mut moved = created.clone();
    moved["metadata"]["namespace"] = json!("kube-system");
    let (code, _) = send("PUT", &url, JSON, moved.to_string()).await;
    assert_eq!(code, 400);
    let (code, now) = get(&url).await;
    assert_eq!(code, 200);
    assert_eq!(
        now["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"],
        "nothing written"
    );

    // The same uid, or none, is fine; a new creationTimestamp is ignored.
    let mut same = created.clone();
    same["metadata"]["labels"]["a"] = json!("c");
    same["metadata"]["creationTimestamp"] = json!("2001-01-01T00:00:00Z");
    let (code, updated) = send("PUT", &url, JSON, same.to_string()).await;
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["metadata"]["uid"], uid.as_str());
    assert_eq!(
        updated["metadata"]["creationTimestamp"],
        created["metadata"]["creationTimestamp"]
    );
    let mut without = updated.clone();
    without["metadata"]
        .as_object_mut()
        .expect("meta")
        .remove("uid");
    without["metadata"]["labels"]["a"] = json!("d");
    let (code, updated) = send("PUT", &url, JSON, without.to_string()).await;
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["metadata"]["uid"], uid.as_str());
}

/// ReplicaSets and ReplicationControllers get `{"replicas": 0}` as kube gives (their v1
/// status has `replicas` without omitempty; the Python client's model requires it).
#[tokio::test]
async fn new_replica_sets_and_controllers_have_status_replicas() {
    let server = TestServer::start().await;
    let template = json!({"metadata": {"labels": {"app": "a"}},
                          "spec": {"containers": [{"name": "c", "image": "nginx"}]}});
    let cases = [
        (
            format!(
                "{}/apis/apps/v1/namespaces/default/replicasets",
                server.url()
            ),
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs"},
                   "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "a"}}, "template": template},
                   "status": {}}),
        ),
        (
            format!(
                "{}/api/v1/namespaces/default/replicationcontrollers",
                server.url()
            ),
            json!({"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "rc"},
                   "spec": {"replicas": 2, "selector": {"app": "a"}, "template": template}}),
        ),
    ];
    for (url, obj) in cases {
        let (code, created) = send("POST", &url, JSON, obj.to_string()).await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["status"], json!({"replicas": 0}), "{url}");
        let name = created["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let (code, listed) = get(&url).await;
        assert_eq!(code, 200);
        assert_eq!(listed["items"][0]["status"]["replicas"], 0, "{listed}");
        // A status update that drops `replicas` still has it, as kube's typed status would.
        let (code, updated) = send("PUT", &format!("{url}/{name}/status"), JSON, {
            let mut o = created.clone();
            o["status"] = json!({});
            o.to_string()
        })
        .await;
        assert_eq!(code, 200, "{updated}");
        assert_eq!(updated["status"]["replicas"], 0, "{updated}");
    }
    // Deployments: every DeploymentStatus field is omitempty, so `{}` is kube's answer too.
    let url = format!(
        "{}/apis/apps/v1/namespaces/default/deployments",
        server.url()
    );
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": template}});
    let (code, created) = send("POST", &url, JSON, deployment.to_string()).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["status"], json!({}));
}

/// The official Python client, which found both: its watches send `watch=True`, and its
/// ReplicaSet model requires `status.replicas`. Skipped (saying so) without it.
#[tokio::test]
async fn the_python_client_watches_and_lists_replica_sets() {
    use std::process::{Command, Stdio};
    let found = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let Some(python) = common::require_tool(
        "python3 with the kubernetes package",
        found.then(|| std::path::PathBuf::from("python3")),
        "pip install kubernetes",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        common::ServerProcess::start(&dir.path().join("data"), 0, &["--controllers", "none"]);
    let kubeconfig = server.kubeconfig(dir.path());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python/watch_true_and_replicasets.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(kubeconfig)
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("OK"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A patch may not grow an object past the 3 MiB a PUT may carry: two 2 MiB merge patches
/// each fit in a request, but their sum is refused (413) and nothing is stored.
#[tokio::test]
async fn a_patch_cannot_grow_an_object_past_the_body_limit() {
    let server = TestServer::start().await;
    let events = format!("{}/api/v1/namespaces/default/events", server.url());
    let event = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
                       "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
                       "reason": "Test", "message": "small"});
    let (code, created) = send("POST", &events, JSON, event.to_string()).await;
    assert_eq!(code, 201, "{created}");
    let url = format!("{events}/e");
    let merge = "application/merge-patch+json";
    let big = |key: &str| json!({key: "x".repeat(2 << 20)}).to_string();
    let (code, first) = send("PATCH", &url, merge, big("message")).await;
    assert_eq!(code, 200, "{}", first["message"]);
    let (code, status) = send("PATCH", &url, merge, big("action")).await;
    assert_eq!(code, 413, "{}", status["message"]);
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    let (code, now) = get(&url).await;
    assert_eq!(code, 200);
    assert_eq!(
        now["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );
    assert!(now.get("action").is_none());
}
