//! `GET pods/NAME/log` (`kubectl logs`): the API server asks the pod's kubelet, at the node's
//! InternalIP and `daemonEndpoints.kubeletEndpoint.Port`, and streams its answer back, as
//! kube-apiserver does.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::request::Target;
use super::{codec, store_error, ApiServer};
use crate::api::resources::{by_kind, Kind};
use crate::api::ApiError;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    container: Option<String>,
    follow: Option<String>,
    previous: Option<String>,
    tail_lines: Option<String>,
    limit_bytes: Option<String>,
    timestamps: Option<String>,
}

async fn object(
    server: &ApiServer,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    let key = by_kind(kind).key(namespace, name);
    match server.store.get(&key).await.map_err(store_error)? {
        Some(kv) => Ok(Some(codec::decode(&kv)?)),
        None => Ok(None),
    }
}

/// The container the request means: the one named, or the pod's only one.
fn container(pod: &Value, name: &str, asked: Option<&str>) -> Result<String, ApiError> {
    let names: Vec<&str> = ["/spec/initContainers", "/spec/containers"]
        .iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let main: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    match asked {
        Some(c) if names.contains(&c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if main.len() == 1 => Ok(main[0].to_string()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            main.join(" ")
        ))),
    }
}

pub async fn pod_log(
    server: &Arc<ApiServer>,
    target: &Target,
    raw_query: Option<&str>,
) -> Result<Response, ApiError> {
    let mut query: LogQuery = serde_urlencoded::from_str(raw_query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    // Booleans as kube converts PodLogOptions (`follow=True` from the Python client is true).
    for value in [
        &mut query.follow,
        &mut query.previous,
        &mut query.timestamps,
    ] {
        super::request::normalize_bool(value);
    }
    let name = target.name.as_deref().unwrap_or_default();
    let namespace = target.namespace.as_deref();
    let pod = object(server, Kind::Pod, namespace, name)
        .await?
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let container = container(&pod, name, query.container.as_deref())?;
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "container \"{container}\" in pod \"{name}\" is waiting to start: the pod is not scheduled"
            ))
        })?;
    let node = object(server, Kind::Node, None, node_name)
        .await?
        .ok_or_else(|| {
            ApiError::bad_request(format!("the pod's node {node_name} does not exist"))
        })?;
    let address = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .ok_or_else(|| ApiError::bad_request(format!("node {node_name} reports no InternalIP")))?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    let host = match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => address.to_string(),
    };
    let mut params = vec![(
        "podUID",
        pod.pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    )];
    for (key, value) in [
        ("follow", &query.follow),
        ("previous", &query.previous),
        ("tailLines", &query.tail_lines),
        ("limitBytes", &query.limit_bytes),
        ("timestamps", &query.timestamps),
    ] {
        if let Some(v) = value {
            params.push((key, v.clone()));
        }
    }
    let url = format!(
        "http://{host}:{port}/containerLogs/{}/{name}/{container}?{}",
        namespace.unwrap_or("default"),
        serde_urlencoded::to_string(&params).unwrap_or_default()
    );
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let answer = client.get(&url).send().await.map_err(|e| {
        ApiError::internal(format!(
            "Get \"{url}\": the kubelet on {node_name} did not answer: {e}"
        ))
    })?;
    let status = answer.status();
    if !status.is_success() {
        let text = answer.text().await.unwrap_or_default();
        return Err(if status.as_u16() == 404 {
            ApiError::bad_request(text.trim().to_string())
        } else {
            ApiError::internal(format!(
                "the kubelet on {node_name} answered {status}: {}",
                text.trim()
            ))
        });
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(answer.bytes_stream()))
        .map_err(|e| ApiError::internal(e.to_string()))
}
