//! Where and how to reach an API server: a kubeconfig file (server, CA, bearer token, client
//! certificate), the in-cluster service account, or a plain URL.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::ClientError;

/// Everything needed to build an HTTP client for one API server.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    pub server: String,
    pub ca_pem: Option<Vec<u8>>,
    pub insecure_skip_tls_verify: bool,
    pub token: Option<String>,
    /// Client certificate and key, PEM, concatenated.
    pub identity_pem: Option<Vec<u8>>,
}

impl ClientConfig {
    pub fn from_url(server: &str) -> Self {
        Self {
            server: server.trim_end_matches('/').to_string(),
            ..Default::default()
        }
    }

    /// The in-cluster configuration of a pod's service account.
    pub fn in_cluster() -> Result<Self, ClientError> {
        const DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            ClientError::config("KUBERNETES_SERVICE_HOST is not set: not running in a cluster")
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let token = read(Path::new(DIR).join("token"))?;
        Ok(Self {
            server: format!("https://{host}:{port}"),
            ca_pem: Some(read(Path::new(DIR).join("ca.crt"))?),
            token: Some(String::from_utf8_lossy(&token).trim().to_string()),
            ..Default::default()
        })
    }

    /// Reads a kubeconfig file, using `context` or its current context.
    pub fn from_kubeconfig(path: &Path, context: Option<&str>) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::config(format!("reading kubeconfig {}: {e}", path.display()))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse_kubeconfig(&text, dir, context)
            .map_err(|e| ClientError::config(format!("kubeconfig {}: {e}", path.display())))
    }

    /// Parses kubeconfig text; relative file paths in it are relative to `dir`.
    pub fn parse_kubeconfig(text: &str, dir: &Path, context: Option<&str>) -> Result<Self, String> {
        let file: Kubeconfig =
            serde_yaml::from_str(text).map_err(|e| format!("not a valid kubeconfig: {e}"))?;
        let context_name = context
            .map(String::from)
            .or(file.current_context.clone())
            .filter(|c| !c.is_empty())
            .ok_or("no context given and no current-context set")?;
        let ctx = file
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .map(|c| &c.context)
            .ok_or_else(|| format!("context {context_name:?} not found"))?;
        let cluster = file
            .clusters
            .iter()
            .find(|c| c.name == ctx.cluster)
            .map(|c| &c.cluster)
            .ok_or_else(|| {
                format!(
                    "cluster {:?} (of context {context_name:?}) not found",
                    ctx.cluster
                )
            })?;
        let user = match &ctx.user {
            Some(name) if !name.is_empty() => file
                .users
                .iter()
                .find(|u| &u.name == name)
                .map(|u| u.user.clone())
                .ok_or_else(|| format!("user {name:?} (of context {context_name:?}) not found"))?,
            _ => User::default(),
        };
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        let data_or_file = |data: &Option<String>,
                            file: &Option<String>,
                            what: &str|
         -> Result<Option<Vec<u8>>, String> {
            if let Some(data) = data {
                return base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map(Some)
                    .map_err(|e| format!("{what}-data is not valid base64: {e}"));
            }
            match file {
                Some(f) => std::fs::read(resolve(f))
                    .map(Some)
                    .map_err(|e| format!("reading {what} {f}: {e}")),
                None => Ok(None),
            }
        };
        let ca_pem = data_or_file(
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
            "certificate-authority",
        )?;
        let cert = data_or_file(
            &user.client_certificate_data,
            &user.client_certificate,
            "client-certificate",
        )?;
        let key = data_or_file(&user.client_key_data, &user.client_key, "client-key")?;
        let identity_pem = match (cert, key) {
            (Some(mut cert), Some(key)) => {
                cert.push(b'\n');
                cert.extend_from_slice(&key);
                Some(cert)
            }
            (None, None) => None,
            _ => return Err("client-certificate and client-key must be given together".into()),
        };
        let token = match (&user.token, &user.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(resolve(f))
                    .map_err(|e| format!("reading tokenFile {f}: {e}"))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if cluster.server.is_empty() {
            return Err(format!("cluster {:?} has no server", ctx.cluster));
        }
        Ok(Self {
            server: cluster.server.trim_end_matches('/').to_string(),
            ca_pem,
            insecure_skip_tls_verify: cluster.insecure_skip_tls_verify,
            token,
            identity_pem,
        })
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(&path)
        .map_err(|e| ClientError::config(format!("reading {}: {e}", path.display())))
}

#[derive(Debug, Deserialize)]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    #[serde(default)]
    server: String,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Debug, Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_token_and_inline_ca() {
        let text = r#"
apiVersion: v1
kind: Config
current-context: b
clusters:
- name: one
  cluster: {server: "https://10.0.0.1:6443/", certificate-authority-data: "Q0E="}
contexts:
- {name: a, context: {cluster: missing}}
- {name: b, context: {cluster: one, user: me}}
users:
- {name: me, user: {token: abc}}
"#;
        let c = ClientConfig::parse_kubeconfig(text, Path::new("/"), None).expect("parse");
        assert_eq!(c.server, "https://10.0.0.1:6443");
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.ca_pem.as_deref(), Some(&b"CA"[..]));
        let err = ClientConfig::parse_kubeconfig(text, Path::new("/"), Some("a"))
            .expect_err("must be refused");
        assert!(err.contains("cluster \"missing\""), "{err}");
    }
}
