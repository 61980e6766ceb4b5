//! `--proxy-mode ipvs`: kernel IPVS virtual servers per frontend, the Service addresses bound
//! to a dummy interface, ipsets written with one `ipset restore`, and a small iptables part
//! (masquerade, reject, hairpin) through the shared netfilter module. See the proxy README's
//! "The IPVS backend" for the layout and why.

pub mod ipset;
pub mod layout;
pub mod plan;
pub mod rules;
#[cfg(test)]
pub mod trace;
pub mod diff;
pub mod config;

pub use config::IpvsConfig;

// PLACEHOLDER — replaced by the lead at merge
/// Starts one backend per family (IPv6 when `v6` is Some), probing IPVS first.
pub fn start(
    v4: IpvsConfig,
    v6: Option<IpvsConfig>,
) -> Result<Box<dyn crate::backend::Backend>, crate::backend::BackendError> {
    let _ = (v4, v6);
    todo!("lead")
}

// PLACEHOLDER — replaced by the lead at merge
/// Removes everything the IPVS mode left in this namespace (virtual servers kpx owns,
/// kpx-ipvs0, the KPXV- chains, the KPXV-/KPXV6- ipsets), in that order; says what it removed.
pub fn cleanup_all() -> Result<Vec<String>, crate::backend::BackendError> {
    todo!("lead")
}

// PLACEHOLDER — replaced by the lead at merge
/// Whether anything of the IPVS mode is present (for "starting in another mode removes the others'").
pub fn leftovers_present() -> bool {
    todo!("lead")
}
