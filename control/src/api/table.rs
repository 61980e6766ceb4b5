//! Server-side printing: the `Table` kubectl asks for (`Accept: application/json;as=Table`),
//! with the columns kube-apiserver prints for each kind.

use serde_json::{json, Value};

use super::resources::{Kind, ResourceInfo};

struct Column {
    name: &'static str,
    kind: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind: "string",
        priority: 0,
        description,
    }
}

const fn wide(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind: "string",
        priority: 1,
        description,
    }
}

const NAME: Column = Column {
    name: "Name",
    kind: "string",
    priority: 0,
    description: "Name must be unique within a namespace.",
};
const AGE: Column = col(
    "Age",
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

fn columns(kind: Kind) -> Vec<Column> {
    match kind {
        Kind::Service => vec![
            NAME,
            col("Type", "type determines how the Service is exposed."),
            col("Cluster-IP", "clusterIP is the IP address of the service."),
            col("External-IP", "externalIPs and load-balancer ingress addresses."),
            col("Port(s)", "The list of ports that are exposed by this service."),
            AGE,
            wide("Selector", "Route service traffic to pods with label keys and values matching this selector."),
        ],
        Kind::Namespace => vec![NAME, col("Status", "The status of the namespace"), AGE],
        Kind::Pod => vec![
            NAME,
            col("Ready", "The aggregate readiness state of this pod for accepting traffic."),
            col("Status", "The aggregate status of the containers in this pod."),
            Column { kind: "integer", ..col("Restarts", "The number of times the containers in this pod have been restarted.") },
            AGE,
            wide("IP", "IP address allocated to the pod."),
            wide("Node", "Name of the Node this pod is scheduled on."),
        ],
        Kind::Node => vec![
            NAME,
            col("Status", "The status of the node"),
            col("Roles", "The roles of the node"),
            AGE,
            col("Version", "Kubelet Version reported by the node."),
            wide("Internal-IP", "List of addresses reachable to the node."),
            wide("OS-Image", "OS image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy))."),
            wide("Kernel-Version", "Kernel version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64)."),
            wide("Container-Runtime", "Container runtime version reported by the node through runtime remote API (e.g. containerd://1.4.2)."),
        ],
        Kind::Endpoints => vec![NAME, col("Endpoints", "Endpoints of the service"), AGE],
        Kind::EndpointSlice => vec![
            NAME,
            col("AddressType", "The type of addresses in this slice."),
            col("Ports", "The ports of the endpoints."),
            col("Endpoints", "The addresses of the endpoints."),
            AGE,
        ],
        Kind::Deployment => vec![
            NAME,
            col("Ready", "Number of the pod with ready state"),
            Column { kind: "integer", ..col("Up-to-date", "Total number of non-terminated pods targeted by this deployment that have the desired template spec.") },
            Column { kind: "integer", ..col("Available", "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.") },
            AGE,
            wide("Containers", "Names of each container in the template."),
            wide("Images", "Images referenced by each container in the template."),
            wide("Selector", "Label selector for pods. Pods matching the selector are managed by this controller."),
        ],
        Kind::Event => vec![
            col("Last Seen", "The time of the event's latest occurrence."),
            col("Type", "Normal or Warning."),
            col("Reason", "Why the event happened, in one word."),
            col("Object", "The object the event is about."),
            col("Message", "What happened."),
            wide("Source", "The component that reported it."),
            Column { kind: "integer", ..wide("Count", "How many times it happened.") },
            wide("Name", "The event's name."),
        ],
        Kind::ReplicaSet | Kind::ReplicationController => vec![
            NAME,
            Column { kind: "integer", ..col("Desired", "Number of desired pods.") },
            Column { kind: "integer", ..col("Current", "Number of actual pods.") },
            Column { kind: "integer", ..col("Ready", "Number of ready pods.") },
            AGE,
            wide("Containers", "Names of each container in the template."),
            wide("Images", "Images referenced by each container in the template."),
            wide("Selector", "Label selector for pods. Pods matching the selector are managed by this controller."),
        ],
    }
}

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn int(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn list<'a>(obj: &'a Value, pointer: &str) -> &'a [Value] {
    obj.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

/// Like kubectl's `duration.HumanDuration`: `42s`, `5m3s`, `3h`, `2d5h`.
pub fn human_age(created: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let Ok(created) = chrono::DateTime::parse_from_rfc3339(created) else {
        return "<unknown>".into();
    };
    let s = (now - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => format!("{m}m{}s", s % 60).replace("m0s", "m"),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => format!("{h}h{}m", m % 60).replace("h0m", "h"),
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 => format!("{d}d{}h", h % 24).replace("d0h", "d"),
        _ if d < 365 * 2 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

fn cells(kind: Kind, obj: &Value, age: String) -> Vec<Value> {
    let name = json!(text(obj, "/metadata/name"));
    match kind {
        Kind::Service => {
            let ty = match text(obj, "/spec/type") {
                "" => "ClusterIP",
                t => t,
            };
            let mut external: Vec<String> = list(obj, "/status/loadBalancer/ingress")
                .iter()
                .filter_map(|i| {
                    i.get("ip")
                        .or(i.get("hostname"))
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .collect();
            external.extend(
                list(obj, "/spec/externalIPs")
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from),
            );
            let external = match (ty, external.is_empty()) {
                ("ExternalName", _) => text(obj, "/spec/externalName").to_string(),
                ("LoadBalancer", true) => "<pending>".into(),
                _ => or_none(external.join(",")),
            };
            let ports = list(obj, "/spec/ports")
                .iter()
                .map(|p| {
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(node) => format!("{port}:{node}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            let selector = super::selector::format_labels(
                obj.pointer("/spec/selector").and_then(Value::as_object),
            );
            let cluster_ip = or_none(text(obj, "/spec/clusterIP").to_string());
            vec![
                name,
                json!(ty),
                json!(cluster_ip),
                json!(external),
                json!(or_none(ports)),
                json!(age),
                json!(or_none(selector)),
            ]
        }
        Kind::Namespace => vec![name, json!(text(obj, "/status/phase")), json!(age)],
        Kind::Pod => {
            let statuses = list(obj, "/status/containerStatuses");
            let total = list(obj, "/spec/containers").len();
            let ready = statuses
                .iter()
                .filter(|s| s.get("ready") == Some(&json!(true)))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
                .sum();
            let mut status = match text(obj, "/status/reason") {
                "" => text(obj, "/status/phase").to_string(),
                reason => reason.to_string(),
            };
            // As kubectl prints it: a container's waiting or terminated reason wins.
            for s in statuses.iter().rev() {
                let reason = |state: &str| {
                    s.pointer(&format!("/state/{state}/reason"))
                        .and_then(Value::as_str)
                        .filter(|r| !r.is_empty())
                        .map(String::from)
                };
                if let Some(r) = reason("waiting").or_else(|| reason("terminated")) {
                    status = r;
                }
            }
            if obj
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null())
            {
                status = "Terminating".into();
            }
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts),
                json!(age),
                json!(or_none(text(obj, "/status/podIP").to_string())),
                json!(or_none(text(obj, "/spec/nodeName").to_string())),
            ]
        }
        Kind::Node => {
            let ready = list(obj, "/status/conditions")
                .iter()
                .find(|c| c.get("type") == Some(&json!("Ready")))
                .map(|c| c.get("status") == Some(&json!("True")));
            let mut status = match ready {
                Some(true) => "Ready".to_string(),
                Some(false) => "NotReady".to_string(),
                None => "Unknown".to_string(),
            };
            if obj.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let roles = obj
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let internal = list(obj, "/status/addresses")
                .iter()
                .find(|a| a.get("type") == Some(&json!("InternalIP")))
                .and_then(|a| a.get("address").and_then(Value::as_str))
                .unwrap_or("<none>");
            vec![
                name,
                json!(status),
                json!(or_none(roles)),
                json!(age),
                json!(text(obj, "/status/nodeInfo/kubeletVersion")),
                json!(internal),
                json!(or_none(text(obj, "/status/nodeInfo/osImage").to_string())),
                json!(or_none(
                    text(obj, "/status/nodeInfo/kernelVersion").to_string()
                )),
                json!(or_none(
                    text(obj, "/status/nodeInfo/containerRuntimeVersion").to_string()
                )),
            ]
        }
        Kind::Endpoints => {
            let mut all = Vec::new();
            for subset in list(obj, "/subsets") {
                let ports: Vec<i64> = list(subset, "/ports")
                    .iter()
                    .filter_map(|p| p.get("port").and_then(Value::as_i64))
                    .collect();
                for address in list(subset, "/addresses") {
                    let ip = address.get("ip").and_then(Value::as_str).unwrap_or("");
                    if ports.is_empty() {
                        all.push(ip.to_string());
                    }
                    all.extend(ports.iter().map(|p| format!("{ip}:{p}")));
                }
            }
            vec![name, json!(summarize(all)), json!(age)]
        }
        Kind::EndpointSlice => {
            let ports = list(obj, "/ports")
                .iter()
                .map(|p| {
                    p.get("port")
                        .and_then(Value::as_i64)
                        .map_or("<unset>".to_string(), |p| p.to_string())
                })
                .collect::<Vec<_>>()
                .join(",");
            let addresses: Vec<String> = list(obj, "/endpoints")
                .iter()
                .flat_map(|e| {
                    list(e, "/addresses")
                        .iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                })
                .collect();
            vec![
                name,
                json!(text(obj, "/addressType")),
                json!(or_none(ports)),
                json!(summarize(addresses)),
                json!(age),
            ]
        }
        Kind::Deployment => vec![
            name,
            json!(format!(
                "{}/{}",
                int(obj, "/status/readyReplicas"),
                int(obj, "/spec/replicas")
            )),
            json!(int(obj, "/status/updatedReplicas")),
            json!(int(obj, "/status/availableReplicas")),
            json!(age),
        ]
        .into_iter()
        .chain(template_cells(obj))
        .collect(),
        Kind::Event => {
            let last = [
                "/lastTimestamp",
                "/eventTime",
                "/firstTimestamp",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .map(|p| text(obj, p))
            .find(|t| !t.is_empty())
            .unwrap_or("");
            let object = format!(
                "{}/{}",
                text(obj, "/involvedObject/kind").to_lowercase(),
                text(obj, "/involvedObject/name")
            );
            let source = match (text(obj, "/source/component"), text(obj, "/source/host")) {
                ("", _) => text(obj, "/reportingComponent").to_string(),
                (c, "") => c.to_string(),
                (c, h) => format!("{c}, {h}"),
            };
            vec![
                json!(human_age(last, chrono::Utc::now())),
                json!(text(obj, "/type")),
                json!(text(obj, "/reason")),
                json!(object),
                json!(text(obj, "/message")),
                json!(source),
                json!(int(obj, "/count").max(1)),
                name,
            ]
        }
        Kind::ReplicaSet | Kind::ReplicationController => vec![
            name,
            json!(int(obj, "/spec/replicas")),
            json!(int(obj, "/status/replicas")),
            json!(int(obj, "/status/readyReplicas")),
            json!(age),
        ]
        .into_iter()
        .chain(template_cells(obj))
        .collect(),
    }
}

/// A workload's wide cells: its template's containers and images, and its selector (a label
/// selector's `matchLabels` and `matchExpressions`, or a ReplicationController's plain map).
fn template_cells(obj: &Value) -> [Value; 3] {
    let containers = list(obj, "/spec/template/spec/containers");
    let names: Vec<&str> = containers
        .iter()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let images: Vec<&str> = containers
        .iter()
        .filter_map(|c| c.get("image").and_then(Value::as_str))
        .collect();
    let selector = obj.pointer("/spec/selector");
    let labels = selector
        .and_then(|s| s.get("matchLabels"))
        .or(selector.filter(|s| s.get("matchExpressions").is_none()))
        .and_then(Value::as_object);
    let mut text = super::selector::format_labels(labels);
    for e in selector
        .and_then(|s| s.get("matchExpressions"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let key = e["key"].as_str().unwrap_or_default();
        let part = match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        };
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(&part);
    }
    [
        json!(or_none(names.join(","))),
        json!(or_none(images.join(","))),
        json!(or_none(text)),
    ]
}

/// kubectl shows three addresses and how many more.
fn summarize(items: Vec<String>) -> String {
    match items.len() {
        0 => "<none>".into(),
        n if n <= 3 => items.join(","),
        n => format!("{} + {} more...", items[..3].join(","), n - 3),
    }
}

/// What each row carries besides its cells (`?includeObject=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> Result<Self, super::ApiError> {
        match value {
            None | Some("") | Some("Metadata") => Ok(IncludeObject::Metadata),
            Some("None") => Ok(IncludeObject::None),
            Some("Object") => Ok(IncludeObject::Object),
            Some(other) => Err(super::ApiError::bad_request(format!(
                "includeObject: unsupported value {other:?}: allowed values: \"None\", \"Metadata\", \"Object\""
            ))),
        }
    }
}

/// A `meta.k8s.io/v1` Table of `objects`; `headers` false leaves out the column definitions
/// (watch events after the first).
pub fn table(
    resource: &ResourceInfo,
    objects: &[Value],
    resource_version: &str,
    include: IncludeObject,
    headers: bool,
) -> Value {
    let now = chrono::Utc::now();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let age = human_age(text(obj, "/metadata/creationTimestamp"), now);
            let mut row = json!({"cells": cells(resource.kind, obj, age)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Object => row["object"] = obj.clone(),
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
            }
            row
        })
        .collect();
    let definitions: Vec<Value> = if headers {
        columns(resource.kind)
            .iter()
            .map(|c| {
                let format = if c.name == "Name" { "name" } else { "" };
                json!({"name": c.name, "type": c.kind, "format": format, "description": c.description, "priority": c.priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::by_kind;

    #[test]
    fn service_rows_look_like_kubectl() {
        let svc = json!({"metadata": {"name": "web", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}], "selector": {"app": "web"}}});
        let t = table(
            by_kind(Kind::Service),
            &[svc],
            "7",
            IncludeObject::None,
            true,
        );
        let cells = &t["rows"][0]["cells"];
        assert_eq!(
            cells.as_array().expect("cells")[..5],
            [
                json!("web"),
                json!("NodePort"),
                json!("10.96.0.10"),
                json!("<none>"),
                json!("80:30080/TCP,53/UDP")
            ]
        );
        assert_eq!(t["columnDefinitions"].as_array().map(Vec::len), Some(7));
    }

    #[test]
    fn ages() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T10:00:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(human_age("2026-01-01T09:59:15Z", now), "45s");
        assert_eq!(human_age("2026-01-01T09:55:00Z", now), "5m");
        assert_eq!(human_age("2026-01-01T09:54:30Z", now), "5m30s");
        assert_eq!(human_age("2025-12-30T10:00:00Z", now), "2d");
    }
}
