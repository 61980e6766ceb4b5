//! The address-valued settings: `--cluster-cidr` / `clusterCIDR` and `--nodeport-addresses` /
//! `nodePortAddresses`, parsed into [`IpNet`]s once, with errors that say what is allowed.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// One CIDR, `ADDRESS/PREFIX` of either family. Host bits may be set (`10.244.1.0/16`), as
/// kube-proxy's `ParseCIDRSloppy` allows; the text is kept as given.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let (address, prefix) = text.split_once('/').unwrap_or((text, ""));
    let address: IpAddr = address
        .parse()
        .map_err(|_| "not a CIDR (want ADDRESS/PREFIX, e.g. 10.0.0.0/8)".to_string())?;
    let max = if address.is_ipv6() { 128 } else { 32 };
    prefix
        .parse::<u8>()
        .ok()
        .and_then(|len| IpNet::new(address, len).ok())
        .ok_or_else(|| format!("the prefix length must be 0 to {max}"))
}

/// The pod network: at most one CIDR per IP family (kube-proxy's dual-stack pair), so each
/// family's "from a pod" test is one prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterCidrs(pub Vec<IpNet>);

impl ClusterCidrs {
    /// The CIDR of one family, if the pod network has one.
    pub fn of_family(&self, ipv6: bool) -> Option<&IpNet> {
        self.0.iter().find(|c| matches!(c, IpNet::V6(_)) == ipv6)
    }
}

impl FromStr for ClusterCidrs {
    type Err = String;

    /// A comma-separated list (`10.244.0.0/16,fd00:10:244::/56`); blanks are skipped.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for cidr in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            out.push(parse_cidr(cidr).map_err(|why| format!("{cidr:?}: {why}"))?);
        }
        let v6 = out.iter().filter(|c| matches!(c, IpNet::V6(_))).count();
        if v6 > 1 || out.len() - v6 > 1 {
            return Err(format!(
                "{text:?}: at most one CIDR per IP family (e.g. 10.244.0.0/16,fd00:10:244::/56)"
            ));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for ClusterCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&texts.join(","))
    }
}

/// One entry of `--nodeport-addresses`: a CIDR, or one of kube-proxy's keywords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(IpNet),
    /// kube-proxy 1.29+: the node's primary IPs (its `--node-ip` / `bindAddress`, else the
    /// Node object's addresses), one per family.
    Primary,
    /// Newer kube-proxy: every address (`0.0.0.0/0` and `::/0`), which is also the default.
    All,
}

impl FromStr for NodePortAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "primary" => Ok(Self::Primary),
            "all" => Ok(Self::All),
            // kube-proxy serves NodePorts on 127.0.0.1 only in iptables mode with
            // route_localnet, a sysctl kpx does not set (proxy/README, "Known limits").
            "localhost" => Err("\"localhost\": NodePorts on loopback are not supported by kpx (allowed: CIDRs, \"primary\", \"all\")".into()),
            cidr => parse_cidr(cidr)
                .map(Self::Cidr)
                .map_err(|why| format!("{cidr:?}: {why}")),
        }
    }
}

impl fmt::Display for NodePortAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cidr(net) => net.fmt(f),
            Self::Primary => f.write_str("primary"),
            Self::All => f.write_str("all"),
        }
    }
}

/// Where NodePorts answer; empty means every local address (kube-proxy's default outside
/// nftables mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePortAddresses(pub Vec<NodePortAddress>);

impl NodePortAddresses {
    /// Checks the list as kube-proxy's `validateKubeProxyNodePortAddress` does: a keyword
    /// stands alone (`primary` together with CIDRs has no meaning).
    pub fn new(entries: Vec<NodePortAddress>) -> Result<Self, String> {
        let keyword = entries
            .iter()
            .find(|e| !matches!(e, NodePortAddress::Cidr(_)));
        match keyword {
            Some(k) if entries.len() > 1 => Err(format!(
                "{k:?} cannot be combined with other entries (give it alone, or only CIDRs)",
                k = k.to_string()
            )),
            _ => Ok(Self(entries)),
        }
    }

    pub fn is_primary(&self) -> bool {
        self.0 == [NodePortAddress::Primary]
    }

    /// The CIDRs the backends match NodePort destinations against (empty: every address).
    /// `primary` becomes each non-loopback node IP as a /32 or /128, as kube-proxy's
    /// `newProxyServer` expands it; without a known node IP that is an error, never "all".
    pub fn cidrs(&self, node_ips: &[IpAddr]) -> Result<Vec<IpNet>, String> {
        let mut out = Vec::new();
        for entry in &self.0 {
            match entry {
                NodePortAddress::Cidr(net) => out.push(*net),
                NodePortAddress::All => return Ok(Vec::new()),
                NodePortAddress::Primary => {
                    out.extend(
                        node_ips
                            .iter()
                            .filter(|ip| !ip.is_loopback())
                            .map(|ip| IpNet::from(*ip)),
                    );
                    if out.is_empty() {
                        return Err("\"primary\": the node's primary IPs are unknown (give --node-ip or bindAddress, or give the Node object an InternalIP)".into());
                    }
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&texts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_cidrs_take_one_per_family_and_say_what_is_wrong() {
        let both: ClusterCidrs = "10.244.0.0/16,fd00:10:244::/56".parse().expect("valid");
        assert_eq!(both.to_string(), "10.244.0.0/16,fd00:10:244::/56");
        assert_eq!(
            both.of_family(true).map(ToString::to_string).as_deref(),
            Some("fd00:10:244::/56")
        );
        assert_eq!(
            "10.244.0.0/33".parse::<ClusterCidrs>(),
            Err("\"10.244.0.0/33\": the prefix length must be 0 to 32".into())
        );
        let err = "10.0.0.0/8,10.244.0.0/16"
            .parse::<ClusterCidrs>()
            .expect_err("two v4");
        assert!(err.contains("at most one CIDR per IP family"), "{err}");
        let err = "eth0".parse::<ClusterCidrs>().expect_err("not a CIDR");
        assert!(err.starts_with("\"eth0\": not a CIDR"), "{err}");
    }

    #[test]
    fn primary_is_the_node_ips_and_stands_alone() {
        let ip = |t: &str| t.parse::<IpAddr>().expect("ip");
        let primary = NodePortAddresses::new(vec![NodePortAddress::Primary]).expect("alone");
        let cidrs = primary
            .cidrs(&[ip("198.18.0.11"), ip("2001:2::11"), ip("127.0.0.1")])
            .expect("known node IPs");
        let texts: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(texts, ["198.18.0.11/32", "2001:2::11/128"]);
        assert!(primary.cidrs(&[]).is_err(), "no node IP is never 'all'");
        let mixed = vec![
            NodePortAddress::Primary,
            "10.0.0.0/8".parse().expect("cidr"),
        ];
        let err = NodePortAddresses::new(mixed).expect_err("primary with a CIDR");
        assert!(err.contains("cannot be combined"), "{err}");
        assert!("localhost".parse::<NodePortAddress>().is_err());
        let all = NodePortAddresses::new(vec![NodePortAddress::All]).expect("alone");
        assert_eq!(all.cidrs(&[]), Ok(Vec::new()));
    }
}
