//! Kernel IPVS over generic netlink (family "IPVS", `include/uapi/linux/ip_vs.h`), without
//! `ipvsadm`: virtual servers and their real servers written and read back, the connection
//! timeouts, and the kernel's version.
//!
//! Why pipelined: IPVS answers every message on its own (it is not transactional: a failure
//! midway leaves the earlier messages applied), so a sync that writes one message and waits
//! for its ACK pays a round trip per virtual or real server — kube-proxy's IPVS mode makes
//! 30,000+ of them per sync at 10,000 Services. [`Ipvs::apply`] puts as many messages as the
//! socket buffers allow into one `sendmsg` (the kernel runs the whole datagram before the call
//! returns and queues one ACK per message), then reads every ACK and matches it to its
//! operation by sequence number. [`Ipvs::stats`] counts both, so the backend can say how many
//! messages a change cost.
//!
//! The netlink and generic netlink headers come from `netlink-packet-core` and
//! `netlink-packet-generic` (0.5, the release built on core 0.9); the IPVS attributes are
//! written by hand with the header's numbers, in the layout ipvsadm's libipvs sends and the
//! kernel's `ip_vs_genl_parse_service`/`ip_vs_genl_parse_dest` read (see `netlink_tests.rs`
//! for every message's bytes, annotated).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NlasIterator, NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use crate::backend::BackendError;

/// The generic netlink family name (`IPVS_GENL_NAME`) and version (`IPVS_GENL_VERSION`).
pub const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

/// `GENL_ID_CTRL`: nlctrl's fixed family id, which resolves the others.
const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_ATTR_FAMILY_ID`.
const CTRL_ATTR_FAMILY_ID: u16 = 1;

/// `IPVS_CMD_*`.
mod cmd {
    pub const NEW_SERVICE: u8 = 1;
    pub const SET_SERVICE: u8 = 2;
    pub const DEL_SERVICE: u8 = 3;
    pub const GET_SERVICE: u8 = 4;
    pub const NEW_DEST: u8 = 5;
    pub const SET_DEST: u8 = 6;
    pub const DEL_DEST: u8 = 7;
    pub const GET_DEST: u8 = 8;
    pub const SET_CONFIG: u8 = 12;
    pub const GET_CONFIG: u8 = 13;
    pub const GET_INFO: u8 = 15;
}

/// `IPVS_CMD_ATTR_*`: the top level of every IPVS message.
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

/// `IPVS_SVC_ATTR_*`, inside `IPVS_CMD_ATTR_SERVICE`.
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

/// `IPVS_DEST_ATTR_*`, inside `IPVS_CMD_ATTR_DEST`.
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IPVS_INFO_ATTR_*`, at the top level of the `IPVS_CMD_GET_INFO` answer.
const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

/// `IP_VS_CONN_F_MASQ`: NAT, the only forwarding method kpx writes.
const IP_VS_CONN_F_MASQ: u32 = 0;

/// `IP_VS_SVC_F_*`: service flags.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// Set by the kernel on every hashed (installed) service; never written, dropped when read.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;
pub const IP_VS_SVC_F_SCHED3: u32 = 0x0020;
/// mh: on a destination with weight 0, pick another one (`IP_VS_SVC_F_SCHED_MH_FALLBACK`).
pub const IP_VS_SVC_F_SCHED_MH_FALLBACK: u32 = IP_VS_SVC_F_SCHED1;
/// mh: hash the source port too (`IP_VS_SVC_F_SCHED_MH_PORT`).
pub const IP_VS_SVC_F_SCHED_MH_PORT: u32 = IP_VS_SVC_F_SCHED2;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// How a virtual server is found: by address, port and protocol, or by firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    Addr {
        addr: IpAddr,
        port: u16,
        /// `IPPROTO_TCP`, `IPPROTO_UDP` or `IPPROTO_SCTP`.
        protocol: u8,
    },
    Fwmark {
        ipv6: bool,
        mark: u32,
    },
}

impl ServiceKey {
    pub fn ipv6(&self) -> bool {
        match self {
            ServiceKey::Addr { addr, .. } => addr.is_ipv6(),
            ServiceKey::Fwmark { ipv6, .. } => *ipv6,
        }
    }
}

/// A virtual server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    /// rr, wrr, lc, sh, mh, … (at most 15 bytes: `IP_VS_SCHEDNAME_MAXLEN`).
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` (never `IP_VS_SVC_F_HASHED`, the kernel's own).
    pub flags: u32,
    /// Persistence in seconds (with `IP_VS_SVC_F_PERSISTENT`), 0 = none.
    pub timeout: u32,
    /// The persistence granularity, as the kernel keeps it: for IPv4 a mask as a number
    /// (`0xffff_ffff` = per client address), for IPv6 a prefix length (1 to 128; the kernel
    /// refuses an IPv6 service with any other value, persistent or not).
    pub netmask: u32,
}

/// A real server of a virtual server. Always written with NAT forwarding (masquerade).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Read back only (ignored when written).
    pub active_conns: u32,
    /// Read back only (ignored when written).
    pub inactive_conns: u32,
}

/// One change to the kernel's IPVS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    NewService(Service),
    SetService(Service),
    DelService(ServiceKey),
    NewDest(ServiceKey, Dest),
    SetDest(ServiceKey, Dest),
    DelDest(ServiceKey, IpAddr, u16),
}

/// `IPVS_CMD_GET_INFO`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// `IP_VS_VERSION_CODE`: major, minor and patch in one byte each (0x010201 = 1.2.1).
    pub version: u32,
    /// The connection hash table's size (`ip_vs_conn_tab_size`).
    pub conn_tab_size: u32,
}

impl Info {
    pub fn version_text(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
    }
}

/// IPVS connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`). When written, 0
/// keeps the kernel's value (the kernel ignores a zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no IPVS family (no `ip_vs` module loaded, or no CONFIG_IP_VS).
    #[error("kernel IPVS is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Kernel(#[from] BackendError),
}

impl From<IpvsError> for BackendError {
    fn from(e: IpvsError) -> Self {
        match e {
            IpvsError::Kernel(e) => e,
            e @ IpvsError::Unavailable(_) => BackendError::kernel("opening kernel IPVS", e),
        }
    }
}

/// The IPVS payload of a generic netlink message: its command and its attributes.
#[derive(Debug, Clone)]
struct IpvsPayload {
    cmd: u8,
    attributes: Vec<DefaultNla>,
}

impl GenlFamily for IpvsPayload {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsPayload {
    fn buffer_len(&self) -> usize {
        self.attributes.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attributes.as_slice().emit(buffer)
    }
}

fn genl_message<F>(family_id: u16, flags: u16, seq: u32, payload: F) -> Vec<u8>
where
    F: GenlFamily + Emitable + std::fmt::Debug,
{
    let genl = GenlMessage::new(
        GenlHeader {
            cmd: payload.command(),
            version: payload.version(),
        },
        payload,
        family_id,
    );
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(genl));
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

fn ipvs_message(
    family_id: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    attributes: Vec<DefaultNla>,
) -> Vec<u8> {
    genl_message(family_id, flags, seq, IpvsPayload { cmd, attributes })
}

fn nested(kind: u16, inner: &[DefaultNla]) -> DefaultNla {
    let mut value = vec![0; inner.buffer_len()];
    inner.emit(&mut value);
    DefaultNla::new(kind | NLA_F_NESTED, value)
}

fn u16_attr(kind: u16, v: u16) -> DefaultNla {
    DefaultNla::new(kind, v.to_ne_bytes().to_vec())
}

fn u32_attr(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_ne_bytes().to_vec())
}

/// Ports are `__be16` (`nla_get_be16`).
fn port_attr(kind: u16, port: u16) -> DefaultNla {
    DefaultNla::new(kind, port.to_be_bytes().to_vec())
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4 (as ipvsadm and the
/// kernel's own answers write it).
fn addr_attr(kind: u16, addr: IpAddr) -> DefaultNla {
    let mut value = vec![0u8; 16];
    match addr {
        IpAddr::V4(a) => value[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => value.copy_from_slice(&a.octets()),
    }
    DefaultNla::new(kind, value)
}

fn af(ipv6: bool) -> u16 {
    if ipv6 {
        AF_INET6
    } else {
        AF_INET
    }
}

/// The attributes that name a service (all a delete needs).
fn key_attributes(key: &ServiceKey) -> Vec<DefaultNla> {
    let mut out = vec![u16_attr(SVC_ATTR_AF, af(key.ipv6()))];
    match *key {
        ServiceKey::Addr {
            addr,
            port,
            protocol,
        } => {
            out.push(u16_attr(SVC_ATTR_PROTOCOL, protocol.into()));
            out.push(addr_attr(SVC_ATTR_ADDR, addr));
            out.push(port_attr(SVC_ATTR_PORT, port));
        }
        ServiceKey::Fwmark { mark, .. } => out.push(u32_attr(SVC_ATTR_FWMARK, mark)),
    }
    out
}

/// The netmask's bytes: `__be32` for the kernel; an IPv4 mask is compared with addresses in
/// network order, an IPv6 prefix length is read back as a plain number (`(__force u32)`).
fn netmask_bytes(ipv6: bool, netmask: u32) -> Vec<u8> {
    if ipv6 {
        netmask.to_ne_bytes().to_vec()
    } else {
        netmask.to_be_bytes().to_vec()
    }
}

/// A whole service: the kernel requires scheduler, flags, timeout and netmask on NEW and SET
/// (`ip_vs_genl_parse_service` with `full_entry`).
fn service_attributes(s: &Service) -> Vec<DefaultNla> {
    let mut out = key_attributes(&s.key);
    let mut name = s.scheduler.as_bytes().to_vec();
    name.push(0);
    out.push(DefaultNla::new(SVC_ATTR_SCHED_NAME, name));
    // struct ip_vs_flags { flags, mask }: the kernel keeps the old flags outside the mask;
    // all ones makes the written flags the whole set (as ipvsadm does).
    let mut flags = (s.flags & !IP_VS_SVC_F_HASHED).to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    out.push(DefaultNla::new(SVC_ATTR_FLAGS, flags));
    out.push(u32_attr(SVC_ATTR_TIMEOUT, s.timeout));
    out.push(DefaultNla::new(
        SVC_ATTR_NETMASK,
        netmask_bytes(s.key.ipv6(), s.netmask),
    ));
    out
}

fn dest_key_attributes(addr: IpAddr, port: u16) -> Vec<DefaultNla> {
    vec![
        addr_attr(DEST_ATTR_ADDR, addr),
        port_attr(DEST_ATTR_PORT, port),
    ]
}

/// A whole destination: NEW and SET require forwarding method, weight and both thresholds.
/// The address family is written so that a mismatch with the service is the kernel's EINVAL
/// (only tunnelled destinations may differ), not a misread address.
fn dest_attributes(d: &Dest) -> Vec<DefaultNla> {
    let mut out = dest_key_attributes(d.addr, d.port);
    out.push(u32_attr(DEST_ATTR_FWD_METHOD, IP_VS_CONN_F_MASQ));
    out.push(u32_attr(DEST_ATTR_WEIGHT, d.weight));
    out.push(u32_attr(DEST_ATTR_U_THRESH, 0));
    out.push(u32_attr(DEST_ATTR_L_THRESH, 0));
    out.push(u16_attr(DEST_ATTR_ADDR_FAMILY, af(d.addr.is_ipv6())));
    out
}

/// One operation as one netlink message with `NLM_F_ACK` and sequence number `seq`. Pure:
/// the golden tests hold its bytes.
pub fn encode(op: &Op, family_id: u16, seq: u32) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    let (command, attributes) = match op {
        Op::NewService(s) => (
            cmd::NEW_SERVICE,
            vec![nested(CMD_ATTR_SERVICE, &service_attributes(s))],
        ),
        Op::SetService(s) => (
            cmd::SET_SERVICE,
            vec![nested(CMD_ATTR_SERVICE, &service_attributes(s))],
        ),
        Op::DelService(k) => (
            cmd::DEL_SERVICE,
            vec![nested(CMD_ATTR_SERVICE, &key_attributes(k))],
        ),
        Op::NewDest(k, d) => (
            cmd::NEW_DEST,
            vec![
                nested(CMD_ATTR_SERVICE, &key_attributes(k)),
                nested(CMD_ATTR_DEST, &dest_attributes(d)),
            ],
        ),
        Op::SetDest(k, d) => (
            cmd::SET_DEST,
            vec![
                nested(CMD_ATTR_SERVICE, &key_attributes(k)),
                nested(CMD_ATTR_DEST, &dest_attributes(d)),
            ],
        ),
        Op::DelDest(k, addr, port) => {
            let mut dest = dest_key_attributes(*addr, *port);
            dest.push(u16_attr(DEST_ATTR_ADDR_FAMILY, af(addr.is_ipv6())));
            (
                cmd::DEL_DEST,
                vec![
                    nested(CMD_ATTR_SERVICE, &key_attributes(k)),
                    nested(CMD_ATTR_DEST, &dest),
                ],
            )
        }
    };
    ipvs_message(family_id, flags, seq, command, attributes)
}

/// `IPVS_CMD_GET_SERVICE` as a dump: every service of both families.
pub fn encode_dump_services(family_id: u16, seq: u32) -> Vec<u8> {
    ipvs_message(
        family_id,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        cmd::GET_SERVICE,
        Vec::new(),
    )
}

/// `IPVS_CMD_GET_DEST` as a dump: the destinations of one service.
pub fn encode_dump_dests(family_id: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    ipvs_message(
        family_id,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        cmd::GET_DEST,
        vec![nested(CMD_ATTR_SERVICE, &key_attributes(key))],
    )
}

/// `IPVS_CMD_GET_INFO` or `IPVS_CMD_GET_CONFIG`: one answer, then the ACK.
fn encode_get(family_id: u16, seq: u32, command: u8) -> Vec<u8> {
    ipvs_message(
        family_id,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        command,
        Vec::new(),
    )
}

/// `IPVS_CMD_SET_CONFIG` with the non-zero timeouts only.
pub fn encode_set_timeouts(family_id: u16, seq: u32, t: &Timeouts) -> Vec<u8> {
    let attributes = [
        (CMD_ATTR_TIMEOUT_TCP, t.tcp),
        (CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
        (CMD_ATTR_TIMEOUT_UDP, t.udp),
    ]
    .into_iter()
    .filter(|(_, v)| *v != 0)
    .map(|(k, v)| u32_attr(k, v))
    .collect();
    ipvs_message(
        family_id,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd::SET_CONFIG,
        attributes,
    )
}

/// nlctrl's `CTRL_CMD_GETFAMILY` for "IPVS".
pub fn encode_resolve(seq: u32) -> Vec<u8> {
    let ctrl = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_string())],
    };
    genl_message(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, ctrl)
}

/// Why an answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

fn bad(text: impl Into<String>) -> DecodeError {
    DecodeError(text.into())
}

/// The attributes of `buf`, as (type without flags, value).
fn attributes(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    let mut out = Vec::new();
    for nla in NlasIterator::new(buf) {
        let nla = nla.map_err(|e| bad(format!("a bad attribute: {e}")))?;
        let kind = nla.kind() & NLA_TYPE_MASK;
        let length = usize::from(nla.length());
        // The iterator's buffer runs to the end of `buf`: this attribute is its first
        // `length` bytes (the 4-byte header included, the padding not).
        let value = nla
            .into_inner()
            .get(4..length)
            .ok_or_else(|| bad(format!("an attribute of length {length}")))?;
        out.push((kind, value));
    }
    Ok(out)
}

fn get_u16(v: &[u8], what: &str) -> Result<u16, DecodeError> {
    v.get(..2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or_else(|| bad(format!("{what}: {} bytes, want 2", v.len())))
}

fn get_u32(v: &[u8], what: &str) -> Result<u32, DecodeError> {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| bad(format!("{what}: {} bytes, want 4", v.len())))
}

fn get_port(v: &[u8], what: &str) -> Result<u16, DecodeError> {
    get_u16(v, what).map(u16::from_be)
}

fn get_addr(v: &[u8], ipv6: bool, what: &str) -> Result<IpAddr, DecodeError> {
    if ipv6 {
        let octets: [u8; 16] = v
            .get(..16)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad(format!("{what}: {} bytes, want 16", v.len())))?;
        Ok(IpAddr::V6(Ipv6Addr::from(octets)))
    } else {
        let octets: [u8; 4] = v
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad(format!("{what}: {} bytes, want 4 or 16", v.len())))?;
        Ok(IpAddr::V4(Ipv4Addr::from(octets)))
    }
}

fn family_is_ipv6(family: u16) -> Result<bool, DecodeError> {
    match family {
        AF_INET => Ok(false),
        AF_INET6 => Ok(true),
        other => Err(bad(format!(
            "address family {other}, want AF_INET or AF_INET6"
        ))),
    }
}

/// A service from the value of `IPVS_CMD_ATTR_SERVICE` (the nested `IPVS_SVC_ATTR_*`).
/// Statistics and attributes kpx does not write are skipped; `IP_VS_SVC_F_HASHED` is dropped.
pub fn decode_service(nested: &[u8]) -> Result<Service, DecodeError> {
    let attrs = attributes(nested)?;
    let find = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    let af = find(SVC_ATTR_AF).ok_or_else(|| bad("a service without IPVS_SVC_ATTR_AF"))?;
    let ipv6 = family_is_ipv6(get_u16(af, "IPVS_SVC_ATTR_AF")?)?;
    let key = match find(SVC_ATTR_FWMARK) {
        Some(mark) => ServiceKey::Fwmark {
            ipv6,
            mark: get_u32(mark, "IPVS_SVC_ATTR_FWMARK")?,
        },
        None => {
            let need = |kind, name: &str| {
                find(kind).ok_or_else(|| bad(format!("a service without fwmark or {name}")))
            };
            let protocol = get_u16(need(SVC_ATTR_PROTOCOL, "protocol")?, "protocol")?;
            ServiceKey::Addr {
                addr: get_addr(need(SVC_ATTR_ADDR, "address")?, ipv6, "IPVS_SVC_ATTR_ADDR")?,
                port: get_port(need(SVC_ATTR_PORT, "port")?, "IPVS_SVC_ATTR_PORT")?,
                protocol: u8::try_from(protocol)
                    .map_err(|_| bad(format!("protocol {protocol} is not an IPPROTO_*")))?,
            }
        }
    };
    let scheduler = match find(SVC_ATTR_SCHED_NAME) {
        Some(name) => {
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            String::from_utf8(name[..end].to_vec())
                .map_err(|_| bad("a scheduler name that is not UTF-8"))?
        }
        None => String::new(),
    };
    let flags = match find(SVC_ATTR_FLAGS) {
        Some(v) => get_u32(v, "IPVS_SVC_ATTR_FLAGS")? & !IP_VS_SVC_F_HASHED,
        None => 0,
    };
    let timeout = match find(SVC_ATTR_TIMEOUT) {
        Some(v) => get_u32(v, "IPVS_SVC_ATTR_TIMEOUT")?,
        None => 0,
    };
    let netmask = match find(SVC_ATTR_NETMASK) {
        Some(v) => {
            let raw = get_u32(v, "IPVS_SVC_ATTR_NETMASK")?;
            // The attribute is __be32 bytes: an IPv4 mask in network order.
            if ipv6 {
                raw
            } else {
                u32::from_be(raw)
            }
        }
        None => 0,
    };
    Ok(Service {
        key,
        scheduler,
        flags,
        timeout,
        netmask,
    })
}

/// A destination from the value of `IPVS_CMD_ATTR_DEST`. `service_ipv6` is the family to
/// assume when the kernel (before 4.14) does not send `IPVS_DEST_ATTR_ADDR_FAMILY`.
pub fn decode_dest(nested: &[u8], service_ipv6: bool) -> Result<Dest, DecodeError> {
    let attrs = attributes(nested)?;
    let find = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    let ipv6 = match find(DEST_ATTR_ADDR_FAMILY) {
        Some(v) => family_is_ipv6(get_u16(v, "IPVS_DEST_ATTR_ADDR_FAMILY")?)?,
        None => service_ipv6,
    };
    let addr = find(DEST_ATTR_ADDR).ok_or_else(|| bad("a destination without an address"))?;
    let port = find(DEST_ATTR_PORT).ok_or_else(|| bad("a destination without a port"))?;
    let number = |kind, what: &str| -> Result<u32, DecodeError> {
        find(kind).map(|v| get_u32(v, what)).unwrap_or(Ok(0))
    };
    Ok(Dest {
        addr: get_addr(addr, ipv6, "IPVS_DEST_ATTR_ADDR")?,
        port: get_port(port, "IPVS_DEST_ATTR_PORT")?,
        weight: number(DEST_ATTR_WEIGHT, "IPVS_DEST_ATTR_WEIGHT")?,
        active_conns: number(DEST_ATTR_ACTIVE_CONNS, "IPVS_DEST_ATTR_ACTIVE_CONNS")?,
        inactive_conns: number(DEST_ATTR_INACT_CONNS, "IPVS_DEST_ATTR_INACT_CONNS")?,
    })
}

/// The answer to `IPVS_CMD_GET_INFO` (its top-level attributes).
pub fn decode_info(top: &[u8]) -> Result<Info, DecodeError> {
    let attrs = attributes(top)?;
    let find = |kind: u16, what: &str| -> Result<u32, DecodeError> {
        let v = attrs
            .iter()
            .find(|(k, _)| *k == kind)
            .ok_or_else(|| bad(format!("no {what}")))?;
        get_u32(v.1, what)
    };
    Ok(Info {
        version: find(INFO_ATTR_VERSION, "IPVS_INFO_ATTR_VERSION")?,
        conn_tab_size: find(INFO_ATTR_CONN_TAB_SIZE, "IPVS_INFO_ATTR_CONN_TAB_SIZE")?,
    })
}

/// The answer to `IPVS_CMD_GET_CONFIG` (its top-level attributes; a missing one is 0).
pub fn decode_timeouts(top: &[u8]) -> Result<Timeouts, DecodeError> {
    let attrs = attributes(top)?;
    let find = |kind: u16, what: &str| -> Result<u32, DecodeError> {
        match attrs.iter().find(|(k, _)| *k == kind) {
            Some((_, v)) => get_u32(v, what),
            None => Ok(0),
        }
    };
    Ok(Timeouts {
        tcp: find(CMD_ATTR_TIMEOUT_TCP, "IPVS_CMD_ATTR_TIMEOUT_TCP")?,
        tcp_fin: find(CMD_ATTR_TIMEOUT_TCP_FIN, "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")?,
        udp: find(CMD_ATTR_TIMEOUT_UDP, "IPVS_CMD_ATTR_TIMEOUT_UDP")?,
    })
}

/// The value of the first top-level attribute `kind` of a generic netlink payload's
/// attributes.
pub fn top_attribute(top: &[u8], kind: u16) -> Result<Option<&[u8]>, DecodeError> {
    Ok(attributes(top)?
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v))
}

/// One netlink message of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// NLMSG_ERROR: 0 (an ACK) or a negative errno.
    Ack(i32),
    /// NLMSG_DONE, with its code (0 or a negative errno).
    Done(i32),
    /// Any other message: its type and what follows the netlink header.
    Message { kind: u16, payload: Vec<u8> },
}

/// The messages of one datagram, each with its sequence number.
pub fn frames(datagram: &[u8]) -> Result<Vec<(u32, Frame)>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let buffer = NetlinkBuffer::new_checked(rest)
            .map_err(|e| bad(format!("a netlink message does not fit its datagram: {e}")))?;
        let length = buffer.length() as usize;
        let seq = buffer.sequence_number();
        let kind = buffer.message_type();
        let payload = &rest[16..length];
        let code = || {
            payload
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_ne_bytes)
                .ok_or_else(|| bad("an NLMSG_ERROR or NLMSG_DONE without its code"))
        };
        let frame = match kind {
            NLMSG_ERROR => Frame::Ack(code()?),
            NLMSG_DONE => Frame::Done(code()?),
            _ => Frame::Message {
                kind,
                payload: payload.to_vec(),
            },
        };
        out.push((seq, frame));
        // Messages are 4-byte aligned inside a datagram (NLMSG_ALIGN).
        let advance = (length + 3) & !3;
        rest = rest.get(advance..).unwrap_or_default();
    }
    Ok(out)
}

/// A generic netlink payload split into its command and its attributes.
pub fn genl_split(payload: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    if payload.len() < 4 {
        return Err(bad(format!(
            "a generic netlink message of {} bytes, shorter than its header",
            payload.len()
        )));
    }
    Ok((payload[0], &payload[4..]))
}

pub(crate) fn errno_text(code: i32) -> String {
    io::Error::from_raw_os_error(code.saturating_abs()).to_string()
}

/// The kernel fills a dump datagram up to 32 KiB; a larger buffer never truncates one.
const RECV_BUFFER: usize = 64 * 1024;
/// The longest one receive waits: the kernel answers a request before `sendmsg` returns, so
/// only a broken kernel makes this expire.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// The receive buffer asked for (SO_RCVBUFFORCE, root only; else what rmem_max allows): room
/// for the ACKs of a large window.
const WANTED_RCVBUF: usize = 4 << 20;
/// At most this many bytes of requests in one datagram (well inside the default send buffer,
/// 212,992 bytes, which netlink_sendmsg checks the datagram against).
const MAX_DATAGRAM: usize = 64 * 1024;
/// Receive buffer bytes reserved per unread ACK. A capped ACK is a 36-byte message whose
/// socket buffer costs the receive queue ~768 bytes (skb truesize); the kernel drops an ACK
/// that does not fit (ENOBUFS on the next read), so leave more than twice that.
const RCVBUF_PER_ACK: usize = 2048;
const MIN_WINDOW: usize = 16;
const MAX_WINDOW: usize = 1024;

/// The messages answering one request (type, payload), or the kernel's errno.
pub(crate) type Answers = Result<Vec<(u16, Vec<u8>)>, i32>;

/// A synchronous netlink socket (for generic netlink here, rtnetlink in `dummy.rs`): requests
/// with their own sequence numbers, answers matched to them.
pub(crate) struct Conn {
    socket: Socket,
    seq: u32,
    buffer: Vec<u8>,
    /// Messages sent, and `sendmsg` calls made.
    pub messages: u64,
    pub sendmsg_calls: u64,
    /// Every datagram received, while recording (the tests' recorded kernel answers).
    recorded: Option<Vec<Vec<u8>>>,
}

impl Conn {
    pub fn open(protocol: isize, what: &str) -> Result<Self, BackendError> {
        let op = format!("opening a {what} socket");
        let mut socket = Socket::new(protocol).map_err(|e| BackendError::kernel(&op, e))?;
        socket
            .bind_auto()
            .map_err(|e| BackendError::kernel(&op, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| BackendError::kernel(&op, e))?;
        // ACKs without a copy of each request: more of them fit in the receive buffer.
        socket
            .set_cap_ack(true)
            .map_err(|e| BackendError::kernel(&op, e))?;
        let timeout = nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| BackendError::kernel(&op, e))?;
        Ok(Self {
            socket,
            seq: 0,
            buffer: vec![0; RECV_BUFFER],
            messages: 0,
            sendmsg_calls: 0,
            recorded: None,
        })
    }

    /// Grows the receive buffer as far as allowed (no error when it cannot) and returns how
    /// many ACKs may stay unread at once.
    pub fn grow_for_acks(&mut self) -> usize {
        use nix::sys::socket::{setsockopt, sockopt};
        let fd = &self.socket;
        if setsockopt(fd, sockopt::RcvBufForce, &WANTED_RCVBUF).is_err() {
            // Not root: as much as net.core.rmem_max allows.
            let _ = setsockopt(fd, sockopt::RcvBuf, &WANTED_RCVBUF);
        }
        let rcvbuf = nix::sys::socket::getsockopt(fd, sockopt::RcvBuf).unwrap_or(212_992);
        (rcvbuf / RCVBUF_PER_ACK).clamp(MIN_WINDOW, MAX_WINDOW)
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn send(&mut self, bytes: &[u8], messages: usize, op: &str) -> Result<(), BackendError> {
        let sent = self
            .socket
            .send(bytes, 0)
            .map_err(|e| BackendError::kernel(op, e))?;
        self.sendmsg_calls += 1;
        self.messages += messages as u64;
        if sent != bytes.len() {
            return Err(BackendError::kernel(
                op,
                format!("sent {sent} of {} bytes", bytes.len()),
            ));
        }
        Ok(())
    }

    /// One datagram's messages.
    pub fn recv(&mut self, op: &str) -> Result<Vec<(u32, Frame)>, BackendError> {
        loop {
            // MSG_TRUNC: the datagram's real length, to detect a truncated one.
            match self.socket.recv(&mut &mut self.buffer[..], libc::MSG_TRUNC) {
                Ok(n) if n > self.buffer.len() => {
                    return Err(BackendError::kernel(
                        op,
                        format!(
                            "a {n}-byte datagram does not fit the {}-byte buffer",
                            self.buffer.len()
                        ),
                    ))
                }
                Ok(n) => {
                    if let Some(recorded) = &mut self.recorded {
                        recorded.push(self.buffer[..n].to_vec());
                    }
                    return frames(&self.buffer[..n]).map_err(|e| BackendError::kernel(op, e));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(BackendError::kernel(
                        op,
                        format!("the kernel did not answer within {RECV_TIMEOUT:?}"),
                    ))
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(BackendError::kernel(
                        op,
                        "the receive buffer overflowed and the kernel dropped answers (ENOBUFS)",
                    ))
                }
                Err(e) => return Err(BackendError::kernel(op, e)),
            }
        }
    }

    /// Sends one request and collects the messages answering it, until its ACK (a request
    /// with NLM_F_ACK) or NLMSG_DONE (a dump). `Ok(Err(errno))`: the kernel refused it.
    pub fn transact(&mut self, bytes: &[u8], seq: u32, op: &str) -> Result<Answers, BackendError> {
        self.send(bytes, 1, op)?;
        let mut messages = Vec::new();
        loop {
            for (answer_seq, frame) in self.recv(op)? {
                if answer_seq != seq {
                    // An answer to an earlier request that gave up (a timeout).
                    continue;
                }
                match frame {
                    Frame::Ack(0) | Frame::Done(0) => return Ok(Ok(messages)),
                    Frame::Ack(code) | Frame::Done(code) => return Ok(Err(code)),
                    Frame::Message { kind, payload } => messages.push((kind, payload)),
                }
            }
        }
    }
}

/// How a netlink family answers a datagram whose sender lacks a capability.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PermissionCheck {
    /// Every message is answered on its own (generic netlink, IPVS).
    PerMessage,
    /// nfnetlink checks CAP_NET_ADMIN once per datagram: EPERM answers only its first message
    /// and the rest are never answered.
    PerDatagram,
}

impl Conn {
    /// Pipelined: `messages` (each encoded with its NLM_F_ACK and its sequence number from
    /// [`next_seq`](Self::next_seq), in order) sent as many per `sendmsg` as `window` and
    /// [`MAX_DATAGRAM`] allow; every ACK of a datagram is read and matched by sequence before
    /// the next is sent. One result per message, in order: `Ok`, or the kernel's errno
    /// (negative). A refused message does not stop the others (the kernel goes on with the
    /// rest of the datagram). `Err` only when the socket fails; messages of the datagrams
    /// already sent may then be applied.
    pub fn pipelined(
        &mut self,
        messages: &[(u32, Vec<u8>)],
        window: usize,
        permission: PermissionCheck,
        op: &str,
    ) -> Result<Vec<Result<(), i32>>, BackendError> {
        let mut results: Vec<Option<Result<(), i32>>> = vec![None; messages.len()];
        let mut next = 0;
        while next < messages.len() {
            let start = next;
            let mut datagram = Vec::new();
            while next < messages.len() && next - start < window.max(1) {
                let message = &messages[next].1;
                if next > start && datagram.len() + message.len() > MAX_DATAGRAM {
                    break;
                }
                datagram.extend_from_slice(message);
                next += 1;
            }
            let count = next - start;
            let first_seq = messages[start].0;
            self.send(&datagram, count, op)?;
            let mut pending = count;
            while pending > 0 {
                for (seq, frame) in self.recv(op)? {
                    let Frame::Ack(code) = frame else { continue };
                    let index = seq.wrapping_sub(first_seq) as usize;
                    // Outside the window: an ACK left over from an earlier call that failed.
                    if index >= count || results[start + index].is_some() {
                        continue;
                    }
                    if code == -libc::EPERM
                        && index == 0
                        && permission == PermissionCheck::PerDatagram
                    {
                        for r in &mut results[start..next] {
                            r.get_or_insert(Err(code));
                        }
                        pending = 0;
                        break;
                    }
                    results[start + index] = Some(if code == 0 { Ok(()) } else { Err(code) });
                    pending -= 1;
                }
            }
        }
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| BackendError::kernel(op, format!("message {i} was never answered")))
            })
            .collect()
    }
}

/// One NETLINK_GENERIC socket speaking to the kernel's IPVS family.
pub struct Ipvs {
    conn: Conn,
    family_id: u16,
    window: usize,
}

fn refused(op: &str, code: i32) -> IpvsError {
    let hint = if code == -libc::EPERM {
        " (IPVS needs CAP_NET_ADMIN)"
    } else {
        ""
    };
    IpvsError::Kernel(BackendError::kernel(
        op,
        format!("{}{hint}", errno_text(code)),
    ))
}

impl Ipvs {
    /// Opens the socket and resolves the IPVS family's id. `Unavailable` when the kernel has
    /// no such family: no `ip_vs` module (nlctrl asks modprobe for the module's alias
    /// `net-pf-16-proto-16-family-IPVS` first, so a loadable module is loaded by this call
    /// where modprobe works) or a kernel built without it.
    pub fn open() -> Result<Ipvs, IpvsError> {
        let mut conn = Conn::open(NETLINK_GENERIC, "generic netlink (NETLINK_GENERIC)")?;
        let op = "resolving the IPVS generic netlink family";
        let seq = conn.next_seq();
        let answers =
            match conn.transact(&encode_resolve(seq), seq, op)? {
                Ok(answers) => answers,
                Err(code) if code == -libc::ENOENT => return Err(IpvsError::Unavailable(
                    "the kernel has no IPVS generic netlink family (no ip_vs module; CONFIG_IP_VS)"
                        .to_string(),
                )),
                Err(code) => return Err(refused(op, code)),
            };
        let mut family_id = None;
        for (kind, payload) in &answers {
            if *kind != GENL_ID_CTRL {
                continue;
            }
            let (_, top) = genl_split(payload).map_err(|e| BackendError::kernel(op, e))?;
            if let Some(v) =
                top_attribute(top, CTRL_ATTR_FAMILY_ID).map_err(|e| BackendError::kernel(op, e))?
            {
                family_id = Some(
                    get_u16(v, "CTRL_ATTR_FAMILY_ID").map_err(|e| BackendError::kernel(op, e))?,
                );
            }
        }
        let family_id = family_id
            .ok_or_else(|| BackendError::kernel(op, "nlctrl answered without a family id"))?;
        let window = conn.grow_for_acks();
        Ok(Ipvs {
            conn,
            family_id,
            window,
        })
    }

    /// The family id the kernel assigned to IPVS.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// (netlink messages sent, `sendmsg` calls made) since `open`, the resolve included.
    pub fn stats(&self) -> (u64, u64) {
        (self.conn.messages, self.conn.sendmsg_calls)
    }

    /// Starts keeping a copy of every datagram the kernel sends (and drops what was kept).
    pub fn record(&mut self) {
        self.conn.recorded = Some(Vec::new());
    }

    /// The datagrams received since [`record`](Self::record), and stops recording.
    pub fn take_recorded(&mut self) -> Vec<Vec<u8>> {
        self.conn.recorded.take().unwrap_or_default()
    }

    /// How many operations [`apply`](Self::apply) sends before reading their ACKs.
    pub fn window(&self) -> usize {
        self.window
    }

    fn get(&mut self, command: u8, op: &str) -> Result<Vec<u8>, IpvsError> {
        let seq = self.conn.next_seq();
        let request = encode_get(self.family_id, seq, command);
        let answers = self
            .conn
            .transact(&request, seq, op)?
            .map_err(|c| refused(op, c))?;
        let (_, payload) = answers
            .into_iter()
            .find(|(kind, _)| *kind == self.family_id)
            .ok_or_else(|| BackendError::kernel(op, "the kernel acknowledged without an answer"))?;
        let (_, top) = genl_split(&payload).map_err(|e| BackendError::kernel(op, e))?;
        Ok(top.to_vec())
    }

    pub fn info(&mut self) -> Result<Info, IpvsError> {
        let op = "reading IPVS info (IPVS_CMD_GET_INFO)";
        let top = self.get(cmd::GET_INFO, op)?;
        Ok(decode_info(&top).map_err(|e| BackendError::kernel(op, e))?)
    }

    pub fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let op = "reading IPVS timeouts (IPVS_CMD_GET_CONFIG)";
        let top = self.get(cmd::GET_CONFIG, op)?;
        Ok(decode_timeouts(&top).map_err(|e| BackendError::kernel(op, e))?)
    }

    /// Sets the non-zero timeouts; a zero keeps the kernel's value.
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<(), IpvsError> {
        if *t == Timeouts::default() {
            return Ok(());
        }
        let op = "setting IPVS timeouts (IPVS_CMD_SET_CONFIG)";
        let seq = self.conn.next_seq();
        let request = encode_set_timeouts(self.family_id, seq, t);
        self.conn
            .transact(&request, seq, op)?
            .map_err(|c| refused(op, c))?;
        Ok(())
    }

    /// Every message of a dump, as the nested value of attribute `nested_kind`.
    fn dump(
        &mut self,
        request: &[u8],
        seq: u32,
        nested_kind: u16,
        op: &str,
    ) -> Result<Vec<Vec<u8>>, IpvsError> {
        let answers = self
            .conn
            .transact(request, seq, op)?
            .map_err(|c| refused(op, c))?;
        let mut out = Vec::new();
        for (kind, payload) in answers {
            if kind != self.family_id {
                continue;
            }
            let (_, top) = genl_split(&payload).map_err(|e| BackendError::kernel(op, e))?;
            let nested = top_attribute(top, nested_kind)
                .map_err(|e| BackendError::kernel(op, e))?
                .ok_or_else(|| BackendError::kernel(op, "a dumped message without its entry"))?;
            out.push(nested.to_vec());
        }
        Ok(out)
    }

    /// Every virtual server, both families, in the kernel's order.
    pub fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        let op = "dumping IPVS services";
        let seq = self.conn.next_seq();
        let request = encode_dump_services(self.family_id, seq);
        self.dump(&request, seq, CMD_ATTR_SERVICE, op)?
            .iter()
            .map(|n| decode_service(n).map_err(|e| BackendError::kernel(op, e).into()))
            .collect()
    }

    /// The destinations of one virtual server. A service that does not exist has none (the
    /// kernel ends the dump empty rather than answering ENOENT).
    pub fn dests(&mut self, key: &ServiceKey) -> Result<Vec<Dest>, IpvsError> {
        let op = format!("dumping the destinations of IPVS service {key:?}");
        let seq = self.conn.next_seq();
        let request = encode_dump_dests(self.family_id, seq, key);
        self.dump(&request, seq, CMD_ATTR_DEST, &op)?
            .iter()
            .map(|n| decode_dest(n, key.ipv6()).map_err(|e| BackendError::kernel(&op, e).into()))
            .collect()
    }

    /// Every op with NLM_F_ACK and its own sequence number, pipelined as [`Conn::pipelined`]
    /// sends them. One result per op, in order: `Ok`, or the kernel's errno, negative. What
    /// the kernel answers (6.1): EEXIST for a service or destination that exists, ESRCH for
    /// any command on a service that does not, ENOENT for a destination that does not, EINVAL
    /// for a NAT destination of the other family. A failed op does not stop the others. `Err`
    /// only when the socket fails; the ops of the datagrams already sent may then be applied:
    /// resync from a dump.
    pub fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<(), i32>>, IpvsError> {
        let messages: Vec<(u32, Vec<u8>)> = ops
            .iter()
            .map(|op| {
                let seq = self.conn.next_seq();
                (seq, encode(op, self.family_id, seq))
            })
            .collect();
        Ok(self.conn.pipelined(
            &messages,
            self.window,
            PermissionCheck::PerMessage,
            "applying IPVS changes",
        )?)
    }
}
