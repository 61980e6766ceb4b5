//! kpx-proxy started as a kubeadm cluster starts kube-proxy: `--config` with the
//! KubeProxyConfiguration kubeadm writes into the kube-proxy ConfigMap (here with the lab's
//! mode, pod CIDR, kubeconfig and `nodePortAddresses: [primary]`), `--hostname-override` as the
//! only other kube-proxy flag. On every backend: a Service works through it, NodePorts answer
//! only on the node's primary IP, and `dump` / `--cleanup` with `--config` read the mode from
//! the file.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use kpx_lab::lab::{Lab, CLUSTER_CIDR, CLUSTER_CIDR_V6};
use kpx_lab::traffic::{self, Outcome};
use kpx_proxy::config::file::GoDuration;
use kpx_proxy::config::settings::{config_conf_of_configmap, parse_file, to_yaml};

const KUBEADM_CONFIGMAP: &str =
    include_str!("../../proxy/src/config/testdata/kubeadm-kube-proxy-configmap.yaml");

/// kubeadm's `config.conf` for node `i` of `lab`, with what a cluster admin sets.
fn config_for(lab: &Lab, i: usize) -> anyhow::Result<String> {
    let mut c = parse_file("kubeadm", &config_conf_of_configmap(KUBEADM_CONFIGMAP)?)?;
    c.mode = Some(lab.backend.mode().into());
    c.cluster_cidr = Some(format!("{CLUSTER_CIDR},{CLUSTER_CIDR_V6}"));
    let kubeconfig = lab.dir.path().join("proxy.kubeconfig");
    c.client_connection
        .get_or_insert_with(Default::default)
        .kubeconfig = Some(kubeconfig.display().to_string());
    // Each node's primary IP, as a per-node file (or the Node object's InternalIP) gives it.
    c.bind_address = Some(lab.nodes[i].ip.to_string());
    c.node_port_addresses = Some(vec!["primary".into()]);
    let sync =
        kpx_control::daemon::parse_duration(&lab.proxy_sync_period).map_err(anyhow::Error::msg)?;
    // In the mode's own section, as kube-proxy's conversion reads it.
    let sync = Some(GoDuration(sync));
    match lab.backend.mode() {
        "nftables" => c.nftables.get_or_insert_with(Default::default).sync_period = sync,
        "ipvs" => c.ipvs.get_or_insert_with(Default::default).sync_period = sync,
        _ => c.iptables.get_or_insert_with(Default::default).sync_period = sync,
    }
    Ok(to_yaml(&c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeadms_kube_proxy_configuration_runs_the_proxy_on_every_backend() {
    on_every_backend("proxy-config", |backend| async move {
        let mut lab = Lab::start("pcfg", backend, 2, 1).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(1, "web-b").await?;
        lab.add_pod(0, "client").await?;
        for i in 0..lab.nodes.len() {
            let path = lab.dir.path().join(format!("kube-proxy-{i}.conf"));
            std::fs::write(&path, config_for(&lab, i)?)?;
            lab.use_proxy_config(i, Some(path));
            lab.start_proxy(i)?;
        }
        // Made after the restart, so only the proxies started from the file can program it.
        let svc = create_service(
            &lab,
            "web",
            serde_json::json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        let both = |o: &[Outcome]| {
            all_answer(o)
                && o.iter()
                    .filter_map(Outcome::pod)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    == 2
        };
        let client = &lab.pod("client").ns;
        let vip = target(cluster_ip(&svc), 80);
        eventually(&lab, "ClusterIP from a pod", || traffic::http(client, vip, 30, TIMEOUT), both).await?;
        let node0 = target(IpAddr::V4(lab.nodes[0].ip), node_port(&svc));
        let outside = &lab.externals[0];
        eventually(&lab, "NodePort on the primary IP from outside", || traffic::http(outside, node0, 30, TIMEOUT), both).await?;
        // nodePortAddresses [primary]: node 0's pod bridge address is not a NodePort address.
        let bridge = target(
            IpAddr::V4(Ipv4Addr::new(198, 19, lab.nodes[0].index, 1)),
            node_port(&svc),
        );
        let on_bridge = traffic::http(client, bridge, 5, TIMEOUT)?;
        anyhow::ensure!(
            on_bridge.iter().all(|o| o.pod().is_none()),
            "a NodePort answered on the bridge address, outside nodePortAddresses [primary]: {on_bridge:?}\n{}",
            lab.proxy_logs()
        );

        // dump with --config and no --proxy-mode: the mode comes from the file.
        let out = lab.proxy_command(0)?.args(["dump", "--json"]).output()?;
        anyhow::ensure!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
        let dump = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(dump.contains("default/web:http/TCP"), "web missing from the dump: {dump}");

        // --cleanup with --config removes what the file's mode programmed.
        lab.stop_proxy(0);
        let out = lab.proxy_command(0)?.arg("--cleanup").output()?;
        anyhow::ensure!(out.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        let out = lab.proxy_command(0)?.args(["dump", "--json"]).output()?;
        let dump = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            !dump.contains("default/web:http/TCP"),
            "web is still programmed after --cleanup: {dump}"
        );
        Ok(())
    })
    .await;
}
