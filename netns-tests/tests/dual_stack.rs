//! Dual-stack: one kpx-proxy programs IPv4 and IPv6 (iptables and ip6tables) from the same
//! Services, each family from its own EndpointSlice, on every backend the kernel supports.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use common::*;
use kpx_lab::lab::Lab;
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_services_work_on_both_families() {
    on_every_backend("dual-stack", |backend| async move {
        let mut lab = Lab::start("dual", backend, 2, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({
                "type": "NodePort", "selector": {"app": "web"},
                "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            }),
        )
        .await?;
        let eps = [ready("web-a"), ready("web-b")];
        set_endpoints(&lab, "web", &eps, http_port()).await?;
        set_endpoints_v6(&lab, "web", &eps, http_port()).await?;
        let (vip4, vip6) = (cluster_ip_of(&svc, false), cluster_ip_of(&svc, true));
        anyhow::ensure!(vip6.is_ipv6() && vip4.is_ipv4(), "{vip4} {vip6}");

        // The IPv6 ClusterIP from a pod reaches both endpoints (one on the other node), and
        // the endpoint sees the pod's own IPv6 address.
        let client = &lab.pod("client").ns;
        let both = |o: &[Outcome]| all_answer(o) && pods_seen(o).len() == 2;
        let outcomes = eventually(
            &lab,
            "both endpoints over IPv6",
            || traffic::http(client, target(vip6, 80), 40, TIMEOUT),
            both,
        )
        .await?;
        let client_ip6 = lab.pod("client").ip6.to_string();
        anyhow::ensure!(
            outcomes
                .iter()
                .all(|o| o.client_ip() == Some(client_ip6.as_str())),
            "IPv6 source not kept: {:?}",
            &outcomes[..3]
        );
        // IPv4 keeps working beside it.
        eventually(
            &lab,
            "both endpoints over IPv4",
            || traffic::http(client, target(vip4, 80), 40, TIMEOUT),
            both,
        )
        .await?;

        // NodePort over IPv6 from a host outside the cluster, through the node without a
        // local endpoint for half the requests.
        let external = &lab.externals[0];
        let node2 = IpAddr::V6(lab.nodes[1].ip6);
        eventually(
            &lab,
            "the NodePort over IPv6",
            || traffic::http(external, target(node2, node_port(&svc)), 20, TIMEOUT),
            both,
        )
        .await?;

        // Hairpin over IPv6: a pod reaches itself through its Service.
        let web_a = &lab.pod("web-a").ns;
        eventually(
            &lab,
            "web-a reaching itself over IPv6",
            || traffic::http(web_a, target(vip6, 80), 20, TIMEOUT),
            |o| all_answer(o) && pods_seen(o).contains("web-a"),
        )
        .await?;

        // An IPv6-only Service without endpoints is refused at once (ICMPv6 unreachable).
        let empty = create_service(
            &lab,
            "empty6",
            json!({
                "ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            }),
        )
        .await?;
        let vip = cluster_ip(&empty);
        anyhow::ensure!(vip.is_ipv6(), "empty6 got {vip}");
        eventually(
            &lab,
            "refused over IPv6",
            || traffic::http(client, target(vip, 80), 3, TIMEOUT),
            |o| o.iter().all(|r| *r == Outcome::Refused),
        )
        .await?;

        // Endpoints of one family follow their own slice: the IPv6 slice loses web-b, the
        // IPv4 one keeps it.
        set_endpoints_v6(&lab, "web", &[ready("web-a")], http_port()).await?;
        eventually(
            &lab,
            "only web-a over IPv6",
            || traffic::http(client, target(vip6, 80), 20, TIMEOUT),
            |o| all_answer(o) && pods_seen(o) == BTreeSet::from(["web-a".to_string()]),
        )
        .await?;
        let v4 = traffic::http(client, target(vip4, 80), 40, ANSWER_TIMEOUT)?;
        anyhow::ensure!(
            both(&v4),
            "IPv4 lost an endpoint: {:?}",
            traffic::spread(&v4)
        );

        // `kpx-proxy dump` shows both families of the Service port.
        let out = lab.proxy_command(0)?.args(["dump", "--json"]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let web = dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == "default/web:http/TCP");
        let web = web.ok_or_else(|| anyhow::anyhow!("web missing from the dump: {dump}"))?;
        let want = json!([format!("{vip4}:80"), format!("[{vip6}]:80")]);
        anyhow::ensure!(
            web["addresses"] == want,
            "dump addresses {}, want {want}",
            web["addresses"]
        );

        // --cleanup removes everything, both families.
        cleanup_and_check(&mut lab, 0)?;
        Ok(())
    })
    .await;
}
