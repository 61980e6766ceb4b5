//! Traffic from inside a namespace: sockets are created on a thread that entered it, so the
//! test process reaches lab addresses without any route from the host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::netns::Enter;

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The answering pod's name and the client address it saw.
    Answer {
        pod: String,
        client: String,
    },
    Refused,
    TimedOut,
    Failed(String),
}

impl Outcome {
    pub fn pod(&self) -> Option<&str> {
        match self {
            Outcome::Answer { pod, .. } => Some(pod),
            _ => None,
        }
    }

    /// The client IP the server saw (without brackets for IPv6).
    pub fn client_ip(&self) -> Option<&str> {
        match self {
            Outcome::Answer { client, .. } => client
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_start_matches('[').trim_end_matches(']')),
            _ => None,
        }
    }

    fn parse(text: &str) -> Self {
        // The built-in nginx's page: "Served by pod NAME (nginx VERSION, …) to PEER.</p>".
        if let Some(rest) = text.split("Served by pod ").nth(1) {
            let pod = rest.split_whitespace().next().unwrap_or_default();
            let client = rest
                .split(") to ")
                .nth(1)
                .and_then(|c| c.split(".</p>").next())
                .unwrap_or_default();
            return Outcome::Answer {
                pod: pod.into(),
                client: client.into(),
            };
        }
        let line = text.lines().last().unwrap_or("").trim();
        match line.split_once(' ') {
            Some((pod, client)) => Outcome::Answer {
                pod: pod.into(),
                client: client.into(),
            },
            None => Outcome::Failed(format!("unexpected answer {text:?}")),
        }
    }

    fn from_error(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::TimedOut,
            _ => Outcome::Failed(e.to_string()),
        }
    }
}

fn http_once(target: SocketAddr, timeout: Duration) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return Outcome::from_error(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return Outcome::from_error(&e);
    }
    let mut response = String::new();
    match stream.read_to_string(&mut response) {
        Ok(_) => match response.split_once("\r\n\r\n") {
            Some((_, body)) => Outcome::parse(body),
            None => Outcome::Failed(format!("no HTTP body in {response:?}")),
        },
        Err(e) => Outcome::from_error(&e),
    }
}

/// A kind of client traffic, as `kpx-workload --client` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Tcp,
    Udp,
}

impl Kind {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "http" => Some(Kind::Http),
            "tcp" => Some(Kind::Tcp),
            "udp" => Some(Kind::Udp),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
        }
    }
}

/// The requests themselves, from the calling thread's namespace.
pub fn requests(
    kind: Kind,
    target: SocketAddr,
    count: usize,
    source_port: Option<u16>,
    timeout: Duration,
) -> Vec<Outcome> {
    (0..count)
        .map(|_| match kind {
            Kind::Http => http_once(target, timeout),
            Kind::Tcp => tcp_once(target, timeout),
            Kind::Udp => udp_once(target, source_port, timeout),
        })
        .collect()
}

impl Outcome {
    /// One line of `kpx-workload --client` output.
    pub fn to_line(&self) -> String {
        match self {
            Outcome::Answer { pod, client } => format!("answer {pod} {client}"),
            Outcome::Refused => "refused".into(),
            Outcome::TimedOut => "timeout".into(),
            Outcome::Failed(why) => format!("failed {}", why.replace('\n', " ")),
        }
    }

    fn from_line(line: &str) -> Self {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "answer" => Outcome::parse(rest),
            "refused" => Outcome::Refused,
            "timeout" => Outcome::TimedOut,
            _ => Outcome::Failed(rest.to_string()),
        }
    }
}

/// Runs the requests from `entry`: on a thread inside its namespace, or, when it has a cgroup
/// (a node), from a client process in that namespace and cgroup.
fn run(
    ns: &impl Enter,
    kind: Kind,
    target: SocketAddr,
    count: usize,
    source_port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    let entry = ns.entry()?;
    if entry.cgroup().is_none() {
        return entry.enter(move || requests(kind, target, count, source_port, timeout));
    }
    let mut cmd = entry.command(crate::lab::binary("kpx-workload")?)?;
    cmd.args(["--client", kind.name(), "--target", &target.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--timeout-ms", &timeout.as_millis().to_string()]);
    if let Some(port) = source_port {
        cmd.args(["--source-port", &port.to_string()]);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "client process failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(Outcome::from_line)
        .collect())
}

/// `count` HTTP requests (new connection each) from `ns` to `target`.
pub fn http(
    ns: &impl Enter,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    run(ns, Kind::Http, target, count, None, timeout)
}

/// One datagram from a fresh socket (a new source port each time, so a new flow) or from
/// `source_port` when given (the same flow every time).
pub fn udp(
    ns: &impl Enter,
    target: SocketAddr,
    count: usize,
    source_port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    run(ns, Kind::Udp, target, count, source_port, timeout)
}

/// The unspecified address of `target`'s family, with `port` (0: any), to bind a client to.
pub(crate) fn any_address(target: SocketAddr, port: u16) -> SocketAddr {
    if target.is_ipv4() {
        ([0, 0, 0, 0], port).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    }
}

fn udp_once(target: SocketAddr, source_port: Option<u16>, timeout: Duration) -> Outcome {
    let socket = match UdpSocket::bind(any_address(target, source_port.unwrap_or(0))) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let _ = socket.set_read_timeout(Some(timeout));
    if let Err(e) = socket.send_to(b"ping", target) {
        return Outcome::from_error(&e);
    }
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => Outcome::parse(&String::from_utf8_lossy(&buf[..n])),
        Err(e) => Outcome::from_error(&e),
    }
}

/// Counts answers per pod.
pub fn spread(outcomes: &[Outcome]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for o in outcomes {
        let key = o.pod().map_or_else(|| format!("{o:?}"), String::from);
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Steady traffic for `duration`: one keep-alive connection reused for a request every few
/// milliseconds, plus a new connection for each request beside it. Returns the failures seen.
pub fn steady(
    ns: &impl Enter,
    target: SocketAddr,
    duration: Duration,
) -> anyhow::Result<std::thread::JoinHandle<Vec<String>>> {
    let entry = ns.entry()?;
    Ok(std::thread::spawn(move || {
        entry
            .enter(move || {
                let mut failures = Vec::new();
                let started = std::time::Instant::now();
                let mut kept = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(e) => return vec![format!("first connect: {e}")],
                };
                let _ = kept.set_read_timeout(Some(Duration::from_secs(2)));
                let mut requests = 0;
                while started.elapsed() < duration {
                    requests += 1;
                    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n");
                    let answered = kept.write_all(request.as_bytes()).is_ok()
                        && read_one_response(&mut kept).is_some();
                    if !answered {
                        failures.push(format!("keep-alive request {requests} failed"));
                    }
                    if let Outcome::Answer { .. } = http_once(target, Duration::from_secs(2)) {
                    } else {
                        failures.push(format!("new connection {requests} failed"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                failures
            })
            .unwrap_or_else(|e| vec![e.to_string()])
    }))
}

/// One request on a new connection, for latency: the client reads the response and resets the
/// connection (SO_LINGER 0), so neither side keeps a TIME_WAIT whose tuple a later connection
/// could reuse — a benchmark must measure the dataplane, not port reuse.
pub fn http_reset_once(target: SocketAddr, timeout: Duration) -> Outcome {
    use std::os::fd::AsRawFd;
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return Outcome::from_error(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_nodelay(true);
    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return Outcome::from_error(&e);
    }
    let outcome = match read_one_response(&mut stream) {
        Some(body) => Outcome::parse(&body),
        None => Outcome::Failed("no response".into()),
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger` (a valid struct of the size given) on our own socket.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    outcome
}

/// Reads one HTTP response with a Content-Length body.
pub(crate) fn read_one_response(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let length: usize = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().parse().unwrap_or(0))
    })?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some(String::from_utf8_lossy(&body).to_string())
}

/// `GET path` on a loopback port inside `ns` (the proxy's /metrics and /healthz): status and body.
pub fn local_get(ns: &impl Enter, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    ns.entry()?
        .enter(move || -> anyhow::Result<(u16, String)> {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(2),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let code = response
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((code, body))
        })?
}

/// The value of the sample `name` (no labels) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Connects over TCP and reads the one line the workload sends.
pub fn tcp(
    ns: &impl Enter,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    run(ns, Kind::Tcp, target, count, None, timeout)
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return Outcome::from_error(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut line = String::new();
    match stream.read_to_string(&mut line) {
        Ok(_) => Outcome::parse(&line),
        Err(e) => Outcome::from_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_read_by_exact_name() {
        let text = "# HELP x\nkubeproxy_sync_full_proxy_rules_duration_seconds_sum 1.25\nkubeproxy_sync_full_proxy_rules_duration_seconds_count 2\nkubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0\n";
        assert_eq!(
            metric_value(text, "kubeproxy_sync_full_proxy_rules_duration_seconds_sum"),
            Some(1.25)
        );
        assert_eq!(
            metric_value(
                text,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
            ),
            Some(2.0)
        );
        assert_eq!(
            metric_value(text, "kubeproxy_sync_full_proxy_rules_duration_seconds"),
            None
        );
    }
}
