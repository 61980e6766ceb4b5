//! `--proxy-mode ipvs`: kernel IPVS virtual servers per frontend, the Service addresses bound
//! to a dummy interface, ipsets (swapped in whole by one `ipset restore` per full sync, members
//! edited over netlink by a partial one), and a small iptables part
//! (masquerade, reject, hairpin) through the shared netfilter module. See the proxy README's
//! "The IPVS backend" for the layout and why.
//!
//! - `plan.rs` (pure): per Service port, its virtual servers, addresses, set members, rules;
//! - `diff.rs` (pure): from what IPVS holds to the plan, per virtual server;
//! - `rules.rs`, `ipset.rs`: the iptables part and the sets as restore input;
//! - `ipset_netlink.rs`: set members added and deleted over NETLINK_NETFILTER, set names;
//! - `backend.rs`, `kernel.rs`: apply (the only code that touches the kernel), with
//!   `netlink.rs` (IPVS over generic netlink) and `dummy.rs` (kpx-ipvs0 over rtnetlink).

pub mod backend;
pub mod config;
pub mod diff;
pub mod dummy;
pub mod ipset;
pub mod ipset_netlink;
pub mod kernel;
pub mod layout;
pub mod netlink;
#[cfg(test)]
mod netlink_tests;
pub mod plan;
pub mod rules;
#[cfg(test)]
pub mod trace;

use std::collections::BTreeSet;
use std::net::IpAddr;

pub use backend::IpvsBackend;
pub use config::IpvsConfig;

use crate::backend::{Backend, BackendError};
use crate::dual_stack::DualStack;
use crate::netfilter::Tool;

/// Starts one backend per family (IPv6 when `v6` is Some), probing IPVS first. IPVS's globals
/// (timeouts, sysctls) are set once, by the first.
pub fn start(v4: IpvsConfig, v6: Option<IpvsConfig>) -> Result<Box<dyn Backend>, BackendError> {
    ipset::names()?;
    let primary = IpvsBackend::new(v4, true)?;
    let secondary = match v6 {
        None => None,
        Some(cfg) => match IpvsBackend::new(cfg, false) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "IPv6 Services are not programmed (IPv4 only)");
                None
            }
        },
    };
    Ok(Box::new(DualStack::new(primary, secondary)))
}

/// Removes everything the IPVS mode left in this namespace, in order: the virtual servers
/// kpx owns (on kpx-ipvs0's addresses, with kpx's firewall marks, or the NodePorts its
/// `FRONTENDS` set names), kpx-ipvs0, the `KPXV-`
/// chains, then the `KPXV-`/`KPXV6-` ipsets (a set is destroyed only once no rule uses it).
/// Says what it removed.
pub fn cleanup_all() -> Result<Vec<String>, BackendError> {
    let mut removed = Vec::new();
    let mut link =
        dummy::DummyLink::open().map_err(|e| BackendError::kernel("opening rtnetlink", e))?;
    let bound: BTreeSet<IpAddr> = match link.link() {
        Ok(Some(state)) => link
            .addresses(state.index)
            .map_err(|e| BackendError::kernel("listing kpx-ipvs0's addresses", e))?
            .into_iter()
            .collect(),
        _ => BTreeSet::new(),
    };
    // NodePorts are on node addresses, not kpx-ipvs0's: the FRONTENDS set names them.
    let mut node_ports: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    for ipv6 in [false, true] {
        for line in ipset::members(&layout::SetKind::Frontends.name(ipv6)).unwrap_or_default() {
            if let Some((portal, _, true)) = backend::parse_frontend(&line) {
                node_ports.insert((portal.ip, portal.port));
            }
        }
    }
    if let Ok(mut ipvs) = netlink::Ipvs::open() {
        let services = ipvs
            .services()
            .map_err(|e| BackendError::kernel("listing IPVS services", e))?;
        let ops: Vec<netlink::Op> = services
            .into_iter()
            .filter(|s| match &s.key {
                netlink::ServiceKey::Fwmark { mark, .. } => layout::is_kpx_fwmark(*mark),
                netlink::ServiceKey::Addr { addr, port, .. } => {
                    bound.contains(addr) || node_ports.contains(&(*addr, *port))
                }
            })
            .map(|s| netlink::Op::DelService(s.key))
            .collect();
        if !ops.is_empty() {
            let results = ipvs
                .apply(&ops)
                .map_err(|e| BackendError::kernel("deleting IPVS services", e))?;
            let failed = results.iter().filter(|r| r.is_err()).count();
            if failed > 0 {
                return Err(BackendError::kernel(
                    "deleting IPVS services",
                    format!("{failed} of {} failed", ops.len()),
                ));
            }
            removed.push(format!("{} IPVS virtual servers", ops.len()));
        }
    }
    if link
        .delete()
        .map_err(|e| BackendError::kernel("deleting kpx-ipvs0", e))?
    {
        removed.push(layout::DUMMY.to_string());
    }
    for tool in Tool::EVERY {
        let r = crate::netfilter::cleanup::cleanup(&tool, layout::PREFIX)?;
        if r.chains() > 0 {
            removed.push(format!("{} {} chains", r.chains(), r.tool));
        }
    }
    if let Ok(names) = ipset::names() {
        let mut text = String::new();
        for ipv6 in [false, true] {
            text.push_str(&ipset::destroy_text(ipv6, &names));
        }
        if !text.is_empty() {
            ipset::restore(&text)?;
            removed.push("the KPXV ipsets".to_string());
        }
    }
    Ok(removed)
}

/// Whether anything of the IPVS mode is here (cheap: the dummy interface and set names).
pub fn leftovers_present() -> bool {
    dummy::DummyLink::open().is_ok_and(|mut l| matches!(l.link(), Ok(Some(_))))
        || ipset::names().is_ok_and(|names| {
            names.iter().any(|n| {
                n.starts_with(layout::set_prefix(false)) || n.starts_with(layout::set_prefix(true))
            })
        })
}
