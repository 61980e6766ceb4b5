//! One task per pod (kubelet's pod worker): builds the sandbox, runs init containers then the
//! containers, probes them, restarts them with back-off, terminates gracefully, and reports the
//! status after every change. Events: the pod's updates from the API, container exits, and
//! timers (probes, restarts, retries).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::catalog;
use super::pod_status::{self, ContainerView, PodView, State};
use super::probe::{self, ProbeSpec, Tracker};
use super::runtime::{self, Sandbox};
use super::Shared;
use crate::api::meta;
use crate::client::events::Involved;
use crate::client::{Api, Patch};

/// What the pod's watcher tells its worker.
#[derive(Debug)]
pub enum Message {
    Update(Box<Pod>),
    /// The pod is gone from the API (deleted outright, or evicted): stop at once.
    Gone,
}

const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long starts its back-off afresh.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
const RETRY: Duration = Duration::from_secs(1);

struct Probing {
    spec: ProbeSpec,
    tracker: Tracker,
    next: Instant,
}

struct Ctr {
    spec: Container,
    view: ContainerView,
    pid: Option<u32>,
    cgroup: Option<PathBuf>,
    /// Bumped on every start, so a late exit of an older process is recognised.
    generation: u64,
    started: Option<Instant>,
    backoff: Duration,
    restart_at: Option<Instant>,
    readiness: Option<Probing>,
    liveness: Option<Probing>,
    /// Ended and will not run again (restart policy, or a finished init container).
    done: bool,
}

struct Exit {
    init: bool,
    index: usize,
    generation: u64,
    /// None for a process an earlier kubelet started: its exit status cannot be known.
    status: Option<std::process::ExitStatus>,
}

pub struct Worker {
    shared: Arc<Shared>,
    pod: Pod,
    inbox: mpsc::Receiver<Message>,
    exits_tx: mpsc::Sender<Exit>,
    exits: mpsc::Receiver<Exit>,
    sandbox: Option<Sandbox>,
    ips: Vec<IpAddr>,
    /// The addresses are reserved in the node's IPAM (released once, when the sandbox goes).
    ips_held: bool,
    init: Vec<Ctr>,
    containers: Vec<Ctr>,
    start_time: Option<String>,
    sandbox_retry: Option<Instant>,
    sandbox_error: Option<String>,
    last_written: Option<Value>,
    write_retry: Option<Instant>,
    terminating_since: Option<Instant>,
    kill_at: Option<Instant>,
}

fn name_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn restart_counts(pod: &Pod) -> BTreeMap<String, i32> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    // A container that was running under an earlier kubelet restarts now.
                    let bump = i32::from(c.state.as_ref().is_some_and(|s| s.running.is_some()));
                    (c.name.clone(), c.restart_count + bump)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Ctr {
    fn new(spec: &Container, restarts: i32) -> Self {
        Ctr {
            spec: spec.clone(),
            view: ContainerView {
                name: spec.name.clone(),
                image: spec.image.clone().unwrap_or_default(),
                state: State::waiting("ContainerCreating", None),
                last_state: None,
                ready: false,
                started: false,
                restart_count: restarts,
                container_id: None,
            },
            pid: None,
            cgroup: None,
            generation: 0,
            started: None,
            backoff: Duration::ZERO,
            restart_at: None,
            readiness: None,
            liveness: None,
            done: false,
        }
    }
}

impl Worker {
    pub fn new(shared: Arc<Shared>, pod: Pod, inbox: mpsc::Receiver<Message>) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let counts = restart_counts(&pod);
        let count = |name: &str| counts.get(name).copied().unwrap_or(0);
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| Ctr::new(c, count(&c.name)))
            .collect();
        let containers = spec
            .containers
            .iter()
            .map(|c| Ctr::new(c, count(&c.name)))
            .collect();
        let (exits_tx, exits) = mpsc::channel(16);
        Self {
            shared,
            pod,
            inbox,
            exits_tx,
            exits,
            sandbox: None,
            ips: Vec::new(),
            ips_held: false,
            init,
            containers,
            start_time: None,
            sandbox_retry: Some(Instant::now()),
            sandbox_error: None,
            last_written: None,
            write_retry: None,
            terminating_since: None,
            kill_at: None,
        }
    }

    /// A worker for a pod an earlier kubelet of this node ran, taking over its sandbox and
    /// the containers still running in it; None when its addresses cannot be reserved.
    pub fn adopt(
        shared: Arc<Shared>,
        pod: Pod,
        inbox: mpsc::Receiver<Message>,
        sandbox: Sandbox,
    ) -> Option<Self> {
        if !shared.reserve(&sandbox.ips) {
            return None;
        }
        let mut w = Self::new(shared, pod, inbox);
        w.ips = sandbox.ips.clone();
        w.ips_held = true;
        w.sandbox_retry = None;
        let status = w.pod.status.clone().unwrap_or_default();
        w.start_time = status.start_time.as_ref().map(|t| t.0.to_string());
        let initialized = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Initialized" && c.status == "True");
        if initialized {
            for c in &mut w.init {
                c.done = true;
                c.generation = 1;
                c.view.state = State::Terminated {
                    exit_code: 0,
                    signal: None,
                    reason: "Completed".into(),
                    message: None,
                    started_at: String::new(),
                    finished_at: String::new(),
                };
            }
        }
        let now = Instant::now();
        for (index, c) in w.containers.iter_mut().enumerate() {
            let Some(seen) = status
                .container_statuses
                .iter()
                .flatten()
                .find(|s| s.name == c.view.name)
            else {
                continue;
            };
            let Some(running) = seen.state.as_ref().and_then(|s| s.running.as_ref()) else {
                continue;
            };
            let pid = seen
                .container_id
                .as_deref()
                .and_then(|id| id.strip_prefix("kpx://"))
                .and_then(|p| p.parse::<u32>().ok());
            let cgroup = sandbox.cgroup.as_ref().map(|d| d.join(&c.view.name));
            let Some(pid) = pid.filter(|p| runtime::is_container_process(*p, cgroup.as_deref()))
            else {
                continue;
            };
            c.pid = Some(pid);
            c.cgroup = cgroup;
            c.generation = 1;
            c.started = Some(now);
            c.view.restart_count = seen.restart_count;
            c.view.container_id = seen.container_id.clone();
            c.view.started = true;
            c.view.ready = seen.ready;
            c.view.state = State::Running {
                started_at: running
                    .started_at
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
            };
            // Probes resume where they were: a ready container stays ready until it fails.
            (c.readiness, c.liveness) = probes(&c.spec, now, seen.ready);
            let tx = w.exits_tx.clone();
            tokio::spawn(async move {
                runtime::wait_for_exit(pid).await;
                let exit = Exit {
                    init: false,
                    index,
                    generation: 1,
                    status: None,
                };
                let _ = tx.send(exit).await;
            });
        }
        w.sandbox = Some(sandbox);
        Some(w)
    }

    fn release_ips(&mut self) {
        if std::mem::take(&mut self.ips_held) {
            self.shared.release(&self.ips);
        }
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn initialized(&self) -> bool {
        self.init
            .iter()
            .all(|c| c.done && exit_code(&c.view.state) == Some(0))
    }

    fn finished(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(|c| c.done)
            || self
                .init
                .iter()
                .any(|c| c.done && exit_code(&c.view.state) != Some(0))
    }

    /// Runs the pod until it is gone; returns when its sandbox is removed.
    pub async fn run(mut self) {
        if self.pod.metadata.deletion_timestamp.is_some() {
            self.begin_termination();
        } else if self.sandbox.is_some() {
            // Adopted: start what is not running any more.
            self.advance();
        }
        loop {
            self.publish().await;
            if self.terminating_since.is_some() && self.all_stopped() {
                self.finish_termination().await;
                return;
            }
            let deadline = self.next_deadline();
            tokio::select! {
                message = self.inbox.recv() => match message {
                    Some(Message::Update(pod)) => self.update(*pod),
                    Some(Message::Gone) => {
                        self.stop_now().await;
                        return;
                    }
                    // The kubelet is stopping: its pods keep running (a later kubelet adopts
                    // them), as with kubelet.
                    None => return,
                },
                Some(exit) = self.exits.recv() => self.exited(exit),
                () = sleep_until(deadline) => self.due().await,
            }
        }
    }

    fn update(&mut self, pod: Pod) {
        let deleting = pod.metadata.deletion_timestamp.is_some();
        self.pod = pod;
        if deleting && self.terminating_since.is_none() {
            self.begin_termination();
        }
    }

    fn all_stopped(&self) -> bool {
        self.init
            .iter()
            .chain(&self.containers)
            .all(|c| c.pid.is_none())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut times = vec![self.sandbox_retry, self.write_retry, self.kill_at];
        for c in self.init.iter().chain(&self.containers) {
            times.push(c.restart_at);
            if c.pid.is_some() {
                times.push(c.readiness.as_ref().map(|p| p.next));
                times.push(c.liveness.as_ref().map(|p| p.next));
            }
        }
        times.into_iter().flatten().min()
    }

    /// Whatever timer is due: the sandbox, restarts, probes, the grace period, a status retry.
    async fn due(&mut self) {
        let now = Instant::now();
        if self.kill_at.is_some_and(|t| t <= now) {
            self.kill_at = None;
            for c in self.init.iter().chain(&self.containers) {
                if let Some(pid) = c.pid {
                    runtime::kill(pid, c.cgroup.as_deref());
                }
            }
        }
        if self.write_retry.is_some_and(|t| t <= now) {
            self.write_retry = None;
            self.last_written = None;
        }
        if self.terminating_since.is_some() {
            return;
        }
        if self.sandbox_retry.is_some_and(|t| t <= now) {
            self.sandbox_retry = None;
            self.make_sandbox().await;
            if self.sandbox.is_some() {
                self.start_time = Some(meta::now_rfc3339());
                self.advance();
            }
            return;
        }
        for init in [true, false] {
            for i in 0..self.list(init).len() {
                if self.list(init)[i].restart_at.is_some_and(|t| t <= now) {
                    self.list_mut(init)[i].restart_at = None;
                    self.start(init, i);
                }
            }
        }
        self.probe(now).await;
    }

    fn list(&self, init: bool) -> &Vec<Ctr> {
        if init {
            &self.init
        } else {
            &self.containers
        }
    }

    fn list_mut(&mut self, init: bool) -> &mut Vec<Ctr> {
        if init {
            &mut self.init
        } else {
            &mut self.containers
        }
    }

    async fn make_sandbox(&mut self) {
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        if self.ips.is_empty() {
            match self.shared.allocate() {
                Ok(ips) => {
                    self.ips = ips;
                    self.ips_held = true;
                }
                Err(e) => return self.sandbox_failed(e),
            }
        }
        match runtime::create_sandbox(&self.shared.node, &self.shared.config, &uid, &self.ips).await
        {
            Ok(sandbox) => {
                self.sandbox = Some(sandbox);
                self.sandbox_error = None;
            }
            Err(e) => self.sandbox_failed(format!("{e:#}")),
        }
    }

    fn sandbox_failed(&mut self, error: String) {
        tracing::warn!(pod = %name_of(&self.pod), %error, "creating the pod sandbox failed; retrying");
        self.shared.metrics.sandbox_failures.inc();
        self.shared.events.warning(
            Involved::of(&self.pod),
            "FailedCreatePodSandBox",
            format!("Failed to create pod sandbox: {error}"),
        );
        self.sandbox_error = Some(format!("Failed to create pod sandbox: {error}"));
        self.sandbox_retry = Some(Instant::now() + Duration::from_secs(2));
    }

    /// Starts what should run next: the first unfinished init container, or every container.
    fn advance(&mut self) {
        if self.sandbox.is_none() || self.terminating_since.is_some() {
            return;
        }
        if let Some(i) = self.init.iter().position(|c| !c.done) {
            let c = &self.init[i];
            if c.pid.is_none() && c.restart_at.is_none() && !self.finished() {
                self.start(true, i);
            }
            return;
        }
        for i in 0..self.containers.len() {
            let c = &self.containers[i];
            if c.pid.is_none() && c.restart_at.is_none() && !c.done && c.generation == 0 {
                self.start(false, i);
            }
        }
    }

    fn start(&mut self, init: bool, index: usize) {
        let Some(sandbox) = &self.sandbox else { return };
        let pod_name = self.pod.metadata.name.clone().unwrap_or_default();
        let env = match environment(&self.pod, &self.list(init)[index].spec, &self.ips) {
            Ok(env) => env,
            Err(message) => {
                return self.cannot_start(init, index, "CreateContainerConfigError", message)
            }
        };
        let spec = self.list(init)[index].spec.clone();
        let expand = |v: &String| expand(v, &env);
        let command: Vec<String> = spec.command.iter().flatten().map(expand).collect();
        let args: Vec<String> = spec.args.iter().flatten().map(expand).collect();
        let launch = match catalog::resolve(
            spec.image.as_deref().unwrap_or(""),
            &command,
            &args,
            &self.shared.config.workload_binary,
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ) {
            Ok(launch) => launch,
            Err(e) => return self.cannot_start(init, index, e.reason, e.message),
        };
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        let c = &self.list(init)[index];
        // This start's restart count: the log of each run is its own file.
        let attempt = c.view.restart_count + i32::from(c.generation > 0);
        let log = self.shared.config.log_dir.join(format!(
            "{}_{}_{}/{}/{}.log",
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod_name,
            uid,
            spec.name,
            attempt
        ));
        match runtime::start(sandbox, &spec.name, &pod_name, &launch.argv, &env, &log) {
            Ok(process) => {
                let generation = c.generation + 1;
                let tx = self.exits_tx.clone();
                let mut child = process.child;
                tokio::spawn(async move {
                    if let Ok(status) = child.wait().await {
                        let _ = tx
                            .send(Exit {
                                init,
                                index,
                                generation,
                                status: Some(status),
                            })
                            .await;
                    }
                });
                let now = Instant::now();
                let (readiness, liveness) = probes(&spec, now, false);
                let about = Involved::of(&self.pod).container(&spec.name);
                let image = spec.image.clone().unwrap_or_default();
                self.shared.events.normal(
                    about.clone(),
                    "Pulled",
                    format!("Container image {image:?} already present on machine"),
                );
                self.shared.events.normal(
                    about.clone(),
                    "Created",
                    format!("Created container {}", spec.name),
                );
                self.shared.events.normal(
                    about,
                    "Started",
                    format!("Started container {}", spec.name),
                );
                let c = &mut self.list_mut(init)[index];
                if c.generation > 0 {
                    c.view.restart_count += 1;
                }
                c.generation = generation;
                c.pid = Some(process.pid);
                c.cgroup = process.cgroup;
                c.started = Some(now);
                c.view.container_id = Some(format!("kpx://{}", process.pid));
                c.view.state = State::Running {
                    started_at: meta::now_rfc3339(),
                };
                c.view.started = true;
                c.view.ready = readiness.is_none() && !init;
                c.readiness = if init { None } else { readiness };
                c.liveness = if init { None } else { liveness };
                self.shared.metrics.container_starts.inc();
            }
            Err(e) => self.cannot_start(init, index, "CreateContainerError", format!("{e:#}")),
        }
    }

    /// A container that cannot start: say why and try again after the back-off.
    fn cannot_start(&mut self, init: bool, index: usize, reason: &str, message: String) {
        let pod = name_of(&self.pod);
        let (container, image) = {
            let c = &self.list(init)[index];
            (c.view.name.clone(), c.view.image.clone())
        };
        tracing::warn!(%pod, %container, reason, %message, "cannot start the container");
        let about = Involved::of(&self.pod).container(&container);
        if reason == "ErrImagePull" {
            self.shared.events.warning(
                about.clone(),
                "Failed",
                format!("Failed to pull image {image:?}: {message}"),
            );
            self.shared.events.normal(
                about,
                "BackOff",
                format!("Back-off pulling image {image:?}"),
            );
        } else {
            self.shared
                .events
                .warning(about, "Failed", format!("Error: {message}"));
        }
        let c = &mut self.list_mut(init)[index];
        // As kubelet: the first failure to "pull" is ErrImagePull, the wait before the next
        // attempt ImagePullBackOff.
        c.view.state = if reason == "ErrImagePull" && !c.backoff.is_zero() {
            State::waiting(
                "ImagePullBackOff",
                Some(format!("Back-off pulling image {image:?}: {message}")),
            )
        } else {
            State::waiting(reason, Some(message))
        };
        c.backoff = next_backoff(c.backoff);
        c.restart_at = Some(Instant::now() + c.backoff);
        self.shared.metrics.start_failures.inc();
    }

    fn exited(&mut self, exit: Exit) {
        let policy = self.restart_policy();
        let terminating = self.terminating_since.is_some();
        let pod = name_of(&self.pod);
        let pod_ref = format!(
            "{}_{}({})",
            self.pod.metadata.name.as_deref().unwrap_or(""),
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            self.pod.metadata.uid.as_deref().unwrap_or("")
        );
        let log_tail = self.log_tail(exit.init, exit.index);
        let c = &mut self.list_mut(exit.init)[exit.index];
        if exit.generation != c.generation {
            return;
        }
        let (code, signal) = {
            use std::os::unix::process::ExitStatusExt;
            match exit.status.map(|s| (s.code(), s.signal())) {
                Some((Some(code), _)) => (code, None),
                Some((None, Some(sig))) => (128 + sig, Some(sig)),
                // Not our child: the status went to whoever reaped it (kubelet's runtime
                // reports such a container the same way, as 137).
                None => (137, None),
                _ => (1, None),
            }
        };
        let started_at = match &c.view.state {
            State::Running { started_at } => started_at.clone(),
            _ => meta::now_rfc3339(),
        };
        let unknown = exit.status.is_none();
        let terminated = State::Terminated {
            exit_code: code,
            signal,
            reason: if unknown {
                "ContainerStatusUnknown"
            } else if code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            message: if unknown {
                Some(
                    "the container was started by an earlier kubelet: its exit status is unknown"
                        .into(),
                )
            } else {
                (code != 0 && !terminating)
                    .then(|| log_tail.clone())
                    .flatten()
            },
            started_at,
            finished_at: meta::now_rfc3339(),
        };
        tracing::info!(%pod, container = %c.view.name, code, last_line = ?log_tail, "container exited");
        if let Some(cg) = c.cgroup.take() {
            tokio::spawn(async move { runtime::remove_cgroup(&cg).await });
        }
        c.pid = None;
        c.view.ready = false;
        if let Some(r) = &mut c.readiness {
            r.tracker = Tracker::new(false);
        }
        let ran = c.started.map(|s| s.elapsed()).unwrap_or_default();
        let restart = !terminating
            && match (exit.init, policy.as_str()) {
                (true, _) => code != 0 && policy != "Never",
                (false, "Always") => true,
                (false, "OnFailure") => code != 0,
                _ => false,
            };
        if !restart {
            c.view.state = terminated;
            // A failed init container that will not restart ends the pod (see `finished`).
            c.done = true;
        } else {
            if ran >= BACKOFF_RESET {
                c.backoff = Duration::ZERO;
            }
            let delay = c.backoff;
            c.backoff = next_backoff(c.backoff);
            c.view.last_state = Some(terminated);
            c.view.state = if delay.is_zero() {
                State::waiting("ContainerCreating", None)
            } else {
                State::waiting(
                    "CrashLoopBackOff",
                    Some(format!(
                        "back-off {}s restarting failed container={} pod={pod_ref}",
                        delay.as_secs(),
                        c.view.name
                    )),
                )
            };
            c.restart_at = Some(Instant::now() + delay);
            self.shared.metrics.container_restarts.inc();
            if !delay.is_zero() {
                let about =
                    Involved::of(&self.pod).container(&self.list(exit.init)[exit.index].view.name);
                let name = about.field_path.clone().unwrap_or_default();
                drop(name);
                self.shared.events.warning(
                    about.clone(),
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {} in pod {pod_ref}",
                        self.list(exit.init)[exit.index].view.name
                    ),
                );
            }
        }
        if self.terminating_since.is_none() {
            self.advance();
            if self.finished() {
                // A finished pod keeps its status; its sandbox goes (as kubelet tears it down).
                for c in self.init.iter_mut().chain(self.containers.iter_mut()) {
                    c.restart_at = None;
                    c.done = true;
                }
            }
        }
    }

    /// The last line the container wrote, as kubelet's FallbackToLogsOnError would report.
    fn log_tail(&self, init: bool, index: usize) -> Option<String> {
        let c = &self.list(init)[index];
        let log = self.shared.config.log_dir.join(format!(
            "{}_{}_{}/{}/{}.log",
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            self.pod.metadata.name.as_deref().unwrap_or(""),
            self.pod.metadata.uid.as_deref().unwrap_or(""),
            c.view.name,
            c.view.restart_count
        ));
        let text = std::fs::read_to_string(log).ok()?;
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        Some(line.chars().take(1024).collect())
    }

    async fn probe(&mut self, now: Instant) {
        let Some(sandbox) = &self.sandbox else { return };
        let Some(ip) = self.ips.first().copied() else {
            return;
        };
        let entry = match crate::netns::Enter::entry(&sandbox.entry) {
            Ok(e) => e,
            Err(_) => return,
        };
        let pod = name_of(&self.pod);
        for c in &mut self.containers {
            if c.pid.is_none() {
                continue;
            }
            if let Some(p) = c.readiness.as_mut().filter(|p| p.next <= now) {
                let ok = probe::run(&p.spec.check, ip, &entry, p.spec.timeout).await;
                p.next = Instant::now() + p.spec.period;
                if let Some(ready) = p.tracker.record(ok, &p.spec) {
                    tracing::info!(%pod, container = %c.view.name, ready, "readiness changed");
                    c.view.ready = ready;
                }
                if !ok {
                    self.shared.events.warning(
                        Involved::of(&self.pod).container(&c.view.name),
                        "Unhealthy",
                        format!("Readiness probe failed: {}", p.spec.check.describe()),
                    );
                }
            }
            if let Some(p) = c.liveness.as_mut().filter(|p| p.next <= now) {
                let ok = probe::run(&p.spec.check, ip, &entry, p.spec.timeout).await;
                p.next = Instant::now() + p.spec.period;
                if p.tracker.record(ok, &p.spec) == Some(false) {
                    tracing::info!(%pod, container = %c.view.name, "liveness probe failed; restarting the container");
                    let about = Involved::of(&self.pod).container(&c.view.name);
                    self.shared.events.warning(
                        about.clone(),
                        "Unhealthy",
                        format!("Liveness probe failed: {}", p.spec.check.describe()),
                    );
                    self.shared.events.normal(
                        about,
                        "Killing",
                        format!(
                            "Container {} failed liveness probe, will be restarted",
                            c.view.name
                        ),
                    );
                    self.shared.metrics.liveness_kills.inc();
                    p.tracker = Tracker::new(true);
                    // Killed; its exit restarts it according to the restart policy.
                    if let Some(pid) = c.pid {
                        runtime::signal(pid, Signal::SIGTERM);
                        let cgroup = c.cgroup.clone();
                        let grace = grace_seconds(&self.pod);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(grace)).await;
                            runtime::kill(pid, cgroup.as_deref());
                        });
                    }
                }
            }
        }
    }

    fn begin_termination(&mut self) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .map(|g| g.max(0) as u64)
            .unwrap_or_else(|| grace_seconds(&self.pod));
        tracing::info!(pod = %name_of(&self.pod), grace, "terminating the pod");
        let now = Instant::now();
        self.terminating_since = Some(now);
        self.kill_at = Some(now + Duration::from_secs(grace));
        for c in self.init.iter_mut().chain(self.containers.iter_mut()) {
            c.restart_at = None;
            c.view.ready = false;
            if let Some(pid) = c.pid {
                self.shared.events.normal(
                    Involved::of(&self.pod).container(&c.view.name),
                    "Killing",
                    format!("Stopping container {}", c.view.name),
                );
                runtime::signal(pid, Signal::SIGTERM);
            }
        }
    }

    async fn finish_termination(&mut self) {
        if let Some(sandbox) = self.sandbox.take() {
            runtime::remove_sandbox(sandbox).await;
        }
        self.release_ips();
        self.publish().await;
        let api = Api::<Pod>::namespaced(
            self.shared.client.clone(),
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        for attempt in 0..10u32 {
            match api.delete_with_grace(&name, 0).await {
                Ok(_) => return,
                Err(e) if e.is_not_found() => return,
                Err(e) => {
                    self.shared.metrics.api_failures.inc();
                    tracing::warn!(pod = %name_of(&self.pod), error = %e, attempt, "deleting the terminated pod failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// The pod left the API: kill everything now and remove the sandbox.
    async fn stop_now(&mut self) {
        for c in self.init.iter().chain(&self.containers) {
            if let Some(pid) = c.pid {
                runtime::kill(pid, c.cgroup.as_deref());
            }
        }
        if let Some(sandbox) = self.sandbox.take() {
            runtime::remove_sandbox(sandbox).await;
        }
        self.release_ips();
    }

    fn view(&self) -> PodView {
        let sandbox_error = self.sandbox_error.clone();
        let mut containers: Vec<ContainerView> =
            self.containers.iter().map(|c| c.view.clone()).collect();
        if let Some(error) = sandbox_error {
            for c in &mut containers {
                if matches!(&c.state, State::Waiting { reason, .. } if reason == "ContainerCreating")
                {
                    c.state = State::waiting("ContainerCreating", Some(error.clone()));
                }
            }
        }
        PodView {
            sandbox_ready: self.sandbox.is_some(),
            ips: if self.sandbox.is_some() || self.finished() {
                self.ips.clone()
            } else {
                Vec::new()
            },
            host_ips: self.shared.config.node_ips.clone(),
            start_time: self.start_time.clone(),
            init_containers: self.init.iter().map(|c| c.view.clone()).collect(),
            containers,
            initialized: self.initialized(),
            restart_policy: self.restart_policy(),
            finished: self.finished() && self.all_stopped(),
        }
    }

    /// Writes the status when it changed since the last write (retried on failure).
    async fn publish(&mut self) {
        if self.finished() && self.all_stopped() && self.terminating_since.is_none() {
            if let Some(sandbox) = self.sandbox.take() {
                runtime::remove_sandbox(sandbox).await;
                self.release_ips();
            }
        }
        let previous = self
            .pod
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(json!({}));
        let status = pod_status::status(&self.view(), &previous, &meta::now_rfc3339());
        // Compare without the clock: a status differing only in "now" is not a change.
        let comparable = strip_times(&status);
        if self.last_written.as_ref() == Some(&comparable) {
            return;
        }
        let api = Api::<Pod>::namespaced(
            self.shared.client.clone(),
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        match api
            .patch_status(&name, Patch::Merge, &json!({"status": status}))
            .await
        {
            Ok(pod) => {
                self.pod.status = pod.status;
                self.last_written = Some(comparable);
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                self.shared.metrics.api_failures.inc();
                tracing::warn!(pod = %name_of(&self.pod), error = %e, "writing the pod status failed; retrying");
                self.write_retry = Some(Instant::now() + RETRY);
            }
        }
    }
}

/// A started container's readiness and liveness probes, first due after their initial delay;
/// readiness starts as `ready`.
fn probes(spec: &Container, now: Instant, ready: bool) -> (Option<Probing>, Option<Probing>) {
    let ports = spec.ports.clone().unwrap_or_default();
    let probing = |p: Option<&k8s_openapi::api::core::v1::Probe>, initial| {
        p.and_then(|p| probe::spec(p, &ports).ok())
            .map(|spec| Probing {
                next: now + spec.initial_delay,
                spec,
                tracker: Tracker::new(initial),
            })
    };
    (
        probing(spec.readiness_probe.as_ref(), ready),
        probing(spec.liveness_probe.as_ref(), true),
    )
}

/// The status without transition times, for change detection.
fn strip_times(status: &Value) -> Value {
    let mut s = status.clone();
    if let Some(conditions) = s["conditions"].as_array_mut() {
        for c in conditions {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    s
}

fn exit_code(state: &State) -> Option<i32> {
    match state {
        State::Terminated { exit_code, .. } => Some(*exit_code),
        _ => None,
    }
}

fn next_backoff(current: Duration) -> Duration {
    if current.is_zero() {
        BACKOFF_START
    } else {
        (current * 2).min(BACKOFF_MAX)
    }
}

fn grace_seconds(pod: &Pod) -> u64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .max(0) as u64
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The container's environment: literal values and the downward API's pod fields.
fn environment(pod: &Pod, c: &Container, ips: &[IpAddr]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for var in c.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            let Some(field) = &from.field_ref else {
                return Err(format!(
                    "env {:?}: only value and valueFrom.fieldRef are supported by kpx-kubelet \
                     (no Secrets or ConfigMaps)",
                    var.name
                ));
            };
            match field.field_path.as_str() {
                "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
                "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                "spec.nodeName" => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                "spec.serviceAccountName" => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                "status.podIP" => ips.first().map(ToString::to_string).unwrap_or_default(),
                "status.podIPs" => ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                "status.hostIP" => String::new(),
                other => {
                    return Err(format!(
                        "env {:?}: fieldRef {other:?} is not supported; allowed values: \
                         metadata.name, metadata.namespace, metadata.uid, spec.nodeName, \
                         spec.serviceAccountName, status.podIP, status.podIPs",
                        var.name
                    ))
                }
            }
        } else {
            expand(var.value.as_deref().unwrap_or_default(), &out)
        };
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

/// Kubernetes' `$(VAR)` references in command, args and env values (`$$` escapes).
fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_references() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x $(A) $(B) $$(A) $", &env), "x 1 $(B) $(A) $");
    }

    #[test]
    fn back_off_doubles_to_five_minutes() {
        let mut b = Duration::ZERO;
        let mut seen = vec![];
        for _ in 0..7 {
            b = next_backoff(b);
            seen.push(b.as_secs());
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 300, 300]);
    }
}
