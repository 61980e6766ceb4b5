//! `cargo xtask vm-test --benches NAME,...`: kpx-lab's benchmark executables run in the guest
//! instead of the tests (`NAME --bench`, with the host's `KPX_BENCH_*` variables), each one's
//! JSON report written to the guest's tmpfs and copied out through the console (the host root
//! is read-only to the guest, and it has no network device) into `target/vm/bench-NAME.json`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};

use super::quote;
use crate::{cargo, workspace_root};

/// Where a benchmark's report is, in the guest.
const GUEST_DIR: &str = "/tmp/kpx-bench";
pub const FILE_BEGIN: &str = "KPX-VM-FILE-BEGIN ";
pub const FILE_END: &str = "KPX-VM-FILE-END";

/// The bench executables of kpx-lab named in `wanted`, built as `cargo bench` builds them.
pub fn executables(wanted: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "bench",
            "--quiet",
            "-p",
            "kpx-lab",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench --no-run")?;
    if !out.status.success() {
        bail!("cargo bench -p kpx-lab --no-run failed");
    }
    let mut all = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        let is_bench = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"));
        if is_bench {
            all.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    wanted
        .iter()
        .map(|w| {
            all.iter().find(|(n, _)| n == w).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "kpx-lab has no bench {w:?}; it has {}",
                    all.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect()
}

/// The guest's script: each bench with `vars` exported and its report path set, bracketed as
/// the tests are, then its report printed between file markers.
pub fn script(binaries: &[(String, PathBuf)], vars: &[(String, String)]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    s.push_str("export HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1\n");
    for (k, v) in vars {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!(
        "cd {} || exit 124\nmkdir -p {GUEST_DIR}\nfailed=0\n",
        quote(&workspace_root().join("netns-tests").to_string_lossy())
    ));
    for (name, exe) in binaries {
        let report = format!("{GUEST_DIR}/{name}.json");
        s.push_str(&format!(
            "echo \"KPX-VM-BEGIN {name}\"\necho \"kpx-vm: load $(cat /proc/loadavg)\"\n\
             start=$(date +%s%N)\nKPX_BENCH_JSON={report} {} --bench\nrc=$?\n\
             end=$(date +%s%N)\n\
             echo \"KPX-VM-END {name} rc=$rc ms=$(( (end - start) / 1000000 ))\"\n\
             [ $rc -eq 0 ] || failed=$((failed + 1))\n\
             if [ -f {report} ]; then echo \"{FILE_BEGIN}{name}\"; cat {report}; echo; echo \"{FILE_END}\"; fi\n",
            quote(&exe.to_string_lossy()),
        ));
    }
    s.push_str("exit $failed\n");
    s
}

/// The host's `KPX_BENCH_*` variables for the guest, but the report path (the guest's own).
pub fn passed_vars() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("KPX_BENCH_") && k != "KPX_BENCH_JSON")
        .collect();
    vars.sort();
    vars
}

/// Collects the files the guest printed between markers, one console line at a time.
#[derive(Debug, Default, PartialEq)]
pub struct Files {
    open: Option<(String, String)>,
    pub done: Vec<(String, String)>,
}

impl Files {
    pub fn line(&mut self, line: &str) {
        if let Some(name) = line.strip_prefix(FILE_BEGIN) {
            self.open = Some((name.trim().to_string(), String::new()));
        } else if line == FILE_END {
            if let Some(file) = self.open.take() {
                self.done.push(file);
            }
        } else if let Some((_, text)) = &mut self.open {
            text.push_str(line);
            text.push('\n');
        }
    }

    /// Writes each file as `dir/bench-NAME.json`; the paths written.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        for (name, text) in &self.done {
            let path = dir.join(format!("bench-{name}.json"));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_between_markers_are_collected_and_the_rest_is_not() {
        let mut f = Files::default();
        for line in [
            "ipvs 1000 x 10: ...",
            "KPX-VM-FILE-BEGIN ipvs_sync",
            "{\"a\":",
            "1}",
            "KPX-VM-FILE-END",
            "KPX-VM-EXIT rc=0",
        ] {
            f.line(line);
        }
        assert_eq!(
            f.done,
            vec![("ipvs_sync".to_string(), "{\"a\":\n1}\n".to_string())]
        );
        // A file the guest never finished (killed midway) is not kept.
        f.line("KPX-VM-FILE-BEGIN cut");
        f.line("{");
        assert_eq!(f.done.len(), 1);
    }

    #[test]
    fn the_bench_script_runs_each_bench_with_its_report_path_and_prints_it() {
        let s = script(
            &[(
                "ipvs_sync".into(),
                PathBuf::from("/t/release/deps/ipvs_sync-ab"),
            )],
            &[("KPX_BENCH_SCALES".into(), "1000,10000".into())],
        );
        assert!(s.contains("export KPX_BENCH_SCALES='1000,10000'"), "{s}");
        assert!(
            s.contains(
                "KPX_BENCH_JSON=/tmp/kpx-bench/ipvs_sync.json '/t/release/deps/ipvs_sync-ab' --bench"
            ),
            "{s}"
        );
        assert!(s.contains("echo \"KPX-VM-FILE-BEGIN ipvs_sync\""), "{s}");
        assert!(s.ends_with("exit $failed\n"));
    }
}
