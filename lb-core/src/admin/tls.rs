//! TLS for the control API over TCP, the server's side: its rustls
//! configuration (optionally requiring client certificates) and the bearer
//! token compared in constant time. PEM loading and the client side are in
//! [`lb_api::tls`].

use std::path::Path;
use std::sync::Arc;

use lb_api::tls::{invalid, load_certs, load_key, provider, roots, TlsError};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

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

/// A bearer token, compared in constant time.
#[derive(Clone)]
pub struct Token(ring::digest::Digest);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads a token file (surrounding whitespace ignored; must not be
    /// empty, and must not be readable by everyone: it is a password).
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |error| TlsError::Read {
            what: "admin.token_file",
            path: path.display().to_string(),
            error,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(invalid(
                "admin.token_file",
                path,
                format!(
                    "is readable by everyone (mode {:04o}); the token is a password: chmod 0600 (or 0640 with a group)",
                    mode & 0o7777
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
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

    /// Whether an `Authorization` header value carries this token (the
    /// scheme `Bearer` in any case, as RFC 7235 says). Both sides are
    /// hashed first, so the comparison time reveals neither content nor
    /// length.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some((scheme, presented)) = header.and_then(|h| {
            let space = h.iter().position(|&b| b == b' ')?;
            Some((&h[..space], h[space + 1..].trim_ascii()))
        }) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
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
        assert!(
            t.accepts(Some(b"bearer s3cret")),
            "the scheme's case does not matter"
        );
        assert!(t.accepts(Some(b"BEARER s3cret")));
        assert!(!t.accepts(Some(b"Basic s3cret")));
        assert!(!t.accepts(Some(b"s3cret")));
        assert!(!t.accepts(None));
    }

    #[test]
    fn a_token_file_readable_by_everyone_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weir-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Token::load(&file).unwrap_err().to_string();
        assert!(e.contains("readable by everyone (mode 0644)"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Token::load(&file).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
