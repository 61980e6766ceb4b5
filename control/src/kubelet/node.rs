//! The kubelet's Node: registration (labels, pod CIDRs, capacity, addresses, node info) and
//! the Ready heartbeat the node lifecycle controller watches.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};

use super::Config;
use crate::api::meta;
use crate::client::{Api, Client, ClientError, Patch};

pub const KUBELET_VERSION: &str = "v1.33.0-kpx";

/// The node conditions a healthy kubelet reports, with `now` as the heartbeat and
/// `transition` as the Ready condition's last transition.
pub fn conditions(now: &str, transition: &str) -> Value {
    let condition = |type_: &str, status: &str, reason: &str, message: &str, since: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": since})
    };
    json!([
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
            transition
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
            transition
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
            transition
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status",
            transition
        ),
    ])
}

/// The Node this kubelet registers (pure).
pub fn desired(config: &Config, now: &str) -> Value {
    let mut labels = json!({
        "kubernetes.io/hostname": config.node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "beta.kubernetes.io/os": "linux",
    });
    for (k, v) in &config.labels {
        labels[k] = json!(v);
    }
    let mut addresses: Vec<Value> = config
        .node_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": config.node_name}));
    let resources = json!({
        "cpu": config.capacity.cpu,
        "memory": config.capacity.memory,
        "pods": config.capacity.pods.to_string(),
        "ephemeral-storage": "10Gi",
    });
    let cidrs: Vec<String> = config.pod_cidrs.iter().map(ToString::to_string).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": config.node_name, "labels": labels},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": addresses,
            "conditions": conditions(now, now),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": config.kubelet_port}},
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64"),
                "osImage": "kpx-lab",
                "kernelVersion": kernel_version(),
                "containerRuntimeVersion": concat!("kpx://", env!("CARGO_PKG_VERSION")),
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    })
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Creates the Node, or takes over an existing one of the same name (labels merged, pod CIDRs
/// and status replaced), as kubelet does on restart.
pub async fn register(client: &Client, config: &Config) -> Result<(), ClientError> {
    let api = Api::<Node>::all(client.clone());
    let now = meta::now_rfc3339();
    let node = desired(config, &now);
    let typed: Node = serde_json::from_value(node.clone()).map_err(|e| ClientError::Decode {
        what: "the kubelet's Node".into(),
        message: e.to_string(),
    })?;
    match api.create(&typed).await {
        Ok(created) => {
            // Status is not written by a create (it is a subresource).
            api.patch_status(
                &config.node_name,
                Patch::Merge,
                &json!({"status": node["status"]}),
            )
            .await?;
            drop(created);
            Ok(())
        }
        Err(e) if e.is_conflict() || e.code() == Some(409) => {
            api.patch(
                &config.node_name,
                Patch::Merge,
                &json!({"metadata": {"labels": node["metadata"]["labels"]}, "spec": node["spec"]}),
            )
            .await?;
            api.patch_status(
                &config.node_name,
                Patch::Merge,
                &json!({"status": node["status"]}),
            )
            .await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// One heartbeat: the conditions with a fresh `lastHeartbeatTime`; the Ready transition time
/// moves only when Ready was not already True (after the node lifecycle marked it Unknown).
pub async fn heartbeat(client: &Client, name: &str) -> Result<(), ClientError> {
    let api = Api::<Node>::all(client.clone());
    let now = meta::now_rfc3339();
    let current = api.get(name).await?;
    let ready_since = current
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| now.clone());
    api.patch_status(
        name,
        Patch::Merge,
        &json!({"status": {"conditions": conditions(&now, &ready_since)}}),
    )
    .await?;
    Ok(())
}

/// The node's addresses as pods see them in `status.hostIPs`.
pub fn host_ips(ips: &[IpAddr]) -> Value {
    Value::Array(ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::Capacity;

    #[test]
    fn node_object_round_trips_and_names_its_cidrs() {
        let config = Config {
            node_name: "node-1".into(),
            node_ips: vec!["198.18.0.11".parse().expect("ip")],
            pod_cidrs: vec!["198.19.1.0/24".parse().expect("cidr")],
            labels: vec![("topology.kubernetes.io/zone".into(), "a".into())],
            capacity: Capacity {
                cpu: "2".into(),
                memory: "4Gi".into(),
                pods: 110,
            },
            ..Config::for_tests()
        };
        let value = desired(&config, "2026-01-01T00:00:00Z");
        let node: Node = serde_json::from_value(value).expect("a valid Node");
        let spec = node.spec.expect("spec");
        assert_eq!(spec.pod_cidr.as_deref(), Some("198.19.1.0/24"));
        let status = node.status.expect("status");
        assert_eq!(status.allocatable.expect("allocatable")["pods"].0, "110");
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(labels["topology.kubernetes.io/zone"], "a");
        assert_eq!(labels["kubernetes.io/hostname"], "node-1");
        let ready = status
            .conditions
            .expect("conditions")
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.status, "True");
    }
}
