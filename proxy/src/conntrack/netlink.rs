//! ctnetlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`): the dump request, the
//! delete of one entry by its original tuple, and reading the kernel's answers. The messages
//! are `netlink-packet-netfilter`'s conntrack types; the attributes it does not model
//! (`CTA_ID`, `CTA_ZONE`, `CTA_FILTER`) are written as raw attributes with the kernel's
//! numbers (`linux/netfilter/nfnetlink_conntrack.h`).

use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
    NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as CtTuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::filter::{family_name, Flow, KernelFilter, Tuple};
use crate::backend::BackendError;

/// `NFNL_SUBSYS_CTNETLINK` in the high byte of the netlink message type.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `enum cntl_msg_types`.
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u8 = 1;
/// `enum ctattr_type` entries the crate does not name.
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
/// `enum ctattr_tuple`.
const CTA_TUPLE_ZONE: u16 = 3;
/// `enum ctattr_filter`.
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
/// `CTA_FILTER_F_*` (net/netfilter/nf_internals.h): which fields of the filter tuple count.
const CTA_FILTER_F_CTA_IP_SRC: u32 = 1 << 0;
const CTA_FILTER_F_CTA_IP_DST: u32 = 1 << 1;
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_CTA_PROTO_DST_PORT: u32 = 1 << 5;

/// Deletes sent before reading their acknowledgements. Each ACK is queued on the socket until
/// read; 128 capped ACKs (~700 bytes of socket memory each) stay well inside the default
/// receive buffer (212,992 bytes), so none is dropped.
pub(super) const DELETE_WINDOW: usize = 128;

/// The kernel fills dump datagrams up to 32 KiB; a larger buffer never truncates one.
const RECV_BUFFER: usize = 64 * 1024;

/// The longest one receive waits (a kernel that stopped answering), within the call's time.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

fn family(ipv6: bool) -> NetfilterProtoFamily {
    if ipv6 {
        NetfilterProtoFamily::IPv6
    } else {
        NetfilterProtoFamily::IPv4
    }
}

fn message(ipv6: bool, flags: u16, seq: u32, body: ConntrackMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family(ipv6), 0, 0),
            body,
        )),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// `attribute` as a raw attribute that keeps its NLA_F_NESTED flag (the crate's
/// `ConntrackAttribute::Other` drops it when emitting, and the kernel parses `CTA_FILTER` with
/// `nla_parse_nested`, which refuses a nested attribute without the flag).
fn raw(attribute: &impl Nla) -> DefaultNla {
    let mut value = vec![0; attribute.value_len()];
    attribute.emit_value(&mut value);
    let nested = if attribute.is_nested() {
        NLA_F_NESTED
    } else {
        0
    };
    DefaultNla::new(attribute.kind() | nested, value)
}

/// The nested `CTA_FILTER` attribute: flags in host byte order (`nla_get_u32`).
fn filter_attribute(orig_flags: u32, reply_flags: u32) -> DefaultNla {
    let inner = [
        DefaultNla::new(CTA_FILTER_ORIG_FLAGS, orig_flags.to_ne_bytes().to_vec()),
        DefaultNla::new(CTA_FILTER_REPLY_FLAGS, reply_flags.to_ne_bytes().to_vec()),
    ];
    let mut value = vec![0; inner.as_slice().buffer_len()];
    inner.as_slice().emit(&mut value);
    DefaultNla::new(CTA_FILTER | NLA_F_NESTED, value)
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` for one family; with `filter`, the kernel (5.8 and
/// later) returns only the entries that have its fields; older kernels ignore the attribute
/// and return the whole family.
pub(super) fn dump_request(ipv6: bool, seq: u32, filter: Option<&KernelFilter>) -> Vec<u8> {
    let Some(filter) = filter.filter(|f| !f.is_empty()) else {
        return message(
            ipv6,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            ConntrackMessage::Get(Vec::new()),
        );
    };
    let mut attributes = Vec::new();
    let (mut orig_flags, mut reply_flags) = (0, 0);
    let mut orig = Vec::new();
    if let Some(dst) = filter.orig_dst {
        orig_flags |= CTA_FILTER_F_CTA_IP_DST;
        orig.push(CtTuple::Ip(vec![IPTuple::DestinationAddress(dst)]));
    }
    if let Some(protocol) = filter.protocol {
        orig_flags |= CTA_FILTER_F_CTA_PROTO_NUM;
        let mut proto = vec![ProtoTuple::Protocol(protocol.into())];
        if let Some(port) = filter.orig_dst_port {
            orig_flags |= CTA_FILTER_F_CTA_PROTO_DST_PORT;
            proto.push(ProtoTuple::DestinationPort(port));
        }
        orig.push(CtTuple::Proto(proto));
    }
    if !orig.is_empty() {
        attributes.push(raw(&ConntrackAttribute::CtaTupleOrig(orig)));
    }
    if let Some(src) = filter.reply_src {
        reply_flags |= CTA_FILTER_F_CTA_IP_SRC;
        attributes.push(raw(&ConntrackAttribute::CtaTupleReply(vec![CtTuple::Ip(
            vec![IPTuple::SourceAddress(src)],
        )])));
    }
    attributes.push(filter_attribute(orig_flags, reply_flags));
    message(
        ipv6,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        ConntrackMessage::Other {
            message_type: IPCTNL_MSG_CT_GET,
            attributes,
        },
    )
}

/// `IPCTNL_MSG_CT_DELETE` of exactly `flow`: its original tuple (with its zones) and its id,
/// as conntrack(8) deletes what it listed. Always carries `CTA_TUPLE_ORIG`: a delete without
/// a tuple is a flush of the whole table (`ctnetlink_del_conntrack`).
pub(super) fn delete_request(flow: &Flow, seq: u32) -> Vec<u8> {
    let mut tuple = vec![
        CtTuple::Ip(vec![
            IPTuple::SourceAddress(flow.orig.src),
            IPTuple::DestinationAddress(flow.orig.dst),
        ]),
        CtTuple::Proto(vec![
            ProtoTuple::Protocol(flow.protocol.into()),
            ProtoTuple::SourcePort(flow.orig.src_port),
            ProtoTuple::DestinationPort(flow.orig.dst_port),
        ]),
    ];
    if let Some(zone) = flow.orig_zone {
        tuple.push(CtTuple::Other(DefaultNla::new(
            CTA_TUPLE_ZONE,
            zone.to_be_bytes().to_vec(),
        )));
    }
    let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(tuple)];
    if let Some(zone) = flow.zone {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ZONE,
            zone.to_be_bytes().to_vec(),
        )));
    }
    if let Some(id) = flow.id {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ID,
            id.to_be_bytes().to_vec(),
        )));
    }
    message(
        flow.ipv6(),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        ConntrackMessage::Delete(attributes),
    )
}

/// One message of the kernel's answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// A conntrack entry of a dump; `None` when it could not be read or is not an IP flow with
    /// both tuples (it is skipped and counted).
    Entry(Option<Flow>),
    /// The end of a dump, with the kernel's error code (0, or a negative errno).
    Done(i32),
    /// An acknowledgement: 0, or a negative errno.
    Ack(i32),
    /// Anything else (another subsystem, NLMSG_NOOP).
    Other,
}

fn be16(value: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(value.get(..2)?.try_into().ok()?))
}

fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

/// A tuple's addresses, protocol, ports and zone.
fn tuple(parts: &[CtTuple]) -> Option<(Tuple, u8, Option<u16>)> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut src_port, mut dst_port, mut zone) = (0, 0, None);
    for part in parts {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(protos) => {
                for proto in protos {
                    match proto {
                        ProtoTuple::Protocol(p) => protocol = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => src_port = *p,
                        ProtoTuple::DestinationPort(p) => dst_port = *p,
                        _ => {}
                    }
                }
            }
            CtTuple::Other(nla) if nla.kind() & NLA_TYPE_MASK == CTA_TUPLE_ZONE => {
                let mut value = vec![0; nla.value_len()];
                nla.emit_value(&mut value);
                zone = be16(&value);
            }
            _ => {}
        }
    }
    let tuple = Tuple {
        src: src?,
        dst: dst?,
        src_port,
        dst_port,
    };
    Some((tuple, protocol?, zone))
}

/// The flow of one dumped entry (`IPCTNL_MSG_CT_NEW` in a dump).
pub(super) fn flow(attributes: &[ConntrackAttribute]) -> Option<Flow> {
    let (mut orig, mut reply, mut zone, mut id) = (None, None, None, None);
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(parts) => orig = tuple(parts),
            ConntrackAttribute::CtaTupleReply(parts) => reply = tuple(parts),
            ConntrackAttribute::Other(nla)
                if matches!(nla.kind() & NLA_TYPE_MASK, CTA_ZONE | CTA_ID) =>
            {
                let mut value = vec![0; nla.value_len()];
                nla.emit_value(&mut value);
                if nla.kind() & NLA_TYPE_MASK == CTA_ZONE {
                    zone = be16(&value);
                } else {
                    id = be32(&value);
                }
            }
            _ => {}
        }
    }
    let (orig, protocol, orig_zone) = orig?;
    let (reply, _, _) = reply?;
    let family = |a: &IpAddr| a.is_ipv6();
    let same_family = [orig.src, reply.src, reply.dst]
        .iter()
        .all(|a| family(a) == family(&orig.dst));
    same_family.then_some(Flow {
        protocol,
        orig,
        reply,
        zone,
        orig_zone,
        id,
    })
}

/// The messages of one datagram, each with its sequence number. Bad framing (a length that
/// does not fit) is an error for the whole datagram; an entry that does not parse is
/// `Entry(None)`.
pub(super) fn answers(datagram: &[u8]) -> Result<Vec<(u32, Answer)>, String> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let buffer = NetlinkBuffer::new_checked(rest)
            .map_err(|e| format!("a netlink message does not fit its datagram: {e}"))?;
        let length = buffer.length() as usize;
        let seq = buffer.sequence_number();
        let message_type = buffer.message_type();
        let one = &rest[..length];
        let answer = match message_type {
            NLMSG_DONE | NLMSG_ERROR => {
                match NetlinkMessage::<NetfilterMessage>::deserialize(one).map(|m| m.payload) {
                    Ok(NetlinkPayload::Done(done)) => Answer::Done(done.code),
                    Ok(NetlinkPayload::Error(error)) => Answer::Ack(error.raw_code()),
                    Ok(_) => Answer::Other,
                    Err(e) => return Err(format!("unreadable NLMSG_ERROR or NLMSG_DONE: {e}")),
                }
            }
            t if t >> 8 == NFNL_SUBSYS_CTNETLINK && t & 0xff == IPCTNL_MSG_CT_NEW => {
                match NetlinkMessage::<NetfilterMessage>::deserialize(one).map(|m| m.payload) {
                    Ok(NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                        ..
                    })) => Answer::Entry(flow(&attributes)),
                    _ => Answer::Entry(None),
                }
            }
            _ => Answer::Other,
        };
        out.push((seq, answer));
        // Messages are 4-byte aligned inside a datagram (NLMSG_ALIGN).
        let advance = (length + 3) & !3;
        rest = rest.get(advance..).unwrap_or_default();
    }
    Ok(out)
}

fn errno_text(code: i32) -> String {
    io::Error::from_raw_os_error(code.saturating_abs()).to_string()
}

/// What one dump returned.
#[derive(Debug, Default)]
pub(super) struct Dump {
    /// Entries read (parsed or not).
    pub entries: usize,
    /// Entries that could not be read.
    pub unreadable: usize,
    /// The entries `keep` accepted.
    pub kept: Vec<Flow>,
    /// The dump stopped at the entry cap before its end.
    pub capped: bool,
}

/// Why a dump failed.
#[derive(Debug)]
pub(super) enum DumpError {
    /// The kernel refused the request with this errno (a kernel filter it cannot apply:
    /// EINVAL, EOPNOTSUPP).
    Refused(i32),
    Failed(BackendError),
}

/// The outcome of the deletes of one family.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Deleted {
    pub deleted: usize,
    /// ENOENT: the entry expired or was deleted since the dump (or was replaced: its id
    /// differs).
    pub gone: usize,
}

/// A ctnetlink socket for one call, bounded by `deadline`.
pub(super) struct Conn {
    socket: Socket,
    seq: u32,
    buffer: Vec<u8>,
    deadline: Instant,
}

impl Conn {
    pub fn open(deadline: Instant) -> Result<Self, BackendError> {
        let op = "opening a ctnetlink socket (NETLINK_NETFILTER)";
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| BackendError::kernel(op, e))?;
        socket
            .bind_auto()
            .map_err(|e| BackendError::kernel(op, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| BackendError::kernel(op, e))?;
        // ACKs without a copy of each request: more of them fit in the receive buffer.
        socket
            .set_cap_ack(true)
            .map_err(|e| BackendError::kernel(op, e))?;
        Ok(Self {
            socket,
            seq: 0,
            buffer: vec![0; RECV_BUFFER],
            deadline,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, bytes: &[u8], op: &str) -> Result<(), BackendError> {
        let sent = self
            .socket
            .send(bytes, 0)
            .map_err(|e| BackendError::kernel(op, e))?;
        if sent != bytes.len() {
            return Err(BackendError::kernel(
                op,
                format!("sent {sent} of {} bytes", bytes.len()),
            ));
        }
        Ok(())
    }

    /// One datagram, waiting at most until the deadline. Returns its length in `self.buffer`.
    fn recv(&mut self, op: &str) -> Result<usize, BackendError> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::kernel(
                    op,
                    "no complete answer within the time allowed for clearing conntrack entries",
                ));
            }
            let wait = left.min(RECV_TIMEOUT);
            let timeout = nix::sys::time::TimeVal::new(
                wait.as_secs() as _,
                // At least 1 µs: a zero timeout means "wait forever".
                wait.subsec_micros().max(1) as _,
            );
            nix::sys::socket::setsockopt(
                &self.socket,
                nix::sys::socket::sockopt::ReceiveTimeout,
                &timeout,
            )
            .map_err(|e| BackendError::kernel(op, e))?;
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
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        continue; // reported above
                    }
                    return Err(BackendError::kernel(
                        op,
                        format!("the kernel did not answer within {RECV_TIMEOUT:?}"),
                    ));
                }
                Err(e) => return Err(BackendError::kernel(op, e)),
            }
        }
    }

    /// Dumps the conntrack table of one family; `keep` chooses the entries returned. Stops at
    /// an entry past `max_entries` (`Dump::capped`; the rest of the dump is then still queued
    /// on the socket, which must not be used again).
    pub fn dump(
        &mut self,
        ipv6: bool,
        filter: Option<&KernelFilter>,
        max_entries: usize,
        mut keep: impl FnMut(&Flow) -> bool,
    ) -> Result<Dump, DumpError> {
        let op = format!("dumping the {} conntrack table", family_name(ipv6));
        let failed = |detail: String| DumpError::Failed(BackendError::kernel(op.clone(), detail));
        let seq = self.next_seq();
        self.send(&dump_request(ipv6, seq, filter), &op)
            .map_err(DumpError::Failed)?;
        let mut dump = Dump::default();
        loop {
            let n = self.recv(&op).map_err(DumpError::Failed)?;
            let answers = answers(&self.buffer[..n]).map_err(failed)?;
            for (answer_seq, answer) in answers {
                if answer_seq != seq {
                    // Not an answer to this request (an ACK of an earlier call cannot reach a
                    // new socket, so this is only defensive).
                    continue;
                }
                match answer {
                    Answer::Entry(_) if dump.entries == max_entries => {
                        dump.capped = true;
                        return Ok(dump);
                    }
                    Answer::Entry(entry) => {
                        dump.entries += 1;
                        match entry {
                            Some(flow) if keep(&flow) => dump.kept.push(flow),
                            Some(_) => {}
                            None => dump.unreadable += 1,
                        }
                    }
                    Answer::Done(0) => return Ok(dump),
                    Answer::Done(code) => {
                        return Err(failed(format!(
                            "the dump ended with an error: {}",
                            errno_text(code)
                        )))
                    }
                    Answer::Ack(0) => {}
                    Answer::Ack(code) if code == -libc::EPERM => {
                        return Err(failed(format!(
                            "{} (ctnetlink needs CAP_NET_ADMIN)",
                            errno_text(code)
                        )))
                    }
                    Answer::Ack(code) => return Err(DumpError::Refused(code)),
                    Answer::Other => {}
                }
            }
        }
    }

    /// Deletes `flows`, `DELETE_WINDOW` requests per send, and accounts for every
    /// acknowledgement: deleted, or already gone (ENOENT). Any other answer is an error
    /// naming the entry, after the window is read.
    pub fn delete(&mut self, flows: &[Flow]) -> Result<Deleted, BackendError> {
        let op = "deleting conntrack entries";
        let mut out = Deleted::default();
        let mut first_error: Option<String> = None;
        let mut failed = 0usize;
        for window in flows.chunks(DELETE_WINDOW) {
            let first_seq = self.seq.wrapping_add(1);
            let mut bytes = Vec::new();
            for flow in window {
                let seq = self.next_seq();
                bytes.extend_from_slice(&delete_request(flow, seq));
            }
            self.send(&bytes, op)?;
            let mut answered = vec![false; window.len()];
            let mut pending = window.len();
            while pending > 0 {
                let n = self.recv(op)?;
                let answers =
                    answers(&self.buffer[..n]).map_err(|e| BackendError::kernel(op, e))?;
                for (seq, answer) in answers {
                    let index = seq.wrapping_sub(first_seq) as usize;
                    let Answer::Ack(code) = answer else { continue };
                    if index >= window.len() || answered[index] {
                        continue;
                    }
                    answered[index] = true;
                    pending -= 1;
                    match code {
                        0 => out.deleted += 1,
                        c if c == -libc::ENOENT => out.gone += 1,
                        // The kernel checks the permission once per datagram and answers
                        // only its first message: no other ACK of this window will come.
                        c if c == -libc::EPERM => {
                            return Err(BackendError::kernel(
                                op,
                                format!("{} (ctnetlink needs CAP_NET_ADMIN)", errno_text(c)),
                            ))
                        }
                        c => {
                            failed += 1;
                            first_error.get_or_insert_with(|| {
                                format!("{:?}: {}", window[index], errno_text(c))
                            });
                        }
                    }
                }
            }
        }
        match first_error {
            None => Ok(out),
            Some(first) => Err(BackendError::kernel(
                op,
                format!(
                    "{failed} of {} deletes failed ({} deleted, {} already gone); the first: {first}",
                    flows.len(),
                    out.deleted,
                    out.gone
                ),
            )),
        }
    }
}

#[cfg(test)]
#[path = "netlink_tests.rs"]
mod tests;
