//! kube-proxy's nftables layout for a set of ClusterIP Services, as one `nft -f` transaction:
//! what kube-proxy (`--proxy-mode nftables`) writes on its first full sync, so the benchmarks
//! can load it beside kpx's layout for the same Services.
//!
//! Generated from the shape kube-proxy documents and programs (kubernetes
//! `pkg/proxy/nftables/proxier.go`: `setupNFTables`, `syncProxyRules`,
//! `writeServiceToEndpointRules`, `hashAndTruncate`; the expected transactions in its
//! `proxier_test.go`); no code is copied. What matters for the cost is kept exactly: table
//! `ip kube-proxy`, its base chains (numeric priorities: nft 1.0.6 rejects `dstnat` on
//! input/forward/output), one `service-<hash>-<ns>/<name>/<proto>/<port>` chain per Service
//! port whose pick is an inline `numgen random mod N vmap { 0 : goto endpoint-…, … }` (one
//! anonymous set per Service, which is what makes the kernel slow: it finds sets by walking
//! the table's list), one `endpoint-<hash>-…__<ip>/<port>` chain per endpoint, and one
//! command per object as knftables writes a transaction (`add chain` + `flush chain` for every
//! chain it ensures, one `add element` per element).
//!
//! Left out, as the benchmark's Services do not use them: NodePorts, external and
//! load-balancer IPs (`external-…` and `firewall-…` chains), session affinity sets, traffic
//! policies Local (`local-…` chains). kube-proxy's own `nft list chains` / `nft list sets`
//! before each transaction (its stale-chain check) is not part of the text either.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use sha2::{Digest, Sha256};

/// One Service port: its name parts, ClusterIP, port and endpoints (in kube-proxy's order).
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name (`http`), or empty for an unnamed port.
    pub port_name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
}

/// The node settings the layout depends on.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub ipv6: bool,
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded (kube-proxy's
    /// `LocalTrafficDetector` by cluster CIDR); `None` writes no such rule.
    pub cluster_cidr: Option<String>,
    /// The ServiceCIDRs: traffic to an unallocated ClusterIP is dropped.
    pub service_cidr: Option<String>,
}

/// knftables' `NameLengthMax` (256) less kube-proxy's longest chain prefix and its hyphen (16).
const CHAIN_NAME_BASE_MAX: usize = 240;
/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14), printed as `%#08x`.
const MASQ_MARK: &str = "0x004000";

/// kube-proxy's `hashAndTruncate`: the first 8 characters of the base32 (RFC 4648, upper case)
/// SHA-256 of `name`, a hyphen, then `name`, cut to 240 characters with `...` at the end.
pub fn hash_and_truncate(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    // 8 base32 characters are the first 40 bits: 5 bytes.
    let mut out = data_encoding::BASE32.encode(&digest[..5]);
    out.push('-');
    out.push_str(name);
    if out.len() > CHAIN_NAME_BASE_MAX {
        // Every character is ASCII (names, protocol, digits, dots, slashes), so any byte
        // index is a character boundary.
        out.truncate(CHAIN_NAME_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

impl ServicePort {
    /// `ns/name/proto/port` (kube-proxy's `servicePortChainNameBase` before hashing).
    fn base(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace, self.name, self.protocol, self.port_name
        )
    }

    /// kube-proxy's `ServicePortName.String()`: `ns/name:port` (`ns/name` when unnamed).
    pub fn display_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// The cluster traffic policy chain (`service-…`).
    pub fn service_chain(&self) -> String {
        format!("service-{}", hash_and_truncate(&self.base()))
    }

    /// An endpoint's chain (`endpoint-…__<ip>/<port>`, an IPv6 address's colons as dots).
    pub fn endpoint_chain(&self, endpoint: SocketAddr) -> String {
        let ip = endpoint.ip().to_string().replace(':', ".");
        format!(
            "endpoint-{}",
            hash_and_truncate(&format!("{}__{ip}/{}", self.base(), endpoint.port()))
        )
    }
}

/// kube-proxy's base chains (`nftablesBaseChains`): name, type, hook, priority. Priorities as
/// numbers: dstnat is -100, srcnat 100.
const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// kube-proxy's jumps from base chains (`nftablesJumpChains`): to, from, match.
const JUMPS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    ("firewall-check", "filter-prerouting", "ct state new "),
    ("firewall-check", "filter-output", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    (
        "cluster-ips-check",
        "filter-output-post-dnat",
        "ct state new ",
    ),
];

/// Builds the transaction text, remembering which chains it has ensured (kube-proxy's
/// `ensureChain`: `add chain` then `flush chain`, once per chain per transaction).
struct Tx {
    out: String,
    family: &'static str,
    ensured: std::collections::HashSet<String>,
}

impl Tx {
    fn line(&mut self, command: std::fmt::Arguments<'_>) {
        // Writing into a String cannot fail.
        let _ = self.out.write_fmt(command);
        self.out.push('\n');
    }

    fn ensure_chain(&mut self, chain: &str) {
        if self.ensured.insert(chain.to_string()) {
            let f = self.family;
            self.line(format_args!("add chain {f} kube-proxy {chain}"));
            self.line(format_args!("flush chain {f} kube-proxy {chain}"));
        }
    }

    fn rule(&mut self, chain: &str, rule: &str) {
        let f = self.family;
        self.line(format_args!("add rule {f} kube-proxy {chain} {rule}"));
    }
}

/// kube-proxy's first full sync of `services` into an empty `ip kube-proxy` (or `ip6`) table.
pub fn full_sync(layout: &Layout, services: &[ServicePort]) -> String {
    let (f, addr, no_localhost) = if layout.ipv6 {
        ("ip6", "ipv6_addr", "ip6 daddr != ::1")
    } else {
        ("ip", "ipv4_addr", "ip daddr != 127.0.0.0/8")
    };
    let mut tx = Tx {
        out: String::with_capacity(services.len() * 2048),
        family: f,
        ensured: Default::default(),
    };
    tx.line(format_args!(
        "add table {f} kube-proxy {{ comment \"rules for kube-proxy\" ; }}"
    ));
    // The first sync of a kube-proxy process recreates the base chains (add, then delete).
    for (name, ..) in BASE_CHAINS {
        tx.line(format_args!("add chain {f} kube-proxy {name}"));
        tx.line(format_args!("delete chain {f} kube-proxy {name}"));
    }
    for (name, kind, hook, priority) in BASE_CHAINS {
        tx.line(format_args!(
            "add chain {f} kube-proxy {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        ));
        tx.line(format_args!("flush chain {f} kube-proxy {name}"));
    }
    for (to, from, matching) in JUMPS {
        tx.ensure_chain(to);
        tx.rule(from, &format!("{matching}jump {to}"));
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        tx.ensure_chain(chain);
    }
    tx.rule(
        "mark-for-masquerade",
        &format!("mark set mark or {MASQ_MARK}"),
    );
    tx.rule("masquerading", &format!("mark and {MASQ_MARK} == 0 return"));
    tx.rule("masquerading", &format!("mark set mark xor {MASQ_MARK}"));
    tx.rule("masquerading", "masquerade fully-random");
    tx.line(format_args!(
        "add set {f} kube-proxy cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"
    ));
    tx.rule(
        "cluster-ips-check",
        &format!("{f} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
    );
    if let Some(cidr) = &layout.service_cidr {
        tx.rule(
            "cluster-ips-check",
            &format!(
                "{f} daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
            ),
        );
    }
    // Every address accepts NodePorts (no --nodeport-addresses): the set is made and deleted.
    tx.line(format_args!(
        "add set {f} kube-proxy nodeport-ips {{ type {addr} ; comment \"IPs that accept NodePort traffic\" ; }}"
    ));
    tx.line(format_args!("delete set {f} kube-proxy nodeport-ips"));
    tx.line(format_args!(
        "add map {f} kube-proxy no-endpoint-services {{ type {addr} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    ));
    tx.line(format_args!(
        "add map {f} kube-proxy no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    ));
    tx.line(format_args!(
        "add chain {f} kube-proxy reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    ));
    tx.line(format_args!("flush chain {f} kube-proxy reject-chain"));
    tx.rule("reject-chain", "reject");
    tx.rule(
        "service-endpoints-check",
        &format!("{f} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    );
    tx.rule(
        "nodeport-endpoints-check",
        &format!("{no_localhost} meta l4proto . th dport vmap @no-endpoint-nodeports"),
    );
    tx.line(format_args!(
        "add map {f} kube-proxy firewall-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    ));
    tx.rule(
        "firewall-check",
        &format!("{f} daddr . meta l4proto . th dport vmap @firewall-ips"),
    );
    tx.line(format_args!(
        "add map {f} kube-proxy service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    ));
    tx.line(format_args!(
        "add map {f} kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    ));
    tx.rule(
        "services",
        &format!("{f} daddr . meta l4proto . th dport vmap @service-ips"),
    );
    tx.rule(
        "services",
        &format!(
            "fib daddr type local {no_localhost} meta l4proto . th dport vmap @service-nodeports"
        ),
    );
    tx.line(format_args!("flush set {f} kube-proxy cluster-ips"));
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        tx.line(format_args!("flush map {f} kube-proxy {map}"));
    }
    for svc in services {
        service_port(&mut tx, layout, svc);
    }
    tx.out
}

/// One Service port's part of `syncProxyRules` (ClusterIP, cluster traffic policy).
fn service_port(tx: &mut Tx, layout: &Layout, svc: &ServicePort) {
    let f = tx.family;
    let (vip, proto, port) = (svc.cluster_ip, svc.protocol, svc.port);
    let chain = svc.service_chain();
    let endpoints: Vec<(SocketAddr, String)> = svc
        .endpoints
        .iter()
        .map(|&ep| (ep, svc.endpoint_chain(ep)))
        .collect();
    for (_, ep_chain) in &endpoints {
        tx.ensure_chain(ep_chain);
    }
    if !endpoints.is_empty() {
        tx.ensure_chain(&chain);
    }
    tx.line(format_args!(
        "add element {f} kube-proxy cluster-ips {{ {vip} }}"
    ));
    if endpoints.is_empty() {
        tx.line(format_args!(
            "add element {f} kube-proxy no-endpoint-services {{ {vip} . {proto} . {port} comment \"{}\" : goto reject-chain }}",
            svc.display_name()
        ));
        return;
    }
    tx.line(format_args!(
        "add element {f} kube-proxy service-ips {{ {vip} . {proto} . {port} : goto {chain} }}"
    ));
    if let Some(cidr) = &layout.cluster_cidr {
        tx.rule(
            &chain,
            &format!(
                "{f} daddr {vip} {proto} dport {port} {f} saddr != {cidr} jump mark-for-masquerade"
            ),
        );
    }
    let picks: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (_, ep_chain))| format!("{i} : goto {ep_chain}"))
        .collect();
    tx.rule(
        &chain,
        &format!(
            "numgen random mod {} vmap {{ {} }}",
            endpoints.len(),
            picks.join(" , ")
        ),
    );
    for (ep, ep_chain) in &endpoints {
        tx.rule(
            ep_chain,
            &format!("{f} saddr {} jump mark-for-masquerade", ep.ip()),
        );
        // `dnat to 10.0.0.1:80` / `dnat to [fd00::1]:80`: SocketAddr prints both so.
        tx.rule(ep_chain, &format!("meta l4proto {proto} dnat to {ep}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, vip: &str, endpoints: &[&str]) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: "p80".into(),
            protocol: "tcp",
            cluster_ip: vip.parse().expect("vip"),
            port: 80,
            endpoints: endpoints
                .iter()
                .map(|e| e.parse().expect("endpoint"))
                .collect(),
        }
    }

    #[test]
    fn chain_names_match_kube_proxys() {
        // The names kube-proxy's own tests expect (pkg/proxy/nftables/proxier_test.go).
        let s1 = svc("ns1", "svc1", "172.30.0.41", &["10.180.0.1:80"]);
        assert_eq!(s1.service_chain(), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            s1.endpoint_chain("10.180.0.1:80".parse().expect("ep")),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let s2 = svc("ns2", "svc2", "172.30.0.42", &[]);
        assert_eq!(s2.service_chain(), "service-42NFTM6N-ns2/svc2/tcp/p80");
        assert_eq!(
            s1.endpoint_chain("[fd00:10:180::1]:80".parse().expect("ep")),
            "endpoint-ZVRFLKHO-ns1/svc1/tcp/p80__fd00.10.180..1/80"
        );
    }

    #[test]
    fn long_names_are_cut_with_dots() {
        let long = "n".repeat(300);
        let cut = hash_and_truncate(&long);
        assert_eq!(cut.len(), CHAIN_NAME_BASE_MAX);
        assert!(cut.ends_with("nnn..."), "{cut}");
    }

    #[test]
    fn a_service_is_a_numgen_vmap_over_endpoint_chains() {
        let layout = Layout {
            cluster_cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        };
        let text = full_sync(
            &layout,
            &[
                svc(
                    "ns4",
                    "svc4",
                    "172.30.0.44",
                    &["10.180.0.4:80", "10.180.0.5:80"],
                ),
                svc("ns6", "svc6", "172.30.0.46", &[]),
            ],
        );
        for line in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check",
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x004000",
            "add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80",
            "add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment \"ns6/svc6:p80\" : goto reject-chain }",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // A chain is ensured once, though three base chains jump to it.
        assert_eq!(
            text.lines()
                .filter(|l| *l == "add chain ip kube-proxy service-endpoints-check")
                .count(),
            1
        );
        // No service chain for the Service without endpoints.
        assert!(!text.contains("ns6/svc6/tcp/p80 "), "{text}");
    }

    #[test]
    fn ipv6_uses_ip6_and_brackets() {
        let text = full_sync(
            &Layout {
                ipv6: true,
                ..Default::default()
            },
            &[svc(
                "ns1",
                "svc1",
                "fd00:10:96::1",
                &["[fd00:10:180::1]:80"],
            )],
        );
        assert!(text.contains("add table ip6 kube-proxy"));
        assert!(text.contains(
            "endpoint-ZVRFLKHO-ns1/svc1/tcp/p80__fd00.10.180..1/80 meta l4proto tcp dnat to [fd00:10:180::1]:80"
        ));
        assert!(
            text.contains("ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports")
        );
        assert!(!text.contains(" ip daddr"), "{text}");
    }
}
