//! Which deployment a shared store's keys belong to.
//!
//! Every key and channel the service keeps in Redis (request_id records and
//! their leases, fleet polling's leases, wanted sets, job states and rounds
//! channel) starts with `piclumen-grpc:<namespace>:`, so deployments that
//! share one Redis but call different Piclumen URLs never read each other's
//! records. The namespace is derived from the upstream URL the deployment
//! calls ([`StoreNamespace::of_upstream`]), or set by `--store-namespace`.
//!
//! The derivation is part of the stored format: it must give the same name
//! in every process and every version from now on, or a rolling deploy
//! loses its records. Change it only with a new key version.

use std::{fmt, str::FromStr, sync::Arc};

use reqwest::Url;

use crate::support::hex;

/// Longest `--store-namespace`.
const MAX_LEN: usize = 64;

/// Hex characters of the upstream URL's SHA-256 kept in a derived name.
const DERIVED_LEN: usize = 16;

/// A deployment's name in the shared store: `[A-Za-z0-9._-]`, 1 to
/// [`MAX_LEN`] characters (so never a `:`, the keys' separator).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreNamespace(Arc<str>);

impl StoreNamespace {
    /// The namespace of a deployment calling Piclumen at `url`: the first
    /// 16 hex characters of the SHA-256 of the URL's normalized form
    /// ([`normalize`]). The URL itself never reaches the store: it may hold
    /// credentials.
    pub fn of_upstream(url: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, normalize(url).as_bytes());
        let mut name = hex(digest.as_ref());
        name.truncate(DERIVED_LEN);
        Self(name.into())
    }

    /// `--store-namespace` when given, else the namespace of `url`.
    pub fn resolve(explicit: Option<&Self>, url: &str) -> Self {
        explicit.cloned().unwrap_or_else(|| Self::of_upstream(url))
    }

    /// The name's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix of every key and channel in this namespace, ending in `:`.
    pub fn prefix(&self) -> String {
        format!("piclumen-grpc:{}:", self.0)
    }
}

/// What identifies the Piclumen a URL calls: scheme, host and port (the
/// scheme's default when absent) and path without trailing slashes, as the
/// client joins its paths to it. Credentials, query and fragment are left
/// out: rotating a password in the URL keeps the deployment's records. A
/// text that does not parse (never the case after the flags are checked)
/// is taken trimmed, as is.
fn normalize(url: &str) -> String {
    let url = url.trim();
    let Ok(parsed) = Url::parse(url) else {
        return url.to_owned();
    };
    let host = parsed.host_str().unwrap_or_default();
    let port = parsed
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = parsed.path().trim_end_matches('/');
    format!("{}://{host}{port}{path}", parsed.scheme())
}

impl FromStr for StoreNamespace {
    type Err = String;

    /// An operator's name: 1 to 64 characters of `[A-Za-z0-9._-]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let accepted = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if s.is_empty() || s.len() > MAX_LEN || !s.chars().all(accepted) {
            return Err(format!(
                "expected 1 to {MAX_LEN} characters of A-Z, a-z, 0-9, `.`, `_` and `-`"
            ));
        }
        Ok(Self(s.into()))
    }
}

impl fmt::Display for StoreNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_name_is_stable_across_processes_and_versions() {
        // Pinned: a change here orphans every deployment's records.
        let name = StoreNamespace::of_upstream("https://api.piclumen.com");
        assert_eq!(name.as_str().len(), 16);
        assert!(name.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        let digest = ring::digest::digest(&ring::digest::SHA256, b"https://api.piclumen.com:443");
        assert_eq!(name.as_str(), &hex(digest.as_ref())[..16]);
        assert_eq!(
            name,
            StoreNamespace::of_upstream("https://api.piclumen.com")
        );
        assert_eq!(name.prefix(), format!("piclumen-grpc:{name}:"));
    }

    #[test]
    fn spellings_of_one_url_share_a_name() {
        let name = StoreNamespace::of_upstream("https://api.piclumen.com");
        for same in [
            "https://api.piclumen.com/",
            "HTTPS://API.Piclumen.com:443",
            " https://api.piclumen.com ",
            "https://user:secret@api.piclumen.com/",
            "https://api.piclumen.com/?key=secret#top",
        ] {
            assert_eq!(StoreNamespace::of_upstream(same), name, "{same}");
        }
    }

    #[test]
    fn different_urls_get_different_names() {
        let names: std::collections::HashSet<_> = [
            "https://api.piclumen.com",
            "http://api.piclumen.com",
            "https://api.piclumen.com:8443",
            "https://other.piclumen.com",
            "https://api.piclumen.com/v2",
            "http://127.0.0.1:4001",
            "http://127.0.0.1:4002",
        ]
        .into_iter()
        .map(StoreNamespace::of_upstream)
        .collect();
        assert_eq!(names.len(), 7);
    }

    #[test]
    fn a_name_never_holds_the_url() {
        let name = StoreNamespace::of_upstream("https://user:hunter2@api.piclumen.com");
        assert!(!name.prefix().contains("hunter2"));
        assert!(!name.prefix().contains("piclumen.com"));
    }

    #[test]
    fn an_explicit_name_wins() {
        let explicit: StoreNamespace = "team-a.prod_1".parse().expect("valid");
        let url = "https://api.piclumen.com";
        assert_eq!(
            StoreNamespace::resolve(Some(&explicit), url).as_str(),
            "team-a.prod_1"
        );
        assert_eq!(
            StoreNamespace::resolve(None, url),
            StoreNamespace::of_upstream(url)
        );
    }

    #[test]
    fn explicit_names_are_checked() {
        assert_eq!(
            " shared ".parse::<StoreNamespace>().map(|n| n.to_string()),
            Ok("shared".to_owned())
        );
        assert!("a".repeat(MAX_LEN).parse::<StoreNamespace>().is_ok());
        for bad in [
            "",
            "  ",
            "a:b",
            "a b",
            "a/b",
            "é",
            "a*",
            &"a".repeat(MAX_LEN + 1),
        ] {
            let error = bad.parse::<StoreNamespace>().expect_err(bad);
            assert!(error.contains("A-Z, a-z, 0-9"), "{error}");
        }
    }
}
