//! Services as the proxy sees them: one [`ServicePort`] per port of a Service, with every
//! address it is reachable on. Input that cannot be used is skipped with a [`Skipped`] naming
//! the object and the field, never a panic; the rest of the Service (and of the cluster) still
//! syncs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use k8s_openapi::api::core::v1::Service;

use super::refuse::{self, Protected, Refusal};

/// Services carrying this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services carrying this label (any value) are not proxied at all: their clients resolve
/// the endpoints themselves (kube-proxy's `LabelServiceProxyName`'s sibling,
/// `v1.IsHeadlessService`, and the e2e case "should implement service.kubernetes.io/headless").
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label selector of the proxy's Service watch, as kube-proxy's
/// (`cmd/kube-proxy/app/server.go`: `labelSelector` with `!service-proxy-name` and
/// `!headless`), so the API server does not even send Services that are not ours; a Service
/// gaining either label is delivered as deleted. `service_ports` checks them again, for
/// watches without a selector.
pub const SERVICE_WATCH_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// As iptables and conntrack name it.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service: `namespace/name:port-name/protocol` (kube-proxy's key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: NamespacedName,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.service, self.protocol)
        } else {
            write!(f, "{}:{}/{}", self.service, self.port, self.protocol)
        }
    }
}

/// Everything the backends need to know about one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` that could be read, both families (type LoadBalancer
    /// only: no other type has load-balancer IPs).
    pub source_ranges: Vec<IpNet>,
    /// The Service lists source ranges (even if none could be read: then no source may
    /// connect to its load-balancer IPs — failing closed on input kube-apiserver refuses).
    pub source_ranges_given: bool,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity_seconds: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Reachable from outside the cluster (NodePort, external or load-balancer IPs).
    pub fn is_external(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// Input the proxy could not use: which object, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub kind: &'static str,
    pub object: String,
    pub field: String,
    pub reason: String,
    /// Set when a usable address was refused on purpose (`refuse.rs`), not unreadable.
    pub refusal: Option<Refusal>,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.kind, self.object, self.field, self.reason
        )
    }
}

fn skipped(name: &NamespacedName, field: impl Into<String>, reason: impl Into<String>) -> Skipped {
    Skipped {
        kind: "Service",
        object: name.to_string(),
        field: field.into(),
        reason: reason.into(),
        refusal: None,
    }
}

/// Drops the external or load-balancer IPs this node must never own (`refuse::frontend`),
/// each reported.
fn refuse_frontends(
    ips: Vec<IpAddr>,
    field: &str,
    name: &NamespacedName,
    protected: &Protected,
    skips: &mut Vec<Skipped>,
) -> Vec<IpAddr> {
    ips.into_iter()
        .enumerate()
        .filter_map(|(i, ip)| match refuse::frontend(ip, protected) {
            None => Some(ip),
            Some(why) => {
                skips.push(Skipped {
                    refusal: Some(why),
                    ..skipped(
                        name,
                        format!("{field}[{i}]"),
                        format!("{ip} {}", why.explain()),
                    )
                });
                None
            }
        })
        .collect()
}

/// The Service's key, if it has a name and namespace.
pub fn service_key(svc: &Service) -> Option<NamespacedName> {
    Some(NamespacedName::new(
        svc.metadata.namespace.as_deref()?,
        svc.metadata.name.as_deref()?,
    ))
}

/// `spec.loadBalancerSourceRanges`: CIDRs, padded with spaces as kube-apiserver's validation
/// lets through (kube-proxy trims them too). An entry that is not a CIDR is reported and left
/// out; the others still restrict.
fn parse_source_ranges(
    values: &[String],
    name: &NamespacedName,
    skips: &mut Vec<Skipped>,
) -> Vec<IpNet> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match v.trim().parse::<IpNet>() {
            // kube-apiserver accepts host bits set ("10.0.0.1/8") and kube-proxy matches the
            // network: so do we.
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                skips.push(skipped(
                    name,
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{v:?} is not a CIDR (allowed: an address/prefix such as 198.51.100.0/24 or 2001:db8::/32)"),
                ));
                None
            }
        })
        .collect()
}

fn parse_ips(
    values: &[String],
    field: &str,
    name: &NamespacedName,
    skips: &mut Vec<Skipped>,
) -> Vec<IpAddr> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match v.trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                skips.push(skipped(
                    name,
                    format!("{field}[{i}]"),
                    format!("{v:?} is not an IP address"),
                ));
                None
            }
        })
        .collect()
}

/// The Service's ports, keyed by name; empty for Services the proxy does not handle.
/// External and load-balancer IPs in `protected` (or in a special range) are left out.
pub fn service_ports(
    svc: &Service,
    protected: &Protected,
    skips: &mut Vec<Skipped>,
) -> BTreeMap<ServicePortName, ServicePort> {
    let mut out = BTreeMap::new();
    let Some(name) = service_key(svc) else {
        return out;
    };
    let other_proxy = svc.metadata.labels.as_ref().is_some_and(|l| {
        l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL)
    });
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    if other_proxy || ty == "ExternalName" || cluster_ip == "None" || cluster_ip.is_empty() {
        return out;
    }
    let cluster_ip_texts = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.to_vec(),
        _ => vec![cluster_ip.to_string()],
    };
    let before = skips.len();
    let cluster_ips = parse_ips(&cluster_ip_texts, "spec.clusterIPs", &name, skips);
    if skips.len() > before {
        // A Service whose virtual IP cannot be read gets no rules at all.
        return out;
    }
    let external_ips = parse_ips(
        spec.external_ips.as_deref().unwrap_or_default(),
        "spec.externalIPs",
        &name,
        skips,
    );
    let external_ips = refuse_frontends(external_ips, "spec.externalIPs", &name, protected, skips);
    let ingress: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        // `ipMode: Proxy`: the load balancer delivers to the node itself (proxy protocol or a
        // TCP proxy), so the address is not programmed (kube-proxy 1.30+, LoadBalancerIPMode).
        .map(|ingress| {
            ingress
                .iter()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.clone())
                .collect()
        })
        .unwrap_or_default();
    let load_balancer_ips = if ty == "LoadBalancer" {
        let ips = parse_ips(&ingress, "status.loadBalancer.ingress.ip", &name, skips);
        refuse_frontends(
            ips,
            "status.loadBalancer.ingress.ip",
            &name,
            protected,
            skips,
        )
    } else {
        Vec::new()
    };
    let source_range_texts = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let source_ranges_given = ty == "LoadBalancer" && !source_range_texts.is_empty();
    let source_ranges = if source_ranges_given {
        parse_source_ranges(source_range_texts, &name, skips)
    } else {
        Vec::new()
    };
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|t| *t > 0)
            .map_or(DEFAULT_AFFINITY_SECONDS, |t| t as u32)
    });
    let external_type = ty == "NodePort" || ty == "LoadBalancer";
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let Some(protocol) = Protocol::parse(port.protocol.as_deref().unwrap_or("TCP")) else {
            skips.push(skipped(
                &name,
                format!("spec.ports[{i}].protocol"),
                format!("{:?} is not TCP, UDP or SCTP", port.protocol),
            ));
            continue;
        };
        let Ok(number) =
            u16::try_from(port.port)
                .map_err(|_| ())
                .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
        else {
            skips.push(skipped(
                &name,
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number (1-65535)", port.port),
            ));
            continue;
        };
        let node_port = match port.node_port {
            Some(p) if external_type && (1..=65535).contains(&p) => Some(p as u16),
            Some(0) | None => None,
            Some(p) if external_type => {
                skips.push(skipped(
                    &name,
                    format!("spec.ports[{i}].nodePort"),
                    format!("{p} is not a port number (1-65535)"),
                ));
                None
            }
            Some(_) => None,
        };
        let key = ServicePortName {
            service: name.clone(),
            port: port.name.clone().unwrap_or_default(),
            protocol,
        };
        out.insert(
            key.clone(),
            ServicePort {
                name: key,
                cluster_ips: cluster_ips.clone(),
                port: number,
                node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                source_ranges: source_ranges.clone(),
                source_ranges_given,
                affinity_seconds,
                external_policy_local: external_type
                    && spec.external_traffic_policy.as_deref() == Some("Local")
                    || (!external_ips.is_empty()
                        && spec.external_traffic_policy.as_deref() == Some("Local")),
                internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                health_check_node_port: spec
                    .health_check_node_port
                    .filter(|p| (1..=65535).contains(p))
                    .map(|p| p as u16),
            },
        );
    }
    out
}
