//! Endpoint selection on the wire: `internalTrafficPolicy: Local`, terminating endpoints,
//! session affinity, hairpin.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kpx_control::client::Patch;
use kpx_lab::lab::Lab;
use kpx_lab::traffic;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_traffic_policy_local_and_terminating_fallback() {
    on_every_backend("itp-terminating", |backend| async move {
        let mut lab = Lab::start("itp", backend, 2, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(&lab, "web", json!({"internalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]})).await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = &lab.pod("client").ns;
        eventually(&lab, "only the local endpoint", || traffic::http(client, vip, 20, TIMEOUT), |o| o.iter().all(|x| x.pod() == Some("web-a"))).await?;
        set_endpoints(&lab, "web", &[ready("web-b")], http_port()).await?;
        eventually(&lab, "no local endpoint: dropped", || traffic::http(client, vip, 2, Duration::from_millis(500)), |o| {
            o.iter().all(|x| x.pod().is_none())
        })
        .await?;

        // Terminating endpoints serve only when no ready one is left.
        services(&lab).patch("web", Patch::Merge, &json!({"spec": {"internalTrafficPolicy": "Cluster"}})).await?;
        let terminating = |pod| Ep { pod, ready: false, serving: true, terminating: true };
        set_endpoints(&lab, "web", &[ready("web-a"), terminating("web-b")], http_port()).await?;
        eventually(&lab, "the ready endpoint only", || traffic::http(client, vip, 20, TIMEOUT), |o| o.iter().all(|x| x.pod() == Some("web-a"))).await?;
        let gone = Ep { pod: "web-a", ready: false, serving: false, terminating: true };
        set_endpoints(&lab, "web", &[gone, terminating("web-b")], http_port()).await?;
        eventually(&lab, "fallback to the serving terminating endpoint", || traffic::http(client, vip, 20, TIMEOUT), |o| {
            o.iter().all(|x| x.pod() == Some("web-b"))
        })
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_sticks_expires_and_switches_off() {
    on_every_backend("affinity", |backend| async move {
        let mut lab = Lab::start("aff", backend, 1, 0).await?;
        for pod in ["web-a", "web-b", "web-c"] {
            lab.add_pod(0, pod).await?;
        }
        lab.add_pod(0, "client").await?;
        let svc = create_service(&lab, "web", json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]})).await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b"), ready("web-c")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = &lab.pod("client").ns;
        eventually(&lab, "one endpoint for a burst of requests", || traffic::http(client, vip, 30, TIMEOUT), |o| {
            all_answer(o) && pods_seen(o).len() == 1
        })
        .await?;
        // After the timeout a client may land elsewhere: over spaced requests more than one answers.
        let mut seen = BTreeSet::new();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(1300)).await;
            seen.extend(pods_seen(&traffic::http(client, vip, 1, TIMEOUT)?));
        }
        anyhow::ensure!(seen.len() > 1, "affinity never expired: {seen:?}");
        services(&lab).patch("web", Patch::Merge, &json!({"spec": {"sessionAffinity": "None"}})).await?;
        eventually(&lab, "spread again without affinity", || traffic::http(client, vip, 30, TIMEOUT), |o| pods_seen(o).len() == 3).await?;
        services(&lab)
            .patch("web", Patch::Merge, &json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}}))
            .await?;
        eventually(&lab, "sticky again", || traffic::http(client, vip, 30, TIMEOUT), |o| all_answer(o) && pods_seen(o).len() == 1).await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_itself_through_its_service() {
    on_every_backend("hairpin", |backend| async move {
        let mut lab = Lab::start("hp", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let me = &lab.pod("web-a").ns;
        let answers = eventually(
            &lab,
            "the pod answers itself",
            || traffic::http(me, vip, 5, TIMEOUT),
            |o| o.iter().all(|x| x.pod() == Some("web-a")),
        )
        .await?;
        // Masqueraded to the node, or the pod would answer itself directly and drop the reply.
        let pod_ip = lab.pod("web-a").ip.to_string();
        anyhow::ensure!(
            answers
                .iter()
                .all(|o| o.client_ip() != Some(pod_ip.as_str())),
            "{answers:?}"
        );
        Ok(())
    })
    .await;
}
