//! `kpx-ipvs0`, the dummy interface that holds the Service addresses (kube-proxy's
//! `kube-ipvs0`): an address bound to any local interface makes the kernel take packets for it
//! as local, which is where IPVS intercepts them (LOCAL_IN). The link stays DOWN so the
//! addresses are never announced and nothing is routed out through it.
//!
//! Synchronous rtnetlink on one socket; the messages are `netlink-packet-route`'s, the socket
//! and the answer matching are `netlink::Conn`'s. Every message builder is pure (tested in
//! `netlink_tests.rs`); `DummyLink` only sends them.

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::netlink::{errno_text, Answers, Conn};
use crate::backend::BackendError;

/// The interface's name.
pub const IFNAME: &str = "kpx-ipvs0";

/// `RTM_NEWLINK`, `RTM_NEWADDR`: the message types of the answers read here.
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;

#[derive(Debug, thiserror::Error)]
pub enum DummyError {
    /// The kernel has no `dummy` link type (CONFIG_DUMMY off, or the module missing).
    #[error("the kernel has no dummy link type (CONFIG_DUMMY): {IFNAME} cannot be created")]
    NoDummy,
    /// `kpx-ipvs0` exists and is not a dummy link: kpx does not take it over.
    #[error("{IFNAME} exists and is a {0} link, not dummy: remove it or rename it")]
    Foreign(String),
    #[error(transparent)]
    Kernel(#[from] BackendError),
}

impl From<DummyError> for BackendError {
    fn from(e: DummyError) -> Self {
        match e {
            DummyError::Kernel(e) => e,
            e => BackendError::kernel(format!("setting up {IFNAME}"), e),
        }
    }
}

fn route_message(flags: u16, seq: u32, body: RouteNetlinkMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(body));
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// `RTM_NEWLINK` creating the dummy link `name`, DOWN (no IFF_UP in flags or mask), failing
/// with EEXIST when the name is taken.
pub fn encode_new_link(name: &str, seq: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]),
    ];
    route_message(
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        RouteNetlinkMessage::NewLink(link),
    )
}

/// `RTM_GETLINK` of one link by name: its `RTM_NEWLINK`, or ENODEV.
pub fn encode_get_link(name: &str, seq: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.attributes = vec![LinkAttribute::IfName(name.to_string())];
    route_message(
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        RouteNetlinkMessage::GetLink(link),
    )
}

/// `RTM_SETLINK` clearing IFF_UP (only IFF_UP in the change mask: nothing else changes).
pub fn encode_set_down(index: u32, seq: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::empty();
    link.header.change_mask = LinkFlags::Up;
    route_message(
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        RouteNetlinkMessage::SetLink(link),
    )
}

/// `RTM_DELLINK` by index.
pub fn encode_del_link(index: u32, seq: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    route_message(
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        RouteNetlinkMessage::DelLink(link),
    )
}

/// The address message for one host address: /32 or /128, IFA_LOCAL and IFA_ADDRESS (an
/// IPv4 address is found by IFA_LOCAL; for IPv6 the kernel reads IFA_ADDRESS), IPv6 with
/// IFA_F_NODAD (a Service address must work at once; duplicate detection on a DOWN link
/// would leave it tentative).
fn address_message(index: u32, addr: IpAddr) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.scope = AddressScope::Universe;
    match addr {
        IpAddr::V4(_) => {
            message.header.family = AddressFamily::Inet;
            message.header.prefix_len = 32;
            message.attributes = vec![
                AddressAttribute::Local(addr),
                AddressAttribute::Address(addr),
            ];
        }
        IpAddr::V6(_) => {
            message.header.family = AddressFamily::Inet6;
            message.header.prefix_len = 128;
            message.header.flags = AddressHeaderFlags::Nodad;
            message.attributes = vec![
                AddressAttribute::Address(addr),
                AddressAttribute::Flags(AddressFlags::Nodad),
            ];
        }
    }
    message
}

/// `RTM_NEWADDR`, failing with EEXIST when the address is there already.
pub fn encode_new_address(index: u32, addr: IpAddr, seq: u32) -> Vec<u8> {
    route_message(
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        RouteNetlinkMessage::NewAddress(address_message(index, addr)),
    )
}

/// `RTM_DELADDR`: EADDRNOTAVAIL when the address is not there.
pub fn encode_del_address(index: u32, addr: IpAddr, seq: u32) -> Vec<u8> {
    route_message(
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        RouteNetlinkMessage::DelAddress(address_message(index, addr)),
    )
}

/// `RTM_GETADDR` dump of every address of both families (filtered by interface here: the
/// kernel filters by index only on a socket with NETLINK_GET_STRICT_CHK).
pub fn encode_dump_addresses(seq: u32) -> Vec<u8> {
    route_message(
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
    )
}

/// What `RTM_GETLINK` says about a link: its index, kind (`None`: no IFLA_LINKINFO, a
/// physical device or loopback) and whether it is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub kind: Option<String>,
    pub up: bool,
}

/// Reads an `RTM_NEWLINK` payload (what follows the netlink header).
pub fn decode_link(payload: &[u8]) -> Result<LinkState, String> {
    let link = LinkMessage::parse(payload).map_err(|e| format!("an unreadable link: {e}"))?;
    let kind = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind.to_string()),
            _ => None,
        }),
        _ => None,
    });
    Ok(LinkState {
        index: link.header.index,
        kind,
        up: link.header.flags.contains(LinkFlags::Up),
    })
}

/// Reads an `RTM_NEWADDR` payload: (interface index, address).
pub fn decode_address(payload: &[u8]) -> Result<(u32, Option<IpAddr>), String> {
    let message =
        AddressMessage::parse(payload).map_err(|e| format!("an unreadable address: {e}"))?;
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(a) => Some(*a),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(a) => Some(*a),
        _ => None,
    });
    Ok((message.header.index, local.or(address)))
}

/// One rtnetlink socket in the namespace it was opened in.
pub struct DummyLink {
    conn: Conn,
}

impl DummyLink {
    pub fn open() -> Result<Self, DummyError> {
        Ok(Self {
            conn: Conn::open(NETLINK_ROUTE, "rtnetlink (NETLINK_ROUTE)")?,
        })
    }

    /// One request with an ACK: `Ok(Err(errno))` when refused.
    fn ask(&mut self, bytes: &[u8], seq: u32, op: &str) -> Result<Answers, DummyError> {
        Ok(self.conn.transact(bytes, seq, op)?)
    }

    /// The link `kpx-ipvs0`, if it exists.
    pub fn link(&mut self) -> Result<Option<LinkState>, DummyError> {
        let op = format!("reading link {IFNAME}");
        let seq = self.conn.next_seq();
        match self.ask(&encode_get_link(IFNAME, seq), seq, &op)? {
            Ok(answers) => {
                let (_, payload) = answers
                    .iter()
                    .find(|(kind, _)| *kind == RTM_NEWLINK)
                    .ok_or_else(|| BackendError::kernel(&op, "acknowledged without the link"))?;
                Ok(Some(
                    decode_link(payload).map_err(|e| BackendError::kernel(&op, e))?,
                ))
            }
            Err(code) if code == -libc::ENODEV => Ok(None),
            Err(code) => Err(BackendError::kernel(op, errno_text(code)).into()),
        }
    }

    /// Creates `kpx-ipvs0` when missing and takes it down when up; returns its index.
    pub fn ensure(&mut self) -> Result<u32, DummyError> {
        let state = match self.link()? {
            Some(state) => state,
            None => {
                let op = format!("creating dummy link {IFNAME}");
                let seq = self.conn.next_seq();
                match self.ask(&encode_new_link(IFNAME, seq), seq, &op)? {
                    // EEXIST: created meanwhile by another process; read what it is below.
                    Ok(_) => {}
                    Err(code) if code == -libc::EEXIST => {}
                    // rtnl_newlink: no such link kind, even after trying to load its module.
                    Err(code) if code == -libc::EOPNOTSUPP => return Err(DummyError::NoDummy),
                    Err(code) => return Err(BackendError::kernel(op, errno_text(code)).into()),
                }
                self.link()?.ok_or_else(|| {
                    BackendError::kernel(
                        format!("creating dummy link {IFNAME}"),
                        "created, then not found",
                    )
                })?
            }
        };
        if state.kind.as_deref() != Some("dummy") {
            return Err(DummyError::Foreign(
                state.kind.unwrap_or_else(|| "kindless".to_string()),
            ));
        }
        if state.up {
            let op = format!("taking {IFNAME} down");
            let seq = self.conn.next_seq();
            self.ask(&encode_set_down(state.index, seq), seq, &op)?
                .map_err(|code| BackendError::kernel(op, errno_text(code)))?;
        }
        Ok(state.index)
    }

    /// The addresses on interface `index`, both families, in the kernel's order.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpAddr>, DummyError> {
        let op = format!("listing the addresses of {IFNAME}");
        let seq = self.conn.next_seq();
        let answers = self
            .ask(&encode_dump_addresses(seq), seq, &op)?
            .map_err(|code| BackendError::kernel(&op, errno_text(code)))?;
        let mut out = Vec::new();
        for (kind, payload) in answers {
            if kind != RTM_NEWADDR {
                continue;
            }
            let (on, addr) = decode_address(&payload).map_err(|e| BackendError::kernel(&op, e))?;
            if on == index {
                out.extend(addr);
            }
        }
        Ok(out)
    }

    /// Adds a host address; `false` when it was there already.
    pub fn add_address(&mut self, index: u32, addr: IpAddr) -> Result<bool, DummyError> {
        let op = format!("adding {addr} to {IFNAME}");
        let seq = self.conn.next_seq();
        match self.ask(&encode_new_address(index, addr, seq), seq, &op)? {
            Ok(_) => Ok(true),
            Err(code) if code == -libc::EEXIST => Ok(false),
            Err(code) => Err(BackendError::kernel(op, errno_text(code)).into()),
        }
    }

    /// Removes a host address; `false` when it was not there.
    pub fn del_address(&mut self, index: u32, addr: IpAddr) -> Result<bool, DummyError> {
        let op = format!("removing {addr} from {IFNAME}");
        let seq = self.conn.next_seq();
        match self.ask(&encode_del_address(index, addr, seq), seq, &op)? {
            Ok(_) => Ok(true),
            Err(code) if code == -libc::EADDRNOTAVAIL => Ok(false),
            Err(code) => Err(BackendError::kernel(op, errno_text(code)).into()),
        }
    }

    /// Deletes `kpx-ipvs0` (its addresses go with it); `false` when it did not exist. A link
    /// of that name that is not a dummy one is left alone.
    pub fn delete(&mut self) -> Result<bool, DummyError> {
        let Some(state) = self.link()? else {
            return Ok(false);
        };
        if state.kind.as_deref() != Some("dummy") {
            return Err(DummyError::Foreign(
                state.kind.unwrap_or_else(|| "kindless".to_string()),
            ));
        }
        let op = format!("deleting {IFNAME}");
        let seq = self.conn.next_seq();
        match self.ask(&encode_del_link(state.index, seq), seq, &op)? {
            Ok(_) => Ok(true),
            Err(code) if code == -libc::ENODEV => Ok(false),
            Err(code) => Err(BackendError::kernel(op, errno_text(code)).into()),
        }
    }
}
