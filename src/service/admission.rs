//! Who may call and with which Piclumen token: the caller's credentials as
//! plain inputs (read from gRPC metadata or from an HTTP request alike), the
//! token rules, and the bounded set of WatchImage slots.

use std::{fmt, sync::Arc};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    auth::ApiKeys,
    callers::{Caller, CallerGate},
    error::Error,
    hub::HubError,
    job::Token,
    upstream::UpstreamError,
};

/// Where the caller's Piclumen token comes from.
#[derive(Clone, Copy, Default)]
pub enum TokenInput<'a> {
    /// None sent: the server's default token, if it has one.
    #[default]
    Absent,
    /// An `authorization` value: `Bearer <token>` or the bare token.
    Authorization(&'a [u8]),
    /// The bare token (the first version's `authorization_token` query
    /// parameter).
    Bare(&'a str),
}

/// What a caller presents. `Debug` shows only what was sent, never a value.
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The Piclumen token.
    pub token: TokenInput<'a>,
    /// The `x-api-key` value, when sent.
    pub api_key: Option<&'a [u8]>,
    /// The DER of the client certificate the TLS layer verified (mutual
    /// TLS), when there is one.
    pub peer_cert: Option<&'a [u8]>,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match self.token {
            TokenInput::Absent => "absent",
            TokenInput::Authorization(_) => "authorization (redacted)",
            TokenInput::Bare(_) => "bare (redacted)",
        };
        f.debug_struct("Credentials")
            .field("token", &token)
            .field("api_key", &self.api_key.map(|_| "redacted"))
            .field("peer_cert", &self.peer_cert.is_some())
            .finish()
    }
}

impl fmt::Debug for TokenInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Absent => "Absent",
            Self::Authorization(_) => "Authorization(<redacted>)",
            Self::Bare(_) => "Bare(<redacted>)",
        })
    }
}

/// Checks the API key (when the server requires one) and resolves the
/// token: the caller's own, or the server's default when none was sent.
#[cfg(test)]
pub(super) fn resolve(
    api_keys: Option<&ApiKeys>,
    default_token: Option<&Token>,
    credentials: &Credentials<'_>,
) -> Result<CallToken, Error> {
    resolve_caller(api_keys, &CallerGate::default(), default_token, credentials)
}

/// Identifies the caller (a named one of `--callers-file`, or one holding
/// a key of `--api-keys-file`) and resolves the token: the caller's own,
/// else a named caller's `token`, else the server's default.
pub(super) fn resolve_caller(
    api_keys: Option<&ApiKeys>,
    callers: &CallerGate,
    default_token: Option<&Token>,
    credentials: &Credentials<'_>,
) -> Result<CallToken, Error> {
    let caller = callers.admit(api_keys, credentials.api_key, credentials.peer_cert)?;
    if let Some(caller) = &caller {
        crate::callers::record_caller(&caller.name);
    }
    let token = match credentials.token {
        TokenInput::Absent => {
            let own = caller.as_ref().and_then(|c| c.token.clone());
            return own
                .or_else(|| default_token.cloned())
                .map(|token| CallToken {
                    token,
                    // A caller's own token from the file is the operator's
                    // to fix, like the default one.
                    is_default: true,
                    caller,
                })
                .ok_or(Error::MissingToken);
        }
        TokenInput::Authorization(value) => {
            let raw = visible_ascii(value)?.trim();
            match raw.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest,
                // `Bearer ` with its space trimmed away by the transport.
                _ if raw.eq_ignore_ascii_case("bearer") => "",
                _ => raw,
            }
        }
        TokenInput::Bare(raw) => visible_ascii(raw.as_bytes())?,
    };
    Ok(CallToken {
        token: Token::parse(token).map_err(|_| Error::MalformedToken)?,
        is_default: false,
        caller,
    })
}

/// The value as text when it is visible ASCII (or tabs), as a header value
/// must be to be read as text.
fn visible_ascii(value: &[u8]) -> Result<&str, Error> {
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return Err(Error::MalformedToken);
    }
    std::str::from_utf8(value).map_err(|_| Error::MalformedToken)
}

/// The token a call runs with, and whether it is the server's own.
#[derive(Debug, Clone)]
pub(super) struct CallToken {
    pub(super) token: Token,
    pub(super) is_default: bool,
    /// The named caller, when the callers file knows it.
    pub(super) caller: Option<Arc<Caller>>,
}

impl CallToken {
    /// The hub's error as this call's: an auth failure of the default
    /// token is the operator's, not the caller's.
    pub(super) fn hub_error(&self, error: HubError) -> Error {
        match error {
            HubError::NotFound { mark_id } => Error::NotFound { mark_id },
            HubError::Upstream(source) => upstream_error(source, self.is_default),
            HubError::Outage { budget, last } => Error::UpstreamOutage { budget, last },
            HubError::DeadlineExceeded => caller_deadline_passed(),
            HubError::Stopped => Error::ShuttingDown,
            HubError::Internal => Error::Internal,
        }
    }
}

/// An upstream failure as a call's error: a timeout cut short by the
/// caller's own deadline is reported as such.
pub(super) fn create_error(
    source: UpstreamError,
    default_token: bool,
    deadline: Option<Instant>,
) -> Error {
    match source {
        UpstreamError::Timeout(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
            caller_deadline_passed()
        }
        source => upstream_error(source, default_token),
    }
}

fn upstream_error(source: UpstreamError, default_token: bool) -> Error {
    Error::Upstream {
        source,
        default_token,
    }
}

fn caller_deadline_passed() -> Error {
    Error::DeadlineExceeded("the caller's deadline ran out before Piclumen answered".into())
}

/// The watches one server holds at once (`--max-watches`): WatchImage
/// streams, WatchImages jobs and waiting checks.
#[derive(Debug)]
pub(super) struct WatchSlots {
    limit: usize,
    slots: Arc<Semaphore>,
}

impl WatchSlots {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            slots: Arc::new(Semaphore::new(limit)),
        }
    }

    /// One slot, held by the stream until it ends; RESOURCE_EXHAUSTED when
    /// all are taken.
    pub(super) fn take(&self) -> Result<OwnedSemaphorePermit, Error> {
        Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "this server already holds its limit of {} watches; retry later or elsewhere",
                self.limit
            ))
        })
    }

    /// `n` slots at once, or none: RESOURCE_EXHAUSTED when fewer are free.
    pub(super) fn take_many(&self, n: usize) -> Result<OwnedSemaphorePermit, Error> {
        let exhausted = || {
            Error::ResourceExhausted(format!(
                "this server has {} of its {} watches free, fewer than the {n} jobs asked; \
                 retry later or elsewhere, or with fewer ids",
                self.slots.available_permits(),
                self.limit
            ))
        };
        let n = u32::try_from(n).map_err(|_| exhausted())?;
        Arc::clone(&self.slots)
            .try_acquire_many_owned(n)
            .map_err(|_| exhausted())
    }
}
