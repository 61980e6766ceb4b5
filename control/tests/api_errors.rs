//! Every error the API promises, with kube-apiserver's code, reason and field — and proof that
//! a refused request changes nothing in the store.

mod common;

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

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

fn services_url(server: &TestServer) -> String {
    format!("{}/api/v1/namespaces/default/services", server.url())
}

#[tokio::test]
async fn invalid_services_get_422_naming_the_field_and_change_nothing() {
    let server = TestServer::start().await;
    let url = services_url(&server);
    let cases = [
        (json!({"ports": [{"port": 0}]}), "spec.ports[0].port"),
        (json!({"ports": [{"port": 70000}]}), "spec.ports[0].port"),
        (
            json!({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
            "spec.ports[1].name",
        ),
        (
            json!({"clusterIP": "192.0.2.1", "ports": [{"port": 80}]}),
            "spec.clusterIPs[0]",
        ),
        (
            json!({"ports": [{"port": 80, "protocol": "ICMP"}]}),
            "spec.ports[0].protocol",
        ),
        (
            json!({"type": "Magic", "ports": [{"port": 80}]}),
            "spec.type",
        ),
        (
            json!({"ports": [{"port": 80}], "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
    ];
    for (spec, field) in cases {
        let before = server.store.current_revision();
        let (code, status) = send(
            "POST",
            &url,
            "application/json",
            service("bad", spec.clone()).to_string(),
        )
        .await;
        assert_eq!(code, 422, "{spec}: {status}");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(status["details"]["kind"], "Service");
        assert_eq!(status["details"]["name"], "bad");
        let fields: Vec<&str> = status["details"]["causes"]
            .as_array()
            .expect("causes")
            .iter()
            .filter_map(|c| c["field"].as_str())
            .collect();
        assert!(
            fields.contains(&field),
            "{spec}: expected a cause for {field}, got {status}"
        );
        let message = status["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with("Service \"bad\" is invalid: "),
            "{message}"
        );
        assert_eq!(
            server.store.current_revision(),
            before,
            "a refused create wrote to the store"
        );
    }
    // The allocator released everything the refused creates took: the whole flow still works.
    let (code, created) = send(
        "POST",
        &url,
        "application/json",
        service("good", json!({"ports": [{"port": 80}]})).to_string(),
    )
    .await;
    assert_eq!(code, 201, "{created}");
}

#[tokio::test]
async fn a_requested_cluster_ip_is_honoured_once_and_refused_when_taken() {
    let server = TestServer::start().await;
    let url = services_url(&server);
    let spec = json!({"clusterIP": "10.96.100.100", "ports": [{"port": 80}]});
    let (code, created) = send(
        "POST",
        &url,
        "application/json",
        service("one", spec.clone()).to_string(),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["spec"]["clusterIP"], "10.96.100.100");
    let (code, status) = send(
        "POST",
        &url,
        "application/json",
        service("two", spec).to_string(),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or("")
            .contains("provided IP is already allocated"),
        "{status}"
    );
    // Deleting releases it.
    let (code, _) = send("DELETE", &format!("{url}/one"), "application/json", "").await;
    assert_eq!(code, 200);
    let spec = json!({"clusterIP": "10.96.100.100", "ports": [{"port": 80}]});
    let (code, status) = send(
        "POST",
        &url,
        "application/json",
        service("three", spec).to_string(),
    )
    .await;
    assert_eq!(code, 201, "{status}");
}

#[tokio::test]
async fn stale_resource_version_is_409_conflict() {
    let server = TestServer::start().await;
    let url = services_url(&server);
    let (_, created) = send(
        "POST",
        &url,
        "application/json",
        service("web", json!({"ports": [{"port": 80}]})).to_string(),
    )
    .await;
    let mut first = created.clone();
    first["metadata"]["labels"] = json!({"v": "1"});
    let (code, updated) = send(
        "PUT",
        &format!("{url}/web"),
        "application/json",
        first.to_string(),
    )
    .await;
    assert_eq!(code, 200, "{updated}");
    let mut stale = created;
    stale["metadata"]["labels"] = json!({"v": "2"});
    let before = server.store.current_revision();
    let (code, status) = send(
        "PUT",
        &format!("{url}/web"),
        "application/json",
        stale.to_string(),
    )
    .await;
    assert_eq!(code, 409, "{status}");
    assert_eq!(status["reason"], "Conflict");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or("")
            .contains("the object has been modified"),
        "{status}"
    );
    assert_eq!(server.store.current_revision(), before);
    // A JSON merge patch pinned to a stale version is refused the same way.
    let patch = json!({"metadata": {"resourceVersion": "1", "labels": {"v": "3"}}});
    let (code, _) = send(
        "PATCH",
        &format!("{url}/web"),
        "application/merge-patch+json",
        patch.to_string(),
    )
    .await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn malformed_bodies_are_400_and_oversized_ones_413() {
    let server = TestServer::start().await;
    let url = services_url(&server);
    let before = server.store.current_revision();
    let (code, status) = send(
        "POST",
        &url,
        "application/json",
        "{\"apiVersion\": \"v1\", \"kind\": ",
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (400, Some("BadRequest")),
        "{status}"
    );
    let (code, status) = send(
        "POST",
        &url,
        "application/json",
        json!({"kind": "Service", "spec": {"ports": "eighty"}}).to_string(),
    )
    .await;
    assert_eq!(code, 400, "{status}");
    let huge = format!(
        "{{\"metadata\":{{\"name\":\"x\",\"annotations\":{{\"a\":\"{}\"}}}}}}",
        "x".repeat(4 << 20)
    );
    let (code, status) = send("POST", &url, "application/json", huge).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (413, Some("RequestEntityTooLarge")),
        "{status}"
    );
    let (code, status) = send("PUT", &url, "application/json", "{}").await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (405, Some("MethodNotAllowed")),
        "{status}"
    );
    let (code, status) = send(
        "PATCH",
        &format!("{url}/x"),
        "application/apply-patch+yaml",
        "{}",
    )
    .await;
    assert_eq!(code, 415, "{status}");
    assert_eq!(
        server.store.current_revision(),
        before,
        "nothing refused was written"
    );
}

#[tokio::test]
async fn not_found_already_exists_and_missing_namespace() {
    let server = TestServer::start().await;
    let url = services_url(&server);
    let (code, status) = send("GET", &format!("{url}/nope"), "application/json", "").await;
    assert_eq!(code, 404);
    assert_eq!(status["message"], "services \"nope\" not found");
    assert_eq!(
        status["details"],
        json!({"name": "nope", "kind": "services"})
    );
    let body = service("web", json!({"ports": [{"port": 80}]})).to_string();
    assert_eq!(
        send("POST", &url, "application/json", body.clone()).await.0,
        201
    );
    let (code, status) = send("POST", &url, "application/json", body.clone()).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("AlreadyExists")),
        "{status}"
    );
    let other_ns = format!("{}/api/v1/namespaces/ghost/services", server.url());
    let (code, status) = send("POST", &other_ns, "application/json", body).await;
    assert_eq!(code, 404, "{status}");
    assert_eq!(status["message"], "namespaces \"ghost\" not found");
    let (code, _) = send(
        "GET",
        &format!("{}/api/v1/widgets", server.url()),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn two_hundred_concurrent_creates_get_distinct_cluster_ips() {
    let server = TestServer::start().await;
    let url = services_url(&server);
    let creates = (0..200).map(|i| {
        let url = url.clone();
        async move {
            let body = service(
                &format!("s{i}"),
                json!({"type": "NodePort", "ports": [{"port": 80}]}),
            )
            .to_string();
            send("POST", &url, "application/json", body).await
        }
    });
    let results = futures::future::join_all(creates).await;
    let mut ips = std::collections::HashSet::new();
    let mut node_ports = std::collections::HashSet::new();
    for (code, svc) in results {
        assert_eq!(code, 201, "{svc}");
        assert!(ips.insert(svc["spec"]["clusterIP"].as_str().expect("ip").to_string()));
        assert!(node_ports.insert(
            svc["spec"]["ports"][0]["nodePort"]
                .as_i64()
                .expect("nodePort")
        ));
    }
    assert_eq!(ips.len(), 200);
}
