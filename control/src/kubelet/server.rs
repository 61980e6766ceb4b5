//! The kubelet's API the API server proxies to (port 10250): `GET /containerLogs/NS/POD/CONTAINER`
//! with `follow`, `previous`, `tailLines` and `limitBytes`, read from the container log files
//! (`<pod-log-dir>/<ns>_<pod>_<uid>/<container>/<restart>.log`). Unauthenticated: it is
//! reachable only inside the lab.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::Shared;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    follow: Option<String>,
    previous: Option<String>,
    tail_lines: Option<usize>,
    limit_bytes: Option<usize>,
    #[serde(rename = "podUID")]
    pod_uid: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true" | "1" | ""))
}

/// The pod's log directory: the one of `uid`, else the most recently written one of that name.
fn pod_dir(root: &Path, namespace: &str, pod: &str, uid: Option<&str>) -> Option<PathBuf> {
    let prefix = format!("{namespace}_{pod}_");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix(&prefix)
                .is_some_and(|rest| uid.is_none_or(|u| u.is_empty() || rest == u))
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The container's log files, oldest run first.
fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.path().file_stem()?.to_str()?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    match trimmed.match_indices('\n').rev().nth(n - 1) {
        Some((i, _)) => &text[i + 1..],
        None => text,
    }
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, message).into_response()
}

async fn container_logs(
    State(shared): State<Arc<Shared>>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some(dir) = pod_dir(
        &shared.config.log_dir,
        &namespace,
        &pod,
        q.pod_uid.as_deref(),
    ) else {
        return not_found(format!(
            "container \"{container}\" in pod \"{pod}\" has no logs on this node"
        ));
    };
    let files = runs(&dir.join(&container));
    let chosen = if truthy(&q.previous) {
        files.len().checked_sub(2).map(|i| files[i].clone())
    } else {
        files.last().cloned()
    };
    let Some(file) = chosen else {
        let what = if truthy(&q.previous) {
            "previous terminated container"
        } else {
            "container"
        };
        return not_found(format!("{what} \"{container}\" in pod \"{pod}\" not found"));
    };
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let mut first = match q.tail_lines {
        Some(n) => tail(&text, n).to_string(),
        None => text.clone(),
    };
    if let Some(limit) = q.limit_bytes {
        first.truncate(limit);
    }
    let headers = [(header::CONTENT_TYPE, "text/plain")];
    if !truthy(&q.follow) || truthy(&q.previous) {
        return (headers, first).into_response();
    }
    // Follow: what there is, then what is appended, until the container runs again (a newer
    // log file) or its pod's logs are removed.
    let state = (Some(first), file, text.len() as u64, dir.join(&container));
    let stream = futures::stream::unfold(state, |(pending, file, offset, cdir)| async move {
        if let Some(chunk) = pending {
            return Some((
                Ok::<_, std::io::Error>(chunk.into_bytes()),
                (None, file, offset, cdir),
            ));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let len = std::fs::metadata(&file).ok()?.len();
            if len > offset {
                let bytes = std::fs::read(&file).ok()?;
                let chunk = bytes.get(offset as usize..).unwrap_or_default().to_vec();
                return Some((Ok(chunk), (None, file, len, cdir)));
            }
            if runs(&cdir).last() != Some(&file) {
                return None;
            }
        }
    });
    (headers, Body::from_stream(stream)).into_response()
}

/// Serves the kubelet API on `listener` until the process ends.
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the kubelet API server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 1), "c");
        assert_eq!(tail("a\n", 5), "a\n");
        assert_eq!(tail("a\nb\n", 0), "");
    }
}
