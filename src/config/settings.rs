//! Flags to settings: [`ServeArgs::settings`] builds everything `serve`
//! runs with, [`SimArgs::config`] the simulator's knobs, and the value
//! parsers refuse a bad flag with its accepted range. All of it runs before
//! anything listens, so a bad setting is an error at start, never a tight
//! polling loop or a token retried for the whole failure budget.

use std::{fmt::Display, net::SocketAddr, str::FromStr, time::Duration};

use reqwest::{Url, header::HeaderValue};
use tracing_subscriber::EnvFilter;

use super::{ServeArgs, SimArgs, defaults};
use crate::{
    auth::{self, ApiKeys},
    convert::Limits,
    hub::HubConfig,
    job::{Secret, Token, TokenError},
    server::ServerConfig,
    service::ServiceConfig,
    sim::SimConfig,
    upstream::ClientConfig,
};

/// Everything `serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The gRPC address.
    pub listen: SocketAddr,
    /// The server's own settings.
    pub server: ServerConfig,
    /// The upstream client's settings. With `--simulate` the caller points
    /// `base_url` at the simulator it starts.
    pub client: ClientConfig,
    /// With `--simulate`: the built-in simulator's settings.
    pub simulator: Option<SimConfig>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the first version's HTTP API is served, if anywhere.
    pub http_listen: Option<SocketAddr>,
}

/// A setting that cannot work, found before anything listens. Messages name
/// the flag and what it accepts, never a token or the upstream URL's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `PORT` is set but not a port number.
    #[error("PORT={value:?} is not a port number (0 to 65535): {reason}")]
    Port {
        /// The variable's text.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A default token anyone reaching the port could spend.
    #[error(
        "refusing to start: a default --token on {listen} lets anyone who reaches the port \
         spend the account's credits; turn on caller authentication (--api-keys-file or \
         --tls-client-ca), listen on loopback, or pass --allow-unauthenticated"
    )]
    Exposed {
        /// The address that is not loopback.
        listen: SocketAddr,
    },
    /// The default token fails the check every caller's token passes.
    #[error(
        "--token (PICLUMEN_TOKEN) {0}; a token must be non-empty printable ASCII without spaces"
    )]
    Token(TokenError),
    /// One of the simulator's accepted tokens fails the token check.
    #[error(
        "--tokens (PICLUMEN_SIM_TOKENS): a token {0}; tokens must be printable ASCII without spaces"
    )]
    SimToken(TokenError),
    /// `--min-dimension` above `--max-dimension`.
    #[error("--min-dimension ({min}) must not exceed --max-dimension ({max})")]
    Dimensions {
        /// `--min-dimension`.
        min: i32,
        /// `--max-dimension`.
        max: i32,
    },
    /// The upstream URL is not an absolute http(s) URL. The URL itself is
    /// left out: it may hold credentials.
    #[error(
        "--upstream-url (PICLUMEN_UPSTREAM_URL) must be an absolute http:// or https:// URL: {0}"
    )]
    UpstreamUrl(String),
    /// A header sent upstream would be malformed.
    #[error("{flag} is not a valid HTTP header value (printable text, no line breaks)")]
    Header {
        /// The flag.
        flag: &'static str,
    },
    /// The API keys file cannot be read or holds no key.
    #[error("--api-keys-file (PICLUMEN_API_KEYS_FILE): {0}")]
    ApiKeys(String),
    /// A TLS file cannot be read.
    #[error("--tls-cert/--tls-key/--tls-client-ca: {0}")]
    Tls(String),
    /// A `--cors-allow-origin` value is not an origin.
    #[error("{0}")]
    Cors(String),
}

// === impl ServeArgs ===

impl ServeArgs {
    /// The server's settings from the flags (and `PORT`, the hosting
    /// platform's variable, given as `port_env`). Reads the API keys and TLS
    /// files; fails on any setting that cannot work.
    pub fn settings(&self, port_env: Option<&str>) -> Result<Settings, ConfigError> {
        let token = self
            .token
            .as_ref()
            .map(|token| Token::parse(token.expose()))
            .transpose()
            .map_err(ConfigError::Token)?;
        let listen = self.listen_addr(port_env)?;
        self.check_exposure(listen)?;
        let default_token = match token {
            Some(token) => Some(token),
            None if self.simulate => Token::parse(defaults::SIMULATOR_TOKEN).ok(),
            None => None,
        };
        if self.min_dimension > self.max_dimension {
            return Err(ConfigError::Dimensions {
                min: self.min_dimension,
                max: self.max_dimension,
            });
        }
        check_upstream_url(self.upstream_url.expose())?;
        for (flag, value) in [
            ("--user-agent", &self.user_agent),
            ("--origin", &self.origin),
            ("--referer", &self.referer),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| HeaderValue::from_str(v).is_err())
            {
                return Err(ConfigError::Header { flag });
            }
        }
        let api_keys = self
            .api_keys_file
            .as_deref()
            .map(ApiKeys::load)
            .transpose()
            .map_err(ConfigError::ApiKeys)?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                auth::server_tls(cert, key, self.tls_client_ca.as_deref())
                    .map_err(ConfigError::Tls)?,
            ),
            _ => None,
        };
        // Checked here so a bad origin stops `serve` before it listens.
        let _ = crate::server::cors_layer(&self.cors_allow_origin)
            .map_err(|e| ConfigError::Cors(e.to_string()))?;
        let server = ServerConfig {
            service: ServiceConfig {
                default_token,
                api_keys,
                limits: Limits {
                    min_dimension: self.min_dimension,
                    max_dimension: self.max_dimension,
                    max_prompt_chars: self.max_prompt_chars,
                },
                max_watch: self.max_watch,
                heartbeat: self.heartbeat,
                max_watches: self.max_watches,
                max_generates_per_token: self.max_generates_per_token,
                idempotency_ttl: self.idempotency_ttl,
                idempotency_store: self.idempotency_store.clone(),
            },
            hub: HubConfig {
                poll_interval: self.poll_interval,
                batch_max: self.batch_max.into(),
                gather: defaults::GATHER,
                failure_budget: self.failure_budget,
            },
            fleet_polling: self.fleet_polling,
            drain_timeout: self.drain_timeout,
            max_streams_per_connection: self.max_streams_per_connection,
            max_request_bytes: self.max_request_bytes,
            http2_keepalive_interval: self.http2_keepalive_interval,
            http2_keepalive_timeout: self.http2_keepalive_timeout,
            tls,
            cors_allow_origins: self.cors_allow_origin.clone(),
            max_connection_age: self.max_connection_age,
            max_connection_age_grace: self.max_connection_age_grace,
        };
        let client = ClientConfig {
            base_url: self.upstream_url.clone(),
            timeout: self.upstream_timeout,
            connect_timeout: self.upstream_connect_timeout,
            user_agent: self.user_agent.clone(),
            origin: self.origin.clone(),
            referer: self.referer.clone(),
        };
        let simulator = self.simulate.then(|| SimConfig {
            job_duration: self.sim_job_duration,
            ..SimConfig::default()
        });
        Ok(Settings {
            listen,
            server,
            client,
            simulator,
            metrics_listen: self.metrics_listen,
            http_listen: self.http_listen,
        })
    }

    /// `--listen`, else `0.0.0.0:$PORT`, else `0.0.0.0:50051`.
    pub fn listen_addr(&self, port_env: Option<&str>) -> Result<SocketAddr, ConfigError> {
        if let Some(addr) = self.listen {
            return Ok(addr);
        }
        let port = match port_env {
            Some(p) => p.trim().parse::<u16>().map_err(|e| ConfigError::Port {
                value: p.to_owned(),
                reason: e.to_string(),
            })?,
            None => defaults::PORT,
        };
        Ok(SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// Refuses a setup where anyone who reaches the port spends the
    /// account's credits: a default token on a non-loopback address with no
    /// caller authentication, unless the operator says so explicitly. The
    /// simulator's demo token costs nothing and is exempt.
    pub fn check_exposure(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        let caller_auth = self.api_keys_file.is_some() || self.tls_client_ca.is_some();
        if self.token.is_some()
            && !self.simulate
            && !listen.ip().is_loopback()
            && !caller_auth
            && !self.allow_unauthenticated
        {
            return Err(ConfigError::Exposed { listen });
        }
        Ok(())
    }
}

/// An absolute http(s) URL with a host; the error never quotes the URL.
fn check_upstream_url(url: &str) -> Result<(), ConfigError> {
    let parsed = Url::parse(url).map_err(|e| ConfigError::UpstreamUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::UpstreamUrl(format!(
            "the scheme is {:?}",
            parsed.scheme()
        )));
    }
    if parsed.host().is_none() {
        return Err(ConfigError::UpstreamUrl("it has no host".into()));
    }
    Ok(())
}

// === impl SimArgs ===

impl SimArgs {
    /// The simulator's knobs from the flags; empty tokens are dropped, and
    /// the others must pass the token check.
    pub fn config(&self) -> Result<SimConfig, ConfigError> {
        let tokens = self
            .tokens
            .iter()
            .map(Secret::expose)
            .filter(|t| !t.trim().is_empty())
            .map(Token::parse)
            .collect::<Result<_, _>>()
            .map_err(ConfigError::SimToken)?;
        Ok(SimConfig {
            job_duration: self.job_duration,
            job_jitter: self.job_jitter,
            latency: self.latency,
            fail_5xx_rate: self.fail_5xx_rate,
            fail_429_rate: self.fail_429_rate,
            tokens,
        })
    }
}

// === Value parsers ===
//
// Each error says what the flag accepts; clap puts the flag and the value in
// front: `invalid value '0s' for '--poll-interval <POLL_INTERVAL>': ...`.

/// A duration as clap's default text (`2s`, `30m`).
pub(super) fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

fn duration_from(s: &str, min: Duration, range: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; expected a duration such as 300ms, 2s or 10m; {range}"))?;
    if (min..=defaults::MAX_DURATION).contains(&value) {
        Ok(value)
    } else {
        Err(range.to_owned())
    }
}

/// A duration above zero.
pub(super) fn positive_duration(s: &str) -> Result<Duration, String> {
    let range = format!(
        "accepted range: more than 0s, up to {}",
        human(defaults::MAX_DURATION)
    );
    duration_from(s, Duration::from_nanos(1), &range)
}

/// A duration, zero included.
pub(super) fn duration_or_zero(s: &str) -> Result<Duration, String> {
    duration_at_least(s, Duration::ZERO)
}

fn duration_at_least(s: &str, min: Duration) -> Result<Duration, String> {
    let range = format!(
        "accepted range: {} to {}",
        human(min),
        human(defaults::MAX_DURATION)
    );
    duration_from(s, min, &range)
}

/// `--poll-interval`.
pub(super) fn poll_interval(s: &str) -> Result<Duration, String> {
    duration_at_least(s, defaults::MIN_POLL_INTERVAL)
}

/// `--max-connection-age`.
pub(super) fn connection_age(s: &str) -> Result<Duration, String> {
    duration_at_least(s, defaults::MIN_CONNECTION_AGE)
}

/// `--heartbeat`.
pub(super) fn heartbeat(s: &str) -> Result<Duration, String> {
    duration_at_least(s, defaults::MIN_HEARTBEAT)
}

fn number<T>(s: &str, min: T, max: Option<T>) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display,
    T::Err: Display,
{
    let range = match &max {
        Some(max) => format!("accepted range: {min} to {max}"),
        None => format!("accepted range: {min} or more"),
    };
    match s.trim().parse::<T>() {
        Ok(v) if v >= min && max.as_ref().is_none_or(|max| v <= *max) => Ok(v),
        Ok(_) => Err(range),
        Err(e) => Err(format!("{e}; {range}")),
    }
}

/// A whole number of at least 1.
pub(super) fn positive<T>(s: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display + From<u8>,
    T::Err: Display,
{
    number(s, T::from(1), None)
}

/// `--batch-max`.
pub(super) fn batch_max(s: &str) -> Result<u16, String> {
    number(s, 1, Some(defaults::MAX_BATCH))
}

/// `--max-watches`: a semaphore holds the places, and it has a ceiling.
pub(super) fn max_watches(s: &str) -> Result<usize, String> {
    number(s, 1, Some(tokio::sync::Semaphore::MAX_PERMITS))
}

/// A share from 0 to 1.
pub(super) fn rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{e}; accepted range: 0 to 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("accepted range: 0 to 1".into())
    }
}

/// `--log`: a filter the log subscriber accepts.
pub(super) fn log_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{e}; expected a filter such as info or piclumen_grpc=debug"))
}
