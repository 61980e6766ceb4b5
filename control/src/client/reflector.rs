//! A reflector: list, then watch from the list's resourceVersion, forever. It re-lists after a
//! 410 (history compacted), a dropped connection or anything it cannot understand, with
//! exponential backoff, so a consumer never silently misses a change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;
use tokio::sync::mpsc;

use super::{Api, ClientError, ListParams, Object, WatchEvent};

/// What the consumer sees: a full state (`Init`, `InitApply`*, `InitDone`) after every (re)list,
/// then changes.
#[derive(Debug, Clone)]
pub enum ReflectorEvent<K> {
    Init,
    InitApply(K),
    InitDone,
    Apply(K),
    Delete(K),
}

#[derive(Debug, Clone)]
pub struct ReflectorOptions {
    /// Selectors applied to both the list and the watch.
    pub params: ListParams,
    pub page_size: u32,
    pub watch_timeout_seconds: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ReflectorOptions {
    fn default() -> Self {
        Self {
            params: ListParams::default(),
            page_size: 500,
            watch_timeout_seconds: 300,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Counters a consumer exposes as metrics and health.
#[derive(Debug, Default)]
pub struct ReflectorStats {
    pub lists: AtomicU64,
    pub errors: AtomicU64,
}

pub struct Reflector<K> {
    pub events: mpsc::Receiver<ReflectorEvent<K>>,
    pub stats: Arc<ReflectorStats>,
}

/// Starts a reflector task; it ends when the receiver is dropped.
pub fn reflector<K>(api: Api<K>, options: ReflectorOptions) -> Reflector<K>
where
    K: Object,
{
    let (tx, rx) = mpsc::channel(1024);
    let stats = Arc::new(ReflectorStats::default());
    tokio::spawn(run(api, options, tx, stats.clone()));
    Reflector { events: rx, stats }
}

/// Why the watch loop ended.
enum Restart {
    /// Re-list; `failed` when something went wrong (the next list waits for the backoff).
    Relist {
        failed: bool,
    },
    Closed,
}

async fn run<K>(
    api: Api<K>,
    options: ReflectorOptions,
    tx: mpsc::Sender<ReflectorEvent<K>>,
    stats: Arc<ReflectorStats>,
) where
    K: Object,
{
    let mut backoff = options.backoff_min;
    loop {
        stats.lists.fetch_add(1, Ordering::Relaxed);
        let mut rv = match list_pages(&api, &options, &tx).await {
            Ok(Some(rv)) => rv,
            Ok(None) => return,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = K::KIND, error = %e, retry_in = ?backoff, "list failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(options.backoff_max);
                continue;
            }
        };
        match watch_from(&api, &options, &tx, &mut rv, &stats).await {
            Restart::Closed => return,
            // A 410 is routine: re-list at once, and a healthy cycle resets the backoff.
            Restart::Relist { failed: false } => backoff = options.backoff_min,
            Restart::Relist { failed: true } => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(options.backoff_max);
            }
        }
    }
}

/// Lists page by page, handing objects on as each page arrives (so a large list is never held
/// whole), framed by `Init` and `InitDone`. Returns the list's resourceVersion, or None when the
/// receiver is gone. A failure part-way is followed by a new `Init` on the next attempt.
async fn list_pages<K>(
    api: &Api<K>,
    options: &ReflectorOptions,
    tx: &mpsc::Sender<ReflectorEvent<K>>,
) -> Result<Option<String>, ClientError>
where
    K: Object,
{
    let mut params = options.params.clone();
    params.limit = Some(options.page_size);
    if tx.send(ReflectorEvent::Init).await.is_err() {
        return Ok(None);
    }
    loop {
        let page = api.list(&params).await?;
        for item in page.items {
            if tx.send(ReflectorEvent::InitApply(item)).await.is_err() {
                return Ok(None);
            }
        }
        match page.metadata.continue_token.filter(|t| !t.is_empty()) {
            Some(token) => params.continue_token = Some(token),
            None => {
                if tx.send(ReflectorEvent::InitDone).await.is_err() {
                    return Ok(None);
                }
                return Ok(Some(page.metadata.resource_version));
            }
        }
    }
}

async fn watch_from<K>(
    api: &Api<K>,
    options: &ReflectorOptions,
    tx: &mpsc::Sender<ReflectorEvent<K>>,
    rv: &mut String,
    stats: &ReflectorStats,
) -> Restart
where
    K: Object,
{
    let fail = |e: &ClientError| {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(kind = K::KIND, error = %e, "watch failed; re-listing");
    };
    loop {
        let mut stream = match api
            .watch(&options.params, rv, options.watch_timeout_seconds)
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                fail(&e);
                return Restart::Relist { failed: true };
            }
        };
        loop {
            let event = match stream.next().await {
                // The server ended the watch (its timeout): watch again from where we are.
                None => break,
                Some(Ok(event)) => event,
                Some(Err(e)) if e.is_gone() => {
                    tracing::info!(kind = K::KIND, resource_version = %rv, "watch history expired; re-listing");
                    return Restart::Relist { failed: false };
                }
                Some(Err(e)) => {
                    fail(&e);
                    return Restart::Relist { failed: true };
                }
            };
            let out = match event {
                WatchEvent::Bookmark(version) => {
                    *rv = version;
                    continue;
                }
                WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
                    update_rv(rv, &obj);
                    ReflectorEvent::Apply(obj)
                }
                WatchEvent::Deleted(obj) => {
                    update_rv(rv, &obj);
                    ReflectorEvent::Delete(obj)
                }
            };
            if tx.send(out).await.is_err() {
                return Restart::Closed;
            }
        }
    }
}

fn update_rv<K: Metadata<Ty = ObjectMeta>>(rv: &mut String, obj: &K) {
    if let Some(version) = obj
        .metadata()
        .resource_version
        .as_ref()
        .filter(|v| !v.is_empty())
    {
        rv.clone_from(version);
    }
}
