//! Domain types shared by the hub, the upstream client and the service: a
//! Piclumen job's state, its images, and the caller's token. No proto, no JSON.

use std::{fmt, sync::Arc};

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

    /// The token itself, for the one place that must send it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

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
    fn states_map_and_unknown_is_kept_apart() {
        assert_eq!(JobState::from_upstream("success"), JobState::Succeeded);
        assert_eq!(JobState::from_upstream("exploded"), JobState::Unknown);
        assert!(JobState::Failed.is_terminal() && !JobState::Unknown.is_terminal());
    }
}
