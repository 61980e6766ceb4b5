//! A throwaway network namespace for tests and benchmarks that need a kernel of their own
//! without a lab: made with `ip netns add`, deleted when dropped (also when the test panics).

use std::process::Command;

use kpx_control::netns::Entry;

pub struct ScratchNetns(String);

impl ScratchNetns {
    /// `kpx-<prefix>-<tag>-<pid>`, and a handle to enter it.
    pub fn new(prefix: &str, tag: &str) -> anyhow::Result<(Self, Entry)> {
        let name = format!("kpx-{prefix}-{tag}-{}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status()?;
        anyhow::ensure!(status.success(), "ip netns add {name}: {status}");
        let guard = ScratchNetns(name);
        let entry = Entry::open(&guard.0)?;
        Ok((guard, entry))
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
