//! What the daemons set up about themselves at start: the open-file limit raised to the hard
//! limit (as every Go binary does since Go 1.19, so a 1,024 soft limit no longer caps
//! kpx-control's connections at 896), and private (0700) directories for the store, its keys
//! and the containers' logs.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Kills the child on drop, so a failed assertion leaves no daemon behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd` started with RLIMIT_NOFILE soft 1,024 and hard 4,096 (lowering both needs no
/// privilege), as `prlimit --nofile=1024:4096` would.
fn spawn_with_nofile_1024_4096(cmd: &mut Command) -> Killed {
    // SAFETY: between fork and exec this only calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Killed(cmd.spawn().expect("start the daemon"))
}

/// The soft and hard "Max open files" of a running process.
fn open_file_limits(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().expect("soft").to_string(),
        fields.next().expect("hard").to_string(),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn kpx_control_raises_the_fd_limit_and_keeps_its_data_dir_private() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("data");
    let cert_dir = parent.path().join("certs");
    let mut child = spawn_with_nofile_1024_4096(
        Command::new(env!("CARGO_BIN_EXE_kpx-control"))
            .args(["--port", "0", "--data-dir"])
            .arg(&data_dir)
            .arg("--cert-dir")
            .arg(&cert_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    // The first line says it is listening: by then everything at start is done.
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read the listening line");
    assert!(
        first.contains("https://"),
        "unexpected first line {first:?}"
    );

    let (soft, hard) = open_file_limits(child.0.id());
    assert_eq!(
        (soft.as_str(), hard.as_str()),
        ("4096", "4096"),
        "the soft limit is raised to the hard one"
    );
    assert_eq!(mode(&data_dir), 0o700, "--data-dir is created 0700");
    assert_eq!(mode(&cert_dir), 0o700, "--cert-dir is created 0700");
    assert!(data_dir.join("kpx.redb").is_file());
}

#[test]
fn kpx_control_leaves_an_existing_data_dir_alone() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("data");
    std::fs::create_dir(&data_dir).expect("mkdir");
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_kpx-control"))
            .args(["--port", "0", "--data-dir"])
            .arg(&data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kpx-control"),
    );
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read the listening line");
    assert!(
        first.contains("https://"),
        "unexpected first line {first:?}"
    );
    // A directory the user made is theirs: warned about, not changed.
    assert_eq!(mode(&data_dir), 0o755);
    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(
        stderr.contains("--data-dir is accessible to its group or others"),
        "no warning about the 0755 --data-dir in {stderr:?}"
    );
}

#[test]
fn kpx_kubelet_raises_the_fd_limit_and_keeps_its_pod_log_dir_private() {
    let parent = tempfile::tempdir().expect("tempdir");
    let log_dir = parent.path().join("pods");
    // A bad --node-labels makes the kubelet exit once its start-up is done and before it
    // touches any network or the API: the test needs only what it did at start.
    let mut child = spawn_with_nofile_1024_4096(
        Command::new(env!("CARGO_BIN_EXE_kpx-kubelet"))
            .args([
                "--master",
                "http://127.0.0.1:1",
                "--node-ip",
                "198.18.0.2",
                "--pod-cidr",
                "10.244.9.0/24",
                "--node-labels",
                "no-equals-sign",
                "--pod-log-dir",
            ])
            .arg(&log_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    let status = child.0.wait().expect("wait");
    assert!(
        !status.success(),
        "the bad --node-labels was refused: {stderr}"
    );
    assert!(stderr.contains("--node-labels"), "{stderr}");
    assert_eq!(mode(&log_dir), 0o700, "--pod-log-dir is created 0700");
    let stderr = strip_ansi(&stderr);
    let logged = stderr
        .lines()
        .find(|l| l.contains("open-file limit (RLIMIT_NOFILE)"))
        .unwrap_or_else(|| panic!("no open-file limit logged in {stderr}"));
    assert!(
        logged.contains("soft=4096") && logged.contains("was=1024"),
        "{logged}"
    );
}

/// The text of a log without its colour escapes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
