//! The health-check node port of a `type: LoadBalancer`, `externalTrafficPolicy: Local`
//! Service (kube-proxy's `ServiceHealthServer`), probed from a pod on its node's address: 200
//! while the node has a local ready endpoint, 503 with none or only terminating ones (the
//! upstream e2e case "should fail health check node port if there are only terminating
//! endpoints"), and closed once the Service is gone.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use kpx_lab::lab::Lab;
use serde_json::{json, Value};

/// `GET /` (any path answers) from the pod `from` to `target`: the status and the JSON body,
/// or why there was no answer.
fn probe(
    lab: &Lab,
    from: &str,
    target: SocketAddr,
) -> anyhow::Result<Result<(u16, Value), String>> {
    lab.pod(from).ns.enter(move || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(
                format!("GET /probe HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(format!("no status in {response:?}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or(format!("no body in {response:?}"))?;
        if !head
            .to_ascii_lowercase()
            .contains("x-content-type-options: nosniff")
        {
            return Err(format!("no X-Content-Type-Options: nosniff in {head:?}"));
        }
        let body = serde_json::from_str(body).map_err(|e| format!("{e}: {body:?}"))?;
        Ok((code, body))
    })
}

/// Polls `probe` until it gives `code` with `local` local endpoints (or, for `None`, until
/// nothing answers); patience as `eventually`.
async fn until(
    lab: &Lab,
    what: &str,
    from: &str,
    target: SocketAddr,
    want: Option<(u16, u64)>,
) -> anyhow::Result<()> {
    let patience = std::env::var("KPX_TEST_PATIENCE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(patience);
    loop {
        let got = probe(lab, from, target)?;
        let ok = match (&got, want) {
            (Ok((code, body)), Some((want_code, local))) => {
                *code == want_code
                    && body["localEndpoints"] == local
                    && body["service"] == json!({"namespace": "default", "name": "lb"})
                    && body["serviceProxyHealthy"] == true
            }
            (Err(_), None) => true,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "timed out waiting for {what} on {target}; last answer {got:?}\n{}",
                lab.proxy_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_node_port_fails_with_only_terminating_endpoints() {
    on_every_backend("health-check-node-port", |backend| async move {
        let mut lab = Lab::start("hcnp", backend, 2, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "lb",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        let hc_port = svc
            .spec
            .as_ref()
            .and_then(|s| s.health_check_node_port)
            .ok_or_else(|| anyhow::anyhow!("the API server allocated no healthCheckNodePort"))?
            as u16;
        let node1 = SocketAddr::new(IpAddr::V4(lab.nodes[0].ip), hc_port);
        let node2 = SocketAddr::new(IpAddr::V4(lab.nodes[1].ip), hc_port);

        // No endpoints yet: the port is open and fails.
        until(
            &lab,
            "503 before any endpoint",
            "client",
            node1,
            Some((503, 0)),
        )
        .await?;

        set_endpoints(&lab, "lb", &[ready("web-a"), ready("web-b")], http_port()).await?;
        until(
            &lab,
            "200 with node 1's ready endpoint",
            "client",
            node1,
            Some((200, 1)),
        )
        .await?;
        // Each node counts its own: node 2's answer, reached from the same pod.
        until(&lab, "200 on node 2", "client", node2, Some((200, 1))).await?;

        // web-a terminates (still serving): node 1 must fail its check so a load balancer
        // drains it; node 2 is unaffected.
        let terminating = Ep {
            pod: "web-a",
            ready: false,
            serving: true,
            terminating: true,
        };
        set_endpoints(&lab, "lb", &[terminating, ready("web-b")], http_port()).await?;
        until(
            &lab,
            "503 with only a terminating local endpoint",
            "client",
            node1,
            Some((503, 0)),
        )
        .await?;
        until(&lab, "node 2 still 200", "client", node2, Some((200, 1))).await?;

        // Ready again, then no endpoints at all.
        set_endpoints(&lab, "lb", &[ready("web-a"), ready("web-b")], http_port()).await?;
        until(&lab, "200 again", "client", node1, Some((200, 1))).await?;
        set_endpoints(&lab, "lb", &[], http_port()).await?;
        until(
            &lab,
            "503 without endpoints",
            "client",
            node1,
            Some((503, 0)),
        )
        .await?;

        // The Service gone: nothing listens on the port any more.
        services(&lab).delete("lb").await?;
        until(&lab, "the port closed", "client", node1, None).await?;
        Ok(())
    })
    .await;
}
