//! Probes: what to check (httpGet, tcpSocket, exec), how often, and the thresholds that turn
//! results into a verdict. The checks run from the kubelet's own (node) namespace to the pod's
//! address, as kubelet's do; exec runs inside the pod.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Entry;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec { command: Vec<String> },
}

impl Check {
    /// What was checked, for the event saying it failed.
    pub fn describe(&self) -> String {
        match self {
            Check::Http { port, path } => format!("HTTP GET {path} on port {port} did not succeed"),
            Check::Tcp { port } => format!("dial tcp port {port}: no answer"),
            Check::Exec { command } => format!("command {command:?} did not exit 0"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub check: Check,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// The probe as kubelet reads it: defaults filled in, named ports resolved against the
/// container's ports. An error says what cannot be probed.
pub fn spec(probe: &Probe, ports: &[ContainerPort]) -> Result<ProbeSpec, String> {
    let port = |p: &IntOrString| -> Result<u16, String> {
        match p {
            IntOrString::Int(n) => {
                u16::try_from(*n).map_err(|_| format!("port {n} is out of range"))
            }
            IntOrString::String(name) => ports
                .iter()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| format!("no container port named {name:?}")),
        }
    };
    let check = if let Some(http) = &probe.http_get {
        Check::Http {
            port: port(&http.port)?,
            path: http.path.clone().unwrap_or_else(|| "/".into()),
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        Check::Tcp {
            port: port(&tcp.port)?,
        }
    } else if let Some(exec) = &probe.exec {
        Check::Exec {
            command: exec.command.clone().unwrap_or_default(),
        }
    } else {
        return Err("probe has no handler kpx supports (allowed: httpGet, tcpSocket, exec)".into());
    };
    let seconds =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Ok(ProbeSpec {
        check,
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

/// Consecutive results → verdict, with kubelet's thresholds. `verdict` starts as `initial`
/// (readiness: not ready; liveness: alive).
#[derive(Debug, Clone)]
pub struct Tracker {
    pub verdict: bool,
    successes: u32,
    failures: u32,
}

impl Tracker {
    pub fn new(initial: bool) -> Self {
        Self {
            verdict: initial,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one result; returns the verdict when it changed.
    pub fn record(&mut self, ok: bool, spec: &ProbeSpec) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if !self.verdict && self.successes >= spec.success_threshold {
                self.verdict = true;
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.verdict && self.failures >= spec.failure_threshold {
                self.verdict = false;
                return Some(false);
            }
        }
        None
    }
}

/// Runs one check against the pod at `ip`; `pod` enters its namespace (for exec).
pub async fn run(check: &Check, ip: IpAddr, pod: &Entry, timeout: Duration) -> bool {
    match check {
        Check::Tcp { port } => tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect(SocketAddr::new(ip, *port)),
        )
        .await
        .is_ok_and(|r| r.is_ok()),
        Check::Http { port, path } => tokio::time::timeout(timeout, http_get(ip, *port, path))
            .await
            .unwrap_or(false),
        Check::Exec { command } => {
            let Some((program, args)) = command.split_first() else {
                return false;
            };
            let Ok(cmd) = pod.command(program) else {
                return false;
            };
            let mut cmd = tokio::process::Command::from(cmd);
            cmd.args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            let Ok(mut child) = cmd.spawn() else {
                return false;
            };
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) => status.success(),
                _ => false,
            }
        }
    }
}

/// kubelet's httpGet: success is a status from 200 to 399.
async fn http_get(ip: IpAddr, port: u16, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await else {
        return false;
    };
    let host = SocketAddr::new(ip, port);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).await.is_err() {
        return false;
    }
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse::<u16>().ok())
        .is_some_and(|code| (200..400).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HTTPGetAction, TCPSocketAction};

    #[test]
    fn defaults_and_named_ports() {
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("web".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ports = [ContainerPort {
            name: Some("web".into()),
            container_port: 80,
            ..Default::default()
        }];
        let s = spec(&probe, &ports).expect("valid");
        assert_eq!(
            s.check,
            Check::Http {
                port: 80,
                path: "/".into()
            }
        );
        assert_eq!(
            (s.period, s.failure_threshold, s.success_threshold),
            (Duration::from_secs(10), 3, 1)
        );
        let bad = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("nope".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(spec(&bad, &ports)
            .expect_err("unknown port")
            .contains("\"nope\""));
    }

    #[test]
    fn thresholds_turn_results_into_verdicts() {
        let spec = ProbeSpec {
            check: Check::Tcp { port: 1 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let mut readiness = Tracker::new(false);
        assert_eq!(readiness.record(true, &spec), None);
        assert_eq!(readiness.record(true, &spec), Some(true));
        assert_eq!(readiness.record(false, &spec), None);
        assert_eq!(readiness.record(false, &spec), None);
        assert_eq!(
            readiness.record(true, &spec),
            None,
            "a success resets the failures"
        );
        for _ in 0..2 {
            assert_eq!(readiness.record(false, &spec), None);
        }
        assert_eq!(readiness.record(false, &spec), Some(false));
    }
}
