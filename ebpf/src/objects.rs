//! The compiled BPF objects, embedded, and loading them with aya.

use std::path::Path;

use aya::{Ebpf, EbpfLoader};

/// The tc per-packet load balancer (`bpf/tc_lb.bpf.c`).
pub static TC_LB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tc_lb.bpf.o"));

/// The socket-level load balancer: cgroup connect/sendmsg/recvmsg/getpeername, 4 and 6
/// (`bpf/sock_lb.bpf.c`).
pub static SOCK_LB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sock_lb.bpf.o"));

/// Why the objects are empty, when clang was missing at build time.
const MISSING: &str = env!("KPX_BPF_MISSING");

/// The maps every object defines (`bpf/lb.h`); pinned by these names, so the objects share
/// one set.
pub const MAPS: &[&str] = &[
    "kpx_services",
    "kpx_slots",
    "kpx_backends",
    "kpx_rev_nat",
    "kpx_affinity",
    "kpx_ct",
    "kpx_config",
    "kpx_node_addrs",
    "kpx_clients",
    "kpx_version",
    "kpx_sock_rev",
    "kpx_src_range4",
    "kpx_src_range6",
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    NotBuilt(&'static str),
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Capacities of the maps, by name (`--bpf-map-size`-style configuration).
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    pub entries: Vec<(&'static str, u32)>,
}

/// Loads `object`; with `pin_dir`, every map is pinned there by name, and maps already pinned
/// there are adopted (their entries, and so the traffic using them, survive a restart).
pub fn load(object: &[u8], pin_dir: Option<&Path>, capacity: &Capacity) -> Result<Ebpf, LoadError> {
    if object.is_empty() {
        return Err(LoadError::NotBuilt(if MISSING.is_empty() {
            "the BPF object is empty"
        } else {
            MISSING
        }));
    }
    let mut loader = EbpfLoader::new();
    for (name, size) in &capacity.entries {
        loader.map_max_entries(name, *size);
    }
    let paths: Vec<(&str, std::path::PathBuf)> = match pin_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir {
                path: dir.display().to_string(),
                source,
            })?;
            MAPS.iter().map(|m| (*m, dir.join(m))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(object)?)
}
