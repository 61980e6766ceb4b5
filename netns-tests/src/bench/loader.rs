//! The loader's baseline beside each full sync: the same rules loaded by the kernel's own
//! tool alone (`iptables-restore` of what the proxy programmed, or `nft -f` of its tables as
//! `nft list table` prints them, into an empty namespace), or the same entries written into
//! freshly created BPF maps.

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

/// What the proxy programmed, ready to load again: iptables-save output per family, kpx's
/// nftables tables per family, or the BPF map writes.
pub enum Programmed {
    Iptables(Vec<(&'static str, String)>),
    /// `nft list table` of `ip kpx` and `ip6 kpx` (those that exist).
    Nftables(Vec<String>),
    Maps(Vec<Op>),
}

/// kpx's nftables tables, one per family (`proxy/src/nftables`).
const NFT_TABLES: [&str; 2] = ["ip kpx", "ip6 kpx"];

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
            ProxyBackend::Nftables => return Ok(Self::Nftables(list_tables(bench)?)),
            // The ipvs baseline (`ipvsadm -R` + `ipset restore` of the same state) belongs to
            // the VM bench (issue 17, item 7); until then the bench says so instead of timing.
            ProxyBackend::Ipvs => {
                anyhow::bail!(
                    "the ipvs loader baseline (ipvsadm -R + ipset restore) is not built yet"
                )
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
            Self::Nftables(tables) => tables.iter().map(|t| nft_size(t)).sum(),
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
            Self::Nftables(tables) => {
                // The proxy's full sync after `--cleanup` starts with no table at all (cleanup
                // deletes kpx's tables), and so does this load: one `nft -f` per family, as
                // the proxy runs one transaction per family.
                let ns = Netns::create(scratch).await?;
                let entry = ns.entry()?;
                let mut total = Duration::ZERO;
                for text in tables {
                    total += nft_load(&entry, text)?;
                }
                Ok(total)
            }
            Self::Maps(ops) => {
                let ops = ops.clone();
                tokio::task::spawn_blocking(move || write_maps(&ops)).await?
            }
        }
    }
}

/// `nft list table` of each of kpx's tables in the bench node (a family the proxy has not
/// programmed has no table, and is left out).
fn list_tables(bench: &super::setup::BenchLab) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for table in NFT_TABLES {
        let listed = bench.lab.nodes[0]
            .ns
            .command("nft")
            .arg(format!("list table {table}"))
            .output()
            .context("nft list table")?;
        if listed.status.success() {
            out.push(String::from_utf8_lossy(&listed.stdout).into_owned());
        }
    }
    anyhow::ensure!(!out.is_empty(), "the proxy programmed no nftables table");
    Ok(out)
}

/// Rules and set or map elements in `nft list table` output: the lines inside chain blocks
/// (but their `type … hook …` and `comment` lines), and the comma-separated items of every
/// `elements = { … }` (commas inside quoted comments do not count).
pub fn nft_size(listed: &str) -> usize {
    let mut n = 0;
    let mut in_chain = false;
    let mut in_elements = false;
    for line in listed.lines().map(str::trim) {
        if in_elements || line.starts_with("elements = {") {
            let body = line.trim_start_matches("elements = {");
            let (body, ends) = match body.strip_suffix('}') {
                Some(b) => (b, true),
                None => (body, false),
            };
            let mut quoted = false;
            let mut item = false;
            for c in body.chars() {
                match c {
                    '"' => quoted = !quoted,
                    ',' if !quoted => {
                        n += usize::from(item);
                        item = false;
                    }
                    c if !c.is_whitespace() => item = true,
                    _ => {}
                }
            }
            n += usize::from(item);
            in_elements = !ends;
        } else if line.starts_with("chain ") && line.ends_with('{') {
            in_chain = true;
        } else if line == "}" {
            in_chain = false;
        } else if in_chain
            && !line.is_empty()
            && !line.starts_with("type ")
            && !line.starts_with("comment ")
        {
            n += 1;
        }
    }
    n
}

/// One `nft -f -` of `text` in `entry`'s namespace, timed.
fn nft_load(entry: &crate::netns::Entry, text: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = entry
        .command("nft")?
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("nft -f")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "nft -f of the proxy's own table failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
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
    fn nft_size_counts_rules_and_elements() {
        let listed = "table ip kpx {\n\tcomment \"kpx-proxy\"\n\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment \"a, b\"\n\t\telements = { 198.18.128.1 . tcp . 80 : goto svc-a,\n\t\t\t     198.18.128.2 . tcp . 80 : goto svc-b }\n\t}\n\n\tset hairpin {\n\t\ttype ipv4_addr . ipv4_addr\n\t\telements = { 198.19.1.5 . 198.19.1.5 }\n\t}\n\n\tset empty {\n\t\ttype ipv4_addr\n\t}\n\n\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\n\tchain svc-a {\n\t\tcomment \"default/a:http\"\n\t\tip daddr 198.18.128.1 tcp dport 80 ip saddr != 198.19.0.0/16 jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat ip to numgen random mod 2 map @endpoints-0 comment \"x, y\"\n\t}\n}\n";
        // 2 + 1 elements, 1 + 2 rules.
        assert_eq!(super::nft_size(listed), 6);
    }

    #[test]
    fn policies_are_dropped_and_user_chains_kept() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:KPX-SERVICES - [0:0]\n-A PREROUTING -j KPX-SERVICES\nCOMMIT\n";
        assert_eq!(
            super::without_policies(saved),
            "*nat\n:KPX-SERVICES - [0:0]\n-A PREROUTING -j KPX-SERVICES\nCOMMIT\n"
        );
    }
}
