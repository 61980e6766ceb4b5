//! Defaulting and validation of the kinds other than Service (see `service.rs`).

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{json, Map, Value};

use super::ip::{self, Use};
use super::names;
use crate::api::resources::Kind;
use crate::api::FieldError;

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

/// Fills in what kube-apiserver defaults, so stored objects look like a real cluster's.
pub fn default_object(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Pod => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
        }
        Kind::Deployment => {
            let spec = object_at(obj, "spec");
            spec.entry("replicas").or_insert(json!(1));
            spec.entry("revisionHistoryLimit").or_insert(json!(10));
            spec.entry("progressDeadlineSeconds").or_insert(json!(600));
            let strategy = spec.entry("strategy").or_insert(json!({}));
            if let Some(strategy) = strategy.as_object_mut() {
                strategy.entry("type").or_insert(json!("RollingUpdate"));
                if strategy.get("type") == Some(&json!("RollingUpdate")) {
                    let rolling = strategy.entry("rollingUpdate").or_insert(json!({}));
                    if let Some(rolling) = rolling.as_object_mut() {
                        rolling.entry("maxSurge").or_insert(json!("25%"));
                        rolling.entry("maxUnavailable").or_insert(json!("25%"));
                    }
                }
            }
            default_template(obj);
        }
        Kind::ReplicaSet => {
            object_at(obj, "spec").entry("replicas").or_insert(json!(1));
            default_template(obj);
        }
        Kind::ReplicationController => {
            let template_labels = obj.pointer("/spec/template/metadata/labels").cloned();
            let spec = object_at(obj, "spec");
            spec.entry("replicas").or_insert(json!(1));
            if let Some(labels) = template_labels {
                spec.entry("selector").or_insert(labels);
            }
            default_template(obj);
        }
        _ => {}
    }
}

fn object_at<'a>(obj: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let root = obj
        .as_object_mut()
        .expect("decoded objects are JSON objects");
    let entry = root.entry(key).or_insert(json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    entry.as_object_mut().expect("made an object above")
}

fn default_template(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        default_pod_spec(spec);
    }
}

fn default_pod_spec(spec: &mut Value) {
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    spec.entry("restartPolicy").or_insert(json!("Always"));
    spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    spec.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    spec.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    spec.entry("securityContext").or_insert(json!({}));
    spec.entry("enableServiceLinks").or_insert(json!(true));
    for list in ["containers", "initContainers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for container in containers.iter_mut().filter_map(Value::as_object_mut) {
            let latest = container
                .get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
            container
                .entry("imagePullPolicy")
                .or_insert(json!(if latest { "Always" } else { "IfNotPresent" }));
            container
                .entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            container
                .entry("terminationMessagePolicy")
                .or_insert(json!("File"));
            if let Some(ports) = container.get_mut("ports").and_then(Value::as_array_mut) {
                for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                    port.entry("protocol").or_insert(json!("TCP"));
                }
            }
        }
    }
}

/// Per-kind rules (Services are validated in `service.rs`). `old` is the stored object on
/// update (immutable fields and addresses already stored are judged against it).
pub fn validate_object(kind: Kind, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match kind {
        Kind::Pod => {
            if let Some(spec) = obj.get("spec") {
                validate_pod_spec(spec, "spec", &mut errs);
            } else {
                errs.push(FieldError::required("spec", ""));
            }
            validate_pod_status_ips(obj, old, &mut errs);
            if let Some(old) = old {
                validate_pod_update(obj, old, &mut errs);
            }
        }
        Kind::Deployment | Kind::ReplicaSet | Kind::ReplicationController => {
            validate_workload(kind, obj, &mut errs)
        }
        Kind::EndpointSlice => validate_endpoint_slice(obj, old, &mut errs),
        Kind::Endpoints => validate_endpoints(obj, old, &mut errs),
        Kind::Node => {
            if let Some(cidr) = obj.pointer("/spec/podCIDR").and_then(Value::as_str) {
                if cidr.parse::<ipnet::IpNet>().is_err() {
                    errs.push(FieldError::invalid(
                        "spec.podCIDR",
                        format!("{cidr:?}"),
                        "must be a valid CIDR",
                    ));
                }
            }
        }
        Kind::Event => {
            if obj.get("involvedObject").is_none_or(Value::is_null) {
                errs.push(FieldError::required("involvedObject", ""));
            }
        }
        Kind::Namespace | Kind::Service => {}
    }
    errs
}

fn validate_port_number(
    value: Option<&Value>,
    field: String,
    errs: &mut Vec<FieldError>,
    allow_zero: bool,
) {
    match value.and_then(Value::as_i64) {
        None => errs.push(FieldError::required(field, "")),
        Some(p) if (allow_zero && p == 0) || (1..=65535).contains(&p) => {}
        Some(p) => errs.push(FieldError::invalid(
            field,
            p,
            "must be between 1 and 65535, inclusive",
        )),
    }
}

fn validate_protocol(value: Option<&Value>, field: String, errs: &mut Vec<FieldError>) {
    if let Some(p) = value.and_then(Value::as_str) {
        if !PROTOCOLS.contains(&p) {
            errs.push(FieldError::not_supported(field, p, PROTOCOLS));
        }
    }
}

fn validate_pod_spec(spec: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let containers = spec.get("containers").and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        errs.push(FieldError::required(format!("{path}.containers"), ""));
    }
    // A set: a 60k-container patch must not cost 60k x 60k name comparisons.
    let mut seen = HashSet::new();
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let at = format!("{path}.containers[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name"), ""));
        } else if let Err(why) = names::dns1123_label(name) {
            errs.push(FieldError::invalid(
                format!("{at}.name"),
                format!("{name:?}"),
                why,
            ));
        } else if seen.contains(&name) {
            errs.push(FieldError::duplicate(
                format!("{at}.name"),
                format!("{name:?}"),
            ));
        }
        seen.insert(name);
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.push(FieldError::required(format!("{at}.image"), ""));
        }
        for (j, port) in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            validate_port_number(
                port.get("containerPort"),
                format!("{at}.ports[{j}].containerPort"),
                errs,
                false,
            );
            validate_protocol(
                port.get("protocol"),
                format!("{at}.ports[{j}].protocol"),
                errs,
            );
        }
    }
    if let Some(policy) = spec.get("restartPolicy").and_then(Value::as_str) {
        const POLICIES: &[&str] = &["Always", "Never", "OnFailure"];
        if !POLICIES.contains(&policy) {
            errs.push(FieldError::not_supported(
                format!("{path}.restartPolicy"),
                policy,
                POLICIES,
            ));
        }
    }
}

fn validate_workload(kind: Kind, obj: &Value, errs: &mut Vec<FieldError>) {
    if let Some(replicas) = obj.pointer("/spec/replicas").and_then(Value::as_i64) {
        if replicas < 0 {
            errs.push(FieldError::invalid(
                "spec.replicas",
                replicas,
                "must be greater than or equal to 0",
            ));
        }
    }
    let template_labels = obj
        .pointer("/spec/template/metadata/labels")
        .and_then(Value::as_object);
    // Deployments and ReplicaSets select with a LabelSelector, RCs with a plain map.
    let selector = if kind == Kind::ReplicationController {
        obj.pointer("/spec/selector").and_then(Value::as_object)
    } else {
        obj.pointer("/spec/selector/matchLabels")
            .and_then(Value::as_object)
    };
    let has_expressions = obj
        .pointer("/spec/selector/matchExpressions")
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty());
    if selector.is_none_or(Map::is_empty) && !has_expressions {
        errs.push(FieldError::required("spec.selector", ""));
    } else if let Some(selector) = selector {
        let matches = selector
            .iter()
            .all(|(k, v)| template_labels.and_then(|l| l.get(k)) == Some(v));
        if !matches {
            errs.push(FieldError::invalid(
                "spec.template.metadata.labels",
                Value::Object(template_labels.cloned().unwrap_or_default()),
                "`selector` does not match template `labels`",
            ));
        }
    }
    match obj.pointer("/spec/template/spec") {
        Some(spec) => validate_pod_spec(spec, "spec.template.spec", errs),
        None => errs.push(FieldError::required("spec.template", "")),
    }
    if kind == Kind::Deployment {
        if let Some(t) = obj.pointer("/spec/strategy/type").and_then(Value::as_str) {
            const TYPES: &[&str] = &["Recreate", "RollingUpdate"];
            if !TYPES.contains(&t) {
                errs.push(FieldError::not_supported("spec.strategy.type", t, TYPES));
            }
        }
    }
}

fn validate_address(address: &str, address_type: &str) -> Result<(), String> {
    match address_type {
        "IPv4" => match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => Ok(()),
            _ => Err("must be a valid IPv4 address".into()),
        },
        "IPv6" => match address.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => Ok(()),
            _ => Err("must be a valid IPv6 address".into()),
        },
        _ => names::dns1123_subdomain(address),
    }
}

/// Every string an array of strings at `pointer` holds, in every element of `list`.
fn strings_at(list: Option<&Value>, inner: &str) -> HashSet<String> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| item.pointer(inner))
        .flat_map(|v| match v {
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => Vec::new(),
        })
        .collect()
}

/// kube's `pkg/apis/discovery/validation` (`ValidateEndpointSlice{Create,Update}`).
fn validate_endpoint_slice(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    const TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];
    let address_type = obj.get("addressType").and_then(Value::as_str).unwrap_or("");
    // `ValidateEndpointSliceUpdate`: apimachinery's ValidateImmutableField.
    if let Some(before) = old
        .and_then(|o| o.get("addressType"))
        .and_then(Value::as_str)
    {
        if before != address_type {
            errs.push(FieldError::invalid(
                "addressType",
                format!("{address_type:?}"),
                "field is immutable",
            ));
        }
    }
    let stored = strings_at(old.and_then(|o| o.get("endpoints")), "/addresses");
    if address_type.is_empty() {
        errs.push(FieldError::required("addressType", ""));
    } else if !TYPES.contains(&address_type) {
        errs.push(FieldError::not_supported(
            "addressType",
            address_type,
            TYPES,
        ));
    }
    let endpoints = obj.get("endpoints").and_then(Value::as_array);
    let count = endpoints.map_or(0, Vec::len);
    if count > 1000 {
        errs.push(FieldError::too_many("endpoints", count, 1000));
    }
    for (i, ep) in endpoints.into_iter().flatten().enumerate() {
        let addresses = ep.get("addresses").and_then(Value::as_array);
        match addresses.map_or(0, Vec::len) {
            0 => errs.push(FieldError::required(
                format!("endpoints[{i}].addresses"),
                "must contain at least 1 address",
            )),
            1..=100 => {}
            n => errs.push(FieldError::too_many(
                format!("endpoints[{i}].addresses"),
                n,
                100,
            )),
        }
        for (j, a) in addresses.into_iter().flatten().enumerate() {
            let address = a.as_str().unwrap_or("");
            let field = format!("endpoints[{i}].addresses[{j}]");
            if TYPES.contains(&address_type) {
                if let Err(why) = validate_address(address, address_type) {
                    errs.push(FieldError::invalid(field, format!("{address:?}"), why));
                } else if address_type != "FQDN" {
                    ip::check(field, address, Use::Programmed, &stored, errs);
                }
            }
        }
    }
    // 20,000 since kubernetes/kubernetes#99795 (it was 100, and the EndpointSlice controller
    // then could not publish a Service with more ports: kubernetes/kubernetes#99382). A
    // Service's ports are not bounded, so a slice is refused only past this.
    const MAX_PORTS: usize = 20_000;
    let ports = obj.get("ports").and_then(Value::as_array);
    let count = ports.map_or(0, Vec::len);
    if count > MAX_PORTS {
        errs.push(FieldError::too_many("ports", count, MAX_PORTS));
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        if let Some(port) = p.get("port") {
            validate_port_number(Some(port), format!("ports[{i}].port"), errs, true);
        }
        validate_protocol(p.get("protocol"), format!("ports[{i}].protocol"), errs);
        if let Some(name) = p
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            if let Err(why) = names::dns1123_label(name) {
                errs.push(FieldError::invalid(
                    format!("ports[{i}].name"),
                    format!("{name:?}"),
                    why,
                ));
            }
        }
    }
}

/// kube's `ValidateEndpoints` → `validateEndpointAddress` → `ValidateEndpointIP`.
fn validate_endpoints(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let old_subsets = old.and_then(|o| o.get("subsets"));
    let mut stored = HashSet::new();
    for subset in old_subsets.and_then(Value::as_array).into_iter().flatten() {
        for list in ["addresses", "notReadyAddresses"] {
            stored.extend(strings_at(subset.get(list), "/ip"));
        }
    }
    for (i, subset) in obj
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for list in ["addresses", "notReadyAddresses"] {
            for (j, a) in subset
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let address = a.get("ip").and_then(Value::as_str).unwrap_or("");
                ip::check(
                    format!("subsets[{i}].{list}[{j}].ip"),
                    address,
                    Use::Programmed,
                    &stored,
                    errs,
                );
            }
        }
        for (j, p) in subset
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            validate_port_number(
                p.get("port"),
                format!("subsets[{i}].ports[{j}].port"),
                errs,
                false,
            );
            validate_protocol(
                p.get("protocol"),
                format!("subsets[{i}].ports[{j}].protocol"),
                errs,
            );
        }
    }
}

/// `status.podIP(s)` and `status.hostIP(s)` (kube's `validatePodIPs` / `validateHostIPs`):
/// anyone who may write a pod's status decides what the EndpointSlice controller publishes.
fn validate_pod_status_ips(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    for (single, plural) in [("podIP", "podIPs"), ("hostIP", "hostIPs")] {
        let old_status = old.and_then(|o| o.get("status"));
        let mut stored = strings_at(old_status.and_then(|s| s.get(plural)), "/ip");
        if let Some(ip) = old_status
            .and_then(|s| s.get(single))
            .and_then(Value::as_str)
        {
            stored.insert(ip.to_string());
        }
        let status = obj.get("status");
        if let Some(value) = status
            .and_then(|s| s.get(single))
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
        {
            ip::check(format!("status.{single}"), value, Use::Host, &stored, errs);
        }
        let list = status.and_then(|s| s.get(plural)).and_then(Value::as_array);
        for (i, entry) in list.into_iter().flatten().enumerate() {
            let value = entry.get("ip").and_then(Value::as_str).unwrap_or("");
            ip::check(
                format!("status.{plural}[{i}].ip"),
                value,
                Use::Host,
                &stored,
                errs,
            );
        }
        let first = list
            .and_then(|l| l.first())
            .and_then(|e| e.get("ip"))
            .and_then(Value::as_str);
        let lone = status.and_then(|s| s.get(single)).and_then(Value::as_str);
        if let (Some(first), Some(lone)) = (first, lone) {
            if first != lone {
                errs.push(FieldError::invalid(
                    format!("status.{plural}[0].ip"),
                    format!("{first:?}"),
                    format!("must match status.{single}"),
                ));
            }
        }
    }
}

/// kube's `ValidatePodUpdate`: a pod's spec is immutable but for a few fields; `nodeName` is
/// set only through the `binding` subresource (which does not come here).
fn validate_pod_update(obj: &Value, old: &Value, errs: &mut Vec<FieldError>) {
    let (Some(new_spec), Some(old_spec)) = (obj.get("spec"), old.get("spec")) else {
        return;
    };
    // Tolerations: only additions (`validateOnlyAddedTolerations`).
    let old_tolerations = old_spec.get("tolerations").and_then(Value::as_array);
    let new_tolerations = new_spec.get("tolerations").and_then(Value::as_array);
    let without_seconds = |t: &Value| {
        let mut t = t.clone();
        if let Some(m) = t.as_object_mut() {
            m.remove("tolerationSeconds");
        }
        t
    };
    for (i, t) in old_tolerations.into_iter().flatten().enumerate() {
        let kept = new_tolerations
            .is_some_and(|n| n.iter().any(|x| without_seconds(x) == without_seconds(t)));
        if !kept {
            errs.push(FieldError::forbidden(
                format!("spec.tolerations[{i}]"),
                "existing toleration can not be modified except its tolerationSeconds",
            ));
        }
    }
    // The spec with every mutable field taken from the stored pod must equal the stored spec.
    let mut munged = new_spec.clone();
    for list in ["containers", "initContainers"] {
        let old_list = old_spec.get(list).and_then(Value::as_array);
        let Some(new_list) = munged.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        if old_list.map_or(0, Vec::len) != new_list.len() {
            continue; // a different number of containers differs below anyway
        }
        for (new_c, old_c) in new_list.iter_mut().zip(old_list.into_iter().flatten()) {
            if let Some(c) = new_c.as_object_mut() {
                match old_c.get("image") {
                    Some(image) => c.insert("image".into(), image.clone()),
                    None => c.remove("image"),
                };
            }
        }
    }
    if let Some(m) = munged.as_object_mut() {
        let old_grace = old_spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_i64);
        let new_grace = m
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_i64);
        // Upstream lets a negative grace period (from old clients) become 1, nothing else.
        let grace_fix = old_grace.is_some_and(|g| g < 0) && new_grace == Some(1);
        let mut keep = vec!["activeDeadlineSeconds", "tolerations"];
        if grace_fix {
            keep.push("terminationGracePeriodSeconds");
        }
        for field in keep {
            match old_spec.get(field) {
                Some(v) => m.insert(field.into(), v.clone()),
                None => m.remove(field),
            };
        }
    }
    if &munged != old_spec {
        let changed: Vec<&str> = new_spec
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .chain(
                old_spec
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.as_str()),
            )
            .filter(|k| munged.get(*k) != old_spec.get(*k))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        errs.push(FieldError::forbidden(
            "spec",
            format!(
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative) (changed: spec.{})",
                changed.join(", spec.")
            ),
        ));
    }
}
