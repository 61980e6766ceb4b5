//! The API server's figures, measured against the real `kpx-control` binary (release build) on
//! a durable store on disk:
//! - Service creates per second with 16 concurrent clients (10,000 creates);
//! - LIST latency of 10,000 Services;
//! - how long a change takes to reach 100 concurrent watchers (p50/p99);
//! - resident memory with 10,000 Services and 100,000 endpoints in 1,000 EndpointSlices.
//!
//! Run: `cargo bench -p kpx-control --bench apiserver` (or `cargo xtask bench`);
//! `KPX_CONTROL_BIN=/path/to/kpx-control` measures another build. Results are
//! printed and written to `target/bench-results/apiserver.json`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

const SERVICES: usize = 10_000;
const WRITERS: usize = 16;
const WATCHERS: usize = 100;
const CHANGES: usize = 100;
const SLICES: usize = 1_000;
const ENDPOINTS_PER_SLICE: usize = 100;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> Server {
    // KPX_CONTROL_BIN measures another build (e.g. an older commit's) with the same bench.
    let binary = std::env::var("KPX_CONTROL_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kpx-control").to_string());
    let mut child = Command::new(binary)
        .args(["--port", "0", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kpx-control");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let url = line.trim().rsplit(' ').next().expect("url").to_string();
    Server { child, url }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn create_services(http: &reqwest::Client, base: &str) -> f64 {
    let url = format!("{base}/api/v1/namespaces/default/services");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= SERVICES {
                        return;
                    }
                    let body = json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": format!("svc-{i:05}"), "labels": {"app": format!("app-{i:05}")}},
                        "spec": {"selector": {"app": format!("app-{i:05}")}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                    });
                    let response = http.post(&url).json(&body).send().await.expect("create");
                    assert_eq!(response.status().as_u16(), 201, "create {i}");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("writer");
    }
    SERVICES as f64 / started.elapsed().as_secs_f64()
}

async fn list_latency(http: &reqwest::Client, url: &str, runs: usize) -> (Vec<f64>, usize) {
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let body = http
            .get(url)
            .send()
            .await
            .expect("list")
            .bytes()
            .await
            .expect("body");
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = body.len();
    }
    (sorted(samples), bytes)
}

/// Starts watchers from `rv`; each records when it saw each `seq` label value.
async fn watch_fanout(http: &reqwest::Client, base: &str, rv: &str) -> (Vec<f64>, Vec<f64>) {
    type Seen = Arc<Mutex<Vec<HashMap<u64, Instant>>>>;
    let seen: Seen = Arc::new(Mutex::new(vec![HashMap::new(); WATCHERS]));
    let url = format!("{base}/api/v1/namespaces/default/services?watch=true&resourceVersion={rv}&timeoutSeconds=120");
    let mut tasks = Vec::new();
    for w in 0..WATCHERS {
        let response = http.get(&url).send().await.expect("watch");
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = response.bytes_stream();
            let mut buffer = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let now = Instant::now();
                    let event: Value = serde_json::from_slice(&line).expect("event");
                    if let Some(seq) = event
                        .pointer("/object/metadata/labels/seq")
                        .and_then(Value::as_str)
                    {
                        let seq: u64 = seq.parse().expect("seq");
                        let mut all = seen.lock().expect("lock");
                        all[w].insert(seq, now);
                        if seq as usize == CHANGES - 1 {
                            return;
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut write_started = Vec::new();
    let mut write_acked = Vec::new();
    for seq in 0..CHANGES {
        let url = format!("{base}/api/v1/namespaces/default/services/svc-{:05}", seq);
        let patch = json!({"metadata": {"labels": {"seq": seq.to_string()}}});
        let started = Instant::now();
        let response = http
            .patch(&url)
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .expect("patch");
        assert_eq!(response.status().as_u16(), 200);
        write_started.push(started);
        write_acked.push(Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("watchers finish")
            .expect("watcher");
    }
    let all = seen.lock().expect("lock");
    let mut from_write = Vec::new();
    let mut from_ack = Vec::new();
    for watcher in all.iter() {
        for seq in 0..CHANGES {
            let got = watcher
                .get(&(seq as u64))
                .expect("every watcher sees every change");
            from_write.push(got.duration_since(write_started[seq]).as_secs_f64() * 1000.0);
            from_ack.push(
                got.saturating_duration_since(write_acked[seq])
                    .as_secs_f64()
                    * 1000.0,
            );
        }
    }
    (sorted(from_write), sorted(from_ack))
}

async fn create_slices(http: &reqwest::Client, base: &str) {
    let url = format!("{base}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= SLICES {
                        return;
                    }
                    let endpoints: Vec<Value> = (0..ENDPOINTS_PER_SLICE)
                        .map(|e| {
                            json!({
                                "addresses": [format!("198.18.{}.{}", (i * ENDPOINTS_PER_SLICE + e) / 250 % 250, e % 250 + 1)],
                                "conditions": {"ready": true, "serving": true, "terminating": false},
                                "nodeName": format!("node-{}", e % 10),
                                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("pod-{i}-{e}")},
                            })
                        })
                        .collect();
                    let body = json!({
                        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": format!("svc-{i:05}-abcde"), "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
                        "addressType": "IPv4",
                        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                        "endpoints": endpoints,
                    });
                    let response = http.post(&url).json(&body).send().await.expect("create slice");
                    assert_eq!(response.status().as_u16(), 201, "slice {i}");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("writer");
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The store lives on the target directory's disk, not on a tmpfs, so fsync is real.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let server = start(dir.path());
    let pid = server.child.id();
    // kpx-control requires a token: the admin one it generated in its data directory.
    let tokens = std::fs::read_to_string(dir.path().join("tokens.csv")).expect("tokens.csv");
    let token = tokens.split(',').next().expect("a token").to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    // Served over TLS with a generated CA (`<data-dir>/ca.crt`).
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("ca.crt");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
        .default_headers(headers)
        .pool_max_idle_per_host(256)
        .build()
        .expect("http");
    runtime.block_on(async {
        println!("kpx-control API server benchmark ({} cores)", std::thread::available_parallelism().map_or(0, |n| n.get()));
        let rate = create_services(&http, &server.url).await;
        println!("creates:  {SERVICES} Services, {WRITERS} concurrent clients, durable: {rate:.0} creates/s");

        let url = format!("{}/api/v1/namespaces/default/services", server.url);
        let (list, bytes) = list_latency(&http, &url, 20).await;
        println!(
            "list:     {SERVICES} Services ({:.1} MB): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            bytes as f64 / 1e6,
            percentile(&list, 50.0),
            percentile(&list, 90.0),
            percentile(&list, 100.0)
        );
        let rv = http.get(format!("{url}?limit=1")).send().await.expect("list").json::<Value>().await.expect("json")["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
        let (from_write, from_ack) = watch_fanout(&http, &server.url, &rv).await;
        println!(
            "watch:    {CHANGES} changes x {WATCHERS} watchers: from write start p50 {:.1} ms, p99 {:.1} ms; from acknowledgement p50 {:.1} ms, p99 {:.1} ms",
            percentile(&from_write, 50.0),
            percentile(&from_write, 99.0),
            percentile(&from_ack, 50.0),
            percentile(&from_ack, 99.0)
        );

        create_slices(&http, &server.url).await;
        // Let allocator churn and buffers settle before reading memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(pid, "VmRSS:");
        let peak = rss_kib(pid, "VmHWM:");
        println!(
            "memory:   {SERVICES} Services + {} endpoints in {SLICES} EndpointSlices: RSS {:.0} MB (peak {:.0} MB)",
            SLICES * ENDPOINTS_PER_SLICE,
            rss as f64 / 1024.0,
            peak as f64 / 1024.0
        );
        let results = json!({
            "creates_per_second": rate,
            "list_10k_ms": {"p50": percentile(&list, 50.0), "p90": percentile(&list, 90.0), "max": percentile(&list, 100.0)},
            "watch_latency_ms": {
                "from_write_start": {"p50": percentile(&from_write, 50.0), "p99": percentile(&from_write, 99.0)},
                "from_ack": {"p50": percentile(&from_ack, 50.0), "p99": percentile(&from_ack, 99.0)},
            },
            "rss_mb": rss as f64 / 1024.0,
            "peak_rss_mb": peak as f64 / 1024.0,
        });
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
        let _ = std::fs::create_dir_all(&out);
        let _ = std::fs::write(out.join("apiserver.json"), serde_json::to_string_pretty(&results).unwrap_or_default());
    });
    drop(server);
}
