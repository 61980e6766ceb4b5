//! From what IPVS holds to what the plan wants, per virtual server: the messages to send
//! (pure). Only keys the caller passes are compared, so a partial sync touches the virtual
//! servers of the changed Service ports only, and a full sync passes every key it owns.
//!
//! Removed TCP real servers are not deleted but drained (weight 0; the housekeeping tick deletes
//! them once their connections are gone, `graceful.rs`); UDP and SCTP ones go at once, with
//! their conntrack entries (kube-proxy's graceful termination, k8s#71514: UDP never drains).
//!
//! `mh` builds its lookup table from the destinations in list order, and the kernel puts each
//! new destination first in the list: destinations are added in descending order, so the list
//! is ascending on every node, and a server gaining a destination is written again whole (its
//! connections live in IPVS's connection table, not in the server, and keep their endpoint).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::plan::{VirtualServer, VsKey};
use crate::model::Protocol;

/// A real server: address and port.
pub type Dest = (IpAddr, u16);

/// What IPVS holds of one virtual server (read back, or as kpx last wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub protocol: Protocol,
    pub scheduler: String,
    pub persistence: Option<u32>,
    /// Each real server's weight (0: draining).
    pub dests: BTreeMap<Dest, u32>,
}

impl Held {
    /// What `vs` looks like once written.
    pub fn of(vs: &VirtualServer) -> Self {
        Self {
            protocol: vs.protocol,
            scheduler: vs.scheduler.clone(),
            persistence: vs.persistence,
            dests: vs.dests.iter().map(|d| (*d, WEIGHT)).collect(),
        }
    }
}

/// Every real server kpx writes has this weight (0 marks a draining one).
pub const WEIGHT: u32 = 1;

/// One message to IPVS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    AddService(VsKey, Spec),
    EditService(VsKey, Spec),
    DelService(VsKey),
    AddDest(VsKey, Dest, u32),
    EditDest(VsKey, Dest, u32),
    DelDest(VsKey, Dest),
}

/// A virtual server's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub protocol: Protocol,
    pub scheduler: String,
    pub persistence: Option<u32>,
}

impl Spec {
    fn of(vs: &VirtualServer) -> Self {
        Self {
            protocol: vs.protocol,
            scheduler: vs.scheduler.clone(),
            persistence: vs.persistence,
        }
    }
}

/// The changes for one key, and the real servers that start draining.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub changes: Vec<Change>,
    pub draining: Vec<(VsKey, Dest)>,
}

fn create(key: VsKey, vs: &VirtualServer, out: &mut Diff) {
    out.changes.push(Change::AddService(key, Spec::of(vs)));
    for d in vs.dests.iter().rev() {
        out.changes.push(Change::AddDest(key, *d, WEIGHT));
    }
}

/// The changes that turn `have` into `want` for `key`.
pub fn diff(key: VsKey, want: Option<&VirtualServer>, have: Option<&Held>, out: &mut Diff) {
    match (want, have) {
        (None, None) => {}
        (Some(vs), None) => create(key, vs, out),
        (None, Some(_)) => out.changes.push(Change::DelService(key)),
        (Some(vs), Some(held)) => {
            let spec = Spec::of(vs);
            let same_spec = held.protocol == spec.protocol
                && held.scheduler == spec.scheduler
                && held.persistence == spec.persistence;
            let gains = vs.dests.iter().any(|d| !held.dests.contains_key(d));
            if spec.scheduler == "mh" && (gains || !same_spec) {
                out.changes.push(Change::DelService(key));
                create(key, vs, out);
                return;
            }
            if !same_spec {
                out.changes.push(Change::EditService(key, spec));
            }
            for d in vs.dests.iter().rev() {
                match held.dests.get(d) {
                    None => out.changes.push(Change::AddDest(key, *d, WEIGHT)),
                    Some(w) if *w != WEIGHT => out.changes.push(Change::EditDest(key, *d, WEIGHT)),
                    Some(_) => {}
                }
            }
            for (d, w) in &held.dests {
                if vs.dests.binary_search(d).is_ok() {
                    continue;
                }
                if held.protocol == Protocol::Tcp {
                    if *w != 0 {
                        out.changes.push(Change::EditDest(key, *d, 0));
                        out.draining.push((key, *d));
                    }
                } else {
                    // Their conntrack entries go through the model's UDP cleanups.
                    out.changes.push(Change::DelDest(key, *d));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(t: &str) -> IpAddr {
        crate::conformance::ip(t)
    }

    fn vs(protocol: Protocol, scheduler: &str, dests: &[&str]) -> VirtualServer {
        let mut dests: Vec<Dest> = dests.iter().map(|d| (ip(d), 80)).collect();
        dests.sort();
        VirtualServer {
            protocol,
            scheduler: scheduler.into(),
            persistence: None,
            dests,
        }
    }

    const KEY: VsKey = VsKey::Fwmark(1 << 16);

    #[test]
    fn a_new_server_adds_its_destinations_in_descending_order() {
        let want = vs(Protocol::Tcp, "rr", &["198.18.128.1", "198.18.128.2"]);
        let mut d = Diff::default();
        diff(KEY, Some(&want), None, &mut d);
        assert_eq!(
            d.changes[1..],
            [
                Change::AddDest(KEY, (ip("198.18.128.2"), 80), 1),
                Change::AddDest(KEY, (ip("198.18.128.1"), 80), 1)
            ]
        );
    }

    #[test]
    fn one_endpoint_replaced_is_two_messages_and_tcp_drains() {
        let have = Held::of(&vs(Protocol::Tcp, "rr", &["198.18.128.1", "198.18.128.2"]));
        let want = vs(Protocol::Tcp, "rr", &["198.18.128.1", "198.18.128.3"]);
        let mut d = Diff::default();
        diff(KEY, Some(&want), Some(&have), &mut d);
        assert_eq!(
            d.changes,
            [
                Change::AddDest(KEY, (ip("198.18.128.3"), 80), 1),
                Change::EditDest(KEY, (ip("198.18.128.2"), 80), 0)
            ]
        );
        assert_eq!(d.draining, [(KEY, (ip("198.18.128.2"), 80))]);
        // Back before it drained: its weight returns, nothing else.
        let mut held = Held::of(&want);
        held.dests.insert((ip("198.18.128.2"), 80), 0);
        let back = vs(
            Protocol::Tcp,
            "rr",
            &["198.18.128.1", "198.18.128.2", "198.18.128.3"],
        );
        let mut d = Diff::default();
        diff(KEY, Some(&back), Some(&held), &mut d);
        assert_eq!(
            d.changes,
            [Change::EditDest(KEY, (ip("198.18.128.2"), 80), 1)]
        );
    }

    #[test]
    fn udp_goes_at_once_and_mh_is_rewritten_in_order() {
        let have = Held::of(&vs(Protocol::Udp, "rr", &["198.18.128.1", "198.18.128.2"]));
        let want = vs(Protocol::Udp, "rr", &["198.18.128.1"]);
        let mut d = Diff::default();
        diff(KEY, Some(&want), Some(&have), &mut d);
        assert_eq!(d.changes, [Change::DelDest(KEY, (ip("198.18.128.2"), 80))]);

        let have = Held::of(&vs(Protocol::Tcp, "mh", &["198.18.128.1", "198.18.128.3"]));
        let want = vs(
            Protocol::Tcp,
            "mh",
            &["198.18.128.1", "198.18.128.2", "198.18.128.3"],
        );
        let mut d = Diff::default();
        diff(KEY, Some(&want), Some(&have), &mut d);
        assert_eq!(d.changes[0], Change::DelService(KEY));
        assert!(matches!(d.changes[1], Change::AddService(..)));
        assert_eq!(
            d.changes[2],
            Change::AddDest(KEY, (ip("198.18.128.3"), 80), 1)
        );
        assert_eq!(d.changes.len(), 5);
        // Nothing changed: nothing sent.
        let mut d = Diff::default();
        diff(KEY, Some(&want), Some(&Held::of(&want)), &mut d);
        assert_eq!(d, Diff::default());
    }
}
