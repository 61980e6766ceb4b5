//! The kubelet's metrics (kubelet's names where kubelet has one) and `/healthz`: healthy while
//! heartbeats reach the API server.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Shared;

pub struct Metrics {
    pub pods: Gauge,
    pub container_starts: Counter,
    pub start_failures: Counter,
    pub container_restarts: Counter,
    pub liveness_kills: Counter,
    pub sandbox_failures: Counter,
    pub api_failures: Counter,
    last_heartbeat: Gauge,
    last_heartbeat_unix: AtomicI64,
    pub registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            pods: Gauge::default(),
            container_starts: Counter::default(),
            start_failures: Counter::default(),
            container_restarts: Counter::default(),
            liveness_kills: Counter::default(),
            sandbox_failures: Counter::default(),
            api_failures: Counter::default(),
            last_heartbeat: Gauge::default(),
            last_heartbeat_unix: AtomicI64::new(0),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "kubelet_running_pods",
            "Pods this kubelet runs",
            m.pods.clone(),
        );
        registry.register(
            "kubelet_started_containers",
            "Containers started",
            m.container_starts.clone(),
        );
        registry.register(
            "kubelet_started_containers_errors",
            "Containers that could not be started (image not in the catalog, command not found, bad env)",
            m.start_failures.clone(),
        );
        registry.register(
            "kpx_kubelet_container_restarts",
            "Containers restarted after they exited",
            m.container_restarts.clone(),
        );
        registry.register(
            "kpx_kubelet_liveness_kills",
            "Containers killed because their liveness probe failed",
            m.liveness_kills.clone(),
        );
        registry.register(
            "kpx_kubelet_sandbox_failures",
            "Pod sandboxes (namespace, veth, addresses) that could not be created; retried",
            m.sandbox_failures.clone(),
        );
        registry.register(
            "kpx_kubelet_api_failures",
            "Writes to the API server that failed and were retried",
            m.api_failures.clone(),
        );
        registry.register(
            "kpx_kubelet_last_heartbeat_timestamp_seconds",
            "When the node's Ready heartbeat last reached the API server",
            m.last_heartbeat.clone(),
        );
        Self { registry, ..m }
    }

    pub fn heartbeat_ok(&self) {
        let now = chrono::Utc::now().timestamp();
        self.last_heartbeat.set(now);
        self.last_heartbeat_unix.store(now, Ordering::Relaxed);
    }

    /// Healthy while the last heartbeat is at most three periods old.
    pub fn healthy(&self, period: Duration) -> bool {
        let last = self.last_heartbeat_unix.load(Ordering::Relaxed);
        chrono::Utc::now().timestamp() - last <= (3 * period.as_secs().max(1)) as i64
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.metrics.healthy(shared.config.status_update_period) {
        (StatusCode::OK, "ok".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node heartbeat has not reached the API server recently".to_string(),
        )
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    crate::daemon::metrics_response(&shared.metrics.registry)
}

/// `/healthz` and `/metrics` on `listener` (kubelet's healthz port is 10248).
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the health server stopped");
    }
}
