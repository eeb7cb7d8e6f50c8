//! The command line: one clap struct per subcommand, every flag also an
//! environment variable. Durations are humantime strings (`300ms`, `2s`).
//!
//! Each module's settings struct declares its own flags (name, variable,
//! default, value parser) and `serve` / `sim` flatten them: `ServerConfig`
//! (with the service's, the hub's, the idempotency store's and the request
//! bounds' settings) and `ClientConfig` into [`ServeArgs`], `SimConfig`
//! into [`SimArgs`]. What stays here: the flags that are not one module's
//! setting (addresses, the token, TLS and API key files, CORS origins, the
//! simulator switch), and [`ServeArgs::settings`] / [`SimArgs::config`],
//! which check what depends on several flags, read the files and fill the
//! settings that are not flags, before anything listens. The value parsers
//! every settings struct uses are in [`parse`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

mod settings;

use crate::flags::{human, log_filter, positive_duration};
/// The one URL redactor (`upstream::redact_url`), by the name the
/// configuration's users have called it.
pub use crate::upstream::redact_url as redact_userinfo;
use crate::{
    job::Secret,
    server::ServerConfig,
    sim::{SimConfig, defaults::SIM_JOB_DURATION},
    upstream::ClientConfig,
};
pub use settings::{ConfigError, Settings};

pub use crate::telemetry::LogFormat;

/// Exit codes of the client subcommands, shown by `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of generate, watch and check:
  0  the job succeeded (check: the server answered and the job has not failed;
     watch of several ids: every job succeeded)
  1  the job failed (watch of several ids: one or more failed, all were found)
  2  usage: a bad flag, argument or server URL
  3  a call to the server, or an image download, failed (watch of several
     ids: or a job was not found; the others were still followed to their end)";

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
    #[arg(long, env = "PICLUMEN_LOG", default_value = crate::telemetry::DEFAULT_LOG, value_parser = log_filter, global = true)]
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
    /// Follow one or more jobs until they end, showing progress.
    #[command(after_help = EXIT_CODES_HELP)]
    Watch(WatchArgs),
    /// Show a job's current state once (with --wait, its next change).
    #[command(after_help = EXIT_CODES_HELP)]
    Check(CheckArgs),
    /// Show each named caller's images today and this month, and what is
    /// left of its limits, from the fleet's Redis counters.
    Usage(crate::callers::usage::UsageArgs),
    /// Print the SHA-256 of an API key read from stdin (a callers file's
    /// `key_sha256`).
    HashKey(crate::callers::usage::HashKeyArgs),
}

/// `serve` flags: the flattened settings structs, and the flags that only
/// feed [`ServeArgs::settings`].
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. When unset: `0.0.0.0:$PORT` if PORT is set
    /// (hosting platforms inject it), else `0.0.0.0:50051`.
    #[arg(long, env = "PICLUMEN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Default Piclumen token, used for calls without `authorization`
    /// metadata. Printable ASCII, like a caller's.
    #[arg(long, env = "PICLUMEN_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// The server's settings (with the service's, the hub's and the
    /// idempotency store's); not yet checked against each other.
    #[command(flatten)]
    pub server: ServerConfig,
    /// The upstream client's settings; URL and headers not yet checked.
    #[command(flatten)]
    pub client: ClientConfig,
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
    #[arg(long, env = "PICLUMEN_SIM_JOB_DURATION", default_value = human(SIM_JOB_DURATION), value_parser = positive_duration)]
    pub sim_job_duration: Duration,
}

/// `sim` flags. Turned into the simulator's settings by [`SimArgs::config`].
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, env = "PICLUMEN_SIM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The simulator's knobs; `tokens` is filled from --tokens.
    #[command(flatten)]
    pub sim: SimConfig,
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
    #[arg(long, env = "PICLUMEN_CLIENT_TIMEOUT", default_value = "30m", value_parser = positive_duration)]
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

/// `watch` flags.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The jobs' mark ids: one is followed with WatchImage, several (up to
    /// the server's --max-watch-ids) share one WatchImages stream.
    #[arg(value_name = "MARK_ID", required = true, num_args = 1..)]
    pub mark_ids: Vec<String>,
    /// Print the result as one JSON object on stdout and nothing else there:
    /// the final job, or with several ids `{"jobs": [...]}` in the order
    /// given. Progress still goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// Download every image of the job, once it has succeeded, into this
    /// directory (created if missing; with several ids, one subdirectory per
    /// job, named after its mark id), named after the job's images. All or
    /// nothing: a failed download leaves no file behind. Without --json,
    /// stdout lists the saved files instead of the URLs.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `check` flags.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Connection.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job's mark id.
    pub mark_id: String,
    /// Wait up to this long for the job to change (CheckImage's `wait`):
    /// answers as soon as its etag differs from --etag, or without --etag
    /// from the etag of a first, plain check (so: the next change); a
    /// finished job answers at once. Longer waits than the server's
    /// --max-check-wait are asked again until this one ends.
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub wait: Option<Duration>,
    /// With --wait: the etag the caller last saw (`etag` of a `--json`
    /// answer); a job whose etag already differs answers at once.
    #[arg(long, value_name = "ETAG", requires = "wait")]
    pub etag: Option<String>,
    /// Print the job as one JSON object on stdout and nothing else there.
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
    fn every_settings_default_is_its_flags_defaults() {
        use crate::{server::ServerConfig, sim::SimConfig, upstream::ClientConfig};
        // Each `Default` runs every default text through its value parser.
        let server = ServerConfig::default();
        assert_eq!(server.hub.batch_max, 50);
        assert_eq!(server.service.max_watch, Duration::from_secs(30 * 60));
        assert_eq!(server.idempotency.ttl, Duration::from_secs(600));
        assert_eq!(server.service.limits.max_dimension, 4096);
        assert_eq!(ClientConfig::default().base_url, "https://api.piclumen.com");
        assert_eq!(SimConfig::default().job_duration, Duration::from_secs(6));
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
