//! The kernel, in the plan's terms: IPVS over generic netlink (`netlink.rs`), the dummy
//! interface over rtnetlink (`dummy.rs`) and the sysctls. Converts the plan's keys and changes
//! to messages and the kernel's answers back; only this family's virtual servers are listed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use super::diff::{Change, Dest, Held, Spec};
use super::dummy::DummyLink;
use super::netlink::{self, Ipvs, Op, ServiceKey};
use super::plan::VsKey;
use crate::backend::BackendError;
use crate::model::Protocol;

/// `IP_VS_SVC_F_PERSISTENT`.
const PERSISTENT: u32 = 0x1;

fn ipproto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
        Protocol::Sctp => libc::IPPROTO_SCTP as u8,
    }
}

fn protocol(p: u8) -> Option<Protocol> {
    match i32::from(p) {
        libc::IPPROTO_TCP => Some(Protocol::Tcp),
        libc::IPPROTO_UDP => Some(Protocol::Udp),
        libc::IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

pub struct Kernel {
    ipvs: Ipvs,
    dummy: DummyLink,
    ipv6: bool,
}

fn err(op: &str) -> impl Fn(netlink::IpvsError) -> BackendError + '_ {
    move |e| BackendError::kernel(op, e)
}

impl Kernel {
    pub fn open(ipv6: bool) -> Result<Self, BackendError> {
        Ok(Self {
            ipvs: Ipvs::open().map_err(err("opening IPVS (generic netlink family IPVS)"))?,
            dummy: DummyLink::open().map_err(|e| BackendError::kernel("opening rtnetlink", e))?,
            ipv6,
        })
    }

    fn key(&self, key: &VsKey) -> ServiceKey {
        match *key {
            VsKey::Addr { ip, port, protocol } => ServiceKey::Addr {
                addr: ip,
                port,
                protocol: ipproto(protocol),
            },
            VsKey::Fwmark(mark) => ServiceKey::Fwmark {
                ipv6: self.ipv6,
                mark,
            },
        }
    }

    fn service(&self, key: &VsKey, spec: &Spec) -> netlink::Service {
        netlink::Service {
            key: self.key(key),
            scheduler: spec.scheduler.clone(),
            flags: if spec.persistence.is_some() {
                PERSISTENT
            } else {
                0
            },
            timeout: spec.persistence.unwrap_or(0),
            netmask: if self.ipv6 { 128 } else { u32::MAX },
        }
    }

    /// This family's virtual servers, with their real servers (weights).
    pub fn services(&mut self) -> Result<BTreeMap<VsKey, Held>, BackendError> {
        let listed = self.ipvs.services().map_err(err("listing IPVS services"))?;
        let mut out = BTreeMap::new();
        for s in listed {
            let Some((key, proto)) = self.plan_key(&s.key) else {
                continue;
            };
            let dests = self
                .ipvs
                .dests(&s.key)
                .map_err(err("listing IPVS real servers"))?;
            out.insert(
                key,
                Held {
                    // A firewall-mark server does not say its protocol; kpx gives it one
                    // frontend's, so TCP is the safe reading (drain rather than drop).
                    protocol: proto.unwrap_or(Protocol::Tcp),
                    scheduler: s.scheduler.clone(),
                    persistence: (s.flags & PERSISTENT != 0).then_some(s.timeout),
                    dests: dests.iter().map(|d| ((d.addr, d.port), d.weight)).collect(),
                },
            );
        }
        Ok(out)
    }

    /// The plan's key of a listed server, if it is of this family.
    fn plan_key(&self, key: &ServiceKey) -> Option<(VsKey, Option<Protocol>)> {
        match key {
            ServiceKey::Addr {
                addr,
                port,
                protocol: p,
            } if addr.is_ipv6() == self.ipv6 => {
                let protocol = protocol(*p)?;
                Some((
                    VsKey::Addr {
                        ip: *addr,
                        port: *port,
                        protocol,
                    },
                    Some(protocol),
                ))
            }
            ServiceKey::Fwmark { ipv6, mark } if *ipv6 == self.ipv6 => {
                Some((VsKey::Fwmark(*mark), None))
            }
            _ => None,
        }
    }

    /// This family's virtual servers, without their real servers (the lost-state check).
    pub fn service_keys(&mut self) -> Result<BTreeSet<VsKey>, BackendError> {
        let listed = self.ipvs.services().map_err(err("listing IPVS services"))?;
        Ok(listed
            .iter()
            .filter_map(|s| self.plan_key(&s.key).map(|(k, _)| k))
            .collect())
    }

    /// One server's real servers: weight, and active + inactive connections.
    pub fn dests(&mut self, key: &VsKey) -> Result<BTreeMap<Dest, (u32, u32)>, BackendError> {
        let dests = self
            .ipvs
            .dests(&self.key(key))
            .map_err(err("listing IPVS real servers"))?;
        Ok(dests
            .iter()
            .map(|d| {
                (
                    (d.addr, d.port),
                    (d.weight, d.active_conns.saturating_add(d.inactive_conns)),
                )
            })
            .collect())
    }

    /// Sends every change, pipelined; one result per change. An add that finds the object
    /// there, or a delete that finds it gone, is what was wanted.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Vec<Result<(), String>>, BackendError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let dest = |(addr, port): Dest, weight: u32| netlink::Dest {
            addr,
            port,
            weight,
            active_conns: 0,
            inactive_conns: 0,
        };
        let ops: Vec<Op> = changes
            .iter()
            .map(|c| match c {
                Change::AddService(k, s) => Op::NewService(self.service(k, s)),
                Change::EditService(k, s) => Op::SetService(self.service(k, s)),
                Change::DelService(k) => Op::DelService(self.key(k)),
                Change::AddDest(k, d, w) => Op::NewDest(self.key(k), dest(*d, *w)),
                Change::EditDest(k, d, w) => Op::SetDest(self.key(k), dest(*d, *w)),
                Change::DelDest(k, d) => Op::DelDest(self.key(k), d.0, d.1),
            })
            .collect();
        let results = self.ipvs.apply(&ops).map_err(err("writing IPVS"))?;
        Ok(results
            .into_iter()
            .zip(changes)
            .map(|(r, c)| match (r, c) {
                (Ok(()), _) => Ok(()),
                (Err(e), Change::AddService(..) | Change::AddDest(..)) if e == libc::EEXIST => {
                    Ok(())
                }
                (Err(e), Change::DelService(..) | Change::DelDest(..))
                    if e == libc::ENOENT || e == libc::ESRCH =>
                {
                    Ok(())
                }
                (Err(e), _) => Err(std::io::Error::from_raw_os_error(e).to_string()),
            })
            .collect())
    }

    /// IPVS's connection timeouts (zero leaves one as it is).
    pub fn set_timeouts(
        &mut self,
        tcp: Duration,
        tcpfin: Duration,
        udp: Duration,
    ) -> Result<(), BackendError> {
        if tcp.is_zero() && tcpfin.is_zero() && udp.is_zero() {
            return Ok(());
        }
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        self.ipvs
            .set_timeouts(&netlink::Timeouts {
                tcp: secs(tcp),
                tcp_fin: secs(tcpfin),
                udp: secs(udp),
            })
            .map_err(err("setting IPVS timeouts"))
    }

    /// (IPVS netlink messages sent, `sendmsg` calls made) since `open`: what a sync cost.
    pub fn ipvs_stats(&self) -> (u64, u64) {
        self.ipvs.stats()
    }

    pub fn ensure_dummy(&mut self) -> Result<u32, BackendError> {
        self.dummy
            .ensure()
            .map_err(|e| BackendError::kernel("creating kpx-ipvs0", e))
    }

    pub fn dummy_index(&mut self) -> Result<Option<u32>, BackendError> {
        self.dummy
            .link()
            .map(|l| l.map(|l| l.index))
            .map_err(|e| BackendError::kernel("reading kpx-ipvs0", e))
    }

    /// This family's addresses on the dummy interface.
    pub fn dummy_addresses(&mut self, ifindex: u32) -> Result<Vec<IpAddr>, BackendError> {
        let all = self
            .dummy
            .addresses(ifindex)
            .map_err(|e| BackendError::kernel("listing kpx-ipvs0's addresses", e))?;
        Ok(all
            .into_iter()
            .filter(|ip| ip.is_ipv6() == self.ipv6)
            .collect())
    }

    pub fn add_address(&mut self, ifindex: u32, ip: IpAddr) -> Result<(), BackendError> {
        self.dummy
            .add_address(ifindex, ip)
            .map(|_| ())
            .map_err(|e| BackendError::kernel(format!("binding {ip} to kpx-ipvs0"), e))
    }

    pub fn del_address(&mut self, ifindex: u32, ip: IpAddr) -> Result<(), BackendError> {
        self.dummy
            .del_address(ifindex, ip)
            .map(|_| ())
            .map_err(|e| BackendError::kernel(format!("unbinding {ip} from kpx-ipvs0"), e))
    }
}

/// The sysctls kube-proxy's IPVS mode sets, in this namespace only (each is per namespace):
/// `vs/conntrack` (IPVS keeps conntrack entries, so the iptables part can masquerade),
/// `vs/expire_nodest_conn` (packets of a connection whose real server is gone end it, instead
/// of being dropped until it times out), `vs/expire_quiescent_template` (persistence templates
/// of a weight-0 server expire, so affinity does not pin clients to a draining one), and strict
/// ARP on request.
pub fn sysctls(strict_arp: bool) -> Result<(), BackendError> {
    let mut wanted = vec![
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
    ];
    // conn_reuse_mode=1 stalled reused connections for a second before 5.9 (k8s#81775);
    // kube-proxy sets 0 on older kernels and leaves it alone since.
    if kernel_before(5, 9) {
        wanted.push(("net/ipv4/vs/conn_reuse_mode", "0"));
    }
    if strict_arp {
        wanted.push(("net/ipv4/conf/all/arp_ignore", "1"));
        wanted.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    for (name, value) in wanted {
        let path = format!("/proc/sys/{name}");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.trim() == value {
            continue;
        }
        std::fs::write(&path, value)
            .map_err(|e| BackendError::kernel(format!("setting {name}={value}"), e))?;
    }
    Ok(())
}

fn kernel_before(major: u32, minor: u32) -> bool {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_default();
    let mut parts = release
        .split(['.', '-'])
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => false,
    }
}
