//! Serving the API over TLS, as kube-apiserver's secure port does.
//!
//! Bearer tokens need it: client-go (so kubectl) reads a kubeconfig's credentials only for an
//! `https` server (`clientcmd`'s `DirectClientConfig.ClientConfig`: "only try to read the auth
//! information if we are secure"), so over plain HTTP kubectl sends no token at all.
//! Without `--tls-cert-file`, a self-signed CA and a serving certificate signed by it are
//! generated, as kube-apiserver's `MaybeDefaultWithSelfSignedCerts` does
//! (`client-go/util/cert.GenerateSelfSignedCertKey`: a `<host>-ca@<time>` CA, a serving
//! certificate for the host's names and addresses, one year).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the self-signed serving certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A generated serving certificate: `cert_pem` is the chain (serving certificate, then its CA),
/// `ca_pem` what clients trust.
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// A CA and a serving certificate for `hosts` (IP addresses or DNS names) signed by it.
pub fn self_signed(hosts: &[String]) -> Result<GeneratedCert, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();
    let stamp = now.unix_timestamp();
    let first = hosts.first().cloned().unwrap_or_else(|| "kpx".into());
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("{first}-ca@{stamp}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    // An hour of slack for clocks a little behind, as client-go's generator allows.
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(365);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name
        .push(DnType::CommonName, format!("{first}@{stamp}"));
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(365);
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    Ok(GeneratedCert {
        cert_pem: format!("{}{}", cert.pem(), ca.pem()),
        key_pem: key.serialize_pem(),
        ca_pem: ca.pem(),
    })
}

/// The acceptor for a PEM certificate chain and its PEM private key.
pub fn acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: "the certificate".into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: "the certificate".into(),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: "the private key".into(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_loads() {
        let generated = self_signed(&["127.0.0.1".into(), "localhost".into()]).expect("generate");
        assert_eq!(generated.cert_pem.matches("BEGIN CERTIFICATE").count(), 2);
        acceptor(generated.cert_pem.as_bytes(), generated.key_pem.as_bytes()).expect("acceptor");
        let err = acceptor(b"junk", generated.key_pem.as_bytes())
            .err()
            .expect("junk refused");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
