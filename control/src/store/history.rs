//! The bounded event history behind watch, and the stream a watcher reads.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::sync::broadcast;

use super::{Event, EventKind, KeyValue, StoreError, StoreResult};

/// The last `limit` events, evicted a whole revision at a time.
pub(crate) struct History {
    events: VecDeque<Arc<Event>>,
    limit: usize,
    /// Watches must start after this revision: older events are gone.
    compacted: i64,
}

impl History {
    pub(crate) fn new(limit: usize, start_revision: i64) -> Self {
        Self {
            events: VecDeque::new(),
            limit: limit.max(1),
            compacted: start_revision,
        }
    }

    pub(crate) fn push(&mut self, event: Arc<Event>) {
        self.events.push_back(event);
        while self.events.len() > self.limit {
            let Some(oldest) = self.events.front().map(|e| e.revision()) else {
                break;
            };
            while self.events.front().is_some_and(|e| e.revision() == oldest) {
                self.events.pop_front();
            }
            self.compacted = oldest;
        }
    }

    pub(crate) fn check(&self, after_revision: i64, current: i64) -> StoreResult<()> {
        if after_revision < self.compacted {
            return Err(StoreError::Compacted {
                requested: after_revision,
                oldest: self.compacted,
            });
        }
        if after_revision > current {
            return Err(StoreError::FutureRevision {
                requested: after_revision,
                current,
            });
        }
        Ok(())
    }

    /// Events under `prefix` newer than `after_revision`, oldest first.
    pub(crate) fn since(&self, prefix: &str, after_revision: i64) -> VecDeque<Arc<Event>> {
        let start = self
            .events
            .partition_point(|e| e.revision() <= after_revision);
        self.events
            .range(start..)
            .filter(|e| e.kv.key.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Rolls `state` (keys under `prefix`, as of now) back to how it was at `revision`.
    pub(crate) fn rewind(
        &self,
        state: &mut BTreeMap<String, Arc<KeyValue>>,
        prefix: &str,
        revision: i64,
    ) {
        for event in self.events.iter().rev() {
            if event.revision() <= revision {
                break;
            }
            if !event.kv.key.starts_with(prefix) {
                continue;
            }
            match (&event.kind, &event.prev) {
                (_, Some(prev)) => {
                    state.insert(prev.key.clone(), prev.clone());
                }
                (EventKind::Put, None) => {
                    state.remove(&event.kv.key);
                }
                (EventKind::Delete, None) => {}
            }
        }
    }
}

/// Events for one watcher: the backlog from history, then live events.
pub struct WatchStream {
    prefix: String,
    backlog: VecDeque<Arc<Event>>,
    live: broadcast::Receiver<Arc<Event>>,
    last_revision: i64,
}

impl WatchStream {
    pub(crate) fn new(
        prefix: &str,
        backlog: VecDeque<Arc<Event>>,
        live: broadcast::Receiver<Arc<Event>>,
        after_revision: i64,
    ) -> Self {
        Self {
            prefix: prefix.to_string(),
            backlog,
            live,
            last_revision: after_revision,
        }
    }

    /// The next event, `None` when the store closed, or `Compacted` when this watcher fell
    /// so far behind that events were lost (it must re-list).
    pub async fn next(&mut self) -> Option<StoreResult<Arc<Event>>> {
        if let Some(event) = self.backlog.pop_front() {
            self.last_revision = event.revision();
            return Some(Ok(event));
        }
        loop {
            match self.live.recv().await {
                Ok(event) => {
                    // Subscribed under the same lock the backlog was copied under, so live
                    // events never repeat the backlog.
                    if !event.kv.key.starts_with(&self.prefix) {
                        // Still progress: a bookmark may report this revision as seen.
                        self.last_revision = event.revision();
                        continue;
                    }
                    self.last_revision = event.revision();
                    return Some(Ok(event));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Some(Err(StoreError::Compacted {
                        requested: self.last_revision,
                        oldest: self.last_revision + 1,
                    }))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The revision of the last event handed out (or the start revision).
    pub fn last_revision(&self) -> i64 {
        self.last_revision
    }
}
