//! kpx-control's connection bounds (`kpx_control::serve`), over real sockets: slowloris
//! clients closed after the header timeout, idle keep-alives after the idle timeout, a
//! connection limit that idle sockets cannot use up, watches that outlive the idle timeout, a
//! stalled request body answered 504, and kube's 1 MiB header limit.
//!
//! Each test runs its own server with short or small configured limits; nothing here depends
//! on how fast the machine is: the timeouts are one second and the tests wait up to a minute
//! for them to act.

mod common;

use std::time::Duration;

use common::{eventually, TestServer};
use kpx_control::apiserver::Options;
use kpx_control::serve::Limits;
use kpx_control::store::EmbeddedStoreOptions;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough for anything to happen on a loaded machine.
const GENEROUS: Duration = Duration::from_secs(60);

async fn server(limits: Limits) -> TestServer {
    TestServer::start_with(
        EmbeddedStoreOptions::default(),
        Options {
            limits,
            ..Options::default()
        },
    )
    .await
}

fn limits(header: u64, idle: u64) -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(header),
        idle_timeout: Duration::from_secs(idle),
        ..Limits::default()
    }
}

/// Waits until the server closes `stream` (EOF or reset), failing after a minute.
async fn closed_by_server(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(GENEROUS, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open after {GENEROUS:?}");
}

/// Reads one HTTP response (head and a Content-Length body) and returns its text.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    return;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(GENEROUS, read)
        .await
        .expect("a response within a minute");
    String::from_utf8_lossy(&data).into_owned()
}

/// Issue 15: 200 slowloris clients were still open after 120 s. Half a header line and a
/// stall, and a connection that never sends anything, are both closed after the header
/// timeout (1 s here); an ordinary request on the same server still works.
#[tokio::test]
async fn slowloris_clients_are_closed_after_the_header_timeout() {
    let server = server(limits(1, 600)).await;
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(server.address).await.expect("connect");
        if i % 2 == 0 {
            s.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHos")
                .await
                .expect("half a header");
        }
        stalled.push(s);
    }
    // A keep-alive connection that starts a second request and stalls in its header.
    let mut second = TcpStream::connect(server.address).await.expect("connect");
    second
        .write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    assert!(read_response(&mut second).await.starts_with("HTTP/1.1 200"));
    second
        .write_all(b"GET /version HTTP/1.1\r\nHo")
        .await
        .expect("half");
    stalled.push(second);
    for (i, s) in stalled.iter_mut().enumerate() {
        closed_by_server(s, &format!("stalled client {i}")).await;
    }
    let response = reqwest::get(format!("{}/version", server.url()))
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
}

/// A keep-alive connection with no request for the idle timeout is closed, and it is the idle
/// timeout that does it (the header timeout here is ten minutes).
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = server(limits(600, 1)).await;
    let mut s = TcpStream::connect(server.address).await.expect("connect");
    s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let response = read_response(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    closed_by_server(&mut s, "idle keep-alive").await;
}

/// A watch is a request in flight: it outlives many idle timeouts and still delivers events.
#[tokio::test]
async fn a_watch_outlives_the_idle_timeout() {
    let server = server(limits(1, 1)).await;
    let url = format!(
        "{}/api/v1/namespaces/default/services?watch=true",
        server.url()
    );
    let mut watch = reqwest::get(&url).await.expect("watch");
    assert_eq!(watch.status(), 200);
    // Three idle timeouts with nothing on the watch.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late"},
                     "spec": {"ports": [{"port": 80}]}});
    let created = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/namespaces/default/services",
            server.url()
        ))
        .json(&svc)
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let mut seen = Vec::new();
    let event = tokio::time::timeout(GENEROUS, async {
        while let Some(chunk) = watch.chunk().await.expect("the watch is still open") {
            seen.extend_from_slice(&chunk);
            if let Some(end) = seen.iter().position(|b| *b == b'\n') {
                return serde_json::from_slice::<serde_json::Value>(&seen[..end]).expect("event");
            }
        }
        panic!("the watch ended before its event");
    })
    .await
    .expect("the event within a minute");
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "late");
}

/// Issue 15: with a 1,024-fd limit, 1,100 idle sockets made ordinary GETs time out. Here the
/// server's limit is 64 (not the process's rlimit): 100 idle sockets, half of them stalled in
/// a header, do not stop a GET, and the server never keeps more than 64 of them.
#[tokio::test]
async fn idle_sockets_beyond_the_limit_do_not_stop_a_get() {
    let server = server(Limits {
        max_connections: 64,
        ..limits(600, 600)
    })
    .await;
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(server.address).await.expect("connect");
        if i % 2 == 1 {
            s.write_all(b"GET /api HTTP/1.1\r\nHo").await.expect("half");
        }
        idle.push(s);
    }
    let client = reqwest::Client::builder()
        .timeout(GENEROUS)
        .build()
        .expect("client");
    for _ in 0..3 {
        let response = client
            .get(format!("{}/api/v1/namespaces", server.url()))
            .send()
            .await
            .expect("GET beside 100 idle sockets");
        assert_eq!(response.status(), 200);
    }
    // The server closed the oldest idle ones to stay within its limit.
    eventually("the server to close idle sockets beyond its limit", || {
        let closed = idle
            .iter()
            .filter(|s| {
                let mut buf = [0u8; 16];
                // EOF or a reset: closed; WouldBlock: still open.
                match s.try_read(&mut buf) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                }
            })
            .count();
        async move { (closed > 100 - 64).then_some(()) }
    })
    .await;
}

/// When every connection is busy (watches), a new one is closed at once instead of waiting
/// behind them; when a watch ends, new requests are served again.
#[tokio::test]
async fn at_the_limit_with_every_connection_busy_new_ones_are_closed() {
    let server = server(Limits {
        max_connections: 3,
        ..limits(600, 600)
    })
    .await;
    let url = format!(
        "{}/api/v1/namespaces/default/services?watch=true",
        server.url()
    );
    let mut watches = Vec::new();
    for _ in 0..3 {
        // One client each: every watch on its own connection.
        let watch = reqwest::Client::new()
            .get(&url)
            .send()
            .await
            .expect("watch");
        assert_eq!(watch.status(), 200);
        watches.push(watch);
    }
    let refused = reqwest::Client::builder()
        .timeout(GENEROUS)
        .build()
        .expect("client")
        .get(format!("{}/version", server.url()))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "the limit holds: {:?}",
        refused.map(|r| r.status())
    );
    drop(watches.pop());
    eventually("a GET once a watch has ended", || async {
        let response = reqwest::Client::new()
            .get(format!("{}/version", server.url()))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
}

/// A request whose body stalls is answered with kube's 504 after the request timeout.
#[tokio::test]
async fn a_stalled_request_body_gets_504_after_the_request_timeout() {
    let server = server(Limits {
        request_timeout: Duration::from_secs(1),
        ..limits(600, 600)
    })
    .await;
    let mut s = TcpStream::connect(server.address).await.expect("connect");
    s.write_all(
        b"POST /api/v1/namespaces/default/services HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"apiVersion\"",
    )
    .await
    .expect("half a body");
    let response = read_response(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    assert!(response.contains("\"reason\":\"Timeout\""), "{response}");
}

/// kube-apiserver's MaxHeaderBytes is 1 MiB: a 2 MiB header is refused (431), not buffered.
#[tokio::test]
async fn headers_over_one_mebibyte_are_refused() {
    let server = server(limits(600, 600)).await;
    let mut s = TcpStream::connect(server.address).await.expect("connect");
    let big = "a".repeat(2 << 20);
    let request = format!("GET /version HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    // The server may close before taking all of it; what it answers is what matters.
    let _ = s.write_all(request.as_bytes()).await;
    let response = read_response(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response:.200}");
    // Within the limit is fine.
    let ok = reqwest::Client::new()
        .get(format!("{}/version", server.url()))
        .header("X-Big", "a".repeat(512 << 10))
        .send()
        .await
        .expect("GET");
    assert_eq!(ok.status(), 200);
}

/// A shutdown does not wait for watches (kpx-control never exited on SIGTERM while its own
/// controllers watched it): with a ten-minute shutdown timeout and a watch open, serving ends
/// within a minute, and the watch ends with it.
#[tokio::test]
async fn shutdown_does_not_wait_for_watches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: std::sync::Arc<dyn kpx_control::store::Store> = std::sync::Arc::new(
        kpx_control::store::EmbeddedStore::open(
            &dir.path().join("db"),
            EmbeddedStoreOptions::default(),
        )
        .expect("store"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let options = Options {
        limits: Limits {
            shutdown_timeout: Duration::from_secs(600),
            ..limits(600, 600)
        },
        ..Options::default()
    };
    let server = kpx_control::apiserver::ApiServer::new(store, options)
        .await
        .expect("server");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(kpx_control::apiserver::serve(listener, server, async {
        let _ = stopped.await;
    }));
    let mut watch = reqwest::get(format!(
        "http://{address}/api/v1/namespaces/default/services?watch=true"
    ))
    .await
    .expect("watch");
    assert_eq!(watch.status(), 200);
    let _ = stop.send(());
    tokio::time::timeout(GENEROUS, serving)
        .await
        .expect("serving ends within a minute despite the watch")
        .expect("join")
        .expect("serve");
    // Its connection is closed with it: the stream ends (or breaks) instead of hanging.
    let ended = tokio::time::timeout(GENEROUS, async {
        while let Ok(Some(_)) = watch.chunk().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the watch was left open after serve() returned"
    );
}
