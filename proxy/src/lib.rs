//! kpx-proxy: the kube-proxy, as `watch → model → plan → apply`.
//!
//! - [`model`]: Services and EndpointSlices in, a `ProxyState` snapshot and its changes out (pure).
//! - [`dual_stack`]: one backend per IP family behind the one `Backend` seam.
//! - [`iptables`]: the iptables backend: `render` (the plan, pure) and `apply`.

pub mod backend;
pub mod cidr;
pub mod cleanup;
pub mod config;
#[cfg(test)]
mod conformance;
pub mod conntrack;
pub mod dual_stack;
pub mod ebpf;
pub mod healthcheck;
pub mod iptables;
pub mod ipvs;
pub mod metrics;
pub mod model;
pub mod netfilter;
pub mod nftables;
pub mod runner;
pub mod serve;
pub mod watch;
