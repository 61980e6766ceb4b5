//! The verbs on resources: get, list, create, update, patch, delete (and pods/binding).
//! Each validates fully before it writes, so a refused request changes nothing.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use base64::Engine;
use k8s_openapi::api::core::v1::Service;
use serde_json::{json, Value};

use super::request::{
    flag, number, parse_query, validate_write_options, Query, Target, WriteOptions,
};
use super::response::{json, json_bytes};
use super::{codec, store_error, watch, ApiServer, MAX_BODY_BYTES};
use crate::api::patch::{self, PatchType};
use crate::api::resources::{by_kind, Kind, ResourceInfo, RESOURCES};
use crate::api::selector::{FieldSelector, LabelSelector};
use crate::api::table::{self, IncludeObject};
use crate::api::validation::{self, service as svc_rules, service::Held};
use crate::api::{meta, yaml_guard, ApiError, FieldError};
use crate::store::{KeyValue, Op, Precondition, StoreError};

/// How many times a write that raced with another is retried before giving up.
const CONFLICT_RETRIES: usize = 16;

pub async fn handle(
    server: &Arc<ApiServer>,
    target: Target,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    let method = request.method().clone();
    let query = parse_query(request.uri().query())?;
    let accept = header_value(&request, header::ACCEPT);
    // Media types are case-insensitive (kube parses them with Go's mime.ParseMediaType).
    let content_type = header_value(&request, header::CONTENT_TYPE).to_ascii_lowercase();
    let table = accept.split(',').next().unwrap_or("").contains("as=Table");
    let watching = target.watch_path || flag(&query.watch);
    // A write's options are checked before anything is read or written (kube's create/update/
    // patch/delete handlers decode and validate them first): `dryRun=all` writes nothing.
    let write_options = match method {
        Method::POST => Some(WriteOptions::Create),
        Method::PUT => Some(WriteOptions::Update),
        Method::PATCH if content_type.starts_with("application/apply-patch") => {
            Some(WriteOptions::ApplyPatch)
        }
        Method::PATCH => Some(WriteOptions::Patch),
        Method::DELETE => Some(WriteOptions::Delete),
        _ => None,
    };
    if let Some(options) = write_options {
        validate_write_options(&query, options)?;
    }
    let named = target.name.is_some();
    let sub = target.subresource.as_deref();
    let ctx = Ctx {
        server,
        target: &target,
        query: &query,
        table,
    };
    match (&method, named, sub) {
        (&Method::GET, _, None) if watching => watch::serve(server, &target, &query, table).await,
        (&Method::GET, false, None) => ctx.list().await,
        (&Method::GET, true, None | Some("status") | Some("scale")) => ctx.get().await,
        (&Method::GET, true, Some("log")) => {
            super::logs::pod_log(server, &target, request.uri().query()).await
        }
        (&Method::POST, false, None) => {
            let body = read_json(request, &content_type).await?;
            ctx.create(body).await
        }
        (&Method::POST, true, Some("binding")) => {
            let body = read_json(request, &content_type).await?;
            ctx.bind(body).await
        }
        (&Method::PUT, true, None | Some("status") | Some("finalize") | Some("scale")) => {
            let body = read_json(request, &content_type).await?;
            ctx.update(Change::Replace(body)).await
        }
        (&Method::PATCH, true, None | Some("status") | Some("scale")) => {
            let patch_type = PatchType::from_content_type(&content_type).ok_or_else(|| {
                ApiError::unsupported_media_type(&content_type, PatchType::CONTENT_TYPES)
            })?;
            let body = read_body(request).await?;
            ctx.update(Change::Patch(patch_type, body)).await
        }
        (&Method::DELETE, true, None) => {
            let body = read_body(request).await?;
            ctx.delete(&body).await
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn header_value(request: &Request<Body>, name: header::HeaderName) -> String {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn read_body(request: Request<Body>) -> Result<bytes::Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::too_large(MAX_BODY_BYTES)
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })
}

async fn read_json(request: Request<Body>, content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let yaml = match media {
        "" | "application/json" | "*/*" => false,
        "application/yaml" => true,
        other => {
            return Err(ApiError::unsupported_media_type(
                other,
                &["application/json", "application/yaml"],
            ))
        }
    };
    let body = read_body(request).await?;
    // Decoding up to 3 MiB is CPU work: off the async workers, so it never stalls /healthz.
    off_worker(body.len() > INLINE_WORK_BYTES, move || {
        if !yaml {
            return serde_json::from_slice(&body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
            });
        }
        // Refuse a nesting bomb before libyaml spends quadratic time on it.
        yaml_guard::check(&body)?;
        serde_yaml::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}")))
    })
    .await
}

/// Runs CPU-heavy request work (body decoding, patching, decoding into typed objects) on
/// tokio's blocking pool. kube-apiserver serves each request on its own goroutine, which Go
/// preempts, so one heavy decode never stops the others; kpx-control has only as many async
/// workers as cores, and one busy worker would stall every request queued behind it.
///
/// Only work on more than [`INLINE_WORK_BYTES`] moves: the hop to the blocking pool and back
/// costs two thread wake-ups, which for the small objects of ordinary requests is more than the
/// work itself (moving every create cost 45% of the create rate in `cargo bench --bench
/// apiserver` on this 2-core machine).
async fn off_worker<T, F>(heavy: bool, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    if !heavy {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("request work failed: {e}")))?
}

/// Request work on objects or bodies up to this size stays on the async worker: decoding and
/// validating 64 KiB of JSON takes well under a millisecond.
const INLINE_WORK_BYTES: usize = 64 * 1024;

/// Whether `value` is larger than [`INLINE_WORK_BYTES`] as JSON (stops counting past it).
fn is_heavy(value: &Value) -> bool {
    patch::json_size_within(value, INLINE_WORK_BYTES).is_none()
}

/// The continue token: where the previous page stopped and at which revision it was read.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    start: String,
}

enum Change {
    Replace(Value),
    Patch(PatchType, bytes::Bytes),
}

struct Ctx<'a> {
    server: &'a Arc<ApiServer>,
    target: &'a Target,
    query: &'a Query,
    table: bool,
}

impl Ctx<'_> {
    fn resource(&self) -> &'static ResourceInfo {
        self.target.resource
    }

    fn name(&self) -> &str {
        self.target.name.as_deref().unwrap_or("")
    }

    fn key(&self) -> String {
        self.resource()
            .key(self.target.namespace.as_deref(), self.name())
    }

    fn not_found(&self) -> ApiError {
        ApiError::not_found(self.resource().group, self.resource().plural, self.name())
    }

    /// Only `All` gets here: every other value was refused by `validate_write_options`.
    fn dry_run(&self) -> bool {
        self.query.dry_run.as_deref() == Some("All")
    }

    fn include(&self) -> Result<IncludeObject, ApiError> {
        IncludeObject::parse(self.query.include_object.as_deref())
    }

    fn scale(&self) -> bool {
        self.target.subresource.as_deref() == Some("scale")
    }

    fn object_response(&self, code: StatusCode, obj: &Value) -> Result<Response, ApiError> {
        if self.scale() {
            return Ok(json(code, &scale_of(self.resource(), obj)));
        }
        if self.table {
            let rv = meta::resource_version(obj).unwrap_or("").to_string();
            let t = table::table(
                self.resource(),
                std::slice::from_ref(obj),
                &rv,
                self.include()?,
                true,
            );
            return Ok(json(code, &t));
        }
        Ok(json(code, obj))
    }

    async fn current(&self) -> Result<Arc<KeyValue>, ApiError> {
        self.server
            .store
            .get(&self.key())
            .await
            .map_err(store_error)?
            .ok_or_else(|| self.not_found())
    }

    async fn get(&self) -> Result<Response, ApiError> {
        let kv = self.current().await?;
        self.object_response(StatusCode::OK, &codec::decode(&kv)?)
    }

    async fn list(&self) -> Result<Response, ApiError> {
        super::request::validate_list_options(self.query, false)?;
        let resource = self.resource();
        let labels = LabelSelector::parse(self.query.label_selector.as_deref().unwrap_or(""))?;
        let fields =
            FieldSelector::parse(self.query.field_selector.as_deref().unwrap_or(""), resource)?;
        let limit = number::<i64>(&self.query.limit, "limit")?
            .unwrap_or(0)
            .max(0) as usize;
        let prefix = resource.namespace_prefix(self.target.namespace.as_deref());
        let (mut start, mut revision) = (None, None);
        if let Some(token) = self
            .query
            .continue_token
            .as_deref()
            .filter(|t| !t.is_empty())
        {
            let token: ContinueToken = base64::engine::general_purpose::STANDARD
                .decode(token)
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "continue key is not valid: it was not issued by this server",
                    )
                })?;
            start = Some(token.start);
            revision = Some(token.rv);
        } else if let Some(rv) = self
            .query
            .resource_version
            .as_deref()
            .filter(|v| !v.is_empty() && *v != "0")
        {
            let rv = super::request::parse_resource_version(rv)?;
            match self.query.resource_version_match.as_deref() {
                Some("Exact") => revision = Some(rv),
                None | Some("") | Some("NotOlderThan") => {
                    let current = self.server.store.current_revision();
                    if rv > current {
                        return Err(store_error(StoreError::FutureRevision { requested: rv, current }));
                    }
                }
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: unsupported value {other:?}: allowed values: \"Exact\", \"NotOlderThan\""
                    )))
                }
            }
        }
        let filtering = !labels.is_empty() || !fields.is_empty();
        // Read pages from the store until `limit` objects matched, like kube-apiserver over etcd.
        let mut matched: Vec<(Arc<KeyValue>, Option<Value>)> = Vec::new();
        let mut read_at = revision;
        let mut more = false;
        let mut remaining;
        loop {
            let want = if limit == 0 {
                0
            } else {
                (limit - matched.len()).max(if filtering { 256 } else { 0 })
            };
            let page = self
                .server
                .store
                .list(&prefix, start.as_deref(), want, read_at)
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if self.query.continue_token.is_some() => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    other => store_error(other),
                })?;
            read_at = Some(page.revision);
            let page_len = page.kvs.len();
            for kv in page.kvs {
                if limit > 0 && matched.len() == limit {
                    more = true;
                    break;
                }
                start = Some(kv.key.clone());
                if filtering {
                    let obj = codec::decode(&kv)?;
                    if labels.matches(meta::labels(&obj)) && fields.matches(&obj) {
                        matched.push((kv, Some(obj)));
                    }
                } else {
                    matched.push((kv, None));
                }
            }
            remaining = page.remaining;
            if more || page.remaining == 0 || limit == 0 || page_len == 0 {
                more = more || (limit > 0 && page.remaining > 0);
                break;
            }
            if matched.len() == limit {
                more = true;
                break;
            }
        }
        let revision = read_at.unwrap_or_else(|| self.server.store.current_revision());
        let continue_token = if more {
            let token = ContinueToken {
                rv: revision,
                start: start.clone().unwrap_or_default(),
            };
            base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&token).unwrap_or_default())
        } else {
            String::new()
        };
        if self.table {
            let objects = matched
                .into_iter()
                .map(|(kv, obj)| obj.map_or_else(|| codec::decode(&kv), Ok))
                .collect::<Result<Vec<_>, _>>()?;
            let mut t = table::table(
                self.resource(),
                &objects,
                &revision.to_string(),
                self.include()?,
                true,
            );
            if !continue_token.is_empty() {
                t["metadata"]["continue"] = json!(continue_token);
            }
            return Ok(json(StatusCode::OK, &t));
        }
        let mut list_meta = json!({"resourceVersion": revision.to_string()});
        if !continue_token.is_empty() {
            list_meta["continue"] = json!(continue_token);
            if !filtering {
                list_meta["remainingItemCount"] = json!(remaining);
            }
        }
        let mut out = Vec::with_capacity(
            matched
                .iter()
                .map(|(kv, _)| kv.value.len() + 32)
                .sum::<usize>()
                + 256,
        );
        out.extend_from_slice(
            format!(
                "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
                resource.list_kind(),
                resource.api_version(),
                list_meta
            )
            .as_bytes(),
        );
        for (i, (kv, _)) in matched.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            codec::write_with_revision(&mut out, &kv.value, kv.mod_revision)?;
        }
        out.extend_from_slice(b"]}");
        Ok(json_bytes(StatusCode::OK, out))
    }

    /// Checks the namespace a namespaced object is created in exists.
    async fn require_namespace(&self, namespace: &str) -> Result<(), ApiError> {
        let key = by_kind(Kind::Namespace).key(None, namespace);
        match self.server.store.get(&key).await.map_err(store_error)? {
            Some(kv) => {
                let ns = codec::decode(&kv)?;
                if meta::is_deleting(&ns) {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!("unable to create new content in namespace {namespace} because it is being terminated"),
                    ));
                }
                Ok(())
            }
            None => Err(ApiError::not_found("", "namespaces", namespace)),
        }
    }

    /// Checks the namespace and name in the body against the URL, filling them in when absent.
    fn place(&self, obj: &mut Value, creating: bool) -> Result<(), ApiError> {
        let resource = self.resource();
        let url_ns = self.target.namespace.clone();
        let m = meta::metadata_mut(obj);
        if resource.namespaced {
            let url_ns = url_ns.unwrap_or_else(|| "default".into());
            match m.get("namespace").and_then(Value::as_str) {
                None | Some("") => {
                    m.insert("namespace".into(), json!(url_ns));
                }
                Some(ns) if ns == url_ns => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
            }
        } else {
            m.remove("namespace");
        }
        if creating {
            let named = m
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            if !named {
                if let Some(prefix) = m
                    .get("generateName")
                    .and_then(Value::as_str)
                    .filter(|g| !g.is_empty())
                {
                    let name = format!("{prefix}{}", meta::generate_suffix());
                    m.insert("name".into(), json!(name));
                }
            }
        } else {
            let body_name = m.get("name").and_then(Value::as_str).unwrap_or("");
            if body_name.is_empty() {
                m.insert("name".into(), json!(self.name()));
            } else if body_name != self.name() {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({})",
                    self.name()
                )));
            }
        }
        Ok(())
    }

    /// Defaulting, validation and (for Services) allocation; returns what was allocated.
    async fn admit(&self, obj: &mut Value, old: Option<&Value>) -> Result<Held, ApiError> {
        let resource = self.resource();
        let name = meta::name(obj).to_string();
        if resource.kind != Kind::Service {
            // Defaulting and validating a big object is CPU work: off the async workers.
            let (mut owned, old) = (std::mem::take(obj), old.cloned());
            let heavy = is_heavy(&owned);
            let (owned, errs) = off_worker(heavy, move || {
                validation::default_object(resource.kind, &mut owned);
                let mut errs: Vec<FieldError> = validation::validate_metadata(resource, &owned);
                errs.extend(validation::validate_object(
                    resource.kind,
                    &owned,
                    old.as_ref(),
                ));
                Ok((owned, errs))
            })
            .await?;
            *obj = owned;
            if errs.is_empty() {
                return Ok(Held::default());
            }
            return Err(ApiError::invalid(
                resource.group,
                resource.kind_name,
                &name,
                errs,
            ));
        }
        validation::default_object(resource.kind, obj);
        let mut errs: Vec<FieldError> = validation::validate_metadata(resource, obj);
        let invalid = |errs| ApiError::invalid(resource.group, resource.kind_name, &name, errs);
        let mut service: Service = serde_json::from_value(obj.clone())
            .map_err(|e| ApiError::bad_request(format!("error decoding Service: {e}")))?;
        let old_service: Option<Service> = old
            .map(|o| serde_json::from_value(o.clone()))
            .transpose()
            .map_err(|e| ApiError::internal(format!("stored Service is unreadable: {e}")))?;
        if let Some(old) = &old_service {
            svc_rules::preserve_allocations(&mut service, old);
        }
        let network = self.server.options.service_network.clone();
        svc_rules::default_service(&mut service, &network);
        errs.extend(svc_rules::validate_service(
            &service,
            old_service.as_ref(),
            &network,
        ));
        if !errs.is_empty() {
            return Err(invalid(errs));
        }
        let allowed = &self.server.options.service_external_ip_cidrs;
        svc_rules::admit_external_ips(&service, old_service.as_ref(), allowed).map_err(|why| {
            ApiError::new(
                403,
                "Forbidden",
                format!("services {name:?} is forbidden: {why}"),
            )
        })?;
        let held = {
            let mut allocator = self.server.allocator();
            svc_rules::allocate(&mut service, old_service.as_ref(), &mut allocator)
                .map_err(invalid)?
        };
        *obj = serde_json::to_value(&service).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(held)
    }

    fn release(&self, held: &Held) {
        if held != &Held::default() {
            held.release(&mut self.server.allocator());
        }
    }

    async fn create(&self, body: Value) -> Result<Response, ApiError> {
        let resource = self.resource();
        let mut obj =
            off_worker(is_heavy(&body), move || validation::decode(resource, body)).await?;
        self.place(&mut obj, true)?;
        if let Some(ns) = meta::namespace(&obj).filter(|_| resource.namespaced) {
            self.require_namespace(ns).await?;
        }
        let m = meta::metadata_mut(&mut obj);
        meta::strip_server_fields(m);
        for field in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
            m.remove(field);
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
        if resource.has_spec {
            m.insert("generation".into(), json!(1));
        }
        reset_status_on_create(resource.kind, &mut obj);
        fill_required_status(resource.kind, &mut obj);
        let held = self.admit(&mut obj, None).await?;
        let name = meta::name(&obj).to_string();
        if self.dry_run() {
            self.release(&held);
            return self.object_response(StatusCode::CREATED, &obj);
        }
        let key = resource.key(meta::namespace(&obj), &name);
        let encoded = codec::encode(&obj)?;
        match self.server.store.create(key, encoded).await {
            Ok(kv) => {
                meta::set_resource_version(&mut obj, kv.mod_revision);
                self.object_response(StatusCode::CREATED, &obj)
            }
            Err(e) => {
                self.release(&held);
                Err(match e {
                    StoreError::AlreadyExists { .. } => {
                        ApiError::already_exists(resource.group, resource.plural, &name)
                    }
                    other => store_error(other),
                })
            }
        }
    }

    /// PUT and PATCH: compute the new object from the current one, admit it, compare-and-swap;
    /// a race with another writer is retried unless the client pinned a resourceVersion.
    async fn update(&self, change: Change) -> Result<Response, ApiError> {
        let resource = self.resource();
        let status_only = matches!(self.target.subresource.as_deref(), Some("status"));
        let replace_body = match &change {
            Change::Replace(body) if !self.scale() => {
                let body = body.clone();
                Some(off_worker(is_heavy(&body), move || validation::decode(resource, body)).await?)
            }
            _ => None,
        };
        for _ in 0..CONFLICT_RETRIES {
            let current_kv = self.current().await?;
            let current = codec::decode(&current_kv)?;
            let mut requested = match (&change, &replace_body) {
                _ if self.scale() => scaled(resource, &current, &change)?,
                (_, Some(body)) => body.clone(),
                (Change::Patch(patch_type, patch), _) => {
                    let (patch_type, patch, current) =
                        (*patch_type, patch.clone(), current.clone());
                    // Patching and decoding a 3 MiB patch is CPU work: off the async workers.
                    let heavy = patch.len() > INLINE_WORK_BYTES || is_heavy(&current);
                    off_worker(heavy, move || {
                        let patched = patch::apply(resource.kind, patch_type, &current, &patch)?;
                        // The patched object is bounded like a PUT body: a patch may not grow
                        // an object past what no client could have sent (kube: etcd's request
                        // limit answered as 413 RequestEntityTooLarge).
                        if patch::json_size_within(&patched, MAX_BODY_BYTES).is_none() {
                            return Err(ApiError::too_large(MAX_BODY_BYTES));
                        }
                        validation::decode(resource, patched)
                    })
                    .await?
                }
                (Change::Replace(body), None) => validation::decode(resource, body.clone())?,
            };
            self.place(&mut requested, false)?;
            if !self.scale() {
                check_uid_unchanged(resource, &current, &requested)?;
            }
            let pinned = meta::resource_version(&requested).map(String::from);
            if let Some(rv) = &pinned {
                if *rv != current_kv.mod_revision.to_string() {
                    return Err(ApiError::modified(
                        resource.group,
                        resource.plural,
                        self.name(),
                    ));
                }
            }
            let mut next = merge_update(resource, &current, requested, status_only);
            fill_required_status(resource.kind, &mut next);
            let held = self.admit(&mut next, Some(&current)).await?;
            if same_object(&next, &current) {
                self.release(&held);
                return self.object_response(StatusCode::OK, &current);
            }
            if self.dry_run() {
                self.release(&held);
                return self.object_response(StatusCode::OK, &next);
            }
            // An object waiting on finalizers goes once the last one is removed. (A pod in
            // graceful deletion waits on its kubelet instead: its status updates keep it.)
            let finishing = meta::is_deleting(&next)
                && meta::finalizers(&next) == 0
                && meta::finalizers(&current) > 0;
            let precondition = Precondition::ModRevision(current_kv.mod_revision);
            let written = if finishing {
                self.server.store.delete(self.key(), precondition).await
            } else {
                let encoded = codec::encode(&next)?;
                self.server
                    .store
                    .update(self.key(), encoded, precondition)
                    .await
            };
            match written {
                Ok(kv) => {
                    if finishing {
                        self.release(&held);
                        self.released_on_delete(&current);
                    } else {
                        self.release_replaced(&current, &next);
                    }
                    meta::set_resource_version(&mut next, kv.mod_revision);
                    return self.object_response(StatusCode::OK, &next);
                }
                Err(StoreError::Conflict { .. }) if pinned.is_none() => {
                    self.release(&held);
                    continue;
                }
                Err(e) => {
                    self.release(&held);
                    return Err(self.write_error(e));
                }
            }
        }
        Err(ApiError::conflict(
            resource.group,
            resource.plural,
            self.name(),
            "too many concurrent writers; try again",
        ))
    }

    fn write_error(&self, e: StoreError) -> ApiError {
        let resource = self.resource();
        match e {
            StoreError::Conflict { .. } => {
                ApiError::modified(resource.group, resource.plural, self.name())
            }
            StoreError::NotFound { .. } => self.not_found(),
            other => store_error(other),
        }
    }

    /// After a Service update, gives back what the old version held and the new one does not.
    fn release_replaced(&self, old: &Value, new: &Value) {
        if self.resource().kind != Kind::Service {
            return;
        }
        let (Ok(old), Ok(new)) = (
            serde_json::from_value::<Service>(old.clone()),
            serde_json::from_value::<Service>(new.clone()),
        ) else {
            return;
        };
        self.release(&Held::of(&old).minus(&Held::of(&new)));
    }

    fn released_on_delete(&self, old: &Value) {
        if meta::name(old).is_empty() {
            return;
        }
        if let Some(kind) = old.get("kind").and_then(Value::as_str) {
            if kind == "Service" {
                if let Ok(svc) = serde_json::from_value::<Service>(old.clone()) {
                    self.release(&Held::of(&svc));
                }
            }
        }
    }

    async fn delete(&self, body: &[u8]) -> Result<Response, ApiError> {
        let resource = self.resource();
        let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
            })?
        };
        let dry_run = self.dry_run() || body_dry_run(&options)?;
        let grace = match number::<i64>(&self.query.grace_period_seconds, "gracePeriodSeconds")? {
            Some(g) => Some(g),
            None => options.get("gracePeriodSeconds").and_then(Value::as_i64),
        };
        if grace.is_some_and(|g| g < 0) {
            return Err(ApiError::invalid(
                "meta.k8s.io",
                "DeleteOptions",
                "",
                vec![FieldError::invalid(
                    "gracePeriodSeconds",
                    grace.unwrap_or(0),
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let finalizer = propagation_finalizer(self.query, &options)?;
        for _ in 0..CONFLICT_RETRIES {
            let current_kv = self.current().await?;
            let mut current = codec::decode(&current_kv)?;
            if let Some(uid) = options
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
            {
                if Some(uid) != meta::uid(&current) {
                    return Err(ApiError::conflict(
                        resource.group,
                        resource.plural,
                        self.name(),
                        &format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                            meta::uid(&current).unwrap_or("")
                        ),
                    ));
                }
            }
            let pinned = options
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str);
            if let Some(rv) = pinned {
                if rv != current_kv.mod_revision.to_string() {
                    return Err(ApiError::conflict(
                        resource.group,
                        resource.plural,
                        self.name(),
                        &format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                            current_kv.mod_revision
                        ),
                    ));
                }
            }
            if dry_run {
                return self.object_response(StatusCode::OK, &current);
            }
            // Orphan and Foreground deletion wait on the garbage collector, through the
            // finalizer it acts on (`orphan` / `foregroundDeletion`), as in Kubernetes.
            if let Some(f) = finalizer {
                add_finalizer(&mut current, f);
            }
            let result = match self.graceful(&current, grace) {
                Some(marked) => {
                    let encoded = codec::encode(&marked)?;
                    self.server
                        .store
                        .update(
                            self.key(),
                            encoded,
                            Precondition::ModRevision(current_kv.mod_revision),
                        )
                        .await
                        .map(|kv| {
                            let mut out = marked;
                            meta::set_resource_version(&mut out, kv.mod_revision);
                            out
                        })
                }
                None if resource.kind == Kind::Namespace => {
                    self.delete_namespace(&current_kv, &current).await
                }
                None => self
                    .server
                    .store
                    .delete(
                        self.key(),
                        Precondition::ModRevision(current_kv.mod_revision),
                    )
                    .await
                    .map(|_| {
                        self.released_on_delete(&current);
                        current.clone()
                    }),
            };
            match result {
                Ok(obj) => return self.object_response(StatusCode::OK, &obj),
                Err(StoreError::Conflict { .. }) if pinned.is_none() => continue,
                Err(e) => return Err(self.write_error(e)),
            }
        }
        Err(ApiError::conflict(
            resource.group,
            resource.plural,
            self.name(),
            "too many concurrent writers; try again",
        ))
    }

    /// The object marked for deletion instead of removed, when it must wait: for finalizers, or
    /// (a scheduled pod) for its kubelet to stop it within the grace period.
    fn graceful(&self, current: &Value, grace: Option<i64>) -> Option<Value> {
        let mut marked = current.clone();
        let waiting_finalizers = meta::finalizers(current) > 0;
        let pod_grace = if self.resource().kind == Kind::Pod {
            let scheduled = current
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            let phase = current
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("");
            let finished = phase == "Succeeded" || phase == "Failed";
            let default = current
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30);
            let grace = grace.unwrap_or(default);
            (scheduled && !finished && grace > 0).then_some(grace)
        } else {
            None
        };
        if !waiting_finalizers && pod_grace.is_none() {
            return None;
        }
        let m = meta::metadata_mut(&mut marked);
        let existing = m.get("deletionGracePeriodSeconds").and_then(Value::as_i64);
        let grace = pod_grace.unwrap_or(0);
        // A second delete may shorten the grace period, never lengthen it.
        if existing.is_none_or(|e| grace < e) || !m.contains_key("deletionTimestamp") {
            m.insert("deletionTimestamp".into(), json!(meta::rfc3339_in(grace)));
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
        }
        if pod_grace.is_some() {
            if let Some(spec) = marked.get_mut("spec").and_then(Value::as_object_mut) {
                spec.insert("terminationGracePeriodSeconds".into(), json!(grace));
            }
        }
        Some(marked)
    }

    /// Deletes a namespace and everything in it in one transaction.
    async fn delete_namespace(&self, ns_kv: &KeyValue, ns: &Value) -> Result<Value, StoreError> {
        let name = meta::name(ns).to_string();
        let mut ops = Vec::new();
        let mut services = Vec::new();
        for resource in RESOURCES.iter().filter(|r| r.namespaced) {
            let page = self
                .server
                .store
                .list(&resource.namespace_prefix(Some(&name)), None, 0, None)
                .await?;
            for kv in page.kvs {
                if resource.kind == Kind::Service {
                    services.push(kv.clone());
                }
                ops.push(Op::Delete {
                    key: kv.key.clone(),
                    precondition: Precondition::ModRevision(kv.mod_revision),
                });
            }
        }
        ops.push(Op::Delete {
            key: ns_kv.key.clone(),
            precondition: Precondition::ModRevision(ns_kv.mod_revision),
        });
        self.server.store.txn(ops).await?;
        for kv in services {
            if let Ok(svc) = serde_json::from_slice::<Service>(&kv.value) {
                self.release(&Held::of(&svc));
            }
        }
        Ok(ns.clone())
    }

    /// `POST pods/<name>/binding`: the scheduler assigns a node.
    async fn bind(&self, body: Value) -> Result<Response, ApiError> {
        let node = body
            .pointer("/target/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::invalid(
                    "",
                    "Binding",
                    self.name(),
                    vec![FieldError::required("target.name", "")],
                )
            })?
            .to_string();
        for _ in 0..CONFLICT_RETRIES {
            let kv = self.current().await?;
            let mut pod = codec::decode(&kv)?;
            if let Some(existing) = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::conflict(
                    "",
                    "pods",
                    self.name(),
                    &format!(
                        "pod {} is already assigned to node {existing:?}",
                        self.name()
                    ),
                ));
            }
            if meta::is_deleting(&pod) {
                return Err(ApiError::conflict(
                    "",
                    "pods",
                    self.name(),
                    "pod is being deleted, cannot be assigned to a host",
                ));
            }
            pod["spec"]["nodeName"] = json!(node);
            match self
                .server
                .store
                .update(
                    self.key(),
                    codec::encode(&pod)?,
                    Precondition::ModRevision(kv.mod_revision),
                )
                .await
            {
                Ok(_) => {
                    return Ok(json(
                        StatusCode::CREATED,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                    ))
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(self.write_error(e)),
            }
        }
        Err(ApiError::conflict(
            "",
            "pods",
            self.name(),
            "too many concurrent writers; try again",
        ))
    }
}

/// The `autoscaling/v1` Scale of a workload, as `kubectl scale` reads it.
fn scale_of(resource: &ResourceInfo, obj: &Value) -> Value {
    let selector = match resource.kind {
        Kind::ReplicationController => obj.pointer("/spec/selector").cloned(),
        _ => obj.pointer("/spec/selector/matchLabels").cloned(),
    };
    let selector =
        crate::api::selector::format_labels(selector.as_ref().and_then(Value::as_object));
    let m = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"), "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
    })
}

/// The workload with the replicas a Scale PUT or PATCH asks for; its resourceVersion, when
/// given, pins the update like on the object itself.
fn scaled(resource: &ResourceInfo, current: &Value, change: &Change) -> Result<Value, ApiError> {
    let scale = match change {
        Change::Replace(body) => body.clone(),
        Change::Patch(patch_type, patch) => {
            // A Scale has no lists, so a strategic merge patch is a merge patch here.
            let as_merge = if *patch_type == PatchType::Json {
                PatchType::Json
            } else {
                PatchType::Merge
            };
            patch::apply(resource.kind, as_merge, &scale_of(resource, current), patch)?
        }
    };
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| {
            ApiError::invalid(
                "autoscaling",
                "Scale",
                meta::name(current),
                vec![FieldError::required("spec.replicas", "")],
            )
        })?;
    if replicas < 0 {
        return Err(ApiError::invalid(
            "autoscaling",
            "Scale",
            meta::name(current),
            vec![FieldError::invalid(
                "spec.replicas",
                replicas,
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut next = current.clone();
    next["spec"]["replicas"] = json!(replicas);
    let m = meta::metadata_mut(&mut next);
    match meta::resource_version(&scale) {
        Some(rv) => m.insert("resourceVersion".into(), json!(rv)),
        None => m.remove("resourceVersion"),
    };
    Ok(next)
}

/// What an update may change: PUT on the object keeps the stored status; PUT on `/status`
/// keeps everything but the status. Server-owned metadata always comes from the stored object.
fn merge_update(
    resource: &ResourceInfo,
    current: &Value,
    requested: Value,
    status_only: bool,
) -> Value {
    let mut next = if status_only {
        let mut next = current.clone();
        match requested.get("status") {
            Some(status) => next["status"] = status.clone(),
            None => {
                if let Some(obj) = next.as_object_mut() {
                    obj.remove("status");
                }
            }
        }
        next
    } else {
        let mut next = requested;
        if resource.has_status {
            if let Some(obj) = next.as_object_mut() {
                match current.get("status") {
                    Some(status) => obj.insert("status".into(), status.clone()),
                    None => obj.remove("status"),
                };
            }
        }
        next
    };
    let current_meta = current.get("metadata").cloned().unwrap_or(json!({}));
    let m = meta::metadata_mut(&mut next);
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match current_meta.get(field) {
            Some(v) => m.insert(field.into(), v.clone()),
            None => m.remove(field),
        };
    }
    meta::strip_server_fields(m);
    if resource.has_spec && meta::spec_part(&next) != meta::spec_part(current) {
        let generation = current_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        meta::metadata_mut(&mut next).insert("generation".into(), json!(generation));
    }
    next
}

/// Equal apart from the resourceVersion: such an update is a no-op and writes nothing.
fn same_object(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        meta::strip_server_fields(meta::metadata_mut(&mut v));
        v
    };
    strip(a) == strip(b)
}

/// `dryRun` in a DeleteOptions body (client-go and `kubectl delete --dry-run=server` send it
/// there, not in the query), validated as kube's `ValidateDeleteOptions`: only `All`.
fn body_dry_run(options: &Value) -> Result<bool, ApiError> {
    let Some(value) = options.get("dryRun").filter(|v| !v.is_null()) else {
        return Ok(false);
    };
    let values: Vec<String> = serde_json::from_value(value.clone()).map_err(|_| {
        ApiError::bad_request(format!(
            "DeleteOptions.dryRun must be a list of strings, got {value}"
        ))
    })?;
    if values.iter().all(|v| v == "All") {
        return Ok(!values.is_empty());
    }
    let rendered: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    let mut err = ApiError::invalid(
        "meta.k8s.io",
        "DeleteOptions",
        "",
        vec![FieldError {
            field: "dryRun".into(),
            reason: crate::api::status::FieldReason::NotSupported,
            value: format!("[]string{{{}}}", rendered.join(", ")),
            detail: "supported values: \"All\"".into(),
        }],
    );
    err.message = err
        .message
        .replacen("DeleteOptions", "DeleteOptions.meta.k8s.io", 1);
    Err(err)
}

/// An update may not change `metadata.uid`: kube's `ValidateObjectMetaUpdate` (through
/// `rest.BeforeUpdate`'s common-field validation) answers 422 "field is immutable"; an update
/// without a uid keeps the stored one. (A changed name or namespace is refused before this with
/// kube's 400 by `place`; a changed `creationTimestamp` is ignored, as `BeforeUpdate` resets it.)
fn check_uid_unchanged(
    resource: &ResourceInfo,
    current: &Value,
    requested: &Value,
) -> Result<(), ApiError> {
    let requested_uid = meta::uid(requested).unwrap_or("");
    if requested_uid.is_empty() || Some(requested_uid) == meta::uid(current) {
        return Ok(());
    }
    Err(ApiError::invalid(
        resource.group,
        resource.kind_name,
        meta::name(current),
        vec![FieldError::invalid(
            "metadata.uid",
            format!("{requested_uid:?}"),
            "field is immutable",
        )],
    ))
}

/// `status.replicas` of ReplicaSets and ReplicationControllers has no `omitempty` in kube's v1
/// types (`ReplicaSetStatus.Replicas`, `ReplicationControllerStatus.Replicas`), so kube always
/// writes it, `{"replicas": 0}` on create; the official Python client's models require it and
/// fail to list ReplicaSets without it. (Every DeploymentStatus field is `omitempty`: `{}` is
/// what kube gives a new Deployment.)
fn fill_required_status(kind: Kind, obj: &mut Value) {
    if !matches!(kind, Kind::ReplicaSet | Kind::ReplicationController) {
        return;
    }
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let status = map.entry("status").or_insert_with(|| json!({}));
    if !status.is_object() {
        *status = json!({});
    }
    if let Some(status) = status.as_object_mut() {
        status.entry("replicas").or_insert(json!(0));
    }
}

/// kube-apiserver clears the status a client sends on create for these kinds.
fn reset_status_on_create(kind: Kind, obj: &mut Value) {
    let status = match kind {
        Kind::Service => json!({"loadBalancer": {}}),
        Kind::Pod => json!({"phase": "Pending"}),
        Kind::Namespace => json!({"phase": "Active"}),
        Kind::Deployment | Kind::ReplicaSet | Kind::ReplicationController => json!({}),
        _ => return,
    };
    if let Some(map) = obj.as_object_mut() {
        map.insert("status".into(), status);
    }
}

/// The finalizer a delete's propagation policy asks for: `Orphan` (or the legacy
/// `orphanDependents: true`) → `orphan`, `Foreground` → `foregroundDeletion`, `Background`
/// (the default) → none.
fn propagation_finalizer(query: &Query, options: &Value) -> Result<Option<&'static str>, ApiError> {
    let policy = query
        .propagation_policy
        .clone()
        .or_else(|| {
            options
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .or_else(|| {
            (options.get("orphanDependents") == Some(&json!(true))).then(|| "Orphan".to_string())
        });
    match policy.as_deref() {
        None | Some("Background") => Ok(None),
        Some("Orphan") => Ok(Some("orphan")),
        Some("Foreground") => Ok(Some("foregroundDeletion")),
        Some(other) => Err(ApiError::invalid(
            "meta.k8s.io",
            "DeleteOptions",
            "",
            vec![FieldError::not_supported(
                "propagationPolicy",
                other,
                &["Foreground", "Background", "Orphan"],
            )],
        )),
    }
}

fn add_finalizer(obj: &mut Value, finalizer: &str) {
    let m = meta::metadata_mut(obj);
    let list = m.entry("finalizers").or_insert_with(|| json!([]));
    if let Some(items) = list.as_array_mut() {
        if !items.iter().any(|f| f == finalizer) {
            items.push(json!(finalizer));
        }
    }
}
