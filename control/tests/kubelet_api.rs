//! Issue 15 item 2: the kubelet API (port 10250, reachable from every pod). Found: any pod read
//! any pod's logs without credentials; `…/containerLogs/ns/pod/%2Ftmp%2F…` read root-only
//! files anywhere; a request naming a FIFO blocked a worker and hung the kubelet.
//! It is served as kpx-kubelet serves it: over TLS with a generated self-signed certificate,
//! through the bounded serving loop (issue 15 item 5: slowloris clients on port 10250).
//! The server runs on a runtime thread of its own, so a request that blocks it shows up here as
//! a timeout instead of hanging the test.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kpx_control::apiserver::auth::TokenAuthenticator;
use kpx_control::kubelet::server::{serve_api, ApiListener, LogApi};
use kpx_control::kubelet::tls::{serving_acceptor, CERT_FILE};
use kpx_control::serve::Limits;

const TOKEN: &str = "kubelet-client-token-0123456789";
/// Only for waiting for an answer that should come at once; never a verdict on speed.
const PATIENCE: Duration = Duration::from_secs(30);

struct Kubelet {
    url: String,
    /// The kubelet's self-signed serving certificate (and its CA): what the tests trust.
    cert: Vec<u8>,
    logs: tempfile::TempDir,
    outside: tempfile::TempDir,
    _pki: tempfile::TempDir,
}

fn start(tokens: Option<&str>) -> Kubelet {
    start_with(tokens, Limits::default())
}

/// The kubelet API as kpx-kubelet serves it: over TLS with a self-signed certificate generated
/// into a cert dir, through the bounded serving loop.
fn start_with(tokens: Option<&str>, limits: Limits) -> Kubelet {
    let logs = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let pki = tempfile::tempdir().expect("tempdir");
    let api = LogApi {
        log_dir: logs.path().to_path_buf(),
        tokens: tokens.map(|t| {
            Arc::new(
                TokenAuthenticator::parse("test", &format!("{t},system:apiserver,1\n"))
                    .expect("tokens"),
            )
        }),
    };
    let cert_dir = pki.path().join("pki");
    let (tls, _) = serving_acceptor(None, None, &cert_dir, &["127.0.0.1".to_string()])
        .expect("serving certificate");
    let cert = std::fs::read(cert_dir.join(CERT_FILE)).expect("certificate");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("https://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let listener = ApiListener {
                listener,
                tls,
                limits,
            };
            let _ = serve_api(listener, api, std::future::pending()).await;
        });
    });
    Kubelet {
        url,
        cert,
        logs,
        outside,
        _pki: pki,
    }
}

impl Kubelet {
    /// Writes `<logs>/<ns>_<pod>_<uid>/<container>/<run>.log`.
    fn log(&self, pod: &str, container: &str, run: u32, text: &str) -> PathBuf {
        let dir = self
            .logs
            .path()
            .join(format!("default_{pod}_uid-{pod}"))
            .join(container);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(format!("{run}.log"));
        std::fs::write(&path, text).expect("write");
        path
    }

    /// A client that trusts the kubelet's certificate (and verifies it, with its address).
    fn http(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        for cert in reqwest::Certificate::from_pem_bundle(&self.cert).expect("pem") {
            builder = builder.add_root_certificate(cert);
        }
        builder.build().expect("client")
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut request = self.http().get(format!("{}{path}", self.url));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = tokio::time::timeout(PATIENCE, request.send())
            .await
            .unwrap_or_else(|_| panic!("{path}: the kubelet API did not answer"))
            .expect("request");
        let code = response.status().as_u16();
        let body = tokio::time::timeout(PATIENCE, response.text())
            .await
            .unwrap_or_else(|_| panic!("{path}: the body never ended"))
            .unwrap_or_default();
        (code, body)
    }
}

fn secret(dir: &Path) -> PathBuf {
    let path = dir.join("0.log");
    std::fs::write(&path, "ROOT-ONLY-SECRET\n").expect("write");
    path
}

#[tokio::test]
async fn without_the_api_servers_token_nothing_is_served() {
    let kubelet = start(Some(TOKEN));
    kubelet.log("web", "c", 0, "private output\n");
    for token in [None, Some("wrong"), Some("")] {
        let (code, body) = kubelet.get("/containerLogs/default/web/c", token).await;
        assert_eq!(code, 401, "{token:?}: {body}");
        assert!(!body.contains("private"), "{body}");
    }
    let (code, body) = kubelet
        .get("/containerLogs/default/web/c", Some(TOKEN))
        .await;
    assert_eq!((code, body.as_str()), (200, "private output\n"));

    // No token file: every request is refused, whatever it presents.
    let closed = start(None);
    closed.log("web", "c", 0, "private output\n");
    for token in [None, Some(TOKEN)] {
        let (code, _) = closed.get("/containerLogs/default/web/c", token).await;
        assert_eq!(code, 401);
    }
}

#[tokio::test]
async fn paths_outside_the_log_directory_are_refused() {
    let kubelet = start(Some(TOKEN));
    kubelet.log("web", "c", 0, "ok\n");
    let secret = secret(kubelet.outside.path());
    let outside = kubelet.outside.path().to_str().expect("path").to_string();
    let encoded = outside.replace('/', "%2F");
    let logs = kubelet.logs.path().to_str().expect("path").to_string();
    let up = logs.matches('/').count();
    let dotdots = "..%2F".repeat(up);
    for path in [
        format!("/containerLogs/default/web/{encoded}"),
        format!(
            "/containerLogs/default/web/..%2F..%2F{}",
            encoded.trim_start_matches("%2F")
        ),
        format!(
            "/containerLogs/default/web/{dotdots}{}",
            encoded.trim_start_matches("%2F")
        ),
        format!("/containerLogs/default/{encoded}/c"),
        format!(
            "/containerLogs/..%2F..%2F{}/web/c",
            encoded.trim_start_matches("%2F")
        ),
        "/containerLogs/default/web/C".to_string(),
    ] {
        let (code, body) = kubelet.get(&path, Some(TOKEN)).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(!body.contains("ROOT-ONLY-SECRET"), "{path}: {body}");
    }
    // A container directory that is a symlink out, and a log file that is one.
    let pod_dir = kubelet.logs.path().join("default_web_uid-web");
    std::os::unix::fs::symlink(kubelet.outside.path(), pod_dir.join("linked")).expect("symlink");
    let (code, body) = kubelet
        .get("/containerLogs/default/web/linked", Some(TOKEN))
        .await;
    assert_eq!(code, 404, "{body}");
    std::fs::create_dir_all(pod_dir.join("filelink")).expect("mkdir");
    std::os::unix::fs::symlink(&secret, pod_dir.join("filelink/0.log")).expect("symlink");
    let (code, body) = kubelet
        .get("/containerLogs/default/web/filelink", Some(TOKEN))
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(!body.contains("ROOT-ONLY-SECRET"), "{body}");
}

#[tokio::test]
async fn a_fifo_never_blocks_the_kubelet() {
    let kubelet = start(Some(TOKEN));
    kubelet.log("web", "c", 0, "still here\n");
    // A FIFO as a container's log inside the log directory, and a log symlinked to a FIFO
    // elsewhere: nobody ever writes to either.
    let dir = kubelet.logs.path().join("default_web_uid-web/piped");
    std::fs::create_dir_all(&dir).expect("mkdir");
    nix::unistd::mkfifo(&dir.join("0.log"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let fifo = kubelet.outside.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let linked = kubelet.logs.path().join("default_web_uid-web/linked");
    std::fs::create_dir_all(&linked).expect("mkdir");
    std::os::unix::fs::symlink(&fifo, linked.join("0.log")).expect("symlink");
    for container in ["piped", "linked"] {
        for query in ["", "?follow=true", "?tailLines=1"] {
            let (code, body) = kubelet
                .get(
                    &format!("/containerLogs/default/web/{container}{query}"),
                    Some(TOKEN),
                )
                .await;
            assert_eq!(code, 400, "{container}{query}: {body}");
            assert!(body.contains("not a regular file"), "{body}");
        }
    }
    // And the kubelet still serves everyone else.
    let (code, body) = kubelet
        .get("/containerLogs/default/web/c", Some(TOKEN))
        .await;
    assert_eq!((code, body.as_str()), (200, "still here\n"));
}

#[tokio::test]
async fn tail_limit_previous_and_follow_still_work() {
    let kubelet = start(Some(TOKEN));
    kubelet.log("web", "c", 0, "first run\n");
    let current = kubelet.log("web", "c", 1, "a\nb\nc\n");
    let get = |q: &'static str| {
        let k = &kubelet;
        async move {
            k.get(&format!("/containerLogs/default/web/c{q}"), Some(TOKEN))
                .await
        }
    };
    assert_eq!(get("?tailLines=2").await, (200, "b\nc\n".into()));
    assert_eq!(get("?limitBytes=3").await, (200, "a\nb".into()));
    assert_eq!(get("?previous=true").await, (200, "first run\n".into()));
    assert_eq!(
        get("?podUID=uid-web&tailLines=1").await,
        (200, "c\n".into())
    );
    assert_eq!(get("?podUID=other").await.0, 404);
    assert_eq!(get("?tailLines=-1").await.0, 400);
    // Booleans as kube's parameter codec decodes PodLogOptions: only 0 and false are false.
    assert_eq!(get("?previous=FALSE").await, (200, "a\nb\nc\n".into()));
    assert_eq!(get("?previous=yes").await, (200, "first run\n".into()));
    assert_eq!(get("?follow=0").await, (200, "a\nb\nc\n".into()));

    // Follow: what there is, then what is appended, until a newer run starts.
    let response = kubelet
        .http()
        .get(format!(
            "{}/containerLogs/default/web/c?follow=True",
            kubelet.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("follow");
    assert_eq!(response.status(), 200);
    use futures::StreamExt;
    let mut stream = Box::pin(response.bytes_stream());
    let mut text = String::new();
    macro_rules! next {
        () => {
            tokio::time::timeout(PATIENCE, stream.next())
                .await
                .expect("the followed log stalled")
        };
    }
    while text != "a\nb\nc\n" {
        text.push_str(&String::from_utf8_lossy(
            &next!().expect("a chunk").expect("bytes"),
        ));
    }
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&current)
            .expect("open");
        file.write_all(b"d\n").expect("append");
    }
    while text != "a\nb\nc\nd\n" {
        text.push_str(&String::from_utf8_lossy(
            &next!().expect("a chunk").expect("bytes"),
        ));
    }
    // A newer run ends the follow.
    kubelet.log("web", "c", 2, "next run\n");
    assert!(
        next!().is_none(),
        "the follow went on after the next run started"
    );
}

/// The kubelet API speaks only TLS: a plain-HTTP request (which would carry the API server's
/// token in clear) gets no HTTP answer at all.
#[tokio::test]
async fn plain_http_is_never_answered() {
    let kubelet = start(Some(TOKEN));
    kubelet.log("web", "c", 0, "private output\n");
    let plain = kubelet.url.replace("https://", "http://");
    let answer = tokio::time::timeout(
        PATIENCE,
        reqwest::Client::new()
            .get(format!("{plain}/containerLogs/default/web/c"))
            .bearer_auth(TOKEN)
            .send(),
    )
    .await
    .expect("the kubelet API neither answered nor closed a plain-HTTP request");
    assert!(answer.is_err(), "plain HTTP was answered: {answer:?}");
    // And a client that does not trust the generated certificate is refused by its own check.
    let unverified = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .expect("client")
        .get(format!("{}/containerLogs/default/web/c", kubelet.url))
        .send()
        .await;
    assert!(unverified.is_err(), "{unverified:?}");
}

/// Waits until the server closes `stream` (EOF or an error), reading and dropping whatever it
/// sends; panics if it is still open after [`PATIENCE`].
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(mut stream: S, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open after {PATIENCE:?}");
}

/// A TLS client trusting the kubelet's certificate, as tokio-rustls sees it.
fn connector(cert: &[u8]) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Issue 15 item 5 on port 10250: slowloris clients (a silent socket, a TLS handshake that
/// stalls, half a request header) and an idle keep-alive are closed after the configured
/// timeouts, and the kubelet still serves. Under `axum::serve` each stayed open forever.
#[tokio::test]
async fn slowloris_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let kubelet = start_with(
        Some(TOKEN),
        Limits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            max_connections: 64,
            ..Limits::default()
        },
    );
    kubelet.log("web", "c", 0, "still here\n");
    let address = kubelet.url.trim_start_matches("https://").to_string();

    // Connected, never a byte.
    let silent = TcpStream::connect(&address).await.expect("connect");
    // The start of a TLS ClientHello record, then nothing.
    let mut stalled_hello = TcpStream::connect(&address).await.expect("connect");
    stalled_hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    // A finished handshake, then half a request header.
    let tls = connector(&kubelet.cert);
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut half = tls
        .connect(
            name.clone(),
            TcpStream::connect(&address).await.expect("connect"),
        )
        .await
        .expect("handshake");
    half.write_all(b"GET /containerLogs/default/web/c HTTP/1.1\r\nHost: kubelet\r\nAuthor")
        .await
        .expect("write");
    half.flush().await.expect("flush");
    // A whole request on a keep-alive connection, then silence.
    let mut idle = tls
        .connect(name, TcpStream::connect(&address).await.expect("connect"))
        .await
        .expect("handshake");
    idle.write_all(
        format!(
            "GET /containerLogs/default/web/c HTTP/1.1\r\nHost: kubelet\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    idle.flush().await.expect("flush");

    closed_by_server(silent, "a silent connection").await;
    closed_by_server(stalled_hello, "a stalled TLS handshake").await;
    closed_by_server(half, "half a request header").await;
    closed_by_server(idle, "an idle keep-alive connection").await;

    let (code, body) = kubelet
        .get("/containerLogs/default/web/c", Some(TOKEN))
        .await;
    assert_eq!((code, body.as_str()), (200, "still here\n"));
}
