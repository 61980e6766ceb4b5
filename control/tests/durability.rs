//! The real binary: acknowledged writes survive `kill -9`, revisions and allocations continue
//! after a restart, and a reflector rides through the restart by re-listing.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::ServerProcess;
use k8s_openapi::api::core::v1::Service;
use kpx_control::client::{reflector, Api, ListParams, ReflectorEvent, ReflectorOptions};
use serde_json::json;

fn svc(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"type": "NodePort", "ports": [{"port": 80}]},
    }))
    .expect("service")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_and_revisions_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let first = ServerProcess::start(dir.path(), port, &[]);
    let api: Api<Service> = Api::namespaced(first.client(), "default");
    let mut r = reflector(
        api.clone(),
        ReflectorOptions {
            backoff_max: Duration::from_millis(500),
            ..Default::default()
        },
    );
    // 300 creates from 16 writers: every one that returned 201 must be there after the crash.
    let mut acknowledged = Vec::new();
    for chunk in (0..300).collect::<Vec<_>>().chunks(16) {
        let writes = chunk.iter().map(|i| {
            let api = api.clone();
            async move { api.create(&svc(&format!("s{i}"))).await }
        });
        for created in futures::future::join_all(writes).await {
            acknowledged.push(created.expect("create"));
        }
    }
    let last_rv: i64 = acknowledged
        .iter()
        .filter_map(|s| s.metadata.resource_version.as_deref()?.parse().ok())
        .max()
        .expect("revisions");
    first.kill9();

    let second = ServerProcess::start(dir.path(), port, &[]);
    let api: Api<Service> = Api::namespaced(second.client(), "default");
    let listed = api.list(&ListParams::default()).await.expect("list");
    let names: HashSet<_> = listed
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    for s in &acknowledged {
        let name = s.metadata.name.as_deref().expect("name");
        assert!(names.contains(name), "{name} was acknowledged but lost");
        let stored = api.get(name).await.expect("get");
        assert_eq!(
            stored.spec.as_ref().and_then(|p| p.cluster_ip.clone()),
            s.spec.as_ref().and_then(|p| p.cluster_ip.clone())
        );
    }
    let next = api
        .create(&svc("after-restart"))
        .await
        .expect("create after restart");
    let rv: i64 = next
        .metadata
        .resource_version
        .as_deref()
        .expect("rv")
        .parse()
        .expect("numeric");
    assert!(
        rv > last_rv,
        "revision {rv} did not continue after {last_rv}"
    );
    // Allocations were rebuilt from the store: the new Service collides with none.
    let ips: HashSet<_> = acknowledged
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
        .collect();
    let ports: HashSet<_> = acknowledged
        .iter()
        .filter_map(|s| s.spec.as_ref()?.ports.as_ref()?[0].node_port)
        .collect();
    let spec = next.spec.expect("spec");
    assert!(!ips.contains(spec.cluster_ip.as_deref().expect("ip")));
    assert!(!ports.contains(&spec.ports.expect("ports")[0].node_port.expect("node port")));

    // The reflector started against the first process re-lists against the second.
    let deadline = tokio::time::Instant::now() + common::patience();
    loop {
        let event = tokio::time::timeout_at(deadline, r.events.recv())
            .await
            .expect("the reflector sees a Service created after the restart")
            .expect("reflector open");
        if let ReflectorEvent::InitApply(s) | ReflectorEvent::Apply(s) = event {
            if s.metadata.name.as_deref() == Some("after-restart") {
                break;
            }
        }
    }
    assert!(
        r.stats.lists.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "it re-listed"
    );
}
