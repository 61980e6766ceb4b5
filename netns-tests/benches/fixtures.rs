//! The Services and EndpointSlices the backend benchmarks load: N Services, each with one
//! port and `ENDPOINTS` ready endpoints on another node.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

pub const ENDPOINTS: usize = 10;

/// Sorts `samples` and returns the median.
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

pub fn service(i: usize) -> Service {
    serde_json::from_value(json!({"metadata": {"name": format!("svc-{i:05}"), "namespace": "bench"},
        "spec": {"clusterIP": format!("198.18.{}.{}", 128 + i / 250, i % 250 + 1), "ports": [{"name": "http", "port": 80}]}}))
    .expect("service")
}

/// Service `i`'s slice; `shift` moves its endpoints (a changed endpoint for `shift` 1).
pub fn slice(i: usize, shift: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|e| {
            let n = i * ENDPOINTS + e + shift;
            json!({"addresses": [format!("198.19.{}.{}", n / 250 % 250, n % 250 + 1)], "conditions": {"ready": true}, "nodeName": "other"})
        })
        .collect();
    serde_json::from_value(json!({"metadata": {"name": format!("svc-{i:05}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}))
    .expect("slice")
}
