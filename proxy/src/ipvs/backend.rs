//! Apply: the only IPVS-mode code that touches the kernel. One instance per IP family; both
//! share the namespace's IPVS table, dummy interface and ipset namespace, and each lists and
//! deletes only its own family's virtual servers.
//!
//! A full sync reads back what the kernel holds (the virtual servers kpx owns and their real
//! servers, the dummy's addresses, kpx's chains), swaps every set in whole, writes the iptables
//! part, and sends IPVS the difference. A partial sync recomputes the plan of the changed
//! Service ports only and sends the difference for their virtual servers, set members and
//! addresses: a constant number of messages for one endpoint changed, whatever the number of
//! Services. IPVS is not transactional: after any failure the next sync is full and converges
//! from the dump.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::config::IpvsConfig;
use super::diff::{self, Dest, Diff, Held};
use super::ipset_netlink::{self, Ipset};
use super::kernel::{self, Kernel};
use super::layout::{self, SetKind};
use super::plan::{self, member_key, MarkAllocator, Plan, PortPlan, Portal, VsKey};
use super::{ipset, rules};
use crate::backend::{
    Backend, BackendError, Count, Dump, DumpedService, SyncInput, SyncReport, Unit,
};
use crate::model::{ProxyState, ServicePortName};
use crate::netfilter::{canary, Jump};

/// How long a removed TCP real server may drain before it is deleted anyway.
pub const DRAIN_BOUND: Duration = Duration::from_secs(15 * 60);

/// kube's default NodePort range: a virtual server on a node address with such a port is taken
/// for kpx's (a NodePort left by an earlier run); others on node addresses are someone else's.
const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

pub struct IpvsBackend {
    cfg: IpvsConfig,
    kernel: Kernel,
    /// The partial sync's member edits and the lost-state check's set names, over netlink
    /// (full syncs swap whole sets with `ipset restore`).
    ipset: Ipset,
    marks: MarkAllocator,
    /// The plan as applied, per Service port.
    ports: BTreeMap<ServicePortName, PortPlan>,
    /// Which Service ports plan each virtual server (the first one's wins).
    owners: BTreeMap<VsKey, BTreeSet<ServicePortName>>,
    /// What IPVS holds of kpx's virtual servers, as last written or read.
    held: BTreeMap<VsKey, Held>,
    /// Set members and bound addresses, with the number of Service ports needing each.
    members: BTreeMap<(SetKind, String), usize>,
    addresses: BTreeMap<IpAddr, usize>,
    /// The iptables part last written, and its per-frontend chains.
    rules_text: Option<String>,
    chains: BTreeSet<(String, String)>,
    node_ips: Vec<IpAddr>,
    /// Real servers at weight 0, since when.
    draining: BTreeMap<(VsKey, Dest), Instant>,
    /// Set after a failed sync: the next one is full.
    dirty: bool,
}

fn bump<K: Ord + Clone>(map: &mut BTreeMap<K, usize>, key: &K, up: bool) -> bool {
    if up {
        let n = map.entry(key.clone()).or_insert(0);
        *n += 1;
        *n == 1
    } else {
        match map.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                map.remove(key);
                true
            }
            None => false,
        }
    }
}

impl IpvsBackend {
    /// Opens IPVS and the dummy interface, and sets the sysctls kube-proxy's IPVS mode sets, in
    /// this (the node's) namespace.
    pub fn new(cfg: IpvsConfig, set_globals: bool) -> Result<Self, BackendError> {
        let mut kernel = Kernel::open(cfg.plan.ipv6)?;
        if set_globals {
            kernel::sysctls(cfg.strict_arp)?;
            kernel.set_timeouts(cfg.tcp_timeout, cfg.tcpfin_timeout, cfg.udp_timeout)?;
        }
        let ipset = Ipset::open()?;
        Ok(Self {
            cfg,
            kernel,
            ipset,
            marks: MarkAllocator::default(),
            ports: BTreeMap::new(),
            owners: BTreeMap::new(),
            held: BTreeMap::new(),
            members: BTreeMap::new(),
            addresses: BTreeMap::new(),
            rules_text: None,
            chains: BTreeSet::new(),
            node_ips: Vec::new(),
            draining: BTreeMap::new(),
            dirty: true,
        })
    }

    /// (netlink messages sent, `sendmsg` calls made) since `new` to IPVS and to ipset
    /// together, dumps and name listings included: the benchmark's count of what one sync
    /// sends. (Full syncs' `ipset restore` and the rtnetlink address messages are not in it.)
    pub fn ipvs_stats(&self) -> (u64, u64) {
        let (ipvs, ipvs_calls) = self.kernel.ipvs_stats();
        let (ipset, ipset_calls) = self.ipset.stats();
        (ipvs + ipset, ipvs_calls + ipset_calls)
    }

    /// The ipset part of [`ipvs_stats`](Self::ipvs_stats) alone.
    pub fn ipset_stats(&self) -> (u64, u64) {
        self.ipset.stats()
    }

    fn excluded(&self, ip: &IpAddr) -> bool {
        self.cfg.exclude_cidrs.iter().any(|c| c.contains(ip))
    }

    /// Whether a virtual server IPVS holds is kpx's to change or delete.
    fn owns(&self, key: &VsKey, bound: &BTreeSet<IpAddr>) -> bool {
        match key {
            VsKey::Fwmark(mark) => layout::is_kpx_fwmark(*mark),
            VsKey::Addr { ip, port, .. } => {
                !self.excluded(ip)
                    && (bound.contains(ip)
                        || self.held.contains_key(key)
                        || (self.node_ips.contains(ip) && NODE_PORT_RANGE.contains(port)))
            }
        }
    }

    fn missing_jumps(&self) -> Vec<Jump> {
        layout::JUMPS
            .iter()
            .filter(|j| {
                self.cfg
                    .iptables
                    .run(&["-t", j.table, "-S", j.from])
                    .map_or(true, |saved| !j.present_in(&saved))
            })
            .copied()
            .collect()
    }

    /// Writes the iptables part when its text changed (or always, on a full sync).
    fn write_rules(&mut self, force: bool) -> Result<usize, BackendError> {
        let rules: Vec<&plan::Rule> = self.ports.values().flat_map(|p| p.rules.iter()).collect();
        let own = rules::own_chains(&rules);
        let mut known = self.chains.clone();
        if force {
            // A full sync also takes the per-frontend chains an earlier process left.
            if let Ok(saved) = self.cfg.iptables.save_all() {
                for t in crate::netfilter::cleanup::leftovers(&saved, layout::PREFIX) {
                    for chain in t.chains {
                        let fixed = layout::MANGLE_CHAINS
                            .iter()
                            .chain(layout::NAT_CHAINS)
                            .chain(layout::FILTER_CHAINS)
                            .any(|c| *c == chain);
                        if !fixed {
                            known.insert((t.table.clone(), chain));
                        }
                    }
                }
            }
        }
        let stale: Vec<(String, String)> = known.difference(&own).cloned().collect();
        let missing = if force {
            self.missing_jumps()
        } else {
            Vec::new()
        };
        let text = rules::text(&self.cfg.plan, &rules, &missing, &stale);
        if !force && self.rules_text.as_deref() == Some(text.as_str()) {
            return Ok(0);
        }
        self.cfg.iptables.restore(&text)?;
        // Jumps are put in place once; the text kept is the one without them.
        let kept = if missing.is_empty() {
            text
        } else {
            rules::text(&self.cfg.plan, &rules, &[], &[])
        };
        self.rules_text = Some(kept);
        self.chains = own;
        Ok(rules.len())
    }

    /// Sends `d`'s changes; records what IPVS now holds and what drains. Every change is
    /// tried; the first failure is returned after.
    fn send(&mut self, d: Diff) -> Result<usize, BackendError> {
        let n = d.changes.len();
        let result = self.kernel.apply(&d.changes);
        let failed = match &result {
            Ok(results) => results
                .iter()
                .zip(&d.changes)
                .find_map(|(r, c)| r.as_ref().err().map(|e| format!("{c:?}: {e}"))),
            Err(e) => Some(e.to_string()),
        };
        let now = Instant::now();
        for (key, dest) in d.draining {
            self.draining.entry((key, dest)).or_insert(now);
        }
        match failed {
            None => Ok(n),
            Some(why) => Err(BackendError::kernel("ipvs", why)),
        }
    }

    /// `ipset_messages`: the ipset netlink messages of the sync (a partial one's members).
    fn report(&self, full: bool, written: usize, ipset_messages: usize) -> SyncReport {
        let total = self.held.len();
        SyncReport {
            full,
            written: Count::new(written, Unit::VirtualServers),
            total: Count::new(total, Unit::VirtualServers),
            chains_written: 0,
            chains_deleted: 0,
            // Keyed by family, kube-proxy's ip_family label
            // (`kpx_proxy_ipvs_virtual_servers{ip_family}`).
            per_table: vec![(
                if self.cfg.plan.ipv6 { "IPv6" } else { "IPv4" },
                Count::new(total, Unit::VirtualServers),
            )],
            // One IPVS netlink message per change sent, one ipset message per member.
            messages: written + ipset_messages,
        }
    }

    fn full_sync(&mut self, state: &ProxyState) -> Result<SyncReport, BackendError> {
        // The marks of frontends still marked are kept; the others are freed below.
        let before: BTreeSet<Portal> = self.ports.values().flat_map(|p| p.marked.clone()).collect();
        let plan = Plan::of(&self.cfg.plan, state, &self.node_ips, &mut self.marks);
        let marked: BTreeSet<Portal> = plan.ports.values().flat_map(|p| p.marked.clone()).collect();
        for p in before.difference(&marked) {
            self.marks.release(p);
        }

        let ifindex = self.kernel.ensure_dummy()?;
        let bound: BTreeSet<IpAddr> = self.kernel.dummy_addresses(ifindex)?.into_iter().collect();
        let dumped = self.kernel.services()?;

        // Sets first: the rules refer to them.
        ipset::restore(&ipset::full_text(self.cfg.plan.ipv6, &plan.members()))?;
        self.ports = plan.ports;
        self.owners.clear();
        self.members.clear();
        self.addresses.clear();
        for (name, p) in &self.ports {
            for key in p.services.keys() {
                self.owners.entry(*key).or_default().insert(name.clone());
            }
            for (kind, m) in &p.members {
                bump(&mut self.members, &(*kind, member_key(m).to_string()), true);
            }
            for ip in &p.addresses {
                bump(&mut self.addresses, ip, true);
            }
        }
        self.write_rules(true)?;

        for ip in self.addresses.keys() {
            if !bound.contains(ip) {
                self.kernel.add_address(ifindex, *ip)?;
            }
        }

        let wanted = self.wanted_all();
        let mut d = Diff::default();
        let mut have: BTreeMap<VsKey, Held> = BTreeMap::new();
        for (key, mut held) in dumped {
            if let Some(vs) = wanted.get(&key) {
                // A firewall-mark server does not say its protocol; the plan does.
                held.protocol = vs.protocol;
            }
            if self.owns(&key, &bound) || wanted.contains_key(&key) {
                have.insert(key, held);
            }
        }
        // Real servers left draining (by an earlier process, or forgotten after an error)
        // drain again from now, so housekeeping deletes them.
        let left_draining: Vec<(VsKey, Dest)> = have
            .iter()
            .flat_map(|(key, held)| {
                let keep = wanted.get(key);
                held.dests
                    .iter()
                    .filter(move |(dest, w)| {
                        **w == 0 && keep.is_some_and(|vs| vs.dests.binary_search(dest).is_err())
                    })
                    .map(move |(dest, _)| (*key, *dest))
            })
            .collect();
        let keys: BTreeSet<VsKey> = have.keys().chain(wanted.keys()).copied().collect();
        for key in &keys {
            diff::diff(*key, wanted.get(key).copied(), have.get(key), &mut d);
        }
        self.held = self.held_after(&wanted, &have, &d);
        self.draining
            .retain(|(key, dest), _| have.get(key).is_some_and(|h| h.dests.get(dest) == Some(&0)));
        let now = Instant::now();
        for k in left_draining {
            self.draining.entry(k).or_insert(now);
        }
        let written = self.send(d)?;

        // Addresses last: a Service address goes once nothing of kpx's uses it.
        for ip in bound.difference(&self.addresses.keys().copied().collect()) {
            if ip.is_ipv6() == self.cfg.plan.ipv6 {
                self.kernel.del_address(ifindex, *ip)?;
            }
        }
        Ok(self.report(true, written, 0))
    }

    /// Every virtual server the applied plan wants (the first owner's, per key).
    fn wanted_all(&self) -> BTreeMap<VsKey, &plan::VirtualServer> {
        self.wanted_of(self.owners.keys())
    }

    /// The wanted virtual servers of `keys` only (a partial sync's: O(changed), not O(all)).
    fn wanted_of<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k VsKey>,
    ) -> BTreeMap<VsKey, &plan::VirtualServer> {
        keys.into_iter()
            .filter_map(|key| {
                let first = self.owners.get(key)?.iter().next()?;
                Some((*key, self.ports.get(first)?.services.get(key)?))
            })
            .collect()
    }

    /// What IPVS holds once `d` is applied: the wanted servers, with real servers still
    /// draining kept at weight 0.
    fn held_after(
        &self,
        wanted: &BTreeMap<VsKey, &plan::VirtualServer>,
        have: &BTreeMap<VsKey, Held>,
        d: &Diff,
    ) -> BTreeMap<VsKey, Held> {
        let recreated: BTreeSet<VsKey> = d
            .changes
            .iter()
            .filter_map(|c| match c {
                diff::Change::AddService(k, _) => Some(*k),
                _ => None,
            })
            .collect();
        wanted
            .iter()
            .map(|(key, vs)| {
                let mut held = Held::of(vs);
                if !recreated.contains(key) {
                    if let Some(old) = have.get(key) {
                        // Removed TCP real servers stay, drained, until housekeeping deletes them.
                        if held.protocol == crate::model::Protocol::Tcp {
                            for dest in old.dests.keys() {
                                held.dests.entry(*dest).or_insert(0);
                            }
                        }
                    }
                }
                (*key, held)
            })
            .collect()
    }

    fn partial_sync(
        &mut self,
        state: &ProxyState,
        changes: &crate::model::Changes,
    ) -> Result<SyncReport, BackendError> {
        let names: BTreeSet<&ServicePortName> = changes
            .changed
            .iter()
            .chain(changes.removed.keys())
            .collect();
        let mut keys: BTreeSet<VsKey> = BTreeSet::new();
        let mut add_members = BTreeSet::new();
        let mut del_members = BTreeSet::new();
        let mut add_addresses = BTreeSet::new();
        let mut del_addresses = BTreeSet::new();
        let mut rules_changed = false;
        for name in names {
            let new = state.entries.get(name).map(|entry| {
                plan::port_plan(&self.cfg.plan, entry, &self.node_ips, &mut self.marks)
            });
            let old = self.ports.remove(name).unwrap_or_default();
            let new_plan = new.clone().unwrap_or_default();
            for p in old.marked.iter().filter(|p| !new_plan.marked.contains(p)) {
                // Two Services may share an external IP and port: the mark stays while one
                // of them is marked there.
                if !self.ports.values().any(|other| other.marked.contains(p)) {
                    self.marks.release(p);
                }
            }
            rules_changed |= old.rules != new_plan.rules;
            for key in old.services.keys() {
                keys.insert(*key);
                if let Some(o) = self.owners.get_mut(key) {
                    o.remove(name);
                    if o.is_empty() {
                        self.owners.remove(key);
                    }
                }
            }
            for key in new_plan.services.keys() {
                keys.insert(*key);
                self.owners.entry(*key).or_default().insert(name.clone());
            }
            // Members and addresses are counted per Service port needing them: a shared one
            // (two Services selecting the same pods) goes only with the last of them. Only
            // the port's difference is written (one message per member): what it keeps is in
            // the kernel already, and after any failure the next sync is full.
            for (kind, m) in &old.members {
                bump(
                    &mut self.members,
                    &(*kind, member_key(m).to_string()),
                    false,
                );
                if !new_plan.members.contains(&(*kind, m.clone())) {
                    del_members.insert((*kind, m.clone()));
                }
            }
            for (kind, m) in &new_plan.members {
                bump(&mut self.members, &(*kind, member_key(m).to_string()), true);
                if !old.members.contains(&(*kind, m.clone())) {
                    add_members.insert((*kind, m.clone()));
                }
            }
            for ip in &old.addresses {
                bump(&mut self.addresses, ip, false);
                del_addresses.insert(*ip);
            }
            for ip in &new_plan.addresses {
                if bump(&mut self.addresses, ip, true) {
                    add_addresses.insert(*ip);
                }
            }
            if new.is_some() {
                self.ports.insert(name.clone(), new_plan);
            }
        }
        // What another port still needs stays; what is added again is not deleted.
        del_members.retain(|m| !add_members.contains(m));
        del_members.retain(|(kind, m)| {
            !self
                .members
                .contains_key(&(*kind, member_key(m).to_string()))
        });
        del_addresses.retain(|ip| !self.addresses.contains_key(ip));

        // The members over netlink, pipelined, deletes first (no `ipset restore` process:
        // its start was most of a partial sync's time, ~0.3 s under TCG). A frontend leaves
        // REJECT a moment before its virtual server exists; a connection in between reaches
        // the node's own stack (reset, unless the node listens on that port on every address).
        let ipv6 = self.cfg.plan.ipv6;
        let member_changes = del_members
            .iter()
            .map(|(kind, m)| (ipset_netlink::Op::Del, kind, m))
            .chain(
                add_members
                    .iter()
                    .map(|(kind, m)| (ipset_netlink::Op::Add, kind, m)),
            )
            .map(|(op, kind, m)| ipset_netlink::Change::new(op, *kind, ipv6, m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ipset_netlink::IpsetError::from)?;
        self.ipset.write(&member_changes)?;
        if rules_changed {
            self.write_rules(false)?;
        }
        let ifindex = self.kernel.ensure_dummy()?;
        for ip in &add_addresses {
            self.kernel.add_address(ifindex, *ip)?;
        }
        let wanted = self.wanted_of(&keys);
        let mut d = Diff::default();
        for key in &keys {
            diff::diff(*key, wanted.get(key).copied(), self.held.get(key), &mut d);
        }
        let touched: BTreeMap<VsKey, &plan::VirtualServer> = keys
            .iter()
            .filter_map(|k| wanted.get(k).map(|v| (*k, *v)))
            .collect();
        let have: BTreeMap<VsKey, Held> = keys
            .iter()
            .filter_map(|k| self.held.get(k).map(|h| (*k, h.clone())))
            .collect();
        let after = self.held_after(&touched, &have, &d);
        for key in &keys {
            match after.get(key) {
                Some(h) => {
                    self.held.insert(*key, h.clone());
                }
                None => {
                    self.held.remove(key);
                }
            }
        }
        self.draining
            .retain(|(key, _), _| self.held.contains_key(key));
        let written = self.send(d)?;
        for ip in &del_addresses {
            self.kernel.del_address(ifindex, *ip)?;
        }
        Ok(self.report(false, written, member_changes.len()))
    }
}

impl Backend for IpvsBackend {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
        let mut node_ips: Vec<IpAddr> = input
            .node
            .ips()
            .filter(|ip| ip.is_ipv6() == self.cfg.plan.ipv6)
            .collect();
        node_ips.sort();
        node_ips.dedup();
        // NodePorts answer on the node's addresses: new addresses are new virtual servers.
        let full = input.full || self.dirty || node_ips != self.node_ips;
        self.node_ips = node_ips;
        self.dirty = true;
        let report = if full {
            self.full_sync(input.state)?
        } else {
            self.partial_sync(input.state, input.changes)?
        };
        self.dirty = false;
        Ok(report)
    }

    fn lost_state(&mut self) -> Option<String> {
        if self.dirty {
            return None;
        }
        if let Some(why) = canary::lost(
            &self.cfg.iptables,
            layout::CANARY,
            &["mangle", "nat", "filter"],
            layout::JUMPS,
        ) {
            return Some(why);
        }
        match self.ipset.names() {
            Ok(names) => {
                if let Some(kind) = SetKind::ALL
                    .iter()
                    .find(|k| !names.contains(&k.name(self.cfg.plan.ipv6)))
                {
                    return Some(format!(
                        "the ipset {} is gone",
                        kind.name(self.cfg.plan.ipv6)
                    ));
                }
            }
            Err(e) => return Some(format!("cannot list ipsets: {e}")),
        }
        match self.kernel.service_keys() {
            Ok(keys) => {
                if let Some(key) = self.held.keys().find(|k| !keys.contains(k)) {
                    return Some(format!("the virtual server {key} is gone"));
                }
            }
            Err(e) => return Some(format!("cannot list IPVS: {e}")),
        }
        let ifindex = match self.kernel.dummy_index() {
            Ok(Some(i)) => i,
            Ok(None) => return Some(format!("{} is gone", layout::DUMMY)),
            Err(e) => return Some(format!("cannot read {}: {e}", layout::DUMMY)),
        };
        match self.kernel.dummy_addresses(ifindex) {
            Ok(bound) => {
                let bound: BTreeSet<IpAddr> = bound.into_iter().collect();
                self.addresses
                    .keys()
                    .find(|ip| !bound.contains(ip))
                    .map(|ip| format!("{ip} is no longer on {}", layout::DUMMY))
            }
            Err(e) => Some(format!("cannot read {}'s addresses: {e}", layout::DUMMY)),
        }
    }

    /// Deletes drained TCP real servers: once no connection uses them, or after the bound.
    fn housekeeping(&mut self) -> Result<(), BackendError> {
        if self.draining.is_empty() {
            return Ok(());
        }
        let keys: BTreeSet<VsKey> = self.draining.keys().map(|(k, _)| *k).collect();
        let mut gone = Vec::new();
        for key in keys {
            let dests = match self.kernel.dests(&key) {
                Ok(d) => d,
                Err(_) => {
                    // The server itself is gone: nothing to drain.
                    self.draining.retain(|(k, _), _| *k != key);
                    continue;
                }
            };
            for ((k, dest), since) in self.draining.iter().filter(|((k, _), _)| *k == key) {
                let conns = dests.get(dest);
                let done = match conns {
                    None => true,
                    Some((weight, _)) if *weight != 0 => true,
                    Some((_, connections)) => *connections == 0 || since.elapsed() > DRAIN_BOUND,
                };
                if done {
                    gone.push((*k, *dest, conns.is_some_and(|(w, _)| *w == 0)));
                }
            }
        }
        let deletes: Vec<diff::Change> = gone
            .iter()
            .filter(|(_, _, delete)| *delete)
            .map(|(k, d, _)| diff::Change::DelDest(*k, *d))
            .collect();
        let results = self.kernel.apply(&deletes)?;
        for (k, d, _) in &gone {
            self.draining.remove(&(*k, *d));
            if let Some(h) = self.held.get_mut(k) {
                if h.dests.get(d) == Some(&0) {
                    h.dests.remove(d);
                }
            }
        }
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            // What IPVS holds is not what kpx recorded now: the next sync reads it back.
            self.dirty = true;
            return Err(BackendError::kernel(
                "ipvs: deleting a drained real server",
                e,
            ));
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        super::cleanup_all().map(|_| ())
    }

    fn dump(&self) -> Result<Dump, BackendError> {
        let ipv6 = self.cfg.plan.ipv6;
        let frontends = ipset::members(&SetKind::Frontends.name(ipv6)).unwrap_or_default();
        let reject = ipset::members(&SetKind::Reject.name(ipv6)).unwrap_or_default();
        let drop = ipset::members(&SetKind::Drop.name(ipv6)).unwrap_or_default();
        // dump takes &self: a socket of its own.
        let services = Kernel::open(ipv6)?.services()?;
        let mut out: BTreeMap<String, DumpedService> = BTreeMap::new();
        for line in &frontends {
            let Some((portal, name, nodeport)) = parse_frontend(line) else {
                continue;
            };
            let svc = out.entry(name.clone()).or_insert_with(|| DumpedService {
                service: name.clone(),
                ..DumpedService::default()
            });
            if nodeport {
                svc.node_port = Some(portal.port);
            } else {
                svc.addresses.push(plan::ip_port(portal.ip, portal.port));
            }
            let key = VsKey::Addr {
                ip: portal.ip,
                port: portal.port,
                protocol: portal.protocol,
            };
            if let Some(held) = services.get(&key) {
                // Draining real servers (weight 0) take no new connections: not endpoints.
                svc.endpoints.extend(
                    held.dests
                        .iter()
                        .filter(|(_, w)| **w != 0)
                        .map(|((ip, port), _)| plan::ip_port(*ip, *port)),
                );
            }
            let m = portal.member();
            if reject.contains(&m) {
                svc.no_endpoints = Some("reject".into());
            } else if drop.contains(&m) && svc.endpoints.is_empty() {
                svc.no_endpoints = Some("drop".into());
            }
        }
        Ok(Dump {
            backend: "ipvs".into(),
            services: out.into_values().collect(),
            conntrack: Vec::new(),
        }
        .sorted())
    }
}

/// A `FRONTENDS` member as `ipset list` prints it: `IP,PROTO:PORT comment "NAME[ nodeport]"`.
pub(crate) fn parse_frontend(line: &str) -> Option<(Portal, String, bool)> {
    let (key, comment) = line.split_once(" comment ")?;
    let comment = comment.trim().trim_matches('"');
    let (name, nodeport) = match comment.strip_suffix(" nodeport") {
        Some(n) => (n, true),
        None => (comment, false),
    };
    let (ip, rest) = key.split_once(',')?;
    let (proto, port) = rest.split_once(':')?;
    let protocol = crate::model::Protocol::parse(&proto.to_uppercase())?;
    Some((
        Portal {
            ip: ip.parse().ok()?,
            port: port.parse().ok()?,
            protocol,
        },
        name.to_string(),
        nodeport,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontend_member_names_its_service_port() {
        let (portal, name, nodeport) =
            parse_frontend("198.18.0.10,tcp:30080 comment \"default/web:http/TCP nodeport\"")
                .expect("parsed");
        assert_eq!(portal.port, 30080);
        assert_eq!(name, "default/web:http/TCP");
        assert!(nodeport);
        let (portal, _, nodeport) =
            parse_frontend("2001:2::1,udp:53 comment \"kube-system/dns:dns/UDP\"").expect("parsed");
        assert!(portal.ip.is_ipv6() && !nodeport);
        assert_eq!(parse_frontend("198.18.0.10,tcp:80"), None);
    }
}
