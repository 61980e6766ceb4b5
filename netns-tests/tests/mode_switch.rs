//! Switching proxy modes on one node, as kube-proxy's `platformCleanup` promises: starting in a
//! mode removes what the other modes left (iptables → eBPF → iptables leaves nothing of the
//! earlier mode), and `kpx-proxy --cleanup` removes what every mode left, whatever
//! `--proxy-mode` says, and nothing that is not kpx's.

mod common;

use common::*;
use kpx_lab::lab::{Lab, ProxyBackend};
use kpx_lab::traffic::{self, Outcome};
use serde_json::json;

const SAVES: [&str; 4] = [
    "iptables-nft-save",
    "ip6tables-nft-save",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
];

/// Every `-save` of both flavours and families in node 0, by tool (an absent one is empty).
fn saved(lab: &Lab) -> anyhow::Result<Vec<(&'static str, String)>> {
    SAVES
        .iter()
        .map(|tool| {
            let out = lab.nodes[0].ns.command(tool).output()?;
            Ok((*tool, String::from_utf8_lossy(&out.stdout).to_string()))
        })
        .collect()
}

fn ensure_no_kpx_chains(lab: &Lab, when: &str) -> anyhow::Result<()> {
    for (tool, text) in saved(lab)? {
        anyhow::ensure!(
            !text.contains("KPX-"),
            "{when}: KPX- left in {tool}:\n{text}"
        );
    }
    Ok(())
}

/// kpx's tc programs attached in node 0 (tcx, or legacy tc filters), as `interface: program`.
fn kpx_tc_programs(lab: &Lab) -> anyhow::Result<Vec<String>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut found = lab.nodes[0].ns.enter(|| {
        let mut found = Vec::new();
        for (name, _) in kpx_ebpf::attach::interfaces() {
            // A kernel without tcx fails the query; the tc filter check below covers it.
            if let Ok((_, programs)) = SchedClassifier::query_tcx(&name, TcAttachType::Ingress) {
                for p in programs {
                    if let Some(program) = p.name_as_str().filter(|n| n.starts_with("kpx")) {
                        found.push(format!("{name}: {program}"));
                    }
                }
            }
        }
        found
    })?;
    let interfaces = lab.nodes[0].ns.enter(kpx_ebpf::attach::interfaces)?;
    for (name, _) in interfaces {
        let out = lab.nodes[0]
            .ns
            .command("tc")
            .args(["filter", "show", "dev", &name, "ingress"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("kpx") {
            found.push(format!("{name}: tc filter"));
        }
    }
    Ok(found)
}

/// The Service answers from a pod and from the node (its cgroup: socket-level hooks in eBPF).
async fn works(lab: &Lab, vip: std::net::SocketAddr, mode: &str) -> anyhow::Result<()> {
    let pod = &lab.pod("client").ns;
    eventually(
        lab,
        &format!("{mode}: web from a pod"),
        || traffic::http(pod, vip, 3, TIMEOUT),
        all_answer,
    )
    .await?;
    let node = &lab.nodes[0];
    eventually(
        lab,
        &format!("{mode}: web from the node"),
        || traffic::http(node, vip, 3, TIMEOUT),
        all_answer,
    )
    .await?;
    Ok(())
}

/// Waits until `done` holds (the started proxy programmed its own mode, so its start, which
/// cleans the other modes first, is over); patience as `eventually`'s.
async fn until(lab: &Lab, what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let patience = std::env::var("KPX_TEST_PATIENCE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(patience);
    while !done() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            lab.proxy_logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

fn programmed_iptables(lab: &Lab) -> bool {
    saved(lab).is_ok_and(|s| s[0].1.contains(":KPX-SERVICES"))
}

fn answered(o: &[Outcome]) -> bool {
    o.iter().any(|x| x.pod().is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_modes_leaves_nothing_of_the_earlier_mode_and_cleanup_removes_every_mode() {
    // Both modes on one node: it runs once (on_one_backend) and needs eBPF and iptables-nft.
    on_one_backend("mode-switch", |_| async move {
        for needed in [ProxyBackend::Ebpf, ProxyBackend::IptablesNft] {
            if let Some(why) = needed.unsupported() {
                eprintln!("SKIPPED mode-switch: it needs {}: {why}", needed.name());
                return Ok(());
            }
        }
        let legacy = ProxyBackend::IptablesLegacy.unsupported().is_none();
        // An eBPF lab, for its bpffs and cgroups; the proxy it started goes at once, and the
        // node runs iptables first.
        let mut lab = Lab::start("msw", ProxyBackend::Ebpf, 1, 0).await?;
        lab.stop_proxy(0);
        let pins = lab.pin_dir(0).expect("an ebpf lab has a bpffs");
        lab.backend = ProxyBackend::IptablesNft;
        lab.start_proxy(0)?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "web-b").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a"), ready("web-b")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        // 1. iptables: the Service works; the eBPF lab's first proxy left nothing pinned.
        until(&lab, "iptables rules", || programmed_iptables(&lab)).await?;
        anyhow::ensure!(!pins.exists(), "iptables started with eBPF pins in {}\n{}", pins.display(), lab.proxy_logs());
        works(&lab, vip, "iptables").await?;
        let iptables_rules = saved(&lab)?;
        anyhow::ensure!(iptables_rules[0].1.contains("KPX-SERVICES"), "no kpx rules:\n{}", iptables_rules[0].1);
        lab.stop_proxy(0);

        // Someone else's chains (kube-proxy's, a firewall's) and an old legacy-flavour kpx chain.
        let run = |tool: &str, args: &[&str]| -> anyhow::Result<()> {
            let status = lab.nodes[0].ns.command(tool).args(args).status()?;
            anyhow::ensure!(status.success(), "{tool} {args:?}");
            Ok(())
        };
        run("iptables-nft", &["-t", "nat", "-N", "KUBE-SERVICES"])?;
        run("iptables-nft", &["-t", "nat", "-A", "OUTPUT", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"])?;
        run("iptables-nft", &["-t", "filter", "-N", "SOMEONE-ELSE"])?;
        run("iptables-nft", &["-t", "filter", "-A", "SOMEONE-ELSE", "-j", "RETURN"])?;
        if legacy {
            run("iptables-legacy", &["-t", "nat", "-N", "KPX-SVC-STALE"])?;
            run("iptables-legacy", &["-t", "nat", "-A", "OUTPUT", "-j", "KPX-SVC-STALE"])?;
        }

        // 2. eBPF: the Service works, and no KPX- chain is left in either flavour or family.
        lab.backend = ProxyBackend::Ebpf;
        lab.start_proxy(0)?;
        until(&lab, "ebpf pins", || pins.join("kpx_services").exists()).await?;
        ensure_no_kpx_chains(&lab, "after starting ebpf")?;
        works(&lab, vip, "ebpf").await?;
        let nat = &saved(&lab)?[0].1;
        anyhow::ensure!(nat.contains("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), "kube-proxy's jump went:\n{nat}");
        anyhow::ensure!(nat.contains(":KUBE-SERVICES"), "kube-proxy's chain went:\n{nat}");
        anyhow::ensure!(!kpx_tc_programs(&lab)?.is_empty(), "ebpf attached no tc program");
        anyhow::ensure!(pins.join("links").read_dir()?.next().is_some(), "ebpf pinned no link");
        lab.stop_proxy(0);

        // 3. iptables again: the Service works, and no BPF pin or link of kpx is left.
        lab.backend = ProxyBackend::IptablesNft;
        lab.start_proxy(0)?;
        until(&lab, "iptables rules again", || programmed_iptables(&lab)).await?;
        anyhow::ensure!(!pins.exists(), "eBPF pins left in {}\n{}", pins.display(), lab.proxy_logs());
        works(&lab, vip, "iptables again").await?;
        let tc = kpx_tc_programs(&lab)?;
        anyhow::ensure!(tc.is_empty(), "kpx tc programs left attached: {tc:?}");
        let iptables_again = saved(&lab)?;
        lab.stop_proxy(0);

        // 4. Leftovers of both modes at once: eBPF runs and stops (its pins keep its programs
        // attached), then the iptables rules it removed are put back as they were.
        lab.backend = ProxyBackend::Ebpf;
        lab.start_proxy(0)?;
        until(&lab, "ebpf pins again", || pins.join("kpx_services").exists()).await?;
        works(&lab, vip, "ebpf again").await?;
        lab.stop_proxy(0);
        for (save, text) in iptables_again.iter().filter(|(_, t)| t.contains("KPX-")) {
            let restore = save.replace("-save", "-restore");
            let mut child = lab.nodes[0].ns.command(&restore).stdin(std::process::Stdio::piped()).spawn()?;
            std::io::Write::write_all(&mut child.stdin.take().expect("piped stdin"), text.as_bytes())?;
            anyhow::ensure!(child.wait()?.success(), "{restore} of the saved rules");
        }
        anyhow::ensure!(saved(&lab)?[0].1.contains("KPX-SERVICES") && pins.exists(), "both modes' leftovers are in place");

        // `--cleanup` (with --proxy-mode iptables) removes both, and nothing else.
        lab.backend = ProxyBackend::IptablesNft;
        let out = lab.proxy_command(0)?.arg("--cleanup").env("RUST_LOG", "info").output()?;
        let log = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "cleanup failed: {log}");
        anyhow::ensure!(log.contains("iptables-nft:") && log.contains("ebpf "), "the report names both modes: {log}");
        ensure_no_kpx_chains(&lab, "after --cleanup")?;
        anyhow::ensure!(!pins.exists(), "pins left after --cleanup in {}", pins.display());
        let tc = kpx_tc_programs(&lab)?;
        anyhow::ensure!(tc.is_empty(), "kpx tc programs left after --cleanup: {tc:?}");
        let nat = &saved(&lab)?[0].1;
        anyhow::ensure!(nat.contains("-j KUBE-SERVICES"), "cleanup removed kube-proxy's jump:\n{nat}");
        let filter = lab.nodes[0].ns.command("iptables-nft-save").args(["-t", "filter"]).output()?;
        anyhow::ensure!(String::from_utf8_lossy(&filter.stdout).contains("-A SOMEONE-ELSE -j RETURN"), "cleanup removed a foreign chain");
        // Nothing answers for the Service any more: no DNAT, no tc, no socket-level hook.
        let from_pod = traffic::http(&lab.pod("client").ns, vip, 2, TIMEOUT)?;
        anyhow::ensure!(!answered(&from_pod), "the Service still answers a pod: {from_pod:?}");
        let from_node = traffic::http(&lab.nodes[0], vip, 2, TIMEOUT)?;
        anyhow::ensure!(!answered(&from_node), "the Service still answers the node (cgroup hooks left?): {from_node:?}");
        // A second cleanup finds nothing and says so.
        let out = lab.proxy_command(0)?.arg("--cleanup").env("RUST_LOG", "info").output()?;
        let log = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success() && log.contains("nothing of kpx was left"), "second cleanup: {log}");
        Ok(())
    })
    .await;
}

/// What the IPVS mode holds in node 0: `ipvsadm -Ln`'s virtual servers, kpx-ipvs0, and
/// `KPXV-` chains in any flavour or family.
fn ipvs_state(lab: &Lab) -> anyhow::Result<(String, bool, bool)> {
    let ns = &lab.nodes[0].ns;
    let table = ns.command("ipvsadm").arg("-Ln").output()?;
    anyhow::ensure!(
        table.status.success(),
        "ipvsadm -Ln (is ipvsadm installed?)"
    );
    let dummy = ns
        .command("ip")
        .args(["link", "show", "kpx-ipvs0"])
        .output()?;
    let chains = saved(lab)?.iter().any(|(_, t)| t.contains("KPXV-"));
    Ok((
        String::from_utf8_lossy(&table.stdout).to_string(),
        dummy.status.success(),
        chains,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_ipvs_and_back_leaves_nothing_of_the_earlier_mode() {
    on_one_backend("mode-switch-ipvs", |_| async move {
        for needed in [ProxyBackend::Ipvs, ProxyBackend::IptablesNft] {
            if let Some(why) = needed.unsupported() {
                eprintln!("SKIPPED mode-switch-ipvs: it needs {}: {why}", needed.name());
                return Ok(());
            }
        }
        let mut lab = Lab::start("mswv", ProxyBackend::IptablesNft, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let svc = create_service(
            &lab,
            "web",
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        )
        .await?;
        set_endpoints(&lab, "web", &[ready("web-a")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let listed = format!("{}:80", cluster_ip(&svc));
        // 1. iptables.
        until(&lab, "iptables rules", || programmed_iptables(&lab)).await?;
        works(&lab, vip, "iptables").await?;
        lab.stop_proxy(0);
        // 2. ipvs: the Service works through a virtual server; no KPX- chain is left.
        lab.backend = ProxyBackend::Ipvs;
        lab.start_proxy(0)?;
        until(&lab, "the virtual server", || {
            ipvs_state(&lab).is_ok_and(|(table, _, _)| table.contains(&listed))
        })
        .await?;
        ensure_no_kpx_chains(&lab, "after starting ipvs")?;
        works(&lab, vip, "ipvs").await?;
        lab.stop_proxy(0);
        // 3. iptables again: no virtual server, kpx-ipvs0 or KPXV- chain is left.
        lab.backend = ProxyBackend::IptablesNft;
        lab.start_proxy(0)?;
        until(&lab, "iptables rules again", || programmed_iptables(&lab)).await?;
        let (table, dummy, chains) = ipvs_state(&lab)?;
        anyhow::ensure!(!table.contains(&listed), "virtual server left:\n{table}");
        anyhow::ensure!(!dummy, "kpx-ipvs0 left");
        anyhow::ensure!(!chains, "KPXV- chains left");
        works(&lab, vip, "iptables again").await?;
        Ok(())
    })
    .await;
}
