//! Starting and stopping a kpx-control process for a lab.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// A kpx-control child process; stopped (SIGTERM, then SIGKILL) on drop.
pub struct ControlPlane {
    child: Child,
    pub url: String,
}

/// The kpx-control binary next to the running executable (same cargo profile), or on PATH.
pub fn kpx_control_binary() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("kpx-control")));
    match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("kpx-control"),
    }
}

impl ControlPlane {
    /// Starts kpx-control on a free loopback port with its store in `data_dir`.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let binary = kpx_control_binary();
        let mut child = Command::new(&binary)
            .args(["--port", "0", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            // Its log goes to our stderr; keep it to warnings unless asked for more.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("kpx-control stdout")?;
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .context("reading kpx-control's address")?;
        let Some(url) = first
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
        else {
            let _ = child.kill();
            bail!("kpx-control did not start (it printed {first:?})");
        };
        Ok(Self {
            url: url.to_string(),
            child,
        })
    }

    /// Asks the server to stop and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}
