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
        PatchType::Json => apply_json_patch(original, patch),
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

/// kube-apiserver's `maxJSONPatchOperations` (`k8s.io/apiserver/pkg/endpoints/handlers/patch.go`).
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// kube-apiserver's `JSONPatchMaxCopyBytes` (`k8s.io/apiserver/pkg/server/config.go`): how much
/// all `copy` operations of one patch may add to the document together (evanphx/json-patch's
/// `AccumulatedCopySizeLimit`). Without it, 26 `copy` ops of the root double the document 26
/// times: 1.4 KB of patch asked for gigabytes.
pub const JSON_PATCH_MAX_COPY_BYTES: usize = 3 * 1024 * 1024;

/// Applies an RFC 6902 patch operation by operation, as kube-apiserver does with
/// evanphx/json-patch: more than [`MAX_JSON_PATCH_OPERATIONS`] operations is 413 before anything
/// is applied, and a `copy` is sized (with an early stop) before its value is cloned, so the
/// document never grows by more than [`JSON_PATCH_MAX_COPY_BYTES`] through copies. Every other
/// operation only places values the patch body itself carries, so the result stays within
/// original + body + copy budget. The original is cloned once; a failed patch is dropped whole.
fn apply_json_patch(original: &Value, patch: Value) -> Result<Value, ApiError> {
    let Value::Array(raw_ops) = patch else {
        return Err(ApiError::bad_request(
            "invalid JSON patch: a JSON patch must be a list of operations",
        ));
    };
    if raw_ops.len() > MAX_JSON_PATCH_OPERATIONS {
        // kube: errors.NewRequestEntityTooLargeError in patcher.applyJSPatch.
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!(
                "Request entity too large: The allowed maximum operations in a JSON patch is \
                 {MAX_JSON_PATCH_OPERATIONS}, got {}",
                raw_ops.len()
            ),
        ));
    }
    let ops: json_patch::Patch = serde_json::from_value(Value::Array(raw_ops))
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    // kube answers a patch that cannot be applied with a bare 422 (NewGenericServerResponse).
    let unprocessable = |message: String| ApiError::new(422, "Invalid", message);
    let mut doc = original.clone();
    let mut copied = 0usize;
    for op in &ops.0 {
        if let json_patch::PatchOperation::Copy(copy) = op {
            let from = doc.pointer(copy.from.as_str()).ok_or_else(|| {
                unprocessable(format!(
                    "the JSON patch could not be applied: copy from {:?}: no value at that path",
                    copy.from.as_str()
                ))
            })?;
            let budget = JSON_PATCH_MAX_COPY_BYTES - copied;
            match json_size_within(from, budget) {
                Some(size) => copied += size,
                None => {
                    // evanphx/json-patch's AccumulatedCopySizeError, which kube returns as 422.
                    return Err(unprocessable(format!(
                        "Unable to complete the copy, the accumulated size increase of copy \
                         exceeds the limit {JSON_PATCH_MAX_COPY_BYTES}: the value at {:?} is \
                         larger than the {budget} bytes left",
                        copy.from.as_str()
                    )));
                }
            }
        }
        json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op))
            .map_err(|e| unprocessable(format!("the JSON patch could not be applied: {e}")))?;
    }
    Ok(doc)
}

/// The length of `value` written as compact JSON, or None as soon as it exceeds `budget`: the
/// walk stops early, so sizing a huge value costs at most `budget` steps.
pub fn json_size_within(value: &Value, budget: usize) -> Option<usize> {
    fn walk(value: &Value, used: &mut usize, budget: usize) -> bool {
        let add = |used: &mut usize, n: usize| {
            *used = used.saturating_add(n);
            *used <= budget
        };
        match value {
            Value::Null => add(used, 4),
            Value::Bool(b) => add(used, if *b { 4 } else { 5 }),
            Value::Number(n) => add(used, n.to_string().len()),
            Value::String(s) => add(used, s.len() + 2),
            Value::Array(items) => {
                add(used, 2 + items.len().saturating_sub(1))
                    && items.iter().all(|item| walk(item, used, budget))
            }
            Value::Object(map) => {
                add(used, 2 + map.len().saturating_sub(1))
                    && map
                        .iter()
                        .all(|(k, v)| add(used, k.len() + 3) && walk(v, used, budget))
            }
        }
    }
    let mut used = 0;
    walk(value, &mut used, budget).then_some(used)
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

    /// The attack: each `copy` of the root doubles the document; 26 of them would ask for
    /// 2^26 copies of the original. The budget stops it at the first copy past 3 MiB, so the
    /// big value is never built.
    #[test]
    fn copies_are_bounded_by_the_accumulated_copy_budget() {
        let original = json!({"metadata": {"labels": {"a": "x".repeat(64 * 1024)}}});
        let ops: Vec<Value> = (0..26)
            .map(|i| json!({"op": "copy", "from": "/metadata", "path": format!("/m{i}")}))
            .chain(std::iter::once(
                json!({"op": "copy", "from": "", "path": "/metadata/labels/b"}),
            ))
            .collect();
        let body = serde_json::to_vec(&ops).expect("encode");
        let err = apply(Kind::Event, PatchType::Json, &original, &body).expect_err("refused");
        assert_eq!(err.code, 422, "{}", err.message);
        assert!(
            err.message.contains("accumulated size increase of copy"),
            "{}",
            err.message
        );
        // Doubling the root: refused by the time the copies pass 3 MiB.
        let doubling: Vec<Value> = (0..26)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
            .collect();
        let body = serde_json::to_vec(&doubling).expect("encode");
        let err = apply(Kind::Event, PatchType::Json, &original, &body).expect_err("refused");
        assert_eq!(err.code, 422);
        // Small copies within the budget still work.
        let ok = apply(
            Kind::Event,
            PatchType::Json,
            &json!({"data": {"a": "1"}}),
            br#"[{"op":"copy","from":"/data/a","path":"/data/b"}]"#,
        )
        .expect("small copy");
        assert_eq!(ok, json!({"data": {"a": "1", "b": "1"}}));
    }

    #[test]
    fn more_than_ten_thousand_operations_is_413() {
        let ops: Vec<Value> = (0..=MAX_JSON_PATCH_OPERATIONS)
            .map(|_| json!({"op": "test", "path": "/a", "value": 1}))
            .collect();
        let body = serde_json::to_vec(&ops).expect("encode");
        let err =
            apply(Kind::Event, PatchType::Json, &json!({"a": 1}), &body).expect_err("refused");
        assert_eq!(err.code, 413);
        assert_eq!(
            err.message,
            "Request entity too large: The allowed maximum operations in a JSON patch is 10000, got 10001"
        );
        let ok: Vec<Value> = ops[1..].to_vec();
        let body = serde_json::to_vec(&ok).expect("encode");
        apply(Kind::Event, PatchType::Json, &json!({"a": 1}), &body).expect("10,000 is allowed");
    }

    #[test]
    fn json_sizes_stop_early() {
        let v = json!({"a": [1, true, null, "xy"], "b": {}});
        assert_eq!(json_size_within(&v, 1000), Some(v.to_string().len()));
        assert_eq!(json_size_within(&v, 5), None);
    }
}
