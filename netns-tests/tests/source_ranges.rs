//! `loadBalancerSourceRanges`: a load-balancer ingress IP answers only the clients its ranges
//! take in; the others' connections are dropped (no answer, not refused) while the Service's
//! NodePort stays open to them; widening the ranges (a partial sync) lets them in. The node's
//! and pods' own connections meet the ranges too, and a restarted proxy keeps them.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kpx_control::client::Patch;
use kpx_lab::lab::{Lab, ProxyBackend};
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

/// Per request where the firewall must drop: a dropped SYN is seen only by waiting.
const DROP_TIMEOUT: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_source_ranges_admit_only_their_clients_and_follow_updates() {
    on_every_backend("source-ranges", |backend| async move {
        let mut lab = Lab::start("lbsr", backend, 2, 2).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        // The externals are 198.18.0.201 and .202 (`Lab::add_external`); only the first is in
        // the ranges. Node 1 announces the load-balancer IP.
        let (admitted, refused) = (&lab.externals[0], &lab.externals[1]);
        let lb_ip = Lab::external_ip(30);
        let svc = create_service(
            &lab,
            "lb",
            json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["198.18.0.201/32"],
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "lb", &[ready("web-a"), ready("web-b")], http_port()).await?;
        services(&lab)
            .patch_status(
                "lb",
                Patch::Merge,
                &json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}}}),
            )
            .await?;
        let lb = target(lb_ip, 80);
        let both = |o: &[Outcome]| all_answer(o) && pods_seen(o).len() == 2;
        eventually(&lab, "the admitted client reaches the load-balancer IP", || traffic::http(admitted, lb, 20, TIMEOUT), both).await?;

        // The other client reaches the node (its NodePort answers: the ranges guard the
        // load-balancer IP only), but its connections to the load-balancer IP are dropped.
        let node_port = target(IpAddr::V4(lab.nodes[0].ip), node_port(&svc));
        eventually(&lab, "the other client reaches the NodePort", || traffic::http(refused, node_port, 10, TIMEOUT), all_answer).await?;
        let dropped = traffic::http(refused, lb, 3, DROP_TIMEOUT)?;
        anyhow::ensure!(
            dropped.iter().all(|o| matches!(o, Outcome::TimedOut)),
            "a client outside loadBalancerSourceRanges is not dropped: {dropped:?}\n--- iptables (node-1) ---\n{}",
            lab.iptables_save(0)
        );

        // Both admitted: a partial sync of the ranges.
        services(&lab)
            .patch(
                "lb",
                Patch::Merge,
                &json!({"spec": {"loadBalancerSourceRanges": ["198.18.0.201/32", "198.18.0.202/32"]}}),
            )
            .await?;
        eventually(&lab, "the widened ranges admit the other client", || traffic::http(refused, lb, 20, TIMEOUT), both).await?;
        let first = traffic::http(admitted, lb, 10, ANSWER_TIMEOUT)?;
        anyhow::ensure!(all_answer(&first), "the first client lost the load-balancer IP: {first:?}");
        Ok(())
    })
    .await;
}

/// The node's and pods' own connections to the load-balancer IP: outside the ranges, the
/// node gets no answer (eBPF fails its connect at once with EPERM; the netfilter backends
/// drop) and a pod's connection is dropped; ranges taking both in admit both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_and_pods_own_connections_meet_the_ranges_and_a_restarted_proxy_keeps_them() {
    on_every_backend("source-ranges-own", |backend| async move {
        let mut lab = Lab::start("srsk", backend, 1, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let lb_ip = Lab::external_ip(30);
        create_service(
            &lab,
            "lb",
            json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["198.18.0.201/32"],
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "lb", &[ready("web-a")], http_port()).await?;
        services(&lab)
            .patch_status(
                "lb",
                Patch::Merge,
                &json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}}}),
            )
            .await?;
        let lb = target(lb_ip, 80);
        eventually(&lab, "the external in the ranges gets in", || traffic::http(&lab.externals[0], lb, 5, TIMEOUT), all_answer).await?;
        let client = &lab.pod("client").ns.entry()?;
        // The lab's nodes have no default route (never one toward the host), so their own
        // connections reach a load-balancer IP only where the backend acts before routing
        // (eBPF's socket LB) or binds the address on the node (IPVS's kpx-ipvs0); under the
        // iptables and nftables backends they fail before any rule ("Network is unreachable"),
        // which would prove nothing here.
        let node_reaches = matches!(backend, ProxyBackend::Ebpf | ProxyBackend::Ipvs);
        if node_reaches {
            let node = traffic::http(&lab.nodes[0], lb, 3, Duration::from_millis(500))?;
            anyhow::ensure!(
                node.iter().all(|o| match o {
                    // Dropped (IPVS), or the connect refused by the socket LB (eBPF: EPERM).
                    Outcome::TimedOut => true,
                    Outcome::Failed(why) => why.contains("Operation not permitted"),
                    _ => false,
                }),
                "the node outside the ranges: {node:?}"
            );
        }
        let pod = traffic::http(client, lb, 3, Duration::from_millis(500))?;
        anyhow::ensure!(pod.iter().all(|o| matches!(o, Outcome::TimedOut)), "{pod:?}");
        let node_ip = lab.nodes[0].ip.to_string();
        let pod_ip = lab.pod("client").ip.to_string();
        services(&lab)
            .patch(
                "lb",
                Patch::Merge,
                &json!({"spec": {"loadBalancerSourceRanges": ["198.18.0.201/32", format!("{node_ip}/32"), format!("{pod_ip}/32")]}}),
            )
            .await?;
        if node_reaches {
            eventually(&lab, "the node in the ranges gets in", || traffic::http(&lab.nodes[0], lb, 5, TIMEOUT), all_answer).await?;
        }
        eventually(&lab, "the pod in the ranges gets in", || traffic::http(client, lb, 5, TIMEOUT), all_answer).await?;
        // `dump` shows the ranges (the eBPF backend's; the netfilter backends' dumps do not
        // list them yet).
        if backend == ProxyBackend::Ebpf {
            let out = lab.proxy_command(0)?.args(["dump", "--json"]).output()?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let want = format!("\"{node_ip}/32\"");
            anyhow::ensure!(text.contains("\"sourceRanges\"") && text.contains(&want), "dump: {text}");
        }
        // Stopped, the proxy's rules (or maps) stay and keep judging; restarted, it adopts
        // them and follows a narrowing.
        lab.stop_proxy(0);
        let down = traffic::http(&lab.externals[0], lb, 3, TIMEOUT)?;
        anyhow::ensure!(all_answer(&down), "while down: {down:?}");
        lab.start_proxy(0)?;
        services(&lab)
            .patch(
                "lb",
                Patch::Merge,
                &json!({"spec": {"loadBalancerSourceRanges": [format!("{node_ip}/32")]}}),
            )
            .await?;
        eventually(&lab, "after the restart the narrowed ranges drop the pod", || traffic::http(client, lb, 3, Duration::from_millis(500)), |o| o.iter().all(|x| matches!(x, Outcome::TimedOut))).await?;
        if node_reaches {
            let node = traffic::http(&lab.nodes[0], lb, 3, ANSWER_TIMEOUT)?;
            anyhow::ensure!(all_answer(&node), "the node after the restart: {node:?}");
        }
        Ok(())
    })
    .await;
}
