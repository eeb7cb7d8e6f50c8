//! Domain types shared by the hub, the upstream client and the service: a
//! Piclumen job's state, its images, the caller's token and the other
//! secrets of the settings. No proto, no JSON.

mod etag;

use std::{fmt, sync::Arc};

pub use etag::Etag;

/// A Piclumen account token. `Debug` and `Display` redact it, so it cannot
/// reach a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Arc<str>);

impl Token {
    /// Wraps a token; `None` when it is empty after trimming.
    pub fn new(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        (!raw.is_empty()).then(|| Self(raw.into()))
    }

    /// Checks a token the way every token is checked, whoever gives it (a
    /// caller's `authorization`, the server's default `--token`): non-empty
    /// after trimming and printable ASCII only, so it is always a valid
    /// header value and never smuggles a line break upstream.
    pub fn parse(raw: &str) -> Result<Self, TokenError> {
        let token = Self::new(raw).ok_or(TokenError::Empty)?;
        if token.0.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(token)
        } else {
            Err(TokenError::NotPrintable)
        }
    }

    /// The token itself, for the one place that must send it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Why a token was refused. Never carries the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Nothing left after trimming.
    #[error("is empty")]
    Empty,
    /// A space, a control character (a line break) or a non-ASCII one.
    #[error("holds a character other than printable ASCII (a space, a line break, ...)")]
    NotPrintable,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret setting as given (a flag's token, a URL that may carry
/// `user:password@`), not yet checked. `Debug` redacts it and there is no
/// `Display`: [`Secret::expose`] is the one way to its text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for the places that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

/// Lets settings be compared with the text they were given (in tests).
impl PartialEq<&str> for Secret {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// A status string this version does not know.
    Unknown,
    /// Queued.
    Pending,
    /// Being generated.
    Running,
    /// Done with images. Terminal.
    Succeeded,
    /// Given up. Terminal.
    Failed,
}

impl JobState {
    /// Maps Piclumen's status string; unknown strings are kept by the caller.
    pub fn from_upstream(status: &str) -> Self {
        match status {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "success" => Self::Succeeded,
            "failed" => Self::Failed,
            _ => Self::Unknown,
        }
    }

    /// True when the job will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// One generated image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Download URL.
    pub url: String,
    /// Piclumen's file name.
    pub name: String,
    /// Width in pixels.
    pub width: i32,
    /// Height in pixels.
    pub height: i32,
    /// Marked sensitive by Piclumen.
    pub nsfw: bool,
}

/// A job's state as last reported by Piclumen.
///
/// Equality is about the state, not its age: two statuses that differ only
/// in `observed_at` are equal (the same state, confirmed at another time),
/// so a watch sees a change only when the job changed.
#[derive(Debug, Clone)]
pub struct JobStatus {
    /// Piclumen's job id.
    pub mark_id: String,
    /// Mapped state.
    pub state: JobState,
    /// Queue position while pending.
    pub queue_position: i32,
    /// Images once succeeded.
    pub images: Vec<Image>,
    /// Piclumen's raw status string.
    pub upstream_status: String,
    /// Piclumen's prompt id, when known.
    pub prompt_id: String,
    /// When Piclumen last confirmed this state: the wall-clock time the
    /// reply of the status call that brought it arrived (one instant per
    /// call, the same on every replica that shares it). `None` until the
    /// hub stamps it (a freshly decoded entry), or when shared by a replica
    /// too old to say.
    pub observed_at: Option<std::time::SystemTime>,
}

impl PartialEq for JobStatus {
    fn eq(&self, other: &Self) -> bool {
        // Destructured, so a new field must be placed on one side or the
        // other of this rule.
        let Self {
            mark_id,
            state,
            queue_position,
            images,
            upstream_status,
            prompt_id,
            observed_at: _,
        } = self;
        *mark_id == other.mark_id
            && *state == other.state
            && *queue_position == other.queue_position
            && *images == other.images
            && *upstream_status == other.upstream_status
            && *prompt_id == other.prompt_id
    }
}

impl Eq for JobStatus {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_prints() {
        let token = Token::new("  secret-value ").expect("token");
        assert_eq!(token.expose(), "secret-value");
        assert!(!format!("{token:?} {token}").contains("secret"));
        assert!(Token::new("   ").is_none());
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::from("http://op:hunter2@127.0.0.1:9");
        assert_eq!(secret.expose(), "http://op:hunter2@127.0.0.1:9");
        assert_eq!(secret, "http://op:hunter2@127.0.0.1:9");
        let shown = format!("{secret:?} {:?}", Some(&secret));
        assert!(
            !shown.contains("hunter2") && !shown.contains("op:"),
            "{shown}"
        );
        assert_eq!(shown, "Secret(<redacted>) Some(Secret(<redacted>))");
    }

    #[test]
    fn tokens_are_printable_ascii() {
        assert_eq!(
            Token::parse(" ok-token\n").map(|t| t.expose().to_owned()),
            Ok("ok-token".into())
        );
        assert_eq!(Token::parse(" \t "), Err(TokenError::Empty));
        for bad in ["two words", "line\nbreak", "tab\there", "caf\u{e9}"] {
            assert_eq!(Token::parse(bad), Err(TokenError::NotPrintable), "{bad:?}");
        }
    }

    #[test]
    fn statuses_equal_by_state_whatever_their_age() {
        let status = JobStatus {
            mark_id: "m".into(),
            state: JobState::Running,
            queue_position: 0,
            images: Vec::new(),
            upstream_status: "running".into(),
            prompt_id: String::new(),
            observed_at: None,
        };
        let later = JobStatus {
            observed_at: Some(std::time::SystemTime::now()),
            ..status.clone()
        };
        assert_eq!(status, later);
        let moved = JobStatus {
            state: JobState::Succeeded,
            ..later.clone()
        };
        assert_ne!(later, moved);
    }

    #[test]
    fn states_map_and_unknown_is_kept_apart() {
        assert_eq!(JobState::from_upstream("success"), JobState::Succeeded);
        assert_eq!(JobState::from_upstream("exploded"), JobState::Unknown);
        assert!(JobState::Failed.is_terminal() && !JobState::Unknown.is_terminal());
    }
}
