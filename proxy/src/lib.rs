//! kpx-proxy: the kube-proxy.
//!
//! It will be built as `watch → model → plan → apply` (see `ARCHITECTURE.md`); the
//! proxy/iptables issue fills this crate. Today it only links the API client it will watch with.

pub use kpx_control::client;
