//! `cargo xtask vm-test`: kpx-lab's scenario tests on a second kernel, Debian's 6.1, booted by
//! qemu under TCG (KVM guests hang or abort on this machine), so ipvs (which the host kernel
//! lacks) and every other backend run on an older kernel too.
//!
//! ```text
//!  host: cargo build --bins; cargo test -p kpx-lab --no-run   (the test executables)
//!        target/vm/kernel-6.1.0-NN-amd64/   apt-get download + dpkg-deb -x, once
//!        target/vm/initramfs-<hash>.cpio    busybox, /init, the modules in load order
//!        target/vm/run-<pid>/run.sh         what to run, read by the guest over 9p
//!  qemu -accel tcg -nic none -virtfs /(read-only) -kernel … -initrd …
//!  guest /init: insmod the modules, mount the host root (9p, read-only) at /newroot, tmpfs
//!        over /tmp /run /var/tmp, proc sys dev bpffs cgroup2, lo up, chroot + run.sh,
//!        print `KPX-VM-EXIT rc=N`, poweroff -f
//! ```
//!
//! The guest has no network device at all (`-nic none`): nothing it does can reach the host's
//! network, and the host root is read-only to it.

mod bench;
mod initramfs;
mod kernel;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, say, target_dir, workspace_root};

/// What the guest loads, by module name; their dependencies come from the modules themselves.
/// The first group mounts the host root; the rest are what the backends and the lab use
/// (the host kernel has all of them built in).
const MODULES: &[&str] = &[
    // The host root over 9p on virtio-pci, and entropy for the lab's TLS keys.
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_rng",
    // The lab's links.
    "veth",
    "bridge",
    // The host has br_netfilter built in, so bridged pod traffic passes netfilter there; the
    // tests are written against that behaviour.
    "br_netfilter",
    "dummy",
    // Conntrack and NAT (every netfilter backend, and kpx's conntrack cleanup over netlink).
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    // nftables (the nftables backend, and iptables-nft through nft_compat).
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_nat",
    "nft_ct",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_numgen",
    "nft_masq",
    "nft_redir",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_hash",
    "nft_limit",
    // iptables-legacy's tables, both families.
    "ip_tables",
    "ip6_tables",
    "iptable_nat",
    "iptable_filter",
    "iptable_mangle",
    "iptable_raw",
    "ip6table_nat",
    "ip6table_filter",
    "ip6table_mangle",
    "ip6table_raw",
    // The matches and targets the iptables backend writes (proxy/src/iptables: -m, -j).
    "xt_comment",
    "xt_tcpudp",
    "xt_conntrack",
    "xt_addrtype",
    "xt_recent",
    "xt_mark",
    "xt_statistic",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_REDIRECT",
    "xt_multiport",
    "xt_set",
    "xt_physdev",
    "ipt_REJECT",
    "ip6t_REJECT",
    // ipsets and IPVS (the ipvs backend).
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet",
    "ip_set_hash_net",
    "ip_set_bitmap_port",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_mh",
    "ip_vs_sed",
    "ip_vs_nq",
    // SCTP Services.
    "sctp",
    // The eBPF backend on a kernel without tcx: clsact + cls_bpf.
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
];

pub struct Options {
    pub backends: Vec<String>,
    pub tests: Vec<String>,
    /// The whole run's bound on the host side; qemu is killed past it.
    pub timeout: Duration,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Arguments for every test binary (a filter, `--nocapture`).
    pub test_args: Vec<String>,
    /// A shell command to run in the guest instead of the tests (to look around).
    pub command: Option<String>,
    /// kpx-lab's benches to run in the guest instead of the tests (`bench.rs`).
    pub benches: Vec<String>,
}

impl Options {
    /// What `cargo xtask test` runs: the defaults of `cargo xtask vm-test`.
    pub fn defaults() -> Self {
        let list = |s: &str| s.split(',').map(str::to_string).collect();
        Options {
            backends: list(DEFAULT_BACKENDS),
            tests: list(DEFAULT_TESTS),
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECONDS),
            cpus: 2,
            memory_mib: 4096,
            test_args: Vec::new(),
            command: None,
            benches: Vec::new(),
        }
    }
}

pub const DEFAULT_TIMEOUT_SECONDS: u64 = 1800;

/// The default set: what fits the 10 minutes the VM tests may add to `cargo xtask test` on 2
/// cores. `frontends` on every backend (kernel 6.1 for the host's backends too), the IPVS backend's and netlink
/// layer's own kernel tests (`ipvs_backend`, `ipvs_netlink`; they ignore KPX_BACKENDS), the
/// partial-sync bookkeeping walk (`ipvs_partial`, 12 steps, each checked against a full sync)
/// and ipset members over netlink (`ipset_netlink`).
/// Measured under TCG (kernel 6.1.0-57, idle machine): `scenarios` 99 s per backend (93 s with
/// release builds: the time is the emulated kernel and tools, not kpx's code; the same three
/// tests take 15.7 s on the host), and the whole default set without `scenarios` 290 s. Every
/// scenario binary on every backend would take over an hour: `cargo xtask vm-test --tests`
/// runs any of them.
/// `scenarios@ipvs` is not in it yet: in CI one of the cluster-ip test's 600 requests through
/// ipvs went unanswered for 10 s (a real fault to find before it runs by default).
pub const DEFAULT_TESTS: &str = "frontends,ipvs_backend,ipvs_netlink,ipvs_partial,ipset_netlink";
pub const DEFAULT_BACKENDS: &str = "iptables-nft,iptables-legacy,nftables,ebpf,ipvs";

fn guest_init() -> String {
    // `set -e` is not used: every step reports its own failure, and whatever happens the last
    // lines print the exit sentinel and power off, so the host never waits for a hung guest
    // longer than its timeout.
    r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {
    echo "kpx-vm: $*"
    echo "KPX-VM-EXIT rc=125"
    poweroff -f
}
echo "kpx-vm: kernel $(uname -r), $(nproc) cpus, loading $(wc -l < /modules.order) modules"
while read -r m; do
    insmod "/lib/modules/$m" || echo "kpx-vm: insmod $m failed"
done < /modules.order
run=
for word in $(cat /proc/cmdline); do
    case "$word" in kpx.run=*) run="${word#kpx.run=}" ;; esac
done
[ -n "$run" ] || fail "no kpx.run= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /newroot \
    || fail "mounting the host root over 9p"
R=/newroot
mount -t proc proc $R/proc || fail "mounting /proc"
mount -t sysfs sys $R/sys || fail "mounting /sys"
mount -t devtmpfs dev $R/dev || fail "mounting /dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
# The workspace and target directory may live under /tmp (a CI clone there): keep their
# view of the host across the tmpfs mounted over it.
keep=
for word in $(cat /proc/cmdline); do
    case "$word" in kpx.keep=*) keep="${word#kpx.keep=}" ;; esac
done
kept() { echo "$keep" | tr ',' '\n' | grep -E '^/(tmp|run|var/tmp)/'; }
n=0
for p in $(kept); do
    mkdir -p /keep/$n && mount -o bind "$R$p" /keep/$n || fail "keeping $p"
    n=$((n+1))
done
for d in tmp run var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs $R/$d || fail "mounting tmpfs on /$d"
done
n=0
for p in $(kept); do
    mkdir -p "$R$p" && mount -o bind /keep/$n "$R$p" || fail "putting $p back"
    n=$((n+1))
done
mkdir -p $R/run/netns
mount -t bpf bpf $R/sys/fs/bpf || fail "mounting bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "mounting cgroup2"
ip link set lo up || fail "lo up"
echo "KPX-VM-BOOTED"
chroot $R /bin/sh "$run"
echo "KPX-VM-EXIT rc=$?"
poweroff -f
"#
    .to_string()
}

/// The host paths the guest must see even where it mounts a tmpfs (`/tmp`, `/run`,
/// `/var/tmp`): the workspace and the target directory, comma-separated for the kernel's
/// command line (which splits on spaces, so a path with one is refused).
fn kept_paths() -> anyhow::Result<String> {
    let mut paths = vec![workspace_root()];
    if let Ok(target) = crate::target_dir() {
        paths.push(target);
    }
    let mut out = Vec::new();
    for p in paths {
        let p = p.canonicalize().unwrap_or(p);
        let text = p.to_string_lossy().to_string();
        anyhow::ensure!(
            !text.contains(char::is_whitespace) && !text.contains(','),
            "vm-test needs a workspace path without spaces or commas, not {text:?}"
        );
        out.push(text);
    }
    Ok(out.join(","))
}

/// Single-quoted for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A `--tests` entry: `NAME` (on every backend under test) or `NAME@a+b` (on those of the
/// backends under test only, so `--backends` still narrows it). Returns the binary's name and
/// its backends.
fn test_spec(spec: &str, backends: &[String]) -> anyhow::Result<(String, Vec<String>)> {
    let Some((name, only)) = spec.split_once('@') else {
        return Ok((spec.to_string(), backends.to_vec()));
    };
    let mut chosen = Vec::new();
    for b in only.split('+') {
        if !DEFAULT_BACKENDS.split(',').any(|known| known == b) {
            bail!("--tests {spec:?}: backend {b:?} is not one of {DEFAULT_BACKENDS}");
        }
        if backends.iter().any(|under_test| under_test == b) {
            chosen.push(b.to_string());
        }
    }
    if chosen.is_empty() {
        bail!(
            "--tests {spec:?}: none of its backends is under test (--backends {})",
            backends.join(",")
        );
    }
    Ok((name.to_string(), chosen))
}

/// The guest's script: each test binary in `netns-tests/` with its backends under test
/// (`KPX_BACKENDS` for that binary), bracketed by lines the host reads the wall time and exit
/// status from.
fn run_script(
    binaries: &[(String, PathBuf, Vec<String>)],
    backends: &[String],
    args: &[String],
    command: Option<&str>,
) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    s.push_str("export HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1 KPX_REQUIRE_NETNS=1\n");
    // Under TCG everything takes several times longer: the tests' deadlines for "no progress
    // at all" are stretched, never their assertions.
    s.push_str("export KPX_TEST_PATIENCE_SECONDS=${KPX_TEST_PATIENCE_SECONDS:-180}\n");
    s.push_str(&format!(
        "export KPX_BACKENDS={}\n",
        quote(&backends.join(","))
    ));
    s.push_str(&format!(
        "cd {} || exit 124\n",
        quote(&workspace_root().join("netns-tests").to_string_lossy())
    ));
    if let Some(command) = command {
        s.push_str(command);
        s.push('\n');
        return s;
    }
    s.push_str("failed=0\n");
    // Plain text on the console: the host reads `test result:` lines, and the `SKIPPED`
    // lines of passing tests too (libtest keeps a passing test's output unless told).
    let args: Vec<String> = ["--color", "never", "--show-output"]
        .iter()
        .map(|a| a.to_string())
        .chain(args.iter().map(|a| quote(a)))
        .collect();
    for (name, exe, only) in binaries {
        s.push_str(&format!(
            "echo \"KPX-VM-BEGIN {name}\"\nstart=$(date +%s%N)\nKPX_BACKENDS={} {} {}\nrc=$?\n\
             end=$(date +%s%N)\n\
             echo \"KPX-VM-END {name} rc=$rc ms=$(( (end - start) / 1000000 ))\"\n\
             [ $rc -eq 0 ] || failed=$((failed + 1))\n",
            quote(&only.join(",")),
            quote(&exe.to_string_lossy()),
            args.join(" ")
        ));
    }
    s.push_str("exit $failed\n");
    s
}

/// The test executables of kpx-lab by target name, as cargo reports them.
fn test_executables() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "--quiet",
            "-p",
            "kpx-lab",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test -p kpx-lab --no-run failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg.get("executable").and_then(|e| e.as_str()) else {
            continue;
        };
        let target = &msg["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name)) = (is_test, target["name"].as_str()) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// `SKIPPED … on <backend>: <reason>` for a backend under test (it was asked for and did
    /// not run: a failure here, where the kernel is chosen to support it).
    pub unsupported: Vec<String>,
    /// (binary, exit status, wall milliseconds).
    pub binaries: Vec<(String, i32, u64)>,
    /// The guest script's exit status, when the guest got that far.
    pub exit: Option<i32>,
    pub booted: bool,
    /// Files the guest printed between markers (the benches' reports).
    pub files: bench::Files,
}

/// `line` without ANSI escape sequences (`ESC [ … letter`), which a program writing to the
/// console as a terminal may add.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Outcome {
    /// Reads one line of guest console output.
    fn line(&mut self, line: &str, backends: &[String]) {
        let line = strip_ansi(line.trim_end_matches('\r'));
        let line = line.as_str();
        self.files.line(line);
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| {
                rest.split(';')
                    .find_map(|part| {
                        let n = part.trim().strip_suffix(label)?;
                        let n = n.trim().trim_start_matches("ok.");
                        n.trim_start_matches("FAILED.").trim().parse::<u64>().ok()
                    })
                    .unwrap_or(0)
            };
            self.passed += count("passed");
            self.failed += count("failed");
            self.ignored += count("ignored");
        } else if let Some(rest) = line.strip_prefix("SKIPPED ") {
            let benign = ["not in KPX_BACKENDS", "the scenario does not depend"];
            let named = backends.iter().any(|b| {
                rest.contains(&format!(" on {b}: ")) || rest.contains(&format!("needs {b}"))
            });
            if named && !benign.iter().any(|b| rest.contains(b)) {
                self.unsupported.push(rest.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("KPX-VM-END ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or("?").to_string();
            let field = |w: Option<&str>, key: &str| {
                w.and_then(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse::<i64>().ok())
            };
            let rc = field(words.next(), "rc=").unwrap_or(-1);
            let ms = field(words.next(), "ms=").unwrap_or(0);
            self.binaries.push((name, rc as i32, ms.max(0) as u64));
        } else if let Some(rest) = line.strip_prefix("KPX-VM-EXIT rc=") {
            self.exit = rest.trim().parse().ok();
        } else if line == "KPX-VM-BOOTED" {
            self.booted = true;
        }
    }
}

/// Whether qemu can run here (after installing it if allowed).
pub fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Boots the guest and passes its console through, reading it; kills qemu past `timeout`, or
/// past `boot_timeout` without the guest's boot line.
fn boot(
    kernel: &kernel::Kernel,
    initrd: &Path,
    run: &Path,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    let boot_timeout = Duration::from_secs(300);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-machine",
        "q35",
    ])
    .args([
        "-smp",
        &opts.cpus.to_string(),
        "-m",
        &opts.memory_mib.to_string(),
    ])
    .args(["-nographic", "-nic", "none", "-no-reboot"])
    .args([
        "-fsdev",
        // Host mounts below / (its /proc, /sys, …) have their own inode numbers: remapped,
        // they cannot collide into one guest inode (a mount on one would show on the other).
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-device",
        "virtio-rng-pci",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 loglevel=4 panic=-1 rdinit=/init kpx.run={} kpx.keep={}",
        run.display(),
        kept_paths()?
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        // Bytes, not UTF-8 lines: a console can carry anything.
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let mut timed_out = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => outcome.line(&line, &opts.backends),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let elapsed = started.elapsed();
        let limit = if outcome.booted {
            opts.timeout
        } else {
            boot_timeout.min(opts.timeout)
        };
        if elapsed > limit && timed_out.is_none() {
            timed_out = Some(if outcome.booted { "run" } else { "boot" });
            let _ = child.kill();
        }
    }
    let _ = reader.join();
    let status = child.wait().context("waiting for qemu")?;
    if let Some(what) = timed_out {
        bail!(
            "the VM's {what} took longer than {} s; qemu killed (results so far: {} passed, {} failed)",
            if what == "boot" {
                boot_timeout.min(opts.timeout).as_secs()
            } else {
                opts.timeout.as_secs()
            },
            outcome.passed,
            outcome.failed
        );
    }
    if !status.success() && outcome.exit.is_none() {
        bail!("qemu exited with {status} before the guest reported an exit status");
    }
    Ok(outcome)
}

pub fn vm_test(opts: &Options) -> anyhow::Result<()> {
    crate::deps::system_packages()?;
    if !qemu_available() {
        bail!("qemu-system-x86_64 does not run here");
    }
    let busybox = Path::new("/bin/busybox");
    let cache = target_dir()?.join("vm");
    let kernel = kernel::fetch(&cache)?;
    let resolved = kernel::resolve(&kernel.modules, MODULES)?;
    if !resolved.absent.is_empty() {
        say(&format!(
            "modules {} are not in {} (neither files nor built in); tests needing them will fail",
            resolved.absent.join(", "),
            kernel.release
        ));
    }
    let initrd = initramfs::build(
        &cache,
        &guest_init(),
        busybox,
        &kernel.modules,
        &resolved.order,
    )?;
    say(&format!(
        "kernel {}, initramfs {} ({} modules)",
        kernel.release,
        initrd.display(),
        resolved.order.len()
    ));

    let benches = !opts.benches.is_empty();
    let (binaries, all) = if benches {
        say("building kpx-lab's benches (cargo bench -p kpx-lab --no-run)");
        (bench::executables(&opts.benches)?, Vec::new())
    } else {
        say("building the binaries the scenario tests start (cargo build --bins)");
        crate::run(cargo().args(["build", "--quiet", "--bins"]))?;
        say("building kpx-lab's test binaries (cargo test -p kpx-lab --no-run)");
        (Vec::new(), test_executables()?)
    };
    let mut tests = Vec::new();
    for spec in opts.tests.iter().filter(|_| !benches) {
        let (wanted, only) = test_spec(spec, &opts.backends)?;
        match all.iter().find(|(name, _)| *name == wanted) {
            Some((name, exe)) => tests.push((name.clone(), exe.clone(), only)),
            None => bail!(
                "kpx-lab has no test binary {wanted:?}; it has {}",
                all.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let run_dir = cache.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let run = run_dir.join("run.sh");
    let script = if benches {
        bench::script(&binaries, &bench::passed_vars())
    } else {
        run_script(
            &tests,
            &opts.backends,
            &opts.test_args,
            opts.command.as_deref(),
        )
    };
    std::fs::write(&run, script).with_context(|| format!("writing {}", run.display()))?;
    say(&format!(
        "booting {} under qemu (TCG, {} cpus, {} MiB, no network device): {} on {}",
        kernel.release,
        opts.cpus,
        opts.memory_mib,
        if benches {
            opts.benches.join(",")
        } else {
            opts.tests.join(",")
        },
        opts.backends.join(",")
    ));
    let started = Instant::now();
    let result = boot(&kernel, &initrd, &run, opts);
    let _ = std::fs::remove_dir_all(&run_dir);
    let outcome = result?;
    for (name, rc, ms) in &outcome.binaries {
        say(&format!(
            "vm-test {name}: exit {rc}, {:.1} s wall (TCG)",
            *ms as f64 / 1000.0
        ));
    }
    for skip in &outcome.unsupported {
        say(&format!(
            "vm-test: a backend under test did not run: {skip}"
        ));
    }
    say(&format!(
        "vm-test: whole VM run {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    if benches {
        for path in outcome.files.write(&cache)? {
            say(&format!("vm-test: bench report {}", path.display()));
        }
        let failed = outcome
            .binaries
            .iter()
            .filter(|(_, rc, _)| *rc != 0)
            .count();
        println!(
            "vm-test benches (kernel {}, TCG): {} ran, {failed} failed",
            kernel.release,
            outcome.binaries.len()
        );
        return match outcome.exit {
            Some(0) if outcome.binaries.len() == binaries.len() => Ok(()),
            Some(rc) => bail!("vm-test: benches failed (guest exit status {rc})"),
            None => bail!("vm-test: the guest reported no exit status"),
        };
    }
    println!(
        "vm-test (kernel {}): {} passed, {} failed, {} skipped",
        kernel.release,
        outcome.passed,
        outcome.failed,
        outcome.ignored + outcome.unsupported.len() as u64
    );
    if !outcome.unsupported.is_empty() {
        bail!("vm-test: backends under test were skipped in the VM (see above)");
    }
    match outcome.exit {
        Some(0) if outcome.failed == 0 => {}
        Some(rc) => bail!(
            "vm-test: failed (guest exit status {rc}, {} tests failed)",
            outcome.failed
        ),
        None => bail!("vm-test: the guest reported no exit status"),
    }
    if outcome.passed == 0 && opts.command.is_none() {
        bail!("vm-test: no test ran");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_lines_are_counted_and_requested_backends_that_skip_are_failures() {
        let backends = vec!["ebpf".to_string(), "nftables".to_string()];
        let mut o = Outcome::default();
        for line in [
            "KPX-VM-BOOTED",
            "SKIPPED cluster-ip on iptables-nft: not in KPX_BACKENDS=ebpf,nftables",
            "SKIPPED hairpin on nftables: the scenario does not depend on the backend",
            "SKIPPED cluster-ip on ebpf: kernel lacks tcx",
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.2s\r",
            "test result: \u{1b}[31mFAILED\u{1b}[m. 3 passed; 2 failed; 0 ignored; 0 measured",
            "KPX-VM-END scenarios rc=101 ms=83211",
            "KPX-VM-EXIT rc=1",
        ] {
            o.line(line, &backends);
        }
        assert!(o.booted);
        assert_eq!((o.passed, o.failed, o.ignored), (15, 2, 1));
        assert_eq!(o.unsupported, vec!["cluster-ip on ebpf: kernel lacks tcx"]);
        assert_eq!(o.binaries, vec![("scenarios".to_string(), 101, 83211)]);
        assert_eq!(o.exit, Some(1));
    }

    #[test]
    fn the_run_script_quotes_and_brackets_each_binary() {
        let s = run_script(
            &[(
                "scenarios".into(),
                PathBuf::from("/t/deps/scenarios-ab"),
                vec!["ipvs".into()],
            )],
            &["ipvs".into(), "ebpf".into()],
            &["it's".into()],
            None,
        );
        assert!(s.contains("export KPX_BACKENDS='ipvs,ebpf'"), "{s}");
        assert!(
            s.contains(
                "KPX_BACKENDS='ipvs' '/t/deps/scenarios-ab' --color never --show-output 'it'\\''s'"
            ),
            "{s}"
        );
        assert!(s.contains("KPX-VM-END scenarios rc=$rc"), "{s}");
        assert!(s.ends_with("exit $failed\n"));
    }

    #[test]
    fn a_test_spec_names_its_backends_within_those_under_test() -> anyhow::Result<()> {
        let all: Vec<String> = DEFAULT_BACKENDS.split(',').map(str::to_string).collect();
        assert_eq!(
            test_spec("frontends", &all)?,
            ("frontends".to_string(), all.clone())
        );
        assert_eq!(
            test_spec("scenarios@ipvs+ebpf", &all)?,
            (
                "scenarios".to_string(),
                vec!["ipvs".to_string(), "ebpf".to_string()]
            )
        );
        let narrowed = vec!["ebpf".to_string()];
        assert_eq!(test_spec("scenarios@ipvs+ebpf", &narrowed)?.1, narrowed);
        let refusal = |spec: &str, backends: &[String]| match test_spec(spec, backends) {
            Ok(found) => format!("accepted as {found:?}"),
            Err(e) => e.to_string(),
        };
        let e = refusal("scenarios@ipvs", &narrowed);
        assert!(e.contains("none of its backends is under test"), "{e}");
        let e = refusal("scenarios@ipvz", &all);
        assert!(e.contains("\"ipvz\" is not one of"), "{e}");
        Ok(())
    }
}
