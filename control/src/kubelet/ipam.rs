//! Pod addresses from the node's pod CIDRs (host-local IPAM): one address per family per pod,
//! never the network address, the bridge's (the first host) or, in IPv4, the broadcast address.
//! Like CNI's host-local, it hands out the next free address after the last one it gave,
//! wrapping around: an address just released is not reused at once, so no neighbour still
//! holding the old pod's MAC address for it sends the new pod's traffic into the void. Pure.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct Ipam {
    cidrs: Vec<IpNet>,
    used: BTreeSet<IpAddr>,
    /// Per CIDR, the offset of the last address handed out.
    last: Vec<u128>,
}

/// How far into an IPv6 /64 the allocator looks (a node runs far fewer pods).
const MAX_HOSTS: u128 = 65_536;

impl Ipam {
    pub fn new(cidrs: Vec<IpNet>) -> Self {
        Self {
            last: vec![1; cidrs.len()],
            cidrs,
            used: BTreeSet::new(),
        }
    }

    /// The bridge's address in `cidr`: the pods' gateway.
    pub fn gateway(cidr: &IpNet) -> IpAddr {
        nth(cidr, 1)
    }

    /// One free address per CIDR, or an error naming the exhausted one (nothing reserved).
    pub fn allocate(&mut self) -> Result<Vec<IpAddr>, String> {
        let mut picked = Vec::new();
        let mut offsets = Vec::new();
        for (cidr, last) in self.cidrs.iter().zip(&self.last) {
            let size: u128 = match cidr {
                IpNet::V4(n) => (1u128 << (32 - n.prefix_len())).saturating_sub(1),
                IpNet::V6(n) => {
                    (1u128 << (128 - u32::from(n.prefix_len())).min(127)).min(MAX_HOSTS)
                }
            };
            let free = (last + 1..size)
                .chain(2..=*last)
                .find(|i| !self.used.contains(&nth(cidr, *i)));
            match free {
                Some(i) => {
                    picked.push(nth(cidr, i));
                    offsets.push(i);
                }
                None => return Err(format!("no free address left in the pod CIDR {cidr}")),
            }
        }
        self.used.extend(picked.iter().copied());
        self.last = offsets;
        Ok(picked)
    }

    /// Marks addresses as taken (a pod kept across a kubelet restart); false when one was.
    pub fn reserve(&mut self, ips: &[IpAddr]) -> bool {
        let fits = ips
            .iter()
            .all(|ip| !self.used.contains(ip) && self.cidrs.iter().any(|c| c.contains(ip)));
        if fits {
            self.used.extend(ips.iter().copied());
        }
        fits
    }

    pub fn release(&mut self, ips: &[IpAddr]) {
        for ip in ips {
            self.used.remove(ip);
        }
    }

    pub fn cidrs(&self) -> &[IpNet] {
        &self.cidrs
    }
}

fn nth(cidr: &IpNet, i: u128) -> IpAddr {
    match cidr {
        IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + i as u32).into()),
        IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + i).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|c| c.parse().expect("cidr")).collect()
    }

    #[test]
    fn next_free_address_per_family() {
        let mut ipam = Ipam::new(nets(&["198.19.1.0/24", "2001:2:0:101::/64"]));
        assert_eq!(Ipam::gateway(&ipam.cidrs()[0]).to_string(), "198.19.1.1");
        let a = ipam.allocate().expect("first");
        assert_eq!(
            a.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["198.19.1.2", "2001:2:0:101::2"]
        );
        let b = ipam.allocate().expect("second");
        assert_eq!(b[0].to_string(), "198.19.1.3");
        ipam.release(&a);
        assert_eq!(
            ipam.allocate().expect("not the one just released")[0].to_string(),
            "198.19.1.4"
        );
    }

    #[test]
    fn wraps_around_to_released_addresses() {
        let mut ipam = Ipam::new(nets(&["198.19.1.0/29"]));
        let all: Vec<_> = (0..5).map(|_| ipam.allocate().expect("free")).collect();
        assert_eq!(all[4][0].to_string(), "198.19.1.6");
        ipam.allocate().expect_err("full");
        ipam.release(&all[1]);
        assert_eq!(
            ipam.allocate().expect("wrapped")[0].to_string(),
            "198.19.1.3"
        );
    }

    #[test]
    fn exhaustion_is_an_error_and_reserves_nothing() {
        let mut ipam = Ipam::new(nets(&["198.19.1.0/30", "2001:2::/64"]));
        ipam.allocate().expect("the one host after the gateway");
        let err = ipam.allocate().expect_err("full");
        assert!(err.contains("198.19.1.0/30"), "{err}");
        assert!(
            !ipam.reserve(&["198.19.2.9".parse().expect("ip")]),
            "outside the CIDRs"
        );
    }
}
