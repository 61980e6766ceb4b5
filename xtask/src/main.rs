//! `cargo xtask`: the project's commands. `deps` installs what tests and the demo need on a
//! fresh Debian machine (as root, with apt-get and pip), `demo` runs the main job, `test` runs
//! every test with the real clients required.

mod deps;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the system packages and clients the tests and the demo use.
    Deps,
    /// Run the demo: a 2-node cluster in network namespaces, an nginx Deployment and its
    /// Service applied with kubectl, traffic spreading, a scale-up, a rolling update, down.
    Demo,
    /// Check formatting and lints, then run every test with the real clients.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy` (for a quick local run).
        #[arg(long)]
        no_lint: bool,
        /// kpx-lab's test binaries the VM runs after the host tests (see `vm-test --tests`).
        #[arg(long, default_value = vm::DEFAULT_TESTS, value_delimiter = ',')]
        vm_tests: Vec<String>,
    },
    /// `kpx-lab bench` with its default matrix (release build), into target/kpx-bench.
    Bench,
    /// kpx-lab's scenario tests on Debian's kernel 6.1 in qemu (TCG, no network device).
    VmTest(VmTestArgs),
}

#[derive(Debug, clap::Args)]
struct VmTestArgs {
    /// The backends under test (KPX_BACKENDS inside the guest), comma-separated.
    #[arg(long, default_value = vm::DEFAULT_BACKENDS, value_delimiter = ',')]
    backends: Vec<String>,
    /// kpx-lab's test binaries to run (netns-tests/tests/<name>.rs), comma-separated;
    /// `NAME@a+b` runs one on those of the backends under test only.
    #[arg(long, default_value = vm::DEFAULT_TESTS, value_delimiter = ',')]
    tests: Vec<String>,
    /// Bound on the whole VM run, in seconds; qemu is killed past it.
    #[arg(long, default_value_t = vm::DEFAULT_TIMEOUT_SECONDS)]
    timeout: u64,
    /// Guest CPUs (qemu TCG threads).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096)]
    memory: u32,
    /// Run this shell command in the guest (chrooted, cwd netns-tests) instead of the tests.
    #[arg(long)]
    command: Option<String>,
    /// Run these kpx-lab benches in the guest instead of the tests (`NAME --bench`, with the
    /// host's KPX_BENCH_* variables); reports land in target/vm/bench-NAME.json.
    #[arg(long, value_delimiter = ',')]
    benches: Vec<String>,
    /// Passed to every test binary (a name filter, `--nocapture`, …).
    #[arg(last = true)]
    test_args: Vec<String>,
}

impl VmTestArgs {
    fn options(self) -> vm::Options {
        vm::Options {
            backends: self.backends,
            tests: self.tests,
            timeout: std::time::Duration::from_secs(self.timeout),
            cpus: self.cpus,
            memory_mib: self.memory,
            test_args: self.test_args,
            command: self.command,
            benches: self.benches,
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn say(text: &str) {
    eprintln!("xtask: {text}");
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    // A CI run builds once from a fresh clone: incremental state would only take disk.
    if std::env::var_os("CI").is_some() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Where cargo puts its build output: `CARGO_TARGET_DIR`, `build.target-dir` or `target/`, as
/// `cargo metadata` reports it (so `demo` and `bench` run the binaries just built, wherever
/// they went).
fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    target_directory_of(&String::from_utf8_lossy(&out.stdout))
        .context("cargo metadata did not report a target_directory")
}

/// The `target_directory` string of `cargo metadata`'s JSON (xtask has no JSON parser; the
/// value is one string with only `\\` and `\"` as escapes a path needs).
fn target_directory_of(metadata: &str) -> Option<PathBuf> {
    let key = "\"target_directory\":";
    let rest = metadata[metadata.find(key)? + key.len()..].trim_start();
    let mut chars = rest.strip_prefix('"')?.chars();
    let mut value = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(PathBuf::from(value)),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// The root namespace's state as `rootns-snapshot` prints it, when the tool is there.
fn root_namespace(tool: &Path) -> anyhow::Result<Option<String>> {
    if !tool.is_file() {
        say("../shared/tools/rootns-snapshot not found; not checking the root namespace");
        return Ok(None);
    }
    let out = Command::new("bash")
        .arg(tool)
        .output()
        .context("running rootns-snapshot")?;
    Ok(Some(String::from_utf8_lossy(&out.stdout).to_string()))
}

fn diff_lines(before: &str, after: &str) -> Vec<String> {
    let old: std::collections::BTreeSet<&str> = before.lines().collect();
    let new: std::collections::BTreeSet<&str> = after.lines().collect();
    old.difference(&new)
        .map(|l| format!("- {l}"))
        .chain(new.difference(&old).map(|l| format!("+ {l}")))
        .collect()
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

/// Runs `cargo test`, passing its output through and adding up its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> anyhow::Result<Totals> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(label).map(|n| {
                            n.trim()
                                .trim_start_matches("ok.")
                                .trim_start_matches("FAILED.")
                                .trim()
                                .parse::<u64>()
                                .unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            totals.passed += count("passed");
            totals.failed += count("failed");
            totals.ignored += count("ignored");
        }
    }
    totals.success = child.wait()?.success();
    Ok(totals)
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Deps => deps::install().map(|_| ()),
        Cmd::Demo => {
            let tools = deps::install()?;
            say("building kpx (kpx-control, kpx-kubelet, kpx-proxy, kpx-lab, kpx-workload)");
            run(cargo().args(["build", "--quiet", "--workspace", "--bins"]))?;
            say("running kpx-lab demo");
            run(Command::new(target_dir()?.join("debug/kpx-lab"))
                .arg("demo")
                .env("KPX_KUBECTL", &tools.kubectl))
        }
        Cmd::Test { no_lint, vm_tests } => {
            let tools = deps::install()?;
            if !no_lint {
                say("checking formatting (cargo fmt --check)");
                run(cargo().args(["fmt", "--all", "--", "--check"]))?;
                say("linting (cargo clippy --all-targets -D warnings)");
                run(cargo().args([
                    "clippy",
                    "--quiet",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            say("building the binaries the scenario tests start");
            run(cargo().args(["build", "--quiet", "--workspace", "--bins"]))?;
            say("running every test (real clients and network namespaces required)");
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--lib", "--bins", "--tests"])
                .env("KPX_REQUIRE_CLIENTS", "1")
                .env("KPX_REQUIRE_NETNS", "1")
                .env("KPX_KUBECTL", &tools.kubectl);
            let snapshot = workspace_root().join("../shared/tools/rootns-snapshot");
            let before = root_namespace(&snapshot)?;
            let totals = run_counting_tests(&mut cmd)?;
            if let Some(before) = before {
                let after = root_namespace(&snapshot)?.unwrap_or_default();
                if after != before {
                    say("the root network namespace changed during the tests:");
                    for line in diff_lines(&before, &after) {
                        eprintln!("  {line}");
                    }
                    bail!("tests must never change the root network namespace");
                }
                say("root network namespace unchanged (../shared/tools/rootns-snapshot)");
            }
            // One closing line for the whole run, after cargo's per-binary ones.
            println!(
                "{} passed, {} failed, {} skipped",
                totals.passed, totals.failed, totals.ignored
            );
            if totals.failed > 0 || !totals.success {
                bail!("tests failed");
            }
            if totals.passed == 0 {
                bail!("no test ran");
            }
            // The second kernel: the same scenarios in the VM (ipvs exists only there).
            if !vm::qemu_available() && std::env::var_os("CI").is_none() {
                say("vm-test skipped: qemu-system-x86_64 is not available and could not be installed (not in CI; in CI this fails)");
                return Ok(());
            }
            vm::vm_test(&vm::Options {
                tests: vm_tests,
                ..vm::Options::defaults()
            })
        }
        Cmd::VmTest(args) => vm::vm_test(&args.options()),
        Cmd::Bench => {
            deps::install()?;
            say("building kpx (release)");
            run(cargo().args(["build", "--quiet", "--release", "--workspace", "--bins"]))?;
            let out = workspace_root().join("target/kpx-bench");
            say(&format!(
                "running kpx-lab bench, the default matrix (every backend × 1, 1,000 and 10,000 Services); results in {}",
                out.display()
            ));
            let mut cmd = Command::new(target_dir()?.join("release/kpx-lab"));
            cmd.arg("bench").arg("--out").arg(&out);
            // An earlier run there is the baseline the new one is compared with.
            let previous = out.join("report.json");
            let kept = out.with_file_name("kpx-bench-previous.json");
            if previous.exists() {
                std::fs::copy(&previous, &kept)?;
                cmd.arg("--compare").arg(&kept);
            }
            run(&mut cmd)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_directory_is_read_from_cargo_metadata() {
        let json = r#"{"packages":[],"target_directory":"/tmp/elsewhere/t \"x\"","version":1}"#;
        assert_eq!(
            target_directory_of(json),
            Some(PathBuf::from("/tmp/elsewhere/t \"x\""))
        );
        assert_eq!(target_directory_of(r#"{"version":1}"#), None);
    }
}
