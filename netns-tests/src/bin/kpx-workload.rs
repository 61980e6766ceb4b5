//! kpx-workload: the built-in workload kpx-kubelet's image catalog runs (like agnhost's
//! netexec). It answers with its pod name and the client address it saw, over HTTP
//! (keep-alive), TCP and UDP; `--serve nginx` is a plain web server on port 80,
//! `--serve serve-hostname` answers its name on 9376, `--serve pause` only waits.

use std::net::SocketAddr;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Debug, Parser)]
#[command(name = "kpx-workload", version)]
struct Args {
    /// The name to answer with (the pod's name; kpx-kubelet sets HOSTNAME to it).
    #[arg(long, env = "POD_NAME")]
    name: Option<String>,
    /// What to serve: workload (HTTP, TCP and UDP), netexec (agnhost's: HTTP and UDP),
    /// nginx (HTTP on 80), serve-hostname (HTTP on --port, default 9376), pause (nothing).
    #[arg(long, default_value = "workload")]
    serve: String,
    /// The version an `nginx` server reports (its image tag).
    #[arg(long, default_value = "latest")]
    version_label: String,
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// TCP: sends one line and closes. UDP: answers each datagram.
    #[arg(long)]
    port: Option<u16>,
    /// Be a client instead: send `--count` requests of this kind (http, tcp, udp) to
    /// `--target`, print one outcome per line, exit. With `--latency` also http-keepalive
    /// (one connection) and udp-flow (one socket), the benchmark's loads.
    #[arg(long, value_name = "KIND")]
    client: Option<String>,
    /// ADDRESS:PORT; with `--latency --client http` a comma-separated list, taken in turn.
    #[arg(long, value_delimiter = ',')]
    target: Vec<SocketAddr>,
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
    /// With `--latency --client http`: this many connections at a time.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// With `--client http`: new connections until this pod answers (or `--timeout-ms`
    /// passes); prints `answered_at_us` with the wall-clock time of its answer.
    #[arg(long, value_name = "POD")]
    until: Option<String>,
}

fn client(args: &Args, kind: &str) -> anyhow::Result<()> {
    use kpx_lab::bench::client;
    let target = *args
        .target
        .first()
        .ok_or_else(|| anyhow::anyhow!("--client needs --target ADDRESS:PORT"))?;
    let timeout = std::time::Duration::from_millis(args.timeout_ms);
    if let Some(pod) = &args.until {
        anyhow::ensure!(kind == "http", "--until works with --client http only");
        let at = client::until_answered_by(target, pod, timeout).ok_or_else(|| {
            anyhow::anyhow!("{pod} did not answer at {target} within {timeout:?}")
        })?;
        let micros = at.duration_since(std::time::UNIX_EPOCH)?.as_micros();
        println!("answered_at_us {micros}");
        return Ok(());
    }
    if args.latency {
        let run = match kind {
            "http" => client::new_connections(&args.target, args.count, args.concurrency, timeout),
            "http-keepalive" => client::keepalive(target, args.count, timeout),
            "udp-flow" => client::udp_flow(target, args.count, timeout),
            other => anyhow::bail!(
                "--client {other:?} with --latency: allowed values: http, http-keepalive, udp-flow"
            ),
        };
        run.print();
        return Ok(());
    }
    let kind = kpx_lab::traffic::Kind::parse(kind)
        .ok_or_else(|| anyhow::anyhow!("--client {kind:?}: allowed values: http, tcp, udp"))?;
    let outcomes = kpx_lab::traffic::requests(kind, target, args.count, args.source_port, timeout);
    for o in outcomes {
        println!("{}", o.to_line());
    }
    Ok(())
}

/// What an HTTP server answers.
#[derive(Clone)]
enum Page {
    /// `name peer` (and agnhost's `/hostname`, `/clientip`, `/echo?msg=`).
    Workload(String),
    /// The name alone (serve_hostname).
    Hostname(String),
    /// nginx's welcome page, naming the pod that served it.
    Nginx { name: String, version: String },
}

impl Page {
    fn respond(&self, target: &str, peer: SocketAddr) -> (String, String, String) {
        match self {
            Page::Workload(name) => {
                let body = match target.split('?').next().unwrap_or("/") {
                    "/hostname" => name.clone(),
                    "/clientip" => peer.to_string(),
                    "/echo" => target
                        .split_once("msg=")
                        .map(|(_, m)| m.split('&').next().unwrap_or("").to_string())
                        .unwrap_or_default(),
                    _ => format!("{name} {peer}\n"),
                };
                (body, "text/plain".into(), "kpx-workload".into())
            }
            Page::Hostname(name) => (name.clone(), "text/plain".into(), "kpx-workload".into()),
            Page::Nginx { name, version } => (
                format!(
                    "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n<body>\n\
                     <h1>Welcome to nginx!</h1>\n<p>Served by pod {name} (nginx {version}, \
                     kpx built-in) to {peer}.</p>\n</body></html>\n"
                ),
                "text/html".into(),
                format!("nginx/{version} (kpx-workload)"),
            ),
        }
    }
}

async fn http(mut stream: TcpStream, peer: SocketAddr, page: Page) -> std::io::Result<()> {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).await? == 0 {
            return Ok(());
        }
        let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
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
        let (body, content_type, server) = page.respond(&target, peer);
        if let Page::Nginx { .. } = &page {
            // nginx's access log line (combined format, without the referrer and agent).
            println!(
                "{} - - [{}] \"{}\" 200 {}",
                peer.ip(),
                chrono::Utc::now().format("%d/%b/%Y:%H:%M:%S +0000"),
                request.trim_end(),
                body.len()
            );
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nServer: {server}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n{body}",
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

async fn serve_http(port: u16, page: Page) -> anyhow::Result<()> {
    // Dual-stack sockets: IPv4 clients arrive as v4-mapped addresses, shown as plain IPv4.
    let listener = TcpListener::bind(("::", port))
        .await
        .map_err(|e| anyhow::anyhow!("binding [::]:{port} (HTTP): {e}"))?;
    loop {
        if let Ok((stream, peer)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(http(stream, canonical(peer), page.clone()));
        }
    }
}

async fn serve_tcp(port: u16, name: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("::", port))
        .await
        .map_err(|e| anyhow::anyhow!("binding [::]:{port} (TCP): {e}"))?;
    loop {
        if let Ok((mut stream, peer)) = listener.accept().await {
            let line = format!("{name} {}\n", canonical(peer));
            tokio::spawn(async move {
                let _ = stream.write_all(line.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    }
}

async fn serve_udp(port: u16, name: String) -> anyhow::Result<()> {
    let udp = UdpSocket::bind(("::", port))
        .await
        .map_err(|e| anyhow::anyhow!("binding [::]:{port} (UDP): {e}"))?;
    let mut buf = vec![0u8; 2048];
    loop {
        let (_, peer) = udp.recv_from(&mut buf).await?;
        let line = format!("{name} {}\n", canonical(peer));
        let _ = udp.send_to(line.as_bytes(), peer).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(kind) = &args.client {
        return client(&args, kind);
    }
    let name = args
        .name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "kpx-workload".into());
    // Whichever server fails first (a port already taken) ends the process with its error.
    match args.serve.as_str() {
        "workload" => {
            let port = args.port.unwrap_or(9000);
            tokio::try_join!(
                serve_http(args.http_port, Page::Workload(name.clone())),
                serve_tcp(port, name.clone()),
                serve_udp(port, name),
            )?;
        }
        "netexec" => {
            tokio::try_join!(
                serve_http(args.http_port, Page::Workload(name.clone())),
                serve_udp(args.port.unwrap_or(8081), name),
            )?;
        }
        "nginx" => {
            let page = Page::Nginx {
                name,
                version: args.version_label.clone(),
            };
            serve_http(80, page).await?;
        }
        "serve-hostname" => serve_http(args.port.unwrap_or(9376), Page::Hostname(name)).await?,
        "pause" => std::future::pending::<()>().await,
        other => anyhow::bail!(
            "--serve {other:?}: allowed values: workload, netexec, nginx, serve-hostname, pause"
        ),
    }
    Ok(())
}
