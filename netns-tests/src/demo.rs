//! `kpx-lab demo`: the control plane end to end. Starts kpx-control on its embedded store,
//! creates a namespace, a Service and its EndpointSlice through the client, shows them, watches
//! a change arrive, and stops, leaving nothing behind.

use std::time::Instant;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpx_control::client::{Api, Client, ClientConfig, ListParams, Patch, WatchEvent};
use serde_json::json;

use crate::control_plane::ControlPlane;

const NAMESPACE: &str = "demo";

fn step(text: &str) {
    println!("\n==> {text}");
}

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("kpx-lab-demo-").tempdir()?;
    step(&format!(
        "starting kpx-control (embedded store in {})",
        dir.path().display()
    ));
    // This demo writes the Service's EndpointSlice itself, as a controller would; the built-in
    // EndpointSlice controller is off so the two do not both answer for it.
    let control = ControlPlane::start(dir.path(), &["--controllers", "none"])?;
    println!("    API at {}", control.url);
    let client = Client::new(&ClientConfig::from_url(&control.url))?;
    let outcome = tokio::select! {
        result = scenario(&client) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\n    interrupted; cleaning up");
            Ok(())
        }
    };
    step("stopping kpx-control");
    control.stop()?;
    drop(dir);
    println!("    stopped; the store directory was removed");
    outcome
}

async fn scenario(client: &Client) -> anyhow::Result<()> {
    step(&format!("creating namespace {NAMESPACE:?}"));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        )?)
        .await?;

    step("creating Service web (ClusterIP, port 80 -> 8080)");
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let svc = services
        .create(&serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?)
        .await?;
    let spec = svc.spec.clone().context("created Service has no spec")?;
    println!(
        "    allocated ClusterIP {}",
        spec.cluster_ip.unwrap_or_default()
    );

    step("creating EndpointSlice web-1 with two ready endpoints");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    slices
        .create(&serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.1.10"], "conditions": {"ready": true}, "nodeName": "node-1"},
                {"addresses": ["198.18.2.10"], "conditions": {"ready": true}, "nodeName": "node-2"},
            ],
        }))?)
        .await?;

    step("what the API holds");
    show(&services, &slices).await?;

    step("watching EndpointSlices while a third endpoint is added");
    let listed = slices.list(&ListParams::default()).await?;
    let mut watch = slices
        .watch(
            &ListParams::default(),
            &listed.metadata.resource_version,
            30,
        )
        .await?;
    let started = Instant::now();
    slices
        .patch(
            "web-1",
            Patch::Merge,
            &json!({"endpoints": [
                {"addresses": ["198.18.1.10"], "conditions": {"ready": true}, "nodeName": "node-1"},
                {"addresses": ["198.18.2.10"], "conditions": {"ready": true}, "nodeName": "node-2"},
                {"addresses": ["198.18.3.10"], "conditions": {"ready": true}, "nodeName": "node-3"},
            ]}),
        )
        .await?;
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), watch.next())
            .await
            .context("no watch event within 10 s")?
            .context("the watch ended early")??;
        if let WatchEvent::Modified(slice) = event {
            let addresses: Vec<String> = slice
                .endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .collect();
            println!(
                "    MODIFIED {} (resourceVersion {}) after {:.1} ms: {}",
                slice.metadata.name.unwrap_or_default(),
                slice.metadata.resource_version.unwrap_or_default(),
                started.elapsed().as_secs_f64() * 1000.0,
                addresses.join(", ")
            );
            break;
        }
    }

    step(&format!(
        "deleting namespace {NAMESPACE:?} and everything in it"
    ));
    namespaces.delete(NAMESPACE).await?;
    let left = services.list(&ListParams::default()).await?.items.len();
    println!("    {left} Services left in {NAMESPACE:?}");
    Ok(())
}

async fn show(services: &Api<Service>, slices: &Api<EndpointSlice>) -> anyhow::Result<()> {
    println!(
        "    {:<8} {:<10} {:<15} {:<10}",
        "SERVICE", "TYPE", "CLUSTER-IP", "PORT(S)"
    );
    for svc in services.list(&ListParams::default()).await?.items {
        let spec = svc.spec.unwrap_or_default();
        let ports: Vec<String> = spec
            .ports
            .unwrap_or_default()
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol.clone().unwrap_or_default()))
            .collect();
        println!(
            "    {:<8} {:<10} {:<15} {:<10}",
            svc.metadata.name.unwrap_or_default(),
            spec.type_.unwrap_or_default(),
            spec.cluster_ip.unwrap_or_default(),
            ports.join(",")
        );
    }
    println!("    {:<8} {:<10} ENDPOINTS", "SLICE", "SERVICE");
    for slice in slices.list(&ListParams::default()).await?.items {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name").cloned())
            .unwrap_or_default();
        let port = slice
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .unwrap_or(0);
        let endpoints: Vec<String> = slice
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().map(|a| format!("{a}:{port}")))
            .collect();
        println!(
            "    {:<8} {:<10} {}",
            slice.metadata.name.unwrap_or_default(),
            service,
            endpoints.join(",")
        );
    }
    Ok(())
}
