//! kpx-proxy: the kube-proxy, as `watch → model → plan → apply`.
//!
//! - [`model`]: Services and EndpointSlices in, a `ProxyState` snapshot and its changes out (pure).
//! - [`iptables`]: the iptables backend: `render` (the plan, pure) and `apply`.

pub mod backend;
pub mod conntrack;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod serve;
pub mod watch;
