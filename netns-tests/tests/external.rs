//! Traffic from outside the cluster: NodePorts (from another node and from a host on the
//! fabric), external IPs and load-balancer ingress IPs, and `externalTrafficPolicy: Local`.

mod common;

use std::net::IpAddr;

use common::*;
use kpx_control::client::Patch;
use kpx_lab::lab::Lab;
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_external_ips_and_load_balancer_ips_reach_every_endpoint() {
    on_every_backend("external", |backend| async move {
        let mut lab = Lab::start("ext", backend, 2, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        let external_ip = Lab::external_ip(10);
        let svc = create_service(&lab, "web", json!({"type": "NodePort", "externalIPs": [external_ip.to_string()],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]})).await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        let node_port = node_port(&svc);
        let outside = &lab.externals[0];
        let node1 = target(IpAddr::V4(lab.nodes[0].ip), node_port);
        let both = |o: &[Outcome]| all_answer(o) && pods_seen(o).len() == 2;
        eventually(&lab, "NodePort from outside", || traffic::http(outside, node1, 30, TIMEOUT), both).await?;
        eventually(&lab, "NodePort from another node", || traffic::http(&lab.nodes[1], node1, 30, TIMEOUT), both).await?;
        eventually(&lab, "external IP from outside", || traffic::http(outside, target(external_ip, 80), 30, TIMEOUT), both).await?;

        // A load balancer announces its ingress IP in the Service status.
        let lb_ip = Lab::external_ip(20);
        let lb = create_service(&lab, "lb", json!({"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]})).await?;
        set_endpoints(&lab, "lb", &[ready("web-a"), ready("web-b")], http_port()).await?;
        services(&lab)
            .patch_status("lb", Patch::Merge, &json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}}}))
            .await?;
        eventually(&lab, "load-balancer IP from outside", || traffic::http(outside, target(lb_ip, 80), 30, TIMEOUT), both).await?;
        let _ = lb;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_policy_local_keeps_the_client_address_and_stays_on_the_node() {
    on_every_backend("etp-local", |backend| async move {
        let mut lab = Lab::start("etp", backend, 2, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        let outside = &lab.externals[0];
        let outside_ip = "198.18.0.201";
        let via_node1 = target(IpAddr::V4(lab.nodes[0].ip), node_port(&svc));
        let local = eventually(
            &lab,
            "node 1's own endpoint only",
            || traffic::http(outside, via_node1, 20, TIMEOUT),
            |o| o.iter().all(|x| x.pod() == Some("web-a")),
        )
        .await?;
        anyhow::ensure!(
            local.iter().all(|o| o.client_ip() == Some(outside_ip)),
            "source IP not preserved: {local:?}"
        );
        // Without a local endpoint, outside traffic to that node is dropped, never forwarded.
        set_endpoints(&lab, "web", &[ready("web-b")], http_port()).await?;
        eventually(
            &lab,
            "no local endpoint on node 1: no answer",
            || traffic::http(outside, via_node1, 2, std::time::Duration::from_millis(500)),
            |o| o.iter().all(|x| x.pod().is_none()),
        )
        .await?;
        let via_node2 = target(IpAddr::V4(lab.nodes[1].ip), node_port(&svc));
        let remote = traffic::http(outside, via_node2, 5, ANSWER_TIMEOUT)?;
        anyhow::ensure!(
            remote
                .iter()
                .all(|o| o.pod() == Some("web-b") && o.client_ip() == Some(outside_ip)),
            "{remote:?}"
        );
        Ok(())
    })
    .await;
}
