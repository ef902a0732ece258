//! TLS for the control API over TCP (rustls with the `ring` provider),
//! as clients and the server share it: loading PEM files (every error
//! names the setting and the file), a root store from a CA file, and the
//! client configuration for `lbd status --url` and `lb-controller`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what} {path}: {error}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A file held no usable PEM item.
    #[error("{what} {path}: {message}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A [`TlsError::Invalid`] for setting `what` read from `path`.
pub fn invalid(what: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// A PEM file that could not be read or parsed: an unreadable file is a
/// read error, anything else names what is wrong with the content.
fn pem_error(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(error) => TlsError::Read {
            what,
            path: path.display().to_string(),
            error,
        },
        e => invalid(what, path, e.to_string()),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            invalid(what, path, "no PEM private key found")
        }
        e => pem_error(what, path, e),
    })
}

/// A root store of every certificate in a PEM file.
pub fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        store
            .add(cert)
            .map_err(|e| invalid(what, path, e.to_string()))?;
    }
    Ok(store)
}

/// The crypto provider every TLS configuration here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting `ca`, optionally presenting `cert`/`key`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots("--ca", ca)?);
    let mut config = match identity {
        Some((cert, key)) => {
            builder.with_client_auth_cert(load_certs("--cert", cert)?, load_key("--key", key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
