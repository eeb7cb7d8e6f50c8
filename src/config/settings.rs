//! Flags to settings: [`ServeArgs::settings`] checks what depends on
//! several flags, reads the API keys, callers and TLS files and fills the settings
//! that are not flags; [`SimArgs::config`] checks the simulator's tokens.
//! All of it runs before anything listens, so a bad setting is an error at
//! start, never a tight polling loop or a token retried for the whole
//! failure budget.

use std::net::SocketAddr;

use reqwest::{Url, header::HeaderValue};
use tonic::transport::ServerTlsConfig;

use super::{ServeArgs, SimArgs};
use crate::{
    auth::{self, ApiKeys},
    job::{Secret, Token, TokenError},
    server::{CorsPolicy, ServerConfig, defaults::PORT},
    sim::{SimConfig, defaults::SIMULATOR_TOKEN},
    upstream::ClientConfig,
    upstream::Limits,
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
    /// The callers file cannot be read or does not parse.
    #[error("--callers-file (PICLUMEN_CALLERS_FILE): {0}")]
    Callers(String),
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
        let mut server = self.server.clone();
        server.service.default_token = match token {
            Some(token) => Some(token),
            None if self.simulate => Token::parse(SIMULATOR_TOKEN).ok(),
            None => None,
        };
        check_limits(&server.service.limits)?;
        check_client(&self.client)?;
        server.service.api_keys = self
            .api_keys_file
            .as_deref()
            .map(ApiKeys::load)
            .transpose()
            .map_err(ConfigError::ApiKeys)?;
        server
            .service
            .callers
            .load()
            .map_err(|e| ConfigError::Callers(e.to_string()))?;
        server.tls = self.tls()?;
        server.cors = CorsPolicy::new(&self.cors_allow_origin)
            .map_err(|e| ConfigError::Cors(e.to_string()))?;
        Ok(Settings {
            listen,
            server,
            client: self.client.clone(),
            simulator: self.simulate.then(|| SimConfig {
                job_duration: self.sim_job_duration,
                ..SimConfig::default()
            }),
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
            None => PORT,
        };
        Ok(SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// Refuses a setup where anyone who reaches the port spends the
    /// account's credits: a default token on a non-loopback address with no
    /// caller authentication, unless the operator says so explicitly. The
    /// simulator's demo token costs nothing and is exempt.
    pub fn check_exposure(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        let caller_auth = self.api_keys_file.is_some()
            || self.tls_client_ca.is_some()
            || self.server.service.callers.file.is_some();
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

    /// The TLS settings, read from the certificate and key files (clap
    /// makes sure they come in pairs).
    fn tls(&self) -> Result<Option<ServerTlsConfig>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        auth::server_tls(cert, key, self.tls_client_ca.as_deref())
            .map(Some)
            .map_err(ConfigError::Tls)
    }
}

/// `--min-dimension` must not exceed `--max-dimension`.
fn check_limits(limits: &Limits) -> Result<(), ConfigError> {
    if limits.min_dimension > limits.max_dimension {
        return Err(ConfigError::Dimensions {
            min: limits.min_dimension,
            max: limits.max_dimension,
        });
    }
    Ok(())
}

/// The upstream URL, then the headers sent upstream.
fn check_client(client: &ClientConfig) -> Result<(), ConfigError> {
    check_upstream_url(client.base_url.expose())?;
    for (flag, value) in [
        ("--user-agent", &client.user_agent),
        ("--origin", &client.origin),
        ("--referer", &client.referer),
    ] {
        if value
            .as_deref()
            .is_some_and(|v| HeaderValue::from_str(v).is_err())
        {
            return Err(ConfigError::Header { flag });
        }
    }
    Ok(())
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
            tokens,
            ..self.sim.clone()
        })
    }
}
