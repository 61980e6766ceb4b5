//! kpx-control's resident memory under hostile or careless watch clients (issue 15, item 4),
//! read from `/proc/<pid>/status` of the real `kpx-control` binary:
//! - `initial-list`: 100 watches without a resourceVersion (each starts with the whole list as
//!   ADDED events) on a ~2 MB list, from clients that never read;
//! - `slow-watchers`: 500 watchers that never read while 2,000 updates of a 10 KB object go on
//!   (with `--watch-history 200`, so the history moves past them);
//! - `history`: after 300 updates of a 1 MiB object (every version passes through the watch
//!   history).
//!
//! Each scenario runs on a fresh server and prints VmRSS before and after, and VmHWM (the peak).
//! No assertions: this measures.
//!
//! Run: `cargo bench -p kpx-control --bench watch_memory` (the release build), or
//! `cargo bench --profile dev -p kpx-control --bench watch_memory` to reuse the debug build.
//! `KPX_CONTROL_BIN=/path/to/kpx-control` measures another build (one that serves TLS and takes
//! `--token-auth-file`/`--cert-dir`, as every build since the hardening issue does);
//! `KPX_WATCH_MEMORY=history` runs one scenario.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls;

use serde_json::{json, Value};

/// A watch connection (TLS over TCP) whose client decides when, if ever, to read.
type Watch = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

struct Server {
    child: Child,
    url: String,
    address: String,
    /// The server's CA and a token it accepts, for the HTTP client and the raw watches.
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server with `extra` flags, then those in `KPX_CONTROL_ARGS` (space-separated,
    /// e.g. `--watch-history-bytes 67108864`).
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = kpx_control::apiserver::auth::random_token();
        let tokens = dir.path().join("tokens.csv");
        kpx_control::apiserver::auth::write_private(
            &tokens,
            &format!("{token},bench,bench,system:masters\n"),
        )
        .expect("token file");
        let binary = std::env::var("KPX_CONTROL_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kpx-control").to_string());
        let mut child = Command::new(binary)
            .args(["--port", "0", "--controllers", "none", "--data-dir"])
            .arg(dir.path().join("store"))
            .arg("--token-auth-file")
            .arg(&tokens)
            .arg("--cert-dir")
            .arg(dir.path())
            .args(extra)
            .args(
                std::env::var("KPX_CONTROL_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kpx-control");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("address");
        let url = line.trim().rsplit(' ').next().expect("url").to_string();
        let address = url.trim_start_matches("https://").to_string();
        let ca = std::fs::read(dir.path().join("ca.crt")).expect("ca.crt");
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
            .default_headers(
                [(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {token}").parse().expect("header"),
                )]
                .into_iter()
                .collect(),
            )
            .build()
            .expect("http client");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&ca).expect("CA PEM"))
            .expect("CA");
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Server {
            child,
            url,
            address,
            http,
            tls: Arc::new(tls),
            token,
            _dir: dir,
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn rss_mb(&self) -> f64 {
        self.status_kib("VmRSS:") as f64 / 1024.0
    }

    fn peak_mb(&self) -> f64 {
        self.status_kib("VmHWM:") as f64 / 1024.0
    }

    /// A watch whose client never reads a byte after sending the request.
    fn idle_watch(&self, path: &str) -> Watch {
        let socket = TcpStream::connect(&self.address).expect("connect");
        let host = self.address.rsplit_once(':').map_or("", |(h, _)| h);
        let name =
            ServerName::try_from(host.trim_matches(['[', ']']).to_string()).expect("server name");
        let tls = rustls::ClientConnection::new(self.tls.clone(), name).expect("TLS client");
        let mut watch = rustls::StreamOwned::new(tls, socket);
        write!(
            watch,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Accept: application/json\r\nConnection: close\r\n\r\n",
            self.address, self.token
        )
        .expect("request");
        watch.flush().expect("request");
        watch
    }

    /// Samples RSS for `period` (the server settles after the requests land) and returns the
    /// largest value seen.
    fn settle(&self, period: Duration) -> f64 {
        let until = Instant::now() + period;
        let mut most: f64 = 0.0;
        while Instant::now() < until {
            most = most.max(self.rss_mb());
            std::thread::sleep(Duration::from_millis(200));
        }
        most.max(self.rss_mb())
    }
}

/// An Event (kpx serves no ConfigMaps) whose message makes it about `bytes` long.
fn event(name: &str, bytes: usize, generation: usize) -> Value {
    let filler: String = std::iter::repeat_n(
        char::from(b'a' + (generation % 26) as u8),
        bytes.saturating_sub(200),
    )
    .collect();
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "reason": format!("Generation{generation}"),
        "message": filler,
    })
}

async fn put(http: &reqwest::Client, base: &str, name: &str, bytes: usize, generation: usize) {
    let url = format!("{base}/api/v1/namespaces/default/events");
    let body = event(name, bytes, generation);
    let response = if generation == 0 {
        http.post(&url).json(&body).send().await
    } else {
        http.put(format!("{url}/{name}")).json(&body).send().await
    }
    .expect("write");
    assert!(
        response.status().is_success(),
        "write {name}: {}",
        response.status()
    );
}

async fn resource_version(http: &reqwest::Client, base: &str) -> String {
    let list: Value = http
        .get(format!("{base}/api/v1/namespaces/default/events?limit=1"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("list json");
    list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string()
}

/// How many of `sockets` the server has closed (EOF or reset), and how many of those ended with
/// an ERROR event (read what is buffered, without waiting for more).
fn closed_by_server(sockets: &mut [Watch]) -> (usize, usize) {
    let (mut closed, mut with_error) = (0, 0);
    for socket in sockets {
        let _ = socket
            .sock
            .set_read_timeout(Some(Duration::from_millis(50)));
        let mut tail = Vec::new();
        let mut buffer = vec![0u8; 1 << 20];
        let ended = loop {
            match socket.read(&mut buffer) {
                Ok(0) => break true,
                Ok(n) => {
                    tail.extend_from_slice(&buffer[..n]);
                    let keep = tail.len().saturating_sub(4096);
                    tail.drain(..keep);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break false,
                Err(_) => break true,
            }
        };
        // The last chunk ends the response even where the connection stays open.
        let ended = ended || tail.ends_with(b"\r\n0\r\n\r\n");
        if ended {
            closed += 1;
            if String::from_utf8_lossy(&tail).contains("\"type\":\"ERROR\"") {
                with_error += 1;
            }
        }
    }
    (closed, with_error)
}

async fn initial_list() {
    const OBJECTS: usize = 200;
    const BYTES: usize = 10 * 1024;
    const WATCHES: usize = 100;
    let server = Server::start(&[]);
    let http = &server.http;
    for i in 0..OBJECTS {
        put(http, &server.url, &format!("ev-{i:04}"), BYTES, 0).await;
    }
    let list_bytes = http
        .get(format!("{}/api/v1/namespaces/default/events", server.url))
        .send()
        .await
        .expect("list")
        .bytes()
        .await
        .expect("list body")
        .len();
    let before = server.settle(Duration::from_secs(2));
    let sockets: Vec<_> = (0..WATCHES)
        .map(|_| server.idle_watch("/api/v1/namespaces/default/events?watch=true"))
        .collect();
    let after = server.settle(Duration::from_secs(8));
    println!(
        "initial-list: {WATCHES} non-reading watches without resourceVersion on a {:.1} MB list: \
         RSS {before:.0} MB before, {after:.0} MB with them open (peak {:.0} MB)",
        list_bytes as f64 / 1e6,
        server.peak_mb()
    );
    drop(sockets);
}

async fn slow_watchers() {
    const WATCHERS: usize = 500;
    const UPDATES: usize = 2_000;
    const BYTES: usize = 10 * 1024;
    // A history of 200 events (the default is 20,000), so that 2,000 updates move it past
    // the watchers and the run shows what happens to them then.
    let server = Server::start(&["--watch-history", "200"]);
    let http = &server.http;
    put(http, &server.url, "hot", BYTES, 0).await;
    let rv = resource_version(http, &server.url).await;
    let before = server.settle(Duration::from_secs(2));
    let path = format!("/api/v1/namespaces/default/events?watch=true&resourceVersion={rv}");
    let mut sockets: Vec<_> = (0..WATCHERS).map(|_| server.idle_watch(&path)).collect();
    let _ = server.settle(Duration::from_secs(2));
    let mut during: f64 = 0.0;
    for generation in 1..=UPDATES {
        put(http, &server.url, "hot", BYTES, generation).await;
        if generation % 100 == 0 {
            during = during.max(server.rss_mb());
        }
    }
    let after = server.settle(Duration::from_secs(5));
    let (closed, with_error) = closed_by_server(&mut sockets);
    println!(
        "slow-watchers: {WATCHERS} non-reading watchers, {UPDATES} updates of a {} KB object: \
         RSS {before:.0} MB before, {during:.0} MB during, {after:.0} MB after (peak {:.0} MB); \
         {closed} cut off by the server ({with_error} with an ERROR event)",
        BYTES / 1024,
        server.peak_mb()
    );
}

async fn history() {
    const UPDATES: usize = 300;
    const BYTES: usize = 1024 * 1024;
    let server = Server::start(&[]);
    let http = &server.http;
    let before = server.settle(Duration::from_secs(1));
    for generation in 0..=UPDATES {
        put(http, &server.url, "big", BYTES, generation).await;
    }
    let after = server.settle(Duration::from_secs(3));
    println!(
        "history: {UPDATES} updates of a 1 MiB object: RSS {before:.0} MB before, {after:.0} MB \
         after (peak {:.0} MB)",
        server.peak_mb()
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let only = std::env::var("KPX_WATCH_MEMORY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if wanted("initial-list") {
        initial_list().await;
    }
    if wanted("slow-watchers") {
        slow_watchers().await;
    }
    if wanted("history") {
        history().await;
    }
}
