//! The one URL redactor: what a URL that may carry `user:password@` (the
//! upstream URL, the Redis store's URL) looks like in logs and messages.

use reqwest::Url;

/// What stands in the place of the user and password.
const MASK: &str = "***";
/// What is shown for text that is not a URL but may hold credentials.
const NOT_A_URL: &str = "(not a valid URL)";

/// `url` with any `user:password@` replaced by `***@`, for log lines: an
/// operator may put credentials in a URL, and logs are read by more people
/// than the configuration.
///
/// The text is kept as given where it can be; only when the credentials
/// are not where they usually stand (`scheme://userinfo@host`) does the
/// parsed, normalised URL stand in for it. What counts as credentials is
/// what the URL parser the clients use finds, so nothing they would send
/// as a user or password is ever shown.
pub fn redact_url(url: &str) -> String {
    let Ok(parsed) = Url::parse(url) else {
        let shown = if url.contains('@') { NOT_A_URL } else { url };
        return shown.to_owned();
    };
    if !has_credentials(&parsed) {
        return url.to_owned();
    }
    if let Some(masked) = mask_authority(url)
        && Url::parse(&masked).is_ok_and(|m| m.username() == MASK && m.password().is_none())
    {
        return masked;
    }
    let mut parsed = parsed;
    // Neither can fail: a URL with credentials can hold a user name.
    let _ = parsed.set_password(None);
    let _ = parsed.set_username(MASK);
    parsed.into()
}

fn has_credentials(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

/// The text with everything between `://` and the authority's last `@`
/// replaced by the mask; `None` when there is no such `@`.
fn mask_authority(url: &str) -> Option<String> {
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    Some(format!("{}{MASK}{}", &url[..scheme_end], &rest[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_userinfo_is_hidden() {
        for (url, shown) in [
            ("http://op:hunter2@127.0.0.1:9", "http://***@127.0.0.1:9"),
            ("https://op@h/p?q=a@b", "https://***@h/p?q=a@b"),
            (
                "redis://:hunter2@127.0.0.1:6379/2",
                "redis://***@127.0.0.1:6379/2",
            ),
            ("http://127.0.0.1:9/a@b", "http://127.0.0.1:9/a@b"),
            ("https://api.piclumen.com", "https://api.piclumen.com"),
            ("memory", "memory"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn credentials_out_of_their_usual_place_are_hidden_too() {
        for (url, shown) in [
            // The parser reads these as user `op`, password `hunter2`.
            ("http:op:hunter2@h:9", "http://***@h:9/"),
            ("http:\\\\op:hunter2@h", "http://***@h/"),
            ("http:op:hunter2@h/x://a@b", "http://***@h/x://a@b"),
            ("http://op:hun\nter2@h", "http://***@h"),
            // Not a URL, yet it may hold a password.
            ("http://op:hunter2@h:port", "(not a valid URL)"),
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains("hunter2"), "{url:?} -> {redacted}");
            assert_eq!(redacted, shown, "{url:?}");
        }
    }
}
