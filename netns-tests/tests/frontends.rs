//! The frontend model's routes, in namespaces on every backend: what the conformance table
//! checks on the plans, checked with real traffic — pods and the node short-circuited to every
//! endpoint of an `externalTrafficPolicy: Local` frontend while outside clients stay on the node,
//! and a Service whose endpoints all exist but none is usable refused at once.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kpx_lab::lab::Lab;
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_the_node_reach_every_endpoint_of_an_external_traffic_policy_local_frontend() {
    on_every_backend("frontends-etp", |backend| async move {
        let mut lab = Lab::start("fetp", backend, 2, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        lab.add_pod(0, "client").await?;
        let external_ip = Lab::external_ip(30);
        let svc = create_service(
            &lab,
            "web",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "externalIPs": [external_ip.to_string()],
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        let node1 = target(IpAddr::V4(lab.nodes[0].ip), node_port(&svc));
        let both = |o: &[Outcome]| all_answer(o) && pods_seen(o).len() == 2;
        // Outside clients reach node 1's endpoint only, with their own address.
        let outside = &lab.externals[0];
        eventually(&lab, "outside: node 1's endpoint", || traffic::http(outside, node1, 20, TIMEOUT), |o| {
            all_answer(o) && o.iter().all(|x| x.pod() == Some("web-a"))
        })
        .await?;
        // A pod is short-circuited to every endpoint, keeping its address (kube-proxy's "pod
        // traffic for external destinations").
        let client = &lab.pod("client").ns;
        let client_ip = lab.pod("client").ip.to_string();
        let seen = eventually(&lab, "a pod: every endpoint of the external IP", || {
            traffic::http(client, target(external_ip, 80), 40, TIMEOUT)
        }, both)
        .await?;
        anyhow::ensure!(
            seen.iter().all(|o| o.client_ip() == Some(client_ip.as_str())),
            "the pod's address was not kept: {seen:?}"
        );
        eventually(&lab, "a pod: every endpoint of the NodePort", || traffic::http(client, node1, 40, TIMEOUT), both).await?;
        // The node itself too.
        eventually(&lab, "the node: every endpoint of the NodePort", || traffic::http(&lab.nodes[0], node1, 40, TIMEOUT), both).await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_endpoints_all_exist_but_none_is_usable_is_refused_at_once() {
    on_every_backend("frontends-unusable", |backend| async move {
        let mut lab = Lab::start("funu", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = &lab.pod("client").ns;
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        eventually(
            &lab,
            "the ready endpoint answers",
            || traffic::http(client, vip, 5, TIMEOUT),
            all_answer,
        )
        .await?;
        // Neither ready nor serving (e.g. failing its readiness probe while not terminating):
        // kube-proxy treats it as no endpoint and rejects, where a drop would hang the client.
        let unusable = Ep {
            pod: "web-a",
            ready: false,
            serving: false,
            terminating: false,
        };
        set_endpoints(&lab, "web", &[unusable], http_port()).await?;
        let refused = |o: &[Outcome]| o.iter().all(|x| matches!(x, Outcome::Refused));
        eventually(
            &lab,
            "a pod is refused, not left hanging",
            || traffic::http(client, vip, 3, Duration::from_secs(5)),
            refused,
        )
        .await?;
        eventually(
            &lab,
            "the node is refused, not left hanging",
            || traffic::http(&lab.nodes[0], vip, 3, Duration::from_secs(5)),
            refused,
        )
        .await?;
        Ok(())
    })
    .await;
}
