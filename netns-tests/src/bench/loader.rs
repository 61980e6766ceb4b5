//! The loader's baseline beside each full sync: the same rules loaded by the kernel's own
//! tool alone (`iptables-restore` of what the proxy programmed, into an empty namespace), or
//! the same entries written into freshly created BPF maps.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData};
use kpx_ebpf::layout::{Backend, RevNat, ServiceKey, ServiceValue, SlotKey};
use kpx_ebpf::objects::{self, Capacity};
use kpx_ebpf::plan::Op;

use crate::lab::ProxyBackend;
use crate::netns::Netns;

/// What the proxy programmed, ready to load again: iptables-save output per family, or the
/// BPF map writes.
pub enum Programmed {
    Iptables(Vec<(&'static str, String)>),
    Maps(Vec<Op>),
}

impl Programmed {
    /// Reads what node `node`'s proxy programmed (after its sync).
    pub fn read(bench: &super::setup::BenchLab) -> anyhow::Result<Self> {
        let lab = &bench.lab;
        let (v4, v6) = match lab.backend {
            ProxyBackend::IptablesNft => ("iptables-nft", "ip6tables-nft"),
            ProxyBackend::IptablesLegacy => ("iptables-legacy", "ip6tables-legacy"),
            ProxyBackend::Ebpf => {
                let dir = lab
                    .pin_dir(0)
                    .context("the ebpf lab has no pin directory")?;
                return Ok(Self::Maps(map_writes(&dir)?));
            }
        };
        let mut saved = Vec::new();
        for tool in [v4, v6] {
            let out = lab.nodes[0]
                .ns
                .command(format!("{tool}-save"))
                .output()
                .with_context(|| format!("{tool}-save"))?;
            anyhow::ensure!(out.status.success(), "{tool}-save failed");
            saved.push((
                tool,
                without_policies(&String::from_utf8_lossy(&out.stdout)),
            ));
        }
        Ok(Self::Iptables(saved))
    }

    /// How many rules or map entries.
    pub fn size(&self) -> usize {
        match self {
            Self::Iptables(saved) => saved
                .iter()
                .map(|(_, t)| t.lines().filter(|l| l.starts_with("-A ")).count())
                .sum(),
            Self::Maps(ops) => ops.len(),
        }
    }

    /// Loads it all again, from empty, timed: into a fresh namespace named `scratch`, or
    /// into freshly created maps.
    pub async fn load_alone(&self, scratch: &str) -> anyhow::Result<Duration> {
        match self {
            Self::Iptables(saved) => {
                // The proxy's full sync after `--cleanup` finds the tables there and its own
                // chains gone; so does this restore: once to create the tables, flushed, then
                // timed.
                let ns = Netns::create(scratch).await?;
                let entry = ns.entry()?;
                restore(&entry, saved)?;
                for (tool, _) in saved {
                    for table in ["nat", "filter"] {
                        for flag in ["-F", "-X"] {
                            entry
                                .command(tool)?
                                .args(["-w", "-t", table, flag])
                                .status()?;
                        }
                    }
                }
                restore(&entry, saved)
            }
            Self::Maps(ops) => {
                let ops = ops.clone();
                tokio::task::spawn_blocking(move || write_maps(&ops)).await?
            }
        }
    }
}

/// The saved rules without the built-in chains' policy lines (`:PREROUTING ACCEPT [0:0]`):
/// the proxy never sets a policy, and with iptables-nft setting one costs a commit of its own
/// (measured: 2 ms without them, 7–30 ms with, for the same two chains).
fn without_policies(saved: &str) -> String {
    saved
        .lines()
        .filter(|l| !(l.starts_with(':') && l.split_whitespace().nth(1) != Some("-")))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs each family's restore (the proxy's rules as saved), timed together.
fn restore(
    entry: &crate::netns::Entry,
    saved: &[(&'static str, String)],
) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for (tool, text) in saved {
        let started = Instant::now();
        // setns in the child, as the proxy's own restore runs (no `ip netns exec`).
        // --noflush, as the proxy restores: flushing would delete and re-register the tables'
        // base chains, a cost the proxy never pays.
        let mut child = entry
            .command(format!("{tool}-restore"))?
            .arg("--noflush")
            .args(tool.contains("legacy").then_some("-w"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("{tool}-restore"))?;
        child
            .stdin
            .take()
            .context("restore stdin")?
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        total += started.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "{tool}-restore of the proxy's own rules failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(total)
}

fn pinned<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> anyhow::Result<Vec<(K, V)>> {
    let data =
        MapData::from_pin(dir.join(name)).with_context(|| format!("opening the pinned {name}"))?;
    let map: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data))?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// The writes that rebuild the pinned Service maps, in the order a sync makes them
/// (backends, slots and reverse NAT before the frontends that point at them).
fn map_writes(dir: &Path) -> anyhow::Result<Vec<Op>> {
    let mut ops: Vec<Op> = pinned::<u32, Backend>(dir, "kpx_backends")?
        .into_iter()
        .map(|(k, v)| Op::PutBackend(k, v))
        .collect();
    ops.extend(
        pinned::<SlotKey, u32>(dir, "kpx_slots")?
            .into_iter()
            .map(|(k, v)| Op::PutSlot(k, v)),
    );
    ops.extend(
        pinned::<u32, RevNat>(dir, "kpx_rev_nat")?
            .into_iter()
            .map(|(k, v)| Op::PutRevNat(k, v)),
    );
    ops.extend(
        pinned::<ServiceKey, ServiceValue>(dir, "kpx_services")?
            .into_iter()
            .map(|(k, v)| Op::PutService(k, v)),
    );
    Ok(ops)
}

fn write_maps(ops: &[Op]) -> anyhow::Result<Duration> {
    let count = |f: fn(&Op) -> bool| (ops.iter().filter(|o| f(o)).count() as u32).max(1) * 2;
    let capacity = Capacity {
        entries: vec![
            ("kpx_services", count(|o| matches!(o, Op::PutService(..)))),
            ("kpx_rev_nat", count(|o| matches!(o, Op::PutRevNat(..)))),
            ("kpx_slots", count(|o| matches!(o, Op::PutSlot(..)))),
            ("kpx_backends", count(|o| matches!(o, Op::PutBackend(..)))),
        ],
    };
    // Unpinned, never attached: the maps go away when `ebpf` drops.
    let mut ebpf = objects::load(objects::TC_LB, None, &capacity)?;
    let started = Instant::now();
    kpx_ebpf::apply::apply(&mut ebpf, ops)?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    #[test]
    fn policies_are_dropped_and_user_chains_kept() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:KPX-SERVICES - [0:0]\n-A PREROUTING -j KPX-SERVICES\nCOMMIT\n";
        assert_eq!(
            super::without_policies(saved),
            "*nat\n:KPX-SERVICES - [0:0]\n-A PREROUTING -j KPX-SERVICES\nCOMMIT\n"
        );
    }
}
