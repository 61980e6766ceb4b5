//! Attaching the programs, with their links pinned next to the maps: a pinned link keeps its
//! program attached when the proxy exits or is killed, so traffic keeps flowing while it is
//! down; a restarted proxy finds the pins and leaves them as they are. Removing a pin detaches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType,
};
use aya::Ebpf;

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

/// Attaches the tc program at the ingress of every interface that has none yet, and removes the
/// pins of interfaces that are gone. Returns the names newly attached.
pub fn attach_tc(ebpf: &mut Ebpf, links: &Path) -> Result<Vec<String>, AttachError> {
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
        let id = match program.attach(&name, TcAttachType::Ingress) {
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

/// Detaches everything kpx pinned under `links` (see [`detach_pinned`]) and removes the pins.
/// Returns the pins removed, by name; a missing directory is nothing to do.
pub fn detach_all(links: &Path) -> Result<Vec<String>, AttachError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
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
