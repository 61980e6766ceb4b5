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
