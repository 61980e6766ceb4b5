//! kpx-workload: the built-in test workload (like agnhost's netexec). It answers with its pod
//! name and the client address it saw, over HTTP (keep-alive), TCP and UDP.

use std::net::SocketAddr;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Debug, Parser)]
#[command(name = "kpx-workload", version)]
struct Args {
    /// The name to answer with (the pod's name).
    #[arg(long, env = "POD_NAME", default_value = "kpx-workload")]
    name: String,
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// TCP: sends one line and closes. UDP: answers each datagram.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Be a client instead: send `--count` requests of this kind (http, tcp, udp) to
    /// `--target`, print one outcome per line, exit.
    #[arg(long, value_name = "KIND")]
    client: Option<String>,
    #[arg(long)]
    target: Option<SocketAddr>,
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// UDP: send from this port every time (one flow).
    #[arg(long)]
    source_port: Option<u16>,
    /// Print each request's latency in microseconds (one line, space-separated) instead of
    /// the outcomes; a failed request prints as -1. HTTP connections are then reset by the
    /// client after the response, so no TIME_WAIT is left to collide with later ones.
    #[arg(long)]
    latency: bool,
}

fn client(args: &Args, kind: &str) -> anyhow::Result<()> {
    let kind = kpx_lab::traffic::Kind::parse(kind)
        .ok_or_else(|| anyhow::anyhow!("--client {kind:?}: allowed values: http, tcp, udp"))?;
    let target = args
        .target
        .ok_or_else(|| anyhow::anyhow!("--client needs --target ADDRESS:PORT"))?;
    let timeout = std::time::Duration::from_millis(args.timeout_ms);
    if args.latency {
        let samples: Vec<String> = (0..args.count)
            .map(|_| {
                let start = std::time::Instant::now();
                let outcome = match kind {
                    kpx_lab::traffic::Kind::Http => {
                        vec![kpx_lab::traffic::http_reset_once(target, timeout)]
                    }
                    _ => kpx_lab::traffic::requests(kind, target, 1, args.source_port, timeout),
                };
                match outcome.first() {
                    Some(kpx_lab::traffic::Outcome::Answer { .. }) => {
                        start.elapsed().as_micros().to_string()
                    }
                    _ => "-1".into(),
                }
            })
            .collect();
        println!("{}", samples.join(" "));
        return Ok(());
    }
    let outcomes = kpx_lab::traffic::requests(kind, target, args.count, args.source_port, timeout);
    for o in outcomes {
        println!("{}", o.to_line());
    }
    Ok(())
}

async fn http(mut stream: TcpStream, peer: SocketAddr, name: String) -> std::io::Result<()> {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).await? == 0 {
            return Ok(());
        }
        let mut close = request.contains("HTTP/1.0");
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let lower = header.to_ascii_lowercase();
            if lower == "\r\n" || lower == "\n" {
                break;
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if length > 0 {
            let mut body = vec![0u8; length];
            tokio::io::AsyncReadExt::read_exact(&mut reader, &mut body).await?;
        }
        let body = format!("{name} {peer}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        write.write_all(response.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// `[::ffff:198.19.1.10]:5000` → `198.19.1.10:5000`.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(kind) = &args.client {
        return client(&args, kind);
    }
    // Dual-stack sockets: IPv4 clients arrive as v4-mapped addresses, shown as plain IPv4.
    let http_listener = TcpListener::bind(("::", args.http_port)).await?;
    let tcp_listener = TcpListener::bind(("::", args.port)).await?;
    let udp = UdpSocket::bind(("::", args.port)).await?;
    let name = args.name.clone();
    tokio::spawn(async move {
        loop {
            if let Ok((stream, peer)) = http_listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(http(stream, canonical(peer), name.clone()));
            }
        }
    });
    let name = args.name.clone();
    tokio::spawn(async move {
        loop {
            if let Ok((mut stream, peer)) = tcp_listener.accept().await {
                let line = format!("{name} {}\n", canonical(peer));
                tokio::spawn(async move {
                    let _ = stream.write_all(line.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    });
    let mut buf = vec![0u8; 2048];
    loop {
        let (_, peer) = udp.recv_from(&mut buf).await?;
        let line = format!("{} {}\n", args.name, canonical(peer));
        let _ = udp.send_to(line.as_bytes(), peer).await;
    }
}
