//! The plan: iptables-restore input for a snapshot, pure and infallible.
//!
//! Layout (nat): `KPX-SERVICES` dispatches each Service address to the Service port's chain,
//! `KPX-SVC-*` picks an endpoint with `statistic` and DNATs to it directly. Unlike kube-proxy
//! there is no chain per endpoint: iptables-nft's restore cost grows with the square of the
//! number of chains, so one chain per Service port keeps full syncs near the loader's floor.
//! Hairpin traffic (a pod reaching itself) is masqueraded in `KPX-POSTROUTING` by
//! `-s IP -d IP`, which only a hairpinned packet matches after DNAT. External traffic goes
//! through `KPX-EXT-*` (masquerade, or `KPX-SVL-*` local endpoints for
//! `externalTrafficPolicy: Local`). The filter table rejects traffic to Services without
//! endpoints and accepts health-check node ports; before that, `KPX-PROXY-FIREWALL` drops new
//! connections to a load-balancer IP from sources outside its `loadBalancerSourceRanges`.
//!
//! A partial sync writes only the chains of changed Service ports, and the shared dispatch
//! chains only when their rules changed.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use super::chains::{self, affinity_list, local_chain, service_chain};
use crate::model::frontend::{self, EndpointSet, FrontendKind, NodeConfig, Route};
use crate::model::{Changes, Endpoint, ProxyState, ServiceEntry, ServicePortName};

#[derive(Debug, Clone, Default)]
pub struct RenderConfig {
    pub ipv6: bool,
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidr: Option<String>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--nodeport-addresses`: CIDRs NodePorts answer on; empty means every local address.
    pub nodeport_addresses: Vec<String>,
    /// `--conntrack-tcp-be-liberal`: conntrack accepts out-of-window TCP packets, so forwarded
    /// packets it marks INVALID need not be dropped (kube-proxy then leaves out its drop rule).
    pub conntrack_tcp_be_liberal: bool,
}

/// Rules every full plan writes besides the Service ports' own: the filter canary and forward
/// rules, the nat canary and mark chain, the postrouting tail, and one NodePort dispatch per
/// `--nodeport-addresses` CIDR (one for all local addresses without).
fn fixed_rules(cfg: &RenderConfig) -> usize {
    fixed_filter_rules(cfg) + 1 + 1 + 3 + cfg.nodeport_addresses.len().max(1)
}

fn fixed_filter_rules(cfg: &RenderConfig) -> usize {
    1 + 2 + usize::from(!cfg.conntrack_tcp_be_liberal)
}

/// The rules one Service port contributes, cached between syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub nat_services: Vec<String>,
    pub nat_nodeports: Vec<String>,
    pub filter_services: Vec<String>,
    pub filter_external: Vec<String>,
    pub filter_nodeports: Vec<String>,
    /// `KPX-PROXY-FIREWALL`: the source ranges of its load-balancer frontends.
    pub filter_firewall: Vec<String>,
    pub hairpin: Vec<String>,
    /// nat chains this Service port owns, with their rules (empty once cached, see `slim`).
    pub chains: Vec<(String, Vec<String>)>,
    /// Per owned chain: name, digest of its rules, rule count. Kept between syncs instead of
    /// the rules themselves, which at 10,000 Services would hold most of the proxy's memory.
    pub digests: Vec<(String, u64, usize)>,
}

fn digest(rules: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    rules.hash(&mut hasher);
    hasher.finish()
}

impl Fragment {
    /// Turns this into its cached form (digests instead of rule text) and returns the chains
    /// it took out.
    fn slim(&mut self) -> Vec<(String, Vec<String>)> {
        self.digests = self
            .chains
            .iter()
            .map(|(c, r)| (c.clone(), digest(r), r.len()))
            .collect();
        std::mem::take(&mut self.chains)
    }
}

pub type Fragments = BTreeMap<ServicePortName, Arc<Fragment>>;

/// What a sync writes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Input for `iptables-restore --noflush`.
    pub restore: String,
    pub full: bool,
    pub rules_written: usize,
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// Rules kpx has in the kernel once this plan is applied.
    pub rules_total: usize,
    /// Of those, in the filter table (the rest are nat's).
    pub filter_rules_total: usize,
    /// The fragments to keep once this plan is applied.
    pub fragments: Fragments,
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn destination(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn reject(ipv6: bool) -> &'static str {
    if ipv6 {
        "REJECT --reject-with icmp6-port-unreachable"
    } else {
        "REJECT --reject-with icmp-port-unreachable"
    }
}

/// `--probability` of the rule that takes one of the `remaining` endpoints not passed over yet:
/// 1/remaining with ten decimals, as kube-proxy writes it. Formatted once per count instead of
/// once per rule (a 10,000-Service table has 90,000 of them).
fn probability(remaining: usize) -> Cow<'static, str> {
    /// `COMMON[k - 1]` is 1/k.
    static COMMON: OnceLock<Vec<String>> = OnceLock::new();
    let format = |k: usize| format!("{:.10}", 1.0 / k as f64);
    let common = COMMON.get_or_init(|| (1..=256).map(format).collect());
    match remaining.checked_sub(1).and_then(|i| common.get(i)) {
        Some(text) => Cow::Borrowed(text.as_str()),
        None => Cow::Owned(format(remaining)),
    }
}

/// DNAT rules picking one of `endpoints` uniformly (and sticking with `affinity`); `name` is
/// the Service port's name as rendered for comments.
fn endpoint_rules(
    chain: &str,
    name: &str,
    entry: &ServiceEntry,
    endpoints: &[&Endpoint],
    out: &mut Vec<String>,
) {
    let port_name = &entry.port.name;
    let proto = port_name.protocol.lower();
    let destinations: Vec<String> = endpoints
        .iter()
        .map(|ep| destination(&ep.ip, ep.port))
        .collect();
    let lists: Vec<String> = match entry.port.affinity_seconds {
        Some(_) => destinations
            .iter()
            .map(|d| affinity_list(port_name, d))
            .collect(),
        None => Vec::new(),
    };
    if let Some(seconds) = entry.port.affinity_seconds {
        for (to, list) in destinations.iter().zip(&lists) {
            out.push(format!(
                "-A {chain} -p {proto} -m comment --comment \"{name} affinity\" -m recent --name {list} --rcheck --seconds {seconds} --reap -j DNAT --to-destination {to}"
            ));
        }
    }
    // Built by appending: this loop writes most of a large table's rules.
    let prefix = format!("-A {chain} -p {proto} -m comment --comment \"{name}\"");
    let n = destinations.len();
    for (i, to) in destinations.iter().enumerate() {
        let mut rule = String::with_capacity(prefix.len() + 128);
        rule.push_str(&prefix);
        if i + 1 < n {
            rule.push_str(" -m statistic --mode random --probability ");
            rule.push_str(&probability(n - i));
        }
        if let Some(list) = lists.get(i) {
            rule.push_str(" -m recent --name ");
            rule.push_str(list);
            rule.push_str(" --set");
        }
        rule.push_str(" -j DNAT --to-destination ");
        rule.push_str(to);
        out.push(rule);
    }
}

/// The frontend model's node configuration for this family.
fn node_config(cfg: &RenderConfig) -> NodeConfig {
    let cluster_cidr = cfg.cluster_cidr.as_deref().and_then(|cidr| {
        let (ip, len) = cidr.split_once('/')?;
        Some((ip.parse().ok()?, len.parse().ok()?))
    });
    NodeConfig {
        cluster_cidr,
        masquerade_all: cfg.masquerade_all,
        // Load-balancer IPs are not bound on the node here: its own connections to them
        // leave from its own address, which the source ranges judge as they are.
        node_ips: Vec::new(),
    }
}

fn set_chain(name: &ServicePortName, set: EndpointSet) -> String {
    match set {
        EndpointSet::Cluster => service_chain(name),
        EndpointSet::Local => local_chain(name),
    }
}

/// The filter-table target and comment of a route that is not to endpoints.
fn verdict(route: &Route, ipv6: bool) -> Option<(&'static str, &'static str)> {
    match route {
        Route::To { .. } => None,
        Route::Reject => Some((reject(ipv6), "has no endpoints")),
        Route::Drop => Some(("DROP", "has no local endpoints")),
    }
}

/// The rules of one Service port: the frontend model's routes (`model/frontend.rs`), written
/// as chains. A frontend whose sources all go to one endpoint set jumps straight to that
/// set's chain, with its masquerade rules at the top of it (kube-proxy's cluster IP layout);
/// one whose sources differ goes through a `KPX-EXT-*` chain that tells pods
/// (`-s --cluster-cidr`), the node (`--src-type LOCAL`) and the rest apart. What no route
/// takes to endpoints is rejected or dropped in the filter table.
pub fn fragment(cfg: &RenderConfig, entry: &ServiceEntry) -> Fragment {
    let mut f = Fragment::default();
    let node = node_config(cfg);
    let model = frontend::frontends(entry, &node, cfg.ipv6);
    if model.frontends.is_empty() {
        return f;
    }
    let port = &entry.port;
    // Rendered once: it appears in nearly every rule's comment.
    let name = port.name.to_string();
    let name = name.as_str();
    let proto = port.name.protocol.lower();
    let match_port = |p: u16| format!("-p {proto} -m {proto} --dport {p}");
    let cidr = cfg.cluster_cidr.as_deref();

    // Masquerade rules at the top of each set chain, for the frontends that jump straight in.
    let mut masq_rules: Vec<(EndpointSet, String)> = Vec::new();
    // The distinct route triples that need a chain of their own, and the chains' names.
    let mut routed: Vec<([Route; 3], String)> = Vec::new();
    for fe in &model.frontends {
        let routes = fe.routes();
        let dispatch = |target: &str| match fe.kind {
            FrontendKind::NodePort => format!(
                "-A {} {} -m comment --comment \"{name}\" -j {target}",
                chains::NODEPORTS,
                match_port(fe.port)
            ),
            kind => format!(
                "-A {} -d {} {} -m comment --comment \"{name} {}\" -j {target}",
                chains::SERVICES,
                host(&fe.ip),
                match_port(fe.port),
                if kind == FrontendKind::ClusterIp {
                    "cluster IP"
                } else {
                    "external IP"
                }
            ),
        };
        let push_dispatch = |f: &mut Fragment, rule: String| {
            if fe.kind == FrontendKind::NodePort {
                f.nat_nodeports.push(rule);
            } else {
                f.nat_services.push(rule);
            }
        };
        // loadBalancerSourceRanges, judged in the filter table on the connection's original
        // destination (`--ctorigdst`): the same rule then sees a packet nat already DNATed to
        // an endpoint and one left for the no-endpoint reject, and this chain runs before
        // both (its jumps are first in INPUT, FORWARD and OUTPUT). One rule per range and
        // one drop per load-balancer IP, however many endpoints.
        if let Some(allowed) = &fe.allowed_sources {
            let original = format!(
                "-p {proto} -m conntrack --ctorigdst {} --ctorigdstport {}",
                host(&fe.ip),
                fe.port
            );
            for net in allowed.iter() {
                f.filter_firewall.push(format!(
                    "-A {} -s {net} {original} -m comment --comment \"{name} loadBalancerSourceRanges\" -j RETURN",
                    chains::FIREWALL
                ));
            }
            f.filter_firewall.push(format!(
                "-A {} {original} -m comment --comment \"{name} source not in loadBalancerSourceRanges\" -j DROP",
                chains::FIREWALL
            ));
        }
        // What is not taken to endpoints is refused or dropped in the filter table (after
        // nat: a packet DNATed for another source no longer matches the frontend address).
        if let Some((target, why)) = routes.iter().find_map(|r| verdict(r, cfg.ipv6)) {
            let rule = match fe.kind {
                FrontendKind::ClusterIp => format!(
                    "-A {} -d {} {} -m comment --comment \"{name} {why}\" -j {target}",
                    chains::SERVICES,
                    host(&fe.ip),
                    match_port(fe.port)
                ),
                FrontendKind::NodePort => format!(
                    "-A {} -m addrtype --dst-type LOCAL {} -m comment --comment \"{name} {why}\" -j {target}",
                    chains::EXTERNAL_SERVICES,
                    match_port(fe.port)
                ),
                _ => format!(
                    "-A {} -d {} {} -m comment --comment \"{name} {why}\" -j {target}",
                    chains::EXTERNAL_SERVICES,
                    host(&fe.ip),
                    match_port(fe.port)
                ),
            };
            if fe.kind == FrontendKind::ClusterIp {
                f.filter_services.push(rule);
            } else {
                f.filter_external.push(rule);
            }
        }
        if !routes.iter().any(|r| r.set().is_some()) {
            continue;
        }
        let masq: Vec<bool> = routes.iter().map(|r| r.masquerade()).collect();
        let direct = fe.kind == FrontendKind::ClusterIp
            && fe.from_pods.same_target(&fe.from_node)
            && fe.from_node.same_target(&fe.from_outside)
            && (masq == [false, false, false]
                || masq == [true, true, true]
                || (masq == [false, true, true] && cidr.is_some()));
        if direct {
            let set = fe.from_outside.set().unwrap_or(EndpointSet::Cluster);
            let chain = set_chain(&port.name, set);
            let source = match masq.as_slice() {
                [true, true, true] => Some(String::new()),
                [false, true, true] => cidr.map(|c| format!(" ! -s {c}")),
                _ => None,
            };
            if let Some(source) = source {
                masq_rules.push((
                    set,
                    format!(
                        "-A {chain} -d {} {}{source} -m comment --comment \"{name} cluster IP\" -j {}",
                        host(&fe.ip),
                        match_port(fe.port),
                        chains::MARK_MASQ
                    ),
                ));
            }
            push_dispatch(&mut f, dispatch(&chain));
            continue;
        }
        let triple = [
            fe.from_pods.clone(),
            fe.from_node.clone(),
            fe.from_outside.clone(),
        ];
        let chain = match routed.iter().find(|(t, _)| *t == triple) {
            Some((_, chain)) => chain.clone(),
            None => {
                let chain = chains::external_chain_n(&port.name, routed.len());
                routed.push((triple, chain.clone()));
                chain
            }
        };
        push_dispatch(&mut f, dispatch(&chain));
    }

    for ([pods, node_route, outside], chain) in &routed {
        let mut rules = Vec::new();
        let jump =
            |route: &Route| set_chain(&port.name, route.set().unwrap_or(EndpointSet::Cluster));
        if let (Some(cidr), Route::To { .. }) = (cidr, pods) {
            if pods != outside {
                if pods.masquerade() {
                    rules.push(format!("-A {chain} -s {cidr} -m comment --comment \"masquerade pod traffic for {name} external destinations\" -j {}", chains::MARK_MASQ));
                }
                rules.push(format!("-A {chain} -s {cidr} -m comment --comment \"pod traffic for {name} external destinations\" -j {}", jump(pods)));
            }
        }
        if node_route != outside && node_route.set().is_some() {
            if node_route.masquerade() {
                rules.push(format!("-A {chain} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}", chains::MARK_MASQ));
            }
            rules.push(format!("-A {chain} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}", jump(node_route)));
        }
        if outside.set().is_some() {
            if outside.masquerade() {
                rules.push(format!("-A {chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {}", chains::MARK_MASQ));
            }
            rules.push(format!("-A {chain} -j {}", jump(outside)));
        }
        f.chains.push((chain.clone(), rules));
    }

    for (set, endpoints) in &model.sets {
        let chain = set_chain(&port.name, *set);
        let mut rules: Vec<String> = masq_rules
            .iter()
            .filter(|(s, _)| s == set)
            .map(|(_, r)| r.clone())
            .collect();
        let endpoints: Vec<&Endpoint> = endpoints.iter().collect();
        endpoint_rules(&chain, name, entry, &endpoints, &mut rules);
        f.chains.push((chain, rules));
    }

    if let Some(hc) = port.health_check_node_port {
        f.filter_nodeports.push(format!("-A {} -p tcp -m tcp --dport {hc} -m comment --comment \"{name} health check node port\" -j ACCEPT", chains::NODEPORTS));
    }
    // A pod reaching itself through the Service: only such a packet has the same source and
    // destination after DNAT.
    let mut hairpin = BTreeSet::new();
    for ep in model
        .sets
        .iter()
        .flat_map(|(_, eps)| eps.iter())
        .filter(|e| e.local)
    {
        hairpin.insert(format!(
            "-A {} -s {} -d {} -m comment --comment \"hairpin\" -j MASQUERADE",
            chains::POSTROUTING,
            host(&ep.ip),
            host(&ep.ip)
        ));
    }
    f.hairpin = hairpin.into_iter().collect();
    f
}

/// Shared chains, rebuilt from all fragments when any of their parts changed.
struct Shared {
    nat_dispatch: bool,
    postrouting: bool,
    filter: bool,
}

fn shared_changes(old: Option<&Fragment>, new: Option<&Fragment>, s: &mut Shared) {
    let empty = Fragment::default();
    let (o, n) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    s.nat_dispatch |= o.nat_services != n.nat_services || o.nat_nodeports != n.nat_nodeports;
    s.postrouting |= o.hairpin != n.hairpin;
    s.filter |= o.filter_services != n.filter_services
        || o.filter_external != n.filter_external
        || o.filter_nodeports != n.filter_nodeports
        || o.filter_firewall != n.filter_firewall;
}

/// The plan from `state`: everything when `full` (with `existing` kpx nat chains to remove if
/// no longer wanted), else only what `changes` touched since `previous` was applied.
pub fn plan(
    cfg: &RenderConfig,
    state: &ProxyState,
    changes: &Changes,
    previous: &Fragments,
    full: bool,
    existing: &BTreeSet<String>,
    missing_jumps: &[chains::Jump],
) -> Plan {
    let mut fragments: Fragments;
    let mut shared = Shared {
        nat_dispatch: full,
        postrouting: full,
        filter: full,
    };
    let mut write_chains: Vec<(String, Vec<String>)> = Vec::new();
    let mut delete_chains: BTreeSet<String> = BTreeSet::new();
    if full {
        fragments = Fragments::new();
        for (name, entry) in &state.entries {
            let mut f = fragment(cfg, entry);
            write_chains.append(&mut f.slim());
            fragments.insert(name.clone(), Arc::new(f));
        }
        let wanted: BTreeSet<&String> = write_chains.iter().map(|(c, _)| c).collect();
        delete_chains = existing
            .iter()
            .filter(|c| !wanted.contains(c) && !chains::NAT_BASE.contains(&c.as_str()))
            .cloned()
            .collect();
    } else {
        fragments = previous.clone();
        for name in changes.removed.keys() {
            if let Some(old) = fragments.remove(name) {
                shared_changes(Some(&old), None, &mut shared);
                delete_chains.extend(old.digests.iter().map(|(c, _, _)| c.clone()));
            }
        }
        for name in &changes.changed {
            let Some(entry) = state.entries.get(name) else {
                continue;
            };
            let new = fragment(cfg, entry);
            let old = fragments.get(name).cloned();
            shared_changes(old.as_deref(), Some(&new), &mut shared);
            let kept: BTreeSet<&String> = new.chains.iter().map(|(c, _)| c).collect();
            for (chain, rules) in &new.chains {
                let unchanged = old.as_ref().is_some_and(|o| {
                    o.digests
                        .iter()
                        .any(|(c, d, _)| c == chain && *d == digest(rules))
                });
                if !unchanged {
                    write_chains.push((chain.clone(), rules.clone()));
                }
            }
            if let Some(old) = &old {
                delete_chains.extend(
                    old.digests
                        .iter()
                        .map(|(c, _, _)| c.clone())
                        .filter(|c| !kept.contains(c)),
                );
            }
            let mut new = new;
            new.slim();
            fragments.insert(name.clone(), Arc::new(new));
        }
    }

    let mut out = String::new();
    let mut rules_written = 0;
    let mut emit = |out: &mut String, rule: &str| {
        out.push_str(rule);
        out.push('\n');
        rules_written += 1;
    };

    // filter
    if shared.filter {
        out.push_str("*filter\n");
        for chain in chains::FILTER_BASE {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        // Jumps from built-in chains that are missing go first in line, in the same
        // transaction (no separate iptables calls, which legacy makes cost a table reload each).
        for jump in missing_jumps.iter().filter(|j| j.table == "filter") {
            emit(&mut out, &format!("-I {} 1 {}", jump.from, jump.spec()));
        }
        // The canary: someone flushing the tables removes it, and the next check resyncs.
        emit(&mut out, &format!("-A {} -j RETURN", chains::CANARY));
        if !cfg.conntrack_tcp_be_liberal {
            // Forwarded packets conntrack cannot place (out of the TCP window, e.g. after a
            // DNAT's conntrack entry was replaced) would otherwise leave un-NATed with the
            // pod's or the Service's address and reset the client's connection (kube-proxy's
            // KUBE-FORWARD rule; kubernetes#74839).
            emit(&mut out, &format!("-A {} -m conntrack --ctstate INVALID -m comment --comment \"kpx: drop packets conntrack marks INVALID\" -j DROP", chains::FORWARD));
        }
        emit(&mut out, &format!("-A {} -m comment --comment \"kpx forwarding rules\" -m mark --mark {m}/{m} -j ACCEPT", chains::FORWARD, m = chains::MASQ_MARK));
        emit(&mut out, &format!("-A {} -m comment --comment \"kpx forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", chains::FORWARD));
        for f in fragments.values() {
            for rule in f
                .filter_services
                .iter()
                .chain(&f.filter_external)
                .chain(&f.filter_nodeports)
                .chain(&f.filter_firewall)
            {
                emit(&mut out, rule);
            }
        }
        out.push_str("COMMIT\n");
    }

    // nat
    let declared_base: Vec<&str> = if full {
        chains::NAT_BASE.to_vec()
    } else {
        let mut v = Vec::new();
        if shared.nat_dispatch {
            v.extend([chains::SERVICES, chains::NODEPORTS]);
        }
        if shared.postrouting {
            v.push(chains::POSTROUTING);
        }
        v
    };
    // Chains in name order: iptables-nft-restore files every declared chain into a list sorted
    // by name, and in any other order (ours are hashes, so effectively random) that filing
    // dominates the restore. Measured with 10,000 Services: 8.6 s in Service order, 3.9 s
    // sorted (legacy is indifferent: 0.80 s either way).
    write_chains.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let chains_written = write_chains.len();
    let chains_deleted = delete_chains.len();
    if !declared_base.is_empty() || !write_chains.is_empty() || !delete_chains.is_empty() {
        out.push_str("*nat\n");
        for chain in &declared_base {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for (chain, _) in &write_chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for chain in &delete_chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for jump in missing_jumps.iter().filter(|j| j.table == "nat") {
            emit(&mut out, &format!("-I {} 1 {}", jump.from, jump.spec()));
        }
        if full {
            emit(&mut out, &format!("-A {} -j RETURN", chains::CANARY));
            emit(
                &mut out,
                &format!(
                    "-A {} -j MARK --or-mark {}",
                    chains::MARK_MASQ,
                    chains::MASQ_MARK
                ),
            );
        }
        if declared_base.contains(&chains::POSTROUTING) {
            let hairpin: BTreeSet<&String> = fragments.values().flat_map(|f| &f.hairpin).collect();
            for rule in hairpin {
                emit(&mut out, rule);
            }
            emit(
                &mut out,
                &format!(
                    "-A {} -m mark ! --mark {m}/{m} -j RETURN",
                    chains::POSTROUTING,
                    m = chains::MASQ_MARK
                ),
            );
            // Clear the mark so a re-traversal (e.g. IPsec) does not masquerade twice.
            emit(
                &mut out,
                &format!(
                    "-A {} -j MARK --xor-mark {}",
                    chains::POSTROUTING,
                    chains::MASQ_MARK
                ),
            );
            emit(&mut out, &format!("-A {} -m comment --comment \"kpx service traffic requiring SNAT\" -j MASQUERADE --random-fully", chains::POSTROUTING));
        }
        if shared.nat_dispatch {
            for f in fragments.values() {
                for rule in &f.nat_services {
                    emit(&mut out, rule);
                }
            }
            for f in fragments.values() {
                for rule in &f.nat_nodeports {
                    emit(&mut out, rule);
                }
            }
            // NodePorts last, on the addresses they answer on.
            if cfg.nodeport_addresses.is_empty() {
                emit(&mut out, &format!("-A {} -m comment --comment \"kpx service nodeports\" -m addrtype --dst-type LOCAL -j {}", chains::SERVICES, chains::NODEPORTS));
            } else {
                for cidr in &cfg.nodeport_addresses {
                    emit(&mut out, &format!("-A {} -d {cidr} -m comment --comment \"kpx service nodeports\" -m addrtype --dst-type LOCAL -j {}", chains::SERVICES, chains::NODEPORTS));
                }
            }
        }
        for (_, rules) in &write_chains {
            for rule in rules {
                emit(&mut out, rule);
            }
        }
        for chain in &delete_chains {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    // Hairpin rules are shared between a Service's ports (written once per endpoint).
    let hairpin = fragments
        .values()
        .flat_map(|f| &f.hairpin)
        .collect::<BTreeSet<_>>()
        .len();
    let rules_total = fragments
        .values()
        .map(|f| {
            f.nat_services.len()
                + f.nat_nodeports.len()
                + f.filter_services.len()
                + f.filter_external.len()
                + f.filter_nodeports.len()
                + f.filter_firewall.len()
                + f.digests.iter().map(|(_, _, n)| n).sum::<usize>()
        })
        .sum::<usize>()
        + hairpin
        + fixed_rules(cfg);
    let filter_rules_total = fragments
        .values()
        .map(|f| {
            f.filter_services.len()
                + f.filter_external.len()
                + f.filter_nodeports.len()
                + f.filter_firewall.len()
        })
        .sum::<usize>()
        + fixed_filter_rules(cfg);
    Plan {
        restore: out,
        full,
        rules_written,
        chains_written,
        chains_deleted,
        rules_total,
        filter_rules_total,
        fragments,
    }
}

#[cfg(test)]
mod tests;
