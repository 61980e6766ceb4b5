//! Rust mirrors of every map key and value in `bpf/kpx_maps.h`. Field for field the same
//! layout (`#[repr(C)]`, explicit padding so keys hash the same on both sides); the test at the
//! bottom checks sizes and offsets against what the C compiler made of the header.
//!
//! Addresses are 16 bytes for both families (IPv4 in the first 4); ports are in network byte
//! order, as in packets.

use std::net::IpAddr;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const SVC_F_NODEPORT: u16 = 1 << 0;
pub const SVC_F_EXTERNAL: u16 = 1 << 1;
pub const SVC_F_LOCAL_ONLY: u16 = 1 << 2;
pub const SVC_F_MASQUERADE: u16 = 1 << 3;
pub const SVC_F_DROP: u16 = 1 << 4;
pub const SVC_F_MASQ_PODS: u16 = 1 << 5;
pub const SVC_F_INTERNAL: u16 = 1 << 6;
/// `loadBalancerSourceRanges`: new connections only from the frontend's networks in
/// `kpx_src_range4`/`kpx_src_range6` (none there: from nobody).
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 7;

/// Bits of a source-range key's prefix taken by the service id, always matched whole.
pub const SRC_RANGE_ID_BITS: u32 = 32;

/// Or'ed into a `ServiceKey`'s family: the entry internal clients (the node, pods when told
/// apart) use for a frontend flagged `SVC_F_INTERNAL` (`kpx_maps.h`).
pub const SCOPE_INTERNAL: u8 = 0x80;

pub const CT_F_REPLY: u32 = 1 << 0;
pub const CT_F_SNAT: u32 = 1 << 1;

/// An address as the maps hold it, and its family.
pub fn address(ip: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// The address a map entry holds.
pub fn ip(addr: &[u8; 16], family: u8) -> IpAddr {
    if family & !SCOPE_INTERNAL == FAMILY_V4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl ServiceKey {
    pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
        let (addr, family) = address(ip);
        Self {
            addr,
            port: port.to_be(),
            proto,
            family,
        }
    }

    /// The key of this frontend's internal-scope entry.
    pub fn internal(self) -> Self {
        Self {
            family: self.family | SCOPE_INTERNAL,
            ..self
        }
    }

    /// Whether this is an internal-scope entry's key.
    pub fn is_internal(&self) -> bool {
        self.family & SCOPE_INTERNAL != 0
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub id: u32,
    /// Backend slots `1..=count`; 0 means no endpoints (rejected).
    pub count: u16,
    pub flags: u16,
    /// Seconds; 0 means no session affinity.
    pub affinity_timeout: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
}

impl Backend {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        let (addr, family) = address(ip);
        Self {
            addr,
            port: port.to_be(),
            family,
            flags: 0,
        }
    }
}

pub const NAME_LEN: usize = 108;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevNat {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub pad: u8,
    /// The Service port, `namespace/name:port/PROTOCOL`, NUL-padded (cut at 108 bytes).
    pub name: [u8; NAME_LEN],
}

impl RevNat {
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
        String::from_utf8_lossy(&self.name[..end]).to_string()
    }
}

/// A name as `RevNat` holds it.
pub fn name_bytes(name: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    for (dst, src) in out.iter_mut().zip(name.bytes()) {
        *dst = src;
    }
    out
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u8; 16],
    pub service_id: u32,
    pub family: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtValue {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    pub flags: u32,
    /// Network byte order.
    pub front_port: u16,
    /// Network byte order.
    pub nat_port: u16,
    pub front_addr: [u8; 16],
    pub nat_addr: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    pub node_ip4: [u8; 16],
    pub node_ip6: [u8; 16],
}

/// How the programs tell sources apart (`kpx_clients`, one entry).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clients {
    pub node_netns: u64,
    pub pod_net4: [u8; 16],
    pub pod_net6: [u8; 16],
    /// 0: no IPv4 pod network.
    pub pod_prefix4: u8,
    pub pod_prefix6: u8,
    pub pad: [u8; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    pub addr: [u8; 16],
    pub family: u8,
    pub pad: [u8; 3],
}

impl NodeAddr {
    pub fn new(ip: IpAddr) -> Self {
        let (addr, family) = address(ip);
        Self {
            addr,
            family,
            pad: [0; 3],
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub pad: [u8; 5],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub pad: u8,
}

/// The data of a `kpx_src_range4` key after its prefix length (`struct kpx_src_range4_key`
/// is `aya::maps::lpm_trie::Key<SrcRange4>`: the length, then this).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange4 {
    pub service_id: u32,
    /// The network, host bits zero.
    pub addr: [u8; 4],
}

/// The data of a `kpx_src_range6` key after its prefix length.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange6 {
    pub service_id: u32,
    pub addr: [u8; 16],
}

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays with every
// padding byte spelled out as a field, so any bit pattern is valid and none is uninitialised.
unsafe impl aya::Pod for ServiceKey {}
// SAFETY: as above.
unsafe impl aya::Pod for ServiceValue {}
// SAFETY: as above.
unsafe impl aya::Pod for SlotKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Backend {}
// SAFETY: as above.
unsafe impl aya::Pod for RevNat {}
// SAFETY: as above.
unsafe impl aya::Pod for AffinityKey {}
// SAFETY: as above.
unsafe impl aya::Pod for AffinityValue {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtValue {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Clients {}
// SAFETY: as above.
unsafe impl aya::Pod for NodeAddr {}
// SAFETY: as above.
unsafe impl aya::Pod for SockRevKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SockRevValue {}
// SAFETY: as above.
unsafe impl aya::Pod for SrcRange4 {}
// SAFETY: as above.
unsafe impl aya::Pod for SrcRange6 {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::mem::{offset_of, size_of};

    use super::*;

    /// `(struct, field) → offset`, and `(struct, "SIZE") → size`, as the C compiler laid out
    /// `bpf/kpx_maps.h` (printed by `bpf/layout_probe.c` at build time).
    fn c_layout() -> BTreeMap<(String, String), usize> {
        include_str!(concat!(env!("OUT_DIR"), "/c_layout.txt"))
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let (s, f, n) = (words.next()?, words.next()?, words.next()?);
                Some(((s.to_string(), f.to_string()), n.parse().ok()?))
            })
            .collect()
    }

    macro_rules! rust_layout {
        ($( $c:literal => $ty:ty { $($field:ident),* } )*) => {{
            let mut m = BTreeMap::new();
            $(
                m.insert(($c.to_string(), "SIZE".to_string()), size_of::<$ty>());
                $( m.insert(($c.to_string(), stringify!($field).to_string()), offset_of!($ty, $field)); )*
            )*
            m
        }};
    }

    #[test]
    fn every_mirror_matches_the_c_header() {
        let mut rust = rust_layout! {
            "kpx_service_key" => ServiceKey { addr, port, proto, family }
            "kpx_service_value" => ServiceValue { id, count, flags, affinity_timeout }
            "kpx_slot_key" => SlotKey { service_id, slot }
            "kpx_backend" => Backend { addr, port, family, flags }
            "kpx_rev_nat" => RevNat { addr, port, family, name }
            "kpx_affinity_key" => AffinityKey { client, service_id, family }
            "kpx_affinity_value" => AffinityValue { last_used_ns, backend_id }
            "kpx_ct_key" => CtKey { src, dst, sport, dport, proto, family }
            "kpx_ct_value" => CtValue { last_seen_ns, backend_id, service_id, flags, front_port, nat_port, front_addr, nat_addr }
            "kpx_config" => Config { node_ip4, node_ip6 }
            "kpx_clients" => Clients { node_netns, pod_net4, pod_net6, pod_prefix4, pod_prefix6 }
            "kpx_node_addr" => NodeAddr { addr, family }
            "kpx_sock_rev_key" => SockRevKey { cookie, addr, port, family }
            "kpx_sock_rev_value" => SockRevValue { addr, port, family }
        };
        // The source-range keys are aya's `Key<data>`: a u32 prefix length, then the data.
        let lpm = |name: &str, size: usize, id: usize, addr: usize| {
            let prefix = size_of::<u32>();
            [
                ("SIZE", prefix + size),
                ("prefixlen", 0),
                ("service_id", prefix + id),
                ("addr", prefix + addr),
            ]
            .map(|(f, n)| ((name.to_string(), f.to_string()), n))
        };
        rust.extend(lpm(
            "kpx_src_range4_key",
            size_of::<SrcRange4>(),
            offset_of!(SrcRange4, service_id),
            offset_of!(SrcRange4, addr),
        ));
        rust.extend(lpm(
            "kpx_src_range6_key",
            size_of::<SrcRange6>(),
            offset_of!(SrcRange6, service_id),
            offset_of!(SrcRange6, addr),
        ));
        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<SrcRange6>>(),
            size_of::<u32>() + size_of::<SrcRange6>()
        );
        let c = c_layout();
        assert_eq!(c.len(), rust.len(), "C: {c:?}\nRust: {rust:?}");
        for (key, offset) in &c {
            assert_eq!(rust.get(key), Some(offset), "{key:?}");
        }
    }

    #[test]
    fn addresses_round_trip_for_both_families() {
        for text in ["198.18.128.9", "2001:2:0:ff::9"] {
            let ip: IpAddr = text.parse().expect("an address");
            let (addr, family) = address(ip);
            assert_eq!(super::ip(&addr, family), ip);
        }
        assert_eq!(
            ServiceKey::new("10.0.0.1".parse().expect("ip"), 80, 6).port,
            80u16.to_be()
        );
    }
}
