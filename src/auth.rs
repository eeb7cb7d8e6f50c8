//! Caller authentication, separate from the Piclumen token: API keys sent as
//! `x-api-key` metadata, compared in constant time, and the TLS settings
//! (server certificate, optional client CA for mutual TLS).

use std::{fmt, path::Path, sync::Arc};

use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::Error;

/// The metadata key callers put their API key in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The accepted API keys. `Debug` shows only how many there are.
#[derive(Clone)]
pub struct ApiKeys(Arc<[Vec<u8>]>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys, redacted)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys from text: one per line; blank lines and `#` comments skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err("the API keys file holds no key".into());
        }
        Ok(Self(keys.into()))
    }

    /// Reads the keys file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
        Self::parse(&text)
    }

    /// Checks a caller's key against every accepted key without an early
    /// exit, so timing tells nothing about which bytes matched.
    pub fn check(&self, given: Option<&[u8]>) -> Result<(), Error> {
        let given = given.ok_or(Error::ApiKeyMissing)?;
        let matched = self.0.iter().fold(subtle::Choice::from(0), |acc, key| {
            acc | key.as_slice().ct_eq(given)
        });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Error::ApiKeyInvalid)
        }
    }
}

/// Builds the server's TLS settings from PEM files; with `client_ca`,
/// callers must present a certificate it signed (mutual TLS).
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_check() {
        let keys = ApiKeys::parse("# ops\nkey-one\n\n  key-two  \n").expect("keys");
        assert!(keys.check(Some(b"key-one")).is_ok());
        assert!(keys.check(Some(b"key-two")).is_ok());
        assert_eq!(keys.check(Some(b"key-on")), Err(Error::ApiKeyInvalid));
        assert_eq!(keys.check(None), Err(Error::ApiKeyMissing));
        assert!(!format!("{keys:?}").contains("key-one"));
        assert!(ApiKeys::parse("# nothing\n").is_err());
    }
}
