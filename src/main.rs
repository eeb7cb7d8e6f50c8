//! The `piclumen-grpc` binary: parses the command line, sets up logging and
//! runs the chosen subcommand.

use std::process::ExitCode;

use clap::Parser;
use piclumen_grpc::{
    auth::{self, ApiKeys},
    cli,
    config::{Cli, Command, ServeArgs, SimArgs},
    convert::Limits,
    hub::HubConfig,
    job::Token,
    server::{self, ServerConfig},
    service::ServiceConfig,
    sim::{self, SimConfig},
    telemetry,
    upstream::{Client, ClientConfig, redact_url},
};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

/// Default token of `serve --simulate` when none is given, so the quick
/// start works without one. The simulator accepts any token.
const SIMULATOR_TOKEN: &str = "simulator-demo-token";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format, &cli.log);
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Sim(args) => run_sim(args).await,
        Command::Generate(args) => cli::generate(args).await.map_err(|e| e.to_string()),
        Command::Watch(args) => cli::watch(args).await.map_err(|e| e.to_string()),
        Command::Check(args) => cli::check(args).await.map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let listen = args.listen_addr(std::env::var("PORT").ok().as_deref())?;
    args.check_exposure(listen)?;
    let api_keys = args
        .api_keys_file
        .as_deref()
        .map(ApiKeys::load)
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(auth::server_tls(cert, key, args.tls_client_ca.as_deref())?)
        }
        _ => None,
    };
    let mut upstream_url = args.upstream_url.clone();
    let mut default_token = args.token.as_deref().and_then(Token::new);
    if args.simulate {
        let sim_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot start the simulator: {e}"))?;
        let addr = sim_listener.local_addr().map_err(|e| e.to_string())?;
        let config = SimConfig {
            job_duration: args.sim_job_duration,
            ..SimConfig::default()
        };
        tokio::spawn(async move {
            if let Err(e) = sim::serve(sim_listener, config, std::future::pending()).await {
                error!(error = %e, "simulator stopped");
            }
        });
        upstream_url = format!("http://{addr}");
        default_token = default_token.or_else(|| Token::new(SIMULATOR_TOKEN));
        warn!(
            upstream = %upstream_url,
            "SIMULATION MODE: the upstream is the built-in Piclumen simulator, not Piclumen; images are not real"
        );
    }
    if let Some(addr) = args.metrics_listen {
        telemetry::init_metrics(addr)?;
        info!("metrics on http://{addr}/metrics");
    }
    let client = Client::new(&ClientConfig {
        base_url: upstream_url.clone(),
        timeout: args.upstream_timeout,
        connect_timeout: args.upstream_connect_timeout,
        user_agent: args.user_agent.clone(),
        origin: args.origin.clone(),
        referer: args.referer.clone(),
    })?;
    let config = ServerConfig {
        service: ServiceConfig {
            default_token,
            api_keys,
            limits: Limits {
                min_dimension: args.min_dimension,
                max_dimension: args.max_dimension,
                max_prompt_chars: args.max_prompt_chars,
            },
            max_watch: args.max_watch,
            heartbeat: args.heartbeat,
            max_watches: args.max_watches,
            max_generates_per_token: args.max_generates_per_token,
            idempotency_ttl: args.idempotency_ttl,
            idempotency_store: args.idempotency_store.clone(),
        },
        hub: HubConfig {
            poll_interval: args.poll_interval,
            batch_max: args.batch_max.into(),
            gather: std::time::Duration::from_millis(50),
            failure_budget: args.failure_budget,
        },
        drain_timeout: args.drain_timeout,
        max_streams_per_connection: args.max_streams_per_connection,
        max_request_bytes: args.max_request_bytes,
        http2_keepalive_interval: args.http2_keepalive_interval,
        http2_keepalive_timeout: args.http2_keepalive_timeout,
        tls,
    };
    let shutdown = shutdown_signal();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!(
        upstream = %redact_url(&upstream_url),
        idempotency_store = %config.service.idempotency_store,
        tls = args.tls_cert.is_some(),
        mutual_tls = args.tls_client_ca.is_some(),
        api_keys = args.api_keys_file.is_some(),
        default_token = config.service.default_token.is_some(),
        "listening on {local}"
    );
    server::run(config, client, listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

async fn run_sim(args: SimArgs) -> Result<(), String> {
    let shutdown = shutdown_signal();
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!("simulator listening on {local}");
    let config = SimConfig {
        job_duration: args.job_duration,
        job_jitter: args.job_jitter,
        latency: args.latency,
        fail_5xx_rate: args.fail_5xx_rate,
        fail_429_rate: args.fail_429_rate,
        tokens: args.tokens.into_iter().filter(|t| !t.is_empty()).collect(),
    };
    sim::serve(listener, config, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so a signal arriving while
/// the server starts is not lost (nor fatal).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    }
}
