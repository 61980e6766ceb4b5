//! An in-memory nftables: the flat `nft -f` text the nftables plan is made of, applied to a
//! table model that refuses what the kernel refuses, and a packet tracer over it (tests only).
//!
//! kube-proxy tests its nftables proxier the same way: knftables' `Fake` applies transactions
//! to an in-memory table and fails on what the kernel would (a rule or element naming a chain or
//! set that does not exist, deleting a chain still referenced, deleting an absent element), and
//! `pkg/proxy/nftables/helpers_test.go`'s `nftablesTracer` (`runChain`) walks a packet through
//! the chains. This one parses each rule into matches and statements when it is added, so a rule
//! the tracer does not understand fails loudly at load (naming the token) instead of being
//! skipped at trace time, and follows every random branch (`numgen`) with its probability, as
//! `iptables/trace.rs` does for `statistic`.
//!
//! Kernel behaviour followed (net/netfilter/nf_tables_api.c): a batch is atomic (one bad
//! command changes nothing); `add` of an existing table, chain, set or equal element is a
//! no-op, of a chain with a different hook (or of a hook onto a regular chain) is refused;
//! `delete chain` of a chain something jumps to or a map element points at is EBUSY;
//! `delete set` of a set a rule uses is EBUSY; `delete element` of an absent element is ENOENT;
//! jumps to base chains are refused; at commit, every chain reachable from a base chain is
//! validated: no loops, at most 16 nested jumps (`NFT_JUMP_STACK_SIZE`), `dnat` only in nat
//! chains on prerouting/output, `masquerade` only in nat chains on postrouting/input
//! (`nft_nat_validate`, `nft_masq_validate`), `reject` only on prerouting/input/forward/output
//! (`nft_reject_validate`). Each of these refusals was checked against kernel 6.18 with
//! nft 1.0.6 in a throwaway network namespace (and the accepted counterparts accepted); the
//! kernel refuses some at the command, this model at commit (line 0), with the same result.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A command the kernel (or `nft`'s parser) would refuse, or text this interpreter does not
/// know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}\n    {text}")]
pub struct LoadError {
    /// 1-based line of the `nft -f` text (0: the commit-time validation).
    pub line: usize,
    pub text: String,
    pub reason: String,
}

/// A netfilter hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    fn parse(word: &str) -> Option<Hook> {
        Some(match word {
            "prerouting" => Hook::Prerouting,
            "input" => Hook::Input,
            "forward" => Hook::Forward,
            "output" => Hook::Output,
            "postrouting" => Hook::Postrouting,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseSpec {
    kind: String,
    hook: Hook,
    priority: i32,
    policy_drop: bool,
}

#[derive(Debug, Clone, Default)]
struct Chain {
    base: Option<BaseSpec>,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    items: Vec<Item>,
}

/// One component of a set key or a map value, normalised so `198.18.0.1`, a port and `tcp`
/// compare as the kernel compares their bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Addr(IpAddr),
    /// A prefix (interval sets only).
    Net(IpNet),
    Num(u64),
    Word(String),
}

impl Key {
    fn parse(token: &str) -> Key {
        let bare = token.trim_start_matches('[').trim_end_matches(']');
        if let Ok(a) = bare.parse::<IpAddr>() {
            Key::Addr(a)
        } else if let Ok(n) = bare.parse::<IpNet>() {
            Key::Net(n.trunc())
        } else if let Some(n) = parse_number(token) {
            Key::Num(n)
        } else {
            Key::Word(token.to_string())
        }
    }

    /// Whether the packet's value `value` is in this element component.
    fn covers(&self, value: &Key) -> bool {
        match (self, value) {
            (Key::Net(n), Key::Addr(a)) => n.contains(a),
            (a, b) => a == b,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Addr(a) => write!(f, "{a}"),
            Key::Net(n) => write!(f, "{n}"),
            Key::Num(n) => write!(f, "{n}"),
            Key::Word(w) => f.write_str(w),
        }
    }
}

/// A verdict, in a rule or as a verdict map's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Verdict(Verdict),
    Data(Vec<Key>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Verdict,
    Data(usize),
}

#[derive(Debug, Clone)]
struct Set {
    is_map: bool,
    key_arity: usize,
    value: Option<ValueKind>,
    interval: bool,
    dynamic: bool,
    timeout: Option<u32>,
    elements: BTreeMap<Vec<Key>, Option<Value>>,
    /// The protocol word before `dport` in a `typeof`'s value (`th`, `tcp`, …).
    typeof_port: Option<String>,
    /// Declared by an earlier transaction (so `nft` reads its `typeof` back from the kernel).
    committed: bool,
}

#[derive(Debug, Clone, Default)]
struct Table {
    chains: BTreeMap<String, Chain>,
    sets: BTreeMap<String, Set>,
}

/// What a rule reads from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selector {
    Saddr,
    Daddr,
    L4proto,
    /// `th dport` (`None`) or `tcp|udp|sctp dport` (which also requires that protocol).
    Dport(Option<&'static str>),
    Mark,
    FibSaddrType,
    FibDaddrType,
    CtState,
    CtStatus,
    /// `numgen random mod N`.
    Numgen(u32),
}

#[derive(Debug, Clone)]
enum Match {
    /// `SEL [!=|==] VALUE`; `VALUE` is a list for `ct state new,established`.
    Cmp {
        sel: Selector,
        negate: bool,
        values: Vec<Key>,
    },
    /// `meta mark & MASK ==|!= VALUE`.
    Masked { mask: u64, negate: bool, value: u64 },
    /// `SEL . SEL … [!=] @set`.
    Lookup {
        key: Vec<Selector>,
        set: String,
        negate: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkOp {
    Or,
    Xor,
    Set,
}

#[derive(Debug, Clone)]
enum Dnat {
    To(IpAddr, Option<u16>),
    /// `numgen random mod N offset B map @m`: slot `B + r`, `r` uniform in `0..N`.
    Numgen {
        modulus: u32,
        offset: u64,
        map: String,
    },
}

#[derive(Debug, Clone)]
enum Stmt {
    Verdict(Verdict),
    Vmap { key: Vec<Selector>, map: String },
    Reject(String),
    Masquerade,
    MarkSet { op: MarkOp, value: u64 },
    Dnat(Dnat),
    Update { set: String, key: Vec<Selector> },
    Counter,
}

#[derive(Debug, Clone)]
enum Item {
    Match(Match),
    Stmt(Stmt),
}

/// The tables of one or both families, as `nft -f` commands left them.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    /// By (family, name).
    tables: BTreeMap<(String, String), Table>,
}

fn parse_number(token: &str) -> Option<u64> {
    match token.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => token.parse().ok(),
    }
}

/// Words, quoted strings (kept with their quotes), and `{ } , ;` on their own.
fn tokenize(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        if quoted {
            current.push(c);
            if c == '"' {
                quoted = false;
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        match c {
            '"' => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                current.push(c);
                quoted = true;
            }
            '{' | '}' | ',' | ';' => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {
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

/// A cursor over one command's tokens; errors are plain reasons, the caller adds the line.
struct Cursor<'a> {
    toks: &'a [String],
    pos: usize,
}

type Res<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.toks.get(self.pos).map(String::as_str)
    }

    fn peek_at(&self, ahead: usize) -> Option<&'a str> {
        self.toks.get(self.pos + ahead).map(String::as_str)
    }

    fn next(&mut self, what: &str) -> Res<&'a str> {
        let t = self
            .toks
            .get(self.pos)
            .ok_or_else(|| format!("ends where {what} was expected"))?;
        self.pos += 1;
        Ok(t)
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.peek() == Some(word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, word: &str) -> Res<()> {
        match self.peek() {
            Some(t) if t == word => {
                self.pos += 1;
                Ok(())
            }
            Some(t) => Err(format!("unexpected token {t:?}, expected {word:?}")),
            None => Err(format!("ends where {word:?} was expected")),
        }
    }

    fn done(&self) -> bool {
        self.pos >= self.toks.len()
    }

    fn number(&mut self, what: &str) -> Res<u64> {
        let t = self.next(what)?;
        parse_number(t).ok_or_else(|| format!("{what}: {t:?} is not a number"))
    }

    /// `a,b,c` (the tokenizer split the commas off).
    fn list(&mut self, what: &str) -> Res<Vec<&'a str>> {
        let mut out = vec![self.next(what)?];
        while self.eat(",") {
            out.push(self.next(what)?);
        }
        Ok(out)
    }
}

fn unknown(token: &str, context: &str) -> String {
    format!(
        "unknown token {token:?} {context} (the interpreter knows only what nft-layout.md uses)"
    )
}

/// `Ns` (what the renderer writes), also `Nm`, `Nh`, `Nd`.
fn parse_seconds(token: &str) -> Res<u32> {
    let (digits, unit) = token.split_at(token.len().saturating_sub(1));
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "timeout {token:?}: expected a number of seconds like 10800s"
            ))
        }
    };
    digits
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("timeout {token:?}: expected a number of seconds like 10800s"))
}

/// Parses the `{ … ; … }` block of a set or map.
fn parse_set_block(c: &mut Cursor, is_map: bool) -> Res<Set> {
    c.expect("{")?;
    let mut set = Set {
        is_map,
        key_arity: 0,
        value: None,
        interval: false,
        dynamic: false,
        timeout: None,
        elements: BTreeMap::new(),
        typeof_port: None,
        committed: false,
    };
    loop {
        let word = c.next("a set property or '}'")?;
        match word {
            "}" => break,
            ";" => continue,
            "type" | "typeof" => {
                // Key parts joined by `.`, then `: value` for maps, up to `;`.
                let mut key_parts = 1;
                let mut value: Option<(usize, bool)> = None;
                loop {
                    match c.peek() {
                        None | Some(";") | Some("}") => break,
                        Some(".") => match value.as_mut() {
                            Some((n, _)) => *n += 1,
                            None => key_parts += 1,
                        },
                        Some(":") => value = Some((1, false)),
                        Some("dport") if word == "typeof" && value.is_some() => {
                            set.typeof_port =
                                c.pos.checked_sub(1).and_then(|i| c.toks.get(i)).cloned();
                        }
                        Some("verdict") if value.is_some() => value = Some((1, true)),
                        Some(t) if word == "type" => {
                            const TYPES: &[&str] = &[
                                "ipv4_addr",
                                "ipv6_addr",
                                "inet_proto",
                                "inet_service",
                                "mark",
                                "integer",
                                "verdict",
                            ];
                            if !TYPES.contains(&t) {
                                return Err(unknown(t, "as a set type"));
                            }
                        }
                        Some(_) => {}
                    }
                    c.pos += 1;
                }
                set.key_arity = key_parts;
                set.value = value.map(|(n, verdict)| {
                    if verdict {
                        ValueKind::Verdict
                    } else {
                        ValueKind::Data(n)
                    }
                });
                if is_map != set.value.is_some() {
                    return Err(if is_map {
                        "a map needs `: <value type>` in its type".to_string()
                    } else {
                        "a set has no value type (use `add map`)".to_string()
                    });
                }
            }
            "flags" => {
                for flag in c.list("a set flag")? {
                    match flag {
                        "interval" => set.interval = true,
                        "dynamic" => set.dynamic = true,
                        "timeout" | "constant" => {}
                        other => return Err(unknown(other, "as a set flag")),
                    }
                }
            }
            "timeout" => set.timeout = Some(parse_seconds(c.next("a timeout")?)?),
            "size" => {
                c.number("size")?;
            }
            "comment" => {
                c.next("a comment")?;
            }
            "policy" => {
                c.next("a set policy")?;
            }
            // Overlapping intervals merged by nft (kpx's nodeport-cidrs).
            "auto-merge" => {}
            other => return Err(unknown(other, "in a set declaration")),
        }
    }
    if set.key_arity == 0 {
        return Err("a set needs `type` or `typeof`".to_string());
    }
    Ok(set)
}

/// Parses `{ elem, elem }` of `add|delete element`.
fn parse_elements(c: &mut Cursor, with_values: bool) -> Res<Vec<(Vec<Key>, Option<Value>)>> {
    c.expect("{")?;
    let mut out = Vec::new();
    if c.eat("}") {
        return Ok(out);
    }
    loop {
        let mut key = vec![Key::parse(c.next("an element")?)];
        while c.eat(".") {
            key.push(Key::parse(c.next("an element component")?));
        }
        // Per-element options (nft writes them after the key, before the value); they change
        // nothing a trace sees.
        while let Some("comment" | "timeout" | "expires") = c.peek() {
            c.pos += 2;
        }
        let mut value = None;
        if c.eat(":") {
            let first = c.next("an element value")?;
            value = Some(match first {
                "accept" => Value::Verdict(Verdict::Accept),
                "drop" => Value::Verdict(Verdict::Drop),
                "return" => Value::Verdict(Verdict::Return),
                "jump" => Value::Verdict(Verdict::Jump(c.next("a chain")?.to_string())),
                "goto" => Value::Verdict(Verdict::Goto(c.next("a chain")?.to_string())),
                other => {
                    let mut data = vec![Key::parse(other)];
                    while c.eat(".") {
                        data.push(Key::parse(c.next("a value component")?));
                    }
                    Value::Data(data)
                }
            });
        }
        while let Some("comment" | "timeout" | "expires") = c.peek() {
            c.pos += 2;
        }
        if value.is_some() && !with_values {
            // `delete element` may name the value too; nft ignores it.
            value = None;
        }
        out.push((key, value));
        match c.next("',' or '}'")? {
            "," => {
                if c.eat("}") {
                    break;
                }
            }
            "}" => break,
            other => return Err(format!("unexpected token {other:?} in an element list")),
        }
    }
    Ok(out)
}

/// Parses a selector at the cursor, if one starts there.
fn parse_selector(c: &mut Cursor, family: &str) -> Res<Option<Selector>> {
    let (Some(a), b) = (c.peek(), c.peek_at(1)) else {
        return Ok(None);
    };
    let sel = match (a, b) {
        ("ip" | "ip6", Some(dir @ ("saddr" | "daddr"))) => {
            if a != family {
                return Err(format!(
                    "`{a} {dir}` in a table of family {family}: it would never match"
                ));
            }
            c.pos += 2;
            if dir == "saddr" {
                Selector::Saddr
            } else {
                Selector::Daddr
            }
        }
        ("meta", Some("l4proto")) => {
            c.pos += 2;
            Selector::L4proto
        }
        ("meta", Some("mark")) if c.peek_at(2) != Some("set") => {
            c.pos += 2;
            Selector::Mark
        }
        ("th", Some("dport")) => {
            c.pos += 2;
            Selector::Dport(None)
        }
        (p @ ("tcp" | "udp" | "sctp"), Some("dport")) => {
            c.pos += 2;
            Selector::Dport(Some(match p {
                "tcp" => "tcp",
                "udp" => "udp",
                _ => "sctp",
            }))
        }
        ("fib", Some(dir @ ("saddr" | "daddr"))) => {
            c.pos += 2;
            c.expect("type")?;
            if dir == "saddr" {
                Selector::FibSaddrType
            } else {
                Selector::FibDaddrType
            }
        }
        ("ct", Some("state")) => {
            c.pos += 2;
            Selector::CtState
        }
        ("ct", Some("status")) => {
            c.pos += 2;
            Selector::CtStatus
        }
        ("numgen", _) => {
            c.pos += 1;
            c.expect("random")?;
            c.expect("mod")?;
            let n = c.number("numgen modulus")?;
            let n = u32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("numgen modulus {n}: must be 1..2^32"))?;
            Selector::Numgen(n)
        }
        _ => return Ok(None),
    };
    Ok(Some(sel))
}

fn parse_value(sel: Selector, token: &str, family: &str) -> Res<Key> {
    let key = Key::parse(token);
    let ok = match (sel, &key) {
        (Selector::Saddr | Selector::Daddr, Key::Addr(a)) => a.is_ipv6() == (family == "ip6"),
        (Selector::Saddr | Selector::Daddr, Key::Net(n)) => {
            matches!(n, IpNet::V6(_)) == (family == "ip6")
        }
        (Selector::L4proto, Key::Word(w)) => {
            ["tcp", "udp", "sctp", "icmp", "icmpv6"].contains(&w.as_str())
        }
        (Selector::Dport(_) | Selector::Mark | Selector::Numgen(_), Key::Num(_)) => true,
        (Selector::FibSaddrType | Selector::FibDaddrType, Key::Word(w)) => {
            ["local", "unicast", "broadcast", "multicast"].contains(&w.as_str())
        }
        (Selector::CtState, Key::Word(w)) => {
            ["new", "established", "related", "invalid", "untracked"].contains(&w.as_str())
        }
        (Selector::CtStatus, Key::Word(w)) => [
            "dnat",
            "snat",
            "confirmed",
            "assured",
            "seen-reply",
            "expected",
        ]
        .contains(&w.as_str()),
        _ => false,
    };
    if ok {
        Ok(key)
    } else {
        Err(format!(
            "{token:?} is not a value {sel:?} can be compared with"
        ))
    }
}

fn parse_set_ref(token: &str) -> Res<String> {
    token
        .strip_prefix('@')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("expected @set, found {token:?}"))
}

fn parse_dnat(c: &mut Cursor, family: &str) -> Res<Dnat> {
    if let Some(f @ ("ip" | "ip6")) = c.peek() {
        if f != family {
            return Err(format!("`dnat {f} to` in a table of family {family}"));
        }
        c.pos += 1;
    }
    c.expect("to")?;
    if c.eat("numgen") {
        c.expect("random")?;
        c.expect("mod")?;
        let modulus = c.number("numgen modulus")?;
        let modulus = u32::try_from(modulus)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("numgen modulus {modulus}: must be 1..2^32"))?;
        let offset = if c.eat("offset") {
            c.number("numgen offset")?
        } else {
            0
        };
        c.expect("map")?;
        let map = parse_set_ref(c.next("@map")?)?;
        return Ok(Dnat::Numgen {
            modulus,
            offset,
            map,
        });
    }
    let target = c.next("a DNAT address")?;
    // `A`, `A:P`, `[A6]`, `[A6]:P`.
    let (addr, port) = if let Some(rest) = target.strip_prefix('[') {
        let (a, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("DNAT target {target:?}: no closing ']'"))?;
        (a, after.strip_prefix(':'))
    } else if target.matches(':').count() == 1 {
        let (a, p) = target.split_once(':').unwrap_or((target, ""));
        (a, Some(p))
    } else {
        (target, None)
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("DNAT target {target:?}: {addr:?} is not an address"))?;
    if ip.is_ipv6() != (family == "ip6") {
        return Err(format!(
            "DNAT target {target:?} in a table of family {family}"
        ));
    }
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("DNAT target {target:?}: {p:?} is not a port"))
        })
        .transpose()?;
    Ok(Dnat::To(ip, port))
}

/// Parses the body of `add rule F T C …` into matches and statements.
fn parse_rule(c: &mut Cursor, family: &str) -> Res<Vec<Item>> {
    let mut items = Vec::new();
    while let Some(word) = c.peek() {
        if let Some(first) = parse_selector(c, family)? {
            let mut key = vec![first];
            while c.eat(".") {
                let sel = parse_selector(c, family)?.ok_or_else(|| {
                    format!(
                        "{} after '.' is not a selector",
                        c.peek().map_or("the end".to_string(), |t| format!("{t:?}"))
                    )
                })?;
                key.push(sel);
            }
            let next = c.next("a value, @set or vmap")?;
            let item = match next {
                "vmap" => Item::Stmt(Stmt::Vmap {
                    key,
                    map: parse_set_ref(c.next("@map")?)?,
                }),
                t if t.starts_with('@') => Item::Match(Match::Lookup {
                    key,
                    set: parse_set_ref(t)?,
                    negate: false,
                }),
                "!=" if c.peek().is_some_and(|t| t.starts_with('@')) => {
                    Item::Match(Match::Lookup {
                        key,
                        set: parse_set_ref(c.next("@set")?)?,
                        negate: true,
                    })
                }
                _ if key.len() > 1 => {
                    return Err(format!(
                        "a concatenation must be looked up in @set or vmap @map, found {next:?}"
                    ))
                }
                "&" if key[0] == Selector::Mark => {
                    let mask = c.number("mark mask")?;
                    let negate = match c.next("'==' or '!='")? {
                        "==" => false,
                        "!=" => true,
                        other => return Err(format!("unexpected token {other:?} after a mask")),
                    };
                    let value = c.number("mark value")?;
                    Item::Match(Match::Masked {
                        mask,
                        negate,
                        value,
                    })
                }
                op => {
                    let negate = op == "!=";
                    let first = if op == "!=" || op == "==" {
                        c.next("a value")?
                    } else {
                        op
                    };
                    let mut values = vec![parse_value(key[0], first, family)?];
                    while c.eat(",") {
                        values.push(parse_value(key[0], c.next("a value")?, family)?);
                    }
                    Item::Match(Match::Cmp {
                        sel: key[0],
                        negate,
                        values,
                    })
                }
            };
            items.push(item);
            continue;
        }
        c.pos += 1;
        let stmt = match word {
            "accept" => Stmt::Verdict(Verdict::Accept),
            "drop" => Stmt::Verdict(Verdict::Drop),
            "return" => Stmt::Verdict(Verdict::Return),
            "jump" => Stmt::Verdict(Verdict::Jump(c.next("a chain")?.to_string())),
            "goto" => Stmt::Verdict(Verdict::Goto(c.next("a chain")?.to_string())),
            "counter" => Stmt::Counter,
            "comment" => {
                c.next("a comment")?;
                continue;
            }
            "reject" => {
                let mut how = "reject".to_string();
                if c.eat("with") {
                    match c.next("a reject type")? {
                        "tcp" => {
                            c.expect("reset")?;
                            how.push_str(" with tcp reset");
                        }
                        kind @ ("icmp" | "icmpv6" | "icmpx") => {
                            c.expect("type")?;
                            let t = c.next("an icmp type")?;
                            how = format!("reject with {kind} type {t}");
                        }
                        other => return Err(unknown(other, "after `reject with`")),
                    }
                }
                Stmt::Reject(how)
            }
            "masquerade" => {
                while matches!(c.peek(), Some("fully-random" | "random" | "persistent")) {
                    c.pos += 1;
                }
                Stmt::Masquerade
            }
            "meta" => {
                // `meta mark set …` (the selector parser left it for us).
                c.expect("mark")?;
                c.expect("set")?;
                if c.eat("meta") {
                    c.expect("mark")?;
                    let op = match c.next("'|' or '^'")? {
                        "|" => MarkOp::Or,
                        "^" => MarkOp::Xor,
                        other => return Err(unknown(other, "in `meta mark set meta mark`")),
                    };
                    Stmt::MarkSet {
                        op,
                        value: c.number("mark")?,
                    }
                } else {
                    Stmt::MarkSet {
                        op: MarkOp::Set,
                        value: c.number("mark")?,
                    }
                }
            }
            "dnat" => Stmt::Dnat(parse_dnat(c, family)?),
            "update" | "add" => {
                let set = parse_set_ref(c.next("@set")?)?;
                c.expect("{")?;
                let mut key = Vec::new();
                loop {
                    let sel = parse_selector(c, family)?.ok_or_else(|| {
                        format!(
                            "{} in `update @{set} {{ … }}` is not a selector",
                            c.peek().map_or("the end".to_string(), |t| format!("{t:?}"))
                        )
                    })?;
                    key.push(sel);
                    if !c.eat(".") {
                        break;
                    }
                }
                // nft allows `timeout Ns` inside the braces.
                if c.eat("timeout") {
                    parse_seconds(c.next("a timeout")?)?;
                }
                c.expect("}")?;
                Stmt::Update { set, key }
            }
            other => return Err(unknown(other, "in a rule")),
        };
        items.push(Item::Stmt(stmt));
    }
    if items.is_empty() {
        return Err("an empty rule".to_string());
    }
    Ok(items)
}

/// The chains a rule's verdicts name, and the sets it uses.
fn rule_refs(items: &[Item]) -> (Vec<&str>, Vec<&str>) {
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    for item in items {
        match item {
            Item::Stmt(Stmt::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) => {
                chains.push(c.as_str())
            }
            Item::Stmt(Stmt::Vmap { map, .. }) => sets.push(map.as_str()),
            Item::Stmt(Stmt::Update { set, .. }) => sets.push(set.as_str()),
            Item::Stmt(Stmt::Dnat(Dnat::Numgen { map, .. })) => sets.push(map.as_str()),
            Item::Match(Match::Lookup { set, .. }) => sets.push(set.as_str()),
            _ => {}
        }
    }
    (chains, sets)
}

impl Table {
    fn check_jump(&self, target: &str) -> Res<()> {
        match self.chains.get(target) {
            None => Err(format!(
                "jump/goto to chain {target:?}, which does not exist"
            )),
            Some(ch) if ch.base.is_some() => Err(format!(
                "jump/goto to base chain {target:?}: the kernel refuses it"
            )),
            Some(_) => Ok(()),
        }
    }

    fn set(&self, name: &str) -> Res<&Set> {
        self.sets
            .get(name)
            .ok_or_else(|| format!("set or map @{name} does not exist"))
    }

    /// What the kernel checks when a rule is added: every chain and set it names exists and
    /// fits how it is used.
    fn check_rule(&self, items: &[Item]) -> Res<()> {
        // The transport protocol the rule matched, if one (`meta l4proto tcp`, `tcp dport`).
        let mut l4proto_known = false;
        let mut l4proto: Option<String> = None;
        for item in items {
            match item {
                Item::Match(Match::Cmp {
                    sel,
                    negate,
                    values,
                }) => {
                    if let (Selector::Dport(Some(p)), false) = (sel, negate) {
                        l4proto = Some(p.to_string());
                    }
                    if let (Selector::L4proto, false, [Key::Word(p)]) =
                        (sel, negate, values.as_slice())
                    {
                        l4proto = Some(p.clone());
                    }
                    l4proto_known |= matches!(sel, Selector::Dport(Some(_)))
                        || (*sel == Selector::L4proto && !negate);
                }
                Item::Match(Match::Lookup { key, set, .. }) => {
                    let s = self.set(set)?;
                    if s.is_map {
                        return Err(format!("@{set} is a map, looked up as a set"));
                    }
                    if s.key_arity != key.len() {
                        return Err(format!(
                            "@{set} has {} key part(s), the rule looks up {}",
                            s.key_arity,
                            key.len()
                        ));
                    }
                }
                Item::Match(Match::Masked { .. }) => {}
                Item::Stmt(Stmt::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) => {
                    self.check_jump(c)?
                }
                Item::Stmt(Stmt::Vmap { key, map }) => {
                    let s = self.set(map)?;
                    if s.value != Some(ValueKind::Verdict) {
                        return Err(format!("vmap @{map}: not a verdict map"));
                    }
                    if s.key_arity != key.len() {
                        return Err(format!(
                            "@{map} has {} key part(s), the rule looks up {}",
                            s.key_arity,
                            key.len()
                        ));
                    }
                }
                Item::Stmt(Stmt::Update { set, key }) => {
                    // No check of `flags dynamic`: kernel 6.18 with nft 1.0.6 accepts
                    // `update` into a plain set declared in an earlier transaction (tried).
                    let s = self.set(set)?;
                    if s.key_arity != key.len() {
                        return Err(format!(
                            "@{set} has {} key part(s), the rule adds {}",
                            s.key_arity,
                            key.len()
                        ));
                    }
                }
                Item::Stmt(Stmt::Dnat(d)) => {
                    let with_port = match d {
                        Dnat::To(_, port) => port.is_some(),
                        Dnat::Numgen { map, .. } => {
                            let s = self.set(map)?;
                            // nft 1.0.6 rebuilds a map's `typeof` from what the kernel stores
                            // and checks it against the rule: `th dport` there, or another
                            // protocol's, conflicts with the rule's `meta l4proto` ("conflicting
                            // protocols specified: tcp vs. th"). A map declared in the same
                            // transaction is not read back, so the first load passes. Tried on
                            // this machine (kernel 6.18, nft 1.0.6).
                            if let (true, Some(want), Some(got)) =
                                (s.committed, &s.typeof_port, &l4proto)
                            {
                                if want != got {
                                    return Err(format!(
                                        "nft 1.0.6 refuses this rule once @{map} exists in the kernel: its typeof's `{want} dport` conflicts with the rule's {got} (conflicting protocols specified: {got} vs. {want})"
                                    ));
                                }
                            }
                            match s.value {
                                Some(ValueKind::Data(n)) if s.key_arity == 1 && n <= 2 => n == 2,
                                _ => {
                                    return Err(format!(
                                        "dnat … map @{map}: needs a map from a number to an address (. port)"
                                    ))
                                }
                            }
                        }
                    };
                    // nft: "transport protocol mapping is only valid after transport
                    // protocol match".
                    if with_port && !l4proto_known {
                        return Err(
                            "dnat to a port needs a `meta l4proto` (or `tcp dport`) match before it"
                                .to_string(),
                        );
                    }
                }
                Item::Stmt(_) => {}
            }
        }
        Ok(())
    }

    /// Who refers to `chain`: a rule of another chain, or a map element.
    fn referrer(&self, chain: &str) -> Option<String> {
        for (name, ch) in &self.chains {
            if name == chain {
                continue;
            }
            for r in &ch.rules {
                if rule_refs(&r.items).0.contains(&chain) {
                    return Some(format!("a rule of chain {name:?}: {}", r.text));
                }
            }
        }
        for (name, set) in &self.sets {
            for (key, value) in &set.elements {
                if let Some(Value::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) = value {
                    if c == chain {
                        let key: Vec<String> = key.iter().map(Key::to_string).collect();
                        return Some(format!("element {} of map @{name}", key.join(" . ")));
                    }
                }
            }
        }
        None
    }

    fn set_user(&self, set: &str) -> Option<String> {
        self.chains.iter().find_map(|(name, ch)| {
            ch.rules
                .iter()
                .find(|r| rule_refs(&r.items).1.contains(&set))
                .map(|r| format!("a rule of chain {name:?}: {}", r.text))
        })
    }

    /// The commit-time check (`nft_table_validate`): from every base chain, the chains it
    /// reaches (through rules and verdict maps) form no loop, nest at most 16 deep, and use
    /// only statements allowed on that hook and chain type.
    fn validate(&self) -> Res<()> {
        for (name, ch) in &self.chains {
            if let Some(base) = &ch.base {
                let mut stack = vec![name.clone()];
                self.validate_from(name, base, &mut stack)?;
            }
        }
        Ok(())
    }

    fn validate_from(&self, chain: &str, base: &BaseSpec, stack: &mut Vec<String>) -> Res<()> {
        let Some(ch) = self.chains.get(chain) else {
            return Err(format!("chain {chain:?} does not exist"));
        };
        let path = stack.join(" -> ");
        let nat = base.kind == "nat";
        for r in &ch.rules {
            let mut targets: Vec<&str> = Vec::new();
            for item in &r.items {
                let Item::Stmt(stmt) = item else { continue };
                match stmt {
                    Stmt::Dnat(_)
                        if !(nat && matches!(base.hook, Hook::Prerouting | Hook::Output)) =>
                    {
                        return Err(format!(
                            "dnat reached from {:?} {:?} (via {}): only nat chains on prerouting/output may DNAT",
                            base.kind,
                            base.hook,
                            path
                        ))
                    }
                    Stmt::Masquerade
                        if !(nat && matches!(base.hook, Hook::Postrouting | Hook::Input)) =>
                    {
                        return Err(format!(
                            "masquerade reached from {:?} {:?} (via {}): only nat chains on postrouting/input may masquerade",
                            base.kind,
                            base.hook,
                            path
                        ))
                    }
                    Stmt::Reject(_) if base.hook == Hook::Postrouting => {
                        return Err(format!(
                            "reject reached from postrouting (via {}): not allowed there",
                            path
                        ))
                    }
                    Stmt::Verdict(Verdict::Jump(t) | Verdict::Goto(t)) => targets.push(t),
                    Stmt::Vmap { map, .. } => {
                        if let Some(set) = self.sets.get(map) {
                            for v in set.elements.values().flatten() {
                                if let Value::Verdict(Verdict::Jump(t) | Verdict::Goto(t)) = v {
                                    targets.push(t);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            for t in targets {
                if stack.iter().any(|s| s == t) {
                    return Err(format!("a loop: {} -> {t}", path));
                }
                if stack.len() > 16 {
                    return Err(format!("more than 16 nested jumps: {} -> {t}", path));
                }
                stack.push(t.to_string());
                self.validate_from(t, base, stack)?;
                stack.pop();
            }
        }
        Ok(())
    }
}

impl Ruleset {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `nft -f` text as one transaction: every command in order, then the commit-time
    /// validation; on any error nothing changes.
    pub fn apply(&mut self, text: &str) -> Result<(), LoadError> {
        let mut next = self.clone();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            next.command(trimmed).map_err(|reason| LoadError {
                line: i + 1,
                text: trimmed.to_string(),
                reason,
            })?;
        }
        for ((family, name), table) in &mut next.tables {
            table.validate().map_err(|reason| LoadError {
                line: 0,
                text: format!("commit of table {family} {name}"),
                reason,
            })?;
            for set in table.sets.values_mut() {
                set.committed = true;
            }
        }
        *self = next;
        Ok(())
    }

    fn table_mut(&mut self, family: &str, name: &str) -> Res<&mut Table> {
        self.tables
            .get_mut(&(family.to_string(), name.to_string()))
            .ok_or_else(|| format!("table {family} {name} does not exist"))
    }

    fn command(&mut self, line: &str) -> Res<()> {
        let toks = tokenize(line);
        let mut c = Cursor {
            toks: &toks,
            pos: 0,
        };
        let verb = c.next("a command")?;
        let object = c.next("an object (table, chain, rule, set, map, element)")?;
        let family = c.next("a family")?;
        if family != "ip" && family != "ip6" {
            return Err(unknown(family, "as a family (kpx writes ip and ip6)"));
        }
        let table = c.next("a table name")?;
        match (verb, object) {
            ("add", "table") => {
                if c.eat("{") {
                    loop {
                        match c.next("'}'")? {
                            "}" => break,
                            ";" => {}
                            "comment" => {
                                c.next("a comment")?;
                            }
                            other => return Err(unknown(other, "in a table declaration")),
                        }
                    }
                }
                self.tables
                    .entry((family.to_string(), table.to_string()))
                    .or_default();
            }
            ("delete", "table") => {
                if self
                    .tables
                    .remove(&(family.to_string(), table.to_string()))
                    .is_none()
                {
                    return Err(format!("table {family} {table} does not exist"));
                }
            }
            ("flush", "table") => {
                let t = self.table_mut(family, table)?;
                for ch in t.chains.values_mut() {
                    ch.rules.clear();
                }
                for s in t.sets.values_mut() {
                    s.elements.clear();
                }
            }
            ("add", "chain") => {
                let name = c.next("a chain name")?;
                let base = if c.eat("{") {
                    let mut kind = None;
                    let mut hook = None;
                    let mut priority = None;
                    let mut policy_drop = false;
                    loop {
                        match c.next("'}'")? {
                            "}" => break,
                            ";" => {}
                            "type" => {
                                let k = c.next("a chain type")?;
                                if !["nat", "filter", "route"].contains(&k) {
                                    return Err(unknown(k, "as a chain type"));
                                }
                                kind = Some(k.to_string());
                                c.expect("hook")?;
                                let h = c.next("a hook")?;
                                hook = Some(Hook::parse(h).ok_or_else(|| unknown(h, "as a hook"))?);
                                c.expect("priority")?;
                                let p = c.next("a priority")?;
                                priority = Some(p.parse::<i32>().map_err(|_| {
                                    format!(
                                        "priority {p:?}: write a number (nft 1.0.6 refuses named priorities such as dstnat on input, forward and output)"
                                    )
                                })?);
                            }
                            "policy" => match c.next("a policy")? {
                                "accept" => policy_drop = false,
                                "drop" => policy_drop = true,
                                other => return Err(unknown(other, "as a chain policy")),
                            },
                            "comment" => {
                                c.next("a comment")?;
                            }
                            other => return Err(unknown(other, "in a chain declaration")),
                        }
                    }
                    match (kind, hook, priority) {
                        (Some(kind), Some(hook), Some(priority)) => {
                            if kind == "nat" && hook == Hook::Forward {
                                return Err("a nat chain cannot hook forward".to_string());
                            }
                            Some(BaseSpec {
                                kind,
                                hook,
                                priority,
                                policy_drop,
                            })
                        }
                        _ => None,
                    }
                } else {
                    None
                };
                let t = self.table_mut(family, table)?;
                match t.chains.get(name) {
                    Some(existing) => match (&existing.base, &base) {
                        (_, None) => {}
                        (Some(a), Some(b)) if a == b => {}
                        (Some(a), Some(b)) => {
                            return Err(format!(
                                "chain {name:?} exists as {} hook {:?} priority {}: cannot change it to {} hook {:?} priority {}",
                                a.kind, a.hook, a.priority, b.kind, b.hook, b.priority
                            ))
                        }
                        (None, Some(_)) => {
                            return Err(format!(
                                "chain {name:?} exists as a regular chain: cannot make it a base chain"
                            ))
                        }
                    },
                    None => {
                        if name.len() > 255 {
                            return Err(format!("chain name {name:?} is longer than 255 bytes"));
                        }
                        t.chains.insert(
                            name.to_string(),
                            Chain {
                                base,
                                rules: Vec::new(),
                            },
                        );
                    }
                }
            }
            ("flush", "chain") => {
                let name = c.next("a chain name")?;
                let t = self.table_mut(family, table)?;
                t.chains
                    .get_mut(name)
                    .ok_or_else(|| format!("chain {name:?} does not exist"))?
                    .rules
                    .clear();
            }
            ("delete", "chain") => {
                let name = c.next("a chain name")?;
                let t = self.table_mut(family, table)?;
                if !t.chains.contains_key(name) {
                    return Err(format!("chain {name:?} does not exist"));
                }
                if let Some(by) = t.referrer(name) {
                    return Err(format!(
                        "chain {name:?} is still referenced (EBUSY), by {by}"
                    ));
                }
                t.chains.remove(name);
            }
            ("add" | "insert", "rule") => {
                let chain = c.next("a chain name")?;
                let items = parse_rule(&mut c, family)?;
                let t = self.table_mut(family, table)?;
                if !t.chains.contains_key(chain) {
                    return Err(format!("chain {chain:?} does not exist"));
                }
                t.check_rule(&items)?;
                let body = toks[5..].join(" ");
                let rule = Rule { text: body, items };
                if let Some(ch) = t.chains.get_mut(chain) {
                    if verb == "insert" {
                        ch.rules.insert(0, rule);
                    } else {
                        ch.rules.push(rule);
                    }
                }
            }
            ("add", kind @ ("set" | "map")) => {
                let name = c.next("a set name")?;
                let set = parse_set_block(&mut c, kind == "map")?;
                let t = self.table_mut(family, table)?;
                match t.sets.get(name) {
                    Some(old) => {
                        if old.is_map != set.is_map
                            || old.key_arity != set.key_arity
                            || old.value != set.value
                            || old.interval != set.interval
                        {
                            return Err(format!("@{name} exists with a different type or flags"));
                        }
                    }
                    None => {
                        t.sets.insert(name.to_string(), set);
                    }
                }
            }
            ("flush", kind @ ("set" | "map")) | ("delete", kind @ ("set" | "map")) => {
                let name = c.next("a set name")?;
                let t = self.table_mut(family, table)?;
                let set = t
                    .sets
                    .get_mut(name)
                    .ok_or_else(|| format!("{kind} @{name} does not exist"))?;
                // nft 1.0.6 looks the name up among sets or maps by the word for `flush`
                // (`flush set` of a map: ENOENT) but not for `delete` (either word deletes
                // either kind). Both tried on this machine.
                if verb == "flush" && set.is_map != (kind == "map") {
                    return Err(format!(
                        "@{name} is a {}, not a {kind} (ENOENT): `flush {kind}` finds only {kind}s",
                        if set.is_map { "map" } else { "set" }
                    ));
                }
                if verb == "flush" {
                    set.elements.clear();
                } else {
                    if let Some(by) = t.set_user(name) {
                        return Err(format!("{kind} @{name} is still used (EBUSY), by {by}"));
                    }
                    t.sets.remove(name);
                }
            }
            (verb @ ("add" | "delete"), "element") => {
                let name = c.next("a set name")?;
                let elements = parse_elements(&mut c, verb == "add")?;
                let t = self.table_mut(family, table)?;
                let set = t.set(name)?.clone();
                for (key, value) in &elements {
                    let shown: Vec<String> = key.iter().map(Key::to_string).collect();
                    let shown = shown.join(" . ");
                    if key.len() != set.key_arity {
                        return Err(format!(
                            "element {shown} of @{name}: {} part(s), the set has {}",
                            key.len(),
                            set.key_arity
                        ));
                    }
                    if !set.interval && key.iter().any(|k| matches!(k, Key::Net(_))) {
                        return Err(format!(
                            "element {shown} of @{name}: a prefix needs `flags interval`"
                        ));
                    }
                    if verb == "delete" {
                        continue;
                    }
                    match (set.value, value) {
                        (None, None) => {}
                        (Some(ValueKind::Verdict), Some(Value::Verdict(v))) => {
                            if let Verdict::Jump(c) | Verdict::Goto(c) = v {
                                t.check_jump(c)
                                    .map_err(|e| format!("element {shown} of @{name}: {e}"))?;
                            }
                        }
                        (Some(ValueKind::Data(n)), Some(Value::Data(d))) if d.len() == n => {}
                        _ => {
                            return Err(format!(
                                "element {shown} of @{name}: its value does not fit the map's type"
                            ))
                        }
                    }
                }
                let Some(set) = t.sets.get_mut(name) else {
                    return Err(format!("set or map @{name} does not exist"));
                };
                for (key, value) in elements {
                    let shown: Vec<String> = key.iter().map(Key::to_string).collect();
                    let shown = shown.join(" . ");
                    if verb == "delete" {
                        if set.elements.remove(&key).is_none() {
                            return Err(format!("element {shown} is not in @{name} (ENOENT)"));
                        }
                    } else {
                        match set.elements.get(&key) {
                            Some(old) if *old != value => {
                                return Err(format!(
                                    "element {shown} is already in @{name} with another value (delete it first)"
                                ))
                            }
                            _ => {
                                set.elements.insert(key, value);
                            }
                        }
                    }
                }
            }
            _ => return Err(unknown(&format!("{verb} {object}"), "as a command")),
        }
        if !c.done() {
            let rest = c.peek().unwrap_or("");
            return Err(unknown(rest, "after the command"));
        }
        Ok(())
    }

    /// The tables as text, sorted (chains with their rules, sets with their elements), for
    /// comparing two rulesets with a readable difference.
    pub fn listing(&self) -> String {
        self.list(false)
    }

    /// As [`listing`](Self::listing), but with slot maps resolved: a `dnat … numgen random mod
    /// N offset B map @m` rule shows the N values it picks from instead of `B` and `@m`, and
    /// the maps only such rules use are left out but for a count of the slots no rule picks
    /// (leaked elements). Two tables that DNAT every packet alike list the same whatever
    /// slots their endpoint sets were given (a partial sync allocates them by history, a full
    /// one afresh) and however many shard maps are declared.
    pub fn listing_by_behaviour(&self) -> String {
        self.list(true)
    }

    fn list(&self, resolved: bool) -> String {
        let mut out = String::new();
        for ((family, name), t) in &self.tables {
            // Slot maps: used by a numgen DNAT, and by nothing else.
            let mut picked: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
            let mut other_use: BTreeSet<&str> = BTreeSet::new();
            for ch in t.chains.values() {
                for r in &ch.rules {
                    for item in &r.items {
                        match item {
                            Item::Stmt(Stmt::Dnat(Dnat::Numgen {
                                modulus,
                                offset,
                                map,
                            })) => picked
                                .entry(map)
                                .or_default()
                                .extend(*offset..offset + u64::from(*modulus)),
                            _ => other_use.extend(rule_refs(std::slice::from_ref(item)).1),
                        }
                    }
                }
            }
            let slot_map = |name: &str| {
                resolved
                    && !other_use.contains(name)
                    && t.sets.get(name).is_some_and(|s| {
                        s.is_map && s.key_arity == 1 && matches!(s.value, Some(ValueKind::Data(_)))
                    })
            };
            out.push_str(&format!("table {family} {name}\n"));
            for (cname, ch) in &t.chains {
                match &ch.base {
                    Some(b) => out.push_str(&format!(
                        "  chain {cname} {{ type {} hook {:?} priority {} }}\n",
                        b.kind, b.hook, b.priority
                    )),
                    None => out.push_str(&format!("  chain {cname}\n")),
                }
                for r in &ch.rules {
                    match r.items.iter().find_map(|i| match i {
                        Item::Stmt(Stmt::Dnat(Dnat::Numgen {
                            modulus,
                            offset,
                            map,
                        })) if slot_map(map) => Some((modulus, offset, map)),
                        _ => None,
                    }) {
                        Some((modulus, offset, map)) => {
                            let values: Vec<String> = (*offset..offset + u64::from(*modulus))
                                .map(|slot| {
                                    match t
                                        .sets
                                        .get(map.as_str())
                                        .and_then(|s| s.elements.get(&vec![Key::Num(slot)]))
                                    {
                                        Some(Some(Value::Data(d))) => d
                                            .iter()
                                            .map(Key::to_string)
                                            .collect::<Vec<_>>()
                                            .join(" . "),
                                        _ => "<missing>".to_string(),
                                    }
                                })
                                .collect();
                            // Which slot holds which endpoint does not change what the rule
                            // picks (each with 1/N): compared as a sorted list.
                            let mut values = values;
                            values.sort();
                            let pick =
                                format!("numgen random mod {modulus} offset {offset} map @{map}");
                            let text = r.text.replace(
                                &pick,
                                &format!("numgen random mod {modulus} [{}]", values.join(", ")),
                            );
                            out.push_str(&format!("    {text}\n"));
                        }
                        None => out.push_str(&format!("    {}\n", r.text)),
                    }
                }
            }
            for (sname, s) in &t.sets {
                if slot_map(sname) {
                    let empty = BTreeSet::new();
                    let used = picked.get(sname.as_str()).unwrap_or(&empty);
                    let leaked = s
                        .elements
                        .keys()
                        .filter(|k| !matches!(k.as_slice(), [Key::Num(n)] if used.contains(n)))
                        .count();
                    if leaked > 0 {
                        out.push_str(&format!("  map {sname}: {leaked} slot(s) no rule picks\n"));
                    }
                    continue;
                }
                out.push_str(&format!(
                    "  {} {sname} ({} part(s){}{}{})\n",
                    if s.is_map { "map" } else { "set" },
                    s.key_arity,
                    if s.interval { ", interval" } else { "" },
                    if s.dynamic { ", dynamic" } else { "" },
                    s.timeout
                        .map_or(String::new(), |t| format!(", timeout {t}s"))
                ));
                for (k, v) in &s.elements {
                    let k: Vec<String> = k.iter().map(Key::to_string).collect();
                    let v = match v {
                        None => String::new(),
                        Some(Value::Verdict(v)) => format!(" : {v}"),
                        Some(Value::Data(d)) => {
                            let d: Vec<String> = d.iter().map(Key::to_string).collect();
                            format!(" : {}", d.join(" . "))
                        }
                    };
                    out.push_str(&format!("    {}{v}\n", k.join(" . ")));
                }
            }
        }
        out
    }

    /// The rules of a chain, as written (without the `add rule F T C` prefix).
    pub fn rules(&self, family: &str, table: &str, chain: &str) -> Option<Vec<&str>> {
        let t = self.tables.get(&(family.to_string(), table.to_string()))?;
        Some(
            t.chains
                .get(chain)?
                .rules
                .iter()
                .map(|r| r.text.as_str())
                .collect(),
        )
    }

    /// The names of a table's chains and sets (what a full resync reads back).
    pub fn names(&self, family: &str, table: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        self.tables
            .get(&(family.to_string(), table.to_string()))
            .map(|t| {
                (
                    t.chains.keys().cloned().collect(),
                    t.sets.keys().cloned().collect(),
                )
            })
            .unwrap_or_default()
    }

    /// The number of elements of a set or map.
    pub fn element_count(&self, family: &str, table: &str, set: &str) -> Option<usize> {
        let t = self.tables.get(&(family.to_string(), table.to_string()))?;
        Some(t.sets.get(set)?.elements.len())
    }

    /// Adds what a traced packet's `update @set` statements added (so a second packet from
    /// the same client sees the affinity the first one recorded).
    pub fn record(&mut self, outcome: &Outcome) {
        for u in &outcome.updates {
            if let Some(set) = self
                .tables
                .get_mut(&(u.family.clone(), u.table.clone()))
                .and_then(|t| t.sets.get_mut(&u.set))
            {
                set.elements.insert(u.key.clone(), None);
            }
        }
    }

    /// See [`trace`].
    pub fn trace(&self, packet: &Packet, path: Path) -> Vec<Outcome> {
        trace(self, packet, path)
    }
}

/// Where a packet comes from, which decides the hooks it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Forwarded in from a pod, another node or outside: prerouting, then input (to a local
    /// address) or forward and postrouting.
    Forwarded,
    /// A process of the node: output, postrouting (and input when it stays local).
    Node,
}

/// A new connection's first packet.
#[derive(Debug, Clone)]
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'a str,
    pub dport: u16,
    /// The node's own addresses (for `fib … type local`; loopback is always local).
    pub local: &'a [IpAddr],
}

/// An element a traced packet added to a dynamic set.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub family: String,
    pub table: String,
    pub set: String,
    pub key: Vec<Key>,
}

/// One way the packet can go (the shape of `iptables::trace::Outcome`, plus what it leaves).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub probability: f64,
    /// `ip:port` (`[ip]:port`) it is DNATed to, if any.
    pub dnat: Option<String>,
    /// Whether a `masquerade` statement ran for it.
    pub masquerade: bool,
    /// `drop`, `reject …` (or `error: …` if the trace itself hit something impossible); `None`
    /// when it was accepted through every hook.
    pub verdict: Option<String>,
    /// The timeout of the affinity set it was recorded in, if any.
    pub affinity: Option<u32>,
    /// The packet mark at the end.
    pub mark: u64,
    /// What `update @set` added.
    pub updates: Vec<Update>,
    /// The chains it went through, in order (for messages).
    pub chains: Vec<String>,
}

#[derive(Debug, Clone)]
struct State {
    out: Outcome,
    dst: IpAddr,
    dport: u16,
    dnatted: bool,
}

/// How a chain (or a rule) ended for one branch.
#[derive(Debug, Clone)]
enum End {
    /// Fell off the end or returned (the caller goes on).
    Fell,
    Accept,
    /// Dropped or rejected: the verdict is in the state.
    Terminal,
    /// Only from a rule: nothing decided, the next rule runs.
    Next,
    Jump(String),
    Goto(String),
    Nat,
}

struct Tracer<'a> {
    family: String,
    table_name: String,
    table: &'a Table,
    packet: &'a Packet<'a>,
}

impl Tracer<'_> {
    fn is_local(&self, ip: &IpAddr) -> bool {
        ip.is_loopback() || self.packet.local.contains(ip)
    }

    fn read(&self, sel: Selector, st: &State) -> Option<Key> {
        let p = self.packet;
        Some(match sel {
            Selector::Saddr => Key::Addr(p.src),
            Selector::Daddr => Key::Addr(st.dst),
            Selector::L4proto => Key::Word(p.protocol.to_string()),
            Selector::Dport(proto) => {
                if proto.is_some_and(|want| want != p.protocol) {
                    return None;
                }
                Key::Num(u64::from(st.dport))
            }
            Selector::Mark => Key::Num(st.out.mark),
            Selector::FibSaddrType => Key::Word(
                if self.is_local(&p.src) {
                    "local"
                } else {
                    "unicast"
                }
                .to_string(),
            ),
            Selector::FibDaddrType => Key::Word(
                if self.is_local(&st.dst) {
                    "local"
                } else {
                    "unicast"
                }
                .to_string(),
            ),
            // Traces are of a new connection's first packet.
            Selector::CtState => Key::Word("new".to_string()),
            Selector::CtStatus => Key::Word(if st.dnatted { "dnat" } else { "none" }.to_string()),
            Selector::Numgen(_) => return None,
        })
    }

    /// The key a concatenation reads, or `None` when part of it is absent (`tcp dport` of a
    /// UDP packet: the expression breaks).
    fn read_key(&self, key: &[Selector], st: &State) -> Option<Vec<Key>> {
        key.iter().map(|s| self.read(*s, st)).collect()
    }

    fn lookup<'s>(&'s self, set: &str, key: &[Key]) -> Option<(&'s Vec<Key>, &'s Option<Value>)> {
        let s = self.table.sets.get(set)?;
        if !s.interval {
            return s.elements.get_key_value(key);
        }
        s.elements
            .iter()
            .find(|(k, _)| k.len() == key.len() && k.iter().zip(key).all(|(e, v)| e.covers(v)))
    }

    /// Evaluates one rule for one state: every branch and how it ends.
    fn eval_rule(&self, rule: &Rule, st: State) -> Vec<(State, End)> {
        let mut ended = Vec::new();
        let mut live = vec![st];
        for item in &rule.items {
            let mut next = Vec::new();
            for mut s in live {
                match item {
                    Item::Match(m) => match self.eval_match(m, &s) {
                        Some(p) if p >= 1.0 => next.push(s),
                        Some(p) if p > 0.0 => {
                            let mut miss = s.clone();
                            miss.out.probability *= 1.0 - p;
                            ended.push((miss, End::Next));
                            s.out.probability *= p;
                            next.push(s);
                        }
                        _ => ended.push((s, End::Next)),
                    },
                    Item::Stmt(stmt) => match self.eval_stmt(stmt, s) {
                        Step::Go(s) => next.push(s),
                        Step::Branches(b) => ended.extend(b),
                    },
                }
            }
            live = next;
            if live.is_empty() {
                break;
            }
        }
        ended.extend(live.into_iter().map(|s| (s, End::Next)));
        ended
    }

    /// The probability that `m` holds (0 or 1 except for `numgen`).
    fn eval_match(&self, m: &Match, st: &State) -> Option<f64> {
        let holds = match m {
            Match::Cmp {
                sel: Selector::Numgen(n),
                negate,
                values,
            } => {
                let wanted = values
                    .iter()
                    .filter(|v| matches!(v, Key::Num(x) if *x < u64::from(*n)))
                    .count();
                let p = wanted as f64 / f64::from(*n);
                return Some(if *negate { 1.0 - p } else { p });
            }
            Match::Cmp {
                sel,
                negate,
                values,
            } => {
                let v = self.read(*sel, st)?;
                let any = match sel {
                    // `ct state new,established` / `ct status dnat`: a bit set.
                    Selector::CtState | Selector::CtStatus => values.contains(&v),
                    _ => values.iter().any(|e| e.covers(&v)),
                };
                any != *negate
            }
            Match::Masked {
                mask,
                negate,
                value,
            } => (st.out.mark & mask == *value) != *negate,
            Match::Lookup { key, set, negate } => {
                let k = self.read_key(key, st)?;
                self.lookup(set, &k).is_some() != *negate
            }
        };
        holds.then_some(1.0)
    }

    fn eval_stmt(&self, stmt: &Stmt, mut s: State) -> Step {
        match stmt {
            Stmt::Counter => Step::Go(s),
            Stmt::Verdict(v) => {
                let end = match v {
                    Verdict::Accept => End::Accept,
                    Verdict::Drop => {
                        s.out.verdict = Some("drop".to_string());
                        End::Terminal
                    }
                    Verdict::Return => End::Fell,
                    Verdict::Jump(c) => End::Jump(c.clone()),
                    Verdict::Goto(c) => End::Goto(c.clone()),
                };
                Step::Branches(vec![(s, end)])
            }
            Stmt::Vmap { key, map } => {
                let hit = self
                    .read_key(key, &s)
                    .and_then(|k| self.lookup(map, &k).map(|(_, v)| v.clone()));
                match hit {
                    Some(Some(Value::Verdict(v))) => self.eval_stmt(&Stmt::Verdict(v), s),
                    // A miss: the expression breaks, the next rule runs.
                    _ => Step::Branches(vec![(s, End::Next)]),
                }
            }
            Stmt::Reject(how) => {
                s.out.verdict = Some(how.clone());
                Step::Branches(vec![(s, End::Terminal)])
            }
            Stmt::Masquerade => {
                s.out.masquerade = true;
                Step::Branches(vec![(s, End::Nat)])
            }
            Stmt::MarkSet { op, value } => {
                s.out.mark = match op {
                    MarkOp::Or => s.out.mark | value,
                    MarkOp::Xor => s.out.mark ^ value,
                    MarkOp::Set => *value,
                };
                Step::Go(s)
            }
            Stmt::Update { set, key } => {
                let Some(k) = self.read_key(key, &s) else {
                    return Step::Branches(vec![(s, End::Next)]);
                };
                if let Some(t) = self.table.sets.get(set).and_then(|x| x.timeout) {
                    s.out.affinity = Some(t);
                }
                s.out.updates.push(Update {
                    family: self.family.clone(),
                    table: self.table_name.clone(),
                    set: set.clone(),
                    key: k,
                });
                Step::Go(s)
            }
            Stmt::Dnat(Dnat::To(ip, port)) => {
                let port = port.unwrap_or(s.dport);
                dnat_to(&mut s, *ip, port);
                Step::Branches(vec![(s, End::Nat)])
            }
            Stmt::Dnat(Dnat::Numgen {
                modulus,
                offset,
                map,
            }) => {
                let p = 1.0 / f64::from(*modulus);
                let mut out = Vec::new();
                for r in 0..u64::from(*modulus) {
                    let mut b = s.clone();
                    b.out.probability *= p;
                    let slot = offset + r;
                    match self.lookup(map, &[Key::Num(slot)]) {
                        Some((_, Some(Value::Data(d)))) => match d.as_slice() {
                            [Key::Addr(ip)] => {
                                let port = b.dport;
                                dnat_to(&mut b, *ip, port);
                                out.push((b, End::Nat));
                            }
                            [Key::Addr(ip), Key::Num(port)] => {
                                let port = u16::try_from(*port).unwrap_or(0);
                                dnat_to(&mut b, *ip, port);
                                out.push((b, End::Nat));
                            }
                            _ => {
                                b.out.verdict =
                                    Some(format!("error: slot {slot} of @{map} is not ip . port"));
                                out.push((b, End::Terminal));
                            }
                        },
                        // A missing slot: the map lookup breaks, the rule does not match.
                        _ => out.push((b, End::Next)),
                    }
                }
                Step::Branches(out)
            }
        }
    }

    /// Runs `chain` from rule `from`: every branch and how the chain ended for it.
    fn run_chain(
        &self,
        chain: &str,
        from: usize,
        mut st: State,
        depth: usize,
    ) -> Vec<(State, End)> {
        let Some(ch) = self.table.chains.get(chain) else {
            st.out.verdict = Some(format!("error: no chain {chain}"));
            return vec![(st, End::Terminal)];
        };
        if depth > 16 {
            st.out.verdict = Some(format!("error: more than 16 nested jumps at {chain}"));
            return vec![(st, End::Terminal)];
        }
        if from == 0 {
            st.out.chains.push(chain.to_string());
        }
        let Some(rule) = ch.rules.get(from) else {
            return vec![(st, End::Fell)];
        };
        let mut out = Vec::new();
        for (s, end) in self.eval_rule(rule, st) {
            match end {
                End::Next => out.extend(self.run_chain(chain, from + 1, s, depth)),
                End::Jump(target) => {
                    for (s, e) in self.run_chain(&target, 0, s, depth + 1) {
                        match e {
                            End::Fell => out.extend(self.run_chain(chain, from + 1, s, depth)),
                            e => out.push((s, e)),
                        }
                    }
                }
                // Falling off a chain reached by goto returns to whoever called this one.
                End::Goto(target) => out.extend(self.run_chain(&target, 0, s, depth + 1)),
                e => out.push((s, e)),
            }
        }
        out
    }
}

enum Step {
    Go(State),
    Branches(Vec<(State, End)>),
}

fn dnat_to(s: &mut State, ip: IpAddr, port: u16) {
    s.dst = ip;
    s.dport = port;
    s.dnatted = true;
    s.out.dnat = Some(match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    });
}

/// Every way `packet` can go through the ruleset's tables of its family: the base chains of
/// each hook of `path` in priority order (all tables together, as the kernel orders hooks),
/// DNAT changing the destination the later hooks (and the routing between them) see. NAT
/// chains run once per hook: after one NATs the packet the kernel skips the others
/// (`nf_nat_inet_fn`); on the node's loopback path back in (input), the connection is already
/// set up, so nat chains do not run there either.
pub fn trace(rs: &Ruleset, packet: &Packet, path: Path) -> Vec<Outcome> {
    let family = if packet.dst.is_ipv6() { "ip6" } else { "ip" };
    let is_local = |ip: &IpAddr| ip.is_loopback() || packet.local.contains(ip);
    let start = State {
        out: Outcome {
            probability: 1.0,
            dnat: None,
            masquerade: false,
            verdict: None,
            affinity: None,
            mark: 0,
            updates: Vec::new(),
            chains: Vec::new(),
        },
        dst: packet.dst,
        dport: packet.dport,
        dnatted: false,
    };
    let mut done = Vec::new();
    let mut live = vec![start];
    for stage in 0..3 {
        let mut next = Vec::new();
        for st in live {
            let local = is_local(&st.dst);
            let hook = match (path, stage) {
                (Path::Node, 0) => Some(Hook::Output),
                (Path::Node, 1) => Some(Hook::Postrouting),
                (Path::Node, _) => local.then_some(Hook::Input),
                (Path::Forwarded, 0) => Some(Hook::Prerouting),
                (Path::Forwarded, 1) => Some(if local { Hook::Input } else { Hook::Forward }),
                (Path::Forwarded, _) => (!local).then_some(Hook::Postrouting),
            };
            let Some(hook) = hook else {
                next.push(st);
                continue;
            };
            let skip_nat = path == Path::Node && hook == Hook::Input;
            for (s, terminal) in run_hook(rs, family, packet, hook, st, skip_nat) {
                if terminal {
                    done.push(s.out);
                } else {
                    next.push(s);
                }
            }
        }
        live = next;
    }
    done.extend(live.into_iter().map(|s| s.out));
    done
}

/// Runs the base chains of `hook` in priority order; `true` marks a dropped or rejected branch.
fn run_hook(
    rs: &Ruleset,
    family: &str,
    packet: &Packet,
    hook: Hook,
    st: State,
    skip_nat: bool,
) -> Vec<(State, bool)> {
    let mut bases: Vec<(i32, &str, &str, &Table, &BaseSpec)> = Vec::new();
    for ((f, tname), t) in &rs.tables {
        if f != family {
            continue;
        }
        for (cname, ch) in &t.chains {
            if let Some(b) = &ch.base {
                if b.hook == hook && !(skip_nat && b.kind == "nat") {
                    bases.push((b.priority, tname, cname, t, b));
                }
            }
        }
    }
    bases.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    // (state, whether NAT happened at this hook)
    let mut live = vec![(st, false)];
    let mut done = Vec::new();
    for (_, tname, cname, table, base) in bases {
        let mut next = Vec::new();
        for (s, natted) in live {
            if natted && base.kind == "nat" {
                next.push((s, natted));
                continue;
            }
            let tracer = Tracer {
                family: family.to_string(),
                table_name: tname.to_string(),
                table,
                packet,
            };
            for (s, end) in tracer.run_chain(cname, 0, s, 0) {
                match end {
                    End::Terminal => done.push((s, true)),
                    End::Fell if base.policy_drop => {
                        let mut s = s;
                        s.out.verdict = Some("drop".to_string());
                        done.push((s, true));
                    }
                    End::Nat => next.push((s, true)),
                    _ => next.push((s, natted)),
                }
            }
        }
        live = next;
    }
    done.extend(live.into_iter().map(|(s, _)| (s, false)));
    done
}

/// The outcomes as lines like `DNAT to 198.18.1.5:8080 p=0.50 masquerade`, sorted.
pub fn describe(outcomes: &[Outcome]) -> Vec<String> {
    let mut lines: Vec<String> = outcomes
        .iter()
        .filter(|o| o.probability > 1e-9)
        .map(|o| {
            let mut line = match (&o.dnat, &o.verdict) {
                (Some(to), Some(v)) => format!("{v} after DNAT to {to}"),
                (Some(to), None) => format!("DNAT to {to}"),
                (None, Some(v)) => v.clone(),
                (None, None) => "accepted".to_string(),
            };
            line.push_str(&format!(" p={:.2}", o.probability));
            if o.masquerade {
                line.push_str(" masquerade");
            }
            if let Some(t) = o.affinity {
                line.push_str(&format!(" affinity={t}s"));
            }
            line
        })
        .collect();
    lines.sort();
    lines
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
