//! A full disk does not poison the store (issue 15, item 9): the real binary on a 16 MiB tmpfs,
//! mounted in a private mount namespace (the host's mounts are not touched; the mount goes
//! away with the process). Filling it makes writes fail cleanly and `/readyz` fail while
//! `/livez` stays ok; freeing the space makes writes (DELETE included) work again without a
//! restart, with every acknowledged write still there and no refused one.
//!
//! Needs root (for the mount); skipped with a message otherwise.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: Child,
    url: String,
    http: reqwest::Client,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// kpx-control with `--data-dir` on a tmpfs of `size` mounted over `dir` in a mount
    /// namespace of its own. `None` when this machine cannot do that (not root, no unshare).
    /// Its token file and certificates live in `creds`, outside the tmpfs (which only the
    /// server's mount namespace sees), so the test can read them.
    fn start_on_tmpfs(dir: &Path, creds: &Path, size: &str) -> Option<Server> {
        let token = kpx_control::apiserver::auth::random_token();
        let tokens = creds.join("tokens.csv");
        kpx_control::apiserver::auth::write_private(
            &tokens,
            &format!("{token},test-admin,test-admin,system:masters\n"),
        )
        .ok()?;
        let script = "mount -t tmpfs -o size=\"$1\" kpx-disk-full \"$0\" && \
                      exec \"$2\" --port 0 --controllers none --data-dir \"$0\" \
                      --token-auth-file \"$3\" --cert-dir \"$4\"";
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(dir)
            .arg(size)
            .arg(env!("CARGO_BIN_EXE_kpx-control"))
            .arg(&tokens)
            .arg(creds)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take()?).read_line(&mut line);
        if read.is_err() || !line.contains("https://") {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        let url = line.trim().rsplit(' ').next()?.to_string();
        let ca = std::fs::read(creds.join("ca.crt")).ok()?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).ok()?)
            .build()
            .ok()?;
        Some(Server {
            child,
            url,
            http,
            token,
        })
    }

    /// Runs `script` in the server's mount namespace (where the tmpfs is).
    fn in_its_mounts(&self, script: &str) {
        let status = Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.child.id()))
            .args(["sh", "-c", script])
            .status()
            .expect("nsenter");
        assert!(status.success(), "{script}: {status}");
    }

    /// Every HTTP call of this test goes through here (one place to add credentials).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, String) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

const EVENTS: &str = "/api/v1/namespaces/default/events";

fn event(name: &str, message_bytes: usize, tag: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "reason": tag,
        "message": "x".repeat(message_bytes),
    })
}

async fn wait_for(server: &Server, path: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = server.call(reqwest::Method::GET, path, None).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still {status} after 60 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_full_disk_fails_writes_and_readiness_and_freeing_it_recovers_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = tempfile::tempdir().expect("tempdir");
    let Some(server) = Server::start_on_tmpfs(dir.path(), creds.path(), "16m") else {
        eprintln!("skipped: needs root, unshare and tmpfs to give kpx-control a small disk");
        return;
    };
    let data = dir.path().display().to_string();
    // What the store acknowledged: name → reason (the value it must still have).
    let mut acknowledged: std::collections::BTreeMap<String, String> = Default::default();
    for i in 0..20 {
        let name = format!("before-{i:02}");
        let (status, body) = server
            .call(
                reqwest::Method::POST,
                EVENTS,
                Some(&event(&name, 1024, "Before")),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        acknowledged.insert(name, "Before".into());
    }
    assert_eq!(wait_for(&server, "/readyz", 200).await, "ok");

    // Fill the disk: dd stops at ENOSPC.
    server.in_its_mounts(&format!(
        "dd if=/dev/zero of={data}/filler bs=64k 2>/dev/null; sync; true"
    ));
    let (status, body) = server
        .call(
            reqwest::Method::POST,
            EVENTS,
            Some(&event("during-outage", 1024 * 1024, "Outage")),
        )
        .await;
    assert!(
        status == 500 || status == 503,
        "a write on a full disk must fail cleanly, got {status}: {body}"
    );
    assert!(body.contains("store"), "the error names the store: {body}");
    // Readiness says so (and keeps saying so while nothing is freed); liveness does not.
    for _ in 0..3 {
        let (status, body) = server
            .call(reqwest::Method::GET, "/readyz?verbose", None)
            .await;
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("[-]etcd failed"), "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, _) = server.call(reqwest::Method::GET, "/livez", None).await;
    assert_eq!(status, 200);
    // Writes during the outage, DELETE included, fail cleanly or (when the store could still
    // place them) succeed: whichever it says is what must be true afterwards.
    let (status, body) = server
        .call(
            reqwest::Method::POST,
            EVENTS,
            Some(&event("small-during-outage", 100, "Outage")),
        )
        .await;
    match status {
        201 => {
            acknowledged.insert("small-during-outage".into(), "Outage".into());
        }
        500 | 503 => {}
        other => panic!("unexpected {other}: {body}"),
    }
    let (status, body) = server
        .call(
            reqwest::Method::DELETE,
            &format!("{EVENTS}/before-00"),
            None,
        )
        .await;
    match status {
        200 => {
            acknowledged.remove("before-00");
        }
        500 | 503 => {}
        other => panic!("unexpected {other}: {body}"),
    }
    let (_, metrics) = server.call(reqwest::Method::GET, "/metrics", None).await;
    let failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("kpx_store_write_failures_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    assert!(failures >= 1, "{metrics}");

    // Free the space: the store reopens by itself and says it is ready again.
    server.in_its_mounts(&format!("rm -f {data}/filler"));
    wait_for(&server, "/readyz", 200).await;
    let (status, body) = server
        .call(
            reqwest::Method::POST,
            EVENTS,
            Some(&event("after-1", 512 * 1024, "After")),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    acknowledged.insert("after-1".into(), "After".into());
    let (status, body) = server
        .call(
            reqwest::Method::PUT,
            &format!("{EVENTS}/before-01"),
            Some(&event("before-01", 10, "Updated")),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    acknowledged.insert("before-01".into(), "Updated".into());
    let (status, body) = server
        .call(
            reqwest::Method::DELETE,
            &format!("{EVENTS}/before-02"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    acknowledged.remove("before-02");

    // Everything acknowledged is there with its value, and the refused write is not.
    let (status, body) = server.call(reqwest::Method::GET, EVENTS, None).await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).expect("list");
    let stored: std::collections::BTreeMap<String, String> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| {
            (
                e["metadata"]["name"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(stored, acknowledged);
    assert!(!stored.contains_key("during-outage"));
}
