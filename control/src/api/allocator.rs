//! ClusterIP and NodePort allocation: which addresses and ports are taken, from the configured
//! ranges. The API server rebuilds it from the stored Services at start, so allocations survive
//! restarts, and holds it under one lock, so concurrent creates never collide.

use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// `--service-cluster-ip-range` and `--service-node-port-range`.
#[derive(Debug, Clone)]
pub struct ServiceNetwork {
    /// One range per IP family; the first is the primary family.
    pub cluster_ip_ranges: Vec<IpNet>,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for ServiceNetwork {
    fn default() -> Self {
        Self {
            cluster_ip_ranges: vec!["10.96.0.0/12".parse().expect("valid literal")],
            node_ports: 30000..=32767,
        }
    }
}

impl ServiceNetwork {
    /// Parses the flags' values, refusing what kube-apiserver refuses.
    pub fn parse(cluster_ip_ranges: &str, node_ports: &str) -> Result<Self, String> {
        let ranges = cluster_ip_ranges
            .split(',')
            .map(|r| {
                r.trim()
                    .parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|e| format!("--service-cluster-ip-range: {r:?} is not a CIDR: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        match ranges.as_slice() {
            [_] => {}
            [a, b] if is_v4(a) != is_v4(b) => {}
            _ => {
                return Err(format!(
                    "--service-cluster-ip-range: {cluster_ip_ranges:?} must be one CIDR, or two of different IP families (dual-stack)"
                ))
            }
        }
        for range in &ranges {
            if range.hosts().take(3).count() < 3 {
                return Err(format!("--service-cluster-ip-range: {range} is too small"));
            }
        }
        let (low, high) = node_ports.split_once('-').ok_or_else(|| {
            format!("--service-node-port-range: {node_ports:?} is not of the form LOW-HIGH")
        })?;
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("--service-node-port-range: {s:?} is not a port number"))
        };
        let (low, high) = (parse(low)?, parse(high)?);
        if low == 0 || low > high {
            return Err(format!(
                "--service-node-port-range: {node_ports:?} is empty or starts at 0"
            ));
        }
        Ok(Self {
            cluster_ip_ranges: ranges,
            node_ports: low..=high,
        })
    }

    pub fn is_dual_stack(&self) -> bool {
        self.cluster_ip_ranges.len() == 2
    }

    pub fn range_for(&self, family: Family) -> Option<&IpNet> {
        self.cluster_ip_ranges
            .iter()
            .find(|r| Family::of_net(r) == family)
    }

    pub fn primary_family(&self) -> Family {
        self.cluster_ip_ranges
            .first()
            .map_or(Family::V4, Family::of_net)
    }

    pub fn node_port_range_text(&self) -> String {
        format!("{}-{}", self.node_ports.start(), self.node_ports.end())
    }
}

fn is_v4(net: &IpNet) -> bool {
    matches!(net, IpNet::V4(_))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn of_net(net: &IpNet) -> Self {
        if is_v4(net) {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The taken ClusterIPs and NodePorts.
#[derive(Debug)]
pub struct Allocator {
    network: ServiceNetwork,
    ips: HashSet<IpAddr>,
    ports: HashSet<u16>,
}

impl Allocator {
    pub fn new(network: ServiceNetwork) -> Self {
        Self {
            network,
            ips: HashSet::new(),
            ports: HashSet::new(),
        }
    }

    pub fn network(&self) -> &ServiceNetwork {
        &self.network
    }

    pub fn ips_in_use(&self) -> usize {
        self.ips.len()
    }

    /// Takes a specific address; the error says why not, as kube-apiserver says it.
    pub fn reserve_ip(&mut self, ip: IpAddr) -> Result<(), String> {
        let Some(range) = self.network.range_for(Family::of(&ip)) else {
            return Err(format!(
                "failed to allocate IP {ip}: this cluster has no {} service range",
                Family::of(&ip).name()
            ));
        };
        if !range.contains(&ip)
            || ip == range.network()
            || (is_v4(range) && ip == range.broadcast())
        {
            return Err(format!(
                "failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is {range}"
            ));
        }
        if !self.ips.insert(ip) {
            return Err(format!(
                "failed to allocate IP {ip}: provided IP is already allocated"
            ));
        }
        Ok(())
    }

    /// Takes a free address of `family`, chosen at random so that restarts and concurrent
    /// writers spread out instead of fighting over the lowest one.
    pub fn allocate_ip(&mut self, family: Family) -> Result<IpAddr, String> {
        let range = *self
            .network
            .range_for(family)
            .ok_or_else(|| format!("this cluster has no {} service range", family.name()))?;
        let (base, size) = span(&range);
        // The first host address is kept for the `kubernetes` Service, as kube-apiserver does.
        let first = 2u128;
        if size <= first + 1 {
            return Err(format!("range {range} is full"));
        }
        let usable = size - first - 1;
        let start = rand::random_range(0..usable);
        for step in 0..usable.min(1 << 24) {
            let offset = first + (start + step) % usable;
            let ip = add(base, offset);
            if !self.ips.contains(&ip) {
                self.ips.insert(ip);
                return Ok(ip);
            }
        }
        Err(format!("range {range} is full"))
    }

    pub fn release_ip(&mut self, ip: &IpAddr) {
        self.ips.remove(ip);
    }

    pub fn reserve_port(&mut self, port: u16) -> Result<(), String> {
        if !self.network.node_ports.contains(&port) {
            return Err(format!(
                "provided port is not in the valid range. The range of valid ports is {}",
                self.network.node_port_range_text()
            ));
        }
        if !self.ports.insert(port) {
            return Err("provided port is already allocated".into());
        }
        Ok(())
    }

    pub fn allocate_port(&mut self) -> Result<u16, String> {
        let (low, high) = (
            *self.network.node_ports.start(),
            *self.network.node_ports.end(),
        );
        let size = u32::from(high - low) + 1;
        let start = rand::random_range(0..size);
        for step in 0..size {
            let port = low + ((start + step) % size) as u16;
            if self.ports.insert(port) {
                return Ok(port);
            }
        }
        Err(format!(
            "range {} is full",
            self.network.node_port_range_text()
        ))
    }

    pub fn release_port(&mut self, port: u16) {
        self.ports.remove(&port);
    }

    /// Marks what a stored object holds as taken (at start), ignoring what is out of range now.
    pub fn adopt(&mut self, ips: &[IpAddr], ports: &[u16]) {
        for ip in ips {
            if self
                .network
                .range_for(Family::of(ip))
                .is_some_and(|r| r.contains(ip))
            {
                self.ips.insert(*ip);
            }
        }
        for port in ports {
            if self.network.node_ports.contains(port) {
                self.ports.insert(*port);
            }
        }
    }
}

fn span(range: &IpNet) -> (IpAddr, u128) {
    match range {
        IpNet::V4(n) => (IpAddr::V4(n.network()), 1u128 << (32 - n.prefix_len())),
        IpNet::V6(n) => (
            IpAddr::V6(n.network()),
            1u128
                .checked_shl(u32::from(128 - n.prefix_len()))
                .unwrap_or(u128::MAX),
        ),
    }
}

fn add(base: IpAddr, offset: u128) -> IpAddr {
    match base {
        IpAddr::V4(b) => IpAddr::V4((u32::from(b).wrapping_add(offset as u32)).into()),
        IpAddr::V6(b) => IpAddr::V6((u128::from(b).wrapping_add(offset)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_distinct_and_in_range() {
        let net = ServiceNetwork::parse("198.18.0.0/28", "30000-30002").expect("parse");
        let mut a = Allocator::new(net);
        let range: IpNet = "198.18.0.0/28".parse().expect("net");
        let mut seen = HashSet::new();
        // 16 addresses - network, broadcast and the reserved first host = 13.
        for _ in 0..13 {
            let ip = a.allocate_ip(Family::V4).expect("free address");
            assert!(range.contains(&ip) && seen.insert(ip), "{ip}");
            assert_ne!(ip.to_string(), "198.18.0.1");
        }
        assert!(a.allocate_ip(Family::V4).is_err(), "the range is full");
        assert!(a.reserve_ip("198.18.0.5".parse().expect("ip")).is_err());
        assert!(a
            .reserve_ip("10.0.0.1".parse().expect("ip"))
            .expect_err("must be refused")
            .contains("not in the valid range"));
        for _ in 0..3 {
            a.allocate_port().expect("port");
        }
        assert!(a.allocate_port().is_err());
        a.release_port(30001);
        assert_eq!(a.allocate_port(), Ok(30001));
    }

    #[test]
    fn flags_are_checked() {
        assert!(ServiceNetwork::parse("10.96.0.0/12,fd00::/108", "30000-32767").is_ok());
        assert!(ServiceNetwork::parse("10.96.0.0/12,10.0.0.0/16", "30000-32767").is_err());
        assert!(ServiceNetwork::parse("nope", "30000-32767").is_err());
        assert!(ServiceNetwork::parse("10.96.0.0/12", "3-1").is_err());
    }
}
