//! The seam every backend plugs into. A backend turns a snapshot into kernel state: its plan is
//! pure (and snapshot-tested); only its apply touches the kernel.

use serde_json::Value;

use crate::model::{Changes, ProxyState};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("BPF map {map} is full ({capacity} entries): raise it with --bpf-map-size {map}=ENTRIES; the Services written before it keep working")]
    MapFull { map: String, capacity: u32 },
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// What one sync did, for metrics and logs.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub full: bool,
    pub rules_written: usize,
    pub rules_total: usize,
    pub chains_written: usize,
    pub chains_deleted: usize,
}

pub trait Backend: Send + 'static {
    fn name(&self) -> &'static str;

    /// Programs `state`: all of it when `full`, else what `changes` touched. On error the
    /// previous kernel state stays in place and the next sync must be full.
    fn sync(
        &mut self,
        state: &ProxyState,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncReport, BackendError>;

    /// What someone removed of what this backend programmed, if anything (the next sync must
    /// then be full).
    fn lost_state(&mut self) -> Option<String>;

    /// Removes everything this backend ever programmed, and nothing else.
    fn cleanup(&mut self) -> Result<(), BackendError>;

    /// What is programmed in the kernel now, per Service port, read back from the kernel.
    fn dump(&self) -> Result<Value, BackendError>;
}

/// A backend chosen at run time (`--proxy-mode`).
impl Backend for Box<dyn Backend> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn sync(
        &mut self,
        state: &ProxyState,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncReport, BackendError> {
        (**self).sync(state, changes, full)
    }

    fn lost_state(&mut self) -> Option<String> {
        (**self).lost_state()
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        (**self).cleanup()
    }

    fn dump(&self) -> Result<Value, BackendError> {
        (**self).dump()
    }
}
