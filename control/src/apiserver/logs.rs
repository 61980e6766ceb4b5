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
    let follow = super::request::flag(&query.follow);
    let url = format!(
        "https://{endpoint}/containerLogs/{}/{name}/{container}?{}",
        namespace.unwrap_or("default"),
        serde_urlencoded::to_string(&params).unwrap_or_default()
    );
    let client = kubelet_client(server.options.kubelet_certificate_authority.as_deref())?;
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

/// The client `pods/log` reaches kubelets with, over https as kube-apiserver
/// (`pkg/kubelet/client/kubelet_client.go`, `KubeletClientConfig` → `transport.TLSConfigFor`):
/// with `--kubelet-certificate-authority` the kubelet's serving certificate must chain to that
/// CA (and only that CA) and name the address connected to; without it the certificate is not
/// verified (kube sets `Insecure` when no CA is given): the channel is still encrypted, so the
/// API server's token never crosses the node network in clear, but a man in the middle on that
/// network could read it, which the CA flag rules out.
/// No redirects (a 302 to 127.0.0.1 would undo the address check) and no proxy from the
/// environment; a connect timeout so a silent address holds nothing for long.
pub(crate) fn kubelet_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, ApiError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(KUBELET_CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .use_rustls_tls()
        .https_only(true);
    match ca_pem {
        Some(pem) => {
            builder = builder.tls_built_in_root_certs(false);
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ApiError::internal(format!("--kubelet-certificate-authority: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        None => builder = builder.danger_accept_invalid_certs(true),
    }
    builder
        .build()
        .map_err(|e| ApiError::internal(format!("the kubelet client: {e}")))
}

/// Checks a `--kubelet-certificate-authority` bundle at start-up: it must hold at least one
/// PEM certificate.
pub fn check_kubelet_certificate_authority(pem: &[u8]) -> Result<(), String> {
    match reqwest::Certificate::from_pem_bundle(pem) {
        Ok(certs) if !certs.is_empty() => {
            kubelet_client(Some(pem)).map_err(|e| e.message.clone())?;
            Ok(())
        }
        Ok(_) => Err("no CERTIFICATE block".into()),
        Err(e) => Err(e.to_string()),
    }
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

    /// A kubelet API over TLS with a self-signed certificate for 127.0.0.1 in `dir`; its URL
    /// and the certificate file (the serving certificate and its CA).
    async fn kubelet(dir: &std::path::Path) -> (String, Vec<u8>) {
        use crate::kubelet::server::{serve_api, ApiListener, LogApi};
        let pki = dir.join("pki");
        let (tls, _) =
            crate::kubelet::tls::serving_acceptor(None, None, &pki, &["127.0.0.1".into()])
                .expect("certificate");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("address"));
        let tokens = crate::apiserver::auth::TokenAuthenticator::parse("t", "tok,apiserver,1\n")
            .expect("tokens");
        let api = LogApi {
            log_dir: dir.to_path_buf(),
            tokens: Some(Arc::new(tokens)),
        };
        let listener = ApiListener {
            listener,
            tls,
            limits: crate::serve::Limits::default(),
        };
        tokio::spawn(serve_api(listener, api, std::future::pending()));
        let cert = std::fs::read(pki.join(crate::kubelet::tls::CERT_FILE)).expect("read");
        (url, cert)
    }

    /// kube-apiserver's kubelet client: unverified without a CA, verified with one.
    #[tokio::test]
    async fn kubelets_are_reached_over_https_verified_only_with_a_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, cert) = kubelet(dir.path()).await;
        let logs = format!("{url}/containerLogs/default/p/c");
        let status = |client: reqwest::Client| {
            let logs = logs.clone();
            async move {
                client
                    .get(logs)
                    .bearer_auth("tok")
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        };
        // No CA: encrypted, not verified (the pod has no logs: the kubelet's 404).
        assert_eq!(
            status(kubelet_client(None).expect("client")).await.ok(),
            Some(404)
        );
        // The kubelet's own CA: verified.
        let trusted = kubelet_client(Some(&cert)).expect("client");
        assert_eq!(status(trusted.clone()).await.ok(), Some(404));
        // Another CA: the handshake fails, nothing is sent.
        let other = tempfile::tempdir().expect("tempdir");
        let (_, other_cert) = kubelet(other.path()).await;
        let err = status(kubelet_client(Some(&other_cert)).expect("client"))
            .await
            .expect_err("an untrusted kubelet certificate was accepted");
        assert!(err.is_connect() || err.is_request(), "{err:?}");
        // Never plain http, whatever a URL says.
        let plain = trusted
            .get(logs.replace("https://", "http://"))
            .send()
            .await;
        assert!(plain.is_err(), "{plain:?}");
        assert!(check_kubelet_certificate_authority(&cert).is_ok());
        assert!(check_kubelet_certificate_authority(b"junk").is_err());
    }

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
