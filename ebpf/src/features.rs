//! What the kernel must offer, checked once at start so a missing feature is one clear sentence
//! naming it, never a verifier dump halfway through attaching.

use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;

/// `statfs` magic numbers of the file systems the backend needs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The file system type of `path`, or why it cannot be read.
pub fn fs_type(path: &Path) -> Result<i64, String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
    // SAFETY: statfs writes only into `out`, which is a valid, writable statfs; `c` is a
    // NUL-terminated string that outlives the call.
    let mut out: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut out) } != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(out.f_type as i64)
}

/// Every kernel feature the programs use, and the file systems they need; the first missing
/// one is the error.
pub fn check(pin_root: &Path, cgroup: Option<&Path>) -> Result<(), String> {
    check_kernel()?;
    check_paths(pin_root, cgroup)
}

/// Whether tc programs attach as tcx links (Linux 6.6 or later); without, they attach as
/// legacy cls_bpf filters on a clsact qdisc (see `attach`). By version, as aya decides it.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|k| k >= KernelVersion::new(6, 6, 0))
}

/// The kernel's side: program and map types, helpers. (A kernel without tcx is no reason to
/// refuse: the tc program then attaches through clsact + cls_bpf, whose absence the attach
/// itself names.)
pub fn check_kernel() -> Result<(), String> {
    KernelVersion::current().map_err(|e| format!("reading the kernel version: {e}"))?;
    let program = |t: ProgramType, name: &str| match is_program_supported(t) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the kernel does not support BPF programs of type {name}"
        )),
        Err(e) => Err(format!(
            "probing BPF program type {name}: {e} (is this run as root?)"
        )),
    };
    program(ProgramType::SchedClassifier, "sched_cls (tc)")?;
    program(ProgramType::CgroupSockAddr, "cgroup_sock_addr")?;
    match is_map_supported(MapType::LruHash) {
        Ok(true) => {}
        Ok(false) => return Err("the kernel does not support BPF LRU hash maps".into()),
        Err(e) => return Err(format!("probing BPF LRU hash maps: {e}")),
    }
    // loadBalancerSourceRanges (kpx_src_range4/6).
    match is_map_supported(MapType::LpmTrie) {
        Ok(true) => {}
        Ok(false) => return Err("the kernel does not support BPF LPM trie maps".into()),
        Err(e) => return Err(format!("probing BPF LPM trie maps: {e}")),
    }
    let helpers = [
        (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skb_adjust_room,
            "bpf_skb_adjust_room (tc)",
        ),
        (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_skb_change_tail,
            "bpf_skb_change_tail (tc)",
        ),
        (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_csum_diff,
            "bpf_csum_diff (tc)",
        ),
        (
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_redirect,
            "bpf_redirect (tc)",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_set_retval,
            "bpf_set_retval (cgroup sock_addr)",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie (cgroup sock_addr)",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie (cgroup sock_addr)",
        ),
    ];
    for (program_type, helper, name) in helpers {
        match is_helper_supported(program_type, helper) {
            Ok(true) => {}
            Ok(false) => return Err(format!("the kernel lacks the BPF helper {name}")),
            Err(e) => return Err(format!("probing the BPF helper {name}: {e}")),
        }
    }
    Ok(())
}

/// The pin directory is on a bpffs, the cgroup on cgroup v2.
pub fn check_paths(pin_root: &Path, cgroup: Option<&Path>) -> Result<(), String> {
    // The pin directory may not exist yet: its nearest existing ancestor must be on bpffs.
    let pin_root = pin_root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(pin_root);
    if fs_type(pin_root)? != BPF_FS_MAGIC {
        return Err(format!(
            "{} is not on a BPF file system (bpffs); mount one with `mount -t bpf bpf {}`",
            pin_root.display(),
            pin_root.display()
        ));
    }
    if let Some(cgroup) = cgroup {
        if fs_type(cgroup)? != CGROUP2_SUPER_MAGIC {
            return Err(format!(
                "{} is not a cgroup v2 directory (socket load balancing attaches to cgroup v2)",
                cgroup.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_directory_off_bpffs_is_named_with_the_fix() {
        let dir = std::env::temp_dir().join("kpx-not-bpffs/instance");
        let err = check_paths(&dir, None).expect_err("a temp directory is not a bpffs");
        assert!(err.contains("is not on a BPF file system (bpffs)"), "{err}");
        assert!(err.contains("mount -t bpf bpf"), "{err}");
    }
}
