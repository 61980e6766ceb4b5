//! `--proxy-mode ipvs`: kernel IPVS virtual servers per frontend, the Service addresses bound
//! to a dummy interface, ipsets written with one `ipset restore`, and a small iptables part
//! (masquerade, reject, hairpin) through the shared netfilter module. See the proxy README's
//! "The IPVS backend" for the layout and why.

pub mod dummy;
pub mod ipset;
pub mod layout;
pub mod netlink;
#[cfg(test)]
mod netlink_tests;
pub mod plan;
pub mod rules;
#[cfg(test)]
pub mod trace;
pub mod diff;
pub mod config;

pub use config::IpvsConfig;
