//! A packet traced through the IPVS plan (tests only): the iptables part interpreted rule by
//! rule with the plan's set members, and IPVS's lookup where the kernel makes it — on INPUT
//! after the filter table for packets that arrive (`ip_vs_remote_request`, priority 99), on
//! OUTPUT after nat for the node's own (`ip_vs_local_request`, -99); a firewall-mark virtual
//! server first, the address one next (`ip_vs_service_find`). A virtual server without
//! destinations answers ICMP port unreachable (`ip_vs_leave`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::layout::{SetKind, MASQ_MARK};
use super::plan::{ip_port, Plan, PlanConfig, VsKey};
use crate::model::Protocol;

/// Where a packet comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// From another host or a pod: PREROUTING first.
    Arriving,
    /// A process of the node: OUTPUT first.
    Node,
}

#[derive(Debug, Clone)]
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub dport: u16,
    /// The node's own addresses.
    pub local: &'a [IpAddr],
}

/// What happens to the first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// IPVS sends it to one of `endpoints`; `masquerade`: the node's address as source.
    Balanced {
        endpoints: BTreeSet<String>,
        masquerade: bool,
        persistence: Option<u32>,
    },
    Reject,
    Drop,
    /// Refused because the address is a Service's and the port is none of its Services' (the
    /// address filter): not a Service, refused so the node's own listeners stay unreachable.
    Refused,
    /// Delivered to the node itself, or forwarded: not a Service.
    Passed,
    /// The plan holds something the interpreter cannot read.
    Error(String),
}

/// The iptables part, parsed: per table, per chain, its rules as words.
pub struct Tables {
    chains: BTreeMap<(String, String), Vec<Vec<String>>>,
}

fn words(rule: &str) -> Vec<String> {
    rule.split_whitespace().map(str::to_string).collect()
}

impl Tables {
    /// From `iptables-restore` text (as `rules::text` writes it).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut chains: BTreeMap<(String, String), Vec<Vec<String>>> = BTreeMap::new();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                chains.insert((table.clone(), name.to_string()), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let w = words(rest);
                let chain = w.first().cloned().unwrap_or_default();
                let rules = chains
                    .get_mut(&(table.clone(), chain.clone()))
                    .ok_or_else(|| format!("rule in undeclared chain {table} {chain}"))?;
                rules.push(w[1..].to_vec());
            } else if line == "COMMIT" || line.starts_with("-I ") || line.starts_with("-X ") {
            } else if !line.is_empty() {
                return Err(format!("unreadable line {line:?}"));
            }
        }
        Ok(Self { chains })
    }
}

struct State<'p> {
    mark: u32,
    masquerade: bool,
    members: &'p BTreeMap<SetKind, BTreeSet<String>>,
    cfg: &'p PlanConfig,
}

enum Step {
    Continue,
    Return,
    Verdict(Verdict),
}

fn in_cidr(ip: &IpAddr, cidr: &str) -> Result<bool, String> {
    // A bare address is a host (as ipset(8) prints a host member of a `hash:…,net` set).
    let net: ipnet::IpNet = cidr
        .parse()
        .or_else(|_| cidr.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("bad address {cidr}"))?;
    Ok(net.contains(ip))
}

fn set_kind(name: &str, cfg: &PlanConfig) -> Option<SetKind> {
    SetKind::ALL.into_iter().find(|k| k.name(cfg.ipv6) == name)
}

fn member(p: &Packet, dims: &str, src: IpAddr) -> Result<String, String> {
    let proto = p.protocol.lower();
    Ok(match dims {
        "dst,dst" => format!("{},{proto}:{}", p.dst, p.dport),
        "dst" => String::new(),
        "dst,dst,src" => format!("{},{proto}:{},{src}", p.dst, p.dport),
        other => return Err(format!("unknown set dimensions {other}")),
    })
}

fn parse_mark(text: &str) -> Result<(u32, u32), String> {
    let (v, m) = text.split_once('/').unwrap_or((text, "0xffffffff"));
    let num = |t: &str| {
        u32::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| format!("bad mark {t}"))
    };
    Ok((num(v)?, num(m)?))
}

impl Tables {
    fn matches(&self, rule: &[String], p: &Packet, st: &State) -> Result<(bool, usize), String> {
        let mut i = 0;
        let mut negate = false;
        while i < rule.len() {
            let w = rule[i].as_str();
            let arg = rule.get(i + 1).map(String::as_str).unwrap_or_default();
            let hit = match w {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                "-j" => return Ok((true, i)),
                "-s" => in_cidr(&p.src, arg)?,
                "-d" => in_cidr(&p.dst, arg)?,
                "-p" => arg == p.protocol.lower(),
                "-m" => {
                    i += 2;
                    continue;
                }
                "--dport" => arg.parse::<u16>().ok() == Some(p.dport),
                "--src-type" if arg == "LOCAL" => p.local.contains(&p.src),
                // The first packet of a connection.
                "--ctstate" => arg.split(',').any(|s| s == "NEW"),
                "--mark" => {
                    let (v, m) = parse_mark(arg)?;
                    st.mark & m == v
                }
                "--match-set" => {
                    let dims = rule.get(i + 2).map(String::as_str).unwrap_or_default();
                    let kind = set_kind(arg, st.cfg).ok_or_else(|| format!("unknown set {arg}"))?;
                    let set = &st.members[&kind];
                    let hit = if kind == SetKind::HealthCheckNodePorts {
                        set.contains(&p.dport.to_string())
                    } else if kind == SetKind::SourceRanges {
                        // hash:ip,port,net: the frontend exactly, the source within the net.
                        let frontend = member(p, "dst,dst", p.src)?;
                        set.iter().any(|m| {
                            m.rsplit_once(',').is_some_and(|(fe, net)| {
                                fe == frontend && in_cidr(&p.src, net).unwrap_or(false)
                            })
                        })
                    } else if dims == "dst" {
                        set.contains(&p.dst.to_string())
                    } else if dims == "src" {
                        set.contains(&p.src.to_string())
                    } else {
                        set.contains(&member(p, dims, p.src)?)
                    };
                    i += 1;
                    hit
                }
                other => return Err(format!("unknown match {other}")),
            };
            if hit == negate {
                return Ok((false, i));
            }
            negate = false;
            i += 2;
        }
        Err("a rule without -j".into())
    }

    fn walk(
        &self,
        table: &str,
        chain: &str,
        p: &Packet,
        st: &mut State,
        depth: u32,
    ) -> Result<Step, String> {
        if depth > 8 {
            return Err(format!("jumps nest too deep at {chain}"));
        }
        let Some(rules) = self.chains.get(&(table.to_string(), chain.to_string())) else {
            return Err(format!("jump to missing chain {table} {chain}"));
        };
        for rule in rules {
            let (hit, j) = self.matches(rule, p, st)?;
            if !hit {
                continue;
            }
            let target = rule.get(j + 1).map(String::as_str).unwrap_or_default();
            let opt = rule.get(j + 3).map(String::as_str).unwrap_or_default();
            match target {
                "RETURN" => return Ok(Step::Return),
                "ACCEPT" => return Ok(Step::Verdict(Verdict::Passed)),
                "DROP" => return Ok(Step::Verdict(Verdict::Drop)),
                "REJECT" => {
                    let addresses = SetKind::Addresses.name(st.cfg.ipv6);
                    if rule.contains(&addresses) {
                        return Ok(Step::Verdict(Verdict::Refused));
                    }
                    return Ok(Step::Verdict(Verdict::Reject));
                }
                "MASQUERADE" => {
                    st.masquerade = true;
                    return Ok(Step::Return);
                }
                "MARK" => {
                    let how = rule.get(j + 2).map(String::as_str).unwrap_or_default();
                    let (v, m) = parse_mark(opt)?;
                    match how {
                        "--set-xmark" => st.mark = (st.mark & !m) ^ v,
                        "--or-mark" => st.mark |= v,
                        "--xor-mark" => st.mark ^= v,
                        other => return Err(format!("unknown MARK option {other}")),
                    }
                }
                next => match self.walk(table, next, p, st, depth + 1)? {
                    Step::Verdict(v) => return Ok(Step::Verdict(v)),
                    Step::Return | Step::Continue => {}
                },
            }
        }
        Ok(Step::Continue)
    }

    /// The packet through `table`'s chain `chain` (a kpx chain a built-in one jumps to).
    fn hook(
        &self,
        table: &str,
        chain: &str,
        p: &Packet,
        st: &mut State,
    ) -> Result<Option<Verdict>, String> {
        match self.walk(table, chain, p, st, 0)? {
            Step::Verdict(Verdict::Passed) => Ok(None),
            Step::Verdict(v) => Ok(Some(v)),
            _ => Ok(None),
        }
    }
}

/// Traces the first packet of a connection through the plan of its family.
pub fn trace(cfg: &PlanConfig, plan: &Plan, tables: &Tables, p: &Packet, path: Path) -> Verdict {
    match trace_inner(cfg, plan, tables, p, path) {
        Ok(v) => v,
        Err(e) => Verdict::Error(e),
    }
}

fn trace_inner(
    cfg: &PlanConfig,
    plan: &Plan,
    tables: &Tables,
    p: &Packet,
    path: Path,
) -> Result<Verdict, String> {
    use super::layout as l;
    let members: BTreeMap<SetKind, BTreeSet<String>> = plan
        .members()
        .into_iter()
        .map(|(k, set)| {
            (
                k,
                set.iter()
                    .map(|m| super::plan::member_key(m).to_string())
                    .collect(),
            )
        })
        .collect();
    let services = plan.services();
    let mut st = State {
        mark: 0,
        masquerade: false,
        members: &members,
        cfg,
    };
    let lookup = |mark: u32| -> Option<&&super::plan::VirtualServer> {
        if mark != 0 {
            if let Some(vs) = services.get(&VsKey::Fwmark(mark)) {
                return Some(vs);
            }
        }
        services.get(&VsKey::Addr {
            ip: p.dst,
            port: p.dport,
            protocol: p.protocol,
        })
    };
    let balanced = |vs: &super::plan::VirtualServer,
                    st: &mut State,
                    tables: &Tables|
     -> Result<Verdict, String> {
        if vs.dests.is_empty() {
            return Ok(Verdict::Reject);
        }
        let mut endpoints = BTreeSet::new();
        let mut masquerade = st.mark & MASQ_MARK != 0;
        for (ip, port) in &vs.dests {
            // POSTROUTING after IPVS: the destination is the endpoint now.
            let after = Packet {
                dst: *ip,
                dport: *port,
                ..p.clone()
            };
            let mut post = State {
                mark: st.mark,
                masquerade: false,
                members: st.members,
                cfg: st.cfg,
            };
            tables.hook("nat", l::POSTROUTING, &after, &mut post)?;
            if post.masquerade && !masquerade && *ip != p.src {
                return Err(format!("masqueraded for {} only", ip_port(*ip, *port)));
            }
            masquerade |= post.masquerade;
            endpoints.insert(ip_port(*ip, *port));
        }
        Ok(Verdict::Balanced {
            endpoints,
            masquerade,
            persistence: vs.persistence,
        })
    };
    if path == Path::Node {
        if let Some(v) = tables.hook("mangle", l::MANGLE_OUT, p, &mut st)? {
            return Ok(v);
        }
        tables.hook("nat", l::SERVICES, p, &mut st)?;
        if let Some(vs) = lookup(st.mark) {
            return balanced(vs, &mut st, tables);
        }
        // No virtual server: out over loopback and back in through PREROUTING and INPUT.
        st.mark = 0;
    }
    if let Some(v) = tables.hook("mangle", l::MANGLE_PRE, p, &mut st)? {
        return Ok(v);
    }
    tables.hook("nat", l::SERVICES, p, &mut st)?;
    let local = p.local.contains(&p.dst) || plan.addresses().contains(&p.dst);
    if !local {
        return Ok(Verdict::Passed);
    }
    if let Some(v) = tables.hook("filter", l::FILTER, p, &mut st)? {
        return Ok(v);
    }
    match lookup(st.mark) {
        Some(vs) => balanced(vs, &mut st, tables),
        None => Ok(Verdict::Passed),
    }
}
