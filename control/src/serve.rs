//! The HTTP serving loop with kube-apiserver's connection bounds, for any axum router (the API
//! server; the kubelet's API can use it too).
//!
//! What it bounds, and after what (`k8s.io/apiserver/pkg/server/secure_serving.go`, whose
//! `http.Server` sets `ReadHeaderTimeout: 32s`, `IdleTimeout: 90s`, `MaxHeaderBytes: 1 MiB`,
//! and `filters.WithTimeoutForNonLongRunningRequests`, `--request-timeout` 1m):
//! - **header read**: a request's header must arrive within `header_read_timeout` of its first
//!   byte (of the accept, for a connection's first request, as Go's server); slowloris clients
//!   that send half a line and stall are closed;
//! - **idle keep-alive**: a connection with no request in flight for `idle_timeout` is closed;
//!   a response still streaming (a watch, a followed log) is a request in flight, so long-lived
//!   streams are never cut by it;
//! - **request**: the handler must produce the response head within `request_timeout`, which
//!   bounds a slow request body too (it is read before the head); kube's 504 `Timeout`.
//!   Streams are not bounded once their head is out (kube exempts long-running requests);
//! - **header size**: `max_header_bytes` (hyper answers 431 beyond it);
//! - **connections**: at most `max_connections` at once, below the process's fd limit. At the
//!   limit a new connection closes the longest-waiting idle one (no request in flight — an idle
//!   keep-alive or a stalled header) and takes its place, so idle sockets can never starve
//!   ordinary requests; when every connection is busy, the new one is closed at once.
//!
//! Go's server has no connection limit; kube relies on the fd limit and max-requests-inflight.
//! Here the limit exists because a process out of fds fails its store writes, not just accepts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::api::ApiError;

/// The bounds [`serve_http`] enforces; `Default` is kube-apiserver's, with the connection limit
/// from this process's fd limit ([`default_max_connections`]).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long a shutdown waits for handlers still working on a response before dropping
    /// them (kube's `ShutdownTimeout`, 60 s). Streams already under way (watches) are not
    /// waited for: they get one more second, as kube closes watches when it stops.
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// The limits from a daemon's flags: `max_connections` 0 means [`default_max_connections`];
    /// the rest keep kube-apiserver's defaults.
    pub fn from_flags(
        max_connections: usize,
        header_read_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            max_connections: match max_connections {
                0 => default_max_connections(),
                n => n,
            },
            header_read_timeout,
            idle_timeout,
            ..Self::default()
        }
    }
}

/// kube-apiserver's `ReadHeaderTimeout`.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(32);
/// kube-apiserver's `IdleTimeout` (matches http.DefaultTransport's keep-alive timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// kube-apiserver's `--request-timeout` default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// kube-apiserver's `MaxHeaderBytes`.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            max_header_bytes: MAX_HEADER_BYTES,
            shutdown_timeout: Duration::from_secs(60),
        }
    }
}

/// The soft `RLIMIT_NOFILE` minus a reserve for everything else the process opens (the store,
/// the controllers' own client connections, log files): an eighth of the limit, at least 64;
/// never below 16. With the common 1,024 that is 896.
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    connections_for_fd_limit(soft)
}

/// [`default_max_connections`] for a given fd limit.
pub fn connections_for_fd_limit(fds: usize) -> usize {
    let reserve = (fds / 8).max(64);
    fds.saturating_sub(reserve).max(16)
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then stops
/// accepting, closes idle connections, waits for handlers working on a response (up to
/// `shutdown_timeout`), gives responses being written a second more, and returns.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, None, router, limits, shutdown).await
}

/// [`serve_http`] over TLS: each connection's handshake runs on its own task, within the
/// header timeout (Go's server bounds a handshake by its read-header timeout), and counts
/// against the connection limit like any waiting connection.
pub async fn serve_https(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, Some(tls), router, limits, shutdown).await
}

async fn serve_on(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let registry = Arc::new(Registry::default());
    let handlers = Arc::new(Handlers::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // Header and idle timeouts are kept per connection below: hyper's own header timer
        // also runs while a keep-alive connection waits, which would make the idle timeout
        // the header one.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    // Owning the connection tasks lets a finished serve_http end them all.
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE/ENFILE and aborted handshakes: wait a moment instead of spinning
                    // (as axum::serve does); the reserve keeps this rare.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(permit) = admit(&permits, &registry).await else {
            tracing::warn!(
                %peer,
                max_connections = limits.max_connections,
                "connection limit reached and every connection is busy: closing the new one"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = registry.add();
        let router = router.clone();
        let limits = limits.clone();
        let builder = builder.clone();
        let registry = registry.clone();
        let stop = stop_rx.clone();
        let handlers = handlers.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let conn = state.clone();
            match tls {
                None => {
                    serve_connection(stream, router, &builder, &limits, conn, handlers, stop).await
                }
                Some(tls) => {
                    if let Some(stream) = handshake(&tls, stream, &limits, &state, peer).await {
                        serve_connection(stream, router, &builder, &limits, conn, handlers, stop)
                            .await;
                    }
                }
            }
            registry.remove(state.id);
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    if tokio::time::timeout(limits.shutdown_timeout, handlers.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?limits.shutdown_timeout,
            "handlers still running at shutdown are dropped"
        );
    }
    // Every connection holds a permit until it ends: all of them back means all are done.
    // Watches never end by themselves, so this wait is short.
    let total = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(1), permits.acquire_many(total)).await;
    tasks.shutdown().await;
    Ok(())
}

/// The TLS handshake of a new connection, bounded by the header timeout; a connection still
/// shaking hands is waiting, so it may be evicted for a new one at the limit.
async fn handshake(
    tls: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    limits: &Limits,
    state: &ConnState,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accept = tokio::time::timeout(limits.header_read_timeout, tls.accept(stream));
    tokio::pin!(accept);
    loop {
        tokio::select! {
            done = &mut accept => return match done {
                Ok(Ok(stream)) => Some(stream),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            },
            _ = state.changed.notified() => {
                if state.evicted.swap(false, Ordering::SeqCst) {
                    tracing::debug!(%peer, "closing a connection still in its TLS handshake for a new one at the limit");
                    return None;
                }
            }
        }
    }
}

/// A permit for a new connection: a free one, or the one an evicted idle connection gives
/// back. None when every connection is busy.
async fn admit(permits: &Arc<Semaphore>, registry: &Registry) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = permits.clone().try_acquire_owned() {
        return Some(permit);
    }
    // An evicted connection ends as soon as its task runs; if it became busy in between it
    // stays, and the next idle one is tried.
    for _ in 0..3 {
        if !registry.evict_oldest_idle() {
            return None;
        }
        if let Ok(Ok(permit)) =
            tokio::time::timeout(Duration::from_secs(1), permits.clone().acquire_owned()).await
        {
            return Some(permit);
        }
    }
    None
}

async fn serve_connection<S>(
    stream: S,
    router: Router,
    builder: &hyper::server::conn::http1::Builder,
    limits: &Arc<Limits>,
    state: Arc<ConnState>,
    handlers: Arc<Handlers>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Tracked {
        inner: stream,
        state: state.clone(),
    });
    let service = {
        let state = state.clone();
        let limits = limits.clone();
        tower::service_fn(move |request: Request<hyper::body::Incoming>| {
            let in_flight = InFlight::begin(state.clone());
            let handling = handlers.begin();
            let router = router.clone();
            let timeout = limits.request_timeout;
            async move {
                let response = tokio::time::timeout(timeout, router.oneshot(request)).await;
                drop(handling);
                let response = match response {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => request_timed_out(),
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(GuardedBody {
                        inner: body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let conn = builder.serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = state.deadline(limits);
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = sleep => {
                if state.expired(limits, Instant::now()) {
                    tracing::debug!("closing a connection past its header or idle timeout");
                    return;
                }
            }
            _ = state.changed.notified() => {
                if state.evicted.swap(false, Ordering::SeqCst) && state.is_waiting() {
                    tracing::debug!("closing an idle connection for a new one at the limit");
                    return;
                }
            }
            changed = stop.changed(), if !draining => {
                // Graceful: hyper closes an idle connection now and a busy one after its
                // response; a dropped sender (serve_http gone) is a stop too.
                let _ = changed;
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Handlers working on a response head, across connections: what a shutdown waits for.
#[derive(Default)]
struct Handlers {
    running: std::sync::atomic::AtomicUsize,
    done: Notify,
}

impl Handlers {
    fn begin(self: &Arc<Self>) -> Handling {
        self.running.fetch_add(1, Ordering::SeqCst);
        Handling(self.clone())
    }

    async fn idle(&self) {
        loop {
            let done = self.done.notified();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }
}

/// One running handler; dropped when its head is ready or its future is dropped.
struct Handling(Arc<Handlers>);

impl Drop for Handling {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

/// kube's timeout filter answer: 504 `Timeout`.
fn request_timed_out() -> Response {
    ApiError::new(
        504,
        "Timeout",
        "Timeout: request did not complete within requested timeout - context deadline exceeded",
    )
    .into_response()
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in flight since `since`; `first` until its first request; `bytes_at` once a
    /// byte of the next request has arrived.
    Waiting {
        since: Instant,
        first: bool,
        bytes_at: Option<Instant>,
    },
    /// Requests whose responses have not finished (streams included).
    Busy(usize),
}

struct ConnState {
    id: u64,
    phase: Mutex<Phase>,
    /// Wakes the connection's task: a phase change that moves its deadline, or an eviction.
    changed: Notify,
    evicted: AtomicBool,
}

impl ConnState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        // Every critical section is a plain assignment: a poisoned lock holds a valid phase.
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match *self.lock() {
            Phase::Busy(_) => None,
            // Go's server: the first request's header deadline runs from the accept.
            Phase::Waiting {
                since, first: true, ..
            } => Some(since + limits.header_read_timeout),
            Phase::Waiting {
                bytes_at: Some(at), ..
            } => Some(at + limits.header_read_timeout),
            Phase::Waiting { since, .. } => Some(since + limits.idle_timeout),
        }
    }

    fn expired(&self, limits: &Limits, now: Instant) -> bool {
        self.deadline(limits).is_some_and(|at| now >= at)
    }

    fn is_waiting(&self) -> bool {
        matches!(*self.lock(), Phase::Waiting { .. })
    }

    /// The wait of an idle connection, for choosing whom to evict.
    fn waiting_since(&self) -> Option<Instant> {
        match *self.lock() {
            Phase::Waiting { since, .. } => Some(since),
            Phase::Busy(_) => None,
        }
    }

    fn bytes_arrived(&self) {
        let mut phase = self.lock();
        if let Phase::Waiting {
            bytes_at: bytes_at @ None,
            ..
        } = &mut *phase
        {
            *bytes_at = Some(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }
}

/// Marks a request in flight from its head until its response body is dropped (hyper drops it
/// once written, or when the connection goes).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(state: Arc<ConnState>) -> Self {
        {
            let mut phase = state.lock();
            *phase = match *phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                Phase::Waiting { .. } => Phase::Busy(1),
            };
        }
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut phase = self.0.lock();
            *phase = match *phase {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Waiting {
                    since: Instant::now(),
                    first: false,
                    bytes_at: None,
                },
            };
        }
        self.0.changed.notify_one();
    }
}

struct GuardedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting when bytes of a next request arrive.
struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The open connections, for evicting an idle one at the limit.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        // Inserts and removes only: a poisoned map is still a valid map.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self) -> Arc<ConnState> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            phase: Mutex::new(Phase::Waiting {
                since: Instant::now(),
                first: true,
                bytes_at: None,
            }),
            changed: Notify::new(),
            evicted: AtomicBool::new(false),
        });
        self.lock().insert(id, state.clone());
        state
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Asks the connection that has waited longest without a request in flight to close.
    /// Linear in the open connections, and only run at the limit.
    fn evict_oldest_idle(&self) -> bool {
        let oldest = self
            .lock()
            .values()
            .filter(|c| !c.evicted.load(Ordering::SeqCst))
            .filter_map(|c| c.waiting_since().map(|since| (since, c.clone())))
            .min_by_key(|(since, _)| *since)
            .map(|(_, c)| c);
        match oldest {
            Some(conn) => {
                conn.evicted.store(true, Ordering::SeqCst);
                conn.changed.notify_one();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_leaves_a_reserve_below_the_fd_limit() {
        assert_eq!(connections_for_fd_limit(1024), 896);
        assert_eq!(connections_for_fd_limit(256), 192);
        assert_eq!(connections_for_fd_limit(1 << 20), (1 << 20) - (1 << 17));
        assert_eq!(connections_for_fd_limit(40), 16);
    }

    #[test]
    fn deadlines_follow_gos_server() {
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(32),
            idle_timeout: Duration::from_secs(90),
            ..Limits::default()
        };
        let registry = Registry::default();
        let conn = registry.add();
        let set = |phase: Phase| *conn.lock() = phase;
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(500);
        // A connection's first request: the header deadline runs from the accept.
        set(Phase::Waiting {
            since: t0,
            first: true,
            bytes_at: None,
        });
        assert_eq!(
            conn.deadline(&limits),
            Some(t0 + limits.header_read_timeout)
        );
        let request = InFlight::begin(conn.clone());
        assert_eq!(conn.deadline(&limits), None, "busy: no deadline");
        drop(request);
        assert!(conn.is_waiting());
        // Between requests: the idle timeout, then the header timeout from the first byte.
        set(Phase::Waiting {
            since: t0,
            first: false,
            bytes_at: None,
        });
        assert_eq!(conn.deadline(&limits), Some(t0 + limits.idle_timeout));
        assert!(!conn.expired(&limits, t0 + Duration::from_secs(89)));
        assert!(conn.expired(&limits, t0 + limits.idle_timeout));
        set(Phase::Waiting {
            since: t0,
            first: false,
            bytes_at: Some(t1),
        });
        assert_eq!(
            conn.deadline(&limits),
            Some(t1 + limits.header_read_timeout)
        );
        assert!(registry.evict_oldest_idle());
        assert!(conn.evicted.load(Ordering::SeqCst));
        let _busy = InFlight::begin(conn.clone());
        conn.evicted.store(false, Ordering::SeqCst);
        assert!(
            !registry.evict_oldest_idle(),
            "busy connections are never evicted"
        );
    }
}
