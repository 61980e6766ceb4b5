//! A typed Kubernetes API client (reqwest + k8s-openapi types) and a reflector over it.
//! It speaks only the public API, so the same code runs against kpx-control and a real
//! kube-apiserver.

pub mod events;
mod kubeconfig;
mod reflector;
mod watch;

use std::marker::PhantomData;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ListableResource, Metadata, NamespaceResourceScope, Resource};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use kubeconfig::ClientConfig;
pub use reflector::{reflector, Reflector, ReflectorEvent, ReflectorOptions, ReflectorStats};
pub use watch::{WatchEvent, WatchStream};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a `Status` error.
    #[error("{method} {url}: {code} {reason}: {message}")]
    Api {
        method: String,
        url: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{method} {url}: {source}")]
    Http {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server's answer was not what the API promises.
    #[error("{what}: {message}")]
    Decode { what: String, message: String },
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    pub fn config(message: impl Into<String>) -> Self {
        ClientError::Config(message.into())
    }

    /// The HTTP code of an API error (404, 409, 410, ...).
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }

    pub fn is_gone(&self) -> bool {
        self.code() == Some(410)
    }
}

/// A connection to one API server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
}

/// How long an idle pooled connection is kept: well below the servers' idle timeout
/// ([`crate::serve::IDLE_TIMEOUT`]).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

impl Client {
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = &config.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::config("the bearer token holds characters not allowed in a header")
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("kpx/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            // Below the servers' 90 s idle timeout (kpx-control's and the kubelet API's, as
            // kube-apiserver's IdleTimeout): with reqwest's default of 90 s a pooled connection
            // could be reused just as the server closes it, failing that request.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // A watch on a server that vanished without a FIN must not hang forever.
            .tcp_keepalive(Duration::from_secs(30));
        if let Some(ca) = &config.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(ca)
                .map_err(|e| ClientError::config(format!("certificate authority: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(identity) = &config.identity_pem {
            builder = builder.identity(
                reqwest::Identity::from_pem(identity)
                    .map_err(|e| ClientError::config(format!("client certificate: {e}")))?,
            );
        }
        if config.insecure_skip_tls_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::config(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            server: config.server.clone(),
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// `GET /version`: the server's Kubernetes version (also a cheap liveness check).
    pub async fn version(&self) -> Result<Value, ClientError> {
        self.json(
            reqwest::Method::GET,
            format!("{}/version", self.server),
            None,
        )
        .await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<(Vec<u8>, &str)>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.request(method.clone(), &url);
        if let Some((body, content_type)) = body {
            request = request.header(CONTENT_TYPE, content_type).body(body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = request.send().await.map_err(|source| ClientError::Http {
            method: method.to_string(),
            url: url.clone(),
            source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let code = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let status: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(ClientError::Api {
            method: method.to_string(),
            url,
            code,
            reason: status
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            message: status
                .get("message")
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| text.chars().take(200).collect()),
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<T, ClientError> {
        let response = self
            .send(method, url.clone(), body, Some(Duration::from_secs(60)))
            .await?;
        let bytes = response.bytes().await.map_err(|source| ClientError::Http {
            method: "read".into(),
            url: url.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            what: format!("response of {url}"),
            message: e.to_string(),
        })
    }
}

/// Options of a LIST.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: Option<u32>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
}

impl ListParams {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(v) = &self.label_selector {
            q.push(("labelSelector", v.clone()));
        }
        if let Some(v) = &self.field_selector {
            q.push(("fieldSelector", v.clone()));
        }
        if let Some(v) = self.limit {
            q.push(("limit", v.to_string()));
        }
        if let Some(v) = &self.continue_token {
            q.push(("continue", v.clone()));
        }
        if let Some(v) = &self.resource_version {
            q.push(("resourceVersion", v.clone()));
        }
        q
    }
}

/// One page of a LIST.
#[derive(Debug, Clone, Deserialize)]
#[serde(bound = "K: DeserializeOwned")]
pub struct ObjectList<K> {
    pub metadata: ListMeta,
    pub items: Vec<K>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default)]
    pub resource_version: String,
    #[serde(rename = "continue", default)]
    pub continue_token: Option<String>,
}

/// The patch formats kube-apiserver accepts.
#[derive(Debug, Clone, Copy)]
pub enum Patch {
    Json,
    Merge,
    StrategicMerge,
}

impl Patch {
    fn content_type(self) -> &'static str {
        match self {
            Patch::Json => "application/json-patch+json",
            Patch::Merge => "application/merge-patch+json",
            Patch::StrategicMerge => "application/strategic-merge-patch+json",
        }
    }
}

/// What the typed client and the reflector work with: any k8s-openapi object kind.
pub trait Object:
    Resource
    + ListableResource
    + Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<K> Object for K where
    K: Resource
        + ListableResource
        + Metadata<Ty = ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Typed access to one kind, in one namespace or across all.
pub struct Api<K> {
    client: Client,
    namespace: Option<String>,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Api<K> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K: Object> Api<K> {
    /// Cluster-scoped kinds, or namespaced kinds across all namespaces.
    pub fn all(client: Client) -> Self {
        Self {
            client,
            namespace: None,
            _kind: PhantomData,
        }
    }

    pub fn namespaced(client: Client, namespace: &str) -> Self
    where
        K: Resource<Scope = NamespaceResourceScope>,
    {
        Self {
            client,
            namespace: Some(namespace.to_string()),
            _kind: PhantomData,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `/api/v1/namespaces/<ns>/services`, or without the namespace part.
    pub fn collection_url(&self) -> String {
        let root = if K::GROUP.is_empty() {
            format!("{}/api/{}", self.client.server, K::VERSION)
        } else {
            format!("{}/apis/{}/{}", self.client.server, K::GROUP, K::VERSION)
        };
        match &self.namespace {
            Some(ns) => format!("{root}/namespaces/{ns}/{}", K::URL_PATH_SEGMENT),
            None => format!("{root}/{}", K::URL_PATH_SEGMENT),
        }
    }

    fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.collection_url())
    }

    pub async fn get(&self, name: &str) -> Result<K, ClientError> {
        self.client
            .json(reqwest::Method::GET, self.url(name), None)
            .await
    }

    pub async fn list(&self, params: &ListParams) -> Result<ObjectList<K>, ClientError> {
        let query = serde_urlencoded::to_string(params.query()).unwrap_or_default();
        let url = if query.is_empty() {
            self.collection_url()
        } else {
            format!("{}?{query}", self.collection_url())
        };
        self.client.json(reqwest::Method::GET, url, None).await
    }

    fn encode(obj: &K) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(obj).map_err(|e| ClientError::Decode {
            what: format!("encoding a {}", K::KIND),
            message: e.to_string(),
        })
    }

    pub async fn create(&self, obj: &K) -> Result<K, ClientError> {
        let body = Self::encode(obj)?;
        self.client
            .json(
                reqwest::Method::POST,
                self.collection_url(),
                Some((body, "application/json")),
            )
            .await
    }

    async fn put_at(&self, url: String, obj: &K) -> Result<K, ClientError> {
        let body = Self::encode(obj)?;
        self.client
            .json(reqwest::Method::PUT, url, Some((body, "application/json")))
            .await
    }

    async fn patch_at(&self, url: String, kind: Patch, patch: &Value) -> Result<K, ClientError> {
        let body = patch.to_string().into_bytes();
        self.client
            .json(
                reqwest::Method::PATCH,
                url,
                Some((body, kind.content_type())),
            )
            .await
    }

    /// PUT: fails with 409 when `obj.metadata.resourceVersion` is stale.
    pub async fn replace(&self, name: &str, obj: &K) -> Result<K, ClientError> {
        self.put_at(self.url(name), obj).await
    }

    pub async fn replace_status(&self, name: &str, obj: &K) -> Result<K, ClientError> {
        self.put_at(format!("{}/status", self.url(name)), obj).await
    }

    pub async fn patch(&self, name: &str, kind: Patch, patch: &Value) -> Result<K, ClientError> {
        self.patch_at(self.url(name), kind, patch).await
    }

    pub async fn patch_status(
        &self,
        name: &str,
        kind: Patch,
        patch: &Value,
    ) -> Result<K, ClientError> {
        self.patch_at(format!("{}/status", self.url(name)), kind, patch)
            .await
    }

    /// Deletes; returns the object as the server last had it (or marked for deletion).
    /// `POST <object>/<subresource>` (e.g. `pods/NAME/binding`).
    pub async fn post_subresource(
        &self,
        name: &str,
        subresource: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        self.client
            .json(
                reqwest::Method::POST,
                format!("{}/{subresource}", self.url(name)),
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await
    }

    pub async fn delete(&self, name: &str) -> Result<Value, ClientError> {
        self.client
            .json(reqwest::Method::DELETE, self.url(name), None)
            .await
    }

    pub async fn delete_with_grace(
        &self,
        name: &str,
        grace_period_seconds: i64,
    ) -> Result<Value, ClientError> {
        let body = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace_period_seconds});
        self.client
            .json(
                reqwest::Method::DELETE,
                self.url(name),
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await
    }

    /// A watch from `resource_version` (exclusive), with bookmarks.
    pub async fn watch(
        &self,
        params: &ListParams,
        resource_version: &str,
        timeout_seconds: u32,
    ) -> Result<WatchStream<K>, ClientError> {
        let mut query = params.query();
        query.retain(|(k, _)| *k != "resourceVersion" && *k != "limit" && *k != "continue");
        query.push(("watch", "true".into()));
        query.push(("allowWatchBookmarks", "true".into()));
        query.push(("resourceVersion", resource_version.to_string()));
        query.push(("timeoutSeconds", timeout_seconds.to_string()));
        let url = format!(
            "{}?{}",
            self.collection_url(),
            serde_urlencoded::to_string(query).unwrap_or_default()
        );
        // No overall timeout: the server ends the watch after timeoutSeconds.
        let response = self
            .client
            .send(reqwest::Method::GET, url.clone(), None, None)
            .await?;
        Ok(WatchStream::new(response, url))
    }
}

#[cfg(test)]
mod tests {
    /// A pooled connection is dropped by the client before any kpx server would close it idle.
    #[test]
    fn pool_idle_timeout_is_below_the_servers_idle_timeout() {
        const { assert!(super::POOL_IDLE_TIMEOUT.as_secs() < crate::serve::IDLE_TIMEOUT.as_secs()) };
        let kubelet_default = crate::serve::Limits::default().idle_timeout;
        assert!(super::POOL_IDLE_TIMEOUT < kubelet_default);
    }
}
