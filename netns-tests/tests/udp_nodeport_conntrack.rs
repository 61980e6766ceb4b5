//! Stale UDP conntrack entries for a NodePort (kube-proxy's `CleanStaleEntries` clears them by
//! NodePort as well as by Service IP): the upstream e2e case "should be able to preserve UDP
//! traffic when server pod cycles for a NodePort service". A client on another node keeps one
//! UDP flow (one source port) to `<node 1>:<nodePort>`; the server pod is deleted and a new
//! one started; the same flow must reach the new pod instead of the conntrack entry that still
//! points at the old one.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kpx_lab::lab::Lab;
use serde_json::json;

/// The longest the client sends (one datagram per 100 ms).
const SENDING: Duration = Duration::from_secs(60);

/// A client sending one datagram every 100 ms from `source_port` (so always the same flow)
/// until `stop` or `SENDING`; records which pod answered each (the workload answers
/// "POD CLIENT"), `None` for no answer.
struct Flow {
    answers: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
}

impl Flow {
    fn start(lab: &Lab, from: &str, target: SocketAddr, source_port: u16) -> anyhow::Result<Self> {
        let entry = lab.pod(from).ns.entry()?;
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, done) = (answers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            entry.enter(move || -> anyhow::Result<()> {
                let socket = UdpSocket::bind(("0.0.0.0", source_port))?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                let started = Instant::now();
                let mut buf = [0u8; 512];
                while !done.load(Ordering::Relaxed) && started.elapsed() < SENDING {
                    let sent = Instant::now();
                    socket.send_to(b"ping", target)?;
                    let answer = match socket.recv_from(&mut buf) {
                        Ok((n, _)) => String::from_utf8_lossy(&buf[..n])
                            .split_whitespace()
                            .next()
                            .map(String::from),
                        Err(_) => None,
                    };
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(answer);
                    if let Some(rest) = Duration::from_millis(100).checked_sub(sent.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
                Ok(())
            })
        });
        Ok(Self {
            answers,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until the flow has been answered by `pod` since answer number `since`; returns
    /// the number of answers so far.
    async fn until_answered_by(&self, lab: &Lab, pod: &str, since: usize) -> anyhow::Result<usize> {
        let patience = std::env::var("KPX_TEST_PATIENCE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(patience);
        loop {
            {
                let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
                if answers
                    .iter()
                    .skip(since)
                    .any(|a| a.as_deref() == Some(pod))
                {
                    return Ok(answers.len());
                }
                let finished = self.thread.as_ref().is_none_or(|t| t.is_finished());
                if finished || tokio::time::Instant::now() > deadline {
                    let last: Vec<_> = answers.iter().rev().take(10).collect();
                    anyhow::bail!(
                        "the flow was never answered by {pod} (client finished: {finished}); last answers {last:?}\n--- conntrack (node-1) ---\n{}\n{}",
                        conntrack_of(lab),
                        lab.proxy_logs()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn len(&self) -> usize {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Node 1's UDP conntrack entries, for a failure message.
fn conntrack_of(lab: &Lab) -> String {
    lab.nodes[0]
        .ns
        .command("conntrack")
        .args(["-L", "-p", "udp"])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flow_to_a_node_port_follows_the_server_pod_being_replaced() {
    on_every_backend("udp-nodeport-conntrack", |backend| async move {
        let mut lab = Lab::start("udpnp", backend, 2, 0).await?;
        lab.add_pod(0, "server-1").await?;
        lab.add_pod(1, "client").await?;
        let svc = create_service(
            &lab,
            "udp",
            json!({"type": "NodePort", "ports": [{"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 9000}]}),
        )
        .await?;
        let udp_port = json!([{"name": "udp", "port": 9000, "protocol": "UDP"}]);
        set_endpoints(&lab, "udp", &[ready("server-1")], udp_port.clone()).await?;
        let target = SocketAddr::new(IpAddr::V4(lab.nodes[0].ip), node_port(&svc));

        let flow = Flow::start(&lab, "client", target, 40080)?;
        let seen = flow.until_answered_by(&lab, "server-1", 0).await?;

        // The server pod is deleted (its endpoint goes away), and the flow goes on meanwhile.
        lab.stop_pod("server-1");
        set_endpoints(&lab, "udp", &[], udp_port.clone()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while flow.len() < seen + 10 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A new server pod (a new address) on the same node.
        lab.add_pod(0, "server-2").await?;
        set_endpoints(&lab, "udp", &[ready("server-2")], udp_port).await?;
        let since = flow.len();
        flow.until_answered_by(&lab, "server-2", since).await?;
        Ok(())
    })
    .await;
}
