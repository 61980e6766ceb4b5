//! `cargo xtask`: the project's commands. `deps` installs what tests and the demo need on a
//! fresh Debian machine (as root, with apt-get and pip), `demo` runs the main job, `test` runs
//! every test with the real clients required.

mod deps;

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
    /// Run the demo: the control plane end to end on the embedded store.
    Demo,
    /// Check formatting and lints, then run every test with the real clients.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy` (for a quick local run).
        #[arg(long)]
        no_lint: bool,
    },
    /// Run the benchmarks (release build) and print the figures the README quotes.
    Bench,
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
    cmd
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Deps => deps::install().map(|_| ()),
        Cmd::Demo => {
            say("building kpx-control and kpx-lab");
            run(cargo().args([
                "build",
                "--quiet",
                "-p",
                "kpx-control",
                "-p",
                "kpx-lab",
                "--bins",
            ]))?;
            say("running kpx-lab demo");
            run(Command::new(workspace_root().join("target/debug/kpx-lab")).arg("demo"))
        }
        Cmd::Test { no_lint } => {
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
            say("running every test (real clients required)");
            run(cargo()
                .args(["test", "--workspace", "--lib", "--bins", "--tests"])
                .env("KPX_REQUIRE_CLIENTS", "1")
                .env("KPX_KUBECTL", &tools.kubectl))
        }
        Cmd::Bench => {
            say("running the API server benchmark (release build)");
            run(cargo().args(["bench", "-p", "kpx-control", "--bench", "apiserver"]))
        }
    }
}
