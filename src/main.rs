//! The `piclumen-grpc` binary: parses the command line, sets up logging and
//! runs the chosen subcommand.

use std::process::ExitCode;

use clap::Parser;
use piclumen_grpc::{
    cli,
    config::{Cli, Command, ServeArgs, SimArgs},
    otel, server,
    sim::{self, SimConfig},
    telemetry,
    upstream::{Client, redact_url},
};
use tokio::net::TcpListener;

/// mimalloc: the server allocates and frees many small buffers per call;
/// glibc's malloc and free were about a tenth of its CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing::{error, info, warn};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let tracing = match tracing_layer(&cli.command) {
        Ok(layer) => layer,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let _logging = telemetry::init_logging_with(cli.log_format, &cli.log, tracing);
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Sim(args) => run_sim(args).await,
        Command::Generate(args) => return client_exit(cli::generate(args).await),
        Command::Watch(args) => return client_exit(cli::watch(args).await),
        Command::Check(args) => return client_exit(cli::check(args).await),
        Command::Usage(args) => piclumen_grpc::callers::usage::usage(args).await,
        Command::HashKey(args) => piclumen_grpc::callers::usage::hash_key(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `serve`'s OpenTelemetry layer, when the OTEL_* variables (or
/// `--otlp-endpoint`) turn export on; the other subcommands export nothing.
fn tracing_layer(command: &Command) -> Result<Option<otel::TracingLayer>, String> {
    let Command::Serve(args) = command else {
        return Ok(None);
    };
    let config = otel::TracingConfig::from_env(args.otlp_endpoint.as_deref(), |name| {
        std::env::var(name).ok()
    })
    .map_err(|e| e.to_string())?;
    config
        .map(|config| otel::install(&config).map_err(|e| e.to_string()))
        .transpose()
}

/// The client subcommands' exit codes: 0 succeeded, 1 the job failed,
/// 2 usage, 3 a call or download failed (clap exits 2 on its own errors).
fn client_exit(result: Result<(), cli::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code())
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let mut settings = args
        .settings(std::env::var("PORT").ok().as_deref())
        .map_err(|e| e.to_string())?;
    if let Some(config) = settings.simulator.take() {
        settings.client.base_url = format!("http://{}", start_simulator(config).await?).into();
        warn!(
            upstream = %redact_url(settings.client.base_url.expose()),
            "SIMULATION MODE: the upstream is the built-in Piclumen simulator, not Piclumen; images are not real"
        );
    }
    if let Some(addr) = settings.metrics_listen {
        telemetry::init_metrics(addr)?;
        info!("metrics on http://{addr}/metrics");
    }
    let client = Client::new(&settings.client)?;
    let shutdown = shutdown_signal();
    let listen = settings.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!(
        upstream = %redact_url(settings.client.base_url.expose()),
        idempotency_store = %settings.server.idempotency.store,
        tls = settings.server.tls.is_some(),
        mutual_tls = args.tls_client_ca.is_some(),
        api_keys = settings.server.service.api_keys.is_some(),
        default_token = settings.server.service.default_token.is_some(),
        "listening on {local}"
    );
    let http_listener = match settings.http_listen {
        Some(addr) => {
            let http = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let local = http.local_addr().map_err(|e| e.to_string())?;
            info!("HTTP API (first version) on http://{local}, Swagger UI at /docs");
            Some(http)
        }
        None => None,
    };
    server::run_with_http(settings.server, client, listener, http_listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Starts the in-process simulator of `serve --simulate` on a loopback port.
async fn start_simulator(config: SimConfig) -> Result<std::net::SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot start the simulator: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = sim::serve(listener, config, std::future::pending()).await {
            error!(error = %e, "simulator stopped");
        }
    });
    Ok(addr)
}

async fn run_sim(args: SimArgs) -> Result<(), String> {
    let config = args.config().map_err(|e| e.to_string())?;
    let shutdown = shutdown_signal();
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!("simulator listening on {local}");
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
