//! Where the benchmark's processes run. The traffic's clients and servers share one core (the
//! load core) and everything else (this process, the API servers, the proxies) keeps to the
//! others. On this 2-core VM a request whose client and server sit on different cores pays a
//! cross-core wakeup each way: a keep-alive request took ~130 µs instead of ~58 µs, and rounds
//! of the same load differed by ±15% instead of ±3%. One core measures the dataplane's path,
//! not the hypervisor's inter-processor interrupts, and leaves the proxies' work off it.

use std::process::Command;

use anyhow::Context;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Which core the traffic runs on, if it is pinned at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Clients and servers on this core; the rest of the bench on the others.
    Core(usize),
    /// Wherever the scheduler puts them (`--cpu none`, or a machine with one core).
    Anywhere,
}

impl Placement {
    /// What `--cpu` said: a core number, `none`, or nothing (the last core this process may use,
    /// when it may use more than one).
    pub fn choose(flag: Option<&str>) -> anyhow::Result<Self> {
        let allowed = allowed_cores()?;
        match flag {
            Some("none") => Ok(Self::Anywhere),
            Some(text) => {
                let core: usize = text.parse().map_err(|_| {
                    anyhow::anyhow!("--cpu: {text:?} is not a core number or `none`")
                })?;
                anyhow::ensure!(
                    allowed.contains(&core),
                    "--cpu: core {core} is not one this process may run on (allowed: {}; or `none`)",
                    list(&allowed)
                );
                anyhow::ensure!(
                    allowed.len() > 1,
                    "--cpu: only core {core} is available, so nothing else could keep off it; use `none`"
                );
                Ok(Self::Core(core))
            }
            None if allowed.len() > 1 => Ok(Self::Core(allowed[allowed.len() - 1])),
            None => Ok(Self::Anywhere),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Core(c) => format!("clients and servers on core {c}, the rest on the others"),
            Self::Anywhere => "not pinned".into(),
        }
    }

    /// Keeps this process, and what it starts from now on, off the load core.
    pub fn keep_self_off(&self) -> anyhow::Result<()> {
        let Self::Core(load) = *self else {
            return Ok(());
        };
        let mut set = CpuSet::new();
        for c in allowed_cores()?.into_iter().filter(|c| *c != load) {
            set.set(c)?;
        }
        // Every thread of this process: tokio's workers exist already.
        for tid in tasks(std::process::id())? {
            // A thread may end between the listing and the call.
            let _ = sched_setaffinity(Pid::from_raw(tid), &set);
        }
        Ok(())
    }

    /// Moves a running process (every thread of it) onto the load core.
    pub fn pin_process(&self, pid: u32) -> anyhow::Result<()> {
        let Self::Core(load) = *self else {
            return Ok(());
        };
        let set = one(load)?;
        for tid in tasks(pid)? {
            let _ = sched_setaffinity(Pid::from_raw(tid), &set);
        }
        Ok(())
    }

    /// Starts `cmd` on the load core: set before exec, so every thread it makes inherits it.
    pub fn pin_command(&self, cmd: &mut Command) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let Self::Core(load) = *self else {
            return Ok(());
        };
        let set = one(load)?;
        // SAFETY: sched_setaffinity is a plain system call on data made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
            });
        }
        Ok(())
    }
}

/// Jiffies core `core` spent (busy, in all) since boot, from /proc/stat.
fn core_times(core: usize) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{core}");
    let fields: Vec<u64> = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .with_context(|| format!("no {name} line in /proc/stat"))?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

impl Placement {
    /// Waits (at most `within`) until the load core has been nearly idle for a quarter of a
    /// second: work the kernel still does for earlier steps (namespaces being torn down,
    /// freed sockets, RCU callbacks) runs on whatever core is free and would land in the next
    /// load's figures. Returns how long it waited, or `None` if the core never settled.
    pub async fn settle(
        &self,
        within: std::time::Duration,
    ) -> anyhow::Result<Option<std::time::Duration>> {
        let Self::Core(core) = *self else {
            return Ok(Some(std::time::Duration::ZERO));
        };
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            let (busy0, total0) = core_times(core)?;
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            let (busy1, total1) = core_times(core)?;
            // At 100 Hz a quarter second is ~25 jiffies: at most one busy is "nearly idle".
            if total1 > total0 && (busy1 - busy0) * 20 <= total1 - total0 {
                return Ok(Some(started.elapsed()));
            }
        }
        Ok(None)
    }
}

fn one(core: usize) -> anyhow::Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(core)?;
    Ok(set)
}

fn allowed_cores() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .collect())
}

fn tasks(pid: u32) -> anyhow::Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

fn list(cores: &[usize]) -> String {
    cores
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_follows_the_flag() {
        let allowed = allowed_cores().expect("affinity");
        assert_eq!(
            Placement::choose(Some("none")).expect("none"),
            Placement::Anywhere
        );
        let default = Placement::choose(None).expect("default");
        if allowed.len() > 1 {
            assert_eq!(default, Placement::Core(*allowed.last().expect("a core")));
            let first = allowed[0].to_string();
            assert_eq!(
                Placement::choose(Some(&first)).expect("first"),
                Placement::Core(allowed[0])
            );
        } else {
            assert_eq!(default, Placement::Anywhere);
        }
        let err = Placement::choose(Some("fast")).expect_err("words refused");
        assert!(err.to_string().contains("--cpu"), "{err}");
        let err = Placement::choose(Some("4096")).expect_err("absent core refused");
        assert!(err.to_string().contains("allowed"), "{err}");
    }

    #[test]
    fn a_pinned_command_runs_on_its_core() {
        let core = *allowed_cores().expect("affinity").last().expect("a core");
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        Placement::Core(core).pin_command(&mut cmd).expect("pin");
        let out = cmd.output().expect("grep runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split_whitespace().last(),
            Some(core.to_string().as_str()),
            "{text}"
        );
    }
}
