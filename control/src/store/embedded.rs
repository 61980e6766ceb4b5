//! The embedded store: redb on disk for durability, an in-memory index for reads and watch.
//!
//! A single writer thread group-commits: it takes every transaction waiting in its queue,
//! checks their preconditions in order (each sees the ones before it), writes them in one redb
//! transaction, commits with fsync, and only then publishes the changes to readers and watchers
//! and acknowledges the callers. So a caller never sees success for a write a crash can lose,
//! and concurrent writers share one fsync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

use super::history::{Feed, History, Step, WatchStream};
use super::{
    Event, EventKind, KeyValue, ListResult, Op, OpResult, Precondition, Store, StoreError,
    StoreHealth, StoreResult,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Written and removed again after a reopen, to prove the disk takes writes before the store
/// says it is ready.
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
const REVISION_KEY: &str = "revision";
/// Transactions folded into one commit at most.
const MAX_BATCH: usize = 512;
/// The probe's size: a recovered store should hold at least an ordinary object again (a full
/// disk often still has room for a few pages, which would make readiness flap).
const PROBE_BYTES: usize = 1024 * 1024;
/// Backoff between reopen attempts after a failed commit, doubling up to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct EmbeddedStoreOptions {
    /// Events kept for watchers that start from an older revision, and for live watchers to
    /// read at their own pace: at most this many...
    pub history_limit: usize,
    /// ...and at most this many bytes of keys and values (see `history::event_bytes`).
    pub history_bytes: usize,
}

/// The default history byte budget. kube-apiserver sizes its watch cache by event count (and
/// a 75 s freshness window); a byte bound is what keeps memory predictable when objects are
/// large. 256 MiB holds the default 20,000 events of objects up to ~6 KB (Services, Pods and
/// EndpointSlices of ordinary size, so the count binds first), and still over 40 of the
/// largest objects the API accepts (3 MiB, each counted with its previous version).
pub const DEFAULT_HISTORY_BYTES: usize = 256 * 1024 * 1024;

impl Default for EmbeddedStoreOptions {
    fn default() -> Self {
        Self {
            history_limit: 20_000,
            history_bytes: DEFAULT_HISTORY_BYTES,
        }
    }
}

struct State {
    revision: i64,
    kvs: BTreeMap<String, Arc<KeyValue>>,
    history: History,
}

struct Shared {
    state: RwLock<State>,
    health: Mutex<StoreHealth>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A writer panicking while holding the lock leaves consistent data (it only swaps in
        // committed changes), so a poisoned lock is still safe to read.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn health(&self) -> std::sync::MutexGuard<'_, StoreHealth> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Feed for Shared {
    fn step(&self, prefix: &str, seq: u64) -> Step {
        let state = self.read();
        state.history.step(prefix, seq, state.revision)
    }

    fn evicted(&self, seq: u64) -> bool {
        self.read().history.evicted(seq)
    }
}

struct Request {
    ops: Vec<Op>,
    reply: oneshot::Sender<StoreResult<Vec<OpResult>>>,
}

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    writer: std_mpsc::Sender<Request>,
    /// A receiver of the revision the writer announces after each commit; watchers clone it.
    commits: watch::Receiver<i64>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database file and loads it. Must be called inside a tokio runtime.
    pub fn open(path: &Path, options: EmbeddedStoreOptions) -> StoreResult<Self> {
        let db = Database::create(path).map_err(|e| StoreError::io("open", e))?;
        let (revision, kvs) = load(&db)?;
        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                revision,
                kvs,
                history: History::new(options.history_limit, options.history_bytes, revision),
            }),
            health: Mutex::new(StoreHealth::default()),
        });
        let (commits_tx, commits) = watch::channel(revision);
        let (writer, queue) = std_mpsc::channel();
        let state = Writer {
            path: path.to_path_buf(),
            db: Some(db),
            shared: shared.clone(),
            commits: commits_tx,
            pending: HashSet::new(),
            retry: RETRY_FIRST,
            next_attempt: Instant::now(),
        };
        std::thread::Builder::new()
            .name("kpx-store-writer".into())
            .spawn(move || state.run(queue))
            .map_err(|e| StoreError::io("spawn writer", e))?;
        Ok(Self {
            shared,
            writer,
            commits,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.read()
    }
}

fn load(db: &Database) -> StoreResult<(i64, BTreeMap<String, Arc<KeyValue>>)> {
    let txn = db.begin_write().map_err(|e| StoreError::io("load", e))?;
    // Creating the tables on first open keeps later read transactions simple.
    txn.open_table(KV).map_err(|e| StoreError::io("load", e))?;
    txn.open_table(META)
        .map_err(|e| StoreError::io("load", e))?;
    txn.commit().map_err(|e| StoreError::io("load", e))?;

    let read = db.begin_read().map_err(|e| StoreError::io("load", e))?;
    let meta = read
        .open_table(META)
        .map_err(|e| StoreError::io("load", e))?;
    let revision = meta
        .get(REVISION_KEY)
        .map_err(|e| StoreError::io("load", e))?
        .map(|v| v.value())
        .unwrap_or(0);
    let table = read.open_table(KV).map_err(|e| StoreError::io("load", e))?;
    let mut kvs = BTreeMap::new();
    for entry in table.iter().map_err(|e| StoreError::io("load", e))? {
        let (key, value) = entry.map_err(|e| StoreError::io("load", e))?;
        let kv = decode(key.value(), value.value())?;
        kvs.insert(kv.key.clone(), Arc::new(kv));
    }
    Ok((revision, kvs))
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, raw: &[u8]) -> StoreResult<KeyValue> {
    if raw.len() < 16 {
        return Err(StoreError::io(
            "load",
            format!(
                "record for {key} is {} bytes, shorter than its header",
                raw.len()
            ),
        ));
    }
    let (create, rest) = raw.split_at(8);
    let (modified, value) = rest.split_at(8);
    let word = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    Ok(KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value),
        create_revision: word(create),
        mod_revision: word(modified),
    })
}

/// The outcome of one transaction inside a batch, before the batch commits.
struct Staged {
    reply: oneshot::Sender<StoreResult<Vec<OpResult>>>,
    outcome: StoreResult<Vec<OpResult>>,
}

/// The writer thread: the only user of the database.
///
/// A failed commit (a full disk, an I/O error) leaves redb refusing every later transaction
/// (`StorageError::PreviousIo`) until the database is reopened. So the writer drops the
/// database, refuses writes with [`StoreError::Unavailable`] (nothing is written), and reopens
/// it from the file with backoff; once reopened and a probe write went through, writes work
/// again without a restart. Like an etcd member with its `NOSPACE` alarm, the server reports
/// itself not ready meanwhile (`/readyz`'s `etcd` check).
struct Writer {
    path: PathBuf,
    /// `None` while the database needs reopening.
    db: Option<Database>,
    shared: Arc<Shared>,
    commits: watch::Sender<i64>,
    /// Keys of the batch whose commit failed: if that commit reached the file after all, the
    /// reopen puts their acknowledged values back.
    pending: HashSet<String>,
    retry: Duration,
    next_attempt: Instant,
}

impl Writer {
    fn run(mut self, queue: std_mpsc::Receiver<Request>) {
        loop {
            let first = if self.db.is_some() {
                match queue.recv() {
                    Ok(request) => Some(request),
                    Err(_) => return,
                }
            } else {
                let wait = self.next_attempt.saturating_duration_since(Instant::now());
                match queue.recv_timeout(wait) {
                    Ok(request) => Some(request),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            if self.db.is_none() && Instant::now() >= self.next_attempt {
                self.recover();
            }
            let Some(first) = first else { continue };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let Some(db) = &self.db else {
            let message = self
                .shared
                .health()
                .write_error
                .clone()
                .unwrap_or_else(|| "the database is being reopened".into());
            for request in batch {
                let _ = request.reply.send(Err(StoreError::Unavailable {
                    message: format!("{message}; retrying in the background"),
                }));
            }
            return;
        };
        // Keys changed by this batch: the newest value, or None when deleted.
        let mut overlay: HashMap<String, Option<Arc<KeyValue>>> = HashMap::new();
        let mut events: Vec<Arc<Event>> = Vec::new();
        let mut staged = Vec::with_capacity(batch.len());
        let revision = {
            let state = self.shared.read();
            let mut revision = state.revision;
            for request in batch {
                let outcome = stage(
                    &state.kvs,
                    &mut overlay,
                    &mut events,
                    &request.ops,
                    revision + 1,
                );
                if outcome.is_ok() {
                    revision += 1;
                }
                staged.push(Staged {
                    reply: request.reply,
                    outcome,
                });
            }
            revision
        };

        if !overlay.is_empty() {
            if let Err(err) = persist(db, &overlay, revision) {
                tracing::error!(error = %err, "store commit failed; the batch is refused and the database will be reopened");
                self.failed(&err.to_string(), overlay.into_keys());
                for s in staged {
                    let _ = s.reply.send(Err(StoreError::io("commit", &err)));
                }
                return;
            }
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            for (key, value) in overlay {
                match value {
                    Some(kv) => state.kvs.insert(key, kv),
                    None => state.kvs.remove(&key),
                };
            }
            state.revision = revision;
            for event in events {
                state.history.push(event);
            }
            drop(state);
            // Watchers read the history themselves; this only wakes them.
            self.commits.send_replace(revision);
        }
        for s in staged {
            let _ = s.reply.send(s.outcome);
        }
    }

    fn failed(&mut self, error: &str, keys: impl Iterator<Item = String>) {
        self.pending.extend(keys);
        // Closing it is what lets the next open see the file as it is on disk.
        self.db = None;
        {
            let mut health = self.shared.health();
            health.write_failures += 1;
            health.write_error = Some(error.to_string());
        }
        self.next_attempt = Instant::now() + self.retry;
        self.retry = (self.retry * 2).min(RETRY_MAX);
    }

    /// Reopens the database; on failure, tries again after the backoff.
    fn recover(&mut self) {
        match self.reopen() {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), "store reopened; writes work again");
                self.db = Some(db);
                self.pending.clear();
                self.retry = RETRY_FIRST;
                let mut health = self.shared.health();
                health.write_error = None;
                health.reopens += 1;
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?self.retry, "store still cannot write");
                let mut health = self.shared.health();
                health.write_failures += 1;
                health.write_error = Some(err.to_string());
                drop(health);
                self.next_attempt = Instant::now() + self.retry;
                self.retry = (self.retry * 2).min(RETRY_MAX);
            }
        }
    }

    fn reopen(&self) -> Result<Database, redb::Error> {
        let db = Database::create(&self.path)?;
        let stored = {
            let read = db.begin_read()?;
            let meta = read.open_table(META)?;
            let stored = meta.get(REVISION_KEY)?.map(|v| v.value()).unwrap_or(0);
            stored
        };
        let (revision, restore) = {
            let state = self.shared.read();
            let restore: HashMap<String, Option<Arc<KeyValue>>> = self
                .pending
                .iter()
                .map(|key| (key.clone(), state.kvs.get(key).cloned()))
                .collect();
            (state.revision, restore)
        };
        if stored != revision {
            // The failed commit reached the file after all (its error came late, e.g. from
            // the final fsync). Its callers were told it failed and nobody saw it, so it is
            // undone: its keys get back the values readers see, and the revision goes back.
            tracing::warn!(
                stored,
                acknowledged = revision,
                "undoing a commit that was reported failed"
            );
            persist(&db, &restore, revision)?;
        }
        probe(&db)?;
        Ok(db)
    }
}

/// Writes and removes [`PROBE_BYTES`], each durably.
fn probe(db: &Database) -> Result<(), redb::Error> {
    let blob = vec![0u8; PROBE_BYTES];
    let txn = db.begin_write()?;
    txn.open_table(PROBE)?.insert("probe", blob.as_slice())?;
    txn.commit()?;
    let txn = db.begin_write()?;
    txn.open_table(PROBE)?.remove("probe")?;
    txn.commit()?;
    Ok(())
}

fn current<'a>(
    kvs: &'a BTreeMap<String, Arc<KeyValue>>,
    overlay: &'a HashMap<String, Option<Arc<KeyValue>>>,
    key: &str,
) -> Option<&'a Arc<KeyValue>> {
    match overlay.get(key) {
        Some(value) => value.as_ref(),
        None => kvs.get(key),
    }
}

fn check(
    existing: Option<&Arc<KeyValue>>,
    key: &str,
    precondition: Precondition,
) -> StoreResult<()> {
    match (precondition, existing) {
        (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists { key: key.into() }),
        (_, None) => Err(StoreError::NotFound { key: key.into() }),
        (Precondition::Exists, Some(_)) => Ok(()),
        (Precondition::ModRevision(expected), Some(kv)) if kv.mod_revision == expected => Ok(()),
        (Precondition::ModRevision(expected), Some(kv)) => Err(StoreError::Conflict {
            key: key.into(),
            expected,
            actual: kv.mod_revision,
        }),
    }
}

/// Checks every precondition of one transaction, then records its effects in `overlay`.
fn stage(
    kvs: &BTreeMap<String, Arc<KeyValue>>,
    overlay: &mut HashMap<String, Option<Arc<KeyValue>>>,
    events: &mut Vec<Arc<Event>>,
    ops: &[Op],
    revision: i64,
) -> StoreResult<Vec<OpResult>> {
    for op in ops {
        let (key, precondition) = match op {
            Op::Put {
                key, precondition, ..
            }
            | Op::Delete { key, precondition } => (key, *precondition),
        };
        check(current(kvs, overlay, key), key, precondition)?;
    }
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let prev = current(kvs, overlay, op.key()).cloned();
        match op {
            Op::Put { key, value, .. } => {
                let kv = Arc::new(KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                    mod_revision: revision,
                });
                overlay.insert(key.clone(), Some(kv.clone()));
                events.push(Arc::new(Event {
                    kind: EventKind::Put,
                    kv: kv.clone(),
                    prev,
                }));
                results.push(OpResult::Put(kv));
            }
            Op::Delete { key, .. } => {
                let Some(prev) = prev else {
                    return Err(StoreError::NotFound { key: key.clone() });
                };
                let tombstone = Arc::new(KeyValue {
                    mod_revision: revision,
                    ..(*prev).clone()
                });
                overlay.insert(key.clone(), None);
                events.push(Arc::new(Event {
                    kind: EventKind::Delete,
                    kv: tombstone.clone(),
                    prev: Some(prev),
                }));
                results.push(OpResult::Deleted(tombstone));
            }
        }
    }
    Ok(results)
}

fn persist(
    db: &Database,
    overlay: &HashMap<String, Option<Arc<KeyValue>>>,
    revision: i64,
) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    // The default already, stated because acknowledging a write depends on it.
    txn.set_durability(Durability::Immediate).map_err(|e| {
        redb::Error::from(redb::StorageError::Io(std::io::Error::other(e.to_string())))
    })?;
    {
        let mut table = txn.open_table(KV)?;
        for (key, value) in overlay {
            match value {
                Some(kv) => {
                    table.insert(key.as_str(), encode(kv).as_slice())?;
                }
                None => {
                    table.remove(key.as_str())?;
                }
            }
        }
        let mut meta = txn.open_table(META)?;
        meta.insert(REVISION_KEY, revision)?;
    }
    txn.commit()?;
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Arc<KeyValue>>> {
        Ok(self.read().kvs.get(key).cloned())
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: Option<i64>,
    ) -> StoreResult<ListResult> {
        let state = self.read();
        let in_range = |key: &String| key.starts_with(prefix);
        let from = match start_after {
            Some(after) if after >= prefix => std::ops::Bound::Excluded(after.to_string()),
            _ => std::ops::Bound::Included(prefix.to_string()),
        };
        let range = state
            .kvs
            .range((from.clone(), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| in_range(k));
        let read_at = match revision {
            Some(rev) if rev < state.revision => {
                state.history.check(rev, state.revision)?;
                // Old snapshot: take everything under the prefix and undo newer changes.
                let mut snapshot: BTreeMap<String, Arc<KeyValue>> = state
                    .kvs
                    .range(prefix.to_string()..)
                    .take_while(|(k, _)| in_range(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                state.history.rewind(&mut snapshot, prefix, rev);
                let items: Vec<_> = snapshot
                    .range((from, std::ops::Bound::Unbounded))
                    .map(|(_, v)| v.clone())
                    .collect();
                return Ok(page(items.into_iter(), limit, rev));
            }
            Some(rev) if rev > state.revision => {
                return Err(StoreError::FutureRevision {
                    requested: rev,
                    current: state.revision,
                })
            }
            _ => state.revision,
        };
        Ok(page(range.map(|(_, v)| v.clone()), limit, read_at))
    }

    async fn txn(&self, ops: Vec<Op>) -> StoreResult<Vec<OpResult>> {
        let (reply, response) = oneshot::channel();
        self.writer
            .send(Request { ops, reply })
            .map_err(|_| StoreError::Closed)?;
        response.await.map_err(|_| StoreError::Closed)?
    }

    fn watch(&self, prefix: &str, after_revision: i64) -> StoreResult<WatchStream> {
        let state = self.read();
        state.history.check(after_revision, state.revision)?;
        let seq = state.history.position(after_revision);
        Ok(WatchStream::new(
            prefix,
            self.shared.clone(),
            self.commits.clone(),
            seq,
            after_revision,
        ))
    }

    fn current_revision(&self) -> i64 {
        self.read().revision
    }

    fn health(&self) -> StoreHealth {
        self.shared.health().clone()
    }

    async fn count(&self, prefix: &str) -> StoreResult<usize> {
        let state = self.read();
        Ok(state
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count())
    }
}

fn page(items: impl Iterator<Item = Arc<KeyValue>>, limit: usize, revision: i64) -> ListResult {
    let mut kvs = Vec::new();
    let mut remaining = 0;
    for kv in items {
        if limit == 0 || kvs.len() < limit {
            kvs.push(kv);
        } else {
            remaining += 1;
        }
    }
    ListResult {
        kvs,
        revision,
        remaining,
    }
}
