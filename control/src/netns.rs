//! Network namespaces: created with `ip netns add` (so `ip netns exec` and `kpx-lab down` see
//! them), entered with setns on a helper thread, configured with rtnetlink from a socket opened
//! inside the namespace. Nothing here changes the namespace the process started in, except
//! through [`Netns::current`] (kpx-kubelet, which runs inside its node's namespace).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

use anyhow::{bail, Context};
use futures::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// A named network namespace; deleted on drop.
pub struct Netns {
    pub name: String,
    file: File,
    handle: Handle,
    /// Created here, so removed on drop (not the process's own namespace, nor a kept one).
    owned: bool,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates the namespace (with loopback up) and a netlink handle inside it.
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let file = File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("opening netns {name}"))?;
        let runtime = tokio::runtime::Handle::current();
        let fd = file.try_clone()?;
        // The netlink socket is created on a thread inside the namespace and stays bound to it.
        let (connection, handle) = std::thread::spawn(move || -> anyhow::Result<_> {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            let _guard = runtime.enter();
            let (connection, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
            Ok((connection, handle))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        tokio::spawn(connection);
        let ns = Self {
            name: name.to_string(),
            file,
            handle,
            owned: true,
        };
        ns.up("lo").await?;
        Ok(ns)
    }

    /// The namespace this process runs in (never removed on drop).
    pub fn current() -> anyhow::Result<Self> {
        let file = File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
        let (connection, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
        tokio::spawn(connection);
        Ok(Self {
            name: "(own)".into(),
            file,
            handle,
            owned: false,
        })
    }

    /// Keeps the namespace after this value is gone (its netlink socket closes): the returned
    /// entry still enters it, and [`delete`] removes it by name.
    pub fn keep(mut self) -> anyhow::Result<Entry> {
        self.owned = false;
        self.entry()
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates stay there).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.entry()?.enter(f)
    }

    /// A handle that can enter the namespace from anywhere (for tasks that outlive a borrow).
    pub fn entry(&self) -> anyhow::Result<Entry> {
        Ok(Entry(self.file.try_clone()?, None))
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let out = self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")])
            .output()?;
        if !out.status.success() {
            bail!(
                "sysctl {key}={value} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub async fn index(&self, link: &str) -> anyhow::Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(link.to_string())
            .execute();
        let msg = links
            .try_next()
            .await
            .with_context(|| format!("finding link {link} in {}", self.name))?
            .with_context(|| format!("no link {link} in {}", self.name))?;
        Ok(msg.header.index)
    }

    pub async fn up(&self, link: &str) -> anyhow::Result<()> {
        let index = self.index(link).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await?;
        Ok(())
    }

    /// A bridge with a fixed MAC address: a bridge without one takes the lowest of its ports'
    /// and changes it as pods come and go, leaving pods' neighbour entries for their gateway
    /// pointing at an address nothing answers (their traffic is flooded, not routed, for the
    /// half minute until the entry goes stale). The CNI bridge plugin fixes it the same way.
    pub async fn add_bridge(&self, name: &str) -> anyhow::Result<()> {
        let mut mac = vec![0x02, 0x6b, 0x70, 0, 0, 0];
        mac[3..].copy_from_slice(&rand::random::<[u8; 3]>());
        self.handle
            .link()
            .add(LinkBridge::new(name).address(mac).up().build())
            .execute()
            .await?;
        Ok(())
    }

    /// A veth pair: `local` stays here, `remote` moves into `peer` under the name `remote_name`.
    pub async fn add_veth(
        &self,
        local: &str,
        peer: &Netns,
        temp: &str,
        remote_name: &str,
    ) -> anyhow::Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(local, temp).build())
            .execute()
            .await?;
        let index = self.index(temp).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(peer.file.as_raw_fd())
                    .build(),
            )
            .execute()
            .await?;
        let moved = peer.index(temp).await?;
        peer.handle
            .link()
            .set(
                LinkUnspec::new_with_index(moved)
                    .name(remote_name.to_string())
                    .build(),
            )
            .execute()
            .await?;
        peer.up(remote_name).await?;
        self.up(local).await
    }

    pub async fn attach(&self, link: &str, bridge: &str) -> anyhow::Result<()> {
        let (index, bridge) = (self.index(link).await?, self.index(bridge).await?);
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).controller(bridge).build())
            .execute()
            .await?;
        Ok(())
    }

    /// Lets the bridge send a frame back out of the port it came in on. With br_netfilter
    /// loaded, a pod's packet to its own Service is DNATed at the bridge and bridged back to the
    /// pod's port; kubelet's hairpin-veth mode sets this for the same reason.
    pub async fn hairpin(&self, port: &str) -> anyhow::Result<()> {
        let index = self.index(port).await?;
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).hairpin(true).build())
            .execute()
            .await?;
        Ok(())
    }

    /// An address on `link`. IPv6 addresses skip duplicate address detection: every lab
    /// address is unique by construction, and DAD would keep them unusable for a second or two.
    pub async fn add_address(&self, link: &str, address: IpAddr, prefix: u8) -> anyhow::Result<()> {
        let index = self.index(link).await?;
        let mut request = self.handle.address().add(index, address, prefix);
        if address.is_ipv6() {
            let message = request.message_mut();
            message.header.flags = AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request.execute().await?;
        Ok(())
    }

    /// A route to `destination/prefix` via `gateway`, or out of `link` when there is none.
    pub async fn add_route(
        &self,
        destination: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        link: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut route = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(destination, prefix)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(gateway) = gateway {
            route = route.gateway(gateway).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(link) = link {
            route = route.output_interface(self.index(link).await?);
        }
        self.handle.route().add(route.build()).execute().await?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("kpx-lab: removing {}: {e}", self.name);
        }
    }
}

/// An open reference to a namespace, and the cgroup its clients run in (a node's): traffic
/// from an entry with a cgroup comes from a client process placed there, as a process on that
/// node would be, so socket-level load balancing sees it.
pub struct Entry(File, Option<std::path::PathBuf>);

/// Anything traffic can be sent from: a namespace, or an owned reference to one.
pub trait Enter {
    fn entry(&self) -> anyhow::Result<Entry>;
}

impl Enter for Netns {
    fn entry(&self) -> anyhow::Result<Entry> {
        Netns::entry(self)
    }
}

impl Enter for Entry {
    fn entry(&self) -> anyhow::Result<Entry> {
        Ok(Entry(self.0.try_clone()?, self.1.clone()))
    }
}

impl Entry {
    /// A namespace made with `ip netns add` (or kpx-kubelet), by name.
    pub fn open(name: &str) -> anyhow::Result<Self> {
        let file = File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("no network namespace {name}"))?;
        Ok(Entry(file, None))
    }

    /// The same namespace, with clients placed in `cgroup`.
    pub fn in_cgroup(self, cgroup: std::path::PathBuf) -> Self {
        Entry(self.0, Some(cgroup))
    }

    pub fn cgroup(&self) -> Option<&std::path::Path> {
        self.1.as_deref()
    }

    /// A command that starts inside this namespace (and cgroup, if any).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        use std::os::unix::process::CommandExt;
        let fd = self.0.try_clone()?;
        let procs = match &self.1 {
            Some(cg) => Some(std::ffi::CString::new(
                cg.join("cgroup.procs").as_os_str().as_encoded_bytes(),
            )?),
            None => None,
        };
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec only async-signal-safe calls are made (open, write,
        // close, setns) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    let f = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if f < 0 || libc::write(f, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(f);
                }
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let fd = self.0.try_clone()?;
        std::thread::spawn(move || -> anyhow::Result<T> {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }
}

/// Names of existing namespaces starting with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process whose network namespace is `name` (before it is removed).
pub fn kill_processes(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Removes namespaces by name (for `kpx-lab down`).
pub fn delete(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "del", name])
}

/// Where the cgroup v2 file system is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid host), if it is.
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| std::path::PathBuf::from(path))
    })
}
