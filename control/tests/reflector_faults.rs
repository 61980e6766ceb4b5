//! The reflector against a server that misbehaves: a malformed watch line and a 500 must end
//! in a re-list with backoff, counted as errors — never a panic or a silently dropped event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kpx_control::client::{reflector, Api, Client, ClientConfig, ReflectorEvent, ReflectorOptions};
use serde_json::json;

#[derive(Default)]
struct Calls {
    lists: AtomicUsize,
    watches: AtomicUsize,
}

fn service(name: &str, rv: u64) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string()}})
}

/// Lists fine; the first watch sends garbage, the second fails with 500, the third works.
async fn services(
    State(calls): State<Arc<Calls>>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    let query = query.unwrap_or_default();
    if !query.contains("watch=true") {
        let n = calls.lists.fetch_add(1, Ordering::SeqCst) as u64;
        let body = json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": (10 + n).to_string()},
            "items": [service("listed", 10 + n)]});
        return (StatusCode::OK, body.to_string()).into_response();
    }
    match calls.watches.fetch_add(1, Ordering::SeqCst) {
        0 => (
            StatusCode::OK,
            format!(
                "{}\n{{not json\n",
                json!({"type": "ADDED", "object": service("first", 20)})
            ),
        )
            .into_response(),
        1 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"kind\":\"Status\",\"code\":500}",
        )
            .into_response(),
        _ => {
            let event = json!({"type": "ADDED", "object": service("after-recovery", 30)});
            // Keep the stream open a little so the reflector reads the event before the end.
            let body = futures::stream::once(async move {
                Ok::<_, std::convert::Infallible>(format!("{event}\n"))
            })
            .chain(futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(String::new())
            }));
            axum::body::Body::from_stream(body).into_response()
        }
    }
}

#[tokio::test]
async fn malformed_events_and_server_errors_end_in_a_relist_not_a_lost_event() {
    let calls = Arc::new(Calls::default());
    let app = axum::Router::new()
        .route("/api/v1/namespaces/default/services", get(services))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let api: Api<Service> = Api::namespaced(
        Client::new(&ClientConfig::from_url(&url)).expect("client"),
        "default",
    );
    let mut r = reflector(
        api,
        ReflectorOptions {
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|s: &String| s == "apply after-recovery") {
        let event = tokio::time::timeout_at(deadline, r.events.recv())
            .await
            .expect("in time")
            .expect("open");
        seen.push(match event {
            ReflectorEvent::Init => "init".to_string(),
            ReflectorEvent::InitApply(s) => {
                format!("initapply {}", s.metadata.name.unwrap_or_default())
            }
            ReflectorEvent::InitDone => "initdone".to_string(),
            ReflectorEvent::Apply(s) => format!("apply {}", s.metadata.name.unwrap_or_default()),
            ReflectorEvent::Delete(s) => format!("delete {}", s.metadata.name.unwrap_or_default()),
        });
    }
    // The event before the garbage was delivered; each failure was followed by a full re-list.
    assert_eq!(
        seen,
        [
            "init",
            "initapply listed",
            "initdone",
            "apply first",
            "init",
            "initapply listed",
            "initdone",
            "init",
            "initapply listed",
            "initdone",
            "apply after-recovery",
        ]
    );
    assert_eq!(
        r.stats.errors.load(Ordering::Relaxed),
        2,
        "the malformed line and the 500 are counted"
    );
    assert_eq!(calls.lists.load(Ordering::SeqCst), 3);
}
