//! Upgrading the eBPF backend: a proxy whose programs differ from the ones its predecessor left
//! attached replaces those links (else the old programs would read the new maps with the old
//! semantics), keeps the pinned maps, and serves again; the same programs keep their links.

mod common;

use common::*;
use kpx_lab::lab::{Lab, ProxyBackend};
use kpx_lab::traffic;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_other_programs_replaces_the_links_and_keeps_the_maps() {
    on_every_backend("ebpf-upgrade", |backend| async move {
        if backend != ProxyBackend::Ebpf {
            println!(
                "SKIP ebpf-upgrade on {backend:?}: it is about the eBPF backend's pinned links"
            );
            return Ok(());
        }
        let mut lab = Lab::start("upg", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = &lab.pod("client").ns.entry()?;
        eventually(
            &lab,
            "web answering",
            || traffic::http(client, vip, 3, TIMEOUT),
            all_answer,
        )
        .await?;
        let pins = lab
            .pin_dir(0)
            .ok_or_else(|| anyhow::anyhow!("the ebpf lab has no pin directory"))?;
        // The pinned maps, as the proxy shares them (`kpx_version` records its programs).
        let open = || {
            kpx_ebpf::objects::load(
                kpx_ebpf::objects::TC_LB,
                Some(&pins),
                &kpx_ebpf::objects::Capacity::default(),
            )
        };
        let written = kpx_ebpf::apply::programs_version(&open()?)?;
        anyhow::ensure!(
            written != 0,
            "no programs' version recorded in {}",
            pins.display()
        );

        // Same programs: the restarted proxy keeps its predecessor's links.
        lab.stop_proxy(0);
        lab.start_proxy(0)?;
        eventually(
            &lab,
            "web answering after a restart",
            || traffic::http(client, vip, 3, TIMEOUT),
            all_answer,
        )
        .await?;
        // The restarted proxy has decided once it adopted the maps (it logs that after).
        let log_path = lab.log_path("proxy-node-1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(&log_path)?.contains("adopted the pinned maps")
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(&log_path)?;
        anyhow::ensure!(
            log.contains("adopted the pinned maps"),
            "the restart adopted nothing:\n{log}"
        );
        anyhow::ensure!(
            !log.contains("replacing the links"),
            "links replaced on a plain restart:\n{log}"
        );

        // Other programs (as an upgrade leaves them): replaced, the maps adopted.
        lab.stop_proxy(0);
        kpx_ebpf::apply::set_programs_version(&mut open()?, 42)?;
        lab.start_proxy(0)?;
        eventually(
            &lab,
            "web answering after the upgrade",
            || traffic::http(client, vip, 3, TIMEOUT),
            all_answer,
        )
        .await?;
        // The proxy says so once it has started (the old links answer meanwhile).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(&log_path)?.contains("replacing the links")
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        eventually(
            &lab,
            "web answering through the new links",
            || traffic::http(client, vip, 3, TIMEOUT),
            all_answer,
        )
        .await?;
        let log = std::fs::read_to_string(lab.log_path("proxy-node-1"))?;
        anyhow::ensure!(
            log.contains("replacing the links"),
            "the old links were kept:\n{log}"
        );
        anyhow::ensure!(
            log.contains("adopted the pinned maps"),
            "the maps were not adopted:\n{log}"
        );
        anyhow::ensure!(
            kpx_ebpf::apply::programs_version(&open()?)? == written,
            "the programs' version was not rewritten"
        );
        Ok(())
    })
    .await;
}
