//! Container log rotation, as the kubelet's container log manager does it
//! (`pkg/kubelet/logs/container_log_manager.go`): every [`MONITOR_PERIOD`] (its
//! `logMonitorPeriod`), a container's current log that reached `--container-log-max-size` is
//! rotated to `<attempt>.log.<UTC timestamp>`, and at most `--container-log-max-files` files
//! (the live one and its rotated pieces) are kept per container attempt, the oldest pieces
//! deleted (its `removeExcessLogs`).
//!
//! The kubelet renames the log and asks the runtime (CRI `ReopenContainerLog`) to reopen it.
//! Here a container's stdout and stderr are a file the kubelet opened ([`super::runtime::start`])
//! and the process writes it directly: nothing can make the process reopen it, and a pipe read
//! by the kubelet is ruled out because containers outlive a kubelet restart and are adopted (a
//! restarted kubelet would have lost the read end). So this is logrotate's `copytruncate`: the
//! log is copied to the rotated piece and then truncated in place. The fd is `O_APPEND`
//! ([`super::runtime::open_log`]), so after the truncate the writer's next write lands at the
//! new end (offset 0), with no sparse hole. What can be lost: bytes the container writes
//! between the end of the copy and the truncate (the copy runs to end-of-file right before the
//! truncate, so that window is one `ftruncate` wide). Upstream compresses older pieces; these
//! are kept uncompressed (bounded by max-size × max-files all the same).
//!
//! All of this is blocking file I/O and runs on the blocking pool, never on the runtime's
//! threads. The log directory is walked without following symlinks, and only regular files
//! are copied or truncated (opened `O_NOFOLLOW | O_NONBLOCK`, checked with `fstat`).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often logs are checked (the kubelet's `logMonitorPeriod`).
pub const MONITOR_PERIOD: Duration = Duration::from_secs(10);
/// `--container-log-max-size`'s default (the kubelet's `10Mi`).
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
/// `--container-log-max-files`' default (the kubelet's 5).
pub const DEFAULT_MAX_FILES: usize = 5;
/// Suffix of a copy in progress; a leftover one (a kubelet killed mid-copy) is removed.
const TMP_SUFFIX: &str = ".tmp";
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("--container-log-max-size: invalid value {0:?}: {1}")]
    MaxSize(String, String),
    #[error("--container-log-max-files: invalid value {0}: must be greater than 1 (the live log and at least one rotated piece)")]
    MaxFiles(usize),
}

/// When logs rotate and how many files are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// A live log this large (bytes) or larger is rotated.
    pub max_size: u64,
    /// Files kept per container attempt, the live one included (at least 2).
    pub max_files: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_MAX_SIZE,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

impl Policy {
    /// The policy of `--container-log-max-size` and `--container-log-max-files`, validated as
    /// the kubelet's `NewContainerLogManager` does (max files > 1; the size a quantity, here
    /// also above zero, since a zero size would rotate on every tick).
    pub fn parse(max_size: &str, max_files: usize) -> Result<Self, PolicyError> {
        let size =
            parse_size(max_size).map_err(|why| PolicyError::MaxSize(max_size.to_string(), why))?;
        if size == 0 {
            return Err(PolicyError::MaxSize(
                max_size.to_string(),
                "must be greater than 0".into(),
            ));
        }
        if max_files < 2 {
            return Err(PolicyError::MaxFiles(max_files));
        }
        Ok(Self {
            max_size: size,
            max_files,
        })
    }
}

/// A byte count written as a Kubernetes resource quantity (`resource.ParseQuantity`, then
/// `Value()`, which rounds up): plain bytes (`1048576`), binary suffixes (`Ki`, `Mi`, `Gi`,
/// `Ti`, `Pi`, `Ei`), decimal ones (`k`, `M`, `G`, `T`, `P`, `E`), an exponent (`1e6`), and a
/// fraction (`1.5Mi`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    const ALLOWED: &str =
        "a quantity of bytes: digits with an optional fraction and one of Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E or an exponent (e.g. 10Mi, 1Gi, 1048576)";
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(ALLOWED.into());
    }
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        exp if exp.starts_with(['e', 'E']) => {
            let n: u32 = exp[1..].parse().map_err(|_| ALLOWED.to_string())?;
            10u128.checked_pow(n).ok_or_else(|| ALLOWED.to_string())?
        }
        _ => return Err(ALLOWED.into()),
    };
    let too_large = || format!("too large: at most {} bytes", u64::MAX);
    // whole.fraction × multiplier, rounded up, in integers: (digits × multiplier) / 10^len.
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| too_large())?;
    let scale = 10u128
        .checked_pow(fraction.len() as u32)
        .ok_or_else(too_large)?;
    let bytes = digits
        .checked_mul(multiplier)
        .ok_or_else(too_large)?
        .div_ceil(scale);
    u64::try_from(bytes).map_err(|_| too_large())
}

/// What one tick does to one container attempt's logs.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Copy the live log to a new piece and truncate it.
    pub rotate: bool,
    /// Rotated pieces to delete, oldest first.
    pub delete: Vec<String>,
}

/// The rotation decision for one container attempt: its live log's size and the names of its
/// rotated pieces (`<attempt>.log.<timestamp>`, in any order; the timestamps sort as time).
/// The live log rotates once it reaches `max_size` (upstream rotates when `size >= MaxSize`);
/// afterwards at most `max_files - 1` pieces may remain, so the oldest beyond that go (upstream
/// keeps `MaxFiles - 2` before rotating: the same count after it).
pub fn plan(live_size: u64, pieces: &[String], policy: Policy) -> Plan {
    let rotate = live_size >= policy.max_size;
    let mut sorted: Vec<&String> = pieces.iter().collect();
    sorted.sort();
    let keep = policy.max_files.saturating_sub(1).max(1);
    let after = sorted.len() + usize::from(rotate);
    let excess = after.saturating_sub(keep);
    Plan {
        rotate,
        delete: sorted
            .into_iter()
            .take(excess)
            .map(ToString::to_string)
            .collect(),
    }
}

/// The rotated piece's name for `live` (e.g. `0.log`) at `now`: the kubelet's
/// `20060102-150405` timestamp, with microseconds so two rotations in a second stay apart and
/// names still sort as time.
pub fn piece_name(live: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    format!("{live}.{}", now.format("%Y%m%d-%H%M%S%.6f"))
}

/// The file type of `path` itself (a symlink is not followed).
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

/// Opens a log file (for reading, or also writing to truncate it) without following a symlink
/// and without blocking on a FIFO, and refuses anything but a regular file before a byte is
/// read: the kubelet API and the rotation both open paths a pod could have placed things at.
pub(crate) fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// logrotate's `copytruncate`: copies `live` to `piece` (through `piece.tmp`, so a piece is
/// always whole) and truncates `live` to zero. Returns the bytes copied. On any error the live
/// log is left as it was (no byte is dropped without its copy).
pub fn copy_truncate(live: &Path, piece: &Path) -> io::Result<u64> {
    let src = open_regular(live, true)?;
    let mode = src.metadata()?.mode() & 0o777;
    let tmp = PathBuf::from(format!("{}{TMP_SUFFIX}", piece.display()));
    // create_new (O_EXCL) never follows a symlink at the name.
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .mode(mode)
        .open(&tmp)?;
    let copied = (|| {
        dst.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        // To end-of-file as it is now, so that only what is written between the last read and
        // the truncate below is lost.
        loop {
            let n = src.read_at(&mut buf, offset)?;
            if n == 0 {
                break;
            }
            dst.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
        }
        src.set_len(0)?;
        std::fs::rename(&tmp, piece)?;
        Ok(offset)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// One container attempt's files in a container log directory.
#[derive(Debug, Default)]
struct Attempt {
    live: Option<String>,
    pieces: Vec<String>,
}

/// Groups a container directory's names by attempt: `<n>.log` is live, `<n>.log.<ts>` a piece;
/// returns the latest attempt (the one a running container writes) and leftover copies.
fn latest_attempt(names: &[String]) -> (Option<(u64, Attempt)>, Vec<String>) {
    let mut leftovers = Vec::new();
    let mut attempts: std::collections::BTreeMap<u64, Attempt> = Default::default();
    for name in names {
        if name.ends_with(TMP_SUFFIX) {
            leftovers.push(name.clone());
            continue;
        }
        let Some((n, rest)) = name.split_once(".log") else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let entry = attempts.entry(n).or_default();
        if rest.is_empty() {
            entry.live = Some(name.clone());
        } else if rest.starts_with('.') {
            entry.pieces.push(name.clone());
        }
    }
    (attempts.into_iter().next_back(), leftovers)
}

/// Rotates one container's log directory (`<pod dir>/<container>`) by `policy`.
pub fn rotate_container(dir: &Path, policy: Policy) -> io::Result<()> {
    let names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let (latest, leftovers) = latest_attempt(&names);
    // A single task rotates, one tick at a time: a copy still named .tmp is one a killed
    // kubelet left (upstream's cleanupUnusedLogs removes its .tmp files the same way).
    for name in leftovers {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let Some((_, attempt)) = latest else {
        return Ok(());
    };
    let Some(live) = attempt.live else {
        return Ok(());
    };
    let live_path = dir.join(&live);
    let meta = std::fs::symlink_metadata(&live_path)?;
    if !meta.file_type().is_file() {
        return Ok(());
    }
    let plan = plan(meta.len(), &attempt.pieces, policy);
    if plan.rotate {
        let piece = dir.join(piece_name(&live, chrono::Utc::now()));
        let copied = copy_truncate(&live_path, &piece)?;
        tracing::debug!(log = %live_path.display(), bytes = copied, "rotated a container log");
    }
    for name in plan.delete {
        if let Err(e) = std::fs::remove_file(dir.join(&name)) {
            tracing::warn!(piece = %dir.join(&name).display(), error = %e, "deleting a rotated container log");
        }
    }
    Ok(())
}

/// Rotates every container's log under `root` (`<ns>_<pod>_<uid>/<container>/`), following no
/// symlink. Errors are logged per container; one bad directory does not stop the others.
pub fn rotate_all(root: &Path, policy: Policy) {
    let Ok(pods) = std::fs::read_dir(root) else {
        return;
    };
    for pod in pods.flatten() {
        let pod = pod.path();
        if !is_real_dir(&pod) {
            continue;
        }
        let Ok(containers) = std::fs::read_dir(&pod) else {
            continue;
        };
        for container in containers.flatten() {
            let dir = container.path();
            if !is_real_dir(&dir) {
                continue;
            }
            if let Err(e) = rotate_container(&dir, policy) {
                tracing::warn!(dir = %dir.display(), error = %e, "rotating a container log");
            }
        }
    }
}

/// Rotates the logs under `root` every [`MONITOR_PERIOD`] until the process ends; each pass
/// runs on the blocking pool, and a pass finishes before the next starts.
pub async fn monitor(root: PathBuf, policy: Policy) {
    let mut tick = tokio::time::interval(MONITOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let root = root.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || rotate_all(&root, policy)).await {
            tracing::warn!(error = %e, "the log rotation pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn sizes_parse_as_kube_quantities() {
        assert_eq!(parse_size("10Mi"), Ok(10 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("100k"), Ok(100_000));
        assert_eq!(parse_size("1.5Ki"), Ok(1536));
        assert_eq!(parse_size("1e3"), Ok(1000));
        // Value() rounds up.
        assert_eq!(parse_size("0.1"), Ok(1));
        for bad in [
            "",
            "Mi",
            "10MB",
            "-1",
            "10 Mi",
            "1.2.3",
            "99999999999Ei",
            "1e99",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Policy::parse("10Mi", 5), Ok(Policy::default()));
        assert_eq!(Policy::parse("1Ki", 1), Err(PolicyError::MaxFiles(1)));
        assert!(matches!(
            Policy::parse("0", 5),
            Err(PolicyError::MaxSize(..))
        ));
        let message = Policy::parse("ten", 5).expect_err("refused").to_string();
        assert!(message.contains("--container-log-max-size") && message.contains("\"ten\""));
    }

    #[test]
    fn the_rotation_decision() {
        let policy = Policy {
            max_size: 100,
            max_files: 3,
        };
        // Under the size: nothing.
        assert_eq!(plan(99, &[], policy), Plan::default());
        // At the size: rotate, nothing to delete yet.
        assert_eq!(
            plan(100, &names(&["0.log.20260101-000000.000000"]), policy),
            Plan {
                rotate: true,
                delete: vec![]
            }
        );
        // Two pieces already: the oldest goes, so live + 2 pieces = 3 files after.
        assert_eq!(
            plan(
                500,
                &names(&[
                    "0.log.20260101-000002.000000",
                    "0.log.20260101-000001.000000"
                ]),
                policy
            ),
            Plan {
                rotate: true,
                delete: names(&["0.log.20260101-000001.000000"])
            }
        );
        // More than allowed (the flag was lowered): trimmed even without a rotation.
        assert_eq!(
            plan(
                1,
                &names(&["0.log.c", "0.log.a", "0.log.d", "0.log.b"]),
                policy
            ),
            Plan {
                rotate: false,
                delete: names(&["0.log.a", "0.log.b"])
            }
        );
    }

    #[test]
    fn only_the_latest_attempt_is_live() {
        let (latest, leftovers) = latest_attempt(&names(&[
            "0.log",
            "0.log.20260101-000000.000000",
            "1.log",
            "1.log.20260101-000001.000000",
            "1.log.20260101-000002.000000.tmp",
            "notes.txt",
        ]));
        let (n, attempt) = latest.expect("an attempt");
        assert_eq!(n, 1);
        assert_eq!(attempt.live.as_deref(), Some("1.log"));
        assert_eq!(attempt.pieces, names(&["1.log.20260101-000001.000000"]));
        assert_eq!(leftovers, names(&["1.log.20260101-000002.000000.tmp"]));
        let now = chrono::DateTime::from_timestamp(1_764_641_700, 123_456_000).expect("time");
        assert_eq!(piece_name("0.log", now), "0.log.20251202-021500.123456");
    }

    #[test]
    fn symlinks_and_fifos_are_never_rotated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, vec![b'x'; 200]).expect("write");
        let container = dir.path().join("ns_p_u").join("c");
        std::fs::create_dir_all(&container).expect("mkdir");
        std::os::unix::fs::symlink(&secret, container.join("0.log")).expect("symlink");
        let fifo =
            std::ffi::CString::new(container.join("1.log").to_str().expect("utf-8").to_string())
                .expect("cstring");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let policy = Policy {
            max_size: 10,
            max_files: 2,
        };
        rotate_all(dir.path(), policy);
        assert_eq!(std::fs::read(&secret).expect("read").len(), 200);
        assert!(copy_truncate(&container.join("0.log"), &container.join("0.log.x")).is_err());
        assert!(copy_truncate(&container.join("1.log"), &container.join("1.log.x")).is_err());
        assert_eq!(std::fs::read(&secret).expect("read").len(), 200);
        assert_eq!(std::fs::read_dir(&container).expect("ls").count(), 2);
    }
}
