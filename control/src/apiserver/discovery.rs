//! Discovery (`/version`, `/api`, `/apis`, group and resource lists), OpenAPI and health.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::response::{json, json_bytes};
use super::ApiServer;
use crate::api::resources::{groups, RESOURCES};
use crate::api::ApiError;

/// The Kubernetes version whose API kpx-control serves.
pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "33";

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

pub async fn version() -> Response {
    json(
        StatusCode::OK,
        &json!({
            "major": KUBE_MAJOR,
            "minor": KUBE_MINOR,
            "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0-kpx.{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
        }),
    )
}

pub async fn api_versions(State(server): State<Arc<ApiServer>>) -> Response {
    let address = server
        .options
        .advertise_address
        .map(|a| a.to_string())
        .unwrap_or_default();
    json(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
        }),
    )
}

fn group_json(group: &str) -> Value {
    let versions: Vec<&str> = {
        let mut v: Vec<&str> = RESOURCES
            .iter()
            .filter(|r| r.group == group)
            .map(|r| r.version)
            .collect();
        v.dedup();
        v
    };
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": entries,
        "preferredVersion": entries.first().cloned().unwrap_or(json!({})),
    })
}

pub async fn api_groups() -> Response {
    let list: Vec<Value> = groups().into_iter().map(group_json).collect();
    json(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
    )
}

pub fn group(group: &str) -> Result<Response, ApiError> {
    if !groups().contains(&group) {
        return Err(ApiError::path_not_found(&format!("/apis/{group}")));
    }
    let mut body = group_json(group);
    body["kind"] = json!("APIGroup");
    body["apiVersion"] = json!("v1");
    Ok(json(StatusCode::OK, &body))
}

/// `/api/v1` and `/apis/<group>/<version>`: an APIResourceList.
pub fn resource_list(group: &str, version: &str) -> Result<Response, ApiError> {
    let served: Vec<_> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        let path = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        return Err(ApiError::path_not_found(&path));
    }
    let mut resources = Vec::new();
    for r in served {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind_name,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        resources.push(entry);
        for sub in r.subresources {
            let (kind, verbs): (&str, &[&str]) = match *sub {
                "binding" => ("Binding", &["create"]),
                "log" => ("Pod", &["get"]),
                "scale" => ("Scale", &["get", "patch", "update"]),
                _ => (r.kind_name, &["get", "patch", "update"]),
            };
            let mut entry = json!({
                "name": format!("{}/{sub}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if *sub == "scale" {
                entry["group"] = json!("autoscaling");
                entry["version"] = json!("v1");
            }
            resources.push(entry);
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(json(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    ))
}

/// kubectl asks for protobuf; others get JSON.
pub async fn openapi_v2(State(server): State<Arc<ApiServer>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("protobuf") {
        let mut response = (StatusCode::OK, server.openapi.v2_proto.clone()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return response;
    }
    json_bytes(StatusCode::OK, server.openapi.v2_json.clone())
}

pub async fn openapi_v3_index(State(server): State<Arc<ApiServer>>) -> Response {
    json_bytes(StatusCode::OK, server.openapi.v3_index.clone())
}

pub async fn openapi_v3_doc(
    State(server): State<Arc<ApiServer>>,
    Path(path): Path<String>,
) -> Response {
    match server.openapi.v3_docs.get(path.trim_matches('/')) {
        Some(doc) => json_bytes(StatusCode::OK, doc.clone()),
        None => ApiError::path_not_found(&format!("/openapi/v3/{path}")).into_response(),
    }
}

/// `/livez`: the process serves. The store's state is not part of it: a store that cannot
/// write recovers by itself (it is reopened with backoff), so restarting would not help.
pub async fn livez(query: RawQuery) -> Response {
    checks(&query, "livez", &[("ping", Ok(()))])
}

/// `/readyz` and `/healthz`: as kube-apiserver's, a list of checks, `ok` (200) when all pass,
/// otherwise 500 with each check as `[+]name ok` / `[-]name failed: reason withheld`
/// (staging/src/k8s.io/apiserver/pkg/server/healthz/healthz.go, `handleRootHealth`). The
/// `etcd` check is named as upstream's and fails while the store cannot write (e.g. a full
/// disk). `?verbose` lists the checks on success too; `?exclude=NAME` skips one.
pub async fn readyz(State(server): State<Arc<ApiServer>>, query: RawQuery) -> Response {
    let etcd = match server.store.health().write_error {
        None => Ok(()),
        Some(reason) => Err(reason),
    };
    checks(&query, "readyz", &[("ping", Ok(())), ("etcd", etcd)])
}

pub async fn healthz(State(server): State<Arc<ApiServer>>, query: RawQuery) -> Response {
    let etcd = match server.store.health().write_error {
        None => Ok(()),
        Some(reason) => Err(reason),
    };
    checks(&query, "healthz", &[("ping", Ok(())), ("etcd", etcd)])
}

fn checks(query: &RawQuery, name: &str, results: &[(&str, Result<(), String>)]) -> Response {
    let pairs: Vec<(String, String)> = query
        .0
        .as_deref()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let verbose = pairs.iter().any(|(k, _)| k == "verbose");
    let excluded: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "exclude")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut failed = false;
    let mut text = String::new();
    for (check, result) in results {
        if excluded.contains(check) {
            text.push_str(&format!("[+]{check} excluded: ok\n"));
            continue;
        }
        match result {
            Ok(()) => text.push_str(&format!("[+]{check} ok\n")),
            Err(_) => {
                failed = true;
                // Upstream withholds the reason from the response (it may say more than an
                // anonymous caller should learn); /metrics and the log have it.
                text.push_str(&format!("[-]{check} failed: reason withheld\n"));
            }
        }
    }
    let status = if failed {
        text.push_str(&format!("{name} check failed\n"));
        StatusCode::INTERNAL_SERVER_ERROR
    } else if verbose {
        text.push_str(&format!("{name} check passed\n"));
        StatusCode::OK
    } else {
        text = "ok".into();
        StatusCode::OK
    };
    let mut response = (status, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.headers_mut().insert(
        header::HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `/metrics`: the store's write health (kpx's own names; kube-apiserver's storage metrics
/// are per etcd request, which this store does not have).
pub async fn metrics(State(server): State<Arc<ApiServer>>) -> Response {
    use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
    let health = server.store.health();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register(
        "kpx_store_write_failures",
        "Store commits and reopen attempts that failed (e.g. on a full disk)",
        ConstCounter::new(health.write_failures),
    );
    registry.register(
        "kpx_store_reopens",
        "Times the store's database was reopened after a failed commit",
        ConstCounter::new(health.reopens),
    );
    registry.register(
        "kpx_store_writable",
        "1 while the store can write, 0 while it is recovering",
        ConstGauge::new(i64::from(health.write_error.is_none())),
    );
    crate::daemon::metrics_response(&registry)
}
