//! Services: defaulting, validation and ClusterIP/NodePort allocation, as kube-apiserver's
//! service REST storage does them.

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::ip::{self, Use};
use super::names;
use crate::api::allocator::{Allocator, Family, ServiceNetwork};
use crate::api::FieldError;

const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const POLICIES: &[&str] = &["Cluster", "Local"];
const FAMILY_POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;

fn spec_type(spec: &ServiceSpec) -> &str {
    spec.type_.as_deref().unwrap_or("ClusterIP")
}

fn uses_node_ports(spec: &ServiceSpec) -> bool {
    match spec_type(spec) {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip.as_deref() == Some("None")
}

/// On update, keeps what was allocated when the client left it out (as `kubectl apply` and
/// `PUT` of a hand-written object do), and drops NodePorts a type change made meaningless.
pub fn preserve_allocations(new: &mut Service, old: &Service) {
    let (Some(spec), Some(old_spec)) = (new.spec.as_mut(), old.spec.as_ref()) else {
        return;
    };
    let same_kind = (spec_type(spec) == "ExternalName") == (spec_type(old_spec) == "ExternalName");
    if same_kind
        && spec.cluster_ip.as_deref().unwrap_or("").is_empty()
        && spec.cluster_ips.as_ref().is_none_or(Vec::is_empty)
    {
        spec.cluster_ip = old_spec.cluster_ip.clone();
        spec.cluster_ips = old_spec.cluster_ips.clone();
        if spec.ip_families.as_ref().is_none_or(Vec::is_empty) {
            spec.ip_families = old_spec.ip_families.clone();
        }
        if spec.ip_family_policy.is_none() {
            spec.ip_family_policy = old_spec.ip_family_policy.clone();
        }
    }
    let old_ports = old_spec.ports.clone().unwrap_or_default();
    let keep_node_ports = uses_node_ports(spec);
    for port in spec.ports.iter_mut().flatten() {
        let old_port = old_ports.iter().find(|p| {
            p.port == port.port
                && p.protocol.as_deref().unwrap_or("TCP")
                    == port.protocol.as_deref().unwrap_or("TCP")
        });
        match (
            keep_node_ports,
            port.node_port,
            old_port.and_then(|p| p.node_port),
        ) {
            (true, None | Some(0), Some(old)) => port.node_port = Some(old),
            // Switching to ClusterIP: NodePorts the client merely carried over are dropped.
            (false, Some(n), Some(old)) if n == old => port.node_port = None,
            _ => {}
        }
    }
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    if spec_type(spec) == "LoadBalancer" && local && spec.health_check_node_port.unwrap_or(0) == 0 {
        spec.health_check_node_port = old_spec.health_check_node_port;
    }
}

/// kube-apiserver's defaults for a Service.
pub fn default_service(svc: &mut Service, network: &ServiceNetwork) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let ty = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    if spec.session_affinity.is_none() {
        spec.session_affinity = Some("None".into());
    }
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let config = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default);
        let client = config.client_ip.get_or_insert_with(ClientIPConfig::default);
        client
            .timeout_seconds
            .get_or_insert(DEFAULT_AFFINITY_TIMEOUT);
    } else if spec.session_affinity.as_deref() == Some("None") {
        spec.session_affinity_config = None;
    }
    for port in spec.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".into());
        let unset = match &port.target_port {
            None => true,
            Some(IntOrString::Int(0)) => true,
            Some(IntOrString::String(s)) => s.is_empty(),
            Some(IntOrString::Int(_)) => false,
        };
        if unset {
            port.target_port = Some(IntOrString::Int(port.port));
        }
    }
    if ty == "ExternalName" {
        return;
    }
    spec.internal_traffic_policy
        .get_or_insert_with(|| "Cluster".into());
    let external = ty == "NodePort" || ty == "LoadBalancer";
    if external {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if ty == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
    // clusterIP and clusterIPs[0] mirror each other.
    match (
        spec.cluster_ip.as_deref().filter(|s| !s.is_empty()),
        spec.cluster_ips.as_ref().and_then(|v| v.first()),
    ) {
        (Some(ip), None) => spec.cluster_ips = Some(vec![ip.to_string()]),
        (None, Some(ip)) => spec.cluster_ip = Some(ip.clone()),
        _ => {}
    }
    spec.ip_family_policy
        .get_or_insert_with(|| "SingleStack".into());
    if spec.ip_families.as_ref().is_none_or(Vec::is_empty) {
        let requested: Vec<Family> = spec
            .cluster_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| Family::of(&ip))
            .collect();
        let mut families = if requested.is_empty() {
            vec![network.primary_family()]
        } else {
            requested
        };
        let wants_dual = spec.ip_family_policy.as_deref() != Some("SingleStack");
        if wants_dual && network.is_dual_stack() && families.len() == 1 {
            let other = if families[0] == Family::V4 {
                Family::V6
            } else {
                Family::V4
            };
            families.push(other);
        }
        spec.ip_families = Some(families.iter().map(|f| f.name().to_string()).collect());
    }
}

fn port_key(port: &ServicePort) -> (String, i32) {
    (
        port.protocol.clone().unwrap_or_else(|| "TCP".into()),
        port.port,
    )
}

/// Everything kube-apiserver checks before allocating. `old` is the stored Service on update.
pub fn validate_service(
    svc: &Service,
    old: Option<&Service>,
    network: &ServiceNetwork,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(spec) = svc.spec.as_ref() else {
        errs.push(FieldError::required("spec", ""));
        return errs;
    };
    let ty = spec_type(spec);
    if !TYPES.contains(&ty) {
        errs.push(FieldError::not_supported("spec.type", ty, TYPES));
    }
    let external_name = ty == "ExternalName";
    if external_name {
        match spec.external_name.as_deref().unwrap_or("") {
            "" => errs.push(FieldError::required("spec.externalName", "")),
            name => {
                if let Err(why) = names::dns1123_subdomain(name.trim_end_matches('.')) {
                    errs.push(FieldError::invalid(
                        "spec.externalName",
                        format!("{name:?}"),
                        why,
                    ));
                }
            }
        }
        if spec.cluster_ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
            errs.push(FieldError::forbidden(
                "spec.clusterIP",
                "may not be set for `type` 'ExternalName'",
            ));
        }
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !external_name && !is_headless(spec) {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names_seen = HashSet::new();
    let mut keys_seen = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        match port.name.as_deref().unwrap_or("") {
            "" if ports.len() > 1 => errs.push(FieldError::required(format!("{at}.name"), "")),
            "" => {}
            name => {
                if let Err(why) = names::dns1123_label(name) {
                    errs.push(FieldError::invalid(
                        format!("{at}.name"),
                        format!("{name:?}"),
                        why,
                    ));
                }
                if !names_seen.insert(name.to_string()) {
                    errs.push(FieldError::duplicate(
                        format!("{at}.name"),
                        format!("{name:?}"),
                    ));
                }
            }
        }
        if !(1..=65535).contains(&port.port) {
            errs.push(FieldError::invalid(
                format!("{at}.port"),
                port.port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !PROTOCOLS.contains(&protocol) {
            errs.push(FieldError::not_supported(
                format!("{at}.protocol"),
                protocol,
                PROTOCOLS,
            ));
        }
        match &port.target_port {
            Some(IntOrString::Int(p)) if !(1..=65535).contains(p) => {
                errs.push(FieldError::invalid(
                    format!("{at}.targetPort"),
                    p,
                    "must be between 1 and 65535, inclusive",
                ));
            }
            Some(IntOrString::String(name)) => {
                if let Err(why) = names::iana_svc_name(name) {
                    errs.push(FieldError::invalid(
                        format!("{at}.targetPort"),
                        format!("{name:?}"),
                        why,
                    ));
                }
            }
            _ => {}
        }
        if let Some(node_port) = port.node_port.filter(|p| *p != 0) {
            if !uses_node_ports(spec) {
                errs.push(FieldError::forbidden(
                    format!("{at}.nodePort"),
                    format!("may not be used when `type` is '{ty}'"),
                ));
            } else if !(1..=65535).contains(&node_port)
                || !network.node_ports.contains(&(node_port as u16))
            {
                errs.push(FieldError::invalid(
                    format!("{at}.nodePort"),
                    node_port,
                    format!(
                        "provided port is not in the valid range. The range of valid ports is {}",
                        network.node_port_range_text()
                    ),
                ));
            }
        }
        let (proto, number) = port_key(port);
        if !keys_seen.insert((proto.clone(), number)) {
            errs.push(FieldError::duplicate(
                at,
                json!({"protocol": proto, "port": number}),
            ));
        }
    }

    if let Some(affinity) = spec.session_affinity.as_deref() {
        const AFFINITIES: &[&str] = &["ClientIP", "None"];
        if !AFFINITIES.contains(&affinity) {
            errs.push(FieldError::not_supported(
                "spec.sessionAffinity",
                affinity,
                AFFINITIES,
            ));
        }
    }
    if let Some(timeout) = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
    {
        if !(1..=86400).contains(&timeout) {
            errs.push(FieldError::invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                timeout,
                "must be greater than 0 and less than 86400",
            ));
        }
    }
    let has_external_ips = spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    if let Some(policy) = spec.external_traffic_policy.as_deref() {
        if !POLICIES.contains(&policy) {
            errs.push(FieldError::not_supported(
                "spec.externalTrafficPolicy",
                policy,
                POLICIES,
            ));
        } else if !(ty == "NodePort" || ty == "LoadBalancer" || has_external_ips) {
            errs.push(FieldError::invalid(
                "spec.externalTrafficPolicy",
                format!("{policy:?}"),
                "may only be set for externally-accessible services",
            ));
        }
    }
    if let Some(policy) = spec.internal_traffic_policy.as_deref() {
        if !POLICIES.contains(&policy) {
            errs.push(FieldError::not_supported(
                "spec.internalTrafficPolicy",
                policy,
                POLICIES,
            ));
        }
    }
    // kube's ValidateService → ValidateNonSpecialIP on each external IP (and the stricter
    // `Use::Programmed` set, see `ip.rs`); the form checks spare values already stored.
    let old_spec = old.and_then(|o| o.spec.as_ref());
    let stored: HashSet<String> = old_spec
        .and_then(|o| o.external_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    for (i, value) in spec.external_ips.iter().flatten().enumerate() {
        ip::check(
            format!("spec.externalIPs[{i}]"),
            value,
            Use::Programmed,
            &stored,
            &mut errs,
        );
    }
    validate_load_balancer_status(svc, old, &mut errs);
    for (i, cidr) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        if cidr.trim().parse::<ipnet::IpNet>().is_err() {
            errs.push(FieldError::invalid(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{cidr:?}"),
                "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24 ",
            ));
        }
    }
    if let Some(port) = spec.health_check_node_port.filter(|p| *p != 0) {
        let local_lb =
            ty == "LoadBalancer" && spec.external_traffic_policy.as_deref() == Some("Local");
        if !local_lb {
            errs.push(FieldError::invalid("spec.healthCheckNodePort", port, "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"));
        }
    }
    for (key, value) in spec.selector.iter().flatten() {
        if let Err(why) = names::qualified_name(key) {
            errs.push(FieldError::invalid(
                "spec.selector",
                format!("{key:?}"),
                why,
            ));
        }
        if let Err(why) = names::label_value(value) {
            errs.push(FieldError::invalid(
                "spec.selector",
                format!("{value:?}"),
                why,
            ));
        }
    }
    if !external_name {
        validate_cluster_ips(spec, old, network, &mut errs);
    }
    errs
}

/// `status.loadBalancer.ingress[].ip`: upstream checks only that it is an IP
/// (`ValidateLoadBalancerStatus`); kpx is stricter and refuses what kpx-proxy must never
/// program (loopback, link-local, …: a load balancer never announces those), because anyone
/// who may write a Service's status would otherwise choose what every node captures.
fn validate_load_balancer_status(svc: &Service, old: Option<&Service>, errs: &mut Vec<FieldError>) {
    let ingress_ips = |s: &Service| -> Vec<Option<String>> {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .map(|i| i.ip.clone())
            .collect()
    };
    let stored: HashSet<String> = old
        .map(ingress_ips)
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    for (i, value) in ingress_ips(svc).into_iter().enumerate() {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            ip::check(
                format!("status.loadBalancer.ingress[{i}].ip"),
                &value,
                Use::Programmed,
                &stored,
                errs,
            );
        }
    }
    let hostnames = svc
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .map(|i| i.hostname.as_deref());
    for (i, hostname) in hostnames.enumerate() {
        if let Some(hostname) = hostname.filter(|h| !h.is_empty()) {
            validate_ingress_hostname(i, hostname, errs);
        }
    }
}

/// `status.loadBalancer.ingress[].hostname`, as upstream's `ValidateLoadBalancerStatus`
/// (`pkg/apis/core/validation/validation.go`): a DNS-1123 subdomain that is not an IP address
/// (an IP belongs in `.ip`, where it is checked as one; "127.0.0.1" is a valid subdomain).
fn validate_ingress_hostname(i: usize, hostname: &str, errs: &mut Vec<FieldError>) {
    let field = format!("status.loadBalancer.ingress[{i}].hostname");
    if let Err(why) = names::dns1123_subdomain(hostname) {
        errs.push(FieldError::invalid(&field, format!("{hostname:?}"), why));
    }
    // Upstream's ParseIPSloppy also takes IPv4 with leading zeros ("010.0.0.1").
    let sloppy_v4 = hostname.split('.').count() == 4
        && hostname.split('.').all(|o| {
            !o.is_empty()
                && o.len() <= 3
                && o.bytes().all(|b| b.is_ascii_digit())
                && o.parse::<u16>().is_ok_and(|n| n <= 255)
        });
    if hostname.parse::<std::net::IpAddr>().is_ok() || sloppy_v4 {
        errs.push(FieldError::invalid(
            &field,
            format!("{hostname:?}"),
            "must be a DNS name, not an IP address",
        ));
    }
}

/// The external-IP admission: upstream's `DenyServiceExternalIPs` plugin
/// (`plugin/pkg/admission/network/denyserviceexternalips`) when `allowed` is empty, and the
/// CVE-2020-8554 `externalip-webhook`'s `allowed-external-ip-cidrs` otherwise. An update
/// that only keeps or removes external IPs the stored Service had is always allowed
/// (upstream's `isSubset`). The error is the message of the 403 the caller answers.
pub fn admit_external_ips(
    svc: &Service,
    old: Option<&Service>,
    allowed: &[ipnet::IpNet],
) -> Result<(), String> {
    let stored: HashSet<&str> = old
        .and_then(|o| o.spec.as_ref())
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let new_ips = svc.spec.as_ref().and_then(|s| s.external_ips.as_ref());
    for value in new_ips.into_iter().flatten() {
        if stored.contains(value.as_str()) {
            continue;
        }
        let inside = value
            .parse::<IpAddr>()
            .is_ok_and(|ip| allowed.iter().any(|net| net.contains(&ip)));
        if inside {
            continue;
        }
        return Err(if allowed.is_empty() {
            "Use of external IPs is denied by admission control".to_string()
        } else {
            let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            format!(
                "Use of external IPs is denied by admission control: spec.externalIPs {value:?} is outside the allowed ranges ({}, --service-external-ip-cidrs)",
                list.join(",")
            )
        });
    }
    Ok(())
}

fn validate_cluster_ips(
    spec: &ServiceSpec,
    old: Option<&Service>,
    network: &ServiceNetwork,
    errs: &mut Vec<FieldError>,
) {
    if let Some(policy) = spec.ip_family_policy.as_deref() {
        if !FAMILY_POLICIES.contains(&policy) {
            errs.push(FieldError::not_supported(
                "spec.ipFamilyPolicy",
                policy,
                FAMILY_POLICIES,
            ));
        }
        if policy == "RequireDualStack" && !network.is_dual_stack() {
            errs.push(FieldError::invalid(
                "spec.ipFamilyPolicy",
                format!("{policy:?}"),
                "this cluster is not configured for dual-stack services",
            ));
        }
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let mut seen = Vec::new();
    for (i, family) in families.iter().enumerate() {
        match Family::parse(family) {
            None => errs.push(FieldError::not_supported(
                format!("spec.ipFamilies[{i}]"),
                family,
                &["IPv4", "IPv6"],
            )),
            Some(f) if seen.contains(&f) => errs.push(FieldError::duplicate(
                format!("spec.ipFamilies[{i}]"),
                format!("{family:?}"),
            )),
            Some(f) if network.range_for(f).is_none() => errs.push(FieldError::invalid(
                format!("spec.ipFamilies[{i}]"),
                format!("{family:?}"),
                format!(
                    "not configured on this cluster (service ranges: {})",
                    network
                        .cluster_ip_ranges
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )),
            Some(f) => seen.push(f),
        }
    }
    if families.len() > 1 && spec.ip_family_policy.as_deref() == Some("SingleStack") {
        errs.push(FieldError::invalid("spec.ipFamilies", format!("{families:?}"), "when multiple IP families are specified, `ipFamilyPolicy` must be PreferDualStack or RequireDualStack"));
    }
    let ips = spec.cluster_ips.as_deref().unwrap_or_default();
    if let (Some(ip), Some(first)) = (
        spec.cluster_ip.as_deref().filter(|s| !s.is_empty()),
        ips.first(),
    ) {
        if ip != first {
            errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                format!("{first:?}"),
                "must match `clusterIP`",
            ));
        }
    }
    if ips.len() > 2 {
        errs.push(FieldError::invalid(
            "spec.clusterIPs",
            format!("{ips:?}"),
            "may specify no more than one IP for each IP family",
        ));
    }
    for (i, ip) in ips.iter().enumerate() {
        if ip == "None" {
            if i > 0 || ips.len() > 1 {
                errs.push(FieldError::invalid(
                    format!("spec.clusterIPs[{i}]"),
                    format!("{ip:?}"),
                    "'None' must be the first and only value",
                ));
            }
            continue;
        }
        match ip.parse::<IpAddr>() {
            Err(_) => errs.push(FieldError::invalid(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip:?}"),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )),
            Ok(addr) => {
                if families
                    .get(i)
                    .and_then(|f| Family::parse(f))
                    .is_some_and(|f| f != Family::of(&addr))
                {
                    errs.push(FieldError::invalid(
                        format!("spec.clusterIPs[{i}]"),
                        format!("{ip:?}"),
                        format!(
                            "expected an {} value as indicated by `ipFamilies[{i}]`",
                            families[i]
                        ),
                    ));
                }
                let in_range = network
                    .range_for(Family::of(&addr))
                    .is_some_and(|r| r.contains(&addr));
                if !in_range {
                    let ranges = network
                        .cluster_ip_ranges
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",");
                    errs.push(FieldError::invalid(
                        format!("spec.clusterIPs[{i}]"),
                        format!("{ip:?}"),
                        format!("failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is {ranges}"),
                    ));
                }
            }
        }
    }
    let old_spec = old.and_then(|o| o.spec.as_ref());
    if let Some(old_spec) = old_spec.filter(|o| spec_type(o) != "ExternalName") {
        let old_ips = old_spec.cluster_ips.as_deref().unwrap_or_default();
        if let (Some(before), Some(after)) = (old_ips.first(), ips.first()) {
            if before != after {
                errs.push(FieldError::invalid(
                    "spec.clusterIPs[0]",
                    format!("{ips:?}"),
                    "may not change once set",
                ));
            }
        }
    }
}

/// What an allocation took, so a failed write can give it back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Held {
    pub ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
}

impl Held {
    pub fn of(svc: &Service) -> Self {
        let mut held = Held::default();
        let Some(spec) = svc.spec.as_ref() else {
            return held;
        };
        if spec_type(spec) != "ExternalName" {
            held.ips = spec
                .cluster_ips
                .iter()
                .flatten()
                .filter_map(|ip| ip.parse().ok())
                .collect();
        }
        let ports = spec.ports.iter().flatten().filter_map(|p| p.node_port);
        for port in ports
            .chain(spec.health_check_node_port)
            .filter(|p| (1..=65535).contains(p))
        {
            if !held.ports.contains(&(port as u16)) {
                held.ports.push(port as u16);
            }
        }
        held
    }

    pub fn release(&self, allocator: &mut Allocator) {
        for ip in &self.ips {
            allocator.release_ip(ip);
        }
        for port in &self.ports {
            allocator.release_port(*port);
        }
    }

    /// What `self` holds that `other` does not.
    pub fn minus(&self, other: &Held) -> Held {
        Held {
            ips: self
                .ips
                .iter()
                .filter(|ip| !other.ips.contains(ip))
                .copied()
                .collect(),
            ports: self
                .ports
                .iter()
                .filter(|p| !other.ports.contains(p))
                .copied()
                .collect(),
        }
    }
}

/// Fills in ClusterIPs and NodePorts and takes them from the allocator. Returns what was newly
/// taken (to give back if the write fails); on a refusal nothing stays taken.
pub fn allocate(
    svc: &mut Service,
    old: Option<&Service>,
    allocator: &mut Allocator,
) -> Result<Held, Vec<FieldError>> {
    let before = old.map(Held::of).unwrap_or_default();
    let mut taken = Held::default();
    let result = allocate_into(svc, &before, allocator, &mut taken);
    if result.is_err() {
        taken.release(allocator);
    }
    result.map(|()| taken)
}

fn allocate_into(
    svc: &mut Service,
    before: &Held,
    allocator: &mut Allocator,
    taken: &mut Held,
) -> Result<(), Vec<FieldError>> {
    let Some(spec) = svc.spec.as_mut() else {
        return Ok(());
    };
    let mut errs = Vec::new();
    if spec_type(spec) != "ExternalName" && !is_headless(spec) {
        let families: Vec<Family> = spec
            .ip_families
            .iter()
            .flatten()
            .filter_map(|f| Family::parse(f))
            .collect();
        let mut ips = spec.cluster_ips.clone().unwrap_or_default();
        for (i, family) in families.iter().enumerate() {
            match ips.get(i).and_then(|ip| ip.parse::<IpAddr>().ok()) {
                Some(ip) if before.ips.contains(&ip) => {}
                Some(ip) => match allocator.reserve_ip(ip) {
                    Ok(()) => taken.ips.push(ip),
                    Err(why) => errs.push(FieldError::invalid(
                        format!("spec.clusterIPs[{i}]"),
                        format!("{ip:?}"),
                        why,
                    )),
                },
                None => match allocator.allocate_ip(*family) {
                    Ok(ip) => {
                        taken.ips.push(ip);
                        if ips.len() > i {
                            ips[i] = ip.to_string();
                        } else {
                            ips.push(ip.to_string());
                        }
                    }
                    Err(why) => errs.push(FieldError::invalid(
                        format!("spec.clusterIPs[{i}]"),
                        "\"\"",
                        format!("failed to allocate a {} ClusterIP: {why}", family.name()),
                    )),
                },
            }
        }
        spec.cluster_ip = ips.first().cloned();
        spec.cluster_ips = Some(ips);
    }
    if uses_node_ports(spec) {
        // One Service may use the same NodePort for two protocols of the same port.
        let mut mine: Vec<u16> = Vec::new();
        for (i, port) in spec.ports.iter_mut().flatten().enumerate() {
            match port.node_port.filter(|p| *p != 0).map(|p| p as u16) {
                Some(p) if before.ports.contains(&p) || mine.contains(&p) => {}
                Some(p) => match allocator.reserve_port(p) {
                    Ok(()) => {
                        taken.ports.push(p);
                        mine.push(p);
                    }
                    Err(why) => errs.push(FieldError::invalid(
                        format!("spec.ports[{i}].nodePort"),
                        p,
                        why,
                    )),
                },
                None => match allocator.allocate_port() {
                    Ok(p) => {
                        taken.ports.push(p);
                        mine.push(p);
                        port.node_port = Some(i32::from(p));
                    }
                    Err(why) => errs.push(FieldError::invalid(
                        format!("spec.ports[{i}].nodePort"),
                        0,
                        why,
                    )),
                },
            }
        }
    }
    let local_lb = spec_type(spec) == "LoadBalancer"
        && spec.external_traffic_policy.as_deref() == Some("Local");
    if local_lb {
        match spec
            .health_check_node_port
            .filter(|p| *p != 0)
            .map(|p| p as u16)
        {
            Some(p) if before.ports.contains(&p) => {}
            Some(p) => match allocator.reserve_port(p) {
                Ok(()) => taken.ports.push(p),
                Err(why) => errs.push(FieldError::invalid("spec.healthCheckNodePort", p, why)),
            },
            None => match allocator.allocate_port() {
                Ok(p) => {
                    taken.ports.push(p);
                    spec.health_check_node_port = Some(i32::from(p));
                }
                Err(why) => errs.push(FieldError::invalid("spec.healthCheckNodePort", 0, why)),
            },
        }
    } else {
        spec.health_check_node_port = None;
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests;
