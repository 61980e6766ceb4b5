//! Installing what the tests and the demo need, only when it is missing, saying what it does.
//!
//! - kubectl: Debian's `kubernetes-client`, unpacked under `target/tools` rather than installed,
//!   because some images ship another `/usr/bin/kubectl` the package would conflict with.
//! - the official Python client: PyPI's `kubernetes`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::{run, say, workspace_root};

pub struct Tools {
    pub kubectl: PathBuf,
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn apt_update_once(updated: &mut bool) -> anyhow::Result<()> {
    if !*updated {
        say("apt-get update");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        *updated = true;
    }
    Ok(())
}

/// Debian packages the build and the tests need, by a command (or an absolute path) each
/// provides. clang-19 and libbpf's headers build the BPF programs (`ebpf/build.rs`).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables-nft", "iptables"),
    ("iptables-legacy", "iptables"),
    // The nftables backend applies its plan with nft.
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("clang-19", "clang-19"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    // kpx-lab bench: TCP throughput, and the font its PNG plots are drawn with.
    ("iperf3", "iperf3"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
    // The ipvs backend's sets and its loader baseline.
    ("ipset", "ipset"),
    ("ipvsadm", "ipvsadm"),
    // `cargo xtask vm-test`: the guest and its initramfs's shell.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
];

fn on_path(command: &str) -> bool {
    if command.starts_with('/') {
        return std::path::Path::new(command).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
        .unwrap_or(false)
}

/// The Debian packages of [`PACKAGES`] that are missing, installed with apt-get.
pub fn system_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    let mut apt_updated = false;
    if missing.is_empty() {
        let mut all: Vec<&str> = PACKAGES.iter().map(|(_, p)| *p).collect();
        all.dedup();
        say(&format!("system packages: present ({})", all.join(", ")));
    } else {
        if !is_root() {
            bail!("missing packages {missing:?}; installing them needs root (apt-get install)");
        }
        apt_update_once(&mut apt_updated)?;
        say(&format!("apt-get install {}", missing.join(" ")));
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

pub fn install() -> anyhow::Result<Tools> {
    system_packages()?;
    let tools_dir = workspace_root().join("target/tools");
    std::fs::create_dir_all(&tools_dir)
        .with_context(|| format!("creating {}", tools_dir.display()))?;
    let mut apt_updated = false;

    let kubectl = tools_dir.join("kubectl");
    if succeeds(Command::new(&kubectl).args(["version", "--client"])) {
        say(&format!("kubectl: {} (present)", kubectl.display()));
    } else {
        if !is_root() {
            bail!("kubectl is missing and installing it needs root (apt-get download kubernetes-client)");
        }
        apt_update_once(&mut apt_updated)?;
        say("kubectl: downloading Debian's kubernetes-client and unpacking it under target/tools");
        let scratch = tools_dir.join("kubernetes-client");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        run(Command::new("apt-get")
            .args(["download", "-qq", "kubernetes-client"])
            .current_dir(&scratch))?;
        let deb = std::fs::read_dir(&scratch)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(scratch.join("root")))?;
        std::fs::copy(scratch.join("root/usr/bin/kubectl"), &kubectl).context("copying kubectl")?;
        let _ = std::fs::remove_dir_all(&scratch);
        if !succeeds(Command::new(&kubectl).args(["version", "--client"])) {
            bail!("{} does not run", kubectl.display());
        }
    }

    let has_client = || succeeds(Command::new("python3").args(["-c", "import kubernetes"]));
    if has_client() {
        say("python kubernetes client: present");
    } else {
        if !succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
            if !is_root() {
                bail!("python3 has no pip; install python3-pip (needs root)");
            }
            apt_update_once(&mut apt_updated)?;
            say("installing python3-pip");
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq", "python3-pip"])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
        say("pip install kubernetes (the official Python client)");
        let plain = succeeds(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "kubernetes",
        ]));
        // Debian's own python3 refuses pip installs outside a venv unless told otherwise.
        if !plain {
            run(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--break-system-packages",
                "kubernetes",
            ]))?;
        }
        if !has_client() {
            bail!("the kubernetes Python package is still not importable after pip install");
        }
    }
    Ok(Tools { kubectl })
}
