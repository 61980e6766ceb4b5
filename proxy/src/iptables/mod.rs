//! The iptables backend: kube-proxy's proven layout with kpx's own chains (see `README.md`).

pub mod chains;
pub mod render;
