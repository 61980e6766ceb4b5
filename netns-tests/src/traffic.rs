//! Traffic from inside a namespace: sockets are created on a thread that entered it, so the
//! test process reaches lab addresses without any route from the host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::netns::Netns;

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

    /// The client IP the server saw.
    pub fn client_ip(&self) -> Option<&str> {
        match self {
            Outcome::Answer { client, .. } => client.rsplit_once(':').map(|(ip, _)| ip),
            _ => None,
        }
    }

    fn parse(text: &str) -> Self {
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

/// `count` HTTP requests (new connection each) from `ns` to `target`.
pub fn http(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    ns.enter(move || (0..count).map(|_| http_once(target, timeout)).collect())
}

/// One datagram from a fresh socket (a new source port each time, so a new flow) or from
/// `source_port` when given (the same flow every time).
pub fn udp(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
    source_port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    ns.enter(move || {
        (0..count)
            .map(|_| {
                let bind: SocketAddr = if target.is_ipv4() {
                    ([0, 0, 0, 0], source_port.unwrap_or(0)).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, source_port.unwrap_or(0)).into()
                };
                let socket = match UdpSocket::bind(bind) {
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
            })
            .collect()
    })
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
