//! `?watch=true`: a chunked stream of `{"type": ..., "object": ...}` lines, one per change,
//! starting after the requested resourceVersion (or with the current objects as ADDED when
//! none is given), with BOOKMARKs when asked and an ERROR event carrying `410 Expired` when the
//! requested version is older than the kept history.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::request::{flag, number, Query, Target};
use super::response::json_bytes;
use super::{codec, store_error, ApiServer};
use crate::api::resources::ResourceInfo;
use crate::api::selector::{FieldSelector, LabelSelector};
use crate::api::table::{self, IncludeObject};
use crate::api::{meta, ApiError};
use crate::store::{Event, EventKind, StoreError, WatchStream};

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

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let lines = futures::StreamExt::map(
        ReceiverStream::new(rx),
        Ok::<Bytes, std::convert::Infallible>,
    );
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
        .filter(|v| !v.is_empty() && *v != "0");
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut encoder = Encoder {
        resource,
        table: include,
        headers_sent: false,
    };

    // Without a resourceVersion (or with sendInitialEvents) the watch starts with the current
    // state as ADDED events, read at one revision the stream then continues from.
    let mut initial = Vec::new();
    let start = match requested {
        Some(rv) if !send_initial => rv.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("invalid resourceVersion: {rv:?} is not a number"))
        })?,
        _ => {
            let page = server
                .store
                .list(&prefix, None, 0, None)
                .await
                .map_err(store_error)?;
            for kv in &page.kvs {
                let obj = codec::decode(kv)?;
                if filter.matches(&obj) {
                    initial.push(obj);
                }
            }
            page.revision
        }
    };
    let stream = match server.store.watch(&prefix, start) {
        Ok(stream) => stream,
        Err(e @ (StoreError::Compacted { .. } | StoreError::FutureRevision { .. })) => {
            // kube-apiserver answers 200 and sends the error as the only event.
            let _ = tx.send(error_line(&store_error(e))).await;
            return Ok(stream_response(rx));
        }
        Err(e) => return Err(store_error(e)),
    };
    let bookmark_interval = server.options.bookmark_interval;
    tokio::spawn(async move {
        for obj in &initial {
            if tx.send(encoder.line("ADDED", obj)).await.is_err() {
                return;
            }
        }
        if send_initial && bookmarks && tx.send(encoder.bookmark(start, true)).await.is_err() {
            return;
        }
        pump(
            stream,
            tx,
            encoder,
            filter,
            bookmarks.then_some(bookmark_interval),
            timeout,
        )
        .await;
    });
    Ok(stream_response(rx))
}

async fn pump(
    mut stream: WatchStream,
    tx: mpsc::Sender<Bytes>,
    mut encoder: Encoder,
    filter: Filter,
    bookmarks: Option<Duration>,
    timeout: Duration,
) {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let interval = bookmarks.unwrap_or(Duration::from_secs(3600));
    loop {
        let idle = tokio::time::sleep(interval);
        tokio::select! {
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            _ = idle, if bookmarks.is_some() => {
                if tx.send(encoder.bookmark(stream.last_revision(), false)).await.is_err() {
                    return;
                }
            }
            next = stream.next() => {
                let line = match next {
                    None => return,
                    Some(Err(e)) => {
                        let _ = tx.send(error_line(&store_error(e))).await;
                        return;
                    }
                    Some(Ok(event)) => match watch_event(&event, &filter) {
                        Ok(Some((kind, obj))) => encoder.line(kind, &obj),
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::error!(key = %event.kv.key, error = %e, "dropping watch: stored object unreadable");
                            let _ = tx.send(error_line(&e)).await;
                            return;
                        }
                    },
                };
                if tx.send(line).await.is_err() {
                    return;
                }
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
