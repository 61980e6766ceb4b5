//! The loads, each a bounded process started as a [`Client`] (a pod's namespace, its
//! node's cgroup, the load core): `kpx-workload --client …` for HTTP and UDP, iperf3 for TCP
//! throughput. Every one is killed if it outlives its deadline.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::Context;

use super::client::Run;
use super::cpus::Placement;
use crate::lab::binary;
use crate::netns::Entry;

/// Where a load's processes start: the client pod's namespace and cgroup, on the load core.
pub struct Client {
    pub entry: Entry,
    pub placement: Placement,
}

impl Client {
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut cmd = self.entry.command(program)?;
        self.placement.pin_command(&mut cmd)?;
        Ok(cmd)
    }
}

/// How long a request may take before it counts as failed.
const REQUEST_TIMEOUT_MS: u64 = 2000;

async fn output(mut cmd: Command, deadline: Duration, what: &str) -> anyhow::Result<String> {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .with_context(|| format!("{what} still ran after {deadline:?}; killed"))??;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

async fn workload(
    client: &Client,
    kind: &str,
    targets: &[SocketAddr],
    count: usize,
    extra: &[String],
) -> anyhow::Result<Run> {
    let target: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let target = target.join(",");
    let mut cmd = client.command(binary("kpx-workload")?)?;
    cmd.args(["--client", kind, "--latency", "--target", &target])
        .args(["--count", &count.to_string()])
        .args(["--timeout-ms", &REQUEST_TIMEOUT_MS.to_string()])
        .args(extra);
    // Bounded: every request has its timeout; the whole run at worst all of them, plus slack.
    let deadline =
        Duration::from_millis(REQUEST_TIMEOUT_MS * 3) + Duration::from_millis(count as u64 * 5);
    let text = output(
        cmd,
        deadline,
        &format!("kpx-workload --client {kind} to {target}"),
    )
    .await?;
    Run::parse(&text)
}

/// New connections, one HTTP request each, reset after the answer; `concurrency` at a time,
/// over `targets` in turn.
pub async fn new_connections(
    client: &Client,
    targets: &[SocketAddr],
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Run> {
    workload(
        client,
        "http",
        targets,
        count,
        &["--concurrency".into(), concurrency.to_string()],
    )
    .await
}

/// HTTP requests on one kept-alive connection.
pub async fn keepalive(client: &Client, target: SocketAddr, count: usize) -> anyhow::Result<Run> {
    workload(client, "http-keepalive", &[target], count, &[]).await
}

/// UDP request/response over one flow.
pub async fn udp_flow(client: &Client, target: SocketAddr, count: usize) -> anyhow::Result<Run> {
    workload(client, "udp-flow", &[target], count, &[]).await
}

/// TCP throughput of one iperf3 stream for `seconds`, in Gbit/s received.
pub async fn iperf(client: &Client, target: SocketAddr, seconds: u32) -> anyhow::Result<f64> {
    let mut cmd = client.command("iperf3")?;
    cmd.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ])
    .args([
        "-t",
        &seconds.to_string(),
        "-J",
        "--connect-timeout",
        "2000",
    ]);
    let deadline = Duration::from_secs(u64::from(seconds) + 15);
    let text = output(cmd, deadline, &format!("iperf3 -c {target}")).await?;
    let report: serde_json::Value = serde_json::from_str(&text).context("iperf3 -J output")?;
    if let Some(error) = report["error"].as_str() {
        anyhow::bail!("iperf3 to {target}: {error}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("iperf3 to {target} reported no received throughput"))
}

/// A poller started before an API write: new connections to `target` until `pod` answers.
pub struct Poller(tokio::task::JoinHandle<anyhow::Result<String>>);

pub fn poll_until(
    client: &Client,
    target: SocketAddr,
    pod: &str,
    within: Duration,
) -> anyhow::Result<Poller> {
    let mut cmd = client.command(binary("kpx-workload")?)?;
    cmd.args(["--client", "http", "--target", &target.to_string()])
        .args([
            "--until",
            pod,
            "--timeout-ms",
            &within.as_millis().to_string(),
        ]);
    let what = format!("waiting for {pod} behind {target}");
    Ok(Poller(tokio::spawn(async move {
        output(cmd, within + Duration::from_secs(5), &what).await
    })))
}

impl Poller {
    /// When `pod` first answered (wall clock).
    pub async fn answered(self) -> anyhow::Result<SystemTime> {
        let text = self.0.await??;
        let micros: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("answered_at_us "))
            .with_context(|| format!("the poller printed no answer time: {text:?}"))?
            .trim()
            .parse()?;
        Ok(SystemTime::UNIX_EPOCH + Duration::from_micros(micros))
    }
}

/// Empties the connection tracking tables of `entries` (`conntrack -F`), so no run inherits
/// another's entries.
pub async fn flush_conntrack(entries: &[&Entry]) -> anyhow::Result<()> {
    for entry in entries {
        let mut cmd = entry.command("conntrack")?;
        cmd.arg("-F");
        // Its exit status is no use here: it fails where conntrack has never been loaded
        // (nothing to flush); a spawn failure has surfaced above as `?`.
        let _ = output(cmd, Duration::from_secs(10), "conntrack -F").await;
    }
    Ok(())
}
