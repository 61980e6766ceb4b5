//! Addresses kube-apiserver refuses (issue 15, items 7 and 8), the external-IP allow-list
//! (DenyServiceExternalIPs), and fields that may not change after creation (item 11): each
//! refusal names the field and what is not allowed, and changes nothing in the store.

mod common;

use common::TestServer;
use kpx_control::apiserver::Options;
use kpx_control::store::EmbeddedStoreOptions;
use serde_json::{json, Value};

async fn send(method: &str, url: &str, content_type: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .request(method.parse().expect("method"), url)
        .header("Content-Type", content_type)
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let code = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (code, body)
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    send("POST", url, "application/json", body).await
}

async fn merge_patch(url: &str, body: &Value) -> (u16, Value) {
    send("PATCH", url, "application/merge-patch+json", body).await
}

fn url(server: &TestServer, path: &str) -> String {
    format!("{}/{path}", server.url())
}

fn slice(name: &str, address_type: &str, addresses: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": address_type,
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// The one cause of a 422, as `field: message`.
fn cause(body: &Value) -> String {
    let causes = body
        .pointer("/details/causes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert_eq!(causes.len(), 1, "one cause expected: {body}");
    format!(
        "{}: {}",
        causes[0]["field"].as_str().unwrap_or(""),
        causes[0]["message"].as_str().unwrap_or("")
    )
}

const LOOPBACK: &str = "may not be in the loopback range (127.0.0.0/8, ::1/128)";
const LINK_LOCAL: &str = "may not be in the link-local range (169.254.0.0/16, fe80::/10)";
const UNSPECIFIED: &str = "may not be unspecified (0.0.0.0, ::)";
const MULTICAST: &str = "may not be a multicast address (224.0.0.0/4, ff00::/8)";
const BROADCAST: &str = "may not be the broadcast address (255.255.255.255)";
const MAPPED: &str = "must not be an IPv4-mapped IPv6 address";

#[tokio::test]
async fn special_endpoint_addresses_are_refused_in_slices_and_endpoints() {
    let server = TestServer::start().await;
    let slices = url(
        &server,
        "apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
    );
    let endpoints = url(&server, "api/v1/namespaces/default/endpoints");
    let cases: &[(&str, &str, &str)] = &[
        ("IPv4", "0.0.0.0", UNSPECIFIED),
        ("IPv4", "127.0.0.1", LOOPBACK),
        ("IPv4", "169.254.169.254", LINK_LOCAL),
        ("IPv4", "239.1.1.1", MULTICAST),
        ("IPv4", "255.255.255.255", BROADCAST),
        ("IPv6", "::1", LOOPBACK),
        ("IPv6", "::", UNSPECIFIED),
        ("IPv6", "fe80::1", LINK_LOCAL),
        ("IPv6", "::ffff:127.0.0.1", MAPPED),
        ("IPv6", "::ffff:10.0.0.1", MAPPED),
    ];
    for (i, (family, address, why)) in cases.iter().enumerate() {
        let name = format!("bad-{i}");
        // An IPv4-mapped address is IPv6 by syntax: it passes the IPv6 slice's family check
        // and is refused by the form check.
        let good = if *family == "IPv6" {
            "2001:db8::1"
        } else {
            "10.0.0.1"
        };
        let (code, body) = post(&slices, &slice(&name, family, &[good, address])).await;
        assert_eq!(code, 422, "{address}: {body}");
        assert_eq!(
            cause(&body),
            format!("endpoints[1].addresses[0]: Invalid value: \"{address}\": {why}"),
            "{address}"
        );
        let (code, _) = send(
            "GET",
            &format!("{slices}/{name}"),
            "application/json",
            &json!({}),
        )
        .await;
        assert_eq!(code, 404, "{address}: nothing stored");

        let legacy = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name},
            "subsets": [{"addresses": [{"ip": address}], "ports": [{"port": 8080}]}]});
        let (code, body) = post(&endpoints, &legacy).await;
        assert_eq!(code, 422, "{address}: {body}");
        assert_eq!(
            cause(&body),
            format!("subsets[0].addresses[0].ip: Invalid value: \"{address}\": {why}")
        );
    }
    let (code, body) = post(&slices, &slice("good", "IPv4", &["198.18.0.10"])).await;
    assert_eq!(code, 201, "{body}");
}

#[tokio::test]
async fn special_external_and_load_balancer_ips_and_pod_ips_are_refused() {
    let options = Options {
        service_external_ip_cidrs: vec![
            "0.0.0.0/0".parse().expect("cidr"),
            "::/0".parse().expect("cidr"),
        ],
        ..Default::default()
    };
    let server = TestServer::start_with(EmbeddedStoreOptions::default(), options).await;
    let services = url(&server, "api/v1/namespaces/default/services");
    for (address, why) in [
        ("127.0.0.1", LOOPBACK),
        ("169.254.169.254", LINK_LOCAL),
        ("0.0.0.0", UNSPECIFIED),
        (
            "224.0.0.1",
            "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)",
        ),
        ("::ffff:198.18.0.1", MAPPED),
    ] {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"externalIPs": [address], "ports": [{"port": 80}]}});
        let (code, body) = post(&services, &svc).await;
        assert_eq!(code, 422, "{address}: {body}");
        assert_eq!(
            cause(&body),
            format!("spec.externalIPs[0]: Invalid value: \"{address}\": {why}")
        );
    }
    let lb = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
    assert_eq!(post(&services, &lb).await.0, 201);
    let (code, body) = merge_patch(
        &format!("{services}/lb/status"),
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": "169.254.169.254"}]}}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        cause(&body),
        format!(
            "status.loadBalancer.ingress[0].ip: Invalid value: \"169.254.169.254\": {LINK_LOCAL}"
        )
    );
    let (code, body) = merge_patch(
        &format!("{services}/lb/status"),
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.18.64.20"}]}}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");

    let pods = url(&server, "api/v1/namespaces/default/pods");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]}});
    assert_eq!(post(&pods, &pod).await.0, 201);
    for (status, field, address, why) in [
        (
            json!({"podIP": "127.0.0.1"}),
            "status.podIP",
            "127.0.0.1",
            LOOPBACK,
        ),
        (
            json!({"podIPs": [{"ip": "fe80::2"}]}),
            "status.podIPs[0].ip",
            "fe80::2",
            LINK_LOCAL,
        ),
        (
            json!({"hostIP": "0.0.0.0"}),
            "status.hostIP",
            "0.0.0.0",
            UNSPECIFIED,
        ),
    ] {
        let (code, body) =
            merge_patch(&format!("{pods}/p/status"), &json!({ "status": status })).await;
        assert_eq!(code, 422, "{address}: {body}");
        assert_eq!(
            cause(&body),
            format!("{field}: Invalid value: \"{address}\": {why}")
        );
    }
    let (code, body) = merge_patch(
        &format!("{pods}/p/status"),
        &json!({"status": {"podIP": "198.19.1.10", "podIPs": [{"ip": "198.19.1.10"}]}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn external_ips_are_forbidden_unless_inside_the_allowed_cidrs() {
    // The default: none allowed (DenyServiceExternalIPs).
    let server = TestServer::start().await;
    let services = url(&server, "api/v1/namespaces/default/services");
    let svc = |name: &str, ips: &[&str]| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"externalIPs": ips, "ports": [{"port": 80}]}})
    };
    let (code, body) = post(&services, &svc("web", &["198.18.64.10"])).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(
        body["message"],
        "services \"web\" is forbidden: Use of external IPs is denied by admission control"
    );
    let (code, _) = send(
        "GET",
        &format!("{services}/web"),
        "application/json",
        &json!({}),
    )
    .await;
    assert_eq!(code, 404, "nothing stored");
    // A Service without external IPs is untouched, and adding one later is refused too.
    assert_eq!(post(&services, &svc("plain", &[])).await.0, 201);
    let (code, _) = merge_patch(
        &format!("{services}/plain"),
        &json!({"spec": {"externalIPs": ["198.18.64.10"]}}),
    )
    .await;
    assert_eq!(code, 403);

    // With an allow-list: inside is accepted, outside refused naming the address.
    let options = Options {
        service_external_ip_cidrs: vec!["198.18.64.0/24".parse().expect("cidr")],
        ..Default::default()
    };
    let server = TestServer::start_with(EmbeddedStoreOptions::default(), options).await;
    let services = url(&server, "api/v1/namespaces/default/services");
    assert_eq!(post(&services, &svc("web", &["198.18.64.10"])).await.0, 201);
    // The API server's own address (the hijack of CVE-2020-8554).
    let (code, body) = post(&services, &svc("hijack", &["198.18.0.1"])).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["message"].as_str().is_some_and(
            |m| m.contains("\"198.18.0.1\" is outside the allowed ranges (198.18.64.0/24")
        ),
        "{body}"
    );
    // Keeping the stored external IP while changing something else is allowed; adding one
    // outside the list is not.
    let (code, body) = merge_patch(
        &format!("{services}/web"),
        &json!({"metadata": {"labels": {"a": "b"}}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = merge_patch(
        &format!("{services}/web"),
        &json!({"spec": {"externalIPs": ["198.18.64.10", "198.18.0.11"]}}),
    )
    .await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn pod_spec_and_slice_address_type_are_immutable_and_too_many_endpoints_is_counted() {
    let server = TestServer::start().await;
    let pods = url(&server, "api/v1/namespaces/default/pods");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1"}]}});
    assert_eq!(post(&pods, &pod).await.0, 201);
    // The image may change.
    let (code, body) = send(
        "PATCH",
        &format!("{pods}/p"),
        "application/json-patch+json",
        &json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "nginx:2"}]),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    for (patch, changed) in [
        (
            json!([{"op": "add", "path": "/spec/containers/-", "value": {"name": "d", "image": "busybox"}}]),
            "spec.containers",
        ),
        (
            json!([{"op": "replace", "path": "/spec/containers/0/name", "value": "other"}]),
            "spec.containers",
        ),
        (
            json!([{"op": "add", "path": "/spec/nodeName", "value": "node-1"}]),
            "spec.nodeName",
        ),
    ] {
        let (code, body) = send(
            "PATCH",
            &format!("{pods}/p"),
            "application/json-patch+json",
            &patch,
        )
        .await;
        assert_eq!(code, 422, "{patch}: {body}");
        let message = cause(&body);
        assert!(
            message.starts_with("spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`")
                && message.contains(&format!("(changed: {changed})")),
            "{message}"
        );
    }
    let (_, stored) = send("GET", &format!("{pods}/p"), "application/json", &json!({})).await;
    assert_eq!(
        stored.pointer("/spec/containers/0/image"),
        Some(&json!("nginx:2"))
    );
    assert_eq!(stored.pointer("/spec/containers/1"), None);
    assert_eq!(stored.pointer("/spec/nodeName"), None);
    // The binding subresource still assigns the node.
    let (code, body) = post(
        &format!("{pods}/p/binding"),
        &json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"name": "node-1"}}),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    let slices = url(
        &server,
        "apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
    );
    assert_eq!(
        post(&slices, &slice("s", "IPv4", &["198.18.0.10"])).await.0,
        201
    );
    let mut changed = slice("s", "IPv6", &["2001:db8::1"]);
    changed["metadata"]["name"] = json!("s");
    let (code, body) = send("PUT", &format!("{slices}/s"), "application/json", &changed).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        cause(&body),
        "addressType: Invalid value: \"IPv6\": field is immutable"
    );

    let addresses: Vec<String> = (0..1001)
        .map(|i| format!("198.18.{}.{}", 1 + i / 250, 1 + i % 250))
        .collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let (code, body) = post(&slices, &slice("big", "IPv4", &refs)).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        cause(&body),
        "endpoints: Too many: 1001: must have at most 1000 items"
    );
}
