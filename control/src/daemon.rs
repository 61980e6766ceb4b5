//! What every kpx daemon does the same way: logging to stderr, and the signals that stop it.

/// Logs to stderr, filtered by `RUST_LOG` (default: `default_level`).
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Go-style durations: `1s`, `500ms`, `2m`, `1h`, `0`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("{text:?}: a duration needs a unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (allowed: ms, s, m, h)"
            ))
        }
    };
    if !(0.0..=86400.0 * 365.0).contains(&seconds) {
        return Err(format!("{text:?}: out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// The API client from the usual flags: `--kubeconfig`, `--master` (overrides the
/// kubeconfig's server), or else the in-cluster service account.
pub fn client_config(
    kubeconfig: Option<&std::path::Path>,
    master: Option<&str>,
) -> anyhow::Result<crate::client::ClientConfig> {
    use crate::client::ClientConfig;
    use anyhow::Context;
    let mut config = match kubeconfig {
        Some(path) => ClientConfig::from_kubeconfig(path, None)?,
        None if master.is_some() => ClientConfig::default(),
        None => ClientConfig::in_cluster().context("no --kubeconfig or --master given")?,
    };
    if let Some(master) = master {
        config.server = master.trim_end_matches('/').to_string();
    }
    Ok(config)
}

/// The machine's host name (the default node name).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// `/metrics` for `registry`, in Prometheus' OpenMetrics text format (every daemon's).
pub fn metrics_response(
    registry: &prometheus_client::registry::Registry,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and returns the limit then in
/// force (the soft one). Go has done the same in its `os` package since 1.19 (`os/rlimit.go`,
/// run at start by every Go binary, so kube-apiserver and the kubelet run with the hard limit);
/// a daemon that keeps the 1,024 soft default runs out of descriptors under a few hundred
/// watches, and the connection limit derived from it (`serve::default_max_connections`) would
/// shut ordinary clients out. Call it before anything reads the limit. A failure leaves the
/// limit as it was and is logged: the daemon still works, only with fewer descriptors.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "cannot read the open-file limit (RLIMIT_NOFILE)");
        return 1024;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        } else {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, soft = before, hard = limit.rlim_max, "cannot raise the open-file limit to the hard limit");
        }
    }
    tracing::info!(
        soft = limit.rlim_cur,
        hard = limit.rlim_max,
        was = before,
        "open-file limit (RLIMIT_NOFILE)"
    );
    limit.rlim_cur
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist, as kube keeps etcd's
/// data directory (etcd's `fileutil.TouchDirAll` / `CheckDirPermission` want 0700): the store
/// and keys in it are for this user only. A directory that already exists is the user's
/// choice and is not changed, but if its group or others may enter it, say so.
pub fn create_private_dir(dir: &std::path::Path, flag: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        // Parents made on the way get the usual mode; only the directory itself is private.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => return Ok(()),
            // Someone else made it between the check and now: treat it as existing.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format_args!("{mode:04o}"),
            "{flag} is accessible to its group or others; kube keeps its data directory 0700 (chmod 700 it)"
        );
    }
    Ok(())
}
