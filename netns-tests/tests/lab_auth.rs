//! Issue 15 item 1: a local unprivileged user became root through the lab: its API answered
//! anyone on the host's loopback relay, and `nobody` created a Pod whose container (root, the
//! host's filesystem) wrote a root-owned file. Now the relay leads to an API that wants a
//! bearer token, and the only token a host user could use is in a 0600 kubeconfig.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::on_one_backend;
use k8s_openapi::api::core::v1::Pod;
use kpx_control::client::{Api, ListParams};
use kpx_lab::lab::Lab;

/// `args` run as user nobody (group nogroup, no supplementary groups), off the runtime's
/// threads: the lab's relay runs on them.
async fn as_nobody(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new("setpriv")
            .args([
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
                "--",
            ])
            .args(&args)
            .output()
            .expect("run setpriv")
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_on_the_host_cannot_use_the_labs_api() {
    on_one_backend("lab-auth", |backend| async move {
        let lab = Lab::start("auth", backend, 1, 0).await?;
        let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"evil"},
            "spec":{"nodeName":"node-1","containers":[{"name":"c","image":"busybox"}]}}"#;
        let url = format!("{}/api/v1/namespaces/default/pods", lab.api_url);
        // What the attack did: POST a Pod through the relay without credentials.
        let out = as_nobody(&[
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            pod,
            &url,
        ])
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401", "{out:?}");
        for path in ["/api/v1/pods", "/api", "/api/v1/namespaces/default/secrets"] {
            let out = as_nobody(&[
                "curl",
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{}{path}", lab.api_url),
            ])
            .await;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "401",
                "{path}: {out:?}"
            );
        }
        // Health stays public.
        let out = as_nobody(&[
            "curl",
            "-sk",
            "-m",
            "60",
            &format!("{}/healthz", lab.api_url),
        ])
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");

        // The credentials are the owner's only.
        for file in [
            "kubeconfig",
            "tokens.csv",
            "proxy.kubeconfig",
            "kubelet-client.token",
            "kubelet-tokens.csv",
            "apiserver.key",
        ] {
            let path = lab.dir().join(file);
            let mode = std::fs::metadata(&path)?.permissions().mode();
            anyhow::ensure!(mode & 0o777 == 0o600, "{file}: mode {mode:o}");
        }
        let read = as_nobody(&["cat", lab.kubeconfig().to_str().expect("path")]).await;
        anyhow::ensure!(
            !read.status.success() && read.stdout.is_empty(),
            "nobody read the lab's kubeconfig: {read:?}"
        );

        // Nothing was created, and the admin (the lab's own client) still works.
        let pods: Api<Pod> = Api::namespaced(lab.client(), "default");
        let listed = pods.list(&ListParams::default()).await?;
        anyhow::ensure!(
            listed.items.is_empty(),
            "an anonymous request created {:?}",
            listed
                .items
                .iter()
                .map(|p| &p.metadata.name)
                .collect::<Vec<_>>()
        );
        Ok(())
    })
    .await;
}
