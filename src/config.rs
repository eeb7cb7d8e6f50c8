//! The command line: one clap struct per subcommand, every flag also an
//! environment variable. Durations are humantime strings (`300ms`, `2s`).
//! Every default and bound lives in [`defaults`]; [`ServeArgs::settings`]
//! and [`SimArgs::config`] are the one place flags become settings, and
//! every value is checked (by the value parsers here or by those two)
//! before anything listens.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand};

pub mod defaults;
mod settings;

/// The one URL redactor (`upstream::redact_url`), by the name the
/// configuration's users have called it.
pub use crate::upstream::redact_url as redact_userinfo;
use crate::{hub::FleetPolling, idempotency::StoreLocation, job::Secret};
pub use settings::{ConfigError, Settings};
use settings::{
    batch_max, connection_age, duration_or_zero, heartbeat, human, log_filter, max_watches,
    poll_interval, positive, positive_duration, rate,
};

pub use crate::telemetry::LogFormat;
/// Piclumen's production API.
pub const PRODUCTION_URL: &str = crate::upstream::defaults::UPSTREAM_URL;
/// Port used when neither `--listen` nor `PORT` is given.
pub const DEFAULT_PORT: u16 = crate::server::defaults::PORT;

/// Exit codes of the client subcommands, shown by `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of generate, watch and check:
  0  the job succeeded (check: the server answered and the job has not failed)
  1  the job failed
  2  usage: a bad flag, argument or server URL
  3  a call to the server, or an image download, failed";

/// gRPC service in front of Piclumen's image-generation API.
#[derive(Debug, Parser)]
#[command(name = "piclumen-grpc", version, about, long_about = None, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "PICLUMEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `piclumen_grpc=debug` (RUST_LOG syntax).
    #[arg(long, env = "PICLUMEN_LOG", default_value = defaults::LOG, value_parser = log_filter, global = true)]
    pub log: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Run the Piclumen simulator as a standalone HTTP server.
    Sim(SimArgs),
    /// Start a generation (and with --wait, follow it to the images).
    #[command(after_help = EXIT_CODES_HELP)]
    Generate(GenerateArgs),
    /// Follow a job until it ends, showing progress.
    #[command(after_help = EXIT_CODES_HELP)]
    Watch(JobArgs),
    /// Show a job's current state once.
    #[command(after_help = EXIT_CODES_HELP)]
    Check(JobArgs),
}

/// `serve` flags. Turned into the server's settings by
/// [`ServeArgs::settings`].
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. When unset: `0.0.0.0:$PORT` if PORT is set
    /// (hosting platforms inject it), else `0.0.0.0:50051`.
    #[arg(long, env = "PICLUMEN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Base URL of the Piclumen API (http or https).
    #[arg(long, env = "PICLUMEN_UPSTREAM_URL", default_value = defaults::UPSTREAM_URL)]
    pub upstream_url: Secret,
    /// Default Piclumen token, used for calls without `authorization`
    /// metadata. Printable ASCII, like a caller's.
    #[arg(long, env = "PICLUMEN_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// Time between two polls of a watched job (at least 250ms).
    #[arg(long, env = "PICLUMEN_POLL_INTERVAL", default_value = human(defaults::POLL_INTERVAL), value_parser = poll_interval)]
    pub poll_interval: Duration,
    /// Most mark ids in one batch-status call (1 to 500).
    #[arg(long, env = "PICLUMEN_BATCH_MAX", default_value_t = defaults::BATCH_MAX, value_parser = batch_max)]
    pub batch_max: u16,
    /// Longest a WatchImage stream stays open (then DEADLINE_EXCEEDED).
    #[arg(long, env = "PICLUMEN_MAX_WATCH", default_value = human(defaults::MAX_WATCH), value_parser = positive_duration)]
    pub max_watch: Duration,
    /// Quiet time after which a watch resends its state as a heartbeat (at
    /// least 1s).
    #[arg(long, env = "PICLUMEN_HEARTBEAT", default_value = human(defaults::HEARTBEAT), value_parser = heartbeat)]
    pub heartbeat: Duration,
    /// Most WatchImage streams open at once (beyond: RESOURCE_EXHAUSTED).
    #[arg(long, env = "PICLUMEN_MAX_WATCHES", default_value_t = defaults::MAX_WATCHES, value_parser = max_watches)]
    pub max_watches: usize,
    /// How long upstream trouble is retried before watches end UNAVAILABLE.
    #[arg(long, env = "PICLUMEN_FAILURE_BUDGET", default_value = human(defaults::FAILURE_BUDGET), value_parser = positive_duration)]
    pub failure_budget: Duration,
    /// Bound on one upstream HTTP call.
    #[arg(long, env = "PICLUMEN_UPSTREAM_TIMEOUT", default_value = human(defaults::UPSTREAM_TIMEOUT), value_parser = positive_duration)]
    pub upstream_timeout: Duration,
    /// Bound on opening a connection to the upstream.
    #[arg(long, env = "PICLUMEN_UPSTREAM_CONNECT_TIMEOUT", default_value = human(defaults::UPSTREAM_CONNECT_TIMEOUT), value_parser = positive_duration)]
    pub upstream_connect_timeout: Duration,
    /// `user-agent` sent upstream (default: piclumen-grpc/VERSION).
    #[arg(long, env = "PICLUMEN_USER_AGENT")]
    pub user_agent: Option<String>,
    /// `origin` header sent upstream, if any.
    #[arg(long, env = "PICLUMEN_ORIGIN")]
    pub origin: Option<String>,
    /// `referer` header sent upstream, if any.
    #[arg(long, env = "PICLUMEN_REFERER")]
    pub referer: Option<String>,
    /// How long a GenerateImage `request_id`'s outcome is remembered.
    #[arg(long, env = "PICLUMEN_IDEMPOTENCY_TTL", default_value = human(defaults::IDEMPOTENCY_TTL), value_parser = positive_duration)]
    pub idempotency_ttl: Duration,
    /// Where `request_id` outcomes are kept: `memory` (this process only) or
    /// `redis://HOST:PORT[/DB]` / `rediss://...` (shared by replicas).
    #[arg(
        long,
        env = "PICLUMEN_IDEMPOTENCY_STORE",
        default_value = "memory",
        hide_env_values = true,
        value_parser = StoreLocation::from_str
    )]
    pub idempotency_store: StoreLocation,
    /// With a Redis store: replicas share polling, one status call per
    /// token and round for the whole fleet (`on` or `off`).
    #[arg(long, env = "PICLUMEN_FLEET_POLLING", default_value_t = FleetPolling::default(), value_parser = FleetPolling::from_str)]
    pub fleet_polling: FleetPolling,
    /// Smallest accepted width or height, in pixels.
    #[arg(long, env = "PICLUMEN_MIN_DIMENSION", default_value_t = defaults::MIN_DIMENSION, value_parser = positive::<i32>)]
    pub min_dimension: i32,
    /// Largest accepted width or height, in pixels (at least --min-dimension).
    #[arg(long, env = "PICLUMEN_MAX_DIMENSION", default_value_t = defaults::MAX_DIMENSION, value_parser = positive::<i32>)]
    pub max_dimension: i32,
    /// Longest accepted prompt, in characters.
    #[arg(long, env = "PICLUMEN_MAX_PROMPT_CHARS", default_value_t = defaults::MAX_PROMPT_CHARS, value_parser = positive::<usize>)]
    pub max_prompt_chars: usize,
    /// On SIGTERM/SIGINT, how long in-flight calls may take before the
    /// process exits anyway.
    #[arg(long, env = "PICLUMEN_DRAIN_TIMEOUT", default_value = human(defaults::DRAIN_TIMEOUT), value_parser = positive_duration)]
    pub drain_timeout: Duration,
    /// Most GenerateImage calls in flight per token (beyond: RESOURCE_EXHAUSTED).
    #[arg(long, env = "PICLUMEN_MAX_GENERATES_PER_TOKEN", default_value_t = defaults::MAX_GENERATES_PER_TOKEN, value_parser = positive::<usize>)]
    pub max_generates_per_token: usize,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "PICLUMEN_MAX_REQUEST_BYTES", default_value_t = defaults::MAX_REQUEST_BYTES, value_parser = positive::<usize>)]
    pub max_request_bytes: usize,
    /// HTTP/2 ping interval on idle connections (keeps long watches alive
    /// through load balancers, finds dead peers).
    #[arg(long, env = "PICLUMEN_HTTP2_KEEPALIVE_INTERVAL", default_value = human(defaults::HTTP2_KEEPALIVE_INTERVAL), value_parser = positive_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "PICLUMEN_HTTP2_KEEPALIVE_TIMEOUT", default_value = human(defaults::HTTP2_KEEPALIVE_TIMEOUT), value_parser = positive_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Most concurrent calls (HTTP/2 streams) on one client connection.
    #[arg(long, env = "PICLUMEN_MAX_STREAMS_PER_CONNECTION", default_value_t = defaults::MAX_STREAMS_PER_CONNECTION, value_parser = positive::<u32>)]
    pub max_streams_per_connection: u32,
    /// Age at which a client connection is asked to reconnect (HTTP/2
    /// GOAWAY; each replica moves it by up to 10% either way), so calls
    /// spread over replicas added since (at least 1s).
    #[arg(long, env = "PICLUMEN_MAX_CONNECTION_AGE", default_value = human(defaults::MAX_CONNECTION_AGE), value_parser = connection_age)]
    pub max_connection_age: Duration,
    /// After --max-connection-age, how long calls still open on the
    /// connection may go on before it is closed.
    #[arg(long, env = "PICLUMEN_MAX_CONNECTION_AGE_GRACE", default_value = human(defaults::MAX_CONNECTION_AGE_GRACE), value_parser = duration_or_zero)]
    pub max_connection_age_grace: Duration,
    /// PEM certificate (chain) of the server; turns TLS on, with --tls-key.
    #[arg(long, env = "PICLUMEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the server certificate.
    #[arg(long, env = "PICLUMEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: callers must present a certificate it signed
    /// (mutual TLS). Needs --tls-cert and --tls-key.
    #[arg(long, env = "PICLUMEN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File of accepted caller API keys, one per line (`#` comments allowed);
    /// callers send one as metadata `x-api-key`.
    #[arg(long, env = "PICLUMEN_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Allow a default --token on a non-loopback address without caller
    /// authentication (anyone reaching the port spends the account's credits).
    #[arg(long, env = "PICLUMEN_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Browser origin allowed to call over gRPC-Web (CORS), e.g.
    /// `https://app.example.com`; repeatable or comma-separated, `*` for any.
    /// None by default: no browser origin is allowed.
    #[arg(
        long = "cors-allow-origin",
        env = "PICLUMEN_CORS_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_allow_origin: Vec<String>,
    /// Serve Prometheus metrics over HTTP on this address (off when unset).
    #[arg(long, env = "PICLUMEN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export OpenTelemetry spans over OTLP to this collector URL (e.g.
    /// `http://localhost:4318`; gRPC's `:4317` with
    /// OTEL_EXPORTER_OTLP_PROTOCOL=grpc), as OTEL_EXPORTER_OTLP_ENDPOINT
    /// does (this wins over it). Off when neither is set; the other OTEL_*
    /// variables apply (see README, "Tracing").
    #[arg(long, env = "PICLUMEN_OTLP_ENDPOINT", value_parser = crate::otel::parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Also serve the first version's HTTP API (`POST /generate-image`,
    /// `POST /check-image`, Swagger UI at `/docs`) on this address, plain
    /// HTTP, with the same service as gRPC (off when unset).
    #[arg(long, env = "PICLUMEN_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Start the built-in Piclumen simulator and use it as the upstream
    /// (no real images; for trying the service out).
    #[arg(long, env = "PICLUMEN_SIMULATE")]
    pub simulate: bool,
    /// With --simulate: time the simulated jobs take.
    #[arg(long, env = "PICLUMEN_SIM_JOB_DURATION", default_value = human(defaults::SIM_JOB_DURATION), value_parser = positive_duration)]
    pub sim_job_duration: Duration,
}

/// `sim` flags. Turned into the simulator's settings by [`SimArgs::config`].
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, env = "PICLUMEN_SIM_LISTEN", default_value_t = defaults::SIM_LISTEN)]
    pub listen: SocketAddr,
    /// Time from create to a finished job (40% queued, then running).
    #[arg(long, env = "PICLUMEN_SIM_JOB_DURATION", default_value = human(defaults::SIM_JOB_DURATION), value_parser = positive_duration)]
    pub job_duration: Duration,
    /// Each job's duration varies randomly by up to this fraction (0 to 1).
    #[arg(long, env = "PICLUMEN_SIM_JOB_JITTER", default_value_t = defaults::SIM_JOB_JITTER, value_parser = rate)]
    pub job_jitter: f64,
    /// Delay added to every API reply.
    #[arg(long, env = "PICLUMEN_SIM_LATENCY", default_value = human(defaults::SIM_LATENCY), value_parser = duration_or_zero)]
    pub latency: Duration,
    /// Share (0 to 1) of API requests answered with a random 5xx.
    #[arg(long, env = "PICLUMEN_SIM_FAIL_5XX_RATE", default_value_t = defaults::SIM_FAIL_5XX_RATE, value_parser = rate)]
    pub fail_5xx_rate: f64,
    /// Share (0 to 1) of API requests answered 429 with `Retry-After: 1`.
    #[arg(long, env = "PICLUMEN_SIM_FAIL_429_RATE", default_value_t = defaults::SIM_FAIL_429_RATE, value_parser = rate)]
    pub fail_429_rate: f64,
    /// Comma-separated accepted tokens; others get 401. Any non-empty token
    /// is accepted when unset.
    #[arg(
        long,
        env = "PICLUMEN_SIM_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<Secret>,
}

/// Connection flags shared by the client subcommands.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Server URL (`http://` or `https://`).
    #[arg(
        long,
        env = "PICLUMEN_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_parser = server_url
    )]
    pub server: String,
    /// Piclumen token to send (the server's default token is used when unset).
    #[arg(long, env = "PICLUMEN_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// Overall deadline of the command: `watch` and `generate --wait`
    /// re-issue a watch cut by a server drain or a lost connection until
    /// then.
    #[arg(long, env = "PICLUMEN_CLIENT_TIMEOUT", default_value = human(defaults::CLIENT_TIMEOUT), value_parser = positive_duration)]
    pub timeout: Duration,
}

/// `generate` flags.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The prompt.
    pub prompt: String,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Model id (server default when unset).
    #[arg(long, default_value = "")]
    pub model_id: String,
    /// Width in pixels (0: default).
    #[arg(long, default_value_t = 0)]
    pub width: i32,
    /// Height in pixels (0: default).
    #[arg(long, default_value_t = 0)]
    pub height: i32,
    /// Number of images, 1 to 4.
    #[arg(long, default_value_t = 1)]
    pub batch_size: i32,
    /// Seed (random when unset).
    #[arg(long)]
    pub seed: Option<i64>,
    /// Idempotency key: retries with the same key start no second job.
    #[arg(long, default_value = "")]
    pub request_id: String,
    /// Follow the job until its images are ready.
    #[arg(long)]
    pub wait: bool,
    /// Print the result as one JSON object on stdout and nothing else there:
    /// with --wait the final job and its seed, else `{"mark_id", "seed"}`.
    /// Progress still goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// With --wait: download every image of the finished job into this
    /// directory (created if missing), named after the job's images. All or
    /// nothing: a failed download leaves no file behind. Without --json,
    /// stdout lists the saved files instead of the URLs.
    #[arg(long, value_name = "DIR", requires = "wait")]
    pub out: Option<PathBuf>,
}

/// `watch` / `check` flags.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job's mark id.
    pub mark_id: String,
    /// Print the job as one JSON object on stdout and nothing else there
    /// (watch: the final job; progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Download every image of the job, once it has succeeded, into this
    /// directory (created if missing), named after the job's images. All or
    /// nothing: a failed download leaves no file behind. Without --json,
    /// stdout lists the saved files instead of the URLs.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Accepts an `http://` or `https://` URL with a host; anything else is a
/// usage error rather than a failed connection.
fn server_url(s: &str) -> Result<String, String> {
    let uri: tonic::transport::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(s.to_owned()),
        _ => Err("expected an http:// or https:// URL with a host".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from([&["piclumen-grpc", "serve"], args].concat()).expect("parse");
        match cli.command {
            Command::Serve(args) => *args,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn listen_address_prefers_flag_then_port_then_default() {
        let explicit = serve(&["--listen", "127.0.0.1:7000"]);
        assert_eq!(
            explicit.listen_addr(Some("9000")),
            Ok("127.0.0.1:7000".parse().expect("addr"))
        );
        let none = ServeArgs {
            listen: None,
            ..serve(&[])
        };
        assert_eq!(
            none.listen_addr(Some("9000")),
            Ok("0.0.0.0:9000".parse().expect("addr"))
        );
        assert_eq!(
            none.listen_addr(None),
            Ok("0.0.0.0:50051".parse().expect("addr"))
        );
        assert!(none.listen_addr(Some("http")).is_err());
    }

    #[test]
    fn a_default_token_on_an_open_port_needs_caller_auth() {
        let public: SocketAddr = "0.0.0.0:50051".parse().expect("addr");
        let loopback: SocketAddr = "127.0.0.1:50051".parse().expect("addr");
        assert!(serve(&["--token", "t"]).check_exposure(public).is_err());
        assert!(serve(&["--token", "t"]).check_exposure(loopback).is_ok());
        assert!(serve(&[]).check_exposure(public).is_ok());
        assert!(
            serve(&["--token", "t", "--allow-unauthenticated"])
                .check_exposure(public)
                .is_ok()
        );
        assert!(
            serve(&["--token", "t", "--api-keys-file", "k"])
                .check_exposure(public)
                .is_ok()
        );
        let mtls = [
            "--token",
            "t",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-client-ca",
            "ca",
        ];
        assert!(serve(&mtls).check_exposure(public).is_ok());
        assert!(
            serve(&["--token", "t", "--simulate"])
                .check_exposure(public)
                .is_ok()
        );
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        assert!(Cli::try_parse_from(["piclumen-grpc", "serve", "--tls-cert", "c"]).is_err());
        assert!(Cli::try_parse_from(["piclumen-grpc", "serve", "--tls-client-ca", "ca"]).is_err());
    }

    #[test]
    fn secret_flags_stay_out_of_debug() {
        let url = "http://op:hunter2@127.0.0.1:9";
        let args = serve(&[
            "--token",
            "tok-secret",
            "--upstream-url",
            url,
            "--listen",
            "127.0.0.1:1",
        ]);
        let settings = args.settings(None).expect("settings");
        assert_eq!(settings.client.base_url.expose(), url);
        let parse = |args: &[&str]| Cli::try_parse_from(args).expect("parse");
        let sim = parse(&["piclumen-grpc", "sim", "--tokens", "tok-secret,other"]);
        let watch = parse(&["piclumen-grpc", "watch", "--token", "tok-secret", "m"]);
        for shown in [
            format!("{args:?}"),
            format!("{settings:?}"),
            format!("{sim:?}"),
            format!("{watch:?}"),
            match &sim.command {
                Command::Sim(args) => format!("{:?}", args.config().expect("sim config")),
                other => panic!("not sim: {other:?}"),
            },
        ] {
            assert!(!shown.contains("tok-secret"), "{shown}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("op:"),
                "{shown}"
            );
        }
    }
}
