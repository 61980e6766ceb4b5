//! Tracing a packet through a rendered plan (as kube-proxy's packet-flow tests do): which
//! endpoints it can be DNATed to, with what probability, and whether it is masqueraded or
//! rejected. Used by tests to check behaviour, not just text. It understands exactly the matches
//! and targets the renderer writes.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// A packet entering the nat table (PREROUTING for forwarded, OUTPUT for local traffic).
#[derive(Debug, Clone)]
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: &'a str,
    pub dport: u16,
    /// The node's own addresses (for `-m addrtype`).
    pub local: &'a [IpAddr],
}

/// One way the packet can go.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub probability: f64,
    /// `ip:port` it is DNATed to, if any.
    pub dnat: Option<String>,
    pub masquerade: bool,
    /// REJECT or DROP from the filter table when not DNATed.
    pub verdict: Option<String>,
    /// `--seconds` of a `recent --rcheck` passed on the way (session affinity).
    pub affinity: Option<u32>,
}

fn tokenize(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Rules per chain, per table.
fn parse(restore: &str) -> BTreeMap<(String, String), Vec<Vec<String>>> {
    let mut table = String::new();
    let mut chains: BTreeMap<(String, String), Vec<Vec<String>>> = BTreeMap::new();
    for line in restore.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let tokens = tokenize(rule);
            if let Some((chain, rest)) = tokens.split_first() {
                chains
                    .entry((table.clone(), chain.clone()))
                    .or_default()
                    .push(rest.to_vec());
            }
        }
    }
    chains
}

fn in_cidr(ip: &IpAddr, cidr: &str) -> bool {
    let (addr, len) = cidr
        .split_once('/')
        .unwrap_or((cidr, if ip.is_ipv4() { "32" } else { "128" }));
    match (addr.parse::<IpAddr>(), len.parse::<u8>()) {
        (Ok(net), Ok(len)) => crate::cidr::contains(net, len, ip),
        _ => false,
    }
}

/// Whether the matches of `rule` hold; `Some(p)` when a `statistic` match makes it random.
fn matches(rule: &[String], p: &Packet) -> Option<f64> {
    let mut probability = 1.0;
    let mut i = 0;
    let mut negate = false;
    while i < rule.len() {
        let word = rule[i].as_str();
        let arg = rule.get(i + 1).map(String::as_str).unwrap_or("");
        let ok = match word {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-s" => in_cidr(&p.src, arg),
            "-d" => in_cidr(&p.dst, arg),
            // The tracer's packet is the connection's first, as it entered: its destination
            // is the conntrack entry's original one (`KPX-PROXY-FIREWALL`'s matches).
            "--ctorigdst" => in_cidr(&p.dst, arg),
            "--ctorigdstport" => arg.parse::<u16>().ok() == Some(p.dport),
            "-p" => arg == p.protocol,
            "--dport" => arg.parse::<u16>().ok() == Some(p.dport),
            "--dst-type" => p.local.contains(&p.dst),
            "--src-type" => p.local.contains(&p.src),
            "--probability" => {
                probability *= arg.parse::<f64>().unwrap_or(1.0);
                true
            }
            // No affinity state in a trace: a `--rcheck` never matches, `--set` always does.
            "--rcheck" => false,
            "-j" => break,
            _ => {
                i += 1;
                continue;
            }
        };
        if ok == negate {
            return None;
        }
        negate = false;
        i += 2;
    }
    Some(probability)
}

fn target(rule: &[String]) -> (&str, Option<&str>) {
    let at = rule
        .iter()
        .position(|w| w == "-j")
        .map_or(rule.len(), |i| i + 1);
    let name = rule.get(at).map(String::as_str).unwrap_or("");
    let to = rule
        .iter()
        .position(|w| w == "--to-destination")
        .and_then(|i| rule.get(i + 1))
        .map(String::as_str);
    (name, to)
}

type Chains = BTreeMap<(String, String), Vec<Vec<String>>>;

/// Walks chains for one packet, collecting every way out.
struct Walker<'a> {
    chains: &'a Chains,
    packet: &'a Packet<'a>,
    out: Vec<Outcome>,
}

impl Walker<'_> {
    /// Walks `chain` from rule `from`; returns the state if the packet falls off its end.
    fn walk(
        &mut self,
        table: &str,
        chain: &str,
        from: usize,
        state: Outcome,
        depth: usize,
    ) -> Option<Outcome> {
        if depth > 32 {
            return Some(state);
        }
        let rules = self
            .chains
            .get(&(table.to_string(), chain.to_string()))
            .cloned()
            .unwrap_or_default();
        let mut state = state;
        for (i, rule) in rules.iter().enumerate().skip(from) {
            if let Some(at) = rule.iter().position(|w| w == "--rcheck") {
                let seconds = rule[at..]
                    .iter()
                    .position(|w| w == "--seconds")
                    .and_then(|j| rule.get(at + j + 1))
                    .and_then(|s| s.parse().ok());
                state.affinity = state.affinity.or(seconds);
            }
            let Some(prob) = matches(rule, self.packet) else {
                continue;
            };
            if prob < 1.0 {
                // Random: the rest of the chain is the other branch.
                let mut skipped = state.clone();
                skipped.probability *= 1.0 - prob;
                if let Some(fell_through) = self.walk(table, chain, i + 1, skipped, depth + 1) {
                    self.out.push(fell_through);
                }
                state.probability *= prob;
            }
            match target(rule) {
                ("DNAT", to) => {
                    state.dnat = to.map(String::from);
                    self.out.push(state);
                    return None;
                }
                ("MARK", _) | ("KPX-MARK-MASQ", _) => state.masquerade = true,
                ("RETURN", _) => return Some(state),
                (verdict @ ("REJECT" | "DROP" | "ACCEPT"), _) => {
                    state.verdict = Some(verdict.to_string());
                    self.out.push(state);
                    return None;
                }
                (next, _) => match self.walk(table, next, 0, state.clone(), depth + 1) {
                    Some(returned) => state = returned,
                    None => return None,
                },
            }
        }
        Some(state)
    }
}

/// Every way `packet` can go through the plan's filter `KPX-PROXY-FIREWALL`, nat
/// `KPX-SERVICES` and, when not DNATed, the filter table's Service rejects.
pub fn trace(restore: &str, packet: &Packet) -> Vec<Outcome> {
    trace_through(restore, packet, &["KPX-SERVICES", "KPX-EXTERNAL-SERVICES"])
}

/// The filter chains a packet not DNATed passes, by where it enters: kpx's jumps from the
/// built-in chains (`chains::JUMPS`) for OUTPUT (the node's own), INPUT (to a local address)
/// and FORWARD.
pub fn filter_chains(from_node: bool, to_local: bool) -> &'static [&'static str] {
    match (from_node, to_local) {
        (true, _) => &["KPX-SERVICES", "KPX-EXTERNAL-SERVICES"],
        (false, true) => &["KPX-EXTERNAL-SERVICES"],
        (false, false) => &["KPX-EXTERNAL-SERVICES", "KPX-SERVICES"],
    }
}

/// As [`trace`], with the filter chains given; a DNATed packet that reaches its own source is
/// masqueraded when `KPX-POSTROUTING` has the hairpin rule for it.
pub fn trace_through(restore: &str, packet: &Packet, filter_chains: &[&str]) -> Vec<Outcome> {
    let chains = parse(restore);
    let start = Outcome {
        probability: 1.0,
        dnat: None,
        masquerade: false,
        verdict: None,
        affinity: None,
    };
    // `KPX-PROXY-FIREWALL` is first in INPUT, FORWARD and OUTPUT and matches the original
    // destination, so whatever nat did, a source it drops is dropped (walked here first: the
    // verdict does not depend on nat).
    let mut firewall = Walker {
        chains: &chains,
        packet,
        out: Vec::new(),
    };
    if let Some(rest) = firewall.walk("filter", super::chains::FIREWALL, 0, start.clone(), 0) {
        if rest.verdict.is_some() {
            firewall.out.push(rest);
        }
    }
    if !firewall.out.is_empty() {
        return firewall.out;
    }
    let mut nat = Walker {
        chains: &chains,
        packet,
        out: Vec::new(),
    };
    if let Some(rest) = nat.walk("nat", "KPX-SERVICES", 0, start, 0) {
        nat.out.push(rest);
    }
    let mut out = Vec::new();
    for mut o in nat.out {
        if let Some(to) = &o.dnat {
            let host = to.rsplit_once(':').map_or(to.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.parse::<IpAddr>().ok() == Some(packet.src) {
                let hairpin = chains
                    .get(&("nat".to_string(), "KPX-POSTROUTING".to_string()))
                    .is_some_and(|rules| {
                        rules.iter().any(|r| {
                            matches(
                                r,
                                &Packet {
                                    dst: packet.src,
                                    ..packet.clone()
                                },
                            )
                            .is_some()
                                && target(r).0 == "MASQUERADE"
                                && r.iter().any(|w| w == "-s")
                        })
                    });
                o.masquerade |= hairpin;
            }
            out.push(o);
            continue;
        }
        // Not DNATed: the filter table's Service chains decide (reject, drop, or nothing).
        let mut filter = Walker {
            chains: &chains,
            packet,
            out: Vec::new(),
        };
        for chain in filter_chains {
            if let Some(rest) = filter.walk("filter", chain, 0, o.clone(), 0) {
                if rest.verdict.is_some() {
                    filter.out.push(rest);
                }
            }
            if !filter.out.is_empty() {
                break;
            }
        }
        if filter.out.is_empty() {
            out.push(o);
        } else {
            out.extend(filter.out);
        }
    }
    out
}

/// The outcomes as lines like `DNAT to 198.19.0.2:8080 p=0.50 masquerade`, sorted.
pub fn describe(outcomes: &[Outcome]) -> Vec<String> {
    let mut lines: Vec<String> = outcomes
        .iter()
        .filter(|o| o.probability > 1e-9)
        .map(|o| {
            let mut line = match (&o.dnat, &o.verdict) {
                (Some(to), _) => format!("DNAT to {to}"),
                (None, Some(v)) => v.clone(),
                (None, None) => "no rule".to_string(),
            };
            line.push_str(&format!(" p={:.2}", o.probability));
            if o.masquerade {
                line.push_str(" masquerade");
            }
            line
        })
        .collect();
    lines.sort();
    lines
}
