//! Issue 15 item 1: the API answers only bearer tokens from its token file; an anonymous client
//! gets health and version and a 401 for everything else, and nothing it sends is stored.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;

use common::{kubectl, ServerProcess, TestServer};
use kpx_control::apiserver::auth::TokenAuthenticator;
use kpx_control::apiserver::Options;
use kpx_control::store::EmbeddedStoreOptions;
use serde_json::{json, Value};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn server() -> TestServer {
    let auth = TokenAuthenticator::parse("test", &format!("{TOKEN},alice,1,\"system:masters\"\n"))
        .expect("token file");
    TestServer::start_with(
        EmbeddedStoreOptions::default(),
        Options {
            authenticator: Some(Arc::new(auth)),
            ..Default::default()
        },
    )
    .await
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "evil"},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

async fn assert_unauthorized(response: reqwest::Response) {
    assert_eq!(response.status(), 401, "{:?}", response.url().path());
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":"Unauthorized","reason":"Unauthorized","code":401})
    );
}

async fn stored_pods(server: &TestServer) -> usize {
    server
        .store
        .list("/registry/pods/", None, 0, None)
        .await
        .expect("list")
        .kvs
        .len()
}

#[tokio::test]
async fn anonymous_requests_get_401_and_store_nothing() {
    let server = server().await;
    let http = reqwest::Client::new();
    let base = server.url();
    for path in [
        "/api/v1/namespaces/default/pods",
        "/api/v1/pods?watch=true",
        "/api/v1/namespaces/default/pods?watch=1",
        "/api",
        "/apis",
        "/api/v1",
        "/openapi/v2",
        "/openapi/v3",
        "/api/v1/namespaces/default/secrets",
    ] {
        assert_unauthorized(http.get(format!("{base}{path}")).send().await.expect("get")).await;
    }
    let created = http
        .post(format!("{base}/api/v1/namespaces/default/pods"))
        .json(&pod())
        .send()
        .await
        .expect("post");
    assert_unauthorized(created).await;
    // Health checks are public, but only for reading.
    let post_health = http
        .post(format!("{base}/healthz"))
        .send()
        .await
        .expect("post");
    assert_eq!(post_health.status(), 401);
    assert_eq!(
        stored_pods(&server).await,
        0,
        "an anonymous POST stored a Pod"
    );
}

#[tokio::test]
async fn health_and_version_answer_anonymously() {
    let server = server().await;
    let http = reqwest::Client::new();
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        let response = http
            .get(format!("{}{path}", server.url()))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_wrong_or_malformed_token_is_401_even_for_public_paths() {
    let server = server().await;
    let http = reqwest::Client::new();
    let base = server.url();
    for header in [
        "Bearer wrong".to_string(),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
        format!("Bearer {TOKEN}x"),
        // Not one bearer token: refused rather than guessed at.
        format!("Bearer {TOKEN} {TOKEN}"),
    ] {
        for path in ["/api/v1/namespaces/default/pods", "/healthz"] {
            let response = http
                .get(format!("{base}{path}"))
                .header("Authorization", &header)
                .send()
                .await
                .expect("get");
            assert_unauthorized(response).await;
        }
        let created = http
            .post(format!("{base}/api/v1/namespaces/default/pods"))
            .header("Authorization", &header)
            .json(&pod())
            .send()
            .await
            .expect("post");
        assert_unauthorized(created).await;
    }
    assert_eq!(stored_pods(&server).await, 0);
}

#[tokio::test]
async fn the_right_token_works_for_crud_watch_and_discovery() {
    let server = server().await;
    let http = reqwest::Client::new();
    let base = server.url();
    let auth = format!("Bearer {TOKEN}");
    for path in [
        "/api",
        "/apis",
        "/openapi/v2",
        "/api/v1/namespaces/default/pods",
    ] {
        let response = http
            .get(format!("{base}{path}"))
            .header("Authorization", &auth)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), 200, "{path}");
    }
    let created = http
        .post(format!("{base}/api/v1/namespaces/default/pods"))
        .header("Authorization", &auth)
        .json(&pod())
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    assert_eq!(stored_pods(&server).await, 1);
    // The typed client with the token lists and watches.
    let pods: kpx_control::client::Api<k8s_openapi::api::core::v1::Pod> =
        kpx_control::client::Api::namespaced(server.client_with_token(TOKEN), "default");
    let list = pods
        .list(&Default::default())
        .await
        .expect("list with the token");
    assert_eq!(list.items.len(), 1);
    let watch = http
        .get(format!(
            "{base}/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1"
        ))
        .header("Authorization", &auth)
        .send()
        .await
        .expect("watch");
    assert_eq!(watch.status(), 200);
    // Without the token the same client is refused.
    let anonymous: kpx_control::client::Api<k8s_openapi::api::core::v1::Pod> =
        kpx_control::client::Api::namespaced(server.client(), "default");
    let err = anonymous
        .list(&Default::default())
        .await
        .expect_err("anonymous list");
    assert_eq!(err.code(), Some(401));
}

#[tokio::test]
async fn the_binary_requires_a_token_and_writes_its_files_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, 0, &["--controllers", "none"]);
    for file in ["tokens.csv", "admin.kubeconfig"] {
        let mode = std::fs::metadata(data.join(file))
            .expect(file)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: mode {mode:o}");
    }
    let config =
        kpx_control::client::ClientConfig::from_kubeconfig(&data.join("admin.kubeconfig"), None)
            .expect("the admin kubeconfig");
    assert_eq!(config.server, server.url);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    assert_eq!(config.token.as_deref(), Some(server.token().as_str()));
    let http = server.anonymous_http();
    let created = http
        .post(format!("{}/api/v1/namespaces/default/pods", server.url))
        .json(&pod())
        .send()
        .await
        .expect("post");
    assert_unauthorized(created).await;
    let pods: kpx_control::client::Api<k8s_openapi::api::core::v1::Pod> =
        kpx_control::client::Api::namespaced(server.client(), "default");
    assert!(pods
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .is_empty());
    let health = http
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn the_binary_serves_a_given_token_file_and_refuses_a_malformed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens.csv");
    std::fs::write(&file, format!("{TOKEN},bob,2,\"system:masters,dev\"\n")).expect("write");
    let data = dir.path().join("data");
    let server = ServerProcess::start(
        &data,
        0,
        &[
            "--controllers",
            "none",
            "--token-auth-file",
            file.to_str().expect("path"),
        ],
    );
    assert!(
        !data.join("tokens.csv").exists(),
        "a token file was generated beside the given one"
    );
    let http = server.anonymous_http();
    let ok = http
        .get(format!("{}/api/v1/namespaces/default/pods", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(ok.status(), 200);
    drop(server);

    std::fs::write(&file, format!("{TOKEN},bob,2\nonly-a-token\n")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kpx-control"))
        .args(["--port", "0", "--controllers", "none", "--data-dir"])
        .arg(&data)
        .arg("--token-auth-file")
        .arg(&file)
        .output()
        .expect("run kpx-control");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("at least 3 columns"),
        "{stderr}"
    );
}

#[tokio::test]
async fn kubectl_works_with_the_token_and_is_refused_with_another() {
    let Some(bin) = kubectl() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("data"), 0, &["--controllers", "none"]);
    let run = |kubeconfig: &std::path::Path| {
        Command::new(&bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .args(["get", "pods"])
            .output()
            .expect("run kubectl")
    };
    let with_token = run(&server.kubeconfig(dir.path()));
    assert!(
        with_token.status.success(),
        "{}",
        String::from_utf8_lossy(&with_token.stderr)
    );
    // The same kubeconfig with another token. (With no credentials at all kubectl prompts for
    // a user name instead of asking.)
    let anonymous = dir.path().join("wrong.kubeconfig");
    let admin = std::fs::read_to_string(server.admin_kubeconfig()).expect("read");
    std::fs::write(&anonymous, admin.replace(&server.token(), "wrong")).expect("write");
    let refused = run(&anonymous);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthorized"), "{stderr}");
}
