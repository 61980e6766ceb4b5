//! kpx-control: the API server on the embedded store.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kpx_control::api::allocator::ServiceNetwork;
use kpx_control::apiserver::auth::{kubeconfig_yaml, random_token, TokenAuthenticator, UserInfo};
use kpx_control::apiserver::{self, ApiServer, Options};
use kpx_control::store::{EmbeddedStore, EmbeddedStoreOptions, Store};

/// A Kubernetes-compatible API server (Services, EndpointSlices, Pods, Nodes, workloads) on a
/// durable embedded store.
#[derive(Debug, Parser)]
#[command(name = "kpx-control", version)]
struct Args {
    /// Address to serve the API on (HTTPS; every request but health and version needs a
    /// bearer token).
    #[arg(long, env = "KPX_BIND_ADDRESS", default_value = "127.0.0.1")]
    bind_address: IpAddr,
    /// Port to serve the API on (0 picks a free one; the address is printed on start).
    #[arg(long, env = "KPX_PORT", default_value_t = 8080)]
    port: u16,
    /// Accepted for older scripts; no longer needed: the API is TLS with authentication on every
    /// address.
    #[arg(long, hide = true)]
    insecure_bind_any: bool,
    /// The serving certificate (PEM, the chain after it), as kube-apiserver's flag. Without it
    /// a CA and a certificate for the bound address, loopback and the host name are generated
    /// into --cert-dir (kept across restarts).
    #[arg(long, requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The private key of --tls-cert-file (PEM).
    #[arg(long, requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,
    /// Where a generated certificate is kept (`apiserver.crt`, `apiserver.key`, `ca.crt`);
    /// defaults to --data-dir.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Directory of the embedded store.
    #[arg(long, env = "KPX_DATA_DIR", default_value = "/var/lib/kpx-control")]
    data_dir: PathBuf,
    /// CIDR(s) ClusterIPs are allocated from: one, or one per IP family for dual-stack.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: String,
    /// Port range NodePorts are allocated from.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// CIDR(s) a Service's spec.externalIPs may come from (comma-separated). Empty (the
    /// default): no new external IP is accepted, as kube-apiserver's DenyServiceExternalIPs
    /// admission plugin — an external IP makes every node capture traffic to that address
    /// (CVE-2020-8554).
    #[arg(long, default_value = "", value_parser = parse_cidrs)]
    service_external_ip_cidrs: Cidrs,
    /// Watch events kept in memory for watchers resuming from an older resourceVersion.
    #[arg(long, default_value_t = 20_000)]
    watch_history: usize,
    /// Bytes of keys and values the watch history may hold (events older than the budget are
    /// dropped, and resuming from them gets 410 Expired). Watchers read this history in place,
    /// so it bounds what every watcher together keeps. The default holds 20,000 ordinary
    /// objects and over 40 of the largest (3 MiB).
    #[arg(long, default_value_t = kpx_control::store::DEFAULT_HISTORY_BYTES)]
    watch_history_bytes: usize,
    /// Bytes of encoded events one watch may have waiting for a client that does not read.
    /// While it is full the watcher waits; once the history drops an event it has not read, it
    /// gets an ERROR (410 Expired) and the stream ends, and the client re-lists.
    #[arg(long, default_value_t = apiserver::WATCH_BUFFER_BYTES)]
    watch_buffer_bytes: usize,
    /// Seconds between BOOKMARK events on idle watches that asked for them.
    #[arg(long, default_value_t = 10)]
    bookmark_interval_seconds: u64,
    /// Controllers to run beside the API server (kube-controller-manager's): a comma-separated
    /// list of endpointslice, replicaset (ReplicaSets and ReplicationControllers), deployment,
    /// nodelifecycle, scheduler, garbagecollector (cascading deletion), or none.
    #[arg(
        long,
        default_value = "endpointslice,replicaset,deployment,nodelifecycle,scheduler,garbagecollector"
    )]
    controllers: String,
    /// Seconds a node may stay silent before it is marked Ready=Unknown.
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_period_seconds: u64,
    /// Seconds after that before the silent node's pods are evicted.
    #[arg(long, default_value_t = 300)]
    pod_eviction_timeout_seconds: u64,
    /// Most client connections open at once (kube-apiserver has no such flag). At the limit a
    /// new connection closes the longest-idle one; if all are busy, it is closed. 0: the fd
    /// limit (RLIMIT_NOFILE, raised at start to the hard limit as Go programs do) minus a
    /// reserve of an eighth (at least 64), e.g. 896 for 1,024.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// How long a client may take to send a request's header, from its first byte (from the
    /// accept for a connection's first request); kube-apiserver's ReadHeaderTimeout.
    #[arg(long, default_value = "32s", value_parser = kpx_control::daemon::parse_duration)]
    header_read_timeout: Duration,
    /// How long a keep-alive connection may wait with no request in flight before it is
    /// closed; kube-apiserver's IdleTimeout. Streams (watches, followed logs) are requests in
    /// flight and are not cut by it.
    #[arg(long, default_value = "90s", value_parser = kpx_control::daemon::parse_duration)]
    idle_connection_timeout: Duration,
    /// How long a request may take until its response starts (reading its body included);
    /// then 504 Timeout. kube-apiserver's --request-timeout; streams are bounded only until
    /// their first byte.
    #[arg(long, default_value = "1m", value_parser = kpx_control::daemon::parse_duration)]
    request_timeout: Duration,
    /// kube-apiserver's static token file: `token,user,uid[,"group1,group2"]` per line. Without
    /// it, `<data-dir>/tokens.csv` is used (created with one admin token when missing) and
    /// `<data-dir>/admin.kubeconfig` is written for it.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// A file holding the bearer token sent to kubelets for `pods/log` (the role of
    /// kube-apiserver's --kubelet-client-certificate).
    #[arg(long)]
    kubelet_client_token_file: Option<PathBuf>,
    /// A PEM bundle kubelets' serving certificates must chain to for `pods/log`, as
    /// kube-apiserver's flag; without it kubelets are reached over https unverified.
    #[arg(long)]
    kubelet_certificate_authority: Option<PathBuf>,
}

/// The generated admin identity (kube's `system:masters` group: everything is allowed).
const ADMIN_USER: &str = "kpx-admin";

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    kpx_control::apiserver::auth::write_private(path, text)
        .with_context(|| format!("writing {}", path.display()))
}

/// The API's authenticator: `--token-auth-file`, or the data directory's generated token file
/// (and its admin kubeconfig for `server`).
fn authenticator(args: &Args, server: &str, ca_pem: &str) -> anyhow::Result<TokenAuthenticator> {
    if let Some(path) = &args.token_auth_file {
        let auth = TokenAuthenticator::from_file(path).context("--token-auth-file")?;
        if auth.is_empty() {
            tracing::warn!(path = %path.display(), "--token-auth-file holds no tokens: only the controllers can use the API");
        }
        return Ok(auth);
    }
    let path = args.data_dir.join("tokens.csv");
    if !path.exists() {
        let token = random_token();
        write_private(
            &path,
            &format!("{token},{ADMIN_USER},{ADMIN_USER},system:masters\n"),
        )?;
        tracing::info!(path = %path.display(), "created an admin token");
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let auth = TokenAuthenticator::parse(&path.display().to_string(), &text)?;
    // The admin token is the first line naming the admin user.
    let admin = text.lines().find_map(|l| {
        let mut f = l.split(',');
        let token = f.next()?.trim();
        (f.next()?.trim() == ADMIN_USER && !token.is_empty()).then(|| token.to_string())
    });
    match admin {
        Some(token) => {
            let config = args.data_dir.join("admin.kubeconfig");
            write_private(
                &config,
                &kubeconfig_yaml("kpx", server, ca_pem, ADMIN_USER, &token, None),
            )?;
            tracing::info!(kubeconfig = %config.display(), "the admin kubeconfig (kubectl --kubeconfig {})", config.display());
        }
        None => {
            tracing::warn!(path = %path.display(), "no {ADMIN_USER} token in it: no admin kubeconfig written")
        }
    }
    Ok(auth)
}

/// The TLS acceptor and the PEM of the CA clients should trust: from --tls-cert-file (its last
/// certificate is taken as the CA), or generated into --cert-dir for `hosts` when missing.
fn serving_tls(
    args: &Args,
    hosts: &[String],
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    use kpx_control::apiserver::tls;
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (cert_file, key_file, ca_pem) = match (&args.tls_cert_file, &args.tls_private_key_file) {
        (Some(cert), Some(key)) => {
            let text = String::from_utf8_lossy(&read(cert)?).to_string();
            let last = text
                .rfind("-----BEGIN CERTIFICATE-----")
                .map(|i| text[i..].to_string())
                .with_context(|| {
                    format!("--tls-cert-file {}: no certificate in it", cert.display())
                })?;
            (cert.clone(), key.clone(), last)
        }
        _ => {
            let dir = args
                .cert_dir
                .clone()
                .unwrap_or_else(|| args.data_dir.clone());
            kpx_control::daemon::create_private_dir(&dir, "--cert-dir")
                .with_context(|| format!("--cert-dir {}: cannot create it", dir.display()))?;
            let (cert, key, ca) = (
                dir.join("apiserver.crt"),
                dir.join("apiserver.key"),
                dir.join("ca.crt"),
            );
            if !(cert.exists() && key.exists() && ca.exists()) {
                let generated = tls::self_signed(hosts)?;
                write_private(&key, &generated.key_pem)?;
                write_private(&cert, &generated.cert_pem)?;
                write_private(&ca, &generated.ca_pem)?;
                tracing::info!(cert = %cert.display(), hosts = %hosts.join(","), "generated a self-signed serving certificate");
            }
            let ca_pem = String::from_utf8_lossy(&read(&ca)?).to_string();
            (cert, key, ca_pem)
        }
    };
    let acceptor = tls::acceptor(&read(&cert_file)?, &read(&key_file)?)
        .with_context(|| format!("loading {} and {}", cert_file.display(), key_file.display()))?;
    Ok((acceptor, ca_pem))
}

/// A comma-separated CIDR list (clap needs one type for the whole flag value).
#[derive(Debug, Clone)]
struct Cidrs(Vec<ipnet::IpNet>);

fn parse_cidrs(text: &str) -> Result<Cidrs, String> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| format!("{c:?} is not a CIDR (e.g. 192.0.2.0/24 or 2001:db8::/64)"))
        })
        .collect::<Result<_, _>>()
        .map(Cidrs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("info");
    let args = Args::parse();
    // Before the connection limit is derived from it (see `--max-connections`).
    kpx_control::daemon::raise_fd_limit();
    for (flag, value) in [
        ("--header-read-timeout", args.header_read_timeout),
        ("--idle-connection-timeout", args.idle_connection_timeout),
        ("--request-timeout", args.request_timeout),
    ] {
        if value.is_zero() {
            bail!("{flag} 0: must be a positive duration such as 30s");
        }
    }
    let network = ServiceNetwork::parse(
        &args.service_cluster_ip_range,
        &args.service_node_port_range,
    )
    .map_err(anyhow::Error::msg)?;
    kpx_control::daemon::create_private_dir(&args.data_dir, "--data-dir")
        .with_context(|| format!("--data-dir {}: cannot create it", args.data_dir.display()))?;
    let db = args.data_dir.join("kpx.redb");
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(
            &db,
            EmbeddedStoreOptions {
                history_limit: args.watch_history,
                history_bytes: args.watch_history_bytes,
            },
        )
        .with_context(|| format!("opening the store at {}", db.display()))?,
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.bind_address, args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.bind_address, args.port))?;
    let address = listener.local_addr()?;
    let controllers: Vec<&str> = args
        .controllers
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "none")
        .collect();
    const KNOWN: [&str; 6] = [
        "endpointslice",
        "replicaset",
        "deployment",
        "nodelifecycle",
        "scheduler",
        "garbagecollector",
    ];
    if let Some(unknown) = controllers.iter().find(|c| !KNOWN.contains(c)) {
        bail!(
            "--controllers {unknown:?}: allowed values: {}, none",
            KNOWN.join(", ")
        );
    }
    // Clients reach an unspecified bind address through loopback.
    let reachable = if address.ip().is_unspecified() {
        let ip: IpAddr = match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        SocketAddr::new(ip, address.port())
    } else {
        address
    };
    let url = format!("https://{reachable}");
    let mut hosts: Vec<String> = vec![reachable.ip().to_string()];
    for extra in [
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "localhost".to_string(),
        kpx_control::daemon::hostname(),
    ] {
        if !extra.is_empty() && !hosts.contains(&extra) {
            hosts.push(extra);
        }
    }
    let (acceptor, ca_pem) = serving_tls(&args, &hosts)?;
    let mut authenticator = authenticator(&args, &url, &ca_pem)?;
    // The in-process controllers' identity: a random token held only in memory, as
    // kube-apiserver's loopback client (`AuthorizeClientBearerToken`: user system:apiserver in
    // system:masters).
    let loopback_token = random_token();
    authenticator.insert(
        &loopback_token,
        UserInfo {
            name: "system:apiserver".into(),
            uid: uuid::Uuid::new_v4().to_string(),
            groups: vec!["system:authenticated".into(), "system:masters".into()],
        },
    );
    let kubelet_client_token = match &args.kubelet_client_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("--kubelet-client-token-file {}", path.display()))?
                .trim()
                .to_string();
            if token.is_empty() {
                bail!(
                    "--kubelet-client-token-file {}: the file is empty",
                    path.display()
                );
            }
            Some(token)
        }
        None => None,
    };
    let kubelet_certificate_authority = match &args.kubelet_certificate_authority {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("--kubelet-certificate-authority {}", path.display()))?;
            if let Err(e) = kpx_control::apiserver::check_kubelet_certificate_authority(&pem) {
                bail!(
                    "--kubelet-certificate-authority {}: not a PEM certificate bundle: {e}",
                    path.display()
                );
            }
            Some(pem)
        }
        None => None,
    };
    let options = Options {
        service_network: network,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_seconds.max(1)),
        advertise_address: Some(address),
        watch_buffer_bytes: args.watch_buffer_bytes.max(1),
        limits: kpx_control::serve::Limits {
            request_timeout: args.request_timeout,
            ..kpx_control::serve::Limits::from_flags(
                args.max_connections,
                args.header_read_timeout,
                args.idle_connection_timeout,
            )
        },
        authenticator: Some(Arc::new(authenticator)),
        kubelet_client_token,
        kubelet_certificate_authority,
        own_addresses: vec![address.ip()],
        service_external_ip_cidrs: args.service_external_ip_cidrs.0.clone(),
        ..Default::default()
    };
    let server = ApiServer::new(store, options)
        .await
        .map_err(|e| anyhow::anyhow!("starting the API server: {e}"))?;
    // The first line on stdout is the address, for scripts and tests that pass --port 0.
    println!("kpx-control listening on https://{address}");
    tracing::info!(%address, store = %db.display(), revision = server.store().current_revision(), "serving");
    if !controllers.is_empty() {
        // The controllers use the API like any client, through the address just bound.
        let mut config = kpx_control::client::ClientConfig::from_url(&url);
        config.token = Some(loopback_token);
        config.ca_pem = Some(ca_pem.clone().into_bytes());
        let client = kpx_control::client::Client::new(&config)?;
        use kpx_control::controllers::*;
        for name in &controllers {
            match *name {
                "endpointslice" => drop(endpointslice_sync::spawn(client.clone())),
                "replicaset" => drop(replicaset_sync::spawn(client.clone())),
                "deployment" => drop(deployment_sync::spawn(client.clone())),
                "scheduler" => drop(scheduler_sync::spawn(client.clone())),
                "garbagecollector" => drop(garbagecollector_sync::spawn(client.clone())),
                "nodelifecycle" => drop(nodelifecycle_sync::spawn(
                    client.clone(),
                    nodelifecycle::Timing {
                        grace: Duration::from_secs(args.node_monitor_grace_period_seconds),
                        eviction: Duration::from_secs(args.pod_eviction_timeout_seconds),
                    },
                )),
                _ => unreachable!("checked against KNOWN above"),
            }
        }
        tracing::info!(controllers = %controllers.join(","), "controllers running");
    }
    apiserver::serve_tls(listener, acceptor, server, kpx_control::daemon::shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}
