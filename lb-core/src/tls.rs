//! TLS for the control API over TCP (rustls with the `ring` provider):
//! loading PEM files, the server configuration (optionally requiring client
//! certificates), the client configuration for `lbd status --url`, and the
//! bearer token compared in constant time.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
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

fn open(what: &'static str, path: &Path) -> Result<BufReader<std::fs::File>, TlsError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            what,
            path: path.display().to_string(),
            source,
        })
}

fn invalid(what: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(what, path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(what, path, e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(what, path)?)
        .map_err(|e| invalid(what, path, e.to_string()))?
        .ok_or_else(|| invalid(what, path, "no PEM private key found"))
}

fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        store
            .add(cert)
            .map_err(|e| invalid(what, path, e.to_string()))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration: `cert` chain and `key`; with `client_ca`,
/// clients must present a certificate it signed.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("admin.client_ca", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| invalid("admin.client_ca", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(
        load_certs("admin.tls_cert", cert)?,
        load_key("admin.tls_key", key)?,
    )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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

/// A bearer token, compared in constant time.
#[derive(Clone)]
pub struct Token(ring::digest::Digest);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads a token file (surrounding whitespace ignored; must not be empty).
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            what: "admin.token_file",
            path: path.display().to_string(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(invalid("admin.token_file", path, "the token is empty"));
        }
        Ok(Self::new(token))
    }

    /// A token from its text.
    pub fn new(token: &str) -> Self {
        Self(ring::digest::digest(
            &ring::digest::SHA256,
            token.as_bytes(),
        ))
    }

    /// Whether an `Authorization` header value carries this token. Both
    /// sides are hashed first, so the comparison time reveals neither
    /// content nor length.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let theirs = ring::digest::digest(&ring::digest::SHA256, presented);
        let diff = self
            .0
            .as_ref()
            .iter()
            .zip(theirs.as_ref())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn token_checks() {
        let t = Token::new("s3cret");
        assert!(t.accepts(Some(b"Bearer s3cret")));
        assert!(!t.accepts(Some(b"Bearer s3cre")));
        assert!(!t.accepts(Some(b"Bearer s3crett")));
        assert!(!t.accepts(Some(b"bearer s3cret")));
        assert!(!t.accepts(Some(b"s3cret")));
        assert!(!t.accepts(None));
    }
}
