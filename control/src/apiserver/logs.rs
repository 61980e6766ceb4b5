//! `GET pods/NAME/log` (`kubectl logs`): the API server asks the pod's kubelet, at the node's
//! InternalIP and `daemonEndpoints.kubeletEndpoint.Port`, and streams its answer back, as
//! kube-apiserver does.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

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
    let endpoint = kubelet_endpoint(&node, node_name, &server.options.own_addresses)?;
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
    let follow = query
        .follow
        .as_deref()
        .is_some_and(|v| matches!(v, "true" | "1" | "True" | "TRUE" | "t" | "T"));
    let url = format!(
        "http://{endpoint}/containerLogs/{}/{name}/{container}?{}",
        namespace.unwrap_or("default"),
        serde_urlencoded::to_string(&params).unwrap_or_default()
    );
    // No redirects (a 302 to 127.0.0.1 would undo the address check) and no proxy from the
    // environment; connect and answer timeouts so a silent address holds nothing for long.
    let client = reqwest::Client::builder()
        .connect_timeout(KUBELET_CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut request = client.get(&url);
    if let Some(token) = &server.options.kubelet_client_token {
        request = request.bearer_auth(token);
    }
    if !follow {
        // A whole, non-followed log has a deadline of its own; a followed one streams as long
        // as the client reads.
        request = request.timeout(KUBELET_REQUEST_TIMEOUT);
    }
    let answer = match tokio::time::timeout(KUBELET_REQUEST_TIMEOUT, request.send()).await {
        Ok(Ok(answer)) => answer,
        failed => {
            // The detail (refused, reset, timed out) stays in the log: telling them apart in
            // the answer would let a client map which ports are open on an address.
            let detail = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer in time".to_string(),
            };
            tracing::warn!(node = node_name, %url, error = %detail, "the kubelet did not answer");
            return Err(ApiError::internal(format!(
                "the kubelet on {node_name} did not answer"
            )));
        }
    };
    let status = answer.status();
    if !status.is_success() {
        let text = answer.text().await.unwrap_or_default();
        tracing::debug!(node = node_name, %status, body = %text.chars().take(1024).collect::<String>(), "the kubelet refused a log request");
        return Err(match status.as_u16() {
            // The kubelet's own "container … not found": short, and what the user needs.
            404 => ApiError::bad_request(text.trim().chars().take(1024).collect::<String>()),
            401 | 403 => ApiError::internal(format!(
                "the kubelet on {node_name} refused the API server's credentials ({status}): \
                 see kpx-control --kubelet-client-token-file"
            )),
            _ => ApiError::internal(format!("the kubelet on {node_name} answered {status}")),
        });
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(answer.bytes_stream()))
        .map_err(|e| ApiError::internal(e.to_string()))
}

const KUBELET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KUBELET_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// kube-apiserver's `--kubelet-port` default, for nodes that report no kubelet port.
const DEFAULT_KUBELET_PORT: u16 = 10250;

/// Whether `ip` may be proxied to, as kube's `proxyutil.IsProxyableIP`
/// (`pkg/proxy/util/utils.go`): not loopback, link-local unicast, link-local multicast,
/// any other multicast, unspecified or broadcast; an IPv4-mapped IPv6 address is judged as
/// its IPv4 address.
pub fn is_proxyable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_proxyable(IpAddr::V4(v4));
            }
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !(v6.is_loopback() || link_local || v6.is_multicast() || v6.is_unspecified())
        }
    }
}

/// Where the node's kubelet listens: its first InternalIP, which must be an IP address (no
/// names are resolved, as `isProxyableHostname` would otherwise have to check every answer)
/// that is proxyable and not one of the API server's own, and its
/// `daemonEndpoints.kubeletEndpoint.Port` (10250 when unset, as kube's
/// `NodeConnectionInfoGetter`).
fn kubelet_endpoint(node: &Value, node_name: &str, own: &[IpAddr]) -> Result<SocketAddr, ApiError> {
    let address = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .ok_or_else(|| ApiError::bad_request(format!("node {node_name} reports no InternalIP")))?;
    let ip: IpAddr = address.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "node {node_name}: InternalIP {address:?} is not an IP address"
        ))
    })?;
    if !is_proxyable(ip) || own.contains(&ip) {
        return Err(ApiError::bad_request(format!(
            "node {node_name}: address not allowed: InternalIP {ip} is loopback, link-local, \
             multicast, unspecified or the API server's own; the kubelet must be reached at a \
             node address"
        )));
    }
    let port = match node.pointer("/status/daemonEndpoints/kubeletEndpoint/Port") {
        None | Some(Value::Null) => DEFAULT_KUBELET_PORT,
        Some(v) => match v.as_i64() {
            Some(0) => DEFAULT_KUBELET_PORT,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "node {node_name}: daemonEndpoints.kubeletEndpoint.Port {v}: must be 1-65535"
                )))
            }
        },
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxyable_addresses_as_kube() {
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "239.1.1.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!is_proxyable(bad.parse().expect(bad)), "{bad}");
        }
        for good in [
            "198.18.0.2",
            "10.0.0.1",
            "2001:2::1",
            "fec0::1",
            "::ffff:198.18.0.2",
        ] {
            assert!(is_proxyable(good.parse().expect(good)), "{good}");
        }
    }

    #[test]
    fn kubelet_endpoints() {
        let node = |ip: &str, port: Value| {
            serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}})
        };
        let own: Vec<IpAddr> = vec!["198.18.0.1".parse().expect("ip")];
        let ok = kubelet_endpoint(&node("198.18.0.2", 10250.into()), "n", &own).expect("ok");
        assert_eq!(ok.to_string(), "198.18.0.2:10250");
        let default = kubelet_endpoint(&node("198.18.0.2", Value::Null), "n", &own).expect("ok");
        assert_eq!(default.port(), 10250);
        for (ip, port) in [
            ("127.0.0.1", Value::from(8080)),
            ("198.18.0.1", Value::from(10250)),
            ("localhost", Value::from(10250)),
            ("198.18.0.2", Value::from(70000)),
            ("198.18.0.2", Value::from(-1)),
            ("198.18.0.2", Value::from("80")),
        ] {
            let err = kubelet_endpoint(&node(ip, port.clone()), "n", &own).expect_err(ip);
            assert_eq!(err.code, 400, "{ip} {port}: {}", err.message);
        }
    }
}
