//! `EbpfBackend`: loads the programs with their maps pinned under the instance's bpffs
//! directory (adopting what a previous run left there), attaches them, and turns each snapshot
//! into ordered map writes. A thread beside it attaches the tc program to interfaces that
//! appear (new pods) and keeps the node's addresses in the maps.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::Ebpf;
use kpx_ebpf::apply::{self, apply, set_clients, set_config, set_node_addrs, ApplyError};
use kpx_ebpf::layout::{address, Clients, Config, NodeAddr};
use kpx_ebpf::objects::{self, Capacity, LoadError};
use kpx_ebpf::plan::{plan, plan_keys, Programmed};
use kpx_ebpf::{adopt, attach, features};

use super::{dump, wanted};
use crate::backend::{Backend, BackendError, Count, Dump, NodeState, SyncInput, SyncReport, Unit};
use crate::model::frontend::NodeConfig;

#[derive(Debug, Clone)]
pub struct EbpfConfig {
    /// This instance's directory on a bpffs: maps under it, links under `links/`.
    pub pin_dir: PathBuf,
    /// The cgroup (v2) whose sockets get socket-level load balancing; none: per-packet only.
    pub cgroup: Option<PathBuf>,
    /// The masquerade source per family; unset: the node's first address of that family.
    pub node_ips: Vec<IpAddr>,
    /// CIDRs NodePorts answer on; empty: every local address.
    pub nodeport_cidrs: Vec<(IpAddr, u8)>,
    /// `--cluster-cidr`, at most one per family: how pods are told apart from outside clients.
    pub cluster_cidrs: Vec<(IpAddr, u8)>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    pub capacity: Capacity,
}

impl EbpfConfig {
    fn links(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    /// The frontend model's view of the node, per family.
    pub fn node_configs(&self) -> wanted::NodeConfigs {
        let of = |ipv6: bool| NodeConfig {
            cluster_cidr: self
                .cluster_cidrs
                .iter()
                .copied()
                .find(|(ip, _)| ip.is_ipv6() == ipv6),
            masquerade_all: self.masquerade_all,
            // Load-balancer IPs are not bound on the node here: its own connections to them
            // leave from its own address, which the source ranges judge as they are.
            node_ips: Vec::new(),
        };
        [of(false), of(true)]
    }

    /// How the programs tell the node's sockets and pods' packets from outside clients.
    fn clients(&self) -> Result<Clients, BackendError> {
        let mut clients = Clients {
            node_netns: netns_cookie().map_err(|e| error("reading this namespace's cookie", e))?,
            ..Clients::default()
        };
        for (ip, len) in &self.cluster_cidrs {
            let (addr, _) = address(*ip);
            if ip.is_ipv6() {
                (clients.pod_net6, clients.pod_prefix6) = (addr, (*len).min(128));
            } else {
                (clients.pod_net4, clients.pod_prefix4) = (addr, (*len).min(32));
            }
        }
        Ok(clients)
    }
}

/// The programs this binary carries, as a digest: pinned links of other programs (an upgrade's
/// predecessor) are replaced at start, since a restarted proxy otherwise keeps its
/// predecessor's links and the old programs would read the new maps with the old semantics.
/// Kept in the pinned `kpx_version` map (bpffs holds no regular files).
fn programs_version() -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(objects::TC_LB);
    hasher.update(objects::SOCK_LB);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // Never 0, which means "none recorded".
    u64::from_le_bytes(first).max(1)
}

/// Detaches pinned links left by other programs (their maps stay adopted): traffic goes
/// unbalanced for the moment until the new links are attached, instead of the old programs
/// running on indefinitely.
fn replace_links_of_other_programs(tc: &Ebpf, config: &EbpfConfig) -> Result<(), BackendError> {
    let links = config.links();
    if attach::pinned_links(&links).is_empty() && attach::legacy_attachments().is_empty() {
        return Ok(());
    }
    let recorded =
        apply::programs_version(tc).map_err(|e| error("reading the programs' version", e))?;
    if recorded == programs_version() {
        return Ok(());
    }
    let removed =
        attach::detach_all(&links).map_err(|e| error("detaching the previous programs", e))?;
    tracing::info!(
        links = removed.len(),
        "replacing the links of other BPF programs (an upgrade)"
    );
    Ok(())
}

/// The cookie the kernel gives this network namespace (what `bpf_get_netns_cookie` returns
/// for the node's own sockets).
fn netns_cookie() -> std::io::Result<u64> {
    /// `SO_NETNS_COOKIE` (Linux 5.14), from `<asm-generic/socket.h>`.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Every failure here is a kernel call's (bpf(), a file under /sys or /proc).
fn error(what: &str, detail: impl std::fmt::Display) -> BackendError {
    BackendError::kernel(what, detail)
}

pub struct EbpfBackend {
    config: EbpfConfig,
    tc: Ebpf,
    /// Kept so the socket programs stay loaded while their links are created.
    _sock: Option<Ebpf>,
    programmed: Programmed,
    table: wanted::WantedTable,
    /// The node's addresses as last written to the maps.
    node: Option<NodeState>,
    stop: Arc<AtomicBool>,
}

fn load(config: &EbpfConfig, object: &[u8]) -> Result<Ebpf, BackendError> {
    objects::load(object, Some(&config.pin_dir), &config.capacity).map_err(|e| match e {
        LoadError::NotBuilt(why) => error("loading the BPF programs", why),
        other => error("loading the BPF programs", other),
    })
}

impl EbpfBackend {
    /// Checks the kernel, loads (or adopts) the maps, attaches everything.
    pub fn start(config: EbpfConfig) -> Result<Self, BackendError> {
        features::check(&config.pin_dir, config.cgroup.as_deref())
            .map_err(|why| error("checking the kernel's BPF features", why))?;
        accept_local()?;
        let mut tc = load(&config, objects::TC_LB)?;
        attach::load_tc(&mut tc).map_err(|e| error("loading kpx_tc_lb", e))?;
        // Written before any program is attached: the new programs read it from their first
        // packet (the maps of a previous run are adopted as they are).
        set_clients(&mut tc, &config.clients()?)
            .map_err(|e| error("writing how clients are told apart", e))?;
        replace_links_of_other_programs(&tc, &config)?;
        let sock = match &config.cgroup {
            Some(cgroup) => {
                let mut sock = load(&config, objects::SOCK_LB)?;
                attach::attach_cgroup(&mut sock, cgroup, &config.links())
                    .map_err(|e| error("attaching socket load balancing", e))?;
                Some(sock)
            }
            None => None,
        };
        let programmed = adopt::programmed(&tc).map_err(|e| error("reading the pinned maps", e))?;
        if !programmed.services.is_empty() {
            tracing::info!(
                frontends = programmed.services.len(),
                "adopted the pinned maps of a previous run"
            );
        }
        attach::attach_tc(&mut tc, &config.links()).map_err(|e| error("attaching tc", e))?;
        apply::set_programs_version(&mut tc, programs_version())
            .map_err(|e| error("writing the programs' version", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        spawn_watcher(config.clone(), stop.clone())?;
        let table = wanted::WantedTable::new(config.node_configs());
        Ok(Self {
            config,
            tc,
            _sock: sock,
            programmed,
            table,
            node: None,
            stop,
        })
    }

    /// Only the pin directory: the links detached and the pins removed (see [`cleanup`]);
    /// returns how many links were detached.
    pub fn cleanup_dir(pin_dir: PathBuf) -> Result<usize, BackendError> {
        cleanup(&pin_dir).map(|r| r.links.len())
    }
}

/// What [`cleanup`] removed of an eBPF mode's pins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EbpfCleanup {
    pub pin_dir: PathBuf,
    /// Link pins removed (`tc-ingress-N`, `cgroup-kpx_*`): each detached its program; and
    /// kpx's legacy tc filters removed (`tc-legacy-N`, interface N), on a kernel without tcx.
    pub links: Vec<String>,
    /// Pinned maps removed.
    pub maps: Vec<String>,
    /// Whether the pin directory itself went (it stays when something not kpx's is in it).
    pub dir_removed: bool,
    /// Why nothing was looked at: no such directory (nothing pinned, or no bpffs).
    pub skipped: Option<String>,
}

impl EbpfCleanup {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.maps.is_empty() && !self.dir_removed
    }
}

/// Removes what the eBPF mode left under `pin_dir`, with no backend running: the link pins
/// (every tc/tcx and cgroup attachment kpx makes is a pinned link, so removing the pins
/// detaches them; an unpinned link lives only as long as the process holding it), then the
/// pinned maps, then the directory if it is empty. Only names kpx creates are removed, so
/// another program's pins beside them stay. A missing directory (nothing pinned, no bpffs) is
/// quiet: a debug line, no error. On a kernel without tcx the tc program is a legacy filter
/// instead of a pinned link: kpx's filters on this namespace's interfaces are removed too
/// (`tc-legacy-N` in the report), pins or not.
pub fn cleanup(pin_dir: &Path) -> Result<EbpfCleanup, BackendError> {
    let mut report = EbpfCleanup {
        pin_dir: pin_dir.to_path_buf(),
        ..Default::default()
    };
    if !pin_dir.is_dir() {
        report.links =
            attach::detach_legacy().map_err(|e| error("removing kpx's legacy tc filters", e))?;
        report.skipped = Some(format!("{} does not exist", pin_dir.display()));
        tracing::debug!(pin_dir = %pin_dir.display(), "nothing pinned: no eBPF leftovers");
        return Ok(report);
    }
    let links = pin_dir.join("links");
    report.links =
        attach::detach_all(&links).map_err(|e| error("detaching the BPF programs", e))?;
    remove_dir_if_empty(&links)?;
    for map in objects::MAPS {
        match std::fs::remove_file(pin_dir.join(map)) {
            Ok(()) => report.maps.push(map.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(error(
                    &format!("removing the pinned map {}", pin_dir.join(map).display()),
                    e,
                ))
            }
        }
    }
    report.dir_removed = remove_dir_if_empty(pin_dir)?;
    Ok(report)
}

/// Removes `dir` if it exists and is empty; whether it did.
fn remove_dir_if_empty(dir: &Path) -> Result<bool, BackendError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            tracing::info!(dir = %dir.display(), "kept: it holds pins that are not kpx's");
            Ok(false)
        }
        Err(e) => Err(error(&format!("removing {}", dir.display()), e)),
    }
}

impl Drop for EbpfBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The tc program rewrites packets before routing: a masqueraded packet (and the reply of a
/// NodePort flow) reaches the IPv4 input path with one of the node's own addresses as its
/// source, which Linux drops as a martian unless `accept_local` is on. (IPv6 has no such check.)
fn accept_local() -> Result<(), BackendError> {
    let path = "/proc/sys/net/ipv4/conf/all/accept_local";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => {
            std::fs::write(path, "1").map_err(|e| error(&format!("setting {path}"), e))?;
            tracing::info!(
                "set net.ipv4.conf.all.accept_local=1 (masqueraded traffic has a local source)"
            );
            Ok(())
        }
    }
}

/// Writes the masquerade addresses and the NodePort addresses from the node's addresses (the
/// sync input's).
fn refresh_node(ebpf: &mut Ebpf, config: &EbpfConfig, node: &NodeState) -> Result<(), ApplyError> {
    let local: Vec<(String, IpAddr)> = node
        .addresses
        .iter()
        .map(|a| (a.interface.clone(), a.ip))
        .collect();
    let attachable: BTreeSet<String> = attach::interfaces().into_iter().map(|(n, _)| n).collect();
    let bridges: BTreeSet<String> = local
        .iter()
        .map(|(name, _)| name.clone())
        .filter(|name| !attachable.contains(name))
        .collect();
    // The masquerade source: as given, else the first address on a non-bridge interface.
    let pick = |v6: bool| -> [u8; 16] {
        config
            .node_ips
            .iter()
            .find(|ip| ip.is_ipv6() == v6)
            .or_else(|| {
                local
                    .iter()
                    .filter(|(name, _)| !bridges.contains(name))
                    .map(|(_, ip)| ip)
                    .find(|ip| ip.is_ipv6() == v6)
            })
            .map_or([0; 16], |ip| address(*ip).0)
    };
    set_config(
        ebpf,
        &Config {
            node_ip4: pick(false),
            node_ip6: pick(true),
        },
    )?;
    let nodeport: BTreeSet<NodeAddr> = local
        .iter()
        .map(|(_, ip)| *ip)
        .filter(|ip| wanted::answers_nodeports(ip, &config.nodeport_cidrs))
        .map(NodeAddr::new)
        .collect();
    set_node_addrs(ebpf, &nodeport)
}

/// Every 200 ms: attach to new interfaces (a new pod's) and forget gone ones. Its own copy of
/// the tc object shares the pinned maps. (The node's addresses come with each sync.)
fn spawn_watcher(config: EbpfConfig, stop: Arc<AtomicBool>) -> Result<(), BackendError> {
    let mut ebpf = load(&config, objects::TC_LB)?;
    attach::load_tc(&mut ebpf).map_err(|e| error("loading kpx_tc_lb", e))?;
    std::thread::Builder::new()
        .name("kpx-ebpf-links".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match attach::attach_tc(&mut ebpf, &config.links()) {
                    Ok(new) if !new.is_empty() => tracing::info!(interfaces = ?new, "attached tc"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "attaching tc"),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .map_err(|e| error("starting the interface watcher", e))?;
    Ok(())
}

impl Backend for EbpfBackend {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
        let SyncInput {
            state,
            changes,
            full,
            node,
        } = input;
        if full || self.node.as_ref() != Some(node) {
            refresh_node(&mut self.tc, &self.config, node)
                .map_err(|e| error("writing the node's addresses", e))?;
            self.node = Some(node.clone());
        }
        let ops = if full {
            // Trust the kernel, not memory: someone may have changed the maps.
            self.programmed =
                adopt::programmed(&self.tc).map_err(|e| error("reading the maps", e))?;
            self.table = wanted::WantedTable::full(state, self.config.node_configs());
            let (ops, next) = plan(&self.table.wanted, &self.programmed);
            self.programmed = next;
            ops
        } else {
            let touched = self.table.update(state, changes);
            plan_keys(&self.table.wanted, &mut self.programmed, &touched)
        };
        let written = ops.len();
        if let Err(e) = apply(&mut self.tc, &ops) {
            // Part of the plan may be in: the next sync is full and reads the maps back.
            return Err(match e {
                ApplyError::Full { map, capacity } => BackendError::Capacity {
                    what: format!("BPF map {map}"),
                    capacity,
                    hint: format!("raise it with --bpf-map-size {map}=ENTRIES"),
                },
                other => error("writing the BPF maps", other),
            });
        }
        Ok(SyncReport {
            full,
            written: Count::new(written, Unit::MapEntries),
            total: Count::new(self.programmed.services.len(), Unit::MapEntries),
            chains_written: 0,
            chains_deleted: 0,
            per_table: Vec::new(),
            messages: 0,
        })
    }

    fn lost_state(&mut self) -> Option<String> {
        if let Some(m) = objects::MAPS
            .iter()
            .find(|m| !self.config.pin_dir.join(m).exists())
        {
            return Some(format!("the pinned map {m} was removed"));
        }
        let held = dump::count(&self.tc, "kpx_services").ok()?;
        let expected = self.programmed.services.len();
        (held != expected)
            .then(|| format!("kpx_services holds {held} frontends, {expected} were written"))
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.stop.store(true, Ordering::Relaxed);
        cleanup(&self.config.pin_dir).map(|_| ())
    }

    /// The programs keep their own conntrack (`kpx_ct`): a flow whose backend id is gone is a
    /// new flow at its next packet, so the kernel's conntrack has nothing to clear for them.
    /// (A removed endpoint that still backs another Service keeps its id, and its UDP flows
    /// of this Service stick to it until they idle out: left for the backend's own cleanup.)
    fn clear_stale_flows(
        &mut self,
        _flows: &std::collections::BTreeSet<crate::model::ConntrackCleanup>,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn dump(&self) -> Result<Dump, BackendError> {
        dump::read(&self.tc).map_err(|e| error("reading the BPF maps", e))
    }
}

#[cfg(test)]
mod cleanup_tests {
    use super::*;

    #[test]
    fn cleanup_removes_kpx_pins_only_and_keeps_a_directory_that_is_not_empty() {
        // A plain directory stands in for the bpffs: cleanup only removes files.
        let pins = std::env::temp_dir().join(format!("kpx-cleanup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pins);
        std::fs::create_dir_all(pins.join("links")).expect("mkdir");
        for file in [
            "links/tc-ingress-3",
            "links/cgroup-kpx_connect4",
            "links/someone-elses-link",
            "kpx_services",
            "kpx_backends",
            "someone-elses-map",
        ] {
            std::fs::write(pins.join(file), "").expect("write");
        }
        let report = cleanup(&pins).expect("cleanup");
        assert_eq!(report.links, vec!["cgroup-kpx_connect4", "tc-ingress-3"]);
        assert_eq!(report.maps.len(), 2, "{report:?}");
        assert!(report
            .maps
            .iter()
            .all(|m| objects::MAPS.contains(&m.as_str())));
        assert!(!report.dir_removed);
        assert!(pins.join("someone-elses-map").exists());
        assert!(pins.join("links/someone-elses-link").exists());

        // Once only kpx's pins were there, the directory goes too; again, nothing is left.
        std::fs::remove_file(pins.join("someone-elses-map")).expect("rm");
        std::fs::remove_file(pins.join("links/someone-elses-link")).expect("rm");
        std::fs::write(pins.join("kpx_services"), "").expect("write");
        let report = cleanup(&pins).expect("cleanup");
        assert!(report.dir_removed && !pins.exists(), "{report:?}");
        let again = cleanup(&pins).expect("cleanup of nothing");
        assert!(again.is_empty() && again.skipped.is_some(), "{again:?}");
    }
}
