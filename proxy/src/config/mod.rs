//! kube-proxy's configuration: its flags, its `KubeProxyConfiguration` file, and the table of
//! proxy modes, resolved once into [`Settings`] that the binary starts a backend from.
//!
//! - [`flags`]: the kube-proxy flags kpx has (clap), and kpx's own backend flags.
//! - [`file`]: the `kubeproxy.config.k8s.io/v1alpha1` file (serde), and which of its fields
//!   kpx accepts without acting on them.
//! - [`settings`]: defaults, then the file, then each flag given on the command line.
//! - [`mode`]: `ProxyMode` and `MODES`, the one place a mode is added.
//! - [`start`]: one small function per backend from settings to a running backend.

pub mod file;
pub mod flags;
pub mod mode;
pub mod net;
pub mod settings;
pub mod start;

pub use file::KubeProxyConfiguration;
pub use flags::{IpvsFlags, KpxFlags, KubeProxyFlags};
pub use mode::{ProxyMode, MODES};
pub use net::{ClusterCidrs, NodePortAddress, NodePortAddresses};
pub use settings::Settings;

/// A configuration that cannot be used; nothing has been changed when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a KubeProxyConfiguration kpx can read (serde names the field).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A field or flag with a value kpx cannot use: `{field} {value:?}: {why}`.
    #[error("{field} {value:?}: {why}")]
    Invalid {
        field: String,
        value: String,
        why: String,
    },
}

impl ConfigError {
    fn invalid(field: &str, value: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_string(),
            value: value.into(),
            why: why.into(),
        }
    }
}

#[cfg(test)]
mod tests;
