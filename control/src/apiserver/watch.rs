//! `?watch=true`: a chunked stream of `{"type": ..., "object": ...}` lines, one per change,
//! starting after the requested resourceVersion (or with the current objects as ADDED when
//! none is given), with BOOKMARKs when asked and an ERROR event carrying `410 Expired` when the
//! requested version is older than the kept history.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::request::{flag, number, parse_resource_version, validate_list_options, Query, Target};
use super::response::json_bytes;
use super::{codec, store_error, ApiServer};
use crate::api::resources::ResourceInfo;
use crate::api::selector::{FieldSelector, LabelSelector};
use crate::api::table::{self, IncludeObject};
use crate::api::{meta, ApiError};
use crate::store::{Event, EventKind, KeyValue, StoreError, WatchStream};

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
    name: Option<String>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.name.as_deref().is_none_or(|n| meta::name(obj) == n)
            && self.labels.matches(meta::labels(obj))
            && self.fields.matches(obj)
    }

    fn is_empty(&self) -> bool {
        self.name.is_none() && self.labels.is_empty() && self.fields.is_empty()
    }
}

/// How each event's object is written.
struct Encoder {
    resource: &'static ResourceInfo,
    table: Option<IncludeObject>,
    headers_sent: bool,
}

impl Encoder {
    fn line(&mut self, kind: &str, obj: &Value) -> Bytes {
        let object = match self.table {
            Some(include) => {
                let rv = meta::resource_version(obj).unwrap_or("").to_string();
                let t = table::table(
                    self.resource,
                    std::slice::from_ref(obj),
                    &rv,
                    include,
                    !self.headers_sent,
                );
                self.headers_sent = true;
                t
            }
            None => obj.clone(),
        };
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }

    fn bookmark(&self, revision: i64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({
            "kind": self.resource.kind_name,
            "apiVersion": self.resource.api_version(),
            "metadata": metadata,
        });
        let mut line = json!({"type": "BOOKMARK", "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

fn error_line(err: &ApiError) -> Bytes {
    let mut line = json!({"type": "ERROR", "object": err.to_status()}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The bytes of encoded lines one watch may have waiting for its client. Events themselves
/// are shared in the store's history; this bounds only what is encoded for one client and not
/// yet taken by the connection (hyper adds at most its own write buffer, ~400 KB). A client
/// that reads keeps this nearly empty; one that does not stops here, and is cut off once the
/// history evicts what it has not read (see `deliver`). 64 KiB is a few ordinary events and
/// one large one (a line larger than the budget goes alone); hyper's own buffer (up to 16
/// lines) and the socket keep a reading client's stream full, so more buys no speed and costs
/// this much per watcher that does not read.
pub const WATCH_BUFFER_BYTES: usize = 64 * 1024;

/// The lines of one watch response, bounded in bytes: the producer waits for room, the HTTP
/// body takes lines out.
struct Outbox {
    state: std::sync::Mutex<OutboxState>,
    /// Signalled when a line is queued or the producer is done.
    readable: Notify,
    /// Signalled when a line is taken or the client went away.
    writable: Notify,
    budget: usize,
}

#[derive(Default)]
struct OutboxState {
    lines: VecDeque<Bytes>,
    bytes: usize,
    /// No more lines will come (the watch ended or was cut off).
    done: bool,
    /// The response body was dropped: the client disconnected.
    gone: bool,
}

impl Outbox {
    fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new(OutboxState::default()),
            readable: Notify::new(),
            writable: Notify::new(),
            budget,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // Every critical section leaves the queue consistent; a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `line` once it fits (a line larger than the whole budget goes alone). `Err` when
    /// the client is gone.
    async fn send(&self, line: Bytes) -> Result<(), ()> {
        loop {
            let room = self.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.lock();
                if state.gone {
                    return Err(());
                }
                if state.bytes == 0 || state.bytes + line.len() <= self.budget {
                    state.bytes += line.len();
                    state.lines.push_back(line);
                    drop(state);
                    self.readable.notify_one();
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Resolves when the client has gone away.
    async fn closed(&self) {
        loop {
            let changed = self.writable.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.lock().gone {
                return;
            }
            changed.await;
        }
    }

    /// Ends the stream with `line` as its last line, dropping what the client has not taken:
    /// those events are followed by the error anyway, which tells the client to re-list.
    fn cut_off(&self, line: Bytes) {
        let mut state = self.lock();
        state.lines.clear();
        state.bytes = line.len();
        state.lines.push_back(line);
        state.done = true;
        drop(state);
        self.readable.notify_one();
    }

    fn finish(&self) {
        self.lock().done = true;
        self.readable.notify_one();
    }

    async fn take(&self) -> Option<Bytes> {
        loop {
            let queued = self.readable.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(line) = state.lines.pop_front() {
                    state.bytes -= line.len();
                    drop(state);
                    self.writable.notify_waiters();
                    return Some(line);
                }
                if state.done {
                    return None;
                }
            }
            queued.await;
        }
    }
}

/// The response body's end of an [`Outbox`]; dropping it (the connection closed) tells the
/// producer.
struct BodyEnd(Arc<Outbox>);

impl Drop for BodyEnd {
    fn drop(&mut self) {
        self.0.lock().gone = true;
        self.0.writable.notify_waiters();
    }
}

/// The producer's end; dropping it ends the stream after the queued lines.
struct Producer(Arc<Outbox>);

impl Drop for Producer {
    fn drop(&mut self) {
        self.0.finish();
    }
}

fn stream_response(outbox: Arc<Outbox>) -> Response {
    let lines = futures::stream::unfold(BodyEnd(outbox), |end| async move {
        let line = end.0.take().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(line), end))
    });
    let mut response = json_bytes(StatusCode::OK, Bytes::new());
    *response.body_mut() = Body::from_stream(lines);
    response
}

pub async fn serve(
    server: &Arc<ApiServer>,
    target: &Target,
    query: &Query,
    table: bool,
) -> Result<Response, ApiError> {
    validate_list_options(query, true)?;
    let resource = target.resource;
    let filter = Filter {
        labels: LabelSelector::parse(query.label_selector.as_deref().unwrap_or(""))?,
        fields: FieldSelector::parse(query.field_selector.as_deref().unwrap_or(""), resource)?,
        name: target.name.clone(),
    };
    let bookmarks = flag(&query.allow_watch_bookmarks);
    let timeout = match number::<u64>(&query.timeout_seconds, "timeoutSeconds")? {
        Some(seconds) => Duration::from_secs(seconds),
        None => server.options.default_watch_timeout,
    };
    let include = if table {
        Some(IncludeObject::parse(query.include_object.as_deref())?)
    } else {
        None
    };
    let send_initial = query.send_initial_events.as_deref() == Some("true");
    let prefix = resource.namespace_prefix(target.namespace.as_deref());
    let requested = query
        .resource_version
        .as_deref()
        .filter(|v| !v.is_empty() && *v != "0")
        .map(parse_resource_version)
        .transpose()?;
    let outbox = Outbox::new(server.options.watch_buffer_bytes.max(1));
    let encoder = Encoder {
        resource,
        table: include,
        headers_sent: false,
    };

    // Without a resourceVersion (or with sendInitialEvents) the watch starts with the current
    // state as ADDED events, read at one revision the stream then continues from. The page
    // holds the stored values (shared with the store, not copies); each is decoded only when
    // its turn to be sent comes, so a client that does not read holds no decoded list, as
    // kube-apiserver's watch cache serves initial events from a snapshot of shared objects.
    let mut initial = Vec::new();
    let start = match requested {
        Some(rv) if !send_initial => rv,
        _ => {
            let page = server
                .store
                .list(&prefix, None, 0, None)
                .await
                .map_err(store_error)?;
            initial = page.kvs;
            page.revision
        }
    };
    let stream = match server.store.watch(&prefix, start) {
        Ok(stream) => stream,
        Err(e @ (StoreError::Compacted { .. } | StoreError::FutureRevision { .. })) => {
            // kube-apiserver answers 200 and sends the error as the only event.
            outbox.cut_off(error_line(&store_error(e)));
            return Ok(stream_response(outbox));
        }
        Err(e) => return Err(store_error(e)),
    };
    let bookmark_interval = server.options.bookmark_interval;
    let producer = Producer(outbox.clone());
    let out = outbox.clone();
    tokio::spawn(async move {
        let watch = Watch {
            stream,
            out: producer,
            encoder,
            filter,
        };
        let run = watch.run(
            initial,
            send_initial && bookmarks,
            start,
            bookmarks.then_some(bookmark_interval),
        );
        tokio::select! {
            _ = tokio::time::sleep(timeout) => {}
            _ = out.closed() => {}
            _ = run => {}
        }
    });
    Ok(stream_response(outbox))
}

struct Watch {
    stream: WatchStream,
    out: Producer,
    encoder: Encoder,
    filter: Filter,
}

impl Watch {
    async fn run(
        mut self,
        initial: Vec<Arc<KeyValue>>,
        initial_bookmark: bool,
        start: i64,
        bookmarks: Option<Duration>,
    ) {
        for kv in initial {
            let obj = match codec::decode(&kv) {
                Ok(obj) => obj,
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "dropping watch: stored object unreadable");
                    self.out.0.cut_off(error_line(&e));
                    return;
                }
            };
            drop(kv);
            if self.filter.matches(&obj) {
                let line = self.encoder.line("ADDED", &obj);
                drop(obj);
                if !self.deliver(line).await {
                    return;
                }
            }
        }
        if initial_bookmark && !self.deliver(self.encoder.bookmark(start, true)).await {
            return;
        }
        self.pump(bookmarks).await;
    }

    /// Hands `line` to the client's outbox. While the outbox is full the watcher waits, and is
    /// cut off (an ERROR event, `410 Expired`, then the end of the stream) as soon as the
    /// history evicts an event it has not read: past that point it could only continue with a
    /// gap. kube-apiserver likewise terminates a `cacheWatcher` whose buffer stays full
    /// (cache_watcher.go `add`), and the client re-lists. False when the watch is over.
    async fn deliver(&mut self, line: Bytes) -> bool {
        tokio::select! {
            // A client keeping up never makes the history lookup below happen.
            biased;
            sent = self.out.0.send(line) => sent.is_ok(),
            _ = self.stream.fell_behind() => {
                let err = self.stream.behind_error();
                tracing::debug!(error = %err, "cutting off a watcher that fell behind");
                self.out.0.cut_off(error_line(&store_error(err)));
                false
            }
        }
    }

    async fn pump(&mut self, bookmarks: Option<Duration>) {
        let interval = bookmarks.unwrap_or(Duration::from_secs(3600));
        loop {
            let idle = tokio::time::sleep(interval);
            let line = tokio::select! {
                _ = idle, if bookmarks.is_some() => self.encoder.bookmark(self.stream.last_revision(), false),
                next = self.stream.next() => match next {
                    None => return,
                    Some(Err(e)) => {
                        self.out.0.cut_off(error_line(&store_error(e)));
                        return;
                    }
                    Some(Ok(event)) => match watch_event(&event, &self.filter) {
                        Ok(Some((kind, obj))) => self.encoder.line(kind, &obj),
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::error!(key = %event.kv.key, error = %e, "dropping watch: stored object unreadable");
                            self.out.0.cut_off(error_line(&e));
                            return;
                        }
                    },
                },
            };
            if !self.deliver(line).await {
                return;
            }
        }
    }
}

/// The watch event a store change is for this watcher: objects moving into the selection are
/// ADDED, out of it DELETED, as kube-apiserver's watch cache reports them.
fn watch_event(event: &Event, filter: &Filter) -> Result<Option<(&'static str, Value)>, ApiError> {
    let obj = codec::decode(&event.kv)?;
    let now = filter.matches(&obj);
    let before = match (&event.prev, filter.is_empty()) {
        (None, _) => false,
        (Some(_), true) => true,
        (Some(prev), false) => filter.matches(&codec::decode(prev)?),
    };
    let kind = match event.kind {
        EventKind::Delete if before || now => "DELETED",
        EventKind::Delete => return Ok(None),
        EventKind::Put if event.prev.is_none() => {
            if !now {
                return Ok(None);
            }
            "ADDED"
        }
        EventKind::Put => match (before, now) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return Ok(None),
        },
    };
    Ok(Some((kind, obj)))
}
