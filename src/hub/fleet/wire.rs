//! What replicas tell each other through the shared store: a round's
//! answers (job states, unknown jobs, unreadable entries, a refusal), a
//! pause, an outage. JSON mirrors of the hub's types, so the hub's own types
//! stay free of serde; a value that does not decode is dropped by the reader.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    hub::HubError,
    job::{Image, JobState, JobStatus},
    upstream::UpstreamError,
};

/// One published round of one token: the answers of one status call, or a
/// pause or an outage of the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// The token's key (a hash, never the token).
    pub key: String,
    /// The replica that published it (its own rounds are ignored).
    pub from: String,
    /// One answer per id of the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    /// The token is paused for this long from now (a 429 or other trouble):
    /// every replica holds its calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// The trouble outlasted the failure budget: every watch of the token
    /// ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage: Option<Outage>,
}

/// A fleet-wide pause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    /// Milliseconds left.
    pub ms: u64,
    /// Its cause, for checks asked meanwhile.
    pub cause: WireError,
}

/// A fleet-wide outage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    /// The failure budget, in milliseconds.
    pub budget_ms: u64,
    /// The last failure.
    pub last: WireError,
}

/// One job's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The mark id.
    pub id: String,
    /// Its state; absent with no error: the token has no such job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WireStatus>,
    /// Why there is no state (an unreadable entry, a refused call); with
    /// `hub`, the upstream error it carries (an outage's last one), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
    /// A failure of the hub rather than of Piclumen (an internal error, an
    /// outage): replicas that know this field read it in preference to
    /// `error`, which older replicas read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<WireHubError>,
}

/// A hub failure on the wire: the [`HubError`]s that are not Piclumen's
/// own answer, so they reach the other replicas with their own class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireHubError {
    /// [`HubError::Internal`].
    Internal,
    /// [`HubError::Stopped`].
    Stopped,
    /// [`HubError::DeadlineExceeded`].
    DeadlineExceeded,
    /// [`HubError::Outage`]; its last error is the entry's `error`.
    Outage {
        /// The failure budget, in milliseconds.
        budget_ms: u64,
    },
}

impl Entry {
    /// The entry of an outcome.
    pub fn of(id: &str, outcome: &Result<JobStatus, HubError>) -> Self {
        let (status, error, hub) = match outcome {
            Ok(status) => (Some(WireStatus::from(status)), None, None),
            Err(HubError::NotFound { .. }) => (None, None, None),
            Err(HubError::Upstream(e)) => (None, Some(WireError::from(e)), None),
            Err(HubError::Outage { budget, last }) => (
                None,
                Some(WireError::from(last)),
                Some(WireHubError::Outage {
                    budget_ms: ms(*budget),
                }),
            ),
            Err(other) => {
                let hub = match other {
                    HubError::Stopped => WireHubError::Stopped,
                    HubError::DeadlineExceeded => WireHubError::DeadlineExceeded,
                    _ => WireHubError::Internal,
                };
                // What replicas without `hub` read, as they always did.
                let message = other.to_string();
                (None, Some(WireError::Other { message }), Some(hub))
            }
        };
        Self {
            id: id.to_owned(),
            status,
            error,
            hub,
        }
    }

    /// The outcome it stands for.
    pub fn outcome(&self) -> Result<JobStatus, HubError> {
        if let Some(status) = &self.status {
            return Ok(status.clone().into_status(&self.id));
        }
        let upstream = || self.error.clone().map(UpstreamError::from);
        Err(match (self.hub, upstream()) {
            (Some(WireHubError::Outage { budget_ms }), Some(last)) => HubError::Outage {
                budget: Duration::from_millis(budget_ms),
                last,
            },
            (Some(WireHubError::Stopped), _) => HubError::Stopped,
            (Some(WireHubError::DeadlineExceeded), _) => HubError::DeadlineExceeded,
            (Some(_), _) => HubError::Internal,
            (None, Some(error)) => HubError::Upstream(error),
            (None, None) => HubError::NotFound {
                mark_id: self.id.clone(),
            },
        })
    }

    /// True when the job will not change any more (or its watch ends).
    pub fn is_final(&self) -> bool {
        self.status.as_ref().is_none_or(|s| s.state.is_terminal())
    }
}

/// A job's state on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireStatus {
    state: WireState,
    #[serde(default)]
    queue_position: i32,
    #[serde(default)]
    images: Vec<WireImage>,
    #[serde(default)]
    upstream_status: String,
    #[serde(default)]
    prompt_id: String,
    /// When Piclumen confirmed it, in unix milliseconds (absent from older
    /// replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    observed_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireState {
    Unknown,
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl WireState {
    fn is_terminal(self) -> bool {
        JobState::from(self).is_terminal()
    }
}

impl From<WireState> for JobState {
    fn from(s: WireState) -> Self {
        match s {
            WireState::Unknown => Self::Unknown,
            WireState::Pending => Self::Pending,
            WireState::Running => Self::Running,
            WireState::Succeeded => Self::Succeeded,
            WireState::Failed => Self::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WireImage {
    url: String,
    name: String,
    width: i32,
    height: i32,
    nsfw: bool,
}

impl From<&JobStatus> for WireStatus {
    fn from(s: &JobStatus) -> Self {
        let state = match s.state {
            JobState::Unknown => WireState::Unknown,
            JobState::Pending => WireState::Pending,
            JobState::Running => WireState::Running,
            JobState::Succeeded => WireState::Succeeded,
            JobState::Failed => WireState::Failed,
        };
        Self {
            state,
            queue_position: s.queue_position,
            images: s
                .images
                .iter()
                .map(|i| WireImage {
                    url: i.url.clone(),
                    name: i.name.clone(),
                    width: i.width,
                    height: i.height,
                    nsfw: i.nsfw,
                })
                .collect(),
            upstream_status: s.upstream_status.clone(),
            prompt_id: s.prompt_id.clone(),
            observed_at_ms: s.observed_at.and_then(unix_ms),
        }
    }
}

impl WireStatus {
    fn into_status(self, id: &str) -> JobStatus {
        JobStatus {
            mark_id: id.to_owned(),
            state: self.state.into(),
            queue_position: self.queue_position,
            images: self
                .images
                .into_iter()
                .map(|i| Image {
                    url: i.url,
                    name: i.name,
                    width: i.width,
                    height: i.height,
                    nsfw: i.nsfw,
                })
                .collect(),
            upstream_status: self.upstream_status,
            prompt_id: self.prompt_id,
            observed_at: self.observed_at_ms.map(from_unix_ms),
        }
    }
}

/// An upstream error on the wire (details of transport failures are left
/// in the log of the replica that saw them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    /// HTTP 401.
    Unauthorized,
    /// HTTP 403.
    Forbidden,
    /// HTTP 429.
    RateLimited {
        /// `Retry-After`, in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// Another HTTP status.
    Http {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// No connection could be made.
    Connect,
    /// The reply broke off.
    Interrupted,
    /// No reply in time.
    Timeout {
        /// The bound, in milliseconds.
        ms: u64,
    },
    /// A refusal in the envelope.
    Rejected {
        /// Envelope status.
        code: i64,
        /// Envelope message.
        message: String,
    },
    /// An unreadable reply or entry.
    Decode {
        /// What serde said.
        error: String,
        /// The start of the text.
        body: String,
    },
    /// Anything else (a request that could not be built, a failed task).
    Other {
        /// What happened.
        message: String,
    },
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `at` in unix milliseconds; `None` before 1970.
pub fn unix_ms(at: SystemTime) -> Option<u64> {
    at.duration_since(UNIX_EPOCH).ok().map(ms)
}

/// The wall-clock time now, to the millisecond the wire carries: an
/// instant stamped with it reads the same on every replica.
pub fn now_ms() -> SystemTime {
    unix_ms(SystemTime::now()).map_or(UNIX_EPOCH, from_unix_ms)
}

/// The instant `ms` unix milliseconds stand for.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl From<&UpstreamError> for WireError {
    fn from(e: &UpstreamError) -> Self {
        match e {
            UpstreamError::Unauthorized => Self::Unauthorized,
            UpstreamError::Forbidden => Self::Forbidden,
            UpstreamError::RateLimited { retry_after } => Self::RateLimited {
                retry_after_ms: retry_after.map(ms),
            },
            UpstreamError::Http { status, body } => Self::Http {
                status: *status,
                body: body.clone(),
            },
            UpstreamError::Build { .. } => Self::Other {
                message: e.to_string(),
            },
            UpstreamError::Connect { .. } => Self::Connect,
            UpstreamError::Interrupted { .. } => Self::Interrupted,
            UpstreamError::Timeout(d) => Self::Timeout { ms: ms(*d) },
            UpstreamError::Rejected { code, message } => Self::Rejected {
                code: *code,
                message: message.clone(),
            },
            UpstreamError::Decode { error, body } => Self::Decode {
                error: error.clone(),
                body: body.clone(),
            },
        }
    }
}

impl From<WireError> for UpstreamError {
    fn from(e: WireError) -> Self {
        let elsewhere = || "reported by another replica".to_owned();
        match e {
            WireError::Unauthorized => Self::Unauthorized,
            WireError::Forbidden => Self::Forbidden,
            WireError::RateLimited { retry_after_ms } => Self::RateLimited {
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            WireError::Http { status, body } => Self::Http { status, body },
            WireError::Connect => Self::Connect {
                detail: elsewhere(),
            },
            WireError::Interrupted => Self::Interrupted {
                detail: elsewhere(),
            },
            WireError::Timeout { ms } => Self::Timeout(Duration::from_millis(ms)),
            WireError::Rejected { code, message } => Self::Rejected { code, message },
            WireError::Decode { error, body } => Self::Decode { error, body },
            WireError::Other { message } => Self::Build { detail: message },
        }
    }
}

/// A round ready to publish, encoded once.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The round.
    pub round: Arc<Round>,
    /// Its JSON.
    pub json: String,
    /// Each entry's JSON, by id, for the per-job state keys.
    pub entries: Vec<(String, String)>,
}

impl Encoded {
    /// Encodes `round` (serialising these types cannot fail).
    pub fn new(round: Round) -> Self {
        let json = serde_json::to_string(&round).unwrap_or_default();
        let entries = round
            .entries
            .iter()
            .map(|e| (e.id.clone(), serde_json::to_string(e).unwrap_or_default()))
            .collect();
        Self {
            round: Arc::new(round),
            json,
            entries,
        }
    }
}
