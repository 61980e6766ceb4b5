//! `/healthz` and `/livez` (kube-proxy's health), and Prometheus `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::metrics::{Health, Metrics};

fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let (healthy, last, error) = health.status();
    let body = json!({
        "lastUpdated": last.map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(std::time::SystemTime::now()),
        "nodeEligible": true,
        "lastError": error,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    kpx_control::daemon::metrics_response(&metrics.registry)
}

pub async fn serve_health(address: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await
}

pub async fn serve_metrics(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await
}
