//! The iptables tools now live in the shared [`crate::netfilter`] module (the IPVS backend's
//! iptables part uses them too); re-exported here so existing paths keep working.

pub use crate::netfilter::exec::{output, Flavour, Tool};
