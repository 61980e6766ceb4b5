//! Patches: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and Kubernetes' strategic merge
//! patch, which merges lists by a key (containers by `name`, Service ports by `port`) using the
//! patch metadata below — the same table the OpenAPI document publishes to clients.

use std::collections::{HashMap, HashSet, VecDeque};

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
        // A set, not `Vec::contains` per key: a patch naming many keys stays linear.
        let keep: HashSet<String> = keep.into_iter().collect();
        original.retain(|k, _| keep.contains(k));
    }
    for (key, value) in patch {
        if key.starts_with(SET_ORDER) {
            // Ordering hints only: the merge below keeps the original order plus additions.
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM_LIST) {
            let remove: HashSet<String> = value
                .as_array()
                .map(|items| items.iter().map(identity).collect())
                .unwrap_or_default();
            if let Some(Value::Array(items)) = original.get_mut(field) {
                items.retain(|item| !remove.contains(&identity(item)));
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
        // A set: each patch item is added unless an equal one is already there. Membership by
        // identity string, so a 60k-item patch is linear, not 60k x 60k comparisons.
        let mut seen: HashSet<String> = original.iter().map(identity).collect();
        let mut out = original;
        for item in patch {
            if seen.insert(identity(&item)) {
                out.push(item);
            }
        }
        return Ok(Value::Array(out));
    };
    // Items by merge key: identity of the key's value -> positions of the items carrying it, in
    // order. The first live position is what `out.iter().position(..)` found before (duplicates
    // in the original included), so the semantics are unchanged; deleted items become holes
    // (`None`) dropped at the end instead of shifting the list on every delete. kube's
    // strategicpatch.mergeSlice does the same matching (first item with an equal merge key).
    let mut out: Vec<Option<Value>> = original.into_iter().map(Some).collect();
    let mut by_key: HashMap<String, VecDeque<usize>> = HashMap::new();
    for (i, item) in out.iter().enumerate() {
        if let Some(id) = item.as_ref().and_then(|o| o.get(key)) {
            by_key.entry(identity(id)).or_default().push_back(i);
        }
    }
    for item in patch {
        let Value::Object(mut item) = item else {
            return Err(ApiError::bad_request(format!(
                "items of {path} must be objects with the merge key {key:?}"
            )));
        };
        let id = item.get(key).map(identity).ok_or_else(|| {
            ApiError::bad_request(format!(
                "an item of {path} in the patch has no merge key {key:?}"
            ))
        })?;
        let positions = by_key.entry(id.clone()).or_default();
        if item.get(DIRECTIVE).and_then(Value::as_str) == Some("delete") {
            if let Some(i) = positions.pop_front() {
                out[i] = None;
            }
            continue;
        }
        let (i, merged) = match positions.front().copied() {
            Some(i) => {
                let existing = match out[i].take() {
                    Some(Value::Object(o)) => o,
                    _ => Map::new(),
                };
                (i, merge_map(existing, item, path, meta)?)
            }
            None => {
                item.remove(DIRECTIVE);
                positions.push_back(out.len());
                out.push(None);
                (out.len() - 1, merge_map(Map::new(), item, path, meta)?)
            }
        };
        // The merge keeps a scalar key as it was; a null or object-valued key can change (the
        // null removes it, objects merge), and later items must then match the new value.
        let now = merged.get(key).map(identity);
        if now.as_deref() != Some(id.as_str()) {
            if let Some(positions) = by_key.get_mut(&id) {
                positions.retain(|&p| p != i);
            }
            if let Some(now) = now {
                let positions = by_key.entry(now).or_default();
                let at = positions.partition_point(|&p| p < i);
                positions.insert(at, i);
            }
        }
        out[i] = Some(Value::Object(merged));
    }
    Ok(Value::Array(out.into_iter().flatten().collect()))
}

/// A string that is equal for two values exactly when `==` on `serde_json::Value` is (which is
/// not `Hash`): compact JSON with object keys sorted (map equality ignores order) and float
/// zero written one way (`0.0 == -0.0`). Used to index merge keys and set members.
fn identity(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (n, (k, v)) in entries.into_iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (n, v) in items.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => out.push_str("0.0"),
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
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

    /// The indexed merge keeps what the per-item scan did: the first item with an equal key
    /// is the one merged or deleted (duplicates in the original included), sets add each new
    /// member once, and `$deleteFromPrimitiveList` removes every equal member.
    #[test]
    fn indexed_merge_keeps_first_match_semantics() {
        let original = json!({"metadata": {"finalizers": ["x", "y"]}, "spec": {"containers": [
            {"name": "a", "v": 1}, {"name": "a", "v": 2}, {"name": "b"}]}});
        let patched = smp(
            Kind::Pod,
            original,
            json!({"metadata": {"finalizers": ["y", "z", "z"]}, "spec": {"containers": [
                {"name": "a", "$patch": "delete"}, {"name": "a", "x": 1}, {"name": "c"},
                {"name": "c", "y": 2}]}}),
        );
        assert_eq!(
            patched,
            json!({"metadata": {"finalizers": ["x", "y", "z"]}, "spec": {"containers": [
                {"name": "a", "v": 2, "x": 1}, {"name": "b"}, {"name": "c", "y": 2}]}})
        );
        let removed = smp(
            Kind::Pod,
            json!({"metadata": {"finalizers": ["x", "y", "x"]}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
        );
        assert_eq!(removed, json!({"metadata": {"finalizers": ["y"]}}));
        assert_eq!(identity(&json!(0.0)), identity(&json!(-0.0)));
        assert_ne!(identity(&json!(1)), identity(&json!(1.0)));
        assert_ne!(identity(&json!("1")), identity(&json!(1)));
    }

    /// The attack: 60,000 containers in one patch. Each item is found through the index, so
    /// this is linear (it was 60,000 x 60,000 comparisons).
    #[test]
    fn a_sixty_thousand_item_merge_is_applied() {
        let items: Vec<Value> = (0..60_000)
            .map(|i| json!({"name": format!("c{i}"), "image": "x"}))
            .collect();
        let patched = smp(
            Kind::Pod,
            json!({"spec": {"containers": [{"name": "c0", "image": "old"}]}}),
            json!({"spec": {"containers": items}}),
        );
        let containers = patched["spec"]["containers"].as_array().expect("list");
        assert_eq!(containers.len(), 60_000);
        assert_eq!(containers[0], json!({"name": "c0", "image": "x"}));
        assert_eq!(containers[59_999]["name"], "c59999");
    }

    #[test]
    fn json_sizes_stop_early() {
        let v = json!({"a": [1, true, null, "xy"], "b": {}});
        assert_eq!(json_size_within(&v, 1000), Some(v.to_string().len()));
        assert_eq!(json_size_within(&v, 5), None);
    }
}
