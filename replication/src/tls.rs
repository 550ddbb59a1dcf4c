//! Mutual TLS for replication: both sides show a certificate from one certificate authority
//! (rustls with the ring provider, TLS 1.2 and 1.3), and a receiver tells which sender it
//! talks to by the names in the sender's certificate. [`init_certs`] makes such an
//! authority and certificates for a test or a small site; any CA whose certificates carry
//! the names works the same way.
//!
//! Files are PEM. Private keys are written 0600 and never logged.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot read {what} from {path}")]
    Read {
        /// Certificate, key or CA.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A file of certificates held none.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the configuration (a key that does not match its certificate…).
    #[error("TLS configuration refused")]
    Config(#[source] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("the CA in {path} cannot verify clients")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// A name is not a DNS name or an IP address.
    #[error("{0:?} is not a DNS name or an IP address")]
    BadName(String),
    /// Making a certificate failed.
    #[error("cannot make the certificate for {0}")]
    Generate(String, #[source] rcgen::Error),
    /// A file to write exists already.
    #[error("{0} exists; refusing to overwrite certificates or keys (choose an empty folder)")]
    Exists(PathBuf),
    /// Writing a file failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring has no post-quantum key exchange (hence the deprecation); aws-lc-rs, which has,
    // needs cmake and more of a C toolchain than these machines bring.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca, "CA certificate")? {
        roots.add(cert).map_err(TlsError::Config)?;
    }
    Ok(roots)
}

/// A receiver's TLS: its certificate and key, and the CA whose certificates senders must
/// show (a sender without one is refused in the handshake).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)?), provider())
            .build()
            .map_err(|source| TlsError::Verifier {
                path: client_ca.to_path_buf(),
                source,
            })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert, "certificate")?, read_key(key)?)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// A sender's TLS: its certificate and key, and the CA the receiver's certificate must come
/// from.
pub fn client_config(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(read_certs(cert, "certificate")?, read_key(key)?)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// The server name to check the receiver's certificate against: a DNS name or an IP.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadName(host.into()))
}

/// Whether the peer's (already verified) certificate names `client`.
pub fn names(peer: &CertificateDer<'_>, client: &str) -> bool {
    let Ok(name) = ServerName::try_from(client) else {
        return false;
    };
    webpki::EndEntityCert::try_from(peer)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The files [`init_certs`] wrote.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The CA certificate (give it to both sides).
    pub ca: PathBuf,
    /// The receiver's certificate and key.
    pub receiver: (PathBuf, PathBuf),
    /// Each sender's name, certificate and key.
    pub senders: Vec<(String, PathBuf, PathBuf)>,
}

fn san(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name
        .to_owned()
        .try_into()
        .map_err(|_| TlsError::BadName(name.into()))?;
    Ok(SanType::DnsName(dns))
}

fn params(common_name: &str, names: &[String]) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
    Ok(params)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                write_err(e)
            }
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)
}

/// Makes a CA and certificates signed by it in `dir`: `ca.pem` (and `ca.key`, 0600), the
/// receiver's `receiver.pem`/`receiver.key` valid for `receiver_names` (DNS names or IP
/// addresses), and for each sender name `sender-NAME.pem`/`sender-NAME.key` naming it.
/// Refuses to overwrite any file.
pub fn init_certs(
    dir: &Path,
    receiver_names: &[String],
    senders: &[String],
) -> Result<CertFiles, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate().map_err(|e| TlsError::Generate("the CA".into(), e))?;
    let mut ca_params = params("sealvm replication CA", &[])?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| TlsError::Generate("the CA".into(), e))?;
    let ca = dir.join("ca.pem");
    write_new(&ca, &ca_cert.pem(), 0o644)?;
    write_new(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;

    let issue = |who: &str, names: &[String], stem: &str| -> Result<(PathBuf, PathBuf), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::Generate(who.into(), e))?;
        let cert = params(who, names)?
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(|e| TlsError::Generate(who.into(), e))?;
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        write_new(&cert_path, &cert.pem(), 0o644)?;
        write_new(&key_path, &key.serialize_pem(), 0o600)?;
        Ok((cert_path, key_path))
    };
    let receiver = issue("receiver", receiver_names, "receiver")?;
    let mut issued = Vec::new();
    for name in senders {
        let (cert, key) = issue(name, std::slice::from_ref(name), &format!("sender-{name}"))?;
        issued.push((name.clone(), cert, key));
    }
    Ok(CertFiles {
        ca,
        receiver,
        senders: issued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_makes_private_keys_and_certificates_that_name_each_side() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_certs(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            &["site-a".into()],
        )
        .unwrap();
        for key in ["ca.key", "receiver.key", "sender-site-a.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let sender = read_certs(&files.senders[0].1, "certificate").unwrap();
        assert!(names(&sender[0], "site-a"));
        assert!(!names(&sender[0], "site-b"));
        server_config(&files.receiver.0, &files.receiver.1, &files.ca).unwrap();
        client_config(&files.senders[0].1, &files.senders[0].2, &files.ca).unwrap();
        assert!(matches!(
            init_certs(dir.path(), &["localhost".into()], &[]),
            Err(TlsError::Exists(_))
        ));
    }
}
