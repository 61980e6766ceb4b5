//! Scenario tests: a cluster in network namespaces, real traffic through the Service rules,
//! on every backend the kernel supports.

mod common;

use std::collections::BTreeSet;

use common::*;
use kpx_lab::lab::Lab;
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_reaches_all_endpoints_evenly_and_keeps_the_pod_source() {
    on_every_backend("cluster-ip", |backend| async move {
        let mut lab = Lab::start("cip", backend, 2, 0).await?;
        for (node, pod) in [(0, "web-a"), (1, "web-b"), (1, "web-c")] {
            lab.add_pod(node, pod).await?;
        }
        lab.add_pod(0, "client").await?;
        let svc = create_service(&lab, "web", json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]})).await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b"), ready("web-c")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = &lab.pod("client").ns;
        eventually(&lab, "all three endpoints answering", || traffic::http(client, vip, 30, TIMEOUT), |o| {
            all_answer(o) && o.iter().filter_map(Outcome::pod).collect::<BTreeSet<_>>().len() == 3
        })
        .await?;
        let outcomes = traffic::http(client, vip, 600, ANSWER_TIMEOUT)?;
        let spread = traffic::spread(&outcomes);
        for pod in ["web-a", "web-b", "web-c"] {
            let n = spread.get(pod).copied().unwrap_or(0);
            // ±25% is over 4 standard deviations of a fair 1-in-3 choice over 600 tries.
            anyhow::ensure!((150..=250).contains(&n), "{pod} got {n} of 600 (want 200 ± 25%): {spread:?}");
        }
        // From a pod, the endpoint sees the pod's own address (no masquerade).
        let client_ip = lab.pod("client").ip.to_string();
        let other: Vec<&Outcome> = outcomes.iter().filter(|o| o.client_ip() != Some(client_ip.as_str())).collect();
        anyhow::ensure!(other.is_empty(), "source {client_ip} not kept in {} of 600: {:?}", other.len(), &other[..other.len().min(3)]);
        // From the node itself it works too (masqueraded, since the node is outside the pod CIDR).
        let from_node = traffic::http(&lab.nodes[0], vip, 10, ANSWER_TIMEOUT)?;
        anyhow::ensure!(all_answer(&from_node), "from node: {from_node:?}");

        // `kpx-proxy dump` reads back what is programmed.
        let out = lab.proxy_command(0)?.args(["dump", "--json"]).output()?;
        anyhow::ensure!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let web = dump["services"].as_array().into_iter().flatten().find(|s| s["service"] == "default/web:http/TCP");
        let web = web.ok_or_else(|| anyhow::anyhow!("web missing from the dump: {dump}"))?;
        anyhow::ensure!(web["addresses"] == json!([vip.to_string()]), "{web}");
        let mut endpoints: Vec<String> = web["endpoints"].as_array().into_iter().flatten().filter_map(|e| e.as_str().map(String::from)).collect();
        endpoints.sort();
        let mut expected: Vec<String> = ["web-a", "web-b", "web-c"].iter().map(|p| format!("{}:8080", lab.pod(p).ip)).collect();
        expected.sort();
        anyhow::ensure!(endpoints == expected, "dump endpoints {endpoints:?}, want {expected:?}");
        let table = lab.proxy_command(0)?.arg("dump").output()?;
        anyhow::ensure!(String::from_utf8_lossy(&table.stdout).contains("default/web:http/TCP"), "table dump");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_is_refused_at_once_and_endpoints_are_followed() {
    on_every_backend("no-endpoints", |backend| async move {
        let mut lab = Lab::start("noep", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "web-b").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = &lab.pod("client").ns;
        let refused = eventually(
            &lab,
            "connections refused",
            || traffic::http(client, vip, 3, TIMEOUT),
            |o| o.iter().all(|x| *x == Outcome::Refused),
        )
        .await?;
        anyhow::ensure!(refused.len() == 3);
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        eventually(
            &lab,
            "web-a answering",
            || traffic::http(client, vip, 5, TIMEOUT),
            |o| o.iter().all(|x| x.pod() == Some("web-a")),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        eventually(
            &lab,
            "both answering",
            || traffic::http(client, vip, 40, TIMEOUT),
            |o| {
                all_answer(o)
                    && o.iter()
                        .filter_map(Outcome::pod)
                        .collect::<BTreeSet<_>>()
                        .len()
                        == 2
            },
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-b")], http_port()).await?;
        eventually(
            &lab,
            "only web-b",
            || traffic::http(client, vip, 20, TIMEOUT),
            |o| o.iter().all(|x| x.pod() == Some("web-b")),
        )
        .await?;
        set_endpoints(&lab, "web", &[], http_port()).await?;
        eventually(
            &lab,
            "scaled to zero: refused",
            || traffic::http(client, vip, 3, TIMEOUT),
            |o| o.iter().all(|x| *x == Outcome::Refused),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        eventually(
            &lab,
            "back from zero",
            || traffic::http(client, vip, 5, TIMEOUT),
            |o| o.iter().all(|x| x.pod() == Some("web-a")),
        )
        .await?;
        // Deleted and recreated.
        services(&lab).delete("web").await?;
        eventually(
            &lab,
            "deleted: no rule left",
            || traffic::http(client, vip, 1, TIMEOUT),
            |o| o.iter().all(|x| x.pod().is_none()),
        )
        .await?;
        let again = create_service(
            &lab,
            "web",
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        let vip = target(cluster_ip(&again), 80);
        eventually(
            &lab,
            "recreated",
            || traffic::http(client, vip, 5, TIMEOUT),
            |o| o.iter().all(|x| x.pod() == Some("web-a")),
        )
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiport_services_and_one_port_number_over_tcp_and_udp() {
    on_every_backend("multiport", |backend| async move {
        let mut lab = Lab::start("mp", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "multi",
            json!({"ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "tcp", "port": 9000, "protocol": "TCP"},
                {"name": "udp", "port": 9000, "protocol": "UDP"},
            ]}),
        )
        .await?;
        let ports = json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "tcp", "port": 9000, "protocol": "TCP"},
            {"name": "udp", "port": 9000, "protocol": "UDP"},
        ]);
        set_endpoints(&lab, "multi", &[ready("web-a")], ports).await?;
        let ip = cluster_ip(&svc);
        let client = &lab.pod("client").ns;
        let from_web = |o: &[Outcome]| !o.is_empty() && o.iter().all(|x| x.pod() == Some("web-a"));
        eventually(
            &lab,
            "HTTP on port 80",
            || traffic::http(client, target(ip, 80), 3, TIMEOUT),
            from_web,
        )
        .await?;
        eventually(
            &lab,
            "TCP on port 9000",
            || traffic::tcp(client, target(ip, 9000), 3, TIMEOUT),
            from_web,
        )
        .await?;
        eventually(
            &lab,
            "UDP on port 9000",
            || traffic::udp(client, target(ip, 9000), 3, None, TIMEOUT),
            from_web,
        )
        .await?;
        Ok(())
    })
    .await;
}
