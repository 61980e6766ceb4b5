//! Defaulting and validation of the kinds other than Service (see `service.rs`).

use std::net::IpAddr;

use serde_json::{json, Map, Value};

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

/// Per-kind rules (Services are validated in `service.rs`).
pub fn validate_object(kind: Kind, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match kind {
        Kind::Pod => {
            if let Some(spec) = obj.get("spec") {
                validate_pod_spec(spec, "spec", &mut errs);
            } else {
                errs.push(FieldError::required("spec", ""));
            }
        }
        Kind::Deployment | Kind::ReplicaSet | Kind::ReplicationController => {
            validate_workload(kind, obj, &mut errs)
        }
        Kind::EndpointSlice => validate_endpoint_slice(obj, &mut errs),
        Kind::Endpoints => validate_endpoints(obj, &mut errs),
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
    let mut seen = Vec::new();
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
        seen.push(name);
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

fn validate_endpoint_slice(obj: &Value, errs: &mut Vec<FieldError>) {
    const TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];
    let address_type = obj.get("addressType").and_then(Value::as_str).unwrap_or("");
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
    if endpoints.map_or(0, Vec::len) > 1000 {
        errs.push(FieldError::too_long("endpoints", 1000));
    }
    for (i, ep) in endpoints.into_iter().flatten().enumerate() {
        let addresses = ep.get("addresses").and_then(Value::as_array);
        match addresses.map_or(0, Vec::len) {
            0 => errs.push(FieldError::required(
                format!("endpoints[{i}].addresses"),
                "must contain at least 1 address",
            )),
            1..=100 => {}
            _ => errs.push(FieldError::too_long(
                format!("endpoints[{i}].addresses"),
                100,
            )),
        }
        for (j, a) in addresses.into_iter().flatten().enumerate() {
            let address = a.as_str().unwrap_or("");
            if TYPES.contains(&address_type) {
                if let Err(why) = validate_address(address, address_type) {
                    errs.push(FieldError::invalid(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{address:?}"),
                        why,
                    ));
                }
            }
        }
    }
    let ports = obj.get("ports").and_then(Value::as_array);
    if ports.map_or(0, Vec::len) > 100 {
        errs.push(FieldError::too_long("ports", 100));
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

fn validate_endpoints(obj: &Value, errs: &mut Vec<FieldError>) {
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
                let ip = a.get("ip").and_then(Value::as_str).unwrap_or("");
                if ip.parse::<IpAddr>().is_err() {
                    errs.push(FieldError::invalid(
                        format!("subsets[{i}].{list}[{j}].ip"),
                        format!("{ip:?}"),
                        "must be a valid IP address",
                    ));
                }
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
