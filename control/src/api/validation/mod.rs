//! Decoding, defaulting and validation of incoming objects, per kind, as kube-apiserver does
//! it. Everything here is pure: allocation of ClusterIPs and NodePorts is in `allocator`.

pub mod ip;
pub mod names;
mod objects;
pub mod service;

use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde_json::Value;

use super::meta;
use super::resources::{Kind, ResourceInfo};
use super::{ApiError, FieldError};

pub use objects::{default_object, validate_object};

/// Decodes a request body into the kind's typed schema and back, so that unknown fields are
/// dropped and wrong types are refused (400) before anything else looks at the object.
pub fn decode(resource: &ResourceInfo, mut body: Value) -> Result<Value, ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body of the request is not a JSON object (expected a {})",
            resource.kind_name
        )));
    };
    let api_version = resource.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            obj.insert("apiVersion".into(), Value::String(api_version.clone()));
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )))
        }
    }
    match obj.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            obj.insert("kind".into(), Value::String(resource.kind_name.into()));
        }
        Some(k) if k == resource.kind_name => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                resource.kind_name
            )))
        }
    }
    fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(
        body: Value,
        kind: &str,
    ) -> Result<Value, ApiError> {
        let typed: T = serde_json::from_value(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding {kind}: {e}")))?;
        serde_json::to_value(typed).map_err(|e| ApiError::internal(format!("encoding {kind}: {e}")))
    }
    let kind = resource.kind_name;
    match resource.kind {
        Kind::Namespace => roundtrip::<core::Namespace>(body, kind),
        Kind::Service => roundtrip::<core::Service>(body, kind),
        Kind::Endpoints => roundtrip::<core::Endpoints>(body, kind),
        Kind::EndpointSlice => roundtrip::<discovery::EndpointSlice>(body, kind),
        Kind::Pod => roundtrip::<core::Pod>(body, kind),
        Kind::Node => roundtrip::<core::Node>(body, kind),
        Kind::ReplicationController => roundtrip::<core::ReplicationController>(body, kind),
        Kind::ReplicaSet => roundtrip::<apps::ReplicaSet>(body, kind),
        Kind::Deployment => roundtrip::<apps::Deployment>(body, kind),
        Kind::Event => roundtrip::<core::Event>(body, kind),
    }
}

/// Rules every object's metadata follows.
pub fn validate_metadata(resource: &ResourceInfo, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let name = meta::name(obj);
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        let rule = match resource.kind {
            Kind::Service => names::dns1035_label(name),
            Kind::Namespace => names::dns1123_label(name),
            _ => names::dns1123_subdomain(name),
        };
        if let Err(why) = rule {
            errs.push(FieldError::invalid(
                "metadata.name",
                format!("{name:?}"),
                why,
            ));
        }
    }
    if let Some(labels) = meta::labels(obj) {
        for (key, value) in labels {
            if let Err(why) = names::qualified_name(key) {
                errs.push(FieldError::invalid(
                    "metadata.labels",
                    format!("{key:?}"),
                    why,
                ));
            }
            match value.as_str() {
                Some(v) => {
                    if let Err(why) = names::label_value(v) {
                        errs.push(FieldError::invalid(
                            "metadata.labels",
                            format!("{v:?}"),
                            why,
                        ));
                    }
                }
                None => errs.push(FieldError::invalid(
                    "metadata.labels",
                    value,
                    "label values must be strings",
                )),
            }
        }
    }
    if let Some(annotations) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (key, value) in annotations {
            if let Err(why) = names::qualified_name(&key.to_lowercase()) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    format!("{key:?}"),
                    why,
                ));
            }
            total += key.len() + value.as_str().map_or(0, str::len);
        }
        const MAX: usize = 256 * 1024;
        if total > MAX {
            errs.push(FieldError::too_long("metadata.annotations", MAX));
        }
    }
    errs
}
