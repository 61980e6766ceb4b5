//! kpx-ebpf: BPF programs in C (`bpf/*.bpf.c`), compiled by `build.rs` with clang and loaded
//! with aya, plus `#[repr(C)]` mirrors of their maps. Filled by the eBPF backend issue; empty
//! until then so that the workspace layout matches `ARCHITECTURE.md`.
