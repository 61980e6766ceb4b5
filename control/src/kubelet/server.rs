//! The kubelet's API the API server proxies to (port 10250): `GET /containerLogs/NS/POD/CONTAINER`
//! with `follow`, `previous`, `tailLines` and `limitBytes`, read from the container log files
//! (`<pod-log-dir>/<ns>_<pod>_<uid>/<container>/<restart>.log`).
//!
//! Served over TLS ([`super::tls`]), as the real kubelet, so the API server's token never
//! crosses the node network in clear, and through kpx-control's bounded serving loop.
//!
//! Every pod can reach this port, so, as the kubelet's `--authentication-token-webhook` /
//! `--anonymous-auth=false` setups do, every request must carry one of the accepted bearer
//! tokens (`--authentication-token-file`; without one, everything is refused). And only
//! regular files inside the log directory are ever served: the names are validated as kube
//! validates them (namespace and container: DNS-1123 labels; pod: DNS-1123 subdomain), no
//! component may be a symlink, the log file is opened `O_NOFOLLOW | O_NONBLOCK` and checked
//! with `fstat` before any read (a FIFO would otherwise block the reader forever), and all
//! file I/O runs on the blocking pool in bounded chunks, never on the async runtime's threads.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::Shared;
use crate::api::query::parse_bool;
use crate::apiserver::auth::{bearer, TokenAuthenticator};
use crate::serve::Limits;

/// What one blocking read takes from a log file: memory per request stays this size.
const CHUNK: usize = 64 * 1024;
/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// What the log API needs: where the logs are and whose tokens to accept (`None`: nobody's).
#[derive(Clone)]
pub struct LogApi {
    pub log_dir: PathBuf,
    pub tokens: Option<Arc<TokenAuthenticator>>,
}

#[derive(Debug, Default, PartialEq)]
struct LogQuery {
    follow: bool,
    previous: bool,
    tail_lines: Option<u64>,
    limit_bytes: Option<u64>,
    pod_uid: Option<String>,
}

fn parse_query(raw: Option<&str>) -> Result<LogQuery, String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| format!("query: {e}"))?;
    let mut q = LogQuery::default();
    for (key, value) in pairs {
        match key.as_str() {
            // PodLogOptions' booleans decode as the API server's do (never a 400).
            "follow" => q.follow = parse_bool(&value),
            "previous" => q.previous = parse_bool(&value),
            // kube: tailLines must be >= 0, limitBytes > 0 (`ValidatePodLogOptions`).
            "tailLines" => {
                q.tail_lines = Some(value.parse::<u64>().map_err(|_| {
                    format!("tailLines: invalid value {value:?}: must be an integer >= 0")
                })?)
            }
            "limitBytes" => {
                q.limit_bytes = Some(value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(
                    || format!("limitBytes: invalid value {value:?}: must be an integer > 0"),
                )?)
            }
            "podUID" if !value.is_empty() => {
                let ok = value.len() <= 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !ok {
                    return Err(format!(
                        "podUID: invalid value {value:?}: must be a UID (letters, digits and '-', at most 64)"
                    ));
                }
                q.pod_uid = Some(value);
            }
            _ => {}
        }
    }
    Ok(q)
}

/// A DNS-1123 label (kube's `IsDNS1123Label`): at most 63 of `[a-z0-9-]`, alphanumeric at
/// both ends.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain (kube's `IsDNS1123Subdomain`): at most 253, labels joined by dots.
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn validate_names(namespace: &str, pod: &str, container: &str) -> Result<(), String> {
    if !is_dns1123_label(namespace) {
        return Err(format!(
            "namespace: invalid value {namespace:?}: must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)"
        ));
    }
    if !is_dns1123_subdomain(pod) {
        return Err(format!(
            "pod: invalid value {pod:?}: must be a DNS-1123 subdomain (lower-case labels joined by '.', at most 253)"
        ));
    }
    if !is_dns1123_label(container) {
        return Err(format!(
            "container: invalid value {container:?}: must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)"
        ));
    }
    Ok(())
}

/// Why a log cannot be served, as the answer says it.
enum Refusal {
    NotFound(String),
    Bad(String),
    Internal(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::NotFound(m) => (StatusCode::NOT_FOUND, m).into_response(),
            Refusal::Bad(m) => (StatusCode::BAD_REQUEST, m).into_response(),
            Refusal::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m).into_response(),
        }
    }
}

/// Whether `path` is a directory itself, not a symlink to one.
fn real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

/// The pod's log directory: the one of `uid`, else the most recently written one of that name.
/// Only real directories directly under `root` count.
fn pod_dir(root: &Path, namespace: &str, pod: &str, uid: Option<&str>) -> Option<PathBuf> {
    let prefix = format!("{namespace}_{pod}_");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix(&prefix)
                .is_some_and(|rest| uid.is_none_or(|u| rest == u))
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The container's log files (`<n>.log`), oldest run first. Rotated pieces (`<n>.log.<ts>`,
/// [`super::logs`]) are parts of a run, not runs, so they are not listed: the current run is
/// its live file, and `previous` the run before it, as the kubelet serves them.
fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_suffix(".log")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// The offset where the last `n` lines of the first `len` bytes start (a final newline ends
/// the last line, it does not start another), read backwards in chunks.
fn tail_offset(file: &File, len: u64, n: u64) -> io::Result<u64> {
    if n == 0 {
        return Ok(len);
    }
    let mut end = len;
    let mut seen = 0;
    let mut buf = vec![0u8; CHUNK];
    let mut skip_final = true;
    while end > 0 {
        let start = end.saturating_sub(CHUNK as u64);
        let want = (end - start) as usize;
        file.read_exact_at(&mut buf[..want], start)?;
        for i in (0..want).rev() {
            let at = start + i as u64;
            if buf[i] == b'\n' {
                if skip_final && at == len - 1 {
                    continue;
                }
                seen += 1;
                if seen == n {
                    return Ok(at + 1);
                }
            }
        }
        skip_final = false;
        end = start;
    }
    Ok(0)
}

/// Up to [`CHUNK`] bytes (and at most `max`) at `offset`.
fn read_chunk(file: &File, offset: u64, max: u64) -> io::Result<Vec<u8>> {
    let want = (CHUNK as u64).min(max) as usize;
    let mut buf = vec![0u8; want];
    let got = file.read_at(&mut buf, offset)?;
    buf.truncate(got);
    Ok(buf)
}

/// The chosen log, open: what the streaming part needs.
struct OpenLog {
    file: Arc<File>,
    path: PathBuf,
    container_dir: PathBuf,
    start: u64,
}

fn locate(
    root: &Path,
    namespace: &str,
    pod: &str,
    container: &str,
    q: &LogQuery,
) -> Result<OpenLog, Refusal> {
    let Some(dir) = pod_dir(root, namespace, pod, q.pod_uid.as_deref()) else {
        return Err(Refusal::NotFound(format!(
            "container \"{container}\" in pod \"{pod}\" has no logs on this node"
        )));
    };
    let container_dir = dir.join(container);
    let files = if real_dir(&container_dir) {
        runs(&container_dir)
    } else {
        Vec::new()
    };
    let chosen = if q.previous {
        files.len().checked_sub(2).map(|i| files[i].clone())
    } else {
        files.last().cloned()
    };
    let Some(path) = chosen else {
        let what = if q.previous {
            "previous terminated container"
        } else {
            "container"
        };
        return Err(Refusal::NotFound(format!(
            "{what} \"{container}\" in pod \"{pod}\" not found"
        )));
    };
    let file = super::logs::open_regular(&path, false).map_err(|e| {
        tracing::warn!(path = %path.display(), error = %e, "a container log that is not a regular file was refused");
        Refusal::Bad(format!(
            "the log of container \"{container}\" in pod \"{pod}\" is not a regular file"
        ))
    })?;
    let len = file
        .metadata()
        .map_err(|e| Refusal::Internal(format!("reading the log: {e}")))?
        .len();
    let start = match q.tail_lines {
        Some(n) => tail_offset(&file, len, n)
            .map_err(|e| Refusal::Internal(format!("reading the log: {e}")))?,
        None => 0,
    };
    Ok(OpenLog {
        file: Arc::new(file),
        path,
        container_dir,
        start,
    })
}

/// Whether a followed log is over: a newer run started, or the container's logs are gone.
fn follow_over(log: &Path, container_dir: &Path) -> bool {
    !real_dir(container_dir) || runs(container_dir).last().map(PathBuf::as_path) != Some(log)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn container_logs(
    State(api): State<Arc<LogApi>>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = match parse_query(raw.as_deref()).and_then(|q| {
        validate_names(&namespace, &pod, &container)?;
        Ok(q)
    }) {
        Ok(q) => q,
        Err(message) => return Refusal::Bad(message).into_response(),
    };
    let follow = q.follow && !q.previous;
    let limit = q.limit_bytes.unwrap_or(u64::MAX);
    let root = api.log_dir.clone();
    let located = blocking(move || locate(&root, &namespace, &pod, &container, &q)).await;
    let log = match located {
        Some(Ok(log)) => log,
        Some(Err(refusal)) => return refusal.into_response(),
        None => return Refusal::Internal("the log reader failed".into()).into_response(),
    };
    // (the log at its next offset, bytes limitBytes still allows): each step reads one chunk on
    // the blocking pool; at the end, a followed log polls for more until its container runs
    // again.
    let stream = futures::stream::unfold((log, limit), move |(log, left)| async move {
        let mut offset = log.start;
        if left == 0 {
            return None;
        }
        loop {
            let file = log.file.clone();
            let chunk = blocking(move || read_chunk(&file, offset, left)).await?;
            match chunk {
                Ok(bytes) if !bytes.is_empty() => {
                    let n = bytes.len() as u64;
                    let next = OpenLog {
                        start: offset + n,
                        ..log
                    };
                    return Some((Ok::<_, io::Error>(bytes), (next, left - n)));
                }
                Ok(_) if follow => {
                    // Log rotation truncates the live file in place (copytruncate, see
                    // [`super::logs`]): once it is shorter than what was sent, the container
                    // writes from its start again, so follow continues there (as `tail -F`
                    // does on truncation; the kubelet's own follow reopens the rotated file).
                    let file = log.file.clone();
                    let len = blocking(move || file.metadata().map(|m| m.len())).await?;
                    if len.is_ok_and(|len| len < offset) {
                        offset = 0;
                        continue;
                    }
                    let (path, dir) = (log.path.clone(), log.container_dir.clone());
                    if blocking(move || follow_over(&path, &dir)).await? {
                        return None;
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                Ok(_) => return None,
                Err(e) => {
                    tracing::warn!(path = %log.path.display(), error = %e, "reading a container log");
                    return None;
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The kubelet API's authentication: one of the accepted bearer tokens, or 401 (no tokens
/// configured: always 401).
async fn authenticate(State(api): State<Arc<LogApi>>, request: Request, next: Next) -> Response {
    let allowed = match (&api.tokens, bearer(request.headers())) {
        (Some(tokens), Some(Some(token))) => tokens.authenticate(&token).is_some(),
        _ => false,
    };
    if allowed {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, "Unauthorized").into_response()
    }
}

/// The kubelet API's routes, behind authentication.
pub fn router(api: LogApi) -> Router {
    let api = Arc::new(api);
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .with_state(api.clone())
        .layer(axum::middleware::from_fn_with_state(api, authenticate))
}

/// Where and how the kubelet API is served: its listener, over TLS as the real kubelet
/// (`--tls-cert-file` or a self-signed certificate, see [`super::tls`]), within the API
/// server's connection bounds.
pub struct ApiListener {
    pub listener: tokio::net::TcpListener,
    pub tls: tokio_rustls::TlsAcceptor,
    pub limits: Limits,
}

/// Serves `api` on `listener` over TLS until `shutdown` resolves, through the bounded loop
/// kpx-control serves with ([`crate::serve::serve_https`]): handshake and header timeouts, an
/// idle timeout and a connection limit, so slowloris clients and idle sockets from pods cannot
/// exhaust the kubelet (the kubelet's own server sets `IdleTimeout: 90s` and
/// `MaxHeaderBytes: 1 MiB`, `pkg/kubelet/server/server.go` `ListenAndServeKubeletServer`).
/// Followed logs are streams, which no timeout cuts once their head is out.
pub async fn serve_api(
    listener: ApiListener,
    api: LogApi,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    crate::serve::serve_https(
        listener.listener,
        listener.tls,
        router(api),
        listener.limits,
        shutdown,
    )
    .await
}

/// Serves the kubelet API until the process ends.
pub async fn serve(shared: Arc<Shared>, listener: ApiListener) {
    let api = LogApi {
        log_dir: shared.config.log_dir.clone(),
        tokens: shared.config.api_tokens.clone(),
    };
    if shared.config.api_tokens.is_none() {
        tracing::warn!("no --authentication-token-file: the kubelet API refuses every request");
    }
    if let Err(e) = serve_api(listener, api, std::future::pending()).await {
        tracing::warn!(error = %e, "the kubelet API server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, n: u64) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        std::fs::write(&path, text).expect("write");
        let file = File::open(&path).expect("open");
        let start = tail_offset(&file, text.len() as u64, n).expect("tail");
        text[start as usize..].to_string()
    }

    #[test]
    fn tail_lines() {
        assert_eq!(lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(lines("a\nb\nc", 1), "c");
        assert_eq!(lines("a\n", 5), "a\n");
        assert_eq!(lines("a\nb\n", 0), "");
        let long: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(lines(&long, 3), "line 49997\nline 49998\nline 49999\n");
    }

    #[test]
    fn rotated_pieces_are_not_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "0.log",
            "0.log.20260101-000000.000000",
            "1.log",
            "1.log.20260101-000001.000000",
            "1.log.20260101-000002.000000.tmp",
            "2.log.20260101-000003.000000",
        ] {
            std::fs::write(dir.path().join(name), name).expect("write");
        }
        let runs: Vec<_> = runs(dir.path())
            .into_iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().to_string())
            .collect();
        assert_eq!(runs, ["0.log", "1.log"]);
    }

    #[test]
    fn names_and_queries_are_validated() {
        assert!(validate_names("default", "web-1.x", "c").is_ok());
        for (ns, pod, c) in [
            ("default", "p", "/tmp/x"),
            ("default", "p", ".."),
            ("..", "p", "c"),
            ("default", "../..", "c"),
            ("default", "p", "C"),
            ("a_b", "p", "c"),
        ] {
            assert!(validate_names(ns, pod, c).is_err(), "{ns} {pod} {c}");
        }
        assert_eq!(
            parse_query(Some("follow=True&tailLines=3&limitBytes=10")).expect("ok"),
            LogQuery {
                follow: true,
                tail_lines: Some(3),
                limit_bytes: Some(10),
                ..Default::default()
            }
        );
        // Booleans as kube's parameter codec: anything but 0 and false is true.
        assert_eq!(
            parse_query(Some("follow=yes&previous=FALSE")).expect("ok"),
            LogQuery {
                follow: true,
                ..Default::default()
            }
        );
        for bad in ["tailLines=-1", "limitBytes=0", "podUID=../x"] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
