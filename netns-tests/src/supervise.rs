//! Supervision of a lab's components: a kpx-control, kpx-proxy or kpx-kubelet that exits by
//! itself (a crash, `kill -9`) is restarted, as a DaemonSet's pod (restartPolicy Always) or a
//! systemd unit (`Restart=always`) would be on a real node, with exponential back-off, and
//! counted, logged (stderr and `supervisor.log` in the lab's directory) and reported
//! ([`Lab::components`], `kpx-lab status`).
//!
//! A component the lab stopped on purpose (`stop_proxy`, `kill_proxy`, `stop_kubelet`,
//! `kill_api`: its process handle taken) is not restarted: supervision of it pauses until the
//! lab starts it again (`start_proxy`, …), so tests that kill a component on purpose keep
//! control. Restarts go through the lab's own `start_api`/`start_proxy`/`start_kubelet`.
//!
//! Supervision runs while the lab's owner lets it: [`Lab::supervise_while`] (what `kpx-lab up`
//! does until Ctrl-C; tests wrap what they wait for in it) or one pass, [`Lab::supervise_once`].

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::lab::Lab;

/// The first restart's delay, as systemd's default `RestartSec` order of magnitude.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Delays double up to this (systemd's `RestartMaxDelaySec`-style cap).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long resets the delay to [`FIRST_BACKOFF`]: twice the cap, as client-go's
/// `flowcontrol.Backoff` forgets an entry after 2 × its max duration (what the kubelet's
/// crash-loop back-off uses).
pub const RESET_AFTER: Duration = Duration::from_secs(60);
/// How often [`Lab::supervise_while`] looks at the processes.
const POLL: Duration = Duration::from_millis(250);

/// One of a lab's components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Api,
    /// Node index (0-based) of a kpx-proxy.
    Proxy(usize),
    /// Node index (0-based) of a kpx-kubelet.
    Kubelet(usize),
}

/// The delay before the next restart, given the previous delay (none before the first crash
/// or after a reset) and how long the component ran before it exited.
pub fn next_backoff(previous: Option<Duration>, ran_for: Duration) -> Duration {
    match previous {
        Some(prev) if ran_for < RESET_AFTER => (prev * 2).min(MAX_BACKOFF),
        _ => FIRST_BACKOFF,
    }
}

/// What the supervisor knows of one component.
#[derive(Debug, Default)]
struct Tracked {
    /// The process id it last saw running, and since when.
    pid: Option<u32>,
    started: Option<Instant>,
    restarts: u32,
    last_exit: Option<(String, SystemTime)>,
    /// The delay used for the last restart (doubles while it keeps crashing).
    backoff: Option<Duration>,
    /// A restart is due at this instant (the component exited by itself).
    due: Option<Instant>,
}

impl Tracked {
    /// `pid` is running: if it is a new process (started by the lab, a test or a restart),
    /// a new run begins now.
    fn observe(&mut self, pid: u32, now: Instant) {
        if self.pid != Some(pid) {
            self.pid = Some(pid);
            self.started = Some(now);
            self.due = None;
        }
    }
}

/// The supervision state of a lab (kept in the `Lab`).
#[derive(Debug, Default)]
pub struct Supervisor {
    tracked: BTreeMap<Component, Tracked>,
}

impl Supervisor {
    /// The lab stopped `component` on purpose: no restart is pending for it any more.
    pub(crate) fn stopped(&mut self, component: Component) {
        if let Some(t) = self.tracked.get_mut(&component) {
            t.due = None;
            t.pid = None;
        }
    }
}

/// A component as `kpx-lab status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// `kpx-control`, `node-1/kpx-proxy`, `node-1/kpx-kubelet`.
    pub name: String,
    /// `running`, `restarting` (exited, restart pending), `exited` (not yet seen by
    /// supervision), or `stopped` (by the lab, on purpose).
    pub state: String,
    pub pid: Option<u32>,
    /// Restarts the supervisor made.
    pub restarts: u32,
    /// How it last exited by itself (`signal: 9 (SIGKILL)`, `exit status: 1`), if it has.
    pub last_exit: Option<String>,
    /// When, in seconds since the Unix epoch.
    pub last_exit_at: Option<u64>,
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| format!(" ({})", s.as_str()))
                .unwrap_or_default();
            format!("signal {sig}{name}")
        }
        _ => status.to_string(),
    }
}

impl Lab {
    fn components_present(&self) -> Vec<Component> {
        let mut out = vec![Component::Api];
        for i in 0..self.nodes.len() {
            out.push(Component::Proxy(i));
            if self.cluster.is_some() {
                out.push(Component::Kubelet(i));
            }
        }
        out
    }

    fn slot(&mut self, component: Component) -> &mut Option<Child> {
        match component {
            Component::Api => self.api_slot(),
            Component::Proxy(i) => self.proxy_slot(i),
            Component::Kubelet(i) => &mut self.nodes[i].kubelet,
        }
    }

    fn component_name(&self, component: Component) -> String {
        match component {
            Component::Api => "kpx-control".into(),
            Component::Proxy(i) => format!("{}/kpx-proxy", self.nodes[i].name),
            Component::Kubelet(i) => format!("{}/kpx-kubelet", self.nodes[i].name),
        }
    }

    /// A line in stderr and in the lab's `supervisor.log`.
    fn supervisor_log(&self, line: &str) {
        eprintln!("kpx-lab {}: {line}", self.name);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path("supervisor"))
        {
            let _ = writeln!(f, "{} {line}", kpx_control::api::meta::now_rfc3339());
        }
    }

    /// One pass: notes exits, and restarts components whose back-off has passed. Returns
    /// whether anything changed (an exit seen, a restart made), for callers that publish the
    /// state.
    pub async fn supervise_once(&mut self) -> bool {
        let mut changed = false;
        for component in self.components_present() {
            let now = Instant::now();
            let (pid, exited) = match self.slot(component).as_mut() {
                None => {
                    // Stopped on purpose (or a restart that could not even spawn: `due` stays).
                    let t = self.supervisor.tracked.entry(component).or_default();
                    t.pid = None;
                    if t.due.is_none() {
                        continue;
                    }
                    (None, None)
                }
                Some(child) => (Some(child.id()), child.try_wait().ok().flatten()),
            };
            let name = self.component_name(component);
            let t = self.supervisor.tracked.entry(component).or_default();
            match (pid, exited) {
                (Some(pid), None) => {
                    t.observe(pid, now);
                    continue;
                }
                (Some(pid), Some(status)) if t.due.is_none() => {
                    // Its run began when it was first seen (by a pass or `components`).
                    let ran_for = t.started.filter(|_| t.pid == Some(pid)).map(|s| now - s);
                    let delay = next_backoff(t.backoff, ran_for.unwrap_or(Duration::ZERO));
                    t.backoff = Some(delay);
                    t.due = Some(now + delay);
                    t.last_exit = Some((describe(status), SystemTime::now()));
                    let ran = match ran_for {
                        Some(d) => format!("after {:.1} s", d.as_secs_f64()),
                        None => "before supervision first saw it run".into(),
                    };
                    let line = format!(
                        "{name} exited by itself ({}) {ran}; restarting it in {delay:?} \
                         (restarts so far: {})",
                        describe(status),
                        t.restarts
                    );
                    changed = true;
                    self.supervisor_log(&line);
                    continue;
                }
                _ => {}
            }
            let t = self.supervisor.tracked.entry(component).or_default();
            if t.due.is_some_and(|due| now < due) {
                continue;
            }
            t.restarts += 1;
            t.due = None;
            let restarts = t.restarts;
            let result = match component {
                Component::Api => self.start_api().await,
                Component::Proxy(i) => self.start_proxy(i),
                Component::Kubelet(i) => self.start_kubelet(i),
            };
            changed = true;
            match result {
                Ok(()) => self.supervisor_log(&format!("{name} restarted (restart {restarts})")),
                Err(e) => {
                    let t = self.supervisor.tracked.entry(component).or_default();
                    let delay = next_backoff(t.backoff, Duration::ZERO);
                    t.backoff = Some(delay);
                    t.due = Some(Instant::now() + delay);
                    t.last_exit = Some((format!("restart failed: {e:#}"), SystemTime::now()));
                    self.supervisor_log(&format!(
                        "{name}: restart {restarts} failed: {e:#}; trying again in {delay:?}"
                    ));
                }
            }
        }
        changed
    }

    /// Supervises the lab's components until `work` finishes, and returns its output. `work`
    /// must not borrow the lab (take a `client()`, an `Entry`, addresses before).
    pub async fn supervise_while<F: Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep(POLL) => {
                    self.supervise_once().await;
                }
            }
        }
    }

    /// Every component: running, restarting or stopped, its restarts and last exit.
    pub fn components(&mut self) -> Vec<ComponentStatus> {
        let mut out = Vec::new();
        for component in self.components_present() {
            let name = self.component_name(component);
            let (pid, exited) = match self.slot(component).as_mut() {
                Some(child) => (Some(child.id()), child.try_wait().ok().flatten().is_some()),
                None => (None, false),
            };
            let t = self.supervisor.tracked.entry(component).or_default();
            if let (Some(pid), false) = (pid, exited) {
                t.observe(pid, Instant::now());
            }
            let state = match (pid, exited) {
                (Some(_), false) => "running",
                _ if t.due.is_some() => "restarting",
                // Exited, and no supervision pass has seen it yet (or none runs).
                (Some(_), true) => "exited",
                _ => "stopped",
            };
            out.push(ComponentStatus {
                name,
                state: state.into(),
                pid: pid.filter(|_| !exited),
                restarts: t.restarts,
                last_exit: t.last_exit.as_ref().map(|(why, _)| why.clone()),
                last_exit_at: t.last_exit.as_ref().and_then(|(_, at)| {
                    at.duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs())
                }),
            });
        }
        out
    }
}

/// The components table `kpx-lab status` prints, from the state a `kpx-lab up` published
/// (`components`: [`ComponentStatus`] as JSON) at `now` (seconds since the epoch).
pub fn render_components(components: &[serde_json::Value], now: u64) -> String {
    let mut out = format!(
        "  {:<22} {:<11} {:>8}  {}\n",
        "COMPONENT", "STATE", "RESTARTS", "LAST EXIT"
    );
    for c in components {
        let last = match (c["lastExit"].as_str(), c["lastExitAt"].as_u64()) {
            (Some(why), Some(at)) => format!("{why}, {}s ago", now.saturating_sub(at)),
            (Some(why), None) => why.to_string(),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "  {:<22} {:<11} {:>8}  {last}\n",
            c["name"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["restarts"].as_u64().unwrap_or(0),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_long_run() {
        let quick = Duration::from_secs(2);
        let mut delay = None;
        let mut seen = Vec::new();
        for _ in 0..7 {
            let d = next_backoff(delay, quick);
            seen.push(d.as_secs());
            delay = Some(d);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(next_backoff(delay, RESET_AFTER), FIRST_BACKOFF);
        assert_eq!(next_backoff(None, Duration::ZERO), FIRST_BACKOFF);
    }

    #[test]
    fn status_shows_restarts_and_the_last_exit() {
        let components = vec![
            serde_json::json!({"name": "kpx-control", "state": "running", "restarts": 0}),
            serde_json::to_value(ComponentStatus {
                name: "node-1/kpx-proxy".into(),
                state: "running".into(),
                pid: Some(42),
                restarts: 1,
                last_exit: Some("signal 9 (SIGKILL)".into()),
                last_exit_at: Some(1_000),
            })
            .expect("serializes"),
        ];
        let text = render_components(&components, 1_012);
        let proxy = text
            .lines()
            .find(|l| l.contains("node-1/kpx-proxy"))
            .expect("a proxy line");
        assert!(
            proxy.contains("running") && proxy.contains(" 1  signal 9 (SIGKILL), 12s ago"),
            "{text}"
        );
        assert!(text
            .lines()
            .any(|l| l.contains("kpx-control") && l.ends_with(" 0  -")));
    }
}
