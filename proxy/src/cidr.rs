//! Whether an address is inside a prefix (both families); shared by the iptables trace and the
//! eBPF backend's NodePort addresses.

use std::net::IpAddr;

/// `ip` in `net/len`; an address of the other family never is.
pub fn contains(net: IpAddr, len: u8, ip: &IpAddr) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(*a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(*a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_of_both_families_and_the_edges() {
        let ip = |t: &str| t.parse::<IpAddr>().expect("ip");
        assert!(contains(ip("198.18.0.0"), 15, &ip("198.19.255.1")));
        assert!(!contains(ip("198.18.0.0"), 16, &ip("198.19.0.1")));
        assert!(contains(ip("0.0.0.0"), 0, &ip("10.1.2.3")));
        assert!(contains(ip("10.1.2.3"), 32, &ip("10.1.2.3")));
        assert!(contains(ip("2001:2::"), 48, &ip("2001:2:0:ff::9")));
        assert!(!contains(ip("2001:2::"), 48, &ip("198.18.0.1")));
    }
}
