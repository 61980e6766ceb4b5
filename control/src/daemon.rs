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

/// Go-style durations, as Go's `time.ParseDuration` reads them: `1s`, `500ms`, `2m`, `1h`, `0`,
/// and the compound form Go's `Duration.String()` writes (`1m0s`, `24h0m0s`, `1h2m3.5s`), which
/// is how a KubeProxyConfiguration holds every duration.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if text.is_empty() {
        return Err("an empty duration (want e.g. 30s, 1m0s, 500ms)".into());
    }
    let mut rest = text;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: a duration needs a unit (ms, s, m or h)"))?;
        let (number, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        seconds += match unit {
            "ns" => value / 1e9,
            "us" | "\u{b5}s" | "\u{3bc}s" => value / 1e6,
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (allowed: ns, us, ms, s, m, h)"
                ))
            }
        };
        rest = tail;
    }
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

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_as_go_writes_them() {
        let ok = |t: &str| parse_duration(t).expect(t);
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("1m0s"), Duration::from_secs(60));
        assert_eq!(ok("24h0m0s"), Duration::from_secs(86400));
        assert_eq!(ok("1h2m3.5s"), Duration::from_millis(3_723_500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("250us"), Duration::from_micros(250));
        let err = |t: &str| parse_duration(t).expect_err(t);
        assert!(err("30").contains("needs a unit"), "{}", err("30"));
        assert!(err("1d").contains("unknown unit \"d\""), "{}", err("1d"));
        assert!(err("-1s").contains("unknown unit \"-\"") || err("-1s").contains("not a number"));
        assert!(err("").contains("empty"));
    }
}
