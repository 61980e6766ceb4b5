//! The bounded event history behind watch, and the stream a watcher reads.
//!
//! The history is the only place events are kept: every watcher reads it through its own
//! cursor (a position, not a copy), so a thousand watchers cost no more event memory than one.
//! It is bounded by an event count and by bytes. A watcher whose next event has been evicted
//! fell behind: it gets an error and must re-list, as a kube-apiserver `cacheWatcher` that
//! cannot keep up is terminated and its client re-watches (staging/src/k8s.io/apiserver/pkg/
//! storage/cacher/cache_watcher.go, `add` → `forget`), and as a resume from a revision older
//! than the watch cache answers `410 Expired`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::sync::watch;

use super::{Event, EventKind, KeyValue, StoreError, StoreResult};

/// What an event costs beyond its key and value bytes (the `Event`, two `KeyValue`s, the
/// `Arc` counts and the ring slot), so a flood of tiny events is bounded too.
const EVENT_OVERHEAD: usize = 256;

/// The bytes an event keeps alive. Its previous value counts as well: for the oldest event of
/// a key nothing else holds it. A delete's tombstone shares its bytes with `prev`, so they are
/// counted once. This over-counts a chain of updates of one key (each `prev` is the event
/// before's value), so the real memory stays under the budget.
fn event_bytes(event: &Event) -> usize {
    let prev = match (&event.kind, &event.prev) {
        (EventKind::Put, Some(prev)) => prev.key.len() + prev.value.len(),
        _ => 0,
    };
    EVENT_OVERHEAD + event.kv.key.len() + event.kv.value.len() + prev
}

/// The last events, at most `limit` of them and at most `byte_limit` bytes (see
/// [`event_bytes`]), evicted a whole revision at a time.
pub(crate) struct History {
    events: VecDeque<Arc<Event>>,
    /// The sequence number of `events.front()`: every event pushed gets the next number, so a
    /// watcher's position stays exact when one revision holds several events.
    first_seq: u64,
    limit: usize,
    byte_limit: usize,
    bytes: usize,
    /// Watches must start after this revision: older events are gone.
    compacted: i64,
}

/// One step of a watcher's cursor through the history.
pub(crate) enum Step {
    /// The next event under the prefix; the cursor moves to `next_seq`.
    Event { event: Arc<Event>, next_seq: u64 },
    /// Nothing under the prefix up to the current revision; the cursor moves to `next_seq`.
    Idle { next_seq: u64, revision: i64 },
    /// Events the cursor had not read yet were evicted.
    Behind { oldest: i64 },
}

impl History {
    pub(crate) fn new(limit: usize, byte_limit: usize, start_revision: i64) -> Self {
        Self {
            events: VecDeque::new(),
            first_seq: 0,
            limit: limit.max(1),
            byte_limit,
            bytes: 0,
            compacted: start_revision,
        }
    }

    pub(crate) fn push(&mut self, event: Arc<Event>) {
        self.bytes += event_bytes(&event);
        self.events.push_back(event);
        // The newest revision always stays, even when it alone is over the byte budget:
        // otherwise a watcher could not be handed the change it is woken for.
        let newest = self.events.back().map_or(0, |e| e.revision());
        while self.events.len() > self.limit || self.bytes > self.byte_limit {
            let Some(oldest) = self.events.front().map(|e| e.revision()) else {
                break;
            };
            if oldest == newest {
                break;
            }
            while self.events.front().is_some_and(|e| e.revision() == oldest) {
                if let Some(gone) = self.events.pop_front() {
                    self.bytes -= event_bytes(&gone);
                    self.first_seq += 1;
                }
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

    /// The cursor of a watch that starts after `after_revision` (already [`check`]ed).
    ///
    /// [`check`]: History::check
    pub(crate) fn position(&self, after_revision: i64) -> u64 {
        let start = self
            .events
            .partition_point(|e| e.revision() <= after_revision);
        self.first_seq + start as u64
    }

    /// True when the event at `seq` is no longer kept.
    pub(crate) fn evicted(&self, seq: u64) -> bool {
        seq < self.first_seq
    }

    /// The first event under `prefix` at or after `seq`. `current` is the store's revision,
    /// read under the same lock, so `Idle` may report it as seen.
    pub(crate) fn step(&self, prefix: &str, seq: u64, current: i64) -> Step {
        if seq < self.first_seq {
            return Step::Behind {
                oldest: self.compacted + 1,
            };
        }
        let start = (seq - self.first_seq) as usize;
        for (i, event) in self
            .events
            .range(start.min(self.events.len())..)
            .enumerate()
        {
            if event.kv.key.starts_with(prefix) {
                return Step::Event {
                    event: event.clone(),
                    next_seq: seq + i as u64 + 1,
                };
            }
        }
        Step::Idle {
            next_seq: self.first_seq + self.events.len() as u64,
            revision: current,
        }
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

/// Where a [`WatchStream`] reads: the store's history, under the store's lock.
pub(crate) trait Feed: Send + Sync + 'static {
    fn step(&self, prefix: &str, seq: u64) -> Step;
    fn evicted(&self, seq: u64) -> bool;
}

/// Events for one watcher, read from the shared history through a cursor.
pub struct WatchStream {
    prefix: String,
    feed: Arc<dyn Feed>,
    /// The store's revision, sent after every commit; closed when the store shuts down.
    commits: watch::Receiver<i64>,
    seq: u64,
    last_revision: i64,
}

impl WatchStream {
    pub(crate) fn new(
        prefix: &str,
        feed: Arc<dyn Feed>,
        commits: watch::Receiver<i64>,
        seq: u64,
        after_revision: i64,
    ) -> Self {
        Self {
            prefix: prefix.to_string(),
            feed,
            commits,
            seq,
            last_revision: after_revision,
        }
    }

    /// The next event, `None` when the store closed, or [`StoreError::WatcherBehind`] when this
    /// watcher fell so far behind that events it had not read were evicted (it must re-list).
    pub async fn next(&mut self) -> Option<StoreResult<Arc<Event>>> {
        loop {
            // Marked seen before reading, so a commit after the read still wakes us.
            self.commits.borrow_and_update();
            match self.feed.step(&self.prefix, self.seq) {
                Step::Event { event, next_seq } => {
                    self.seq = next_seq;
                    self.last_revision = event.revision();
                    return Some(Ok(event));
                }
                Step::Idle { next_seq, revision } => {
                    self.seq = next_seq;
                    // Still progress: a bookmark may report this revision as seen.
                    self.last_revision = self.last_revision.max(revision);
                }
                Step::Behind { oldest } => {
                    return Some(Err(StoreError::WatcherBehind {
                        revision: self.last_revision,
                        oldest,
                    }))
                }
            }
            if self.commits.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Resolves once events this watcher has not read yet are evicted (or never, after the
    /// store closed). A watcher whose client is not reading waits on this beside its send, so
    /// it is cut off exactly when it could no longer continue without a gap.
    pub async fn fell_behind(&self) {
        let mut commits = self.commits.clone();
        loop {
            commits.borrow_and_update();
            if self.feed.evicted(self.seq) {
                return;
            }
            if commits.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The error [`next`](WatchStream::next) would give once [`fell_behind`] resolved.
    ///
    /// [`fell_behind`]: WatchStream::fell_behind
    pub fn behind_error(&self) -> StoreError {
        let oldest = match self.feed.step(&self.prefix, self.seq) {
            Step::Behind { oldest } => oldest,
            _ => self.last_revision + 1,
        };
        StoreError::WatcherBehind {
            revision: self.last_revision,
            oldest,
        }
    }

    /// The revision of the last event handed out (or the start revision).
    pub fn last_revision(&self) -> i64 {
        self.last_revision
    }
}
