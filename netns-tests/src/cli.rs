//! `kpx-lab up / status / exec / down`: a cluster lab run by a foreground `kpx-lab up` process
//! (Ctrl-C tears it down), found by the other commands through a state file in
//! `/run/kpx-lab/<name>.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kpx_control::client::{Api, Client, ClientConfig, ListParams};
use serde_json::{json, Value};

use crate::cluster::{node_ready, ClusterOptions};
use crate::lab::{Lab, ProxyBackend};

const STATE_DIR: &str = "/run/kpx-lab";

/// `--proxy-mode`: kube-proxy's names, with the iptables loader chosen explicitly if wanted.
pub fn parse_backend(mode: &str) -> anyhow::Result<ProxyBackend> {
    match mode {
        "iptables" | "iptables-nft" => Ok(ProxyBackend::IptablesNft),
        "iptables-legacy" => Ok(ProxyBackend::IptablesLegacy),
        "ebpf" => Ok(ProxyBackend::Ebpf),
        "nftables" => Ok(ProxyBackend::Nftables),
        "ipvs" => Ok(ProxyBackend::Ipvs),
        other => bail!(
            "--proxy-mode {other:?}: allowed values: iptables (= iptables-nft), iptables-legacy, \
             nftables, ebpf, ipvs"
        ),
    }
}

fn state_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

fn write_state(lab: &mut Lab) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(STATE_DIR)?;
    let nodes: Vec<Value> = lab
        .nodes
        .iter()
        .map(|n| json!({"name": n.name, "index": n.index, "netns": n.ns.name, "cgroup": n.cgroup}))
        .collect();
    let state = json!({
        "name": lab.name,
        "pid": std::process::id(),
        "backend": lab.backend.name(),
        "dir": lab.dir(),
        "apiUrl": lab.api_url,
        "kubeconfig": lab.kubeconfig(),
        "nodes": nodes,
        // Published again whenever supervision sees an exit or makes a restart.
        "components": lab.components(),
    });
    let path = state_path(&lab.name);
    std::fs::write(&path, serde_json::to_string_pretty(&state)?)?;
    Ok(path)
}

/// The labs `kpx-lab up` processes announced, with whether each process is still alive.
fn labs() -> Vec<(Value, bool)> {
    let mut out: Vec<(Value, bool)> = std::fs::read_dir(STATE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|s| {
            let alive = s["pid"]
                .as_u64()
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            (s, alive)
        })
        .collect();
    out.sort_by(|a, b| a.0["name"].as_str().cmp(&b.0["name"].as_str()));
    out
}

/// The one running lab, or the one named.
fn pick(name: Option<&str>) -> anyhow::Result<Value> {
    let running: Vec<Value> = labs()
        .into_iter()
        .filter(|(s, alive)| *alive && name.is_none_or(|n| s["name"] == n))
        .map(|(s, _)| s)
        .collect();
    match running.len() {
        1 => Ok(running.into_iter().next().expect("one")),
        0 => bail!(
            "no running lab{}: start one with `kpx-lab up`",
            name.map(|n| format!(" named {n}")).unwrap_or_default()
        ),
        _ => bail!(
            "{} labs are running ({}): pick one with --lab NAME",
            running.len(),
            running
                .iter()
                .filter_map(|s| s["name"].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A client as the lab's admin: its kubeconfig (mode 0600, so only the lab's owner can).
fn client_of(state: &Value) -> anyhow::Result<Client> {
    let kubeconfig = state["kubeconfig"]
        .as_str()
        .context("the lab's state has no kubeconfig")?;
    Ok(Client::new(&ClientConfig::from_kubeconfig(
        Path::new(kubeconfig),
        None,
    )?)?)
}

/// `kpx-lab up`: builds the cluster, says how to use it, and keeps it until Ctrl-C/SIGTERM.
pub async fn up(nodes: usize, mode: &str, options: ClusterOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=50).contains(&nodes),
        "--nodes {nodes}: allowed values: 1 to 50"
    );
    let backend = parse_backend(mode)?;
    if let Some(reason) = backend.unsupported() {
        bail!("--proxy-mode {mode}: this machine cannot run it: {reason}");
    }
    let started = Instant::now();
    let mut lab = Lab::cluster("lab", backend, nodes, options).await?;
    let took = started.elapsed();
    let state = write_state(&mut lab)?;
    println!(
        "lab {} is up: {nodes} node(s), proxy mode {}, ready for traffic in {:.2} s",
        lab.name,
        backend.name(),
        took.as_secs_f64()
    );
    println!(
        "  export KUBECONFIG={}   # the admin's token; mode 0600",
        lab.kubeconfig().display()
    );
    println!("  kubectl get nodes -o wide");
    println!("  kpx-lab status | kpx-lab exec POD -- CMD | kpx-lab down   (or Ctrl-C here)");
    println!("  logs: {}", lab.dir().display());
    // Until Ctrl-C/SIGTERM, crashed components are restarted (supervise.rs) and the state
    // `kpx-lab status` reads is kept current.
    let shutdown = kpx_control::daemon::shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if lab.supervise_once().await {
                    if let Err(e) = write_state(&mut lab) {
                        eprintln!("kpx-lab: updating {}: {e:#}", state.display());
                    }
                }
            }
        }
    }
    println!("tearing down {}", lab.name);
    drop(lab);
    let _ = std::fs::remove_file(state);
    Ok(())
}

/// `kpx-lab status`: every lab, its nodes and its pods.
pub async fn status() -> anyhow::Result<()> {
    let all = labs();
    if all.is_empty() {
        println!("no lab is running (kpx-lab up starts one)");
        return Ok(());
    }
    for (state, alive) in all {
        let name = state["name"].as_str().unwrap_or("?");
        if !alive {
            println!(
                "{name}: its kpx-lab up process is gone; `kpx-lab down --all` removes what it left"
            );
            continue;
        }
        println!(
            "{name}: proxy mode {}, API {}, KUBECONFIG={}",
            state["backend"].as_str().unwrap_or("?"),
            state["apiUrl"].as_str().unwrap_or("?"),
            state["kubeconfig"].as_str().unwrap_or("?")
        );
        if let Some(components) = state["components"].as_array() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            print!("{}", crate::supervise::render_components(components, now));
        }
        let client = client_of(&state)?;
        // A crashed API server is what the components table above explains: say so, not fail.
        let listed = async {
            let nodes = Api::<NodeObject>::all(client.clone())
                .list(&ListParams::default())
                .await?;
            let pods = Api::<Pod>::all(client).list(&ListParams::default()).await?;
            anyhow::Ok((nodes, pods))
        };
        let (nodes, pods) = match listed.await {
            Ok(both) => both,
            Err(e) => {
                println!("  the API does not answer: {e:#}");
                continue;
            }
        };
        println!("  {:<10} {:<9} {:>5}", "NODE", "STATUS", "PODS");
        for n in &nodes.items {
            let node_name = n.metadata.name.as_deref().unwrap_or("");
            let count = pods
                .items
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name))
                .count();
            let status = if node_ready(n) { "Ready" } else { "NotReady" };
            println!("  {node_name:<10} {status:<9} {count:>5}");
        }
        let mut phases = std::collections::BTreeMap::<String, usize>::new();
        for p in &pods.items {
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into());
            *phases.entry(phase).or_default() += 1;
        }
        let summary: Vec<String> = phases.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "  pods: {}",
            if summary.is_empty() {
                "none".into()
            } else {
                summary.join(", ")
            }
        );
    }
    Ok(())
}

/// `kpx-lab exec POD -- CMD`: runs CMD in the pod's network namespace (and its node's cgroup),
/// with the kpx binaries on PATH; returns CMD's exit code.
pub async fn exec(
    lab: Option<&str>,
    namespace: &str,
    pod: &str,
    command: &[String],
) -> anyhow::Result<i32> {
    let state = pick(lab)?;
    let client = client_of(&state)?;
    let pod_obj = Api::<Pod>::namespaced(client, namespace)
        .get(pod)
        .await
        .with_context(|| format!("pod {namespace}/{pod}"))?;
    let node_name = pod_obj
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .with_context(|| format!("pod {namespace}/{pod} is not scheduled yet"))?;
    let node = state["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == node_name.as_str()))
        .with_context(|| format!("node {node_name} is not in lab {}", state["name"]))?;
    let netns = format!(
        "{}-n{}-{}",
        state["name"].as_str().unwrap_or_default(),
        node["index"],
        kpx_control::kubelet::runtime::short_uid(
            pod_obj.metadata.uid.as_deref().unwrap_or_default()
        )
    );
    let mut entry = crate::netns::Entry::open(&netns)
        .with_context(|| format!("pod {namespace}/{pod} has no sandbox (is it running?)"))?;
    if let Some(cg) = node["cgroup"].as_str() {
        entry = entry.in_cgroup(PathBuf::from(cg));
    }
    let (program, args) = command
        .split_first()
        .context("kpx-lab exec POD -- COMMAND [ARGS]")?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let program = kpx_control::kubelet::catalog::find_program(program, &path)
        .with_context(|| format!("{program:?}: not found on PATH"))?;
    let status = entry
        .command(program)?
        .args(args)
        .env("PATH", path)
        .env("HOSTNAME", pod)
        .status()?;
    Ok(status.code().unwrap_or(1))
}

/// `kpx-lab down`: asks the lab's `kpx-lab up` to tear it down and waits for it.
pub fn down(lab: Option<&str>) -> anyhow::Result<()> {
    let state = pick(lab)?;
    let name = state["name"].as_str().unwrap_or_default().to_string();
    let pid = state["pid"]
        .as_u64()
        .context("the lab's state has no pid")? as i32;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("kpx-lab up (pid {pid}) did not stop; `kpx-lab down --all` removes the lab");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(state_path(&name));
    println!("lab {name} is down");
    Ok(())
}

/// For `down --all`: asks every running `kpx-lab up` to tear its lab down, and forgets the
/// labs whose process is gone (`lab::down` removes what they left).
pub fn stop_all_labs() {
    for (state, alive) in labs() {
        let Some(name) = state["name"].as_str() else {
            continue;
        };
        if alive {
            if let Err(e) = down(Some(name)) {
                eprintln!("kpx-lab: {e:#}");
            }
        } else {
            let _ = std::fs::remove_file(state_path(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_modes_are_kube_proxys_names() {
        assert_eq!(
            parse_backend("nftables").expect("nftables"),
            ProxyBackend::Nftables
        );
        assert_eq!(
            parse_backend("iptables").expect("iptables"),
            ProxyBackend::IptablesNft
        );
        assert_eq!(parse_backend("ipvs").expect("ipvs"), ProxyBackend::Ipvs);
        let err = parse_backend("userspace")
            .expect_err("not a mode")
            .to_string();
        assert!(
            err.contains("\"userspace\"") && err.contains("nftables, ebpf, ipvs"),
            "{err}"
        );
        // Every lab backend is reachable by its mode name or its own.
        for b in crate::lab::ALL_BACKENDS {
            let parsed = parse_backend(b.name()).unwrap_or_else(|e| panic!("{}: {e}", b.name()));
            assert_eq!(parsed, *b);
        }
    }
}
