//! The plan: `nft -f` input for a snapshot, pure and infallible (layout and why: `README.md`).
//!
//! Every Service port contributes a [`Fragment`]: its chains (one per endpoint set a route
//! uses, one per distinct set of routes that differ by source) and its elements of the shared
//! maps (`service-ips`, `service-nodeports`, `no-endpoint-*`, `hairpin`, and the endpoint slots
//! of `endpoints-K`). A partial sync writes only the chains and elements that differ from what
//! was applied; a sync whose changes are endpoint addresses only touches elements
//! ([`Plan::elements_only`]), which costs the same whatever the table's size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use super::chains::{
    self, affinity_set, endpoint_map, external_chain, firewall_chain, local_chain, service_chain,
};
use crate::model::frontend::{self, EndpointSet, FrontendKind, NodeConfig, Route};
use crate::model::{Changes, Endpoint, Protocol, ProxyState, ServiceEntry, ServicePortName};

#[derive(Debug, Clone, Default)]
pub struct RenderConfig {
    pub ipv6: bool,
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidr: Option<String>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--nodeport-addresses`: CIDRs NodePorts answer on; empty means every local address but
    /// loopback (as kube-proxy's nftables mode).
    pub nodeport_addresses: Vec<String>,
    /// `--conntrack-tcp-be-liberal`: no drop of forwarded packets conntrack marks INVALID.
    pub conntrack_tcp_be_liberal: bool,
}

impl RenderConfig {
    fn family(&self) -> &'static str {
        if self.ipv6 {
            "ip6"
        } else {
            "ip"
        }
    }

    fn addr_type(&self) -> &'static str {
        if self.ipv6 {
            "ipv6_addr"
        } else {
            "ipv4_addr"
        }
    }

    fn loopback(&self) -> &'static str {
        if self.ipv6 {
            "::1"
        } else {
            "127.0.0.0/8"
        }
    }

    fn node_config(&self) -> NodeConfig {
        let cluster_cidr = self.cluster_cidr.as_deref().and_then(|cidr| {
            let (ip, len) = cidr.split_once('/')?;
            Some((ip.parse().ok()?, len.parse().ok()?))
        });
        NodeConfig {
            cluster_cidr,
            masquerade_all: self.masquerade_all,
            // Load-balancer IPs are not bound on the node here: its own connections to them
            // leave from its own address, which the source ranges judge as they are.
            node_ips: Vec::new(),
        }
    }
}

/// A map or set of the table that Service ports put elements in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapId {
    ServiceIps,
    ServiceNodeports,
    NoEndpointServices,
    NoEndpointNodeports,
    FirewallIps,
    Hairpin,
    Endpoints(Protocol, u32),
}

impl MapId {
    pub fn name(self) -> String {
        match self {
            MapId::ServiceIps => chains::SERVICE_IPS.into(),
            MapId::ServiceNodeports => chains::SERVICE_NODEPORTS.into(),
            MapId::NoEndpointServices => chains::NO_ENDPOINT_SERVICES.into(),
            MapId::NoEndpointNodeports => chains::NO_ENDPOINT_NODEPORTS.into(),
            MapId::FirewallIps => chains::FIREWALL_IPS.into(),
            MapId::Hairpin => chains::HAIRPIN.into(),
            MapId::Endpoints(proto, shard) => endpoint_map(proto, shard),
        }
    }

    /// Maps several Service ports may put the same key in (two Services sharing an external
    /// IP and port): the first in name order wins, as in a full sync.
    fn shared(self) -> bool {
        !matches!(self, MapId::Endpoints(..))
    }
}

/// An element's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `ip . proto . port`.
    Frontend(IpAddr, Protocol, u16),
    /// `proto . port`.
    NodePort(Protocol, u16),
    /// An endpoint slot of `endpoints-K`.
    Slot(u32),
    /// `ip . ip` (hairpin).
    Pair(IpAddr, IpAddr),
}

/// An element's value (maps only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Goto(String),
    Drop,
    Endpoint(IpAddr, u16),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Frontend(ip, proto, port) => write!(f, "{ip} . {} . {port}", proto.lower()),
            Key::NodePort(proto, port) => write!(f, "{} . {port}", proto.lower()),
            Key::Slot(slot) => write!(f, "{slot}"),
            Key::Pair(a, b) => write!(f, "{a} . {b}"),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Goto(chain) => write!(f, "goto {chain}"),
            Value::Drop => f.write_str("drop"),
            Value::Endpoint(ip, port) => write!(f, "{ip} . {port}"),
        }
    }
}

/// One element of a map or set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Element {
    pub map: MapId,
    pub key: Key,
    pub value: Option<Value>,
    /// The Service port, on frontend elements (what `nft list` and `dump` show).
    pub comment: Option<Arc<str>>,
}

/// A chain a Service port owns, with its rules (text after `add rule <family> kpx <chain> `).
/// What is kept between syncs holds only their digest and number ([`Fragment::slimmed`]):
/// at 10,000 Services the rule text would be a tenth of the proxy's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
    pub digest: u64,
    pub count: usize,
}

impl Chain {
    fn new(name: String, rules: Vec<String>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        rules.hash(&mut hasher);
        Chain {
            name,
            count: rules.len(),
            digest: hasher.finish(),
            rules,
        }
    }

    /// Whether the kernel's version of this chain (`kept`) has these rules.
    fn same_rules(&self, kept: &Chain) -> bool {
        self.digest == kept.digest && self.count == kept.count
    }
}

/// What one Service port contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub chains: Vec<Chain>,
    /// Session affinity sets: name, timeout in seconds.
    pub affinity_sets: Vec<(String, u32)>,
    pub elements: Vec<Element>,
}

impl Fragment {
    fn rules(&self) -> usize {
        self.chains.iter().map(|c| c.count).sum()
    }

    /// This without the rules' text (what is kept between syncs).
    pub fn slimmed(&self) -> Fragment {
        Fragment {
            chains: self
                .chains
                .iter()
                .map(|c| Chain {
                    name: c.name.clone(),
                    rules: Vec::new(),
                    digest: c.digest,
                    count: c.count,
                })
                .collect(),
            affinity_sets: self.affinity_sets.clone(),
            elements: self.elements.clone(),
        }
    }
}

/// A shard of the endpoint maps: its protocol and number.
pub type Shard = (Protocol, u32);

/// Where an endpoint set's slots are: shard `endpoints-<proto>-K` and slot index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub shard: Shard,
    pub index: u32,
}

impl Slots {
    pub fn base(self) -> u32 {
        self.index << chains::SLOT_BITS
    }
}

/// Slot allocation: which endpoint set chain has which slots; freed slots are reused.
#[derive(Debug, Clone, Default)]
pub struct SlotAllocator {
    by_chain: HashMap<String, Slots>,
    /// Per protocol and shard, its used slot indexes (a bit each).
    used: BTreeMap<Protocol, Vec<u64>>,
}

impl SlotAllocator {
    fn get_or_allocate(&mut self, chain: &str, protocol: Protocol) -> Slots {
        if let Some(slots) = self.by_chain.get(chain) {
            return *slots;
        }
        let used = self.used.entry(protocol).or_default();
        let shard = match used
            .iter()
            .position(|u| u.count_ones() < chains::SETS_PER_SHARD)
        {
            Some(s) => s,
            None => {
                used.push(0);
                used.len() - 1
            }
        };
        let index = used[shard].trailing_ones();
        used[shard] |= 1 << index;
        let slots = Slots {
            shard: (protocol, shard as u32),
            index,
        };
        self.by_chain.insert(chain.to_string(), slots);
        slots
    }

    fn free(&mut self, chain: &str) {
        if let Some(slots) = self.by_chain.remove(chain) {
            let (protocol, shard) = slots.shard;
            if let Some(used) = self
                .used
                .get_mut(&protocol)
                .and_then(|u| u.get_mut(shard as usize))
            {
                *used &= !(1 << slots.index);
            }
        }
    }

    /// Shards in use (their maps must exist).
    pub fn shards(&self) -> BTreeSet<Shard> {
        self.used
            .iter()
            .flat_map(|(p, u)| (0..u.len() as u32).map(move |i| (*p, i)))
            .collect()
    }
}

/// A shared key's value as one Service port wants it.
type Owned = (Option<Value>, Option<Arc<str>>);

/// Per shared key, the Service ports that want it.
type Owners = HashMap<(MapId, Key), BTreeMap<ServicePortName, Owned>>;

/// What the kernel holds, as of the last successful sync (kept in memory, never listed back).
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub fragments: BTreeMap<ServicePortName, Arc<Fragment>>,
    pub slots: SlotAllocator,
    /// Shards whose maps exist.
    pub shards_declared: BTreeSet<Shard>,
    /// Keys of the shared maps, and which Service ports put them there with which value.
    owners: Owners,
    /// Chains and sets no longer used, flushed of rules, to delete on a later housekeeping
    /// tick (a chain cannot go in the transaction that drops the last reference to it on
    /// kernels before 6.2; kube-proxy waits a second too).
    pub stale_chains: BTreeSet<String>,
    pub stale_sets: BTreeSet<String>,
}

impl Applied {
    pub fn rules(&self) -> usize {
        self.fragments.values().map(|f| f.rules()).sum::<usize>()
    }

    /// Elements each map and set holds once this is applied (the lost-state check compares).
    pub fn elements_per_map(&self) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for f in self.fragments.values() {
            for e in f.elements.iter().filter(|e| !e.map.shared()) {
                *out.entry(e.map.name()).or_default() += 1;
            }
        }
        for (map, _) in self.owners.keys() {
            *out.entry(map.name()).or_default() += 1;
        }
        out
    }

    pub fn elements(&self) -> usize {
        self.fragments
            .values()
            .map(|f| f.elements.iter().filter(|e| !e.map.shared()).count())
            .sum::<usize>()
            + self.owners.len()
    }
}

/// What a sync writes.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Input for `nft -f -` (empty: nothing to write).
    pub text: String,
    /// When the sync changes only elements: those changes (deletes first), for the netlink
    /// path; `text` holds the same as commands.
    pub elements_only: Option<Vec<ElementChange>>,
    pub full: bool,
    pub rules_written: usize,
    pub chains_written: usize,
    pub chains_deleted: usize,
    pub elements_written: usize,
}

/// One element operation of a partial sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementChange {
    Delete(MapId, Key),
    Add(Element),
}

/// The rules of a fixed (non Service) part of the table.
pub fn fixed_rules(cfg: &RenderConfig) -> Vec<(&'static str, String)> {
    let fam = cfg.family();
    let nodeport_match = if cfg.nodeport_addresses.is_empty() {
        format!("fib daddr type local {fam} daddr != {}", cfg.loopback())
    } else {
        // Loopback never, even inside a given CIDR (kube-proxy skips it too: a packet from
        // 127.0.0.1 DNATed off the node would be dropped as martian).
        format!(
            "fib daddr type local {fam} daddr != {} {fam} daddr @{}",
            cfg.loopback(),
            chains::NODEPORT_CIDRS
        )
    };
    let mut rules = vec![
        (chains::NAT_PREROUTING, format!("jump {}", chains::SERVICES)),
        (chains::NAT_OUTPUT, format!("jump {}", chains::SERVICES)),
        (
            chains::NAT_POSTROUTING,
            format!("jump {}", chains::MASQUERADING),
        ),
        (
            chains::FILTER_INPUT,
            format!("ct state new jump {}", chains::ENDPOINTS_CHECK),
        ),
        (
            chains::FILTER_PREROUTING,
            format!("ct state new jump {}", chains::FIREWALL_CHECK),
        ),
        (
            chains::FILTER_OUTPUT_PRE_DNAT,
            format!("ct state new jump {}", chains::FIREWALL_CHECK),
        ),
        (
            chains::FIREWALL_CHECK,
            format!(
                "{fam} daddr . meta l4proto . th dport vmap @{}",
                chains::FIREWALL_IPS
            ),
        ),
    ];
    if !cfg.conntrack_tcp_be_liberal {
        // Forwarded packets conntrack cannot place (out of the TCP window) would leave
        // un-NATed and reset the client's connection (kube-proxy's KUBE-FORWARD rule;
        // kubernetes#74839).
        rules.push((
            chains::FILTER_FORWARD,
            "ct state invalid drop comment \"packets conntrack marks INVALID\"".into(),
        ));
    }
    rules.extend([
        (chains::FILTER_FORWARD, format!("ct state new jump {}", chains::ENDPOINTS_CHECK)),
        (chains::FILTER_OUTPUT, format!("ct state new jump {}", chains::ENDPOINTS_CHECK)),
        (
            chains::ENDPOINTS_CHECK,
            format!(
                "{fam} daddr . meta l4proto . th dport vmap @{}",
                chains::NO_ENDPOINT_SERVICES
            ),
        ),
        (
            chains::ENDPOINTS_CHECK,
            format!(
                "{nodeport_match} meta l4proto . th dport vmap @{}",
                chains::NO_ENDPOINT_NODEPORTS
            ),
        ),
        (
            chains::SERVICES,
            format!("{fam} daddr . meta l4proto . th dport vmap @{}", chains::SERVICE_IPS),
        ),
        (
            chains::SERVICES,
            format!(
                "{nodeport_match} meta l4proto . th dport vmap @{}",
                chains::SERVICE_NODEPORTS
            ),
        ),
        (
            chains::MASQUERADING,
            format!(
                "ct status dnat {fam} saddr . {fam} daddr @{} masquerade comment \"hairpin: a pod reaching itself through a Service\"",
                chains::HAIRPIN
            ),
        ),
        (chains::MASQUERADING, format!("meta mark & {m} == 0 return", m = chains::MASQ_MARK)),
        // Cleared so a re-traversal (IPsec) does not masquerade twice.
        (chains::MASQUERADING, format!("meta mark set meta mark ^ {}", chains::MASQ_MARK)),
        (chains::MASQUERADING, "masquerade fully-random comment \"Service traffic requiring SNAT\"".into()),
        (chains::MARK_MASQ, format!("meta mark set meta mark | {}", chains::MASQ_MARK)),
        (chains::REJECT, "meta l4proto tcp reject with tcp reset".into()),
        (chains::REJECT, "reject".into()),
    ]);
    rules
}

/// Declarations of the table, its fixed chains, maps and sets (idempotent `add`s).
fn declarations(cfg: &RenderConfig, out: &mut String) {
    let fam = cfg.family();
    let t = chains::TABLE;
    let addr = cfg.addr_type();
    let _ = writeln!(
        out,
        "add table {fam} {t} {{ comment \"kpx-proxy: Service load balancing\" ; }}"
    );
    for (name, kind, hook, priority) in chains::BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {fam} {t} {name} {{ type {kind} hook {hook} priority {priority} ; policy accept ; }}"
        );
    }
    for name in chains::FIXED_CHAINS {
        let _ = writeln!(out, "add chain {fam} {t} {name}");
    }
    let maps = [
        (
            chains::SERVICE_IPS,
            format!("{addr} . inet_proto . inet_service : verdict"),
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (
            chains::SERVICE_NODEPORTS,
            "inet_proto . inet_service : verdict".into(),
            "NodePort traffic",
        ),
        (
            chains::NO_ENDPOINT_SERVICES,
            format!("{addr} . inet_proto . inet_service : verdict"),
            "Service addresses whose traffic has no endpoint: reject or drop",
        ),
        (
            chains::NO_ENDPOINT_NODEPORTS,
            "inet_proto . inet_service : verdict".into(),
            "NodePorts whose traffic has no endpoint: reject or drop",
        ),
        (
            chains::FIREWALL_IPS,
            format!("{addr} . inet_proto . inet_service : verdict"),
            "load-balancer IPs with loadBalancerSourceRanges",
        ),
    ];
    for (name, ty, comment) in maps {
        let _ = writeln!(
            out,
            "add map {fam} {t} {name} {{ type {ty} ; comment \"{comment}\" ; }}"
        );
    }
    let _ = writeln!(
        out,
        "add set {fam} {t} {} {{ type {addr} ; flags interval ; auto-merge ; comment \"--nodeport-addresses (overlapping CIDRs merged)\" ; }}",
        chains::NODEPORT_CIDRS
    );
    let _ = writeln!(
        out,
        "add set {fam} {t} {} {{ type {addr} . {addr} ; comment \"this node's endpoints: source and destination of a pod reaching itself\" ; }}",
        chains::HAIRPIN
    );
}

fn declare_shard(cfg: &RenderConfig, (protocol, shard): Shard, out: &mut String) {
    let fam = cfg.family();
    let _ = writeln!(
        out,
        "add map {fam} {} {} {{ typeof numgen random mod 1 : {fam} daddr . {} dport ; comment \"endpoints by slot: the Service chains' random pick\" ; }}",
        chains::TABLE,
        endpoint_map(protocol, shard),
        protocol.lower()
    );
}

fn declare_affinity_set(cfg: &RenderConfig, name: &str, timeout: u32, out: &mut String) {
    let _ = writeln!(
        out,
        "add set {} {} {name} {{ type {} ; flags dynamic,timeout ; timeout {timeout}s ; comment \"clients of one endpoint (sessionAffinity: ClientIP)\" ; }}",
        cfg.family(),
        chains::TABLE,
        cfg.addr_type()
    );
}

/// nft refuses comments over 128 characters, and the longest kpx writes is 50 characters of
/// text around the Service port's name: a name over 76 is cut (with `~` at the end) so that
/// a long namespace and Service name cannot make every sync fail. Names are ASCII (DNS labels).
const COMMENT_NAME_MAX: usize = 76;

fn comment_name(name: &ServicePortName) -> String {
    let mut text = name.to_string();
    if text.len() > COMMENT_NAME_MAX {
        let mut cut = COMMENT_NAME_MAX - 1;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('~');
    }
    text
}

fn destination(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The rules picking one of `endpoints` of a set chain, and their elements.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
fn pick_rules(
    cfg: &RenderConfig,
    chain: &str,
    entry: &ServiceEntry,
    endpoints: &[Endpoint],
    slots: &mut SlotAllocator,
    previous: Option<&Fragment>,
    f: &mut Fragment,
    rules: &mut Vec<String>,
) {
    let fam = cfg.family();
    let proto = entry.port.name.protocol.lower();
    let name = comment_name(&entry.port.name);
    let endpoints = &endpoints[..endpoints.len().min(chains::MAX_ENDPOINTS_PER_SET)];
    let n = endpoints.len();
    if let Some(timeout) = entry.port.affinity_seconds {
        // kube-proxy's layout for affinity: a set of recent clients per endpoint; a client
        // seen within the timeout goes back to its endpoint, others are spread and recorded.
        let sets: Vec<String> = endpoints
            .iter()
            .map(|ep| affinity_set(chain, &destination(&ep.ip, ep.port), timeout))
            .collect();
        for (ep, set) in endpoints.iter().zip(&sets) {
            rules.push(format!(
                "{fam} saddr @{set} update @{set} {{ {fam} saddr }} meta l4proto {proto} dnat {fam} to {} comment \"{name} affinity\"",
                destination(&ep.ip, ep.port)
            ));
        }
        for (i, (ep, set)) in endpoints.iter().zip(&sets).enumerate() {
            let chance = if i + 1 < n {
                format!("numgen random mod {} == 0 ", n - i)
            } else {
                String::new()
            };
            rules.push(format!(
                "{chance}update @{set} {{ {fam} saddr }} meta l4proto {proto} dnat {fam} to {} comment \"{name}\"",
                destination(&ep.ip, ep.port)
            ));
        }
        f.affinity_sets
            .extend(sets.into_iter().map(|s| (s, timeout)));
        // A set that used the slot maps before affinity was switched on gives its slots back.
        slots.free(chain);
        return;
    }
    let at = slots.get_or_allocate(chain, entry.port.name.protocol);
    let base = at.base();
    rules.push(format!(
        "meta l4proto {proto} dnat {fam} to numgen random mod {n} offset {base} map @{} comment \"{name}\"",
        endpoint_map(at.shard.0, at.shard.1)
    ));
    let map = MapId::Endpoints(at.shard.0, at.shard.1);
    // An endpoint keeps the slot it had (when it is still below N), the others fill the free
    // ones: an address swapped is one delete and one add, not a shift of every slot after it.
    let old: HashMap<(IpAddr, u16), usize> = previous
        .into_iter()
        .flat_map(|p| &p.elements)
        .filter(|e| e.map == map)
        .filter_map(|e| match (&e.key, &e.value) {
            (Key::Slot(slot), Some(Value::Endpoint(ip, port)))
                if (base..base.saturating_add(1 << chains::SLOT_BITS)).contains(slot) =>
            {
                Some(((*ip, *port), (slot - base) as usize))
            }
            _ => None,
        })
        .collect();
    let mut placed: Vec<Option<&Endpoint>> = vec![None; n];
    let mut rest = Vec::new();
    for ep in endpoints {
        match old.get(&(ep.ip, ep.port)) {
            Some(&i) if i < n && placed[i].is_none() => placed[i] = Some(ep),
            _ => rest.push(ep),
        }
    }
    let mut rest = rest.into_iter();
    for slot in placed.iter_mut().filter(|s| s.is_none()) {
        *slot = rest.next();
    }
    for (i, ep) in placed.into_iter().enumerate() {
        let Some(ep) = ep else { continue };
        f.elements.push(Element {
            map,
            key: Key::Slot(base + i as u32),
            value: Some(Value::Endpoint(ep.ip, ep.port)),
            comment: None,
        });
    }
}

fn set_chain(name: &ServicePortName, set: EndpointSet) -> String {
    match set {
        EndpointSet::Cluster => service_chain(name),
        EndpointSet::Local => local_chain(name),
    }
}

/// The fragment of one Service port: the frontend model's routes (`model/frontend.rs`),
/// rendered. A cluster IP whose sources all take one route is an element straight to the set
/// chain (its masquerade rule at the top of it); other frontends go through an `ext` chain
/// telling pods (`saddr --cluster-cidr`), the node (`fib saddr type local`) and the rest
/// apart. What no route takes to endpoints is an element of `no-endpoint-*`.
/// `previous` is what this Service port had (its endpoints keep their slots).
pub fn fragment(
    cfg: &RenderConfig,
    entry: &ServiceEntry,
    slots: &mut SlotAllocator,
    previous: Option<&Fragment>,
) -> Fragment {
    let mut f = Fragment::default();
    let model = frontend::frontends(entry, &cfg.node_config(), cfg.ipv6);
    if model.frontends.is_empty() {
        return f;
    }
    let fam = cfg.family();
    let port = &entry.port;
    let name = comment_name(&port.name);
    let proto = port.name.protocol;
    let cidr = cfg.cluster_cidr.as_deref();
    let comment: Arc<str> = Arc::from(name.as_str());
    let mut masq_rules: Vec<(EndpointSet, String)> = Vec::new();
    let mut routed: Vec<([Route; 3], String)> = Vec::new();
    // Distinct lists of allowed sources (loadBalancerSourceRanges) and their chains.
    let mut firewalls: Vec<(&[ipnet::IpNet], String)> = Vec::new();

    for fe in &model.frontends {
        let routes = fe.routes();
        // Judged before DNAT (`firewall-check` at -110) on the frontend's own address, so
        // before both a route to endpoints and a refusal. One rule per range (no anonymous
        // set: the kernel looks sets up by walking the table's list of them).
        if let Some(allowed) = &fe.allowed_sources {
            let chain = match firewalls.iter().find(|(a, _)| *a == &allowed[..]) {
                Some((_, chain)) => chain.clone(),
                None => {
                    let chain = firewall_chain(&port.name, firewalls.len());
                    firewalls.push((&allowed[..], chain.clone()));
                    chain
                }
            };
            f.elements.push(Element {
                map: MapId::FirewallIps,
                key: Key::Frontend(fe.ip, proto, fe.port),
                value: Some(Value::Goto(chain)),
                comment: Some(comment.clone()),
            });
        }
        let (dispatch_map, refuse_map, key) = match fe.kind {
            FrontendKind::NodePort => (
                MapId::ServiceNodeports,
                MapId::NoEndpointNodeports,
                Key::NodePort(proto, fe.port),
            ),
            _ => (
                MapId::ServiceIps,
                MapId::NoEndpointServices,
                Key::Frontend(fe.ip, proto, fe.port),
            ),
        };
        if let Some(refusal) = routes.iter().find_map(|r| match r {
            Route::To { .. } => None,
            Route::Reject => Some(Value::Goto(chains::REJECT.into())),
            Route::Drop => Some(Value::Drop),
        }) {
            f.elements.push(Element {
                map: refuse_map,
                key: key.clone(),
                value: Some(refusal),
                comment: Some(comment.clone()),
            });
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
        let target = if direct {
            let set = fe.from_outside.set().unwrap_or(EndpointSet::Cluster);
            let source = match masq.as_slice() {
                [true, true, true] => Some(String::new()),
                [false, true, true] => cidr.map(|c| format!(" {fam} saddr != {c}")),
                _ => None,
            };
            if let Some(source) = source {
                masq_rules.push((
                    set,
                    // No port match: only this port's `service-ips` element leads here with
                    // the cluster IP as destination (other frontends' addresses differ), and
                    // four expressions less per Service is 6% of a 10,000-Service load.
                    format!(
                        "{fam} daddr {}{source} jump {} comment \"{name} cluster IP\"",
                        fe.ip,
                        chains::MARK_MASQ
                    ),
                ));
            }
            set_chain(&port.name, set)
        } else {
            let triple = [
                fe.from_pods.clone(),
                fe.from_node.clone(),
                fe.from_outside.clone(),
            ];
            match routed.iter().find(|(t, _)| *t == triple) {
                Some((_, chain)) => chain.clone(),
                None => {
                    let chain = external_chain(&port.name, routed.len());
                    routed.push((triple, chain.clone()));
                    chain
                }
            }
        };
        f.elements.push(Element {
            map: dispatch_map,
            key,
            value: Some(Value::Goto(target)),
            comment: Some(comment.clone()),
        });
    }

    for (allowed, chain) in &firewalls {
        let mut rules: Vec<String> = allowed
            .iter()
            .map(|net| format!("{fam} saddr {net} return"))
            .collect();
        rules.push(format!(
            "drop comment \"{name}: source not in loadBalancerSourceRanges\""
        ));
        f.chains.push(Chain::new(chain.clone(), rules));
    }

    for ([pods, node_route, outside], chain) in &routed {
        let mut rules = Vec::new();
        let goto =
            |route: &Route| set_chain(&port.name, route.set().unwrap_or(EndpointSet::Cluster));
        if let (Some(cidr), Route::To { .. }) = (cidr, pods) {
            if pods != outside {
                if pods.masquerade() {
                    rules.push(format!("{fam} saddr {cidr} jump {} comment \"masquerade pod traffic for {name} external destinations\"", chains::MARK_MASQ));
                }
                rules.push(format!("{fam} saddr {cidr} goto {} comment \"pod traffic for {name} external destinations\"", goto(pods)));
            }
        }
        if node_route != outside && node_route.set().is_some() {
            if node_route.masquerade() {
                rules.push(format!("fib saddr type local jump {} comment \"masquerade node traffic for {name} external destinations\"", chains::MARK_MASQ));
            }
            rules.push(format!("fib saddr type local goto {} comment \"node traffic for {name} external destinations\"", goto(node_route)));
        }
        if outside.set().is_some() {
            if outside.masquerade() {
                rules.push(format!(
                    "jump {} comment \"masquerade traffic for {name} external destinations\"",
                    chains::MARK_MASQ
                ));
            }
            rules.push(format!("goto {}", goto(outside)));
        }
        f.chains.push(Chain::new(chain.clone(), rules));
    }

    for (set, endpoints) in &model.sets {
        let chain = set_chain(&port.name, *set);
        let mut rules: Vec<String> = masq_rules
            .iter()
            .filter(|(s, _)| s == set)
            .map(|(_, r)| r.clone())
            .collect();
        pick_rules(
            cfg, &chain, entry, endpoints, slots, previous, &mut f, &mut rules,
        );
        f.chains.push(Chain::new(chain, rules));
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
        hairpin.insert(ep.ip);
    }
    f.elements.extend(hairpin.into_iter().map(|ip| Element {
        map: MapId::Hairpin,
        key: Key::Pair(ip, ip),
        value: None,
        comment: None,
    }));
    f
}

/// Frees what `f` allocated that `keep` does not use any more.
fn free_slots(f: &Fragment, keep: Option<&Fragment>, slots: &mut SlotAllocator) {
    for chain in &f.chains {
        if !keep.is_some_and(|k| k.chains.iter().any(|c| c.name == chain.name)) {
            slots.free(&chain.name);
        }
    }
}

fn write_element_commands(
    cfg: &RenderConfig,
    verb: &str,
    elements: &[(MapId, String)],
    out: &mut String,
) {
    let items: Vec<(MapId, &dyn std::fmt::Display)> = elements
        .iter()
        .map(|(m, t)| (*m, t as &dyn std::fmt::Display))
        .collect();
    write_elements(cfg, verb, items, out);
}

/// Elements grouped per map, in chunks: one command per element would make nft's parse the
/// cost. Written straight into `out` (100,000 small strings joined would stay in the heap).
fn write_elements(
    cfg: &RenderConfig,
    verb: &str,
    mut items: Vec<(MapId, &dyn std::fmt::Display)>,
    out: &mut String,
) {
    items.sort_by_key(|(m, _)| *m);
    let mut i = 0;
    while i < items.len() {
        let map = items[i].0;
        let _ = write!(
            out,
            "{verb} element {} {} {} {{ ",
            cfg.family(),
            chains::TABLE,
            map.name()
        );
        let mut n = 0;
        while i < items.len() && items[i].0 == map && n < 10_000 {
            if n > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{}", items[i].1);
            i += 1;
            n += 1;
        }
        out.push_str(" }\n");
    }
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.key)?;
        if let Some(c) = &self.comment {
            write!(f, " comment \"{c}\"")?;
        }
        if let Some(v) = &self.value {
            write!(f, " : {v}")?;
        }
        Ok(())
    }
}

fn element_text(e: &Element) -> String {
    let comment = e
        .comment
        .as_ref()
        .map(|c| format!(" comment \"{c}\""))
        .unwrap_or_default();
    match &e.value {
        Some(v) => format!("{}{comment} : {v}", e.key),
        None => format!("{}{comment}", e.key),
    }
}

/// Names found in the table before a full sync (read back by the backend).
#[derive(Debug, Clone, Default)]
pub struct Existing {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

/// The plan from `state`: everything when `full` (removing what `existing` has that the plan
/// does not), else what `changes` touched since `applied`. Updates `applied` to what the
/// kernel holds once the plan is applied (if applying fails, the caller throws it away and
/// the next sync is full).
pub fn plan(
    cfg: &RenderConfig,
    state: &ProxyState,
    changes: &Changes,
    full: bool,
    existing: &Existing,
    applied: &mut Applied,
) -> Plan {
    if full {
        full_plan(cfg, state, existing, applied)
    } else {
        partial_plan(cfg, state, changes, applied)
    }
}

/// The whole plan from empty (the conformance runner's and the benchmark's input).
pub fn full_text(cfg: &RenderConfig, state: &ProxyState) -> String {
    full_plan(cfg, state, &Existing::default(), &mut Applied::default()).text
}

fn full_plan(
    cfg: &RenderConfig,
    state: &ProxyState,
    existing: &Existing,
    applied: &mut Applied,
) -> Plan {
    let fam = cfg.family();
    let t = chains::TABLE;
    // Stale names of the old table are foreign to this plan and removed like foreign ones.
    let mut fresh = Applied::default();
    for (name, entry) in &state.entries {
        let f = fragment(cfg, entry, &mut fresh.slots, None);
        for e in f.elements.iter().filter(|e| e.map.shared()) {
            fresh
                .owners
                .entry((e.map, e.key.clone()))
                .or_default()
                .insert(name.clone(), (e.value.clone(), e.comment.clone()));
        }
        fresh.fragments.insert(name.clone(), Arc::new(f));
    }
    fresh.shards_declared = fresh.slots.shards();

    let mut out = String::new();
    declarations(cfg, &mut out);
    for shard in &fresh.shards_declared {
        declare_shard(cfg, *shard, &mut out);
    }
    let mut planned_chains: BTreeSet<&str> = chains::BASE_CHAINS.iter().map(|c| c.0).collect();
    planned_chains.extend(chains::FIXED_CHAINS);
    let mut planned_sets: BTreeSet<String> = [
        chains::SERVICE_IPS,
        chains::SERVICE_NODEPORTS,
        chains::NO_ENDPOINT_SERVICES,
        chains::NO_ENDPOINT_NODEPORTS,
        chains::FIREWALL_IPS,
        chains::NODEPORT_CIDRS,
        chains::HAIRPIN,
    ]
    .map(String::from)
    .into();
    planned_sets.extend(
        fresh
            .shards_declared
            .iter()
            .map(|(p, k)| endpoint_map(*p, *k)),
    );
    let mut service_chains: Vec<&Chain> = Vec::new();
    for f in fresh.fragments.values() {
        for (set, timeout) in &f.affinity_sets {
            // Not flushed: it holds the clients' affinity, which must survive a resync.
            declare_affinity_set(cfg, set, *timeout, &mut out);
            planned_sets.insert(set.clone());
        }
        service_chains.extend(&f.chains);
    }
    for c in &service_chains {
        let _ = writeln!(out, "add chain {fam} {t} {}", c.name);
        planned_chains.insert(&c.name);
    }
    // Everything emptied first (rules unbound from the maps before the maps refill: the
    // kernel walks a map's bindings for every element added), then refilled.
    for chain in &planned_chains {
        let _ = writeln!(out, "flush chain {fam} {t} {chain}");
    }
    let mut chains_deleted = 0;
    let mut stale_chains = BTreeSet::new();
    for chain in existing
        .chains
        .iter()
        .filter(|c| !planned_chains.contains(c.as_str()))
    {
        let _ = writeln!(out, "flush chain {fam} {t} {chain}");
        stale_chains.insert(chain.clone());
        chains_deleted += 1;
    }
    for map in [
        chains::SERVICE_IPS,
        chains::SERVICE_NODEPORTS,
        chains::NO_ENDPOINT_SERVICES,
        chains::NO_ENDPOINT_NODEPORTS,
        chains::FIREWALL_IPS,
    ] {
        let _ = writeln!(out, "flush map {fam} {t} {map}");
    }
    for set in [chains::NODEPORT_CIDRS, chains::HAIRPIN] {
        let _ = writeln!(out, "flush set {fam} {t} {set}");
    }
    for (protocol, shard) in &fresh.shards_declared {
        let _ = writeln!(
            out,
            "flush map {fam} {t} {}",
            endpoint_map(*protocol, *shard)
        );
    }
    let stale_sets: BTreeSet<String> = existing
        .sets
        .iter()
        .filter(|s| !planned_sets.contains(*s))
        .cloned()
        .collect();
    // Emptied now where their kind is known from the name (a partial sync may declare such a
    // shard again before housekeeping deletes it; `flush set` refuses maps and vice versa).
    for set in &stale_sets {
        if set.starts_with("endpoints-") {
            let _ = writeln!(out, "flush map {fam} {t} {set}");
        } else if set.starts_with("aff-") {
            let _ = writeln!(out, "flush set {fam} {t} {set}");
        }
    }

    // Elements before rules (a rule binding to a map walks its elements once, an element
    // added walks every binding).
    let mut shared: Vec<_> = fresh.owners.iter().collect();
    shared.sort_by(|a, b| a.0.cmp(b.0));
    let shared: Vec<Element> = shared
        .into_iter()
        .filter_map(|((map, key), owners)| {
            let (_, (value, comment)) = owners.iter().next()?;
            Some(Element {
                map: *map,
                key: key.clone(),
                value: value.clone(),
                comment: comment.clone(),
            })
        })
        .collect();
    let mut elements: Vec<(MapId, &dyn std::fmt::Display)> = Vec::new();
    for f in fresh.fragments.values() {
        elements.extend(
            f.elements
                .iter()
                .filter(|e| !e.map.shared())
                .map(|e| (e.map, e as &dyn std::fmt::Display)),
        );
    }
    elements.extend(shared.iter().map(|e| (e.map, e as &dyn std::fmt::Display)));
    let elements_written = elements.len();
    write_elements(cfg, "add", elements, &mut out);
    let nodeport_cidrs: Vec<&String> = cfg.nodeport_addresses.iter().collect();
    if !nodeport_cidrs.is_empty() {
        let list: Vec<&str> = nodeport_cidrs.iter().map(|s| s.as_str()).collect();
        let _ = writeln!(
            out,
            "add element {fam} {t} {} {{ {} }}",
            chains::NODEPORT_CIDRS,
            list.join(", ")
        );
    }

    let mut rules_written = 0;
    for (chain, rule) in fixed_rules(cfg) {
        let _ = writeln!(out, "add rule {fam} {t} {chain} {rule}");
        rules_written += 1;
    }
    for c in &service_chains {
        for rule in &c.rules {
            let _ = writeln!(out, "add rule {fam} {t} {} {rule}", c.name);
            rules_written += 1;
        }
    }
    let chains_written = service_chains.len();
    for f in fresh.fragments.values_mut() {
        *f = Arc::new(f.slimmed());
    }
    fresh.stale_chains = stale_chains;
    fresh.stale_sets = stale_sets;
    *applied = fresh;
    Plan {
        text: out,
        elements_only: None,
        full: true,
        rules_written,
        chains_written,
        chains_deleted,
        elements_written,
    }
}

/// Rules of the fixed part (for the totals).
pub fn fixed_rule_count(cfg: &RenderConfig) -> usize {
    fixed_rules(cfg).len()
}

fn partial_plan(
    cfg: &RenderConfig,
    state: &ProxyState,
    changes: &Changes,
    applied: &mut Applied,
) -> Plan {
    let fam = cfg.family();
    let t = chains::TABLE;
    let mut declare = String::new();
    let mut flushes = String::new();
    let mut rule_text = String::new();
    let mut changed_elements: Vec<ElementChange> = Vec::new();
    let mut rules_written = 0;
    let mut chains_written = 0;
    let mut chains_deleted = 0;
    let mut structural = false;
    // Shared keys touched, with their effective value before (`None`: absent).
    let mut touched: HashMap<(MapId, Key), Option<Owned>> = HashMap::new();

    let names: BTreeSet<&ServicePortName> = changes
        .removed
        .keys()
        .chain(changes.changed.iter())
        .collect();
    for name in names {
        let old = applied.fragments.get(name).cloned();
        let new = state
            .entries
            .get(name)
            .map(|entry| fragment(cfg, entry, &mut applied.slots, old.as_deref()));
        if let Some(old) = &old {
            free_slots(old, new.as_ref(), &mut applied.slots);
        }
        let empty = Fragment::default();
        let (o, n) = (
            old.as_deref().unwrap_or(&empty),
            new.as_ref().unwrap_or(&empty),
        );
        let n_kept = new.as_ref().map(Fragment::slimmed);
        if Some(o) == n_kept.as_ref() || (n_kept.is_none() && o == &empty) {
            continue;
        }
        // Chains: new ones declared, changed ones rewritten, gone ones flushed now and
        // deleted later.
        for c in &n.chains {
            let before = o.chains.iter().find(|x| x.name == c.name);
            if before.is_some_and(|b| c.same_rules(b)) {
                continue;
            }
            structural = true;
            chains_written += 1;
            applied.stale_chains.remove(&c.name);
            if before.is_none() {
                let _ = writeln!(declare, "add chain {fam} {t} {}", c.name);
            }
            let _ = writeln!(flushes, "flush chain {fam} {t} {}", c.name);
            for rule in &c.rules {
                let _ = writeln!(rule_text, "add rule {fam} {t} {} {rule}", c.name);
                rules_written += 1;
            }
        }
        for c in o
            .chains
            .iter()
            .filter(|c| !n.chains.iter().any(|x| x.name == c.name))
        {
            structural = true;
            chains_deleted += 1;
            let _ = writeln!(flushes, "flush chain {fam} {t} {}", c.name);
            applied.stale_chains.insert(c.name.clone());
        }
        for (set, timeout) in &n.affinity_sets {
            if !o.affinity_sets.iter().any(|(s, _)| s == set) {
                structural = true;
                applied.stale_sets.remove(set);
                declare_affinity_set(cfg, set, *timeout, &mut declare);
            }
        }
        for (set, _) in o
            .affinity_sets
            .iter()
            .filter(|(s, _)| !n.affinity_sets.iter().any(|(x, _)| x == s))
        {
            structural = true;
            applied.stale_sets.insert(set.clone());
        }
        // Elements: the endpoint slots are this port's own; shared keys by ownership.
        // Keyed by map and key: two endpoint sets of one port may sit at the same slot
        // number in different shards.
        let old_own: HashMap<(MapId, &Key), &Element> = o
            .elements
            .iter()
            .filter(|e| !e.map.shared())
            .map(|e| ((e.map, &e.key), e))
            .collect();
        let new_own: HashMap<(MapId, &Key), &Element> = n
            .elements
            .iter()
            .filter(|e| !e.map.shared())
            .map(|e| ((e.map, &e.key), e))
            .collect();
        for (key, e) in &old_own {
            match new_own.get(key) {
                Some(ne) if ne.value == e.value => {}
                _ => changed_elements.push(ElementChange::Delete(e.map, e.key.clone())),
            }
        }
        for (key, e) in &new_own {
            match old_own.get(key) {
                Some(oe) if oe.value == e.value => {}
                _ => changed_elements.push(ElementChange::Add((*e).clone())),
            }
        }
        for e in o.elements.iter().filter(|e| e.map.shared()) {
            let k = (e.map, e.key.clone());
            let before = effective(&applied.owners, &k);
            touched.entry(k.clone()).or_insert(before);
            if let Some(owners) = applied.owners.get_mut(&k) {
                owners.remove(name);
                if owners.is_empty() {
                    applied.owners.remove(&k);
                }
            }
        }
        for e in n.elements.iter().filter(|e| e.map.shared()) {
            let k = (e.map, e.key.clone());
            let before = effective(&applied.owners, &k);
            touched.entry(k.clone()).or_insert(before);
            applied
                .owners
                .entry(k)
                .or_default()
                .insert(name.clone(), (e.value.clone(), e.comment.clone()));
        }
        match n_kept {
            Some(f) => {
                applied.fragments.insert(name.clone(), Arc::new(f));
            }
            None => {
                applied.fragments.remove(name);
            }
        }
    }
    let mut touched: Vec<_> = touched.into_iter().collect();
    touched.sort_by(|a, b| a.0.cmp(&b.0));
    for ((map, key), before) in touched {
        let after = effective(&applied.owners, &(map, key.clone()));
        if before == after {
            continue;
        }
        if before.is_some() {
            changed_elements.push(ElementChange::Delete(map, key.clone()));
        }
        if let Some((value, comment)) = after {
            changed_elements.push(ElementChange::Add(Element {
                map,
                key,
                value,
                comment,
            }));
        }
    }
    // New shards' maps.
    let mut shards = String::new();
    for shard in applied.slots.shards() {
        if !applied.shards_declared.insert(shard) {
            continue;
        }
        applied.stale_sets.remove(&endpoint_map(shard.0, shard.1));
        declare_shard(cfg, shard, &mut shards);
        structural = true;
    }

    // Deletes before adds (a key whose value changed is deleted, then added).
    changed_elements.sort_by_key(|c| matches!(c, ElementChange::Add(_)));
    let deletes: Vec<(MapId, String)> = changed_elements
        .iter()
        .filter_map(|c| match c {
            ElementChange::Delete(map, key) => Some((*map, key.to_string())),
            ElementChange::Add(_) => None,
        })
        .collect();
    let adds: Vec<(MapId, String)> = changed_elements
        .iter()
        .filter_map(|c| match c {
            ElementChange::Add(e) => Some((e.map, element_text(e))),
            ElementChange::Delete(..) => None,
        })
        .collect();
    let mut out = String::new();
    out.push_str(&shards);
    out.push_str(&declare);
    // Deleted elements first: they may be the last references to chains flushed below.
    write_element_commands(cfg, "delete", &deletes, &mut out);
    out.push_str(&flushes);
    write_element_commands(cfg, "add", &adds, &mut out);
    out.push_str(&rule_text);
    let elements_written = changed_elements.len();
    Plan {
        elements_only: (!structural && !changed_elements.is_empty()).then_some(changed_elements),
        text: out,
        full: false,
        rules_written,
        chains_written,
        chains_deleted,
        elements_written,
    }
}

/// The value a shared key has in the kernel: its first owner's (`None` if nobody has it).
fn effective(owners: &Owners, key: &(MapId, Key)) -> Option<Owned> {
    owners.get(key).and_then(|o| o.values().next().cloned())
}

/// Deletes of the stale sets, then of the stale chains: two transactions, because a foreign
/// map may hold verdicts jumping to a chain and the kernel refuses deleting that chain in the
/// transaction that deletes the map (EBUSY). (`delete set` takes maps too; `flush set` does
/// not, so a full sync cannot empty a foreign map whose kind it does not know.)
pub fn stale_text(cfg: &RenderConfig, applied: &Applied) -> [String; 2] {
    let sets: Vec<String> = applied.stale_sets.iter().cloned().collect();
    let chains: Vec<String> = applied.stale_chains.iter().cloned().collect();
    stale_text_of(cfg, &sets, &chains)
}

/// [`stale_text`] of some of the stale names (those whose grace second is over).
pub fn stale_text_of(
    cfg: &RenderConfig,
    sets: &[String],
    chains_to_delete: &[String],
) -> [String; 2] {
    let mut sets_text = String::new();
    for set in sets {
        let _ = writeln!(
            sets_text,
            "delete set {} {} {set}",
            cfg.family(),
            chains::TABLE
        );
    }
    let mut chains_text = String::new();
    for chain in chains_to_delete {
        let _ = writeln!(
            chains_text,
            "delete chain {} {} {chain}",
            cfg.family(),
            chains::TABLE
        );
    }
    [sets_text, chains_text]
}

#[cfg(test)]
mod tests;
