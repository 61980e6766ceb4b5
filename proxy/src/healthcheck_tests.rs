use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{answer, bind_addresses, parse_cidr, wanted, HealthCheckServer, ServiceHealth};
use crate::metrics::Health;
use crate::model::{
    Endpoint, NamespacedName, Protocol, ProxyState, Selected, ServiceEntry, ServicePort,
    ServicePortName,
};

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// `address` with its conditions: `r` ready, `t` terminating, `l` on this node.
fn ep(address: &str, port: u16, flags: &str) -> Endpoint {
    let ready = flags.contains('r');
    let terminating = flags.contains('t');
    Endpoint {
        ip: ip(address),
        port,
        ready,
        serving: ready || terminating,
        terminating,
        local: flags.contains('l'),
        hints: Default::default(),
    }
}

fn add(
    state: &mut ProxyState,
    service: &str,
    port_name: &str,
    local_policy: bool,
    hc: Option<u16>,
    endpoints: Vec<Endpoint>,
) {
    let name = ServicePortName {
        service: NamespacedName::new("default", service),
        port: port_name.into(),
        protocol: Protocol::Tcp,
    };
    let entry = ServiceEntry {
        port: ServicePort {
            name: name.clone(),
            cluster_ips: vec![ip("10.96.0.10")],
            port: 80,
            node_port: Some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![ip("198.19.0.10")],
            source_ranges: Vec::new(),
            source_ranges_given: false,
            affinity_seconds: None,
            external_policy_local: local_policy,
            internal_policy_local: false,
            health_check_node_port: hc,
        },
        endpoints,
        selected: Selected::default(),
    };
    state.entries.insert(name, Arc::new(entry));
}

fn counts(state: &ProxyState) -> Vec<String> {
    wanted(state)
        .iter()
        .map(|(n, ServiceHealth { port, local_ready })| format!("{n} :{port} {local_ready}"))
        .collect()
}

#[test]
fn only_local_ready_endpoints_count_once_per_address() {
    let mut state = ProxyState::default();
    add(
        &mut state,
        "web",
        "http",
        true,
        Some(32000),
        vec![
            ep("198.18.1.1", 8080, "rl"),
            ep("198.18.1.2", 8080, "rl"),
            ep("198.18.2.1", 8080, "r"),  // another node's
            ep("198.18.1.3", 8080, "l"),  // not ready
            ep("198.18.1.4", 8080, "tl"), // serving while it terminates
        ],
    );
    // The same pod on a second port is still one endpoint.
    add(
        &mut state,
        "web",
        "https",
        true,
        Some(32000),
        vec![ep("198.18.1.1", 8443, "rl")],
    );
    assert_eq!(counts(&state), ["default/web :32000 2"]);
}

#[test]
fn only_terminating_or_no_local_endpoints_count_zero_and_still_listen() {
    let mut state = ProxyState::default();
    add(
        &mut state,
        "draining",
        "",
        true,
        Some(32001),
        vec![ep("198.18.1.4", 8080, "tl"), ep("198.18.2.1", 8080, "r")],
    );
    add(&mut state, "empty", "", true, Some(32002), vec![]);
    // A slice saying ready and terminating at once does not keep the node in rotation.
    add(
        &mut state,
        "odd",
        "",
        true,
        Some(32003),
        vec![ep("198.18.1.5", 8080, "rtl")],
    );
    assert_eq!(
        counts(&state),
        [
            "default/draining :32001 0",
            "default/empty :32002 0",
            "default/odd :32003 0"
        ]
    );
}

#[test]
fn services_without_a_port_or_the_local_policy_get_no_listener() {
    let mut state = ProxyState::default();
    add(
        &mut state,
        "cluster-policy",
        "",
        false,
        Some(32004),
        vec![ep("198.18.1.1", 80, "rl")],
    );
    add(
        &mut state,
        "no-port",
        "",
        true,
        None,
        vec![ep("198.18.1.1", 80, "rl")],
    );
    assert!(counts(&state).is_empty());
}

#[test]
fn nodeport_addresses_select_the_node_addresses_to_bind() {
    let node = [
        ip("198.18.0.2"),
        ip("127.0.0.1"),
        ip("2001:2::2"),
        ip("198.19.5.5"),
    ];
    assert_eq!(bind_addresses(&[], &node), [ip("::")]);
    let cidrs = [
        parse_cidr("198.18.0.0/24").expect("cidr"),
        parse_cidr("2001:2::/64").expect("cidr"),
    ];
    assert_eq!(
        bind_addresses(&cidrs, &node),
        [ip("198.18.0.2"), ip("2001:2::2")]
    );
    assert_eq!(
        bind_addresses(&[parse_cidr("10.0.0.0/8").expect("cidr")], &node),
        Vec::<IpAddr>::new()
    );
    assert_eq!(parse_cidr("198.18.0.0/33"), None);
    assert_eq!(parse_cidr("eth0"), None);
}

async fn body_of(response: axum::response::Response) -> (u16, Option<String>, String) {
    let code = response.status().as_u16();
    let nosniff = response
        .headers()
        .get("x-content-type-options")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .expect("body");
    (code, nosniff, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn the_answer_is_kube_proxys_body_200_only_with_endpoints_and_a_healthy_proxy() {
    let name = NamespacedName::new("ns1", "web");
    let (code, nosniff, body) = body_of(answer(&name, 2, true)).await;
    assert_eq!(code, 200);
    assert_eq!(nosniff.as_deref(), Some("nosniff"));
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "ns1", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    assert_eq!(body_of(answer(&name, 0, true)).await.0, 503);
    assert_eq!(body_of(answer(&name, 3, false)).await.0, 503);
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on 127.0.0.1:port: the status code and the body, or None if nothing listens.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1)?.to_string();
    Some((code, body))
}

#[tokio::test]
async fn listeners_follow_the_state_and_answer_any_path() {
    let port = free_port();
    let health = Arc::new(Health::new(Duration::from_secs(30)));
    let mut server = HealthCheckServer::new(
        vec![parse_cidr("127.0.0.0/8").expect("cidr")],
        health.clone(),
    );
    let mut state = ProxyState::default();
    add(
        &mut state,
        "web",
        "",
        true,
        Some(port),
        vec![ep("198.18.1.1", 80, "rl")],
    );
    server.sync(&state);
    assert_eq!(server.bind_failures(), 0);
    let (code, body) = get(port, "/healthz").await.expect("an answer");
    assert_eq!(code, 200);
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
    assert_eq!(get(port, "/any/path?x=1").await.map(|a| a.0), Some(200));

    // Only a terminating endpoint left: 503 on the same listener.
    let mut draining = ProxyState::default();
    add(
        &mut draining,
        "web",
        "",
        true,
        Some(port),
        vec![ep("198.18.1.1", 80, "tl")],
    );
    server.sync(&draining);
    let (code, body) = get(port, "/").await.expect("an answer");
    assert_eq!(code, 503);
    assert!(body.contains("\"localEndpoints\":0"), "{body}");

    // The Service gone: the port closes.
    server.sync(&ProxyState::default());
    assert!(server.open_ports().is_empty());
    let mut closed = false;
    for _ in 0..100 {
        if get(port, "/").await.is_none() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        closed,
        "port {port} still answers after its Service went away"
    );
}

#[tokio::test]
async fn a_port_taken_by_someone_else_is_counted_and_retried() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let health = Arc::new(Health::new(Duration::from_secs(30)));
    let mut server =
        HealthCheckServer::new(vec![parse_cidr("127.0.0.1/32").expect("cidr")], health);
    let mut state = ProxyState::default();
    add(
        &mut state,
        "web",
        "",
        true,
        Some(port),
        vec![ep("198.18.1.1", 80, "rl")],
    );
    server.sync(&state);
    assert_eq!(server.bind_failures(), 1);
    assert!(server.open_ports().is_empty());
    drop(taken);
    server.sync(&state);
    assert_eq!(server.bind_failures(), 1);
    assert_eq!(
        server.open_ports().into_values().collect::<Vec<_>>(),
        [port]
    );
    assert_eq!(get(port, "/").await.map(|a| a.0), Some(200));
}
