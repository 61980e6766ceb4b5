//! The kernel's ipset protocol over NETLINK_NETFILTER (nfnetlink subsystem `NFNL_SUBSYS_IPSET`,
//! `include/uapi/linux/netfilter/ipset/ip_set.h`), for the partial sync's member edits and the
//! set names: no `ipset` process, whose start is most of a partial sync's time under TCG
//! (~0.3-0.5 s of 577 ms, against 0.66 ms for the eBPF backend's whole partial sync).
//!
//! Why one message per member, not `IPSET_ATTR_ADT` (many members in one message, as
//! `ipset restore` sends): the kernel stops an ADT message at its first failed member and says
//! only a line number, while one message per member gets its own ACK, so a refusal names the
//! set, the member and the errno, and the others still apply (as IPVS answers each message).
//! The messages are pipelined as in [`super::netlink::Ipvs::apply`]: as many per `sendmsg` as
//! the receive buffer has room for ACKs, every ACK matched to its member by sequence number.
//!
//! What the kernel requires (`ip_set_core.c`, `ip_set_ad` and the types' `uadt`):
//! - `IPSET_ATTR_PROTOCOL` in every message, at least `IPSET_PROTOCOL_MIN` (6) for ADD, DEL and
//!   LIST; the version is asked once with `IPSET_CMD_PROTOCOL` (7 on 6.1 and on this host);
//! - `IPSET_ATTR_DATA` nested (`NLA_F_NESTED`, else `IPSET_ERR_PROTOCOL`), addresses nested
//!   once more (`IPSET_ATTR_IP` > `IPSET_ATTR_IPADDR_IPV4`/`_IPV6`), addresses and ports with
//!   `NLA_F_NET_BYTEORDER`, `IPSET_ATTR_PROTO` for the `ip,port` types
//!   (`IPSET_ERR_MISSING_PROTO` without it);
//! - no `NLM_F_EXCL`: `-exist` semantics, so adding a member already there and deleting one
//!   already gone both answer 0 (`call_ad` forgives `IPSET_ERR_EXIST`), and an add updates the
//!   comment of a member that is there.
//!
//! Every message's bytes are in `ipset_netlink_tests.rs`, annotated.

use std::fmt;
use std::net::IpAddr;

use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::layout::SetKind;
use super::netlink::{self, Conn, PermissionCheck};
use crate::backend::BackendError;
use crate::model::Protocol;

/// `NFNL_SUBSYS_IPSET`: the message type is `subsystem << 8 | command`.
const NFNL_SUBSYS_IPSET: u16 = 6;

/// The protocol versions kpx speaks: `IPSET_PROTOCOL_MIN` to `IPSET_PROTOCOL`. 7 added set
/// indexes to GET_BYNAME/GET_BYINDEX answers; ADD, DEL and LIST are the same in both.
pub const PROTOCOL_MIN: u8 = 6;
pub const PROTOCOL_MAX: u8 = 7;

/// `IPSET_MAXNAMELEN`, the NUL included.
const MAXNAMELEN: usize = 32;
/// `IPSET_MAX_COMMENT_SIZE`: the kernel refuses a longer comment (`NLA_NUL_STRING`, EINVAL).
pub const MAX_COMMENT: usize = 255;
/// No member text kpx writes comes near this; longer text is refused before it is parsed.
const MAX_MEMBER_TEXT: usize = 512;

/// `enum ipset_cmd`.
mod cmd {
    pub const PROTOCOL: u8 = 1;
    pub const LIST: u8 = 7;
    pub const ADD: u8 = 9;
    pub const DEL: u8 = 10;
}

/// Command-level attributes.
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_FLAGS: u16 = 6;
const ATTR_DATA: u16 = 7;
const ATTR_PROTOCOL_MIN: u16 = 10;
/// Data attributes (inside `IPSET_ATTR_DATA`).
const ATTR_IP: u16 = 1;
const ATTR_PORT: u16 = 4;
const ATTR_PROTO: u16 = 7;
const ATTR_IP2: u16 = 20;
/// `hash:ip,port,net`'s prefix length of the second address (a u8, 1 to the host's length).
const ATTR_CIDR2: u16 = 21;
const ATTR_COMMENT: u16 = 26;
/// Address attributes (inside `IPSET_ATTR_IP` and `IPSET_ATTR_IP2`).
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;

/// `IPSET_FLAG_LIST_SETNAME`: a LIST dump with the names only.
const FLAG_LIST_SETNAME: u32 = 1 << 1;

/// How a set's members are keyed: the types of [`SetKind::create_args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetType {
    HashIp,
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    BitmapPort,
}

impl SetType {
    pub fn of(kind: SetKind) -> SetType {
        match kind {
            SetKind::Addresses => SetType::HashIp,
            SetKind::Hairpin => SetType::HashIpPortIp,
            SetKind::SourceRanges => SetType::HashIpPortNet,
            SetKind::HealthCheckNodePorts => SetType::BitmapPort,
            SetKind::MasqOffCluster
            | SetKind::MasqAll
            | SetKind::Reject
            | SetKind::Drop
            | SetKind::Frontends
            | SetKind::Marked
            | SetKind::Firewalled => SetType::HashIpPort,
        }
    }

    /// The type's name, as `ipset create` takes it.
    pub fn name(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashIpPortIp => "hash:ip,port,ip",
            SetType::HashIpPortNet => "hash:ip,port,net",
            SetType::BitmapPort => "bitmap:port",
        }
    }

    /// What a member looks like, for errors.
    fn syntax(self) -> &'static str {
        match self {
            SetType::HashIp => "IP",
            SetType::HashIpPort => "IP,PROTO:PORT",
            SetType::HashIpPortIp => "IP,PROTO:PORT,IP",
            SetType::HashIpPortNet => "IP,PROTO:PORT,IP[/CIDR]",
            SetType::BitmapPort => "PORT",
        }
    }
}

/// Whether a kind's set is created with `comment` (the members' comments name Service ports).
pub fn has_comment(kind: SetKind) -> bool {
    kind == SetKind::Frontends
}

/// A member, typed: what the kernel keys it by, and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: Key,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Ip(IpAddr),
    IpPort(IpAddr, Protocol, u16),
    IpPortIp(IpAddr, Protocol, u16, IpAddr),
    /// The network's address (host bits clear) and prefix length.
    IpPortNet(IpAddr, Protocol, u16, IpAddr, u8),
    Port(u16),
}

/// Why a member's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("member {text:?} of ipset {set} ({kind}): {why}")]
pub struct BadMember {
    pub set: String,
    pub kind: &'static str,
    pub text: String,
    pub why: String,
}

/// Parses a member as `plan.rs` writes it (and `ipset list` prints it): `198.18.1.1,tcp:80`,
/// `2001:2::5,udp:53,2001:2::5`, `30080`, `198.18.1.1`, with ` comment "…"` on a set created
/// with comments. `ipv6` is the set's family (a bitmap:port has none).
pub fn parse(kind: SetKind, ipv6: bool, text: &str) -> Result<Member, BadMember> {
    let set_type = SetType::of(kind);
    let refuse = |why: String| BadMember {
        set: kind.name(ipv6),
        kind: set_type.name(),
        text: text.chars().take(MAX_MEMBER_TEXT).collect(),
        why,
    };
    if text.len() > MAX_MEMBER_TEXT {
        return Err(refuse(format!(
            "{} bytes, more than {MAX_MEMBER_TEXT}",
            text.len()
        )));
    }
    let (key, comment) = match text.split_once(" comment ") {
        Some((key, comment)) => (key, Some(comment)),
        None => (text, None),
    };
    let comment = match comment {
        None => None,
        Some(_) if !has_comment(kind) => {
            return Err(refuse("this set is created without comments".into()))
        }
        Some(c) => Some(parse_comment(c).map_err(refuse)?),
    };
    let key = parse_key(set_type, ipv6, key).map_err(refuse)?;
    Ok(Member { key, comment })
}

fn parse_ip(s: &str, ipv6: bool) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address"))?;
    if ip.is_ipv6() != ipv6 {
        let family = if ipv6 { "inet6" } else { "inet" };
        return Err(format!("{ip} is not of the set's family {family}"));
    }
    Ok(ip)
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a port (0 to 65535)"))
}

/// `198.18.0.0/24`, or a host without its length (as ipset(8) prints one). Host bits must be
/// clear: the kernel would clear them, and the member would then not be the one the plan keeps.
fn parse_net(s: &str, ipv6: bool) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip = parse_ip(addr, ipv6)?;
    let max = if ipv6 { 128 } else { 32 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => return Err(format!("{l:?} is not a prefix length (1 to {max})")),
        },
    };
    let net = ipnet::IpNet::new(ip, len).map_err(|e| format!("{s:?}: {e}"))?;
    if net.trunc().addr() != ip {
        return Err(format!(
            "{s:?} has host bits set (the network is {})",
            net.trunc()
        ));
    }
    Ok((ip, len))
}

/// `tcp:80`.
fn parse_proto_port(s: &str) -> Result<(Protocol, u16), String> {
    let (proto, port) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not PROTO:PORT"))?;
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        other => return Err(format!("protocol {other:?}: want tcp, udp or sctp")),
    };
    Ok((protocol, parse_port(port)?))
}

fn parse_key(set_type: SetType, ipv6: bool, text: &str) -> Result<Key, String> {
    let parts: Vec<&str> = text.split(',').collect();
    match (set_type, parts.as_slice()) {
        (SetType::HashIp, [a]) => Ok(Key::Ip(parse_ip(a, ipv6)?)),
        (SetType::HashIpPort, [a, pp]) => {
            let (protocol, port) = parse_proto_port(pp)?;
            Ok(Key::IpPort(parse_ip(a, ipv6)?, protocol, port))
        }
        (SetType::HashIpPortIp, [a, pp, b]) => {
            let (protocol, port) = parse_proto_port(pp)?;
            Ok(Key::IpPortIp(
                parse_ip(a, ipv6)?,
                protocol,
                port,
                parse_ip(b, ipv6)?,
            ))
        }
        (SetType::HashIpPortNet, [a, pp, net]) => {
            let (protocol, port) = parse_proto_port(pp)?;
            let (ip, len) = parse_net(net, ipv6)?;
            Ok(Key::IpPortNet(parse_ip(a, ipv6)?, protocol, port, ip, len))
        }
        (SetType::BitmapPort, [p]) => Ok(Key::Port(parse_port(p)?)),
        _ => Err(format!("want {}", set_type.syntax())),
    }
}

/// `"text"`: quoted, at most [`MAX_COMMENT`] bytes, no quote or NUL inside (ipset(8) prints it
/// between quotes and the kernel ends it at a NUL).
fn parse_comment(quoted: &str) -> Result<String, String> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or_else(|| format!("comment {quoted:?} is not between double quotes"))?;
    if inner.contains(['"', '\0']) {
        return Err(format!("comment {inner:?} holds a quote or a NUL"));
    }
    if inner.len() > MAX_COMMENT {
        return Err(format!(
            "a comment of {} bytes, more than the kernel's {MAX_COMMENT}",
            inner.len()
        ));
    }
    Ok(inner.to_string())
}

/// Add or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
}

impl Op {
    fn command(self) -> u8 {
        match self {
            Op::Add => cmd::ADD,
            Op::Del => cmd::DEL,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Del => "del",
        }
    }
}

/// One member added to or deleted from one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub op: Op,
    pub kind: SetKind,
    pub set: String,
    pub member: Member,
}

impl Change {
    /// Parses `text` for the set of `kind` in the family `ipv6`. A delete drops the comment:
    /// the kernel keys members without it.
    pub fn new(op: Op, kind: SetKind, ipv6: bool, text: &str) -> Result<Change, BadMember> {
        let mut member = parse(kind, ipv6, text)?;
        if op == Op::Del {
            member.comment = None;
        }
        Ok(Change {
            op,
            kind,
            set: kind.name(ipv6),
            member,
        })
    }
}

impl fmt::Display for Member {
    /// As ipset(8) writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            Key::Ip(a) => write!(f, "{a}")?,
            Key::IpPort(a, pr, p) => write!(f, "{a},{}:{p}", pr.lower())?,
            Key::IpPortIp(a, pr, p, b) => write!(f, "{a},{}:{p},{b}", pr.lower())?,
            Key::IpPortNet(a, pr, p, b, len) => {
                write!(f, "{a},{}:{p},{b}", pr.lower())?;
                if len != if b.is_ipv6() { 128 } else { 32 } {
                    write!(f, "/{len}")?;
                }
            }
            Key::Port(p) => write!(f, "{p}")?,
        }
        if let Some(c) = &self.comment {
            write!(f, " comment \"{c}\"")?;
        }
        Ok(())
    }
}

impl fmt::Display for Change {
    /// As an `ipset restore` line would say it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.op.word(), self.set, self.member)
    }
}

/// The meaning of an errno the ipset subsystem answers (positive or negative): ipset's own
/// codes (4096 and up) by name, type-specific ones (4352 and up) by the set's type, the rest
/// as the system's text. ENOENT for ADD/DEL is the kernel's "no such set".
pub fn errno_text(code: i32, set_type: Option<SetType>) -> String {
    let code = code.saturating_abs();
    let name = match code {
        4097 => "IPSET_ERR_PROTOCOL: the kernel refused the message's attributes",
        4098 => "IPSET_ERR_FIND_TYPE: no such set type in the kernel",
        4099 => "IPSET_ERR_MAX_SETS: the kernel's set limit is reached",
        4100 => "IPSET_ERR_BUSY: the set is in use by the kernel",
        4101 => "IPSET_ERR_EXIST_SETNAME2: the second set does not exist",
        4102 => "IPSET_ERR_TYPE_MISMATCH: the two sets' types differ",
        4103 => "IPSET_ERR_EXIST: the member is already added or already deleted",
        4104 => "IPSET_ERR_INVALID_CIDR: invalid CIDR",
        4105 => "IPSET_ERR_INVALID_NETMASK: invalid netmask",
        4106 => "IPSET_ERR_INVALID_FAMILY: invalid family",
        4107 => "IPSET_ERR_TIMEOUT: the set has no timeout support",
        4108 => "IPSET_ERR_REFERENCED: the set is referenced (by a rule or a list set)",
        4109 => "IPSET_ERR_IPADDR_IPV4: invalid IPv4 address",
        4110 => "IPSET_ERR_IPADDR_IPV6: invalid IPv6 address",
        4111 => "IPSET_ERR_COUNTER: the set has no counter support",
        4112 => "IPSET_ERR_COMMENT: the set has no comment support",
        4113 => "IPSET_ERR_INVALID_MARKMASK: invalid markmask",
        4114 => "IPSET_ERR_SKBINFO: the set has no skbinfo support",
        4115 => "IPSET_ERR_BITMASK_NETMASK_EXCL: bitmask and netmask are exclusive",
        4352.. => match (set_type, code - 4352) {
            (Some(SetType::BitmapPort), 0) => {
                "IPSET_ERR_BITMAP_RANGE: the member is outside the set's range"
            }
            (Some(SetType::BitmapPort), 1) => {
                "IPSET_ERR_BITMAP_RANGE_SIZE: the range exceeds the set type's size limit"
            }
            (Some(SetType::BitmapPort) | None, _) => "a set-type-specific ipset error",
            (Some(_), 0) => "IPSET_ERR_HASH_FULL: the set is full (maxelem)",
            (Some(_), 1) => "IPSET_ERR_HASH_ELEM: a null-valued member",
            (Some(_), 2) => "IPSET_ERR_INVALID_PROTO: invalid protocol",
            (Some(_), 3) => "IPSET_ERR_MISSING_PROTO: a protocol is needed",
            (Some(_), 4) => "IPSET_ERR_HASH_RANGE_UNSUPPORTED: ranges are not supported",
            (Some(_), 5) => "IPSET_ERR_HASH_RANGE: invalid range",
            (Some(_), _) => "a hash-type-specific ipset error",
        },
        c if c == libc::ENOENT => "ENOENT: no such set",
        c if c == libc::EPERM => "EPERM: ipset needs CAP_NET_ADMIN",
        _ => return format!("{} (errno {code})", netlink::errno_text(code)),
    };
    format!("{name} (errno {code})")
}

#[derive(Debug, thiserror::Error)]
pub enum IpsetError {
    #[error(transparent)]
    BadMember(#[from] BadMember),
    /// The kernel refused a change.
    #[error("ipset {change}: {meaning}")]
    Refused {
        change: String,
        errno: i32,
        meaning: String,
    },
    /// The kernel speaks no protocol version kpx does.
    #[error("the kernel's ipset protocol is {kernel_min} to {kernel}; kpx speaks {PROTOCOL_MIN} to {PROTOCOL_MAX}")]
    Protocol { kernel: u8, kernel_min: u8 },
    #[error(transparent)]
    Kernel(#[from] BackendError),
}

impl From<IpsetError> for BackendError {
    fn from(e: IpsetError) -> Self {
        match e {
            IpsetError::Kernel(e) => e,
            e => BackendError::kernel("ipset (netlink)", e),
        }
    }
}

impl IpsetError {
    /// The kernel's refusal of `change`, named.
    pub fn refused(change: &Change, errno: i32) -> IpsetError {
        IpsetError::Refused {
            change: change.to_string(),
            errno,
            meaning: errno_text(errno, Some(SetType::of(change.kind))),
        }
    }
}

// Message encoding: nlmsghdr + nfgenmsg + attributes, by hand (the layout is three fields).

fn attr(kind: u16, value: Vec<u8>) -> DefaultNla {
    DefaultNla::new(kind, value)
}

fn nested(kind: u16, inner: &[DefaultNla]) -> DefaultNla {
    let mut value = vec![0; inner.buffer_len()];
    inner.emit(&mut value);
    DefaultNla::new(kind | NLA_F_NESTED, value)
}

fn string_attr(kind: u16, s: &str) -> DefaultNla {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(kind, v)
}

/// `IPSET_ATTR_IP`/`IP2`: nested, the address in network order.
fn ip_attr(kind: u16, ip: IpAddr) -> DefaultNla {
    let inner = match ip {
        IpAddr::V4(a) => attr(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, a.octets().to_vec()),
        IpAddr::V6(a) => attr(ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, a.octets().to_vec()),
    };
    nested(kind, &[inner])
}

fn port_attr(port: u16) -> DefaultNla {
    attr(ATTR_PORT | NLA_F_NET_BYTEORDER, port.to_be_bytes().to_vec())
}

fn proto_attr(p: Protocol) -> DefaultNla {
    let n = match p {
        Protocol::Tcp => libc::IPPROTO_TCP,
        Protocol::Udp => libc::IPPROTO_UDP,
        Protocol::Sctp => libc::IPPROTO_SCTP,
    };
    attr(ATTR_PROTO, vec![n as u8])
}

fn message(command: u8, flags: u16, seq: u32, attributes: &[DefaultNla]) -> Vec<u8> {
    let len = 16 + 4 + attributes.buffer_len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | u16::from(command)).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family AF_INET as ipset(8) writes it (the kernel takes the family
    // from the set), NFNETLINK_V0, res_id 0.
    out.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    let start = out.len();
    out.resize(len, 0);
    attributes.emit(&mut out[start..]);
    out
}

/// The set name: at most 31 bytes (the kernel compares `IPSET_MAXNAMELEN` bytes).
fn set_name_attr(name: &str) -> Result<DefaultNla, String> {
    if name.is_empty() || name.len() >= MAXNAMELEN || name.contains('\0') {
        return Err(format!(
            "set name {name:?}: 1 to {} bytes, no NUL",
            MAXNAMELEN - 1
        ));
    }
    Ok(string_attr(ATTR_SETNAME, name))
}

/// One ADD or DEL with NLM_F_ACK (and without NLM_F_EXCL: `-exist`). Pure: the golden tests
/// hold its bytes.
pub fn encode(change: &Change, protocol: u8, seq: u32) -> Result<Vec<u8>, BadMember> {
    let name = set_name_attr(&change.set).map_err(|why| BadMember {
        set: change.set.clone(),
        kind: SetType::of(change.kind).name(),
        text: change.member.to_string(),
        why,
    })?;
    let mut data = Vec::new();
    match change.member.key {
        Key::Ip(a) => data.push(ip_attr(ATTR_IP, a)),
        Key::IpPort(a, pr, p) => {
            data.extend([ip_attr(ATTR_IP, a), port_attr(p), proto_attr(pr)]);
        }
        Key::IpPortIp(a, pr, p, b) => {
            data.extend([
                ip_attr(ATTR_IP, a),
                port_attr(p),
                proto_attr(pr),
                ip_attr(ATTR_IP2, b),
            ]);
        }
        Key::IpPortNet(a, pr, p, b, len) => {
            data.extend([
                ip_attr(ATTR_IP, a),
                port_attr(p),
                proto_attr(pr),
                ip_attr(ATTR_IP2, b),
                attr(ATTR_CIDR2, vec![len]),
            ]);
        }
        Key::Port(p) => data.push(port_attr(p)),
    }
    if let Some(c) = &change.member.comment {
        data.push(string_attr(ATTR_COMMENT, c));
    }
    let attributes = [
        attr(ATTR_PROTOCOL, vec![protocol]),
        name,
        nested(ATTR_DATA, &data),
    ];
    Ok(message(
        change.op.command(),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &attributes,
    ))
}

/// `IPSET_CMD_PROTOCOL`: the kernel answers its version (and, since 7, its minimum).
pub fn encode_protocol(seq: u32) -> Vec<u8> {
    message(
        cmd::PROTOCOL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &[attr(ATTR_PROTOCOL, vec![PROTOCOL_MIN])],
    )
}

/// `IPSET_CMD_LIST` as a dump of set names only (`ipset list -n`).
pub fn encode_list_names(protocol: u8, seq: u32) -> Vec<u8> {
    message(
        cmd::LIST,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &[
            attr(ATTR_PROTOCOL, vec![protocol]),
            attr(
                ATTR_FLAGS | NLA_F_NET_BYTEORDER,
                FLAG_LIST_SETNAME.to_be_bytes().to_vec(),
            ),
        ],
    )
}

/// The top-level attributes of an ipset answer's payload (after the nfgenmsg).
fn answer_attributes(payload: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, String> {
    let attrs = payload
        .get(4..)
        .ok_or_else(|| format!("an ipset answer of {} bytes", payload.len()))?;
    let mut out = Vec::new();
    for nla in netlink_packet_core::NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| format!("a bad attribute: {e}"))?;
        out.push((
            nla.kind() & netlink_packet_core::NLA_TYPE_MASK,
            nla.value().to_vec(),
        ));
    }
    Ok(out)
}

/// The answer to `IPSET_CMD_PROTOCOL`: (version, minimum; the version when not sent).
pub fn decode_protocol(payload: &[u8]) -> Result<(u8, u8), String> {
    let attrs = answer_attributes(payload)?;
    let byte = |kind| {
        attrs
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| v.first().copied())
    };
    let version = byte(ATTR_PROTOCOL).ok_or("an answer without IPSET_ATTR_PROTOCOL")?;
    Ok((version, byte(ATTR_PROTOCOL_MIN).unwrap_or(version)))
}

/// A set name from one LIST answer.
pub fn decode_set_name(payload: &[u8]) -> Result<String, String> {
    let attrs = answer_attributes(payload)?;
    let (_, v) = attrs
        .iter()
        .find(|(k, _)| *k == ATTR_SETNAME)
        .ok_or("a LIST answer without IPSET_ATTR_SETNAME")?;
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8(v[..end].to_vec()).map_err(|_| "a set name that is not UTF-8".to_string())
}

/// One NETLINK_NETFILTER socket speaking to the ipset subsystem of this network namespace.
pub struct Ipset {
    conn: Conn,
    protocol: u8,
    window: usize,
}

impl Ipset {
    /// Opens the socket and agrees on a protocol version. An error when the kernel has no
    /// ipset (nfnetlink asks modprobe for `nfnetlink-subsys-6` first).
    pub fn open() -> Result<Ipset, IpsetError> {
        let mut conn = Conn::open(NETLINK_NETFILTER, "netfilter netlink (NETLINK_NETFILTER)")?;
        let op = "asking the kernel's ipset protocol (IPSET_CMD_PROTOCOL)";
        let seq = conn.next_seq();
        let answers = conn
            .transact(&encode_protocol(seq), seq, op)?
            .map_err(|code| BackendError::kernel(op, errno_text(code, None)))?;
        let payload = answers
            .iter()
            .find(|(kind, _)| *kind == (NFNL_SUBSYS_IPSET << 8) | u16::from(cmd::PROTOCOL))
            .map(|(_, p)| p)
            .ok_or_else(|| BackendError::kernel(op, "the kernel acknowledged without an answer"))?;
        let (kernel, kernel_min) =
            decode_protocol(payload).map_err(|e| BackendError::kernel(op, e))?;
        let protocol = kernel.min(PROTOCOL_MAX);
        if protocol < PROTOCOL_MIN || protocol < kernel_min {
            return Err(IpsetError::Protocol { kernel, kernel_min });
        }
        let window = conn.grow_for_acks();
        Ok(Ipset {
            conn,
            protocol,
            window,
        })
    }

    /// The protocol version in use.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// (netlink messages sent, `sendmsg` calls made) since `open`, the protocol query included.
    pub fn stats(&self) -> (u64, u64) {
        (self.conn.messages, self.conn.sendmsg_calls)
    }

    /// The names of every set in this namespace (`ipset list -n`), in the kernel's order.
    pub fn names(&mut self) -> Result<Vec<String>, IpsetError> {
        let op = "listing ipset names (IPSET_CMD_LIST)";
        let seq = self.conn.next_seq();
        let answers = self
            .conn
            .transact(&encode_list_names(self.protocol, seq), seq, op)?
            .map_err(|code| BackendError::kernel(op, errno_text(code, None)))?;
        let list = (NFNL_SUBSYS_IPSET << 8) | u16::from(cmd::LIST);
        Ok(answers
            .iter()
            .filter(|(kind, _)| *kind == list)
            .map(|(_, p)| decode_set_name(p).map_err(|e| BackendError::kernel(op, e)))
            .collect::<Result<_, _>>()?)
    }

    /// Every change with NLM_F_ACK and its own sequence number, pipelined as
    /// [`Conn::pipelined`] sends them (nfnetlink runs each message of a datagram on its own).
    /// One result per change, in order: `Ok`, or the kernel's errno (negative). `Err` only
    /// when the socket fails; changes of datagrams already sent may then be applied.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Vec<Result<(), i32>>, IpsetError> {
        let mut messages = Vec::with_capacity(changes.len());
        for c in changes {
            let seq = self.conn.next_seq();
            messages.push((seq, encode(c, self.protocol, seq)?));
        }
        Ok(self.conn.pipelined(
            &messages,
            self.window,
            PermissionCheck::PerDatagram,
            "writing ipset members",
        )?)
    }

    /// [`apply`](Self::apply), then the first refusal (every change is tried first) named:
    /// the set, the member, the errno and its meaning, and how many others failed.
    pub fn write(&mut self, changes: &[Change]) -> Result<(), IpsetError> {
        let results = self.apply(changes)?;
        let mut failed = results
            .iter()
            .zip(changes)
            .filter_map(|(r, c)| r.err().map(|code| (c, code)));
        let Some((change, code)) = failed.next() else {
            return Ok(());
        };
        let others = failed.count();
        let mut e = IpsetError::refused(change, code);
        if others > 0 {
            if let IpsetError::Refused { meaning, .. } = &mut e {
                meaning.push_str(&format!(" (and {others} more changes refused)"));
            }
        }
        Err(e)
    }
}

#[cfg(test)]
#[path = "ipset_netlink_tests.rs"]
mod tests;
