//! The plan: what IPVS, the dummy interface, the ipsets and the iptables part must hold for a
//! snapshot, per Service port. Pure and infallible; `apply` diffs it against the kernel.
//!
//! Every frontend of the frontend model becomes, by its routes (pods, node, outside):
//!
//! - **one endpoint set for every source** (cluster IPs, `externalTrafficPolicy: Cluster`): a
//!   virtual server `ip:port/proto` with the set as NAT real servers. Masquerade is a mark set
//!   in nat before IPVS sees the packet, found by set membership: `MASQ-ALL`, or
//!   `MASQ-OFF-CLUSTER` (not from the pod network), or none. O(1) rules at any size.
//! - **no endpoint for any source**: no virtual server; the frontend is in `REJECT` (or `DROP`)
//!   and the filter table refuses it on INPUT, which runs before IPVS. The address stays bound
//!   to the dummy interface, so even the node's own clients are refused, never left hanging.
//! - **sources taking different sets** (`externalTrafficPolicy: Local` with pods told apart):
//!   the outside's set gets the plain virtual server; each other set a firewall-mark virtual
//!   server, its mark set in mangle for the sources that take it (with the masquerade bit when
//!   that source is masqueraded: IPVS compares the whole mark). Sources with no endpoint are
//!   dropped or rejected in filter INPUT (in mangle OUTPUT for the node's own packets, which IPVS
//!   takes on OUTPUT before the filter table). One small chain per such frontend and table.
//!
//! Hairpin traffic (an endpoint reaching itself) is masqueraded by the `LOOP-BACK` set, and a
//! Service address's ports that are not Services are refused (`FRONTENDS`, `ADDRESSES`).
//! A load-balancer frontend with `loadBalancerSourceRanges` is in `LB-FIREWALL`, its allowed
//! networks in `LB-SOURCE-CIDR`; the fixed rules drop the rest before anything else.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::layout::{self, SetKind, FWMARK_SHIFT, MASQ_MARK};
use crate::model::frontend::{self, EndpointSet, Frontend, FrontendKind, NodeConfig, Route};
use crate::model::{Protocol, ProxyState, ServiceEntry, ServicePortName};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    pub ipv6: bool,
    /// `--cluster-cidr` of this family: the pods' sources.
    pub cluster_cidr: Option<String>,
    pub masquerade_all: bool,
    /// `--nodeport-addresses` of this family; empty: every node address.
    pub nodeport_addresses: Vec<String>,
    /// `--ipvs-scheduler`.
    pub scheduler: String,
    /// `--conntrack-tcp-be-liberal`: no INVALID drop in forward.
    pub conntrack_tcp_be_liberal: bool,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            ipv6: false,
            cluster_cidr: None,
            masquerade_all: false,
            nodeport_addresses: Vec::new(),
            scheduler: "rr".into(),
            conntrack_tcp_be_liberal: false,
        }
    }
}

impl PlanConfig {
    /// The frontend model's node: this mode binds load-balancer IPs on the node (kpx-ipvs0), so
    /// its own connections to them leave from them and the model must know its addresses.
    fn node(&self, node_ips: &[IpAddr]) -> NodeConfig {
        NodeConfig {
            cluster_cidr: self.cluster_cidr.as_deref().and_then(parse_cidr),
            masquerade_all: self.masquerade_all,
            node_ips: node_ips
                .iter()
                .filter(|ip| ip.is_ipv6() == self.ipv6)
                .copied()
                .collect(),
        }
    }

    fn nodeport_cidrs(&self) -> Vec<(IpAddr, u8)> {
        self.nodeport_addresses
            .iter()
            .filter_map(|c| parse_cidr(c))
            .collect()
    }
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let net: ipnet::IpNet = text.parse().ok()?;
    Some((net.addr(), net.prefix_len()))
}

/// Which virtual server: by address, or by firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VsKey {
    Addr {
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    },
    Fwmark(u32),
}

impl std::fmt::Display for VsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VsKey::Addr { ip, port, protocol } => {
                write!(f, "{}/{}", ip_port(*ip, *port), protocol.lower())
            }
            VsKey::Fwmark(mark) => write!(f, "fwmark {mark:#x}"),
        }
    }
}

/// `ip:port`, with brackets for IPv6.
pub fn ip_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// What one virtual server holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// The frontend's protocol (a firewall-mark server's key does not say it).
    pub protocol: Protocol,
    pub scheduler: String,
    /// `sessionAffinity: ClientIP`: persistence with this timeout, in seconds.
    pub persistence: Option<u32>,
    /// The real servers, sorted: `mh` builds its table in the order destinations are added, so
    /// every node adds them in this order and builds the same table.
    pub dests: Vec<(IpAddr, u16)>,
}

/// A frontend in the iptables part's terms: an address (a node address for NodePorts), a port
/// and a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Portal {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Portal {
    /// As `hash:ip,port` members are written: `198.18.0.1,tcp:80`.
    pub fn member(&self) -> String {
        format!("{},{}:{}", self.ip, self.protocol.lower(), self.port)
    }

    fn key(&self) -> VsKey {
        VsKey::Addr {
            ip: self.ip,
            port: self.port,
            protocol: self.protocol,
        }
    }

    /// The iptables match of this portal's packets.
    pub fn matches(&self) -> String {
        let host = if self.ip.is_ipv6() { 128 } else { 32 };
        let p = self.protocol.lower();
        format!("-d {}/{host} -p {p} -m {p} --dport {}", self.ip, self.port)
    }

    fn hash(&self) -> String {
        crate::iptables::chains::hash16(&[&self.member()])
    }

    /// The per-frontend chain of `table` (`KPXV-FW-`, `KPXV-MQ-`, `KPXV-FL-` + 16 characters).
    pub fn chain(&self, table: &str) -> String {
        let tag = match table {
            "mangle" => "FW",
            "nat" => "MQ",
            _ => "FL",
        };
        format!("KPXV-{tag}-{}", self.hash())
    }
}

/// An iptables rule of the plan: in `table`, appended to `chain`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub table: &'static str,
    pub chain: String,
    pub rule: String,
}

/// What one Service port contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPlan {
    pub services: BTreeMap<VsKey, VirtualServer>,
    /// Addresses bound to the dummy interface.
    pub addresses: BTreeSet<IpAddr>,
    pub members: BTreeSet<(SetKind, String)>,
    /// Rules of the per-frontend chains, and the dispatch into them (in the base chains).
    pub rules: Vec<Rule>,
    /// Frontends that needed firewall marks (their marks are allocated by the caller).
    pub marked: Vec<Portal>,
}

/// Gives each frontend that needs one a firewall-mark id, kept while the frontend exists.
pub trait MarkIds {
    fn id(&mut self, portal: &Portal) -> u16;
}

/// Allocates the smallest free id per portal; stable while the portal stays.
#[derive(Debug, Clone, Default)]
pub struct MarkAllocator {
    ids: BTreeMap<Portal, u16>,
    used: BTreeSet<u16>,
}

impl MarkAllocator {
    pub fn release(&mut self, portal: &Portal) {
        if let Some(id) = self.ids.remove(portal) {
            self.used.remove(&id);
        }
    }
}

impl MarkIds for MarkAllocator {
    fn id(&mut self, portal: &Portal) -> u16 {
        if let Some(id) = self.ids.get(portal) {
            return *id;
        }
        // 65,535 marked frontends is the layout's bound; past it ids are shared, which the
        // kernel answers with EEXIST and the sync reports.
        let id = (1..=u16::MAX)
            .find(|i| !self.used.contains(i))
            .unwrap_or(u16::MAX);
        self.used.insert(id);
        self.ids.insert(*portal, id);
        id
    }
}

/// The source classes of a frontend's routes, as iptables tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Pods,
    Node,
    Outside,
}

/// Target of a route, without the masquerade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Set(EndpointSet),
    Reject,
    Drop,
}

fn target(route: &Route) -> Target {
    match route {
        Route::To { set, .. } => Target::Set(*set),
        Route::Reject => Target::Reject,
        Route::Drop => Target::Drop,
    }
}

/// A network as ipset(8) prints a `hash:…,net` member's: a host without its prefix length.
fn ipset_net(net: &ipnet::IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// The filter table's refusal: ICMP port unreachable of the family.
pub fn reject_rule(ipv6: bool) -> &'static str {
    if ipv6 {
        "REJECT --reject-with icmp6-port-unreachable"
    } else {
        "REJECT --reject-with icmp-port-unreachable"
    }
}

/// The portals of a frontend: its own address, or each node address NodePorts answer on.
fn portals(f: &Frontend, node_ips: &[IpAddr], nodeport_cidrs: &[(IpAddr, u8)]) -> Vec<Portal> {
    if f.kind != FrontendKind::NodePort {
        return vec![Portal {
            ip: f.ip,
            port: f.port,
            protocol: f.protocol,
        }];
    }
    node_ips
        .iter()
        .filter(|ip| ip.is_ipv6() == f.ipv6())
        .filter(|ip| {
            nodeport_cidrs.is_empty()
                || nodeport_cidrs
                    .iter()
                    .any(|(net, len)| crate::cidr::contains(*net, *len, ip))
        })
        .map(|ip| Portal {
            ip: *ip,
            port: f.port,
            protocol: f.protocol,
        })
        .collect()
}

fn virtual_server(cfg: &PlanConfig, f: &Frontend, route: &Route) -> VirtualServer {
    let mut dests: Vec<(IpAddr, u16)> = route.endpoints().iter().map(|e| (e.ip, e.port)).collect();
    dests.sort();
    dests.dedup();
    VirtualServer {
        protocol: f.protocol,
        scheduler: cfg.scheduler.clone(),
        persistence: f.affinity_seconds,
        dests,
    }
}

/// The plan of one Service port in this family, given the node's addresses.
pub fn port_plan(
    cfg: &PlanConfig,
    entry: &ServiceEntry,
    node_ips: &[IpAddr],
    marks: &mut dyn MarkIds,
) -> PortPlan {
    let node = cfg.node(node_ips);
    let detector = node.cluster_cidr.is_some();
    let fronts = frontend::frontends(entry, &node, cfg.ipv6);
    let nodeport_cidrs = cfg.nodeport_cidrs();
    let mut out = PortPlan::default();
    let hairpin_protocol = entry.port.name.protocol.lower();
    for (_, endpoints) in &fronts.sets {
        for e in endpoints.iter() {
            out.members.insert((
                SetKind::Hairpin,
                format!("{},{hairpin_protocol}:{},{}", e.ip, e.port, e.ip),
            ));
        }
    }
    if let Some(port) = entry.port.health_check_node_port {
        if entry.port.external_policy_local && !fronts.frontends.is_empty() {
            out.members
                .insert((SetKind::HealthCheckNodePorts, port.to_string()));
        }
    }
    for f in &fronts.frontends {
        let routes = [
            (Source::Pods, &f.from_pods),
            (Source::Node, &f.from_node),
            (Source::Outside, &f.from_outside),
        ];
        // Without a detector pods cannot be told apart: they get what outside clients get
        // (the model says so too; rendering it once keeps the rules honest).
        let route_of = |s: Source| -> &Route {
            match s {
                Source::Pods if !detector => &f.from_outside,
                Source::Pods => &f.from_pods,
                Source::Node => &f.from_node,
                Source::Outside => &f.from_outside,
            }
        };
        let targets: Vec<Target> = routes.iter().map(|(s, _)| target(route_of(*s))).collect();
        let uniform = targets.iter().all(|t| *t == targets[0]);
        for portal in portals(f, node_ips, &nodeport_cidrs) {
            // The comment names the Service port, so `dump` can say whose a virtual server
            // is from the kernel alone (IPVS itself has no names).
            let nodeport = if f.kind == FrontendKind::NodePort {
                " nodeport"
            } else {
                ""
            };
            out.members.insert((
                SetKind::Frontends,
                format!(
                    "{} comment \"{}{nodeport}\"",
                    portal.member(),
                    entry.port.name
                ),
            ));
            if f.kind != FrontendKind::NodePort {
                out.addresses.insert(portal.ip);
                out.members
                    .insert((SetKind::Addresses, portal.ip.to_string()));
            }
            if let Some(allowed) = &f.allowed_sources {
                out.members.insert((SetKind::Firewalled, portal.member()));
                for net in allowed.iter() {
                    out.members.insert((
                        SetKind::SourceRanges,
                        format!("{},{}", portal.member(), ipset_net(net)),
                    ));
                }
            }
            if uniform {
                match targets[0] {
                    Target::Reject => {
                        out.members.insert((SetKind::Reject, portal.member()));
                        continue;
                    }
                    Target::Drop => {
                        out.members.insert((SetKind::Drop, portal.member()));
                        continue;
                    }
                    Target::Set(_) => {}
                }
                out.services.insert(
                    portal.key(),
                    virtual_server(cfg, f, route_of(Source::Outside)),
                );
                let masq = [
                    route_of(Source::Pods).masquerade(),
                    route_of(Source::Node).masquerade(),
                    route_of(Source::Outside).masquerade(),
                ];
                match masq {
                    [false, false, false] => {}
                    [true, true, true] => {
                        out.members.insert((SetKind::MasqAll, portal.member()));
                    }
                    [false, true, true] if detector => {
                        out.members
                            .insert((SetKind::MasqOffCluster, portal.member()));
                    }
                    _ => masquerade_chain(cfg, &portal, &route_of, &mut out),
                }
                continue;
            }
            mixed(cfg, f, &portal, &route_of, marks, &mut out);
        }
    }
    out
}

/// The nat chain of a frontend whose masquerade differs by source in a way no set expresses.
fn masquerade_chain<'r>(
    cfg: &PlanConfig,
    portal: &Portal,
    route_of: &dyn Fn(Source) -> &'r Route,
    out: &mut PortPlan,
) {
    let chain = portal.chain("nat");
    out.rules.push(Rule {
        table: "nat",
        chain: layout::SERVICES.into(),
        rule: format!("{} -j {chain}", portal.matches()),
    });
    for (source, selector) in selectors(cfg) {
        let action = if route_of(source).masquerade() {
            layout::MARK_MASQ
        } else {
            "RETURN"
        };
        out.rules.push(Rule {
            table: "nat",
            chain: chain.clone(),
            rule: format!("{selector}-j {action}").trim_start().to_string(),
        });
    }
}

/// The iptables selector of each source class, in the order they must be tried (the last one
/// matches whatever is left).
fn selectors(cfg: &PlanConfig) -> Vec<(Source, String)> {
    let mut out = Vec::new();
    if let Some(cidr) = &cfg.cluster_cidr {
        out.push((Source::Pods, format!("-s {cidr} ")));
    }
    out.push((Source::Node, "-m addrtype --src-type LOCAL ".to_string()));
    out.push((Source::Outside, String::new()));
    out
}

/// A frontend whose sources take different targets.
fn mixed<'r>(
    cfg: &PlanConfig,
    f: &Frontend,
    portal: &Portal,
    route_of: &dyn Fn(Source) -> &'r Route,
    marks: &mut dyn MarkIds,
    out: &mut PortPlan,
) {
    let sources = [Source::Pods, Source::Node, Source::Outside];
    // The plain virtual server serves the outside's set, or the first set any source takes.
    let primary = std::iter::once(Source::Outside)
        .chain(sources)
        .find_map(|s| match target(route_of(s)) {
            Target::Set(set) => Some((set, s)),
            _ => None,
        });
    if let Some((_, s)) = primary {
        out.services
            .insert(portal.key(), virtual_server(cfg, f, route_of(s)));
    }
    let mut id = None;
    let (fw, mq, fl) = (
        portal.chain("mangle"),
        portal.chain("nat"),
        portal.chain("filter"),
    );
    let (mut fw_rules, mut mq_rules, mut fl_rules) = (Vec::new(), Vec::new(), Vec::new());
    for (source, selector) in selectors(cfg) {
        let route = route_of(source);
        let masq = route.masquerade();
        mq_rules.push(format!(
            "{selector}-j {}",
            if masq { layout::MARK_MASQ } else { "RETURN" }
        ));
        match (target(route), primary) {
            (Target::Set(set), Some((p, _))) if set == p => {
                fw_rules.push(format!("{selector}-j RETURN"));
                fl_rules.push(format!("{selector}-j RETURN"));
            }
            (Target::Set(_), _) => {
                let mark_id = *id.get_or_insert_with(|| marks.id(portal));
                let mark = u32::from(mark_id) << FWMARK_SHIFT;
                fw_rules.push(format!(
                    "{selector}-j MARK --set-xmark {mark:#x}/{:#x}",
                    layout::FWMARK_MASK
                ));
                fl_rules.push(format!("{selector}-j RETURN"));
                let key = VsKey::Fwmark(mark | if masq { MASQ_MARK } else { 0 });
                out.services.insert(key, virtual_server(cfg, f, route));
            }
            (verdict, _) => {
                let action = if verdict == Target::Reject {
                    reject_rule(cfg.ipv6)
                } else {
                    "DROP"
                };
                if source == Source::Node && primary.is_some() {
                    // IPVS takes the node's packets on OUTPUT, before the filter table: only
                    // mangle can stop them (and mangle cannot reject).
                    fw_rules.push(format!("{selector}-j DROP"));
                } else {
                    fw_rules.push(format!("{selector}-j RETURN"));
                }
                fl_rules.push(format!("{selector}-j {action}"));
            }
        }
    }
    if id.is_some() {
        out.marked.push(*portal);
    }
    let mut chain = |table: &'static str, base: &[&str], name: &str, rules: Vec<String>| {
        // A chain that only returns is not written.
        if rules.iter().all(|r| r.ends_with("-j RETURN")) {
            return;
        }
        for b in base {
            out.rules.push(Rule {
                table,
                chain: (*b).into(),
                rule: format!("{} -j {name}", portal.matches()),
            });
        }
        for r in rules {
            out.rules.push(Rule {
                table,
                chain: name.into(),
                rule: r.trim_start().to_string(),
            });
        }
    };
    let marks_any = !fw_rules.iter().all(|r| r.ends_with("-j RETURN"));
    chain(
        "mangle",
        &[layout::MANGLE_PRE, layout::MANGLE_OUT],
        &fw,
        fw_rules,
    );
    if marks_any {
        out.members.insert((SetKind::Marked, portal.member()));
    }
    chain("nat", &[layout::SERVICES], &mq, mq_rules);
    chain("filter", &[layout::FILTER], &fl, fl_rules);
}

/// The whole plan of a snapshot in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeMap<ServicePortName, PortPlan>,
}

impl Plan {
    pub fn of(
        cfg: &PlanConfig,
        state: &ProxyState,
        node_ips: &[IpAddr],
        marks: &mut dyn MarkIds,
    ) -> Self {
        Self {
            ports: state
                .entries
                .iter()
                .map(|(name, entry)| (name.clone(), port_plan(cfg, entry, node_ips, marks)))
                .collect(),
        }
    }

    pub fn services(&self) -> BTreeMap<VsKey, &VirtualServer> {
        self.ports
            .values()
            .flat_map(|p| p.services.iter().map(|(k, v)| (*k, v)))
            .collect()
    }

    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.ports
            .values()
            .flat_map(|p| p.addresses.iter().copied())
            .collect()
    }

    pub fn members(&self) -> BTreeMap<SetKind, BTreeSet<String>> {
        members(self.ports.values())
    }

    pub fn rules(&self) -> Vec<&Rule> {
        self.ports.values().flat_map(|p| p.rules.iter()).collect()
    }
}

/// A member as the kernel keys it: without its comment.
pub fn member_key(member: &str) -> &str {
    member
        .split_once(" comment ")
        .map_or(member, |(key, _)| key)
}

/// Every set's members, from some ports' plans (every set present, empty or not).
pub fn members<'a>(
    ports: impl Iterator<Item = &'a PortPlan>,
) -> BTreeMap<SetKind, BTreeSet<String>> {
    let mut out: BTreeMap<SetKind, BTreeSet<String>> =
        SetKind::ALL.iter().map(|k| (*k, BTreeSet::new())).collect();
    for p in ports {
        for (kind, member) in &p.members {
            out.entry(*kind).or_default().insert(member.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests;
