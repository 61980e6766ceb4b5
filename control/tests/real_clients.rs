//! Real clients against the real binary: Debian's kubectl and the official Python client.
//! Skipped with the reason when a client is missing, failed instead under
//! `KPX_REQUIRE_CLIENTS=1` (`cargo xtask test` installs them and sets it).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::{kubectl, require_tool, ServerProcess};
use k8s_openapi::api::core::v1::Service;
use kpx_control::client::{Api, Patch};
use serde_json::{json, Value};

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args);
        cmd
    }

    /// Runs kubectl; returns stdout, panicking with stderr when it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {stderr}\n{stdout}"
        );
        stdout
    }
}

const SERVICE_YAML: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  labels:
    app: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

/// Lines a child prints, read on a thread so the test can wait with a deadline.
fn lines_of(stdout: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    matches: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + common::patience();
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if matches(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("timed out waiting for {what}; saw {seen:?}");
}

#[tokio::test]
async fn kubectl_applies_gets_watches_patches_and_deletes_a_service() {
    let Some(bin) = kubectl() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("data"), 0, &[]);
    let k = Kubectl {
        bin,
        kubeconfig: server.kubeconfig(dir.path()),
        cache: dir.path().join("cache"),
    };
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, SERVICE_YAML).expect("write manifest");
    let applied = k.run(&["apply", "-f", manifest.to_str().expect("path")]);
    assert_eq!(applied.trim(), "service/web created");

    let yaml: Value =
        serde_yaml::from_str(&k.run(&["get", "service", "web", "-o", "yaml"])).expect("yaml");
    let ip = yaml["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    assert!(
        ip.starts_with("10.9") || ip.starts_with("10.10") || ip.starts_with("10.11"),
        "{ip}"
    );
    assert_eq!(yaml["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(yaml["spec"]["ports"][0]["protocol"], "TCP");
    assert!(
        yaml["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );

    let table = k.run(&["get", "services"]);
    let mut rows = table.lines();
    let header: Vec<&str> = rows.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let row: Vec<&str> = rows.next().expect("row").split_whitespace().collect();
    assert_eq!(
        row[..5],
        ["web", "ClusterIP", ip.as_str(), "<none>", "80/TCP"]
    );

    // kubectl get -w sees a change another client makes.
    let mut watch = k
        .command(&["get", "services", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch");
    let lines = lines_of(watch.stdout.take().expect("stdout"));
    wait_for_line(&lines, "the initial row", |l| l.starts_with("web "));
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    api.patch(
        "web",
        Patch::StrategicMerge,
        &json!({"spec": {"ports": [{"name": "metrics", "port": 9100}]}}),
    )
    .await
    .expect("patch from another client");
    wait_for_line(&lines, "the change in the watch", |l| {
        l.contains("80/TCP,9100/TCP")
    });
    let _ = watch.kill();
    let _ = watch.wait();

    // kubectl apply of an edited manifest: a three-way merge that keeps the other client's port.
    let edited = SERVICE_YAML
        .replace("targetPort: 8080", "targetPort: 9090")
        .replace("    app: web\nspec", "    app: web\n    tier: front\nspec");
    std::fs::write(&manifest, edited).expect("write edited manifest");
    assert_eq!(
        k.run(&["apply", "-f", manifest.to_str().expect("path")])
            .trim(),
        "service/web configured"
    );
    let now: Value =
        serde_json::from_str(&k.run(&["get", "service", "web", "-o", "json"])).expect("json");
    assert_eq!(now["metadata"]["labels"]["tier"], "front");
    let ports: Vec<(i64, i64)> = now["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap_or(0),
                p["targetPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(ports, [(80, 9090), (9100, 9100)]);
    assert_eq!(
        now["spec"]["clusterIP"],
        ip.as_str(),
        "apply keeps the allocated ClusterIP"
    );

    assert_eq!(
        k.run(&["delete", "-f", manifest.to_str().expect("path")])
            .trim(),
        "service \"web\" deleted"
    );
    let gone = k.command(&["get", "service", "web"]).output().expect("run");
    assert!(!gone.status.success());
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("services \"web\" not found"),
        "{stderr}"
    );
}

fn python_with_kubernetes() -> Option<PathBuf> {
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require_tool(
        "python3 with the kubernetes package",
        ok.then(|| PathBuf::from("python3")),
        "pip install kubernetes",
    )
}

#[tokio::test]
async fn the_official_python_client_lists_and_watches_services() {
    let Some(python) = python_with_kubernetes() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("data"), 0, &[]);
    let kubeconfig = server.kubeconfig(dir.path());
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let existing: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "existing", "labels": {"suite": "python"}},
        "spec": {"ports": [{"port": 80}]},
    }))
    .expect("service");
    api.create(&existing).await.expect("create");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/list_watch.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(&kubeconfig)
        .args(["existing", "from-rust"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    wait_for_line(&lines, "the Python list", |l| l.starts_with("LISTED "));
    let mut created = existing.clone();
    created.metadata.name = Some("from-rust".into());
    created.metadata.labels = None;
    api.create(&created).await.expect("create");
    wait_for_line(&lines, "the Python watch event", |l| {
        l == "EVENT ADDED from-rust"
    });
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "the Python client failed");
}
