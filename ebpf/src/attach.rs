//! Attaching the programs, with their links pinned next to the maps: a pinned link keeps its
//! program attached when the proxy exits or is killed, so traffic keeps flowing while it is
//! down; a restarted proxy finds the pins and leaves them as they are. Removing a pin detaches.
//!
//! A kernel without tcx (before 6.6, e.g. Debian 12's 6.1) gets the tc program as a legacy
//! cls_bpf filter on the interface's clsact qdisc instead. Such a filter is no link and cannot
//! be pinned, but it holds its program by itself, so it outlives the proxy just as a pinned
//! link does; kpx finds its own again by where it puts them (ingress, priority
//! [`LEGACY_PRIORITY`], handle [`LEGACY_HANDLE`]) and by the program's name, which the kernel
//! keeps with the filter (`TCA_BPF_NAME`), and removes exactly those.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::tc::{self, NlOptions, TcAttachOptions, TcError, TcHandle};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType,
};
use aya::Ebpf;

/// The tc filter priority and handle of kpx's legacy attachment: fixed, so that a second
/// attach is refused (EEXIST) instead of stacking a duplicate, and so a restarted proxy or a
/// cleanup knows which filter is kpx's. (Priority 1 would run before anyone's filters; kpx's
/// classifier returns TC_ACT_OK for what it does not handle, so order does not matter to
/// others, and a distinctive number is less likely to meet someone else's choice.)
pub const LEGACY_PRIORITY: u16 = 0x4b50;
pub const LEGACY_HANDLE: u32 = 0x4b50;

/// The socket programs and the hook each one is for.
pub const SOCKET_PROGRAMS: &[&str] = &[
    "kpx_connect4",
    "kpx_connect6",
    "kpx_sendmsg4",
    "kpx_sendmsg6",
    "kpx_recvmsg4",
    "kpx_recvmsg6",
    "kpx_getpeername4",
    "kpx_getpeername6",
];

pub const TC_PROGRAM: &str = "kpx_tc_lb";

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("BPF program {0} is missing from the object")]
    Missing(&'static str),
    #[error("loading BPF program {program}: {source}")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to {target}: {detail}")]
    Attach {
        program: &'static str,
        target: String,
        detail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AttachError + '_ {
    move |source| AttachError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The interfaces of this network namespace the tc program belongs on: every one but the
/// loopback and bridges (a bridge's ports carry the same packets, seen once there).
pub fn interfaces() -> Vec<(String, u32)> {
    let Ok(list) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|i| Some((i.name().to_str().ok()?.to_string(), i.index())))
        .filter(|(name, _)| name != "lo" && !is_bridge(name))
        .collect()
}

/// Whether `name` is a Linux bridge, by its driver (ethtool), which works in any namespace
/// without sysfs.
fn is_bridge(name: &str) -> bool {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 164],
    }
    let mut info = DrvInfo {
        cmd: 0x0000_0003, // ETHTOOL_GDRVINFO
        driver: [0; 32],
        rest: [0; 164],
    };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a datagram socket only to issue the ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: SIOCETHTOOL reads `req` and writes the driver info into `info`, both alive and
    // large enough for ETHTOOL_GDRVINFO.
    let ok = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) } == 0;
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    ok && info.driver.starts_with(b"bridge\0")
}

/// The object's program `name` as its type (`SchedClassifier`, `CgroupSockAddr`, …).
fn typed<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, AttachError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(AttachError::Missing(name))?
        .try_into()
        .map_err(|source| AttachError::Load {
            program: name,
            source,
        })
}

fn tc_pin(links: &Path, index: u32) -> PathBuf {
    links.join(format!("tc-ingress-{index}"))
}

/// Attaches the tc program at the ingress of every interface that has none yet: with tcx links
/// where the kernel has them (removing the pins of interfaces that are gone), else with legacy
/// filters. Returns the names newly attached.
pub fn attach_tc(ebpf: &mut Ebpf, links: &Path) -> Result<Vec<String>, AttachError> {
    if crate::features::has_tcx() {
        attach_tcx(ebpf, links)
    } else {
        attach_legacy(ebpf)
    }
}

/// Attaches a cls_bpf filter (direct action) at the clsact ingress of every interface that
/// has no kpx filter yet. A filter goes away with its interface, so there is nothing to forget.
fn attach_legacy(ebpf: &mut Ebpf) -> Result<Vec<String>, AttachError> {
    let mut attached = Vec::new();
    for (name, index) in interfaces() {
        let failed = |detail: String| AttachError::Attach {
            program: TC_PROGRAM,
            target: name.clone(),
            detail: format!(
                "{detail} (legacy tc: clsact qdisc + cls_bpf, as the kernel lacks tcx)"
            ),
        };
        let gone = || nix::net::if_::if_nametoindex(name.as_str()).is_err();
        match legacy_filters(index) {
            Ok(found) if found.iter().any(LegacyFilter::is_kpx) => continue,
            Ok(_) => {}
            Err(_) if gone() => continue,
            Err(e) => return Err(failed(format!("listing tc filters: {e}"))),
        }
        match tc::qdisc_add_clsact(&name) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(_) if gone() => continue,
            Err(e) => return Err(failed(format!("adding the clsact qdisc: {e}"))),
        }
        let program: &mut SchedClassifier = typed(ebpf, TC_PROGRAM)?;
        let options = TcAttachOptions::Netlink(NlOptions {
            priority: LEGACY_PRIORITY,
            handle: TcHandle::from(LEGACY_HANDLE),
            classid: None,
        });
        let id = match program.attach_with_options(&name, TcAttachType::Ingress, options) {
            Ok(id) => id,
            // Attached meanwhile (the start and the interface watcher both attach): kpx's
            // fixed priority and handle make the second one fail instead of stacking.
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                continue
            }
            Err(_) if gone() => continue,
            Err(e) => return Err(failed(e.to_string())),
        };
        let link = program.take_link(id).map_err(|e| failed(e.to_string()))?;
        // Dropping the link (or the program holding it) would delete the filter; it is meant
        // to stay when the proxy exits, as a pinned link does. The link is only numbers (no
        // descriptor), so forgetting it leaks nothing.
        std::mem::forget(link);
        attached.push(name);
    }
    Ok(attached)
}

fn attach_tcx(ebpf: &mut Ebpf, links: &Path) -> Result<Vec<String>, AttachError> {
    std::fs::create_dir_all(links).map_err(io(links))?;
    let present = interfaces();
    let indexes: BTreeSet<u32> = present.iter().map(|(_, i)| *i).collect();
    for entry in std::fs::read_dir(links).map_err(io(links))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(index) = name
            .strip_prefix("tc-ingress-")
            .and_then(|i| i.parse().ok())
        {
            if !indexes.contains(&index) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let mut attached = Vec::new();
    for (name, index) in present {
        let pin = tc_pin(links, index);
        if pin.exists() {
            continue;
        }
        let program: &mut SchedClassifier = typed(ebpf, TC_PROGRAM)?;
        let failed = |detail: String| AttachError::Attach {
            program: TC_PROGRAM,
            target: name.clone(),
            detail,
        };
        let id = match program.attach_with_options(
            &name,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
        ) {
            Ok(id) => id,
            // The interface went away between listing and attaching.
            Err(_) if nix::net::if_::if_nametoindex(name.as_str()).is_err() => continue,
            Err(e) => return Err(failed(e.to_string())),
        };
        let link = program.take_link(id).map_err(|e| failed(e.to_string()))?;
        let link = FdLink::try_from(link).map_err(|e| failed(e.to_string()))?;
        link.pin(&pin).map_err(|e| failed(e.to_string()))?;
        attached.push(name);
    }
    Ok(attached)
}

/// Loads the tc program (once per object).
pub fn load_tc(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let program: &mut SchedClassifier = typed(ebpf, TC_PROGRAM)?;
    program.load().map_err(|source| AttachError::Load {
        program: TC_PROGRAM,
        source,
    })
}

/// Loads the socket programs and attaches each to `cgroup` unless a pinned link already does.
pub fn attach_cgroup(ebpf: &mut Ebpf, cgroup: &Path, links: &Path) -> Result<(), AttachError> {
    std::fs::create_dir_all(links).map_err(io(links))?;
    let dir = std::fs::File::open(cgroup).map_err(io(cgroup))?;
    for name in SOCKET_PROGRAMS {
        let program: &mut CgroupSockAddr = typed(ebpf, name)?;
        program.load().map_err(|source| AttachError::Load {
            program: name,
            source,
        })?;
        let pin = links.join(format!("cgroup-{name}"));
        if pin.exists() {
            continue;
        }
        let failed = |detail: String| AttachError::Attach {
            program: name,
            target: cgroup.display().to_string(),
            detail,
        };
        let id = program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| failed(e.to_string()))?;
        let link = program.take_link(id).map_err(|e| failed(e.to_string()))?;
        let link = FdLink::try_from(link).map_err(|e| failed(e.to_string()))?;
        link.pin(&pin).map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

/// Whether `name` is a link pin this module creates (`tc-ingress-N`, `cgroup-kpx_*`): cleanup
/// removes only those, whatever else someone put in the directory.
pub fn is_link_pin(name: &str) -> bool {
    name.strip_prefix("tc-ingress-")
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        || name
            .strip_prefix("cgroup-")
            .is_some_and(|p| SOCKET_PROGRAMS.contains(&p))
}

/// `BPF_OBJ_GET` and `BPF_LINK_DETACH` of `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches the link pinned at `pin` now, with `BPF_LINK_DETACH` (kernel 5.9+; tcx and cgroup
/// links support it). Removing the last pin alone detaches too, but later: the kernel frees an
/// unpinned link from a work queue after an RCU grace period, so a cleanup that returned would
/// still see the program attached for a moment, and a link some process still holds open would
/// stay attached until it exits. Best effort: when the kernel cannot (an older kernel, not a
/// link), removing the pin remains the way, as before.
fn detach_pinned(pin: &Path) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(pin.as_os_str().as_bytes()) else {
        return;
    };
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET reads `get` (its size is passed) and the NUL-terminated path it
    // points to; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return;
    }
    let Ok(fd) = i32::try_from(fd) else { return };
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let detach = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
    };
    // On failure (EOPNOTSUPP, EINVAL) removing the pin is left to detach the link.
    // SAFETY: BPF_LINK_DETACH only reads `detach`, alive for the call.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &detach as *const LinkDetach,
            std::mem::size_of::<LinkDetach>(),
        )
    };
}

/// Detaches everything kpx pinned under `links` (see [`detach_pinned`]) and removes the pins,
/// and removes kpx's legacy tc filters from this namespace's interfaces. Returns what was
/// removed, by name (`tc-legacy-N` for the filter on interface N); a missing directory is
/// nothing to do.
pub fn detach_all(links: &Path) -> Result<Vec<String>, AttachError> {
    let mut removed = detach_legacy()?;
    let entries = match std::fs::read_dir(links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            removed.sort();
            return Ok(removed);
        }
        Err(e) => return Err(io(links)(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !is_link_pin(&name) {
            continue;
        }
        detach_pinned(&entry.path());
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&entry.path())(e)),
        }
    }
    removed.sort();
    Ok(removed)
}

/// Removes kpx's legacy filters (see [`LegacyFilter::is_kpx`]) from every interface here.
pub fn detach_legacy() -> Result<Vec<String>, AttachError> {
    let mut removed = Vec::new();
    for (name, index) in interfaces() {
        // An interface without a clsact qdisc has no filters to list.
        let Ok(found) = legacy_filters(index) else {
            continue;
        };
        for filter in found.into_iter().filter(LegacyFilter::is_kpx) {
            let link = tc::SchedClassifierLink::attached(
                &name,
                TcAttachType::Ingress,
                filter.priority,
                TcHandle::from(filter.handle),
                None,
            );
            let result = match link {
                Ok(link) => aya::programs::Link::detach(link),
                Err(_) => continue,
            };
            match result {
                Ok(()) => removed.push(format!("tc-legacy-{index}")),
                // Gone meanwhile (with its interface, or by another cleanup).
                Err(_)
                    if !legacy_filters(index).is_ok_and(|f| f.iter().any(LegacyFilter::is_kpx)) => {
                }
                Err(e) => {
                    return Err(AttachError::Attach {
                        program: TC_PROGRAM,
                        target: name.clone(),
                        detail: format!("removing kpx's legacy tc filter: {e}"),
                    })
                }
            }
        }
    }
    Ok(removed)
}

/// kpx's legacy filters in this namespace, as `tc-legacy-<ifindex>` (for `dump` and checks,
/// beside [`pinned_links`]).
pub fn legacy_attachments() -> Vec<String> {
    let mut names: Vec<String> = interfaces()
        .into_iter()
        .filter(|(_, index)| {
            legacy_filters(*index).is_ok_and(|f| f.iter().any(LegacyFilter::is_kpx))
        })
        .map(|(_, index)| format!("tc-legacy-{index}"))
        .collect();
    names.sort();
    names
}

/// A tc filter at an interface's clsact ingress, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyFilter {
    pub priority: u16,
    pub handle: u32,
    /// `TCA_KIND`: `bpf` for cls_bpf.
    pub kind: String,
    /// `TCA_BPF_NAME`: the program's name, as the loader gave it.
    pub name: Option<String>,
}

impl LegacyFilter {
    /// kpx's own: a bpf filter at kpx's priority carrying kpx's tc program.
    pub fn is_kpx(&self) -> bool {
        self.kind == "bpf"
            && self.priority == LEGACY_PRIORITY
            && self.name.as_deref() == Some(TC_PROGRAM)
    }
}

// rtnetlink numbers (include/uapi/linux/rtnetlink.h, pkt_sched.h, pkt_cls.h, netlink.h).
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the clsact qdisc's ingress hook.
const CLSACT_INGRESS: u32 = 0xffff_fff2;

/// The filters at interface `index`'s clsact ingress (one `RTM_GETTFILTER` dump).
pub fn legacy_filters(index: u32) -> std::io::Result<Vec<LegacyFilter>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = filter_dump_request(index);
    // SAFETY: sends `request`'s bytes, alive for the call, to the kernel (no address: a
    // netlink socket sends to the kernel by default).
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut filters = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receives into `buf`, which is writable for its whole length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        match parse_filter_messages(&buf[..n as usize], &mut filters)? {
            true => return Ok(filters),
            false if n == 0 => return Ok(filters),
            false => {}
        }
    }
}

/// `nlmsghdr` + `tcmsg` asking for every filter at `index`'s clsact ingress.
fn filter_dump_request(index: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(36);
    m.extend_from_slice(&36u32.to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&RTM_GETTFILTER.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // family, padding
    m.extend_from_slice(&(index as i32).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // handle: any
    m.extend_from_slice(&CLSACT_INGRESS.to_ne_bytes()); // parent
    m.extend_from_slice(&0u32.to_ne_bytes()); // info: any priority and protocol
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes of `b` as (type, payload), 4-byte aligned as netlink writes them.
fn attributes(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u16_at(b, at), u16_at(b, at + 2)) {
        let len = usize::from(len);
        if len < 4 || at + len > b.len() {
            break;
        }
        // The nested flag (bit 15) and byte-order flag (bit 14) are not part of the type.
        out.push((kind & 0x3fff, &b[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).to_string()
}

/// Adds the filters in one receive's messages to `out`; true at the dump's end.
fn parse_filter_messages(buf: &[u8], out: &mut Vec<LegacyFilter>) -> std::io::Result<bool> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "short netlink message");
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32_at(buf, at).ok_or_else(bad)? as usize;
        let kind = u16_at(buf, at + 4).ok_or_else(bad)?;
        if len < 16 || at + len > buf.len() {
            return Err(bad());
        }
        let body = &buf[at + 16..at + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or_else(bad)? as i32;
                if code != 0 {
                    return Err(std::io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            RTM_NEWTFILTER if body.len() >= 20 => {
                let handle = u32_at(body, 8).ok_or_else(bad)?;
                let info = u32_at(body, 16).ok_or_else(bad)?;
                let mut filter = LegacyFilter {
                    priority: (info >> 16) as u16,
                    handle,
                    kind: String::new(),
                    name: None,
                };
                for (t, payload) in attributes(&body[20..]) {
                    match t {
                        TCA_KIND => filter.kind = c_string(payload),
                        TCA_OPTIONS => {
                            for (t, payload) in attributes(payload) {
                                if t == TCA_BPF_NAME {
                                    filter.name = Some(c_string(payload));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                // A priority's chain head (no handle) lists no program.
                if handle != 0 {
                    out.push(filter);
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Ok(false)
}

/// The pinned links, by file name (for `dump` and checks).
pub fn pinned_links(links: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(links)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod pin_tests {
    use super::*;

    #[test]
    fn only_the_pins_kpx_creates_are_link_pins() {
        assert!(is_link_pin("tc-ingress-7"));
        assert!(is_link_pin("cgroup-kpx_connect4"));
        assert!(!is_link_pin("tc-ingress-"));
        assert!(!is_link_pin("tc-ingress-7x"));
        assert!(!is_link_pin("cgroup-other_prog"));
        assert!(!is_link_pin("cilium_link"));
    }
}

#[cfg(test)]
mod legacy_tests {
    use super::*;

    /// One netlink attribute, padded.
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    /// An RTM_NEWTFILTER message as the kernel sends one for a cls_bpf filter.
    fn filter_message(priority: u16, handle: u32, name: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 0, 0, 0]);
        body.extend_from_slice(&7i32.to_ne_bytes());
        body.extend_from_slice(&handle.to_ne_bytes());
        body.extend_from_slice(&CLSACT_INGRESS.to_ne_bytes());
        // info: priority << 16 | protocol (ETH_P_ALL, big endian 0x0003)
        body.extend_from_slice(&((u32::from(priority) << 16) | 0x0300).to_ne_bytes());
        body.extend(attr(TCA_KIND, b"bpf\0"));
        if let Some(name) = name {
            let mut nested = attr(TCA_BPF_NAME, format!("{name}\0").as_bytes());
            nested.extend(attr(11, &42u32.to_ne_bytes())); // TCA_BPF_ID
            body.extend(attr(TCA_OPTIONS | 0x8000, &nested));
        }
        let mut m = Vec::new();
        m.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWTFILTER.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend(body);
        m
    }

    #[test]
    fn the_dump_request_asks_for_the_clsact_ingress_of_one_interface() {
        let r = filter_dump_request(7);
        assert_eq!(r.len(), 36);
        assert_eq!(u32_at(&r, 0), Some(36));
        assert_eq!(u16_at(&r, 4), Some(RTM_GETTFILTER));
        assert_eq!(u16_at(&r, 6), Some(0x301)); // NLM_F_REQUEST | NLM_F_DUMP
        assert_eq!(u32_at(&r, 20), Some(7));
        assert_eq!(u32_at(&r, 28), Some(0xffff_fff2));
    }

    #[test]
    fn kpx_filters_are_told_apart_by_priority_and_program_name() {
        let mut buf = filter_message(LEGACY_PRIORITY, 0, None); // the priority's chain head
        buf.extend(filter_message(
            LEGACY_PRIORITY,
            LEGACY_HANDLE,
            Some(TC_PROGRAM),
        ));
        buf.extend(filter_message(LEGACY_PRIORITY, 1, Some("cil_from_netdev")));
        buf.extend(filter_message(1, 1, Some(TC_PROGRAM)));
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        buf.extend(done);
        let mut found = Vec::new();
        assert!(parse_filter_messages(&buf, &mut found).expect("well formed"));
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(
            found[0],
            LegacyFilter {
                priority: LEGACY_PRIORITY,
                handle: LEGACY_HANDLE,
                kind: "bpf".into(),
                name: Some(TC_PROGRAM.into()),
            }
        );
        let kpx: Vec<bool> = found.iter().map(LegacyFilter::is_kpx).collect();
        // Someone else's program at kpx's priority, and kpx's name at another priority, are
        // not kpx's attachment.
        assert_eq!(kpx, [true, false, false]);
    }

    #[test]
    fn a_netlink_error_ends_the_dump_with_its_errno() {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        let err = parse_filter_messages(&m, &mut Vec::new()).expect_err("an error message");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
