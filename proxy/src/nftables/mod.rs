//! The nftables backend: kpx's own table per family (`ip kpx`, `ip6 kpx`; layout and why in
//! `README.md`). `render` is the plan (pure); this module applies it as one `nft -f -`
//! transaction per sync — or, when a sync changes only endpoint addresses, as one netlink batch
//! of element operations, which costs the same whatever the table's size (`nft` first lists
//! every chain and set of the table into its cache). What was committed is kept in memory;
//! only a full sync reads back the table's names, to remove what is foreign to the plan.

pub mod chains;
mod dump;
pub mod netlink;
pub mod render;
#[cfg(test)]
pub mod trace;

use std::collections::HashMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, Count, Dump, SyncInput, SyncReport, Unit};
use netlink::{ElementOp, Family, Nft};
use render::{Applied, ElementChange, Existing, Key, MapId, RenderConfig, Value};

/// How long a chain that lost its last reference waits before it is deleted (kube-proxy waits
/// a second: kernels before 6.2 may still run a packet through it).
const STALE_GRACE: Duration = Duration::from_secs(1);

pub struct NftablesBackend {
    cfg: RenderConfig,
    applied: Applied,
    /// The ruleset generation after kpx's last commit: another value means someone else
    /// committed since, and the lost-state check looks closer.
    generation: Option<u32>,
    /// When each stale chain and set was flushed (each waits its own grace second).
    stale_since: HashMap<String, Instant>,
    nft: Option<Nft>,
    /// The last full sync failed: the next replaces the table.
    full_failed: bool,
}

impl NftablesBackend {
    pub fn new(cfg: RenderConfig) -> Self {
        Self {
            cfg,
            applied: Applied::default(),
            generation: None,
            stale_since: HashMap::new(),
            nft: None,
            full_failed: false,
        }
    }

    fn family(&self) -> Family {
        if self.cfg.ipv6 {
            Family::Ip6
        } else {
            Family::Ip
        }
    }

    fn family_name(&self) -> &'static str {
        if self.cfg.ipv6 {
            "ip6"
        } else {
            "ip"
        }
    }

    /// The netlink socket, opened on first use (in the namespace the backend runs in).
    fn netlink(&mut self) -> Result<&mut Nft, BackendError> {
        if self.nft.is_none() {
            self.nft =
                Some(Nft::open().map_err(|e| BackendError::kernel("netlink (nf_tables)", e))?);
        }
        self.nft
            .as_mut()
            .ok_or_else(|| BackendError::kernel("netlink (nf_tables)", "not open"))
    }

    fn existing(&mut self) -> Result<Existing, BackendError> {
        let family = self.family();
        let nft = self.netlink()?;
        if nft
            .table(family, chains::TABLE)
            .map_err(|e| BackendError::kernel("reading the kpx table", e))?
            .is_none()
        {
            return Ok(Existing::default());
        }
        let chains = nft
            .chains(family, chains::TABLE)
            .map_err(|e| BackendError::kernel("listing the kpx table's chains", e))?;
        let sets = nft
            .sets(family, chains::TABLE)
            .map_err(|e| BackendError::kernel("listing the kpx table's sets", e))?;
        Ok(Existing {
            chains: chains.into_iter().collect(),
            sets: sets.into_iter().collect(),
        })
    }

    fn record_generation(&mut self) {
        self.generation = self.netlink().ok().and_then(|n| n.generation().ok());
        if let Some(g) = self.generation {
            ours::record(g);
        }
    }

    /// What someone removed, if the ruleset moved on since kpx's last commit (looked at once
    /// per foreign commit: the table, rules per chain, elements per map).
    fn check(&mut self, nft: &mut Nft, family: Family, expected: u32) -> Option<String> {
        let generation = nft.generation().ok()?;
        if generation == expected {
            return None;
        }
        // Commits of kpx's other family (dual-stack) move the namespace's generation too.
        if ours::all_between(expected, generation) {
            self.generation = Some(generation);
            return None;
        }
        let table = self.family_name();
        let lost = match nft.table(family, chains::TABLE) {
            Ok(None) => Some(format!("table {table} {} was deleted", chains::TABLE)),
            Ok(Some(_)) => match nft.rule_counts(family, chains::TABLE) {
                Ok(counts) => missing_rules(&self.applied, &self.cfg, &counts).or_else(|| {
                    self.applied
                        .elements_per_map()
                        .into_iter()
                        .find_map(|(map, want)| {
                            let have = nft.element_count(family, chains::TABLE, &map).ok()?;
                            (have != want)
                                .then(|| format!("{map} holds {have} elements, kpx wrote {want}"))
                        })
                }),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if lost.is_none() {
            self.generation = Some(generation);
        }
        lost
    }

    fn commit_elements(&mut self, changes: &[ElementChange]) -> Result<(), BackendError> {
        let ops: Vec<ElementOp> = changes.iter().map(element_op).collect();
        let family = self.family();
        let generation = self
            .netlink()?
            .commit_elements(family, chains::TABLE, &ops)
            .map_err(|e| {
                BackendError::kernel("writing endpoint elements (nf_tables netlink)", e)
            })?;
        self.generation = Some(generation);
        ours::record(generation);
        Ok(())
    }
}

fn element_op(change: &ElementChange) -> ElementOp {
    let key = |k: &Key| match k {
        Key::Slot(slot) => netlink::slot_key(*slot),
        Key::Pair(a, b) => netlink::address_pair_key(*a, *b),
        // Structural syncs go through nft; only slots and hairpin pairs take this path.
        Key::Frontend(..) | Key::NodePort(..) => Vec::new(),
    };
    match change {
        ElementChange::Delete(map, k) => ElementOp::Delete {
            set: map.name(),
            key: key(k),
        },
        ElementChange::Add(e) => ElementOp::Add {
            set: e.map.name(),
            key: key(&e.key),
            data: match &e.value {
                Some(Value::Endpoint(ip, port)) => Some(netlink::endpoint_data(*ip, *port)),
                _ => None,
            },
        },
    }
}

/// Can this change go over netlink as it is? (Endpoint slots and hairpin pairs only.)
fn netlink_ready(changes: &[ElementChange]) -> bool {
    changes.iter().all(|c| {
        let (map, key) = match c {
            ElementChange::Delete(map, key) => (*map, key),
            ElementChange::Add(e) => (e.map, &e.key),
        };
        matches!(
            (map, key),
            (MapId::Endpoints(..), Key::Slot(_)) | (MapId::Hairpin, Key::Pair(..))
        )
    })
}

/// The ruleset generations kpx's own commits made, per network namespace: a backend seeing the
/// generation move tells the other family's commits from someone else's.
mod ours {
    use std::collections::{HashMap, VecDeque};
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;

    /// Enough for the commits between two checks of one backend (the other family's sync and
    /// housekeeping); older ones only cost a closer look.
    const KEEP: usize = 64;

    static OURS: Mutex<Option<HashMap<u64, VecDeque<u32>>>> = Mutex::new(None);

    /// The calling thread's network namespace.
    fn netns() -> Option<u64> {
        std::fs::metadata("/proc/thread-self/ns/net")
            .ok()
            .map(|m| m.ino())
    }

    pub fn record(generation: u32) {
        let (Some(ns), Ok(mut ours)) = (netns(), OURS.lock()) else {
            return;
        };
        let list = ours.get_or_insert_with(HashMap::new).entry(ns).or_default();
        list.push_back(generation);
        while list.len() > KEEP {
            list.pop_front();
        }
    }

    /// Whether every generation after `from` up to `to` was kpx's own (generations count up
    /// by one per commit and skip 0).
    pub fn all_between(from: u32, to: u32) -> bool {
        let (Some(ns), Ok(ours)) = (netns(), OURS.lock()) else {
            return false;
        };
        let Some(list) = ours.as_ref().and_then(|o| o.get(&ns)) else {
            return false;
        };
        let mut g = from;
        for _ in 0..KEEP {
            g = g.wrapping_add(1).max(1);
            if !list.contains(&g) {
                return false;
            }
            if g == to {
                return true;
            }
        }
        false
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn only_a_run_of_kpx_generations_counts_as_kpx_s() {
            for g in [4_000_000_001, 4_000_000_002, 4_000_000_004] {
                super::record(g);
            }
            assert!(super::all_between(4_000_000_000, 4_000_000_002));
            assert!(
                !super::all_between(4_000_000_000, 4_000_000_004),
                "003 was someone else's"
            );
            assert!(!super::all_between(4_000_000_004, 4_000_000_005));
            super::record(u32::MAX);
            super::record(1);
            assert!(
                super::all_between(u32::MAX - 1, 1),
                "generations skip 0 when they wrap"
            );
        }
    }
}

/// Runs `nft -f -` with `text` as one transaction.
pub fn nft_apply(text: &str) -> Result<(), BackendError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BackendError::Spawn {
            command: "nft -f -".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows as nft's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| BackendError::Spawn {
            command: "nft -f -".into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // nft's errors quote the failing line; keep the first few so the log stays readable.
    let stderr: String = stderr.lines().take(12).collect::<Vec<_>>().join("\n");
    Err(BackendError::Command {
        command: "nft -f -".into(),
        status: out.status.to_string(),
        stderr,
    })
}

/// Runs `nft` with `args`, its standard output.
pub fn nft_output(args: &[&str]) -> Result<String, BackendError> {
    crate::netfilter::exec::output(Command::new("nft").args(args), "nft")
}

/// Removes kpx's nftables tables of both families, and nothing else (kube-proxy's
/// `CleanupLeftovers` for its nftables mode deletes its own tables). Quiet when there are
/// none, or no `nft`. Returns the tables deleted.
pub fn cleanup() -> Result<usize, BackendError> {
    let mut deleted = 0;
    for (family, netlink_family) in [("ip", Family::Ip), ("ip6", Family::Ip6)] {
        let present = match Nft::open() {
            Ok(mut nft) => nft
                .table(netlink_family, chains::TABLE)
                .ok()
                .flatten()
                .is_some(),
            Err(_) => false,
        };
        if present {
            nft_apply(&format!("delete table {family} {}\n", chains::TABLE))?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

impl Backend for NftablesBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, BackendError> {
        let SyncInput {
            state,
            changes,
            mut full,
            ..
        } = input;
        // Someone else committed since kpx's last commit and removed some of its state: this
        // sync must be full, or kpx's own commit would hide the loss from the next check.
        if !full {
            if let Some(why) = self.lost_state() {
                tracing::warn!(reason = %why, "programmed state missing; this sync is full");
                full = true;
            }
        }
        // After a full sync failed, the next one replaces the table in its transaction
        // (whatever made the kernel refuse — an object of another shape under one of kpx's
        // names — goes with it; conntrack entries and their NAT survive).
        let recreate = full && self.full_failed;
        let existing = if full && !recreate {
            self.existing()?
        } else {
            Existing::default()
        };
        let mut plan = render::plan(
            &self.cfg,
            state,
            changes,
            full,
            &existing,
            &mut self.applied,
        );
        if recreate {
            let family = self.family_name();
            plan.text = format!(
                "add table {family} {t}\ndelete table {family} {t}\n{}",
                plan.text,
                t = chains::TABLE
            );
        }
        let applied = match &plan.elements_only {
            Some(elements) if netlink_ready(elements) => match self.commit_elements(elements) {
                Ok(()) => Ok(()),
                // A batch is all or nothing: the same change through nft is safe.
                Err(e) => {
                    tracing::debug!(error = %e, "netlink element batch refused; writing it with nft");
                    nft_apply(&plan.text).map(|()| self.record_generation())
                }
            },
            _ if plan.text.is_empty() => Ok(()),
            _ => nft_apply(&plan.text).map(|()| self.record_generation()),
        };
        if let Err(e) = applied {
            // What the kernel holds is unknown now: the next (full) sync starts over.
            self.applied = Applied::default();
            self.full_failed = full;
            return Err(e);
        }
        self.full_failed = false;
        let now = Instant::now();
        let stale: Vec<&String> = self
            .applied
            .stale_chains
            .iter()
            .chain(&self.applied.stale_sets)
            .collect();
        self.stale_since.retain(|name, _| stale.contains(&name));
        for name in stale {
            self.stale_since.entry(name.clone()).or_insert(now);
        }
        let rules = self.applied.rules() + render::fixed_rule_count(&self.cfg);
        let table = if self.cfg.ipv6 { "ip6 kpx" } else { "ip kpx" };
        Ok(SyncReport {
            full,
            written: Count::new(plan.rules_written + plan.elements_written, Unit::Rules),
            total: Count::new(rules, Unit::Rules),
            per_table: vec![(table, Count::new(rules, Unit::Rules))],
            messages: 0,
            chains_written: plan.chains_written,
            chains_deleted: plan.chains_deleted,
        })
    }

    fn lost_state(&mut self) -> Option<String> {
        let family = self.family();
        let expected_generation = self.generation?;
        self.netlink().ok()?;
        let mut nft = self.nft.take()?;
        let lost = self.check(&mut nft, family, expected_generation);
        self.nft = Some(nft);
        lost
    }

    fn housekeeping(&mut self) -> Result<(), BackendError> {
        let ready = |name: &String| {
            self.stale_since
                .get(name)
                .is_some_and(|t| t.elapsed() >= STALE_GRACE)
        };
        let sets: Vec<String> = self
            .applied
            .stale_sets
            .iter()
            .filter(|n| ready(n))
            .cloned()
            .collect();
        let chains: Vec<String> = self
            .applied
            .stale_chains
            .iter()
            .filter(|n| ready(n))
            .cloned()
            .collect();
        let [sets_text, chains_text] = render::stale_text_of(&self.cfg, &sets, &chains);
        if !sets_text.is_empty() {
            nft_apply(&sets_text)?;
            self.record_generation();
            for set in &sets {
                self.applied.stale_sets.remove(set);
                self.stale_since.remove(set);
            }
        }
        if !chains_text.is_empty() {
            nft_apply(&chains_text)?;
            self.record_generation();
            for chain in &chains {
                self.applied.stale_chains.remove(chain);
                self.stale_since.remove(chain);
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let family = self.family_name();
        let present = self
            .netlink()
            .ok()
            .and_then(|n| {
                n.table(
                    if family == "ip6" {
                        Family::Ip6
                    } else {
                        Family::Ip
                    },
                    chains::TABLE,
                )
                .ok()
            })
            .flatten()
            .is_some();
        if present {
            nft_apply(&format!("delete table {family} {}\n", chains::TABLE))?;
        }
        self.applied = Applied::default();
        self.generation = None;
        Ok(())
    }

    fn dump(&self) -> Result<Dump, BackendError> {
        let text = nft_output(&["list", "table", self.family_name(), chains::TABLE])?;
        Ok(dump::read(&text))
    }
}

/// A chain of the plan with fewer rules in the kernel than kpx wrote (flushed by someone).
fn missing_rules(
    applied: &Applied,
    cfg: &RenderConfig,
    counts: &std::collections::BTreeMap<String, usize>,
) -> Option<String> {
    let mut fixed: HashMap<&str, usize> = HashMap::new();
    for (chain, _) in render::fixed_rules(cfg) {
        *fixed.entry(chain).or_default() += 1;
    }
    for (chain, want) in fixed {
        if counts.get(chain).copied().unwrap_or(0) < want {
            return Some(format!("chain {chain} lost rules"));
        }
    }
    for f in applied.fragments.values() {
        for c in &f.chains {
            if counts.get(&c.name).copied().unwrap_or(0) < c.count {
                return Some(format!("chain {} lost rules", c.name));
            }
        }
    }
    None
}
