//! The runtime: a pod is a network namespace behind a veth on the node's bridge, holding an
//! address per family from the node's pod CIDRs; a container is a process started inside it,
//! in a cgroup of its own under the node's (so the node's socket-level load balancing applies
//! to it and it can be killed as a whole), in a UTS namespace named after the pod.
//! All kernel effects of the kubelet are here.

use std::net::IpAddr;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;

use super::ipam::Ipam;
use super::Config;
use crate::netns::{Enter, Entry, Netns};

/// A pod's network namespace, as long as the pod lives.
pub struct Sandbox {
    pub netns_name: String,
    pub entry: Entry,
    pub ips: Vec<IpAddr>,
    /// `<node cgroup>/pod<uid>`, holding a cgroup per container.
    pub cgroup: Option<PathBuf>,
}

/// A started container process.
pub struct Process {
    pub pid: u32,
    pub child: tokio::process::Child,
    pub cgroup: Option<PathBuf>,
}

/// The first 8 hex digits of a pod UID: short enough for interface names (15 bytes).
pub fn short_uid(uid: &str) -> String {
    uid.chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect()
}

pub fn netns_name(config: &Config, uid: &str) -> String {
    format!("{}{}", config.netns_prefix, short_uid(uid))
}

/// Creates the pod's namespace and wires it to the node's bridge with `ips`.
pub async fn create_sandbox(
    node: &Netns,
    config: &Config,
    uid: &str,
    ips: &[IpAddr],
) -> anyhow::Result<Sandbox> {
    let short = short_uid(uid);
    let name = netns_name(config, uid);
    // A namespace of the same name left by a kubelet that died mid-way.
    if crate::netns::list(&name).contains(&name) {
        let _ = crate::netns::delete(&name);
    }
    let ns = Netns::create(&name).await?;
    let host = format!("kpx{short}");
    let wire = async {
        node.add_veth(&host, &ns, &format!("t{short}"), "eth0")
            .await?;
        node.attach(&host, &config.bridge)
            .await
            .with_context(|| format!("attaching {host} to the bridge {}", config.bridge))?;
        node.hairpin(&host).await?;
        for (ip, cidr) in ips.iter().zip(&config.pod_cidrs) {
            ns.add_address("eth0", *ip, cidr.prefix_len()).await?;
            let default = match ip {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            };
            ns.add_route(default, 0, Some(Ipam::gateway(cidr)), None)
                .await?;
        }
        anyhow::Ok(())
    };
    // On failure the namespace (and the veth in it) goes with `ns`.
    wire.await
        .with_context(|| format!("wiring the pod's namespace {name}"))?;
    let cgroup = match &config.cgroup_root {
        Some(root) => {
            let dir = root.join(format!("pod{short}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => Some(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(dir),
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        }
        None => None,
    };
    Ok(Sandbox {
        netns_name: name,
        entry: ns.keep()?,
        ips: ips.to_vec(),
        cgroup,
    })
}

/// Opens (creating it) a container's log as its stdout and stderr. `O_APPEND` is what log
/// rotation relies on ([`super::logs`], copytruncate): after the kubelet truncates the file,
/// the process's next write lands at the new end, not at its old offset (which would leave a
/// sparse hole of NULs as long as the old log).
pub fn open_log(log: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
}

/// Starts a container's process in the sandbox; output goes to `log` (appended).
pub fn start(
    sandbox: &Sandbox,
    container: &str,
    hostname: &str,
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<Process> {
    let (program, args) = argv.split_first().context("an empty command")?;
    let cgroup = match &sandbox.cgroup {
        Some(pod) => {
            let dir = pod.join(container);
            if let Err(e) = std::fs::create_dir(&dir) {
                anyhow::ensure!(
                    e.kind() == std::io::ErrorKind::AlreadyExists,
                    "creating {}: {e}",
                    dir.display()
                );
            }
            Some(dir)
        }
        None => None,
    };
    let entry = sandbox.entry.entry()?;
    let entry = match &cgroup {
        Some(dir) => entry.in_cgroup(dir.clone()),
        None => entry,
    };
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let out = open_log(log).with_context(|| format!("opening the log {}", log.display()))?;
    let mut cmd = entry.command(program)?;
    let host_text = hostname.to_string();
    let hostname = std::ffi::CString::new(hostname)?;
    // SAFETY: only async-signal-safe calls (unshare, sethostname) on data made before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUTS) != 0
                || libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOSTNAME", host_text)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {program:?}"))?;
    let pid = child.id().context("the process exited at once")?;
    Ok(Process { pid, child, cgroup })
}

/// Sends `signal` to the container's main process.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Kills every process of the container `pid` leads: its whole cgroup (or its process group).
pub fn kill(pid: u32, cgroup: Option<&Path>) {
    if let Some(cg) = cgroup {
        if std::fs::write(cg.join("cgroup.kill"), "1").is_ok() {
            return;
        }
    }
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Removes a container's cgroup once its processes are gone.
pub async fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(cgroup = %dir.display(), "a container's cgroup could not be removed");
}

/// Removes the pod's namespace (its veth goes with it), after killing anything still in it.
pub async fn remove_sandbox(sandbox: Sandbox) {
    crate::netns::kill_processes(&sandbox.netns_name);
    if let Some(dir) = &sandbox.cgroup {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        if let Ok(children) = std::fs::read_dir(dir) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                remove_cgroup(&child.path()).await;
            }
        }
        remove_cgroup(dir).await;
    }
    if let Err(e) = crate::netns::delete(&sandbox.netns_name) {
        tracing::warn!(netns = %sandbox.netns_name, error = %e, "removing a pod's namespace");
    }
}

/// A sandbox an earlier kubelet of this node made for the pod `uid` with `ips`, if its
/// namespace is still there (a restarted kubelet adopts it instead of starting the pod again).
pub fn find_sandbox(config: &Config, uid: &str, ips: &[IpAddr]) -> Option<Sandbox> {
    let name = netns_name(config, uid);
    let entry = Entry::open(&name).ok()?;
    let cgroup = config
        .cgroup_root
        .as_ref()
        .map(|root| root.join(format!("pod{}", short_uid(uid))))
        .filter(|dir| dir.is_dir());
    Some(Sandbox {
        netns_name: name,
        entry,
        ips: ips.to_vec(),
        cgroup,
    })
}

/// Whether `pid` is a live process in the container's cgroup (so a pid reused by something
/// else is never taken for the container).
pub fn is_container_process(pid: u32, cgroup: Option<&Path>) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    match (cgroup, crate::netns::cgroup2_root()) {
        (Some(dir), Some(root)) => {
            let relative = dir.strip_prefix(&root).unwrap_or(dir);
            text.lines()
                .filter_map(|l| l.strip_prefix("0::"))
                .any(|p| Path::new(p.trim_start_matches('/')) == relative)
        }
        // Without cgroups nothing can tell a reused pid apart: never adopt.
        _ => false,
    }
}

/// Resolves when the process `pid` (not a child of this one) exits.
pub async fn wait_for_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return; // already gone
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the descriptor is owned by the AsyncFd for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(async_fd) => {
            let _ = async_fd.readable().await;
        }
        Err(_) => {
            while Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

/// Removes what an earlier kubelet of this node left and this one does not adopt: pod
/// namespaces with the node's prefix and pod cgroups (their processes killed).
pub fn remove_leftovers(config: &Config, keep: &std::collections::BTreeSet<String>) -> usize {
    let names: Vec<String> = crate::netns::list(&config.netns_prefix)
        .into_iter()
        .filter(|n| !keep.contains(n))
        .collect();
    for name in &names {
        crate::netns::kill_processes(name);
        let _ = crate::netns::delete(name);
    }
    if let Some(root) = &config.cgroup_root {
        for pod in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let path = pod.path();
            let file = pod.file_name().to_string_lossy().to_string();
            let kept = file
                .strip_prefix("pod")
                .is_some_and(|short| keep.contains(&format!("{}{short}", config.netns_prefix)));
            if !file.starts_with("pod") || !path.is_dir() || kept {
                continue;
            }
            let _ = std::fs::write(path.join("cgroup.kill"), "1");
            for _ in 0..50 {
                for c in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    if c.path().is_dir() {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
                if std::fs::remove_dir(&path).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    names.len()
}
