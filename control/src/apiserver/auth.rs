//! Bearer-token authentication, as kube-apiserver's `--token-auth-file` (the `tokenfile`
//! authenticator, `staging/src/k8s.io/apiserver/plugin/pkg/authenticator/token/tokenfile`) and
//! its `bearertoken` request authenticator.
//!
//! A request with `Authorization: Bearer <token>` naming a known token is authenticated as that
//! token's user; any other presented credential is a 401. A request without credentials may only
//! read what kube's `system:public-info-viewer` ClusterRole grants `system:unauthenticated`
//! (`/healthz`, `/livez`, `/readyz`, `/version`); everything else, discovery and OpenAPI
//! included, is a 401. The kubelet API uses the same token file format (`kubelet/server.rs`).

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// Who a request is (kube's `user.Info`), put in the request's extensions once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("token file {path}: cannot read it: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path}, line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

/// The known tokens. Tokens are kept only as SHA-256 digests and compared in constant time, so
/// neither a memory dump in a log nor response timing reveals one.
#[derive(Clone, Default)]
pub struct TokenAuthenticator {
    entries: Vec<([u8; 32], UserInfo)>,
}

impl std::fmt::Debug for TokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the digests: only how many tokens and whose.
        f.debug_struct("TokenAuthenticator")
            .field(
                "users",
                &self
                    .entries
                    .iter()
                    .map(|(_, u)| &u.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal digests, without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One CSV record as Go's `encoding/csv` reads it with `TrimLeadingSpace` (what kube's
/// tokenfile uses): comma-separated fields, a field may be double-quoted (`""` is a quote
/// inside it) so it can hold commas. A record spans one line here.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a quoted field is not closed".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(c) => return Err(format!("unexpected {c:?} after a quoted field")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => return Err("a quote inside an unquoted field".into()),
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

impl TokenAuthenticator {
    /// Parses a static token file: `token,user,uid[,"group1,group2"]` per line. As kube's
    /// tokenfile: fewer than three columns is an error; an empty token is skipped with a
    /// warning; a repeated token keeps its last line (with a warning). Blank lines are skipped.
    pub fn parse(path: &str, text: &str) -> Result<Self, TokenFileError> {
        let mut auth = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            if raw.trim().is_empty() {
                continue;
            }
            let err = |message: String| TokenFileError::Line {
                path: path.to_string(),
                line,
                message,
            };
            let fields = csv_fields(raw).map_err(err)?;
            if fields.len() < 3 {
                return Err(err(format!(
                    "must have at least 3 columns (token, user name, user uid), found {}",
                    fields.len()
                )));
            }
            if fields[0].is_empty() {
                tracing::warn!(path, line, "an empty token in the token file is ignored");
                continue;
            }
            let groups = match fields.get(3) {
                Some(g) if !g.is_empty() => g.split(',').map(str::to_string).collect(),
                _ => Vec::new(),
            };
            let user = UserInfo {
                name: fields[1].clone(),
                uid: fields[2].clone(),
                groups,
            };
            let d = digest(&fields[0]);
            if let Some(existing) = auth.entries.iter_mut().find(|(e, _)| *e == d) {
                tracing::warn!(
                    path,
                    line,
                    "a repeated token in the token file: the last line wins"
                );
                existing.1 = user;
            } else {
                auth.entries.push((d, user));
            }
        }
        Ok(auth)
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&shown, &text)
    }

    /// Adds one token (the in-process controllers' loopback token, for example).
    pub fn insert(&mut self, token: &str, user: UserInfo) {
        self.entries.push((digest(token), user));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The user `token` belongs to. Every entry is compared, matched or not.
    pub fn authenticate(&self, token: &str) -> Option<&UserInfo> {
        if token.is_empty() {
            return None;
        }
        let d = digest(token);
        let mut found = None;
        for (entry, user) in &self.entries {
            if constant_time_eq(entry, &d) && found.is_none() {
                found = Some(user);
            }
        }
        found
    }

    /// The first user named `name` (to find the admin entry of a generated token file).
    pub fn has_user(&self, name: &str) -> bool {
        self.entries.iter().any(|(_, u)| u.name == name)
    }
}

/// Creates `path` holding `text`, readable by its owner only. The mode is given at creation
/// (never a chmod after, which would leave a window where others could open it); an existing
/// file is replaced through a fresh temporary one, so an old file's looser mode is not kept.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A kubeconfig for `server` (trusting the PEM `ca_pem`) as `user` with a bearer token.
pub fn kubeconfig_yaml(
    cluster: &str,
    server: &str,
    ca_pem: &str,
    user: &str,
    token: &str,
    namespace: Option<&str>,
) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let namespace = namespace
        .map(|n| format!("    namespace: {n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n\
         \x20   certificate-authority-data: {ca}\ncontexts:\n- name: {cluster}\n  context:\n\
         \x20   cluster: {cluster}\n    user: {user}\n{namespace}current-context: {cluster}\n\
         users:\n- name: {user}\n  user:\n    token: {token}\n"
    )
}

/// A random token: 32 bytes from the OS-seeded generator, as hex.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the request's `Authorization` header presents, as kube's `bearertoken` authenticator
/// (`staging/src/k8s.io/apiserver/pkg/authentication/request/bearertoken/bearertoken.go`,
/// `AuthenticateRequest`) reads it. `None`: no bearer credentials, so the request is anonymous:
/// no header, an empty or blank one, another scheme (`Basic ...`: "not mine" to the bearer
/// authenticator, and kpx has no other), or `Bearer` with no token. `Some(Some(token))`: a
/// bearer token to check (unknown: 401). `Some(None)`: `Bearer` followed by more than one word,
/// refused (kube would check only the first word; kpx refuses what it cannot read as meant).
pub fn bearer(headers: &HeaderMap) -> Option<Option<String>> {
    let value = headers.get(header::AUTHORIZATION)?;
    // Go reads header values as bytes; a token with non-UTF-8 bytes in it is simply unknown.
    let text = String::from_utf8_lossy(value.as_bytes());
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut parts = text.splitn(3, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next()?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return None;
    }
    if parts.next().is_some() {
        return Some(None);
    }
    Some(Some(token.to_string()))
}

/// Paths `system:public-info-viewer` lets anyone GET (kube's bootstrap policy,
/// `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go`), with the health checks'
/// sub-paths (`/readyz/ping`, …).
fn public(method: &Method, path: &str) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let under = |base: &str| {
        path == base
            || path
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    path == "/version"
        || path == "/version/"
        || ["/healthz", "/livez", "/readyz"].iter().any(|b| under(b))
}

/// kube's 401 body (`responsewriters.UnauthorizedError` via the `Unauthorized` handler).
pub fn unauthorized() -> Response {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    });
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The router's authentication layer: authenticated requests go on with their [`UserInfo`]
/// in the extensions and the `Authorization` header removed (kube-apiserver's
/// `WithAuthentication` strips it too, so nothing downstream can leak it); the rest are 401
/// unless anonymous and public.
pub async fn layer(
    State(auth): State<Arc<TokenAuthenticator>>,
    mut request: Request<Body>,
    next: Next,
) -> Response {
    match bearer(request.headers()) {
        Some(Some(token)) => match auth.authenticate(&token) {
            Some(user) => {
                let user = user.clone();
                request.headers_mut().remove(header::AUTHORIZATION);
                request.extensions_mut().insert(user);
                next.run(request).await
            }
            None => {
                tracing::debug!(path = %request.uri().path(), "an unknown bearer token refused");
                unauthorized()
            }
        },
        Some(None) => unauthorized(),
        None if public(request.method(), request.uri().path()) => next.run(request).await,
        None => unauthorized(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kube_token_files() {
        let auth = TokenAuthenticator::parse(
            "t.csv",
            "abc,alice,1,\"system:masters,dev\"\n\n def, bob ,2\n,empty,3\n",
        )
        .expect("parse");
        let alice = auth.authenticate("abc").expect("alice");
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, vec!["system:masters", "dev"]);
        // TrimLeadingSpace trims only the leading blanks, as Go's csv reader does.
        assert_eq!(auth.authenticate("def").expect("bob").name, "bob ");
        assert!(auth.authenticate("").is_none());
        assert!(auth.authenticate("abd").is_none());
        assert!(auth.authenticate("ab").is_none());
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let err = TokenFileError::to_string(
            &TokenAuthenticator::parse("t.csv", "a,b,c\njust-a-token\n").expect_err("short"),
        );
        assert!(
            err.contains("line 2") && err.contains("at least 3 columns"),
            "{err}"
        );
        let err = TokenAuthenticator::parse("t.csv", "a,b,\"c\n").expect_err("quote");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn bearer_header_forms() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().expect("header"));
            bearer(&m)
        };
        assert_eq!(bearer(&HeaderMap::new()), None);
        assert_eq!(h("Bearer abc"), Some(Some("abc".into())));
        assert_eq!(h("bearer abc"), Some(Some("abc".into())));
        // Not bearer credentials: anonymous, as kube's bearertoken authenticator says "not mine".
        assert_eq!(h(""), None);
        assert_eq!(h("  "), None);
        assert_eq!(h("Basic abc"), None);
        assert_eq!(h("Bearer"), None);
        assert_eq!(h("Bearer "), None);
        assert_eq!(h("Bearer  abc"), None);
        assert_eq!(h("Bearer a b"), Some(None));
    }

    #[test]
    fn private_files_are_0600_even_over_a_looser_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, "new").expect("write_private");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
    }

    #[test]
    fn generated_kubeconfigs_read_back() {
        let text = kubeconfig_yaml(
            "lab",
            "https://127.0.0.1:6443",
            "-----BEGIN CERTIFICATE-----\n",
            "system:node:node-1",
            "abc",
            Some("default"),
        );
        let config =
            crate::client::ClientConfig::parse_kubeconfig(&text, std::path::Path::new("."), None)
                .expect("parse");
        assert_eq!(config.server, "https://127.0.0.1:6443");
        assert_eq!(config.token.as_deref(), Some("abc"));
        assert_eq!(
            config.ca_pem.as_deref(),
            Some(&b"-----BEGIN CERTIFICATE-----\n"[..])
        );
    }

    #[test]
    fn only_health_and_version_are_public() {
        for p in [
            "/healthz",
            "/livez",
            "/readyz",
            "/readyz/ping",
            "/version",
            "/version/",
        ] {
            assert!(public(&Method::GET, p), "{p}");
        }
        for p in [
            "/api",
            "/apis",
            "/openapi/v2",
            "/healthzx",
            "/api/v1/pods",
            "/versions",
        ] {
            assert!(!public(&Method::GET, p), "{p}");
        }
        assert!(!public(&Method::POST, "/healthz"));
    }
}
