//! The HTTP API server: Kubernetes REST paths and JSON, served with axum over a [`Store`].
//!
//! Every request goes through one dispatcher that parses the path into a [`request::Target`]
//! and calls the handler for its verb. Only this module talks to the store.

pub mod auth;
mod codec;
mod discovery;
mod handlers;
mod logs;
mod request;
mod response;
pub mod tls;
mod watch;

pub use logs::check_kubelet_certificate_authority;
pub use watch::WATCH_BUFFER_BYTES;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::api::allocator::{Allocator, ServiceNetwork};
use crate::api::openapi::OpenApi;
use crate::api::resources::{by_kind, Kind};
use crate::api::validation::service::Held;
use crate::api::ApiError;
use crate::store::{Store, StoreError};

/// Request bodies above this are refused with 413, as kube-apiserver does.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Namespaces every cluster has.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

#[derive(Debug, Clone)]
pub struct Options {
    pub service_network: ServiceNetwork,
    /// How often an idle watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// A watch without `timeoutSeconds` ends after this long (clients re-watch).
    pub default_watch_timeout: Duration,
    /// The address clients are told to use in `/api` (`serverAddressByClientCIDRs`).
    pub advertise_address: Option<SocketAddr>,
    /// Bytes of encoded events one watch may have waiting for its client (see
    /// `watch::WATCH_BUFFER_BYTES`).
    pub watch_buffer_bytes: usize,
    /// Connection bounds of the HTTP server (kube-apiserver's by default).
    pub limits: crate::serve::Limits,
    /// Who may call the API. `None` serves without authentication: only for in-process tests;
    /// the `kpx-control` binary always sets one.
    pub authenticator: Option<Arc<auth::TokenAuthenticator>>,
    /// The bearer token sent to kubelets for `pods/log` (kube-apiserver's kubelet client
    /// credentials).
    pub kubelet_client_token: Option<String>,
    /// The CA (PEM) kubelets' serving certificates must chain to for `pods/log`
    /// (`--kubelet-certificate-authority`); `None`: kubelets are reached over https without
    /// verifying their certificate, as kube-apiserver without that flag.
    pub kubelet_certificate_authority: Option<Vec<u8>>,
    /// The API server's own addresses: `pods/log` never connects to them (kube's
    /// `proxyutil.IsProxyableIP` refuses loopback and link-local; these are refused too).
    pub own_addresses: Vec<std::net::IpAddr>,
    /// Where a Service's new `spec.externalIPs` may come from (`--service-external-ip-cidrs`);
    /// empty: none (kube-apiserver's DenyServiceExternalIPs).
    pub service_external_ip_cidrs: Vec<ipnet::IpNet>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            service_network: ServiceNetwork::default(),
            bookmark_interval: Duration::from_secs(10),
            default_watch_timeout: Duration::from_secs(1800),
            advertise_address: None,
            watch_buffer_bytes: watch::WATCH_BUFFER_BYTES,
            limits: crate::serve::Limits::default(),
            authenticator: None,
            kubelet_client_token: None,
            kubelet_certificate_authority: None,
            own_addresses: Vec::new(),
            service_external_ip_cidrs: Vec::new(),
        }
    }
}

pub struct ApiServer {
    store: Arc<dyn Store>,
    allocator: Mutex<Allocator>,
    openapi: OpenApi,
    options: Options,
}

impl ApiServer {
    /// Prepares the server over `store`: creates the system namespaces when missing and
    /// rebuilds the ClusterIP/NodePort allocations from the stored Services.
    pub async fn new(store: Arc<dyn Store>, options: Options) -> Result<Arc<Self>, ApiError> {
        let mut allocator = Allocator::new(options.service_network.clone());
        let services = by_kind(Kind::Service);
        let stored = store
            .list(&services.key_prefix(), None, 0, None)
            .await
            .map_err(store_error)?;
        for kv in &stored.kvs {
            let svc: k8s_openapi::api::core::v1::Service = serde_json::from_slice(&kv.value)
                .map_err(|e| {
                    ApiError::internal(format!("stored Service {} is unreadable: {e}", kv.key))
                })?;
            let held = Held::of(&svc);
            allocator.adopt(&held.ips, &held.ports);
        }
        let server = Arc::new(Self {
            store,
            allocator: Mutex::new(allocator),
            openapi: OpenApi::build(),
            options,
        });
        for ns in SYSTEM_NAMESPACES {
            server.ensure_namespace(ns).await?;
        }
        Ok(server)
    }

    async fn ensure_namespace(&self, name: &str) -> Result<(), ApiError> {
        let namespaces = by_kind(Kind::Namespace);
        let key = namespaces.key(None, name);
        if self.store.get(&key).await.map_err(store_error)?.is_some() {
            return Ok(());
        }
        let obj = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": uuid::Uuid::new_v4().to_string(),
                "creationTimestamp": crate::api::meta::now_rfc3339(),
                "labels": {"kubernetes.io/metadata.name": name},
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        match self.store.create(key, codec::encode(&obj)?).await {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn allocator(&self) -> std::sync::MutexGuard<'_, Allocator> {
        // Allocation steps never leave the sets half-changed, so a poisoned lock is usable.
        self.allocator.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let router = Router::new()
            .route("/version", get(discovery::version))
            .route("/api", get(discovery::api_versions))
            .route("/apis", get(discovery::api_groups))
            .route("/openapi/v2", get(discovery::openapi_v2))
            .route("/openapi/v3", get(discovery::openapi_v3_index))
            .route("/openapi/v3/{*path}", get(discovery::openapi_v3_doc))
            .route("/healthz", get(discovery::healthz))
            .route("/livez", get(discovery::livez))
            .route("/readyz", get(discovery::readyz))
            .route("/metrics", get(discovery::metrics))
            .fallback(dispatch)
            .with_state(self.clone());
        // Outermost, so no route (health, discovery, OpenAPI, resources) is reached without it.
        match &self.options.authenticator {
            Some(authenticator) => router.layer(axum::middleware::from_fn_with_state(
                authenticator.clone(),
                auth::layer,
            )),
            None => router,
        }
    }
}

/// Serves until `shutdown` resolves, within `Options::limits` (header, idle and request
/// timeouts, header size, connection limit: see [`crate::serve`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<ApiServer>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = server.options.limits.clone();
    crate::serve::serve_http(listener, server.router(), limits, shutdown).await
}

/// Serves over TLS until `shutdown` resolves (the `kpx-control` binary's way; [`serve`] is plain
/// HTTP for in-process tests).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    server: Arc<ApiServer>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = server.options.limits.clone();
    crate::serve::serve_https(listener, acceptor, server.router(), limits, shutdown).await
}

/// Every `/api` and `/apis` request.
async fn dispatch(State(server): State<Arc<ApiServer>>, request: Request<Body>) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let result = match request::route(&path) {
        Err(e) => Err(e),
        Ok(request::Route::GroupVersion { group, version }) if method == Method::GET => {
            discovery::resource_list(&group, &version)
        }
        Ok(request::Route::Group { group }) if method == Method::GET => discovery::group(&group),
        Ok(request::Route::GroupVersion { .. } | request::Route::Group { .. }) => {
            Err(ApiError::method_not_allowed())
        }
        Ok(request::Route::Resource(target)) => handlers::handle(&server, target, request).await,
    };
    match result {
        Ok(response) => response,
        Err(err) => {
            tracing::debug!(%method, %path, code = err.code, reason = err.reason, message = %err.message, "request refused");
            err.into_response()
        }
    }
}

/// A store failure as the API reports it.
pub(crate) fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::Compacted { requested, oldest } => {
            ApiError::gone(format!("too old resource version: {requested} ({oldest})"))
        }
        StoreError::FutureRevision { requested, current } => {
            let mut e = ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {requested}, current: {current}"),
            );
            e.details.retry_after_seconds = Some(1);
            e
        }
        StoreError::WatcherBehind { .. } => ApiError::gone(err.to_string()),
        StoreError::Closed => ApiError::unavailable("the store is shutting down"),
        // kube-apiserver answers storage failures with 500 (and etcd's full quota as
        // "etcdserver: mvcc: database space exceeded"); a store that is recovering is
        // unavailable for a moment, which a client may retry.
        StoreError::Unavailable { .. } => ApiError::unavailable(err.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}
