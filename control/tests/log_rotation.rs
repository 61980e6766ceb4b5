//! Container logs rotate as the kubelet rotates them. Found: a pod writing 100 MB to stdout made
//! a single 101 MB `0.log` (no rotation anywhere), and the lab's logs share the root
//! filesystem with the store, so a chatty pod filled the disk.
//! A real child process writes to its log through the fd `runtime::start` gives it
//! (`runtime::open_log`, `O_APPEND`) while the rotation copies and truncates the file.
//! Nothing here depends on timing: the writer waits for the test between rounds, and every
//! wait is for something to happen, with a generous deadline.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kpx_control::kubelet::logs::{rotate_container, Policy};
use kpx_control::kubelet::runtime::open_log;

/// Only for waiting for something that should happen soon; never a verdict on speed.
const PATIENCE: Duration = Duration::from_secs(60);

fn spawn_writer(log: &Path, script: &str, cwd: &Path) -> Child {
    let out = open_log(log).expect("open the log");
    // What rotation relies on: the container's fd appends.
    // SAFETY: F_GETFL on an fd this test owns.
    let flags = unsafe { libc::fcntl(out.as_raw_fd(), libc::F_GETFL) };
    assert!(
        flags >= 0 && flags & libc::O_APPEND != 0,
        "the log fd must be O_APPEND"
    );
    Command::new("sh")
        .args(["-c", script])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn sh")
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rotated pieces of `0.log`, oldest first.
fn pieces(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("0.log."))
        .collect();
    names.sort();
    names
}

fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).expect("ls").count()
}

#[test]
fn a_writing_container_is_rotated_without_holes_and_bounded() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("default_chatty_uid").join("c");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let live = dir.join("0.log");
    let policy = Policy {
        max_size: 4096,
        max_files: 3,
    };
    // Six rounds of 300 lines (~9 KB, over max-size); after each the writer says so and waits
    // for the test to let it go on; then one last line.
    let script = r#"
        r=1
        while [ $r -le 6 ]; do
            i=0
            while [ $i -lt 300 ]; do echo "round $r line $i ....................."; i=$((i+1)); done
            echo "end of round $r"
            while [ ! -e go-$r ]; do sleep 0.01; done
            r=$((r+1))
        done
        echo "after the last rotation"
    "#;
    let mut child = spawn_writer(&live, script, root.path());
    for round in 1..=6 {
        let marker = format!("end of round {round}\n");
        wait_for(&format!("round {round}"), || {
            std::fs::read_to_string(&live).is_ok_and(|t| t.ends_with(&marker))
        });
        let before = std::fs::read(&live).expect("read");
        assert!(before.len() as u64 >= policy.max_size);
        // The live file holds this round only: the previous rotation truncated it and the
        // writer continued at the new end.
        assert!(
            before.starts_with(format!("round {round} line 0 ").as_bytes()),
            "round {round}: the live log starts with {:?}",
            String::from_utf8_lossy(&before[..40.min(before.len())])
        );
        assert!(
            !before.contains(&0),
            "round {round}: NUL bytes (a sparse hole)"
        );
        rotate_container(&dir, policy).expect("rotate");
        // The writer is waiting: nothing was lost, the live file is empty, the newest piece
        // holds exactly the old bytes.
        assert_eq!(std::fs::metadata(&live).expect("stat").len(), 0);
        let names = pieces(&dir);
        let newest = names.last().expect("a rotated piece");
        assert_eq!(std::fs::read(dir.join(newest)).expect("piece"), before);
        assert!(
            files(&dir) <= policy.max_files,
            "round {round}: {} files, at most {} allowed",
            files(&dir),
            policy.max_files
        );
        std::fs::write(root.path().join(format!("go-{round}")), "").expect("go");
    }
    let status = child.wait().expect("wait");
    assert!(status.success());
    // Written at offset 0 of the truncated file: no hole of NULs as long as the old log.
    assert_eq!(
        std::fs::read_to_string(&live).expect("read"),
        "after the last rotation\n"
    );
    // Live + 2 pieces: the oldest rounds were deleted, the newest kept.
    let names = pieces(&dir);
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(files(&dir), 3);
    let last = std::fs::read_to_string(dir.join(&names[1])).expect("piece");
    assert!(last.ends_with("end of round 6\n"));
    let before_last = std::fs::read_to_string(dir.join(&names[0])).expect("piece");
    assert!(before_last.ends_with("end of round 5\n"));
}

#[test]
fn rotating_a_free_running_writer_leaves_no_holes() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("default_chatty_uid").join("c");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let live = dir.join("0.log");
    let policy = Policy {
        max_size: 8192,
        max_files: 4,
    };
    // A writer that never waits, bounded in count.
    let script = r#"
        i=0
        while [ $i -lt 20000 ]; do echo "line $i ..............................."; i=$((i+1)); done
    "#;
    let mut child = spawn_writer(&live, script, root.path());
    let mut passes = 0u64;
    let mut rotations = 0usize;
    loop {
        let exited = child.try_wait().expect("try_wait").is_some();
        let pieces_before = pieces(&dir);
        rotate_container(&dir, policy).expect("rotate");
        passes += 1;
        if pieces(&dir) != pieces_before {
            rotations += 1;
        }
        assert!(files(&dir) <= policy.max_files, "{} files", files(&dir));
        if exited {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(passes > 0 && rotations > 0, "the log was never rotated");
    // No sparse hole anywhere: each file is text from its first byte.
    let text = std::fs::read(&live).expect("read");
    assert!(!text.contains(&0), "NUL bytes in the live log");
    // The last pass ran after the writer exited: what is left is under max-size, and starts
    // with a whole line (the writer continued at offset 0 after each truncate).
    assert!((text.len() as u64) < policy.max_size);
    assert!(text.is_empty() || text.starts_with(b"line "));
    for name in pieces(&dir) {
        let bytes = std::fs::read(dir.join(&name)).expect("piece");
        assert!(!bytes.contains(&0), "NUL bytes in {name}");
    }
}
