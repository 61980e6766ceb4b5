//! OpenAPI documents generated from the k8s-openapi types (their `schemars` schemas) plus the
//! Kubernetes extensions kubectl reads: `x-kubernetes-group-version-kind` on each served kind,
//! and the patch strategy and merge key of lists (from `patch::list_merges`), which
//! `kubectl apply` uses to build strategic merge patches.
//!
//! Served as `/openapi/v2` (JSON, or gnostic protobuf for kubectl) and `/openapi/v3` (an index
//! and one document per group-version).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use prost::Message;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use super::openapi_proto;
use super::patch::{list_merges, retain_keys_objects};
use super::resources::{Kind, ResourceInfo, RESOURCES};

/// All documents, rendered once at start.
pub struct OpenApi {
    pub v2_json: Bytes,
    pub v2_proto: Bytes,
    pub v3_index: Bytes,
    /// Keyed by `api/v1`, `apis/apps/v1`, ...
    pub v3_docs: BTreeMap<String, Bytes>,
}

fn definition_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Namespace => "io.k8s.api.core.v1.Namespace",
        Kind::Service => "io.k8s.api.core.v1.Service",
        Kind::Endpoints => "io.k8s.api.core.v1.Endpoints",
        Kind::EndpointSlice => "io.k8s.api.discovery.v1.EndpointSlice",
        Kind::Pod => "io.k8s.api.core.v1.Pod",
        Kind::Node => "io.k8s.api.core.v1.Node",
        Kind::ReplicationController => "io.k8s.api.core.v1.ReplicationController",
        Kind::ReplicaSet => "io.k8s.api.apps.v1.ReplicaSet",
        Kind::Deployment => "io.k8s.api.apps.v1.Deployment",
        Kind::Event => "io.k8s.api.core.v1.Event",
    }
}

/// Every schema reachable from the served kinds, with refs under `pointer`
/// (`/definitions` for v2, `/components/schemas` for v3).
fn definitions(pointer: &str) -> Map<String, Value> {
    let mut settings = SchemaSettings::draft07();
    settings.definitions_path = pointer.to_string().into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
    generator.subschema_for::<core::Namespace>();
    generator.subschema_for::<core::Service>();
    generator.subschema_for::<core::Endpoints>();
    generator.subschema_for::<discovery::EndpointSlice>();
    generator.subschema_for::<core::Pod>();
    generator.subschema_for::<core::Node>();
    generator.subschema_for::<core::ReplicationController>();
    generator.subschema_for::<core::Event>();
    generator.subschema_for::<apps::ReplicaSet>();
    generator.subschema_for::<apps::Deployment>();
    let mut defs = generator.take_definitions(true);
    for schema in defs.values_mut() {
        single_types(schema);
    }
    let ref_prefix = format!("#{pointer}/");
    for resource in RESOURCES {
        let name = definition_name(resource.kind);
        if let Some(def) = defs.get_mut(name).and_then(Value::as_object_mut) {
            def.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": resource.group, "kind": resource.kind_name, "version": resource.version}]),
            );
        }
        annotate_patch_strategies(&mut defs, resource, &ref_prefix);
    }
    defs
}

/// kubectl's OpenAPI parser takes one type per schema: drop `null` from `["x", "null"]`.
fn single_types(schema: &mut Value) {
    match schema {
        Value::Object(obj) => {
            if let Some(Value::Array(types)) = obj.get("type") {
                let first = types.iter().find(|t| t.as_str() != Some("null")).cloned();
                match first {
                    Some(t) => obj.insert("type".into(), t),
                    None => obj.remove("type"),
                };
            }
            for value in obj.values_mut() {
                single_types(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(single_types),
        _ => {}
    }
}

/// The definition a property schema points to (directly, or through `items`).
fn referenced<'a>(schema: &'a Value, ref_prefix: &str) -> Option<&'a str> {
    let target = schema.get("items").unwrap_or(schema);
    let reference = target.get("$ref").or_else(|| {
        target
            .get("allOf")
            .and_then(|a| a.get(0))
            .and_then(|s| s.get("$ref"))
    })?;
    reference.as_str()?.strip_prefix(ref_prefix)
}

/// Walks `path` from the kind's definition and marks the last property with the strategy.
fn mark(
    defs: &mut Map<String, Value>,
    root: &str,
    path: &str,
    ref_prefix: &str,
    extensions: &[(&str, Value)],
) {
    let segments: Vec<&str> = path.split('.').collect();
    let mut definition = root.to_string();
    for (i, segment) in segments.iter().enumerate() {
        let Some(property) = defs
            .get_mut(&definition)
            .and_then(|d| d.get_mut("properties"))
            .and_then(|p| p.get_mut(*segment))
        else {
            return;
        };
        if i == segments.len() - 1 {
            if let Some(property) = property.as_object_mut() {
                for (key, value) in extensions {
                    property.insert((*key).into(), value.clone());
                }
            }
            return;
        }
        match referenced(property, ref_prefix) {
            Some(next) => definition = next.to_string(),
            None => return,
        }
    }
}

fn annotate_patch_strategies(
    defs: &mut Map<String, Value>,
    resource: &ResourceInfo,
    ref_prefix: &str,
) {
    let root = definition_name(resource.kind);
    for (path, merge) in list_merges(resource.kind) {
        let strategy = if merge.retain_keys {
            "merge,retainKeys"
        } else {
            "merge"
        };
        let mut extensions = vec![("x-kubernetes-patch-strategy", json!(strategy))];
        if let Some(key) = merge.merge_key {
            extensions.push(("x-kubernetes-patch-merge-key", json!(key)));
        }
        mark(defs, root, &path, ref_prefix, &extensions);
    }
    for path in retain_keys_objects(resource.kind) {
        mark(
            defs,
            root,
            path,
            ref_prefix,
            &[("x-kubernetes-patch-strategy", json!("retainKeys"))],
        );
    }
}

fn info() -> Value {
    json!({"title": "kpx-control", "version": env!("CARGO_PKG_VERSION")})
}

fn hash_hex(bytes: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    format!("{:016X}", hasher.finish())
}

impl OpenApi {
    pub fn build() -> Self {
        let v2_defs = definitions("/definitions");
        let v2 = json!({"swagger": "2.0", "info": info(), "paths": {}, "definitions": v2_defs});
        let proto = openapi_proto::Document {
            swagger: "2.0".into(),
            info: Some(openapi_proto::Info {
                title: "kpx-control".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            }),
            paths: Some(openapi_proto::Paths {}),
            definitions: Some(openapi_proto::Definitions {
                additional_properties: v2_defs
                    .iter()
                    .map(|(name, schema)| openapi_proto::NamedSchema {
                        name: name.clone(),
                        value: Some(openapi_proto::schema(schema)),
                    })
                    .collect(),
            }),
        };

        let v3_defs = definitions("/components/schemas");
        let mut v3_docs = BTreeMap::new();
        let mut index = Map::new();
        let mut group_versions: Vec<String> = Vec::new();
        for r in RESOURCES {
            let gv = if r.group.is_empty() {
                format!("api/{}", r.version)
            } else {
                format!("apis/{}/{}", r.group, r.version)
            };
            if !group_versions.contains(&gv) {
                group_versions.push(gv);
            }
        }
        for gv in group_versions {
            let doc = json!({
                "openapi": "3.0.0",
                "info": info(),
                "paths": {},
                "components": {"schemas": v3_defs},
            });
            let body = Bytes::from(doc.to_string());
            index.insert(
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", hash_hex(&body))}),
            );
            v3_docs.insert(gv, body);
        }
        Self {
            v2_json: Bytes::from(v2.to_string()),
            v2_proto: Bytes::from(proto.encode_to_vec()),
            v3_index: Bytes::from(json!({"paths": index}).to_string()),
            v3_docs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_gvk_and_lists_their_merge_keys() {
        let defs = definitions("/definitions");
        let svc = &defs["io.k8s.api.core.v1.Service"];
        assert_eq!(svc["x-kubernetes-group-version-kind"][0]["kind"], "Service");
        let ports = &defs["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "port");
        assert_eq!(ports["x-kubernetes-patch-strategy"], "merge");
        let containers = &defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        let strategy = &defs["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["strategy"];
        assert_eq!(strategy["x-kubernetes-patch-strategy"], "retainKeys");
    }

    #[test]
    fn protobuf_document_decodes_back() {
        let api = OpenApi::build();
        let doc = openapi_proto::Document::decode(api.v2_proto.as_ref()).expect("decode");
        assert_eq!(doc.swagger, "2.0");
        let defs = doc.definitions.expect("definitions").additional_properties;
        let svc = defs
            .iter()
            .find(|d| d.name == "io.k8s.api.core.v1.Service")
            .expect("service");
        let ext = &svc.value.as_ref().expect("schema").vendor_extension;
        assert!(ext
            .iter()
            .any(|e| e.name == "x-kubernetes-group-version-kind"));
        assert!(api.v3_docs.contains_key("apis/apps/v1"));
    }
}
