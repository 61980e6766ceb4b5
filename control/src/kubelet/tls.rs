//! The kubelet API's serving certificate, as the kubelet chooses it
//! (`cmd/kubelet/app/server.go` `InitializeTLS`): `--tls-cert-file` and
//! `--tls-private-key-file` when given; otherwise `kubelet.crt` and `kubelet.key` in
//! `--cert-dir`, generated self-signed on first start (`certutil.GenerateSelfSignedCertKey`:
//! a CA and a serving certificate signed by it, the file holding both) and reused after. Unlike
//! upstream, which writes the certificate 0644, both files are written 0600 (the directory
//! 0700): nothing else on the node needs them.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tokio_rustls::TlsAcceptor;

use crate::apiserver::auth::write_private;
use crate::apiserver::tls::{acceptor, self_signed, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error("{0}")]
    Flags(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Tls { path: PathBuf, source: TlsError },
}

/// Where the serving certificate came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--tls-cert-file`/`--tls-private-key-file`.
    Files,
    /// A self-signed pair in the cert dir, written by an earlier start.
    Reused,
    /// Generated now into the cert dir.
    Generated,
}

/// The serving certificate and key file names in the cert dir (kubelet's).
pub const CERT_FILE: &str = "kubelet.crt";
pub const KEY_FILE: &str = "kubelet.key";

/// The TLS acceptor for the kubelet API. `hosts` (IP addresses or DNS names: the node's name
/// and addresses) go into a generated certificate; upstream puts only the host name there, the
/// addresses are added so that an API server with `--kubelet-certificate-authority` can verify
/// the kubelet it reaches at the node's InternalIP.
pub fn serving_acceptor(
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    cert_dir: &Path,
    hosts: &[String],
) -> Result<(TlsAcceptor, Origin), ServingCertError> {
    let (cert_path, key_path, origin) = match (cert_file, key_file) {
        (Some(cert), Some(key)) => (cert.to_path_buf(), key.to_path_buf(), Origin::Files),
        (None, None) => {
            let cert = cert_dir.join(CERT_FILE);
            let key = cert_dir.join(KEY_FILE);
            // Upstream's `canReadCertAndKey`: an existing pair is kept across restarts.
            if cert.is_file() && key.is_file() {
                (cert, key, Origin::Reused)
            } else {
                generate(cert_dir, &cert, &key, hosts)?;
                (cert, key, Origin::Generated)
            }
        }
        (cert, key) => {
            return Err(ServingCertError::Flags(format!(
                "--tls-cert-file {:?} and --tls-private-key-file {:?}: give both or neither \
                 (neither: a self-signed certificate in --cert-dir)",
                cert.map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
                key.map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
            )))
        }
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServingCertError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
    let acceptor = acceptor(&cert_pem, &key_pem).map_err(|source| ServingCertError::Tls {
        path: cert_path.clone(),
        source,
    })?;
    Ok((acceptor, origin))
}

fn generate(dir: &Path, cert: &Path, key: &Path, hosts: &[String]) -> Result<(), ServingCertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServingCertError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let generated = self_signed(hosts).map_err(|source| ServingCertError::Tls {
        path: cert.to_path_buf(),
        source,
    })?;
    // The key first: a crash in between leaves no certificate without its key, which the
    // next start would try to reuse.
    write_private(key, &generated.key_pem).map_err(io(key))?;
    write_private(cert, &generated.cert_pem).map_err(io(cert))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let hosts = vec!["node-1".to_string(), "198.18.0.2".to_string()];
        let (_, origin) = serving_acceptor(None, None, &pki, &hosts).expect("generate");
        assert_eq!(origin, Origin::Generated);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&pki), 0o700);
        assert_eq!(mode(&pki.join(CERT_FILE)), 0o600);
        assert_eq!(mode(&pki.join(KEY_FILE)), 0o600);
        let first = std::fs::read(pki.join(CERT_FILE)).expect("read");
        let (_, origin) = serving_acceptor(None, None, &pki, &hosts).expect("reuse");
        assert_eq!(origin, Origin::Reused);
        assert_eq!(std::fs::read(pki.join(CERT_FILE)).expect("read"), first);
        // Given files are used as they are.
        let (_, origin) = serving_acceptor(
            Some(&pki.join(CERT_FILE)),
            Some(&pki.join(KEY_FILE)),
            dir.path(),
            &hosts,
        )
        .expect("files");
        assert_eq!(origin, Origin::Files);
    }

    #[test]
    fn bad_flags_and_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("c.pem");
        let err = serving_acceptor(Some(&cert), None, dir.path(), &[])
            .err()
            .expect("one of two refused");
        assert!(err.to_string().contains("--tls-private-key-file"), "{err}");
        let err = serving_acceptor(Some(&cert), Some(&cert), dir.path(), &[])
            .err()
            .expect("missing refused");
        assert!(err.to_string().contains("c.pem"), "{err}");
        std::fs::write(&cert, "junk").expect("write");
        let err = serving_acceptor(Some(&cert), Some(&cert), dir.path(), &[])
            .err()
            .expect("junk refused");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
