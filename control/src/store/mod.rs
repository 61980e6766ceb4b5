//! A revisioned key-value store with etcd semantics.
//!
//! One global revision counts every committed transaction; each key remembers the revision that
//! created it and the one that last modified it (`resourceVersion` is the latter). Updates and
//! deletes may be conditioned on the modification revision (compare-and-swap), and watchers can
//! start from any revision still in the bounded history; older ones get [`StoreError::Compacted`].

mod embedded;
mod history;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use embedded::{EmbeddedStore, EmbeddedStoreOptions, DEFAULT_HISTORY_BYTES};
pub use history::WatchStream;

/// A stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: i64,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by watchers. For a delete, `kv` holds the last value with `mod_revision` set
/// to the revision of the delete (what Kubernetes reports as the deleted object's version).
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub kv: Arc<KeyValue>,
    pub prev: Option<Arc<KeyValue>>,
}

impl Event {
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }
}

/// The condition a write puts on the key's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// The key must not exist (create).
    Absent,
    /// The key must exist (unconditional update or delete).
    Exists,
    /// The key must exist with exactly this modification revision.
    ModRevision(i64),
}

#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: String,
        value: Bytes,
        precondition: Precondition,
    },
    Delete {
        key: String,
        precondition: Precondition,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// What one committed operation did.
#[derive(Debug, Clone)]
pub enum OpResult {
    /// The key now holds this value (`create_revision == mod_revision` for a create).
    Put(Arc<KeyValue>),
    /// The key was removed; this is its last value with `mod_revision` = the delete's revision.
    Deleted(Arc<KeyValue>),
}

impl OpResult {
    pub fn kv(&self) -> &Arc<KeyValue> {
        match self {
            OpResult::Put(kv) | OpResult::Deleted(kv) => kv,
        }
    }
}

/// A consistent page of a range read.
#[derive(Debug, Clone)]
pub struct ListResult {
    pub kvs: Vec<Arc<KeyValue>>,
    /// The revision the page was read at.
    pub revision: i64,
    /// How many more keys follow this page, when it was cut by `limit`.
    pub remaining: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: i64,
        actual: i64,
    },
    #[error("revision {requested} is compacted; the oldest revision kept is {oldest}")]
    Compacted { requested: i64, oldest: i64 },
    #[error("revision {requested} is in the future; the current revision is {current}")]
    FutureRevision { requested: i64, current: i64 },
    #[error(
        "the watcher fell behind: events after revision {revision} are no longer kept \
         (the oldest kept is {oldest}); re-list and watch again"
    )]
    WatcherBehind { revision: i64, oldest: i64 },
    #[error("store i/o on {op}: {message}")]
    Io { op: &'static str, message: String },
    /// The store cannot write at the moment (its last commit failed, e.g. a full disk) and is
    /// recovering in the background; nothing was written.
    #[error("the store cannot write: {message}")]
    Unavailable { message: String },
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    pub fn io(op: &'static str, err: impl std::fmt::Display) -> Self {
        StoreError::Io {
            op,
            message: err.to_string(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Whether the store can write, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// `None` while writes work; otherwise why they do not (the last commit's error).
    pub write_error: Option<String>,
    /// Commits that failed since start.
    pub write_failures: u64,
    /// Times the database was reopened after a failed commit.
    pub reopens: u64,
}

/// The store the API server runs on. Only the API server uses it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> StoreResult<Option<Arc<KeyValue>>>;

    /// Keys starting with `prefix`, in key order, after `start_after` when given, at most
    /// `limit` (0 = all), read at `revision` (None = now; an older one must still be in history).
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: Option<i64>,
    ) -> StoreResult<ListResult>;

    /// Commits all operations atomically under one new revision, or none of them when any
    /// precondition fails. Returns only once the transaction is durable.
    async fn txn(&self, ops: Vec<Op>) -> StoreResult<Vec<OpResult>>;

    /// Changes to keys starting with `prefix` with a revision above `after_revision`.
    fn watch(&self, prefix: &str, after_revision: i64) -> StoreResult<WatchStream>;

    fn current_revision(&self) -> i64;

    /// Whether writes currently work (a store that cannot tell says they do).
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Number of keys under `prefix` (used for quick counts, such as allocator sizing).
    async fn count(&self, prefix: &str) -> StoreResult<usize> {
        Ok(self.list(prefix, None, 0, None).await?.kvs.len())
    }
}

impl dyn Store {
    pub async fn create(&self, key: String, value: Bytes) -> StoreResult<Arc<KeyValue>> {
        let mut results = self
            .txn(vec![Op::Put {
                key,
                value,
                precondition: Precondition::Absent,
            }])
            .await?;
        Ok(results.remove(0).kv().clone())
    }

    pub async fn update(
        &self,
        key: String,
        value: Bytes,
        precondition: Precondition,
    ) -> StoreResult<Arc<KeyValue>> {
        let mut results = self
            .txn(vec![Op::Put {
                key,
                value,
                precondition,
            }])
            .await?;
        Ok(results.remove(0).kv().clone())
    }

    pub async fn delete(
        &self,
        key: String,
        precondition: Precondition,
    ) -> StoreResult<Arc<KeyValue>> {
        let mut results = self.txn(vec![Op::Delete { key, precondition }]).await?;
        Ok(results.remove(0).kv().clone())
    }
}

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod tests;
