//! Patches: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and Kubernetes' strategic merge
//! patch, which merges lists by a key (containers by `name`, Service ports by `port`) using the
//! patch metadata below — the same table the OpenAPI document publishes to clients.

use serde_json::{Map, Value};

use super::resources::Kind;
use super::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
}

impl PatchType {
    pub const CONTENT_TYPES: &'static [&'static str] = &[
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
    ];

    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            _ => None,
        }
    }
}

/// How one list field merges: kube's `patchStrategy` and `patchMergeKey` struct tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListMerge {
    /// Dotted path from the object root; lists are crossed without an index.
    pub path: &'static str,
    /// The key identifying items, or None for a list of scalars merged as a set.
    pub merge_key: Option<&'static str>,
    /// Whether the field also has `retainKeys` (a union whose unset members are cleared).
    pub retain_keys: bool,
}

const fn merge(path: &'static str, key: &'static str) -> ListMerge {
    ListMerge {
        path,
        merge_key: Some(key),
        retain_keys: false,
    }
}

const fn set(path: &'static str) -> ListMerge {
    ListMerge {
        path,
        merge_key: None,
        retain_keys: false,
    }
}

const METADATA: &[ListMerge] = &[
    merge("metadata.ownerReferences", "uid"),
    set("metadata.finalizers"),
];

/// Pod spec fields, relative to the pod spec.
const POD_SPEC: &[ListMerge] = &[
    merge("containers", "name"),
    merge("initContainers", "name"),
    merge("ephemeralContainers", "name"),
    merge("containers.ports", "containerPort"),
    merge("initContainers.ports", "containerPort"),
    merge("containers.env", "name"),
    merge("initContainers.env", "name"),
    merge("containers.volumeMounts", "mountPath"),
    merge("initContainers.volumeMounts", "mountPath"),
    merge("containers.volumeDevices", "devicePath"),
    merge("initContainers.volumeDevices", "devicePath"),
    merge("containers.resizePolicy", "resourceName"),
    merge("containers.resources.claims", "name"),
    merge("imagePullSecrets", "name"),
    merge("hostAliases", "ip"),
    merge("topologySpreadConstraints", "topologyKey"),
    merge("resourceClaims", "name"),
    merge("schedulingGates", "name"),
    ListMerge {
        path: "volumes",
        merge_key: Some("name"),
        retain_keys: true,
    },
];

const POD_STATUS: &[ListMerge] = &[
    merge("status.conditions", "type"),
    merge("status.podIPs", "ip"),
    merge("status.hostIPs", "ip"),
];

const SERVICE: &[ListMerge] = &[
    merge("spec.ports", "port"),
    merge("status.conditions", "type"),
];
const NODE: &[ListMerge] = &[
    set("spec.podCIDRs"),
    merge("status.conditions", "type"),
    merge("status.addresses", "type"),
];
const WORKLOAD_STATUS: &[ListMerge] = &[merge("status.conditions", "type")];

/// Every list with a merge strategy of `kind`, with full paths.
pub fn list_merges(kind: Kind) -> Vec<(String, ListMerge)> {
    let mut out: Vec<(String, ListMerge)> =
        METADATA.iter().map(|m| (m.path.to_string(), *m)).collect();
    let pod_spec_at = |prefix: &str, out: &mut Vec<(String, ListMerge)>| {
        for m in POD_SPEC {
            out.push((format!("{prefix}.{}", m.path), *m));
        }
    };
    let extend = |list: &[ListMerge], out: &mut Vec<(String, ListMerge)>| {
        out.extend(list.iter().map(|m| (m.path.to_string(), *m)));
    };
    match kind {
        Kind::Pod => {
            pod_spec_at("spec", &mut out);
            extend(POD_STATUS, &mut out);
        }
        Kind::Deployment | Kind::ReplicaSet | Kind::ReplicationController => {
            pod_spec_at("spec.template.spec", &mut out);
            out.push((
                "spec.template.metadata.ownerReferences".into(),
                merge("", "uid"),
            ));
            extend(WORKLOAD_STATUS, &mut out);
        }
        Kind::Service => extend(SERVICE, &mut out),
        Kind::Node => extend(NODE, &mut out),
        Kind::Namespace => extend(WORKLOAD_STATUS, &mut out),
        Kind::Endpoints | Kind::EndpointSlice | Kind::Event => {}
    }
    out
}

/// Fields with `patchStrategy: retainKeys` that are objects (not lists).
pub fn retain_keys_objects(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Deployment => &["spec.strategy"],
        _ => &[],
    }
}

pub fn apply(
    kind: Kind,
    patch_type: PatchType,
    original: &Value,
    patch: &[u8],
) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    match patch_type {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
            Ok(doc)
        }
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchType::StrategicMerge => {
            let Value::Object(patch) = patch else {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            };
            let meta = PatchMeta::new(kind);
            let original = original.as_object().cloned().unwrap_or_default();
            merge_map(original, patch, "", &meta).map(Value::Object)
        }
    }
}

struct PatchMeta {
    lists: Vec<(String, ListMerge)>,
}

impl PatchMeta {
    fn new(kind: Kind) -> Self {
        Self {
            lists: list_merges(kind),
        }
    }

    fn list(&self, path: &str) -> Option<&ListMerge> {
        self.lists.iter().find(|(p, _)| p == path).map(|(_, m)| m)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_LIST: &str = "$deleteFromPrimitiveList/";

fn merge_map(
    mut original: Map<String, Value>,
    mut patch: Map<String, Value>,
    path: &str,
    meta: &PatchMeta,
) -> Result<Map<String, Value>, ApiError> {
    match patch.remove(DIRECTIVE).as_ref().and_then(Value::as_str) {
        Some("replace") => return Ok(patch),
        Some("delete") => return Ok(Map::new()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch directive {other:?} at {path:?}: allowed values: \"replace\", \"delete\""
            )))
        }
        None => {}
    }
    if let Some(keep) = patch.remove(RETAIN_KEYS) {
        let keep: Vec<String> = serde_json::from_value(keep).map_err(|_| {
            ApiError::bad_request(format!("$retainKeys at {path:?} must be a list of strings"))
        })?;
        original.retain(|k, _| keep.contains(k));
    }
    for (key, value) in patch {
        if key.starts_with(SET_ORDER) {
            // Ordering hints only: the merge below keeps the original order plus additions.
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM_LIST) {
            let remove = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = original.get_mut(field) {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        let child_path = join(path, &key);
        if value.is_null() {
            original.remove(&key);
            continue;
        }
        let merged = match (original.remove(&key), value) {
            (Some(Value::Object(o)), Value::Object(p)) => {
                Value::Object(merge_map(o, p, &child_path, meta)?)
            }
            (Some(Value::Array(o)), Value::Array(p)) => merge_list(o, p, &child_path, meta)?,
            (None, Value::Object(p)) => Value::Object(merge_map(Map::new(), p, &child_path, meta)?),
            (None, Value::Array(p)) => merge_list(Vec::new(), p, &child_path, meta)?,
            (_, p) => p,
        };
        original.insert(key, merged);
    }
    Ok(original)
}

fn merge_list(
    original: Vec<Value>,
    patch: Vec<Value>,
    path: &str,
    meta: &PatchMeta,
) -> Result<Value, ApiError> {
    let Some(strategy) = meta.list(path) else {
        // No merge strategy: the patch's list replaces the original, minus directives.
        let cleaned = patch
            .into_iter()
            .filter(|item| item.get(DIRECTIVE).is_none())
            .collect();
        return Ok(Value::Array(cleaned));
    };
    if patch
        .iter()
        .any(|item| item.get(DIRECTIVE).and_then(Value::as_str) == Some("replace"))
    {
        let rest = patch
            .into_iter()
            .filter(|item| item.get(DIRECTIVE).is_none())
            .collect();
        return Ok(Value::Array(rest));
    }
    let Some(key) = strategy.merge_key else {
        let mut out = original;
        for item in patch {
            if !out.contains(&item) {
                out.push(item);
            }
        }
        return Ok(Value::Array(out));
    };
    let mut out = original;
    for item in patch {
        let Value::Object(mut item) = item else {
            return Err(ApiError::bad_request(format!(
                "items of {path} must be objects with the merge key {key:?}"
            )));
        };
        let id = item.get(key).cloned().ok_or_else(|| {
            ApiError::bad_request(format!(
                "an item of {path} in the patch has no merge key {key:?}"
            ))
        })?;
        let position = out.iter().position(|o| o.get(key) == Some(&id));
        if item.get(DIRECTIVE).and_then(Value::as_str) == Some("delete") {
            if let Some(i) = position {
                out.remove(i);
            }
            continue;
        }
        match position {
            Some(i) => {
                let existing = match out[i].take() {
                    Value::Object(o) => o,
                    _ => Map::new(),
                };
                out[i] = Value::Object(merge_map(existing, item, path, meta)?);
            }
            None => {
                item.remove(DIRECTIVE);
                out.push(Value::Object(merge_map(Map::new(), item, path, meta)?));
            }
        }
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn smp(kind: Kind, original: Value, patch: Value) -> Value {
        apply(
            kind,
            PatchType::StrategicMerge,
            &original,
            patch.to_string().as_bytes(),
        )
        .expect("patch")
    }

    #[test]
    fn service_ports_merge_by_port() {
        let original = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}], "selector": {"app": "a", "old": "x"}}});
        let patched = smp(
            Kind::Service,
            original,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "$patch": "delete"}, {"port": 53, "name": "dns"}], "selector": {"old": null}}}),
        );
        assert_eq!(
            patched,
            json!({"spec": {"ports": [{"port": 80, "name": "http", "targetPort": 8080}, {"port": 53, "name": "dns"}], "selector": {"app": "a"}}})
        );
    }

    #[test]
    fn containers_merge_by_name_and_unknown_lists_replace() {
        let original = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]}], "tolerations": [{"key": "k"}]}}}});
        let patched = smp(
            Kind::Deployment,
            original,
            json!({"spec": {"template": {"spec": {"$setElementOrder/containers": [{"name": "a"}], "containers": [{"name": "a", "image": "y", "env": [{"name": "B", "value": "2"}]}], "tolerations": [{"key": "j"}]}}}}),
        );
        assert_eq!(
            patched.pointer("/spec/template/spec/containers/0"),
            Some(
                &json!({"name": "a", "image": "y", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]})
            )
        );
        assert_eq!(
            patched.pointer("/spec/template/spec/tolerations"),
            Some(&json!([{"key": "j"}]))
        );
    }

    #[test]
    fn retain_keys_and_replace_directives() {
        let original = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patched = smp(
            Kind::Deployment,
            original,
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(patched, json!({"spec": {"strategy": {"type": "Recreate"}}}));
        let replaced = smp(
            Kind::Service,
            json!({"metadata": {"labels": {"a": "1"}}}),
            json!({"metadata": {"labels": {"$patch": "replace", "b": "2"}}}),
        );
        assert_eq!(replaced, json!({"metadata": {"labels": {"b": "2"}}}));
    }

    #[test]
    fn json_and_merge_patches() {
        let original = json!({"metadata": {"labels": {"a": "1"}}});
        let merged = apply(
            Kind::Service,
            PatchType::Merge,
            &original,
            br#"{"metadata":{"labels":{"a":null,"b":"2"}}}"#,
        )
        .expect("merge");
        assert_eq!(merged, json!({"metadata": {"labels": {"b": "2"}}}));
        let patched = apply(
            Kind::Service,
            PatchType::Json,
            &original,
            br#"[{"op":"replace","path":"/metadata/labels/a","value":"3"}]"#,
        )
        .expect("json");
        assert_eq!(patched, json!({"metadata": {"labels": {"a": "3"}}}));
        let err = apply(
            Kind::Service,
            PatchType::Json,
            &original,
            br#"[{"op":"test","path":"/metadata/labels/a","value":"x"}]"#,
        )
        .expect_err("must be refused");
        assert_eq!(err.code, 422);
    }
}
