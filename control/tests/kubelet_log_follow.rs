//! The kubelet API keeps working when container logs rotate (copytruncate,
//! `kubelet::logs`): rotated pieces `<n>.log.<ts>` are not runs (`previous` is still the run
//! before), and a followed log goes on after its file is truncated under it instead of waiting
//! forever at an offset past the new end. Served as kpx-kubelet serves it (TLS, bounded loop)
//! on a runtime thread of its own.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kpx_control::apiserver::auth::TokenAuthenticator;
use kpx_control::kubelet::logs::{rotate_container, Policy};
use kpx_control::kubelet::server::{serve_api, ApiListener, LogApi};
use kpx_control::kubelet::tls::{serving_acceptor, CERT_FILE};
use kpx_control::serve::Limits;

const TOKEN: &str = "kubelet-client-token-0123456789";
/// Only for waiting for output that should come; never a verdict on speed.
const PATIENCE: Duration = Duration::from_secs(60);

struct Kubelet {
    url: String,
    cert: Vec<u8>,
    logs: tempfile::TempDir,
    _pki: tempfile::TempDir,
}

fn start() -> Kubelet {
    let logs = tempfile::tempdir().expect("tempdir");
    let pki = tempfile::tempdir().expect("tempdir");
    let api = LogApi {
        log_dir: logs.path().to_path_buf(),
        tokens: Some(Arc::new(
            TokenAuthenticator::parse("test", &format!("{TOKEN},system:apiserver,1\n"))
                .expect("tokens"),
        )),
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
            let listener = ApiListener {
                listener: tokio::net::TcpListener::from_std(listener).expect("listener"),
                tls,
                limits: Limits::default(),
            };
            let _ = serve_api(listener, api, std::future::pending()).await;
        });
    });
    Kubelet {
        url,
        cert,
        logs,
        _pki: pki,
    }
}

impl Kubelet {
    fn http(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        for cert in reqwest::Certificate::from_pem_bundle(&self.cert).expect("pem") {
            builder = builder.add_root_certificate(cert);
        }
        builder.build().expect("client")
    }

    async fn get(&self, query: &str) -> (u16, String) {
        let request = self
            .http()
            .get(format!("{}/containerLogs/default/web/c{query}", self.url))
            .bearer_auth(TOKEN);
        let response = tokio::time::timeout(PATIENCE, request.send())
            .await
            .expect("the kubelet API did not answer")
            .expect("request");
        let code = response.status().as_u16();
        let body = tokio::time::timeout(PATIENCE, response.text())
            .await
            .expect("the body never ended")
            .unwrap_or_default();
        (code, body)
    }
}

#[tokio::test]
async fn rotation_keeps_runs_previous_and_follow() {
    let kubelet = start();
    let dir = kubelet.logs.path().join("default_web_uid-web").join("c");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("0.log"), "first run\n").expect("write");
    let live = dir.join("1.log");
    let old: String = (0..100).map(|i| format!("old line {i}\n")).collect();
    std::fs::write(&live, &old).expect("write");

    let response = kubelet
        .http()
        .get(format!(
            "{}/containerLogs/default/web/c?follow=true",
            kubelet.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("follow");
    assert_eq!(response.status(), 200);
    let mut stream = Box::pin(response.bytes_stream());
    let mut text = String::new();
    while text != old {
        let chunk = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("the followed log stalled")
            .expect("a chunk")
            .expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }

    // Rotate as the kubelet's tick does: the live file is copied to a piece and truncated.
    let policy = Policy {
        max_size: 100,
        max_files: 5,
    };
    rotate_container(&dir, policy).expect("rotate");
    assert_eq!(std::fs::metadata(&live).expect("stat").len(), 0);
    // The container goes on writing (O_APPEND: at the new end).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&live)
        .expect("open")
        .write_all(b"after the rotation\n")
        .expect("append");

    // The follow continues from the truncated file's start (without it, it would wait at
    // offset `old.len()` forever).
    let mut after = String::new();
    while after != "after the rotation\n" {
        let chunk = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("the followed log stalled after the rotation")
            .expect("a chunk")
            .expect("bytes");
        after.push_str(&String::from_utf8_lossy(&chunk));
        assert!(
            "after the rotation\n".starts_with(&after),
            "unexpected output after the rotation: {after:?}"
        );
    }
    drop(stream);

    // The rotated piece `1.log.<ts>` is part of run 1, not a run: the current log is the live
    // file, `previous` still run 0.
    assert!(std::fs::read_dir(&dir)
        .expect("ls")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("1.log.")));
    assert_eq!(
        kubelet.get("").await,
        (200, "after the rotation\n".to_string())
    );
    assert_eq!(
        kubelet.get("?previous=true").await,
        (200, "first run\n".to_string())
    );
}
