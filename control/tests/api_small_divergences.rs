//! Issue 15: small divergences from kube-apiserver found by the attack, each answered as kube
//! does: an IP as a load balancer's ingress *hostname* (`ValidateLoadBalancerStatus`), a
//! `resourceVersion` that is not an unsigned integer (`ParseResourceVersion`: 400), list and
//! watch options `ValidateListOptions` refuses (422), and media types matched
//! case-insensitively (`mime.ParseMediaType`).

mod common;

use common::TestServer;
use serde_json::{json, Value};

async fn send(method: &str, url: &str, content_type: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method.parse().expect("method"), url);
    if let Some(body) = body {
        request = request
            .header("Content-Type", content_type)
            .body(body.to_string());
    }
    let response = request.send().await.expect("request");
    let code = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (code, body)
}

async fn get(url: &str) -> (u16, Value) {
    send("GET", url, "", None).await
}

/// The causes of a 422, as `field: message`.
fn causes(body: &Value) -> Vec<String> {
    body.pointer("/details/causes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            format!(
                "{}: {}",
                c["field"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test]
async fn an_ip_is_no_load_balancer_hostname() {
    let server = TestServer::start().await;
    let services = format!("{}/api/v1/namespaces/default/services", server.url());
    let lb = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
    assert_eq!(
        send("POST", &services, "application/json", Some(&lb))
            .await
            .0,
        201
    );
    let status = format!("{services}/lb/status");
    let patch =
        |hostname: &str| json!({"status": {"loadBalancer": {"ingress": [{"hostname": hostname}]}}});
    for (hostname, why) in [
        ("127.0.0.1", "must be a DNS name, not an IP address"),
        ("198.18.0.1", "must be a DNS name, not an IP address"),
        ("::1", "a lowercase RFC 1123 subdomain"),
        ("Not_A_Name", "a lowercase RFC 1123 subdomain"),
    ] {
        let (code, body) = send(
            "PATCH",
            &status,
            "application/merge-patch+json",
            Some(&patch(hostname)),
        )
        .await;
        assert_eq!(code, 422, "{hostname}: {body}");
        let causes = causes(&body);
        assert!(
            causes.iter().any(|c| c.starts_with(&format!(
                "status.loadBalancer.ingress[0].hostname: Invalid value: \"{hostname}\""
            )) && c.contains(why)),
            "{hostname}: {causes:?}"
        );
    }
    // Nothing was stored by the refusals; a DNS name is fine.
    let (_, stored) = get(&format!("{services}/lb")).await;
    assert_eq!(
        stored.pointer("/status/loadBalancer/ingress"),
        None,
        "{stored}"
    );
    let (code, body) = send(
        "PATCH",
        &status,
        "application/merge-patch+json",
        Some(&patch("lb.example.com")),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn a_resource_version_is_an_unsigned_integer() {
    let server = TestServer::start().await;
    let pods = format!("{}/api/v1/namespaces/default/pods", server.url());
    for rv in ["-1", "+1", "1e3", "abc", " 1", "99999999999999999999"] {
        let encoded: String = url_escape(rv);
        for url in [
            format!("{pods}?resourceVersion={encoded}"),
            format!("{pods}?watch=true&resourceVersion={encoded}&timeoutSeconds=1"),
        ] {
            let (code, body) = get(&url).await;
            assert_eq!(code, 400, "{url}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("invalid resource version")),
                "{url}: {body}"
            );
        }
    }
    for rv in ["", "0", "1"] {
        let (code, body) = get(&format!("{pods}?resourceVersion={rv}")).await;
        assert_eq!(code, 200, "resourceVersion={rv:?}: {body}");
    }
}

#[tokio::test]
async fn list_options_kube_refuses_are_422() {
    let server = TestServer::start().await;
    let pods = format!("{}/api/v1/namespaces/default/pods", server.url());
    for (query, cause) in [
        (
            "watch=true&sendInitialEvents=true",
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ),
        (
            "watch=true&resourceVersionMatch=NotOlderThan",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ),
        (
            "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=1",
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
        ),
        (
            "resourceVersionMatch=NotOlderThan",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
        ),
        (
            "resourceVersionMatch=Exact&resourceVersion=0",
            "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        ),
    ] {
        let (code, body) = get(&format!("{pods}?{query}")).await;
        assert_eq!(code, 422, "{query}: {body}");
        assert_eq!(causes(&body), vec![cause.to_string()], "{query}: {body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ListOptions.meta.k8s.io \"\" is invalid")),
            "{query}: {body}"
        );
    }
    // What client-go's watch-list sends is fine.
    let response = reqwest::get(format!(
        "{pods}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
    ))
    .await
    .expect("watch");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn media_types_are_case_insensitive() {
    let server = TestServer::start().await;
    let services = format!("{}/api/v1/namespaces/default/services", server.url());
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"},
        "spec": {"ports": [{"port": 80}]}});
    let (code, body) = send(
        "POST",
        &services,
        "Application/JSON; charset=UTF-8",
        Some(&svc),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = send(
        "PATCH",
        &format!("{services}/c"),
        "Application/Merge-Patch+JSON",
        Some(&json!({"metadata": {"labels": {"a": "2"}}})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["metadata"]["labels"]["a"], "2");
    // A media type kube does not take stays a 415.
    let (code, _) = send("POST", &services, "Text/Plain", Some(&svc)).await;
    assert_eq!(code, 415);
}

/// Percent-encodes a query value (enough for the values above).
fn url_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
