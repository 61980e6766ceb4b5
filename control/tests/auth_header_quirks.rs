//! Issue 15: `Authorization` headers that carry no bearer token are anonymous, as kube's
//! `bearertoken` authenticator treats them (an empty header is no credentials, another scheme
//! is "not mine"): public paths answer 200 and the rest 401. A wrong *Bearer* token stays a
//! 401 everywhere, public paths included.

mod common;

use std::sync::Arc;

use common::TestServer;
use kpx_control::apiserver::auth::TokenAuthenticator;
use kpx_control::apiserver::Options;
use kpx_control::store::EmbeddedStoreOptions;

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

async fn status(http: &reqwest::Client, url: &str, authorization: &str) -> u16 {
    http.get(url)
        .header("Authorization", authorization)
        .send()
        .await
        .expect("get")
        .status()
        .as_u16()
}

#[tokio::test]
async fn headers_without_a_bearer_token_are_anonymous() {
    let server = server().await;
    let http = reqwest::Client::new();
    let base = server.url();
    for header in [
        "",
        "   ",
        "Basic dXNlcjpwYXNz",
        "Digest username=\"x\"",
        "Bearer",
        "Bearer ",
    ] {
        for path in ["/healthz", "/readyz", "/version"] {
            assert_eq!(
                status(&http, &format!("{base}{path}"), header).await,
                200,
                "{path} with Authorization {header:?} is anonymous and public"
            );
        }
        assert_eq!(
            status(
                &http,
                &format!("{base}/api/v1/namespaces/default/pods"),
                header
            )
            .await,
            401,
            "pods with Authorization {header:?} is anonymous and not public"
        );
    }
}

#[tokio::test]
async fn a_wrong_bearer_token_is_401_even_on_public_paths() {
    let server = server().await;
    let http = reqwest::Client::new();
    let base = server.url();
    for header in ["Bearer wrong", "bearer wrong", &format!("Bearer {TOKEN}x")] {
        for path in ["/healthz", "/version", "/api/v1/namespaces/default/pods"] {
            assert_eq!(
                status(&http, &format!("{base}{path}"), header).await,
                401,
                "{path} with Authorization {header:?}"
            );
        }
    }
    assert_eq!(
        status(
            &http,
            &format!("{base}/healthz"),
            &format!("Bearer {TOKEN}")
        )
        .await,
        200
    );
}
