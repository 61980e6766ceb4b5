//! Watch memory bounded (issue 15, item 4), over real HTTP: a watcher whose client never reads
//! is cut off with an ERROR (410 Expired) once the history drops what it has not read, after
//! a gapless run of events; a watch without a resourceVersion streams its initial list.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::TestServer;
use kpx_control::apiserver::Options;
use kpx_control::store::EmbeddedStoreOptions;
use serde_json::{json, Value};

const EVENTS: &str = "/api/v1/namespaces/default/events";

fn event(name: &str, bytes: usize, generation: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "reason": format!("G{generation}"),
        "message": "m".repeat(bytes),
    })
}

async fn write(
    http: &reqwest::Client,
    server: &TestServer,
    name: &str,
    bytes: usize,
    generation: usize,
) -> i64 {
    let body = event(name, bytes, generation);
    let response = if generation == 0 {
        http.post(format!("{}{EVENTS}", server.url()))
            .json(&body)
            .send()
            .await
    } else {
        http.put(format!("{}{EVENTS}/{name}", server.url()))
            .json(&body)
            .send()
            .await
    }
    .expect("write");
    assert!(response.status().is_success(), "{}", response.status());
    let stored: Value = response.json().await.expect("json");
    stored["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("resourceVersion")
}

/// Sends a watch request and reads nothing until `read_all` is called.
fn idle_watch(server: &TestServer, path: &str) -> TcpStream {
    let mut socket = TcpStream::connect(server.address).expect("connect");
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.address
    )
    .expect("request");
    socket
}

/// Reads the response to its end and returns the body's JSON lines (chunked encoding undone).
fn read_all(mut socket: TcpStream) -> Vec<Value> {
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = usize::from_str_radix(
            std::str::from_utf8(&rest[..line_end]).expect("hex").trim(),
            16,
        )
        .expect("chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("json line"))
        .collect()
}

fn revision(line: &Value) -> i64 {
    line["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("resourceVersion")
}

#[tokio::test]
async fn a_watcher_that_never_reads_is_cut_off_with_410_after_a_gapless_prefix() {
    let store = EmbeddedStoreOptions {
        history_limit: 20,
        ..Default::default()
    };
    let options = Options {
        watch_buffer_bytes: 16 * 1024,
        ..Default::default()
    };
    let server = TestServer::start_with(store, options).await;
    let http = reqwest::Client::new();
    let start = write(&http, &server, "hot", 100 * 1024, 0).await;
    let socket = idle_watch(
        &server,
        &format!("{EVENTS}?watch=true&resourceVersion={start}&timeoutSeconds=60"),
    );
    // 40 MB of changes: far more than the socket buffers, the watch's buffer and the history
    // (20 events) hold together, so the watcher cannot keep up without reading.
    let mut last = start;
    for generation in 1..=400 {
        last = write(&http, &server, "hot", 100 * 1024, generation).await;
    }
    let lines = tokio::task::spawn_blocking(move || read_all(socket))
        .await
        .expect("reader");
    let (error, events) = lines.split_last().expect("some lines");
    assert_eq!(
        error["type"], "ERROR",
        "the stream ends with an error: {error}"
    );
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    let message = error["object"]["message"].as_str().unwrap_or("");
    assert!(message.contains("fell behind"), "{message}");
    // Before the error: consecutive revisions from the start, none skipped.
    for (i, line) in events.iter().enumerate() {
        assert_eq!(line["type"], "MODIFIED");
        assert_eq!(
            revision(line),
            start + 1 + i as i64,
            "no gap before the error"
        );
    }
    assert!(
        (events.len() as i64) < last - start,
        "it was cut off before the end"
    );
}

#[tokio::test]
async fn a_watch_without_resource_version_streams_the_list_then_continues_without_a_gap() {
    let server = TestServer::start_with(
        EmbeddedStoreOptions::default(),
        Options {
            watch_buffer_bytes: 16 * 1024,
            ..Default::default()
        },
    )
    .await;
    let http = reqwest::Client::new();
    for i in 0..50 {
        write(&http, &server, &format!("e{i:02}"), 10 * 1024, 0).await;
    }
    let socket = idle_watch(&server, &format!("{EVENTS}?watch=true&timeoutSeconds=5"));
    // The client reads nothing while the list is served and more changes land.
    let mut later = Vec::new();
    for i in 0..10 {
        later.push(write(&http, &server, &format!("e{i:02}"), 10, 1).await);
    }
    let lines = tokio::task::spawn_blocking(move || read_all(socket))
        .await
        .expect("reader");
    let added: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "ADDED")
        .map(|l| {
            l["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let expected: Vec<_> = (0..50).map(|i| format!("e{i:02}")).collect();
    assert_eq!(added, expected, "the whole list, in order");
    let modified: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "MODIFIED")
        .map(revision)
        .collect();
    // The changes after the list's revision arrive in order, none skipped (which of the ten
    // came after it depends on when the server took the request)...
    assert!(
        modified.windows(2).all(|w| w[1] == w[0] + 1),
        "{modified:?}"
    );
    assert!(modified.iter().all(|rv| later.contains(rv)), "{modified:?}");
    // ...so the list plus the changes is the final state.
    let mut state = std::collections::BTreeMap::new();
    for line in &lines {
        state.insert(
            line["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            line["object"]["reason"].as_str().unwrap_or("").to_string(),
        );
    }
    for (i, name) in expected.iter().enumerate() {
        let want = if i < 10 { "G1" } else { "G0" };
        assert_eq!(state.get(name).map(String::as_str), Some(want), "{name}");
    }
}
