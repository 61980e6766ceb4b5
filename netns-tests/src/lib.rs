//! kpx-lab: a kpx cluster on one machine.
//!
//! [`lab`] builds the network namespaces, [`cluster`] runs kpx-control, kpx-kubelets and
//! kpx-proxies in them, [`cli`] is `kpx-lab up/status/exec/down`, [`demo`] the main job, [`bench`]
//! every backend side by side, [`traffic`] the clients the tests and benchmarks send requests with, and [`scratch`] a
//! throwaway network namespace.

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod demo;
pub mod lab;
pub mod scratch;
/// Network namespaces live in kpx-control, whose kubelet makes pods of them.
pub use kpx_control::netns;
pub mod supervise;
pub mod traffic;
