//! The lab looking after itself: a crashed component is restarted and reported, one stopped on
//! purpose is left alone, and a failed start keeps its logs and says what failed.

mod common;

use std::time::Duration;

use common::*;
use kpx_lab::lab::Lab;
use kpx_lab::traffic;
use serde_json::json;

fn web_spec() -> serde_json::Value {
    json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]})
}

fn proxy_status(lab: &mut Lab) -> kpx_lab::supervise::ComponentStatus {
    lab.components()
        .into_iter()
        .find(|c| c.name == "node-1/kpx-proxy")
        .expect("the proxy is a component")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9ed_proxy_is_restarted_and_programs_new_services() {
    // Supervision does not depend on the backend: one is enough.
    on_one_backend("supervised-proxy", |backend| async move {
        let mut lab = Lab::start("sup", backend, 1, 0).await?;
        lab.add_pod(0, "web-a").await?;
        lab.add_pod(0, "client").await?;
        let pid = lab.proxy_pid(0).expect("the proxy runs");
        // Behind the lab's back, as the OOM killer or an operator would.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        // A Service made after the crash: before supervision it was never programmed.
        let svc = create_service(&lab, "after-crash", web_spec()).await?;
        set_endpoints(&lab, "after-crash", &[ready("web-a")], http_port()).await?;
        let vip = target(cluster_ip(&svc), 80);
        let client = lab.pod("client").ns.entry()?;
        // The test restarts nothing: it only waits, while the lab supervises.
        let answered = lab
            .supervise_while(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    let outcomes = traffic::http(&client, vip, 3, TIMEOUT)?;
                    if all_answer(&outcomes) {
                        return Ok(outcomes);
                    }
                    if tokio::time::Instant::now() > deadline {
                        anyhow::bail!("the new Service never answered: {outcomes:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
            .await;
        let status = proxy_status(&mut lab);
        answered.map_err(|e| anyhow::anyhow!("{e:#}\n{status:?}\n{}", lab.proxy_logs()))?;
        anyhow::ensure!(
            status.state == "running" && status.restarts == 1,
            "one restart reported: {status:?}"
        );
        anyhow::ensure!(
            status.pid.is_some_and(|p| p != pid),
            "a new process: {status:?}"
        );
        anyhow::ensure!(
            status
                .last_exit
                .as_deref()
                .is_some_and(|e| e.contains("SIGKILL")),
            "the exit is reported: {status:?}"
        );
        let log = std::fs::read_to_string(lab.log_path("supervisor"))?;
        anyhow::ensure!(
            log.contains("node-1/kpx-proxy exited by itself (signal 9 (SIGKILL))")
                && log.contains("node-1/kpx-proxy restarted (restart 1)"),
            "logged: {log}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_stopped_on_purpose_is_not_restarted() {
    on_one_backend("supervised-stop", |backend| async move {
        let mut lab = Lab::start("supstop", backend, 1, 0).await?;
        lab.stop_proxy(0);
        // Longer than the first back-off: a restart, if one were (wrongly) due, would be made.
        lab.supervise_while(tokio::time::sleep(kpx_lab::supervise::FIRST_BACKOFF * 3))
            .await;
        let status = proxy_status(&mut lab);
        anyhow::ensure!(
            status.state == "stopped" && status.restarts == 0 && lab.proxy_pid(0).is_none(),
            "left stopped: {status:?}"
        );
        // Started again by the lab, it is supervised again.
        lab.start_proxy(0)?;
        lab.supervise_once().await;
        let status = proxy_status(&mut lab);
        anyhow::ensure!(
            status.state == "running" && status.restarts == 0,
            "running again: {status:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_keeps_its_logs_and_says_why() {
    on_one_backend("failed-start", |backend| async move {
        let error = match Lab::start_with_api_args(
            "badstart",
            backend,
            1,
            0,
            vec!["--no-such-flag-kpx".into()],
        )
        .await
        {
            Ok(_) => anyhow::bail!("kpx-control with an unknown flag started"),
            Err(e) => format!("{e:#}"),
        };
        anyhow::ensure!(
            error.contains("kpx-control exited while starting (exit status: 2)"),
            "says it exited, and how: {error}"
        );
        anyhow::ensure!(
            error.contains("--no-such-flag-kpx"),
            "shows the end of its log: {error}"
        );
        let dir = error
            .split("its logs are kept in ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(std::path::PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("no log directory in: {error}"))?;
        let log = dir.join("kpx-control.log");
        let kept = std::fs::read_to_string(&log);
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('-'))
            .map(|(lab, _)| lab.to_string())
            .unwrap_or_default();
        // Remove it before judging, so a failed check leaves nothing behind either.
        let _ = std::fs::remove_dir_all(&dir);
        let kept = kept.map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
        anyhow::ensure!(kept.contains("--no-such-flag-kpx"), "the kept log: {kept}");
        anyhow::ensure!(name.starts_with("kpx-badstart-"), "{name}");
        let left = kpx_lab::netns::list(&format!("{name}-"));
        anyhow::ensure!(left.is_empty(), "namespaces left: {left:?}");
        if let Some(root) = kpx_control::netns::cgroup2_root() {
            anyhow::ensure!(!root.join(&name).exists(), "cgroup left");
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9ed_kubelet_and_api_server_are_restarted_and_pods_still_start() {
    use k8s_openapi::api::core::v1::Pod;
    use kpx_control::client::Api;
    on_one_backend("supervised-cluster", |backend| async move {
        let mut lab = Lab::cluster(
            "supcl",
            backend,
            1,
            kpx_lab::cluster::ClusterOptions::default(),
        )
        .await?;
        let before = lab.components();
        let pid_of = |name: &str| {
            before
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.pid)
                .ok_or_else(|| anyhow::anyhow!("{name} is not running: {before:?}"))
        };
        for name in ["node-1/kpx-kubelet", "kpx-control"] {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid_of(name)? as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "after-crash"},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}}))?;
        let pods = Api::<Pod>::namespaced(lab.client(), "default");
        // Only waiting: the API comes back, the pod is created, the kubelet runs it.
        let running = lab
            .supervise_while(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let mut created = false;
                loop {
                    if !created {
                        created = pods.create(&pod).await.is_ok();
                    }
                    let phase = match pods.get("after-crash").await {
                        Ok(p) => p.status.and_then(|s| s.phase),
                        Err(_) => None,
                    };
                    if phase.as_deref() == Some("Running") {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() > deadline {
                        anyhow::bail!("the pod is not Running (created: {created}, {phase:?})");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
            .await;
        let after = lab.components();
        running.map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\n{after:?}\n{}",
                std::fs::read_to_string(lab.log_path("supervisor")).unwrap_or_default()
            )
        })?;
        for name in ["node-1/kpx-kubelet", "kpx-control"] {
            let c = after
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| anyhow::anyhow!("no {name}"))?;
            anyhow::ensure!(
                c.state == "running" && c.restarts == 1,
                "{name}: one restart: {c:?}"
            );
        }
        let proxy = after
            .iter()
            .find(|c| c.name == "node-1/kpx-proxy")
            .ok_or_else(|| anyhow::anyhow!("no proxy"))?;
        anyhow::ensure!(proxy.restarts == 0, "the proxy kept running: {proxy:?}");

        // Unsupervised, a dead proxy is what readiness reports, with how it ended.
        let pid = proxy.pid.ok_or_else(|| anyhow::anyhow!("no proxy pid"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        // The deadline only bounds how long the (certain) failure takes to report.
        let error = match lab.wait_ready(Duration::from_secs(2)).await {
            Ok(()) => anyhow::bail!("ready without a proxy"),
            Err(e) => format!("{e:#}"),
        };
        anyhow::ensure!(
            error.contains("node-1: kpx-proxy exited (signal: 9 (SIGKILL))"),
            "names the node and how its proxy ended: {error}"
        );
        Ok(())
    })
    .await;
}
