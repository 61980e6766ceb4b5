//! Issue 15 item 6: `pods/log` connects only to a node's kubelet at a valid node address. A Node
//! whose InternalIP is 127.0.0.1 and whose kubelet port is a local service's made kpx-control
//! fetch that service and return its reply, and its errors mapped open ports.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::TestServer;
use kpx_control::apiserver::Options;
use kpx_control::store::EmbeddedStoreOptions;
use serde_json::{json, Value};

/// A local HTTP service that counts the connections it gets and answers a secret.
async fn local_service() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nTOP-SECRET!")
                .await;
        }
    });
    (port, seen)
}

async fn post(http: &reqwest::Client, url: String, body: Value) {
    let response = http.post(url).json(&body).send().await.expect("post");
    assert!(
        response.status().is_success(),
        "{:?}",
        response.text().await
    );
}

/// A Node at `ip` with the kubelet port `port`, and a pod bound to it; returns the log
/// request's status and body.
async fn logs_via(server: &TestServer, node: &str, ip: &str, port: Value) -> (u16, String) {
    let http = reqwest::Client::new();
    post(
        &http,
        format!("{}/api/v1/nodes", server.url()),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
               "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                          "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}}),
    )
    .await;
    let pod = format!("on-{node}");
    post(
        &http,
        format!("{}/api/v1/namespaces/default/pods", server.url()),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}),
    )
    .await;
    let response = http
        .get(format!(
            "{}/api/v1/namespaces/default/pods/{pod}/log",
            server.url()
        ))
        .send()
        .await
        .expect("log");
    let code = response.status().as_u16();
    (code, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_node_on_loopback_or_a_non_node_address_is_never_connected_to() {
    let (port, seen) = local_service().await;
    let server = TestServer::start_with(
        EmbeddedStoreOptions::default(),
        Options {
            own_addresses: vec!["198.18.0.1".parse().expect("ip")],
            ..Default::default()
        },
    )
    .await;
    let cases = [
        ("loopback", "127.0.0.1", json!(port)),
        ("loopback-other", "127.0.0.2", json!(port)),
        ("mapped", "::ffff:127.0.0.1", json!(port)),
        ("v6-loopback", "::1", json!(port)),
        ("unspecified", "0.0.0.0", json!(port)),
        ("metadata", "169.254.169.254", json!(80)),
        ("multicast", "224.0.0.1", json!(port)),
        ("name", "localhost", json!(port)),
        ("own", "198.18.0.1", json!(10250)),
        ("bad-port", "198.18.0.2", json!(65536 + port as i64)),
    ];
    for (node, ip, kubelet_port) in cases {
        let (code, body) = logs_via(&server, node, ip, kubelet_port).await;
        assert_eq!(code, 400, "{node} ({ip}): {body}");
        assert!(!body.contains("TOP-SECRET"), "{node}: {body}");
        assert!(
            body.contains("address not allowed")
                || body.contains("not an IP address")
                || body.contains("must be 1-65535"),
            "{node}: {body}"
        );
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "kpx-control connected to the local service"
    );
}
