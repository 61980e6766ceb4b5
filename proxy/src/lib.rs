//! kpx-proxy: the kube-proxy, as `watch → model → plan → apply`.
//!
//! - [`model`]: Services and EndpointSlices in, a `ProxyState` snapshot and its changes out (pure).

pub mod model;
