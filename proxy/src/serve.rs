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

/// kube-proxy's `healthzHandler` / `livezHandler` (`pkg/proxy/healthcheck/proxier_health.go`):
/// `lastUpdated`, `currentTime`, and on `/healthz` `nodeEligible` (kpx does not watch its Node
/// yet, so the node is always eligible); `lastError` is kpx's own. As kube-proxy, a healthy
/// proxy reports `lastUpdated` as now (older releases reported the last sync loop run, even
/// with nothing to change); an unhealthy one the last successful sync.
fn health_body(health: &Health, node_eligible: Option<bool>) -> (StatusCode, String) {
    let (healthy, last, error) = health.status();
    let now = std::time::SystemTime::now();
    let last_updated = if healthy { Some(now) } else { last };
    let mut body = json!({
        "lastUpdated": last_updated.map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(now),
        "lastError": error,
    });
    if let Some(eligible) = node_eligible {
        body["nodeEligible"] = eligible.into();
    }
    let healthy = healthy && node_eligible.unwrap_or(true);
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string())
}

fn health_response((code, body): (StatusCode, String)) -> impl IntoResponse {
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health_response(health_body(&health, Some(true)))
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health_response(health_body(&health, None))
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    kpx_control::daemon::metrics_response(&metrics.registry)
}

pub async fn serve_health(address: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{health_body, Health};

    #[test]
    fn healthz_has_kube_proxys_fields_and_livez_no_node_eligibility() {
        let health = Health::new(Duration::from_secs(30));
        health.synced();
        let (code, body) = health_body(&health, Some(true));
        assert_eq!(code.as_u16(), 200);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        let mut keys: Vec<&str> = body
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["currentTime", "lastError", "lastUpdated", "nodeEligible"]
        );
        assert_eq!(body["nodeEligible"], true);
        // Healthy: lastUpdated is now, as kube-proxy reports it.
        assert_eq!(body["lastUpdated"], body["currentTime"]);
        let (_, livez) = health_body(&health, None);
        let livez: serde_json::Value = serde_json::from_str(&livez).expect("json");
        assert!(livez.get("nodeEligible").is_none(), "{livez}");
        assert_eq!(health_body(&health, Some(false)).0.as_u16(), 503);
    }
}
