//! kpx-ebpf: BPF programs in C (`bpf/*.bpf.c`, map layouts in `bpf/kpx_maps.h`), compiled by
//! `build.rs` with clang and loaded with aya, and the `#[repr(C)]` mirrors of their maps.
//!
//! - [`layout`]: the map keys and values, checked against the C header by a test.
//! - [`objects`]: the embedded objects and the loader (capacities, pinning, adoption).
//! - [`adopt`]: reads back what pinned maps hold, for a restarted proxy.
//! - [`apply`]: performs a plan against the loaded maps; a full map is an error naming it.
//! - [`plan`]: the ordered map writes from what is programmed to what is wanted (pure).

pub mod adopt;
pub mod apply;
pub mod attach;
pub mod features;
pub mod layout;
pub mod objects;
pub mod plan;

#[cfg(test)]
mod tc_tests;
