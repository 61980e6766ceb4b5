//! The eBPF backend: Service frontends as BPF map entries, read by a tc program on every
//! interface of the node (per-packet load balancing) and by cgroup socket programs (socket-level
//! load balancing for the node's own clients). See `kpx-ebpf` for the programs and their maps.

pub mod backend;
pub mod dump;
pub mod wanted;

pub use backend::{cleanup, EbpfBackend, EbpfCleanup, EbpfConfig};
