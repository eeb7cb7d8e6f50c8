//! The flag-to-settings wiring, end to end: every flag and environment
//! variable of `serve` and `sim` is documented and reaches its setting, `serve`
//! with no flags runs on the documented defaults, and a value that cannot work
//! stops the binary before it listens, naming the flag and its range.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use clap::{ArgAction, CommandFactory, FromArgMatches};
use common::{Sim, assert_status, authed, eventually, generate, long_jobs};
use piclumen_grpc::{
    config::{self, Cli, ConfigError, LogFormat, ServeArgs, Settings, SimArgs, defaults},
    hub::HubConfig,
    pb::{self, image_service_client::ImageServiceClient},
    server::ServerConfig,
    service::ServiceConfig,
    sim::SimConfig,
    upstream::ClientConfig,
};
use tonic::{Code, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_piclumen-grpc");
const TOKEN: &str = "config-token";

// === In-process: the one settings function ===

/// The command line with every `env` removed, so parsing here depends on
/// the given arguments only, whatever the test process's environment.
fn command_without_env() -> clap::Command {
    fn strip(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|arg| arg.env(None::<&'static str>))
    }
    strip(Cli::command())
        .mut_subcommand("serve", strip)
        .mut_subcommand("sim", strip)
}

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    let argv = [&["piclumen-grpc"], args].concat();
    Cli::from_arg_matches(&command_without_env().try_get_matches_from(argv)?)
}

fn serve_args(args: &[&str]) -> ServeArgs {
    match parse(&[&["serve"], args].concat())
        .expect("parse serve")
        .command
    {
        config::Command::Serve(args) => *args,
        other => panic!("not serve: {other:?}"),
    }
}

fn sim_args(args: &[&str]) -> SimArgs {
    match parse(&[&["sim"], args].concat())
        .expect("parse sim")
        .command
    {
        config::Command::Sim(args) => args,
        other => panic!("not sim: {other:?}"),
    }
}

fn settings(args: &ServeArgs) -> Settings {
    args.settings(None).expect("settings")
}

/// Holds when the settings build and `check` holds on them.
fn with(args: &ServeArgs, check: impl Fn(&Settings) -> bool) -> bool {
    args.settings(None).is_ok_and(|s| check(&s))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A file under the system temp dir holding `text`, unique to this test run.
fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("piclumen-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Every long flag of a subcommand (or of the root, for the global ones).
fn flags(cmd: &clap::Command) -> Vec<&clap::Arg> {
    cmd.get_arguments()
        .filter(|a| a.get_long().is_some())
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .collect()
}

fn subcommand<'a>(root: &'a clap::Command, name: &str) -> &'a clap::Command {
    root.find_subcommand(name).expect("subcommand")
}

/// The rows of the first README table after `heading`: flag cell -> cells.
fn readme_rows(heading: &str) -> Vec<Vec<String>> {
    let readme = include_str!("../README.md");
    let section = readme
        .split_once(&format!("\n{heading}\n"))
        .expect("README section")
        .1;
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// Each flag of `args` has its environment variable (`prefix` + the flag in
/// capitals) and a README row with that variable, its default and its range;
/// the table names no flag that does not exist.
fn assert_documented(args: &[&clap::Arg], prefix: &str, rows: &[Vec<String>]) {
    for arg in args {
        let long = arg.get_long().expect("long");
        let env = format!("{prefix}{}", long.to_uppercase().replace('-', "_"));
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(env.as_str()),
            "--{long} reads {env}"
        );
        let row = rows
            .iter()
            .find(|r| r[0] == format!("`--{long}`"))
            .unwrap_or_else(|| panic!("README row for --{long}"));
        assert_eq!(
            row.len(),
            5,
            "flag, env, default, accepted, meaning: {row:?}"
        );
        assert_eq!(row[1], format!("`{env}`"), "README env of --{long}");
        let defaults: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let documented = match arg.get_action() {
            ArgAction::SetTrue => Some("off".to_owned()),
            _ if defaults.is_empty() => None,
            _ => Some(format!("`{}`", defaults.join(","))),
        };
        if let Some(documented) = documented {
            assert_eq!(row[2], documented, "README default of --{long}");
        }
        assert!(!row[3].is_empty(), "README range of --{long}");
    }
    let longs: BTreeSet<String> = args
        .iter()
        .map(|a| format!("`--{}`", a.get_long().expect("long")))
        .collect();
    for row in rows {
        assert!(longs.contains(&row[0]), "README documents {}", row[0]);
    }
}

#[test]
fn every_flag_has_its_env_var_a_readme_row_and_its_documented_default() {
    let root = Cli::command();
    let mut serve = flags(subcommand(&root, "serve"));
    let global = flags(&root);
    assert_eq!(global.len(), 2, "--log and --log-format");
    serve.extend(global.iter().copied());
    assert_documented(&serve, "PICLUMEN_", &readme_rows("## Configuration"));
    let sim = flags(subcommand(&root, "sim"));
    assert_documented(&sim, "PICLUMEN_SIM_", &readme_rows("### The simulator"));
}

#[test]
fn serve_with_no_flags_runs_on_the_defaults() {
    let s = settings(&serve_args(&[]));
    assert_eq!(s.listen, SocketAddr::from(([0, 0, 0, 0], defaults::PORT)));
    assert!(s.simulator.is_none() && s.metrics_listen.is_none() && s.http_listen.is_none());
    // The Default impls are written from the constants, the settings from
    // the parsed flags: equal only if every flag lands in its own field.
    assert_eq!(
        format!("{:?}", s.server),
        format!("{:?}", ServerConfig::default())
    );
    assert_eq!(
        format!("{:?}", s.client),
        format!("{:?}", ClientConfig::default())
    );
    let ServerConfig { service, hub, .. } = s.server;
    let HubConfig {
        poll_interval,
        batch_max,
        gather,
        failure_budget,
    } = hub;
    assert_eq!(
        (poll_interval, batch_max, gather, failure_budget),
        (secs(2), 50, ms(50), secs(60))
    );
    let ServiceConfig {
        default_token,
        api_keys,
        limits,
        max_watch,
        heartbeat,
        max_watches,
        max_generates_per_token,
        idempotency_ttl,
        idempotency_store,
    } = service;
    assert_eq!(idempotency_store.to_string(), "memory");
    assert!(default_token.is_none() && api_keys.is_none());
    assert_eq!(
        (
            limits.min_dimension,
            limits.max_dimension,
            limits.max_prompt_chars
        ),
        (64, 4096, 4000)
    );
    assert_eq!(
        (max_watch, heartbeat, idempotency_ttl),
        (secs(30 * 60), secs(30), secs(600))
    );
    assert_eq!((max_watches, max_generates_per_token), (30_000, 16));
    assert_eq!(s.client.base_url, "https://api.piclumen.com");
    assert_eq!(
        (s.client.timeout, s.client.connect_timeout),
        (secs(30), secs(5))
    );

    let sim = sim_args(&[]);
    assert_eq!(sim.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(
        format!("{:?}", sim.config().expect("sim config")),
        format!("{:?}", SimConfig::default())
    );
    assert_eq!(SimConfig::default().job_duration, secs(6));

    let cli = parse(&["serve"]).expect("parse");
    assert_eq!(
        (cli.log.as_str(), cli.log_format),
        ("info", LogFormat::Text)
    );
}

/// One row per setting: the flags, and what must hold on the settings they
/// build (and must not hold on the defaults).
type ServeRow = (&'static str, Vec<String>, fn(&ServeArgs) -> bool);

fn row(flag: &'static str, args: &[&str], check: fn(&ServeArgs) -> bool) -> ServeRow {
    (flag, args.iter().map(|a| (*a).to_owned()).collect(), check)
}

#[test]
fn every_serve_flag_reaches_its_setting() {
    let cert = temp_file("cert.pem", "not checked before the handshake");
    let key = temp_file("key.pem", "not checked before the handshake");
    let keys = temp_file("keys.txt", "# callers\nkey-one\n");
    let (cert, key, keys) = (path_str(&cert), path_str(&key), path_str(&keys));
    let missing_ca = "/nonexistent/piclumen-ca.pem";
    let rows: Vec<ServeRow> = vec![
        row("listen", &["--listen", "127.0.0.1:7000"], |a| {
            with(a, |s| s.listen == SocketAddr::from(([127, 0, 0, 1], 7000)))
        }),
        row(
            "upstream-url",
            &["--upstream-url", "http://127.0.0.1:9"],
            |a| with(a, |s| s.client.base_url == "http://127.0.0.1:9"),
        ),
        row(
            "token",
            &["--token", "tok-1", "--listen", "127.0.0.1:1"],
            |a| {
                with(a, |s| {
                    s.server.service.default_token.as_ref().map(|t| t.expose()) == Some("tok-1")
                })
            },
        ),
        row("token", &["--token", "t", "--listen", "0.0.0.0:1"], |a| {
            matches!(a.settings(None), Err(ConfigError::Exposed { .. }))
        }),
        row("poll-interval", &["--poll-interval", "750ms"], |a| {
            with(a, |s| s.server.hub.poll_interval == ms(750))
        }),
        row("batch-max", &["--batch-max", "7"], |a| {
            with(a, |s| s.server.hub.batch_max == 7)
        }),
        row("max-watch", &["--max-watch", "5m"], |a| {
            with(a, |s| s.server.service.max_watch == secs(300))
        }),
        row("heartbeat", &["--heartbeat", "7s"], |a| {
            with(a, |s| s.server.service.heartbeat == secs(7))
        }),
        row("max-watches", &["--max-watches", "9"], |a| {
            with(a, |s| s.server.service.max_watches == 9)
        }),
        row("failure-budget", &["--failure-budget", "11s"], |a| {
            with(a, |s| s.server.hub.failure_budget == secs(11))
        }),
        row("upstream-timeout", &["--upstream-timeout", "13s"], |a| {
            with(a, |s| s.client.timeout == secs(13))
        }),
        // No loopback test can make a connect hang (a listener that never
        // accepts still completes the handshake), so this flag is checked
        // here, at the settings the client is built from.
        row(
            "upstream-connect-timeout",
            &["--upstream-connect-timeout", "3s"],
            |a| with(a, |s| s.client.connect_timeout == secs(3)),
        ),
        row("user-agent", &["--user-agent", "ua/1"], |a| {
            with(a, |s| s.client.user_agent.as_deref() == Some("ua/1"))
        }),
        row("origin", &["--origin", "https://o.example"], |a| {
            with(a, |s| {
                s.client.origin.as_deref() == Some("https://o.example")
            })
        }),
        row("referer", &["--referer", "https://r.example/"], |a| {
            with(a, |s| {
                s.client.referer.as_deref() == Some("https://r.example/")
            })
        }),
        row("idempotency-ttl", &["--idempotency-ttl", "17s"], |a| {
            with(a, |s| s.server.service.idempotency_ttl == secs(17))
        }),
        row("min-dimension", &["--min-dimension", "128"], |a| {
            with(a, |s| s.server.service.limits.min_dimension == 128)
        }),
        row("max-dimension", &["--max-dimension", "512"], |a| {
            with(a, |s| s.server.service.limits.max_dimension == 512)
        }),
        row("max-prompt-chars", &["--max-prompt-chars", "10"], |a| {
            with(a, |s| s.server.service.limits.max_prompt_chars == 10)
        }),
        row("drain-timeout", &["--drain-timeout", "19s"], |a| {
            with(a, |s| s.server.drain_timeout == secs(19))
        }),
        row(
            "max-generates-per-token",
            &["--max-generates-per-token", "3"],
            |a| with(a, |s| s.server.service.max_generates_per_token == 3),
        ),
        row("max-request-bytes", &["--max-request-bytes", "4096"], |a| {
            with(a, |s| s.server.max_request_bytes == 4096)
        }),
        row(
            "http2-keepalive-interval",
            &["--http2-keepalive-interval", "23s"],
            |a| with(a, |s| s.server.http2_keepalive_interval == secs(23)),
        ),
        row(
            "http2-keepalive-timeout",
            &["--http2-keepalive-timeout", "29s"],
            |a| with(a, |s| s.server.http2_keepalive_timeout == secs(29)),
        ),
        row(
            "max-streams-per-connection",
            &["--max-streams-per-connection", "31"],
            |a| with(a, |s| s.server.max_streams_per_connection == 31),
        ),
        row("tls-cert", &["--tls-cert", cert, "--tls-key", key], |a| {
            with(a, |s| s.server.tls.is_some())
        }),
        row("tls-key", &["--tls-key", key, "--tls-cert", cert], |a| {
            with(a, |s| s.server.tls.is_some())
        }),
        row(
            "tls-client-ca",
            &[
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--tls-client-ca",
                missing_ca,
            ],
            |a| matches!(a.settings(None), Err(ConfigError::Tls(m)) if m.contains("piclumen-ca.pem")),
        ),
        row("api-keys-file", &["--api-keys-file", keys], |a| {
            with(a, |s| {
                format!("{:?}", s.server.service.api_keys) == "Some(ApiKeys(1 keys, redacted))"
            })
        }),
        row(
            "allow-unauthenticated",
            &[
                "--token",
                "t",
                "--listen",
                "0.0.0.0:1",
                "--allow-unauthenticated",
            ],
            |a| with(a, |s| s.server.service.default_token.is_some()),
        ),
        row(
            "metrics-listen",
            &["--metrics-listen", "127.0.0.1:9100"],
            |a| {
                with(a, |s| {
                    s.metrics_listen == Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
                })
            },
        ),
        row(
            "otlp-endpoint",
            &["--otlp-endpoint", "http://127.0.0.1:4318"],
            |a| a.otlp_endpoint.as_deref() == Some("http://127.0.0.1:4318"),
        ),
        row("http-listen", &["--http-listen", "127.0.0.1:8000"], |a| {
            with(a, |s| {
                s.http_listen == Some(SocketAddr::from(([127, 0, 0, 1], 8000)))
            })
        }),
        row(
            "cors-allow-origin",
            &[
                "--cors-allow-origin",
                "https://a.example,http://localhost:5173",
            ],
            |a| {
                with(a, |s| {
                    s.server.cors_allow_origins == ["https://a.example", "http://localhost:5173"]
                })
            },
        ),
        row(
            "idempotency-store",
            &["--idempotency-store", "redis://127.0.0.1:6379/2"],
            |a| {
                with(a, |s| {
                    s.server.service.idempotency_store.to_string() == "redis://127.0.0.1:6379/2"
                })
            },
        ),
        row("simulate", &["--simulate"], |a| {
            with(a, |s| {
                s.simulator.is_some()
                    && s.server.service.default_token.as_ref().map(|t| t.expose())
                        == Some(defaults::SIMULATOR_TOKEN)
            })
        }),
        row(
            "sim-job-duration",
            &["--simulate", "--sim-job-duration", "2s"],
            |a| {
                with(a, |s| {
                    s.simulator.as_ref().map(|c| c.job_duration) == Some(secs(2))
                })
            },
        ),
    ];
    let root = Cli::command();
    let all: BTreeSet<&str> = flags(subcommand(&root, "serve"))
        .iter()
        .filter_map(|a| a.get_long())
        .collect();
    let covered: BTreeSet<&str> = rows.iter().map(|(flag, ..)| *flag).collect();
    assert_eq!(covered, all, "every serve flag has a row");
    let no_flags = serve_args(&[]);
    for (flag, args, check) in &rows {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(check(&serve_args(&args)), "--{flag}: {args:?}");
        assert!(
            !check(&no_flags),
            "--{flag}: the check holds on the defaults"
        );
    }

    let cli = parse(&[
        "--log",
        "piclumen_grpc=debug",
        "--log-format",
        "json",
        "sim",
    ])
    .expect("parse globals");
    assert_eq!(
        (cli.log.as_str(), cli.log_format),
        ("piclumen_grpc=debug", LogFormat::Json)
    );
}

#[test]
fn every_sim_flag_reaches_its_setting() {
    type SimRow = (&'static str, &'static [&'static str], fn(&SimArgs) -> bool);
    let rows: [SimRow; 7] = [
        ("listen", &["--listen", "127.0.0.1:7001"], |a| {
            a.listen == SocketAddr::from(([127, 0, 0, 1], 7001))
        }),
        ("job-duration", &["--job-duration", "2s"], |a| {
            a.config().is_ok_and(|c| c.job_duration == secs(2))
        }),
        ("job-jitter", &["--job-jitter", "0.25"], |a| {
            a.config().is_ok_and(|c| c.job_jitter == 0.25)
        }),
        ("latency", &["--latency", "40ms"], |a| {
            a.config().is_ok_and(|c| c.latency == ms(40))
        }),
        ("fail-5xx-rate", &["--fail-5xx-rate", "0.5"], |a| {
            a.config().is_ok_and(|c| c.fail_5xx_rate == 0.5)
        }),
        ("fail-429-rate", &["--fail-429-rate", "0.75"], |a| {
            a.config().is_ok_and(|c| c.fail_429_rate == 0.75)
        }),
        ("tokens", &["--tokens", "a,,b"], |a| {
            a.config().is_ok_and(|c| c.tokens == ["a", "b"])
        }),
    ];
    let root = Cli::command();
    let all: BTreeSet<&str> = flags(subcommand(&root, "sim"))
        .iter()
        .filter_map(|a| a.get_long())
        .collect();
    let covered: BTreeSet<&str> = rows.iter().map(|(flag, ..)| *flag).collect();
    assert_eq!(covered, all, "every sim flag has a row");
    let no_flags = sim_args(&[]);
    for (flag, args, check) in rows {
        assert!(check(&sim_args(args)), "--{flag}: {args:?}");
        assert!(
            !check(&no_flags),
            "--{flag}: the check holds on the defaults"
        );
    }
}

#[test]
fn settings_refuse_what_cannot_work() {
    let err = |args: &[&str]| serve_args(args).settings(None).expect_err("refused");
    assert_eq!(
        err(&["--min-dimension", "600", "--max-dimension", "512"]),
        ConfigError::Dimensions { min: 600, max: 512 }
    );
    assert!(matches!(
        err(&["--upstream-url", "ftp://op:hunter2@h"]),
        ConfigError::UpstreamUrl(m) if !m.contains("hunter2")
    ));
    assert!(matches!(
        err(&["--upstream-url", "not a url"]),
        ConfigError::UpstreamUrl(_)
    ));
    for flag in ["--user-agent", "--origin", "--referer"] {
        assert_eq!(
            err(&[flag, "two\nlines"]),
            ConfigError::Header { flag },
            "{flag}"
        );
    }
    for token in ["", "  ", "has space", "line\nbreak", "caf\u{e9}"] {
        let message = err(&["--token", token]).to_string();
        assert!(message.starts_with("--token (PICLUMEN_TOKEN)"), "{message}");
    }
    assert!(matches!(
        serve_args(&[]).settings(Some("http")),
        Err(ConfigError::Port { .. })
    ));
    assert!(sim_args(&["--tokens", "a,b c"]).config().is_err());
}

#[test]
fn redaction_hides_only_the_userinfo() {
    for (url, shown) in [
        ("http://op:hunter2@127.0.0.1:9", "http://***@127.0.0.1:9"),
        ("https://op@h/p?q=a@b", "https://***@h/p?q=a@b"),
        ("http://127.0.0.1:9/a@b", "http://127.0.0.1:9/a@b"),
        ("https://api.piclumen.com", "https://api.piclumen.com"),
    ] {
        assert_eq!(config::redact_userinfo(url), shown);
    }
}

// === Through the binary ===

/// The binary with no `PICLUMEN_*`, `PORT` or `RUST_LOG` from the test's own
/// environment: each test says what it sets.
fn binary(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("PICLUMEN_") || name == "PORT" || name == "RUST_LOG" {
            cmd.env_remove(&*name);
        }
    }
    cmd
}

/// A running binary, killed (by its own handle) when dropped.
struct Running {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts the binary and waits for its `listening on ADDR` line.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = binary(args)
            .envs(env.iter().copied())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Logged before it is announced, so a test that has the
                // address also finds the line in the log.
                let addr = line.split("listening on ").nth(1).map(|rest| {
                    rest.split(|c: char| c.is_whitespace() || c == '"')
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                });
                sink.lock().expect("log lock").push(line);
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no listening line: {:?}", log.lock().expect("log lock"));
            }
        };
        Self { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    async fn client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }
}

/// Starts the binary where a test runtime is running: the wait for the
/// listening line blocks, so it runs off the runtime's workers.
async fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Running::start(&args, &env)
    })
    .await
    .expect("start task")
}

/// Runs the binary expecting it to stop by itself, unsuccessfully, without
/// ever listening; returns its stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = binary(args)
        .envs(env.iter().copied())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running with {args:?} {env:?}");
        }
        std::thread::sleep(ms(10));
    };
    let stderr = reader.join().expect("stderr reader");
    assert!(!status.success(), "{args:?} {env:?} exited 0: {stderr}");
    assert!(
        !stderr.contains("listening on"),
        "{args:?} {env:?} listened: {stderr}"
    );
    stderr
}

#[test]
fn bad_values_stop_the_binary_before_it_listens() {
    let listen = ["serve", "--listen", "127.0.0.1:0"];
    for (flag, value, range) in [
        ("--poll-interval", "0s", "accepted range: 250ms to 30days"),
        (
            "--poll-interval",
            "249ms",
            "accepted range: 250ms to 30days",
        ),
        ("--heartbeat", "0s", "accepted range: 1s to 30days"),
        ("--batch-max", "0", "accepted range: 1 to 500"),
        ("--batch-max", "501", "accepted range: 1 to 500"),
        ("--upstream-timeout", "0s", "more than 0s"),
        ("--upstream-connect-timeout", "0s", "more than 0s"),
        ("--failure-budget", "0s", "more than 0s"),
        ("--drain-timeout", "0s", "more than 0s"),
        ("--max-watch", "31days", "more than 0s, up to 30days"),
        ("--max-watches", "0", "accepted range: 1 to"),
        ("--max-prompt-chars", "0", "accepted range: 1 or more"),
    ] {
        let stderr = refused(&[&listen[..], &[flag, value]].concat(), &[]);
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag} "))
                && stderr.contains(range),
            "{flag} {value}: {stderr}"
        );
    }
    let stderr = refused(&listen, &[("PICLUMEN_TOKEN", "secret-part\nrest")]);
    assert!(stderr.contains("--token (PICLUMEN_TOKEN)"), "{stderr}");
    assert!(stderr.contains("printable ASCII"), "{stderr}");
    assert!(
        !stderr.contains("secret-part"),
        "the token is printed: {stderr}"
    );
    let stderr = refused(
        &[
            &listen[..],
            &["--min-dimension", "600", "--max-dimension", "512"],
        ]
        .concat(),
        &[],
    );
    assert!(
        stderr.contains("--min-dimension (600) must not exceed --max-dimension (512)"),
        "{stderr}"
    );
}

/// clap's refusal of `value` for `flag` (`--flag <NAME>`, or `--flag` for a
/// switch).
fn invalid_value(flag: &str, value: &str) -> String {
    let close = if value == "maybe" { "'" } else { " <" };
    format!("invalid value '{value}' for '{flag}{close}")
}

/// What each environment variable of `serve` and `sim` is set to, the
/// arguments it runs with, and a text its refusal must show: the binary
/// reading the variable for the right flag is the only way to get it.
fn env_cases(existing: &str) -> Vec<(&'static str, &'static str, String, Vec<String>, String)> {
    let listen = ["--listen", "127.0.0.1:0"];
    let tls = [
        &listen[..],
        &["--tls-cert", existing, "--tls-key", existing],
    ]
    .concat();
    let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut cases = Vec::new();
    let mut case = |sub, env, value: &str, args: &[&str], expect: &str| {
        cases.push((sub, env, value.to_owned(), owned(args), expect.to_owned()));
    };
    case(
        "serve",
        "PICLUMEN_LISTEN",
        "nope",
        &[],
        &invalid_value("--listen", "nope"),
    );
    case(
        "serve",
        "PICLUMEN_UPSTREAM_URL",
        "ftp://h",
        &listen,
        "--upstream-url",
    );
    case("serve", "PICLUMEN_TOKEN", "a b", &listen, "--token");
    for (env, value, flag) in [
        ("PICLUMEN_POLL_INTERVAL", "0s", "--poll-interval"),
        ("PICLUMEN_BATCH_MAX", "0", "--batch-max"),
        ("PICLUMEN_MAX_WATCH", "0s", "--max-watch"),
        ("PICLUMEN_HEARTBEAT", "0s", "--heartbeat"),
        ("PICLUMEN_MAX_WATCHES", "0", "--max-watches"),
        ("PICLUMEN_FAILURE_BUDGET", "0s", "--failure-budget"),
        ("PICLUMEN_UPSTREAM_TIMEOUT", "0s", "--upstream-timeout"),
        (
            "PICLUMEN_UPSTREAM_CONNECT_TIMEOUT",
            "0s",
            "--upstream-connect-timeout",
        ),
        ("PICLUMEN_IDEMPOTENCY_TTL", "0s", "--idempotency-ttl"),
        ("PICLUMEN_MIN_DIMENSION", "0", "--min-dimension"),
        ("PICLUMEN_MAX_DIMENSION", "0", "--max-dimension"),
        ("PICLUMEN_MAX_PROMPT_CHARS", "0", "--max-prompt-chars"),
        ("PICLUMEN_DRAIN_TIMEOUT", "0s", "--drain-timeout"),
        (
            "PICLUMEN_MAX_GENERATES_PER_TOKEN",
            "0",
            "--max-generates-per-token",
        ),
        ("PICLUMEN_MAX_REQUEST_BYTES", "0", "--max-request-bytes"),
        (
            "PICLUMEN_HTTP2_KEEPALIVE_INTERVAL",
            "0s",
            "--http2-keepalive-interval",
        ),
        (
            "PICLUMEN_HTTP2_KEEPALIVE_TIMEOUT",
            "0s",
            "--http2-keepalive-timeout",
        ),
        (
            "PICLUMEN_MAX_STREAMS_PER_CONNECTION",
            "0",
            "--max-streams-per-connection",
        ),
        (
            "PICLUMEN_ALLOW_UNAUTHENTICATED",
            "maybe",
            "--allow-unauthenticated",
        ),
        ("PICLUMEN_METRICS_LISTEN", "nope", "--metrics-listen"),
        ("PICLUMEN_HTTP_LISTEN", "nope", "--http-listen"),
        (
            "PICLUMEN_OTLP_ENDPOINT",
            "collector:4317",
            "--otlp-endpoint",
        ),
        (
            "PICLUMEN_IDEMPOTENCY_STORE",
            "mysql://h",
            "--idempotency-store",
        ),
        ("PICLUMEN_SIMULATE", "maybe", "--simulate"),
        ("PICLUMEN_SIM_JOB_DURATION", "0s", "--sim-job-duration"),
        ("PICLUMEN_LOG_FORMAT", "xml", "--log-format"),
        ("PICLUMEN_LOG", "piclumen_grpc=loud", "--log"),
    ] {
        case("serve", env, value, &listen, &invalid_value(flag, value));
    }
    for env in ["PICLUMEN_USER_AGENT", "PICLUMEN_ORIGIN", "PICLUMEN_REFERER"] {
        let flag = env["PICLUMEN_".len()..].to_lowercase().replace('_', "-");
        case(
            "serve",
            env,
            "two\nlines",
            &listen,
            &format!("--{flag} is not a valid HTTP header"),
        );
    }
    case(
        "serve",
        "PICLUMEN_API_KEYS_FILE",
        "/nonexistent/piclumen-keys",
        &listen,
        "--api-keys-file (PICLUMEN_API_KEYS_FILE): cannot read API keys file /nonexistent/piclumen-keys",
    );
    case(
        "serve",
        "PICLUMEN_CORS_ALLOW_ORIGIN",
        "https://a.example/path",
        &listen,
        "--cors-allow-origin \"https://a.example/path\" is not an origin",
    );
    let cert_only = [&listen[..], &["--tls-key", existing]].concat();
    case(
        "serve",
        "PICLUMEN_TLS_CERT",
        "/nonexistent/piclumen-cert",
        &cert_only,
        "/nonexistent/piclumen-cert",
    );
    let key_only = [&listen[..], &["--tls-cert", existing]].concat();
    case(
        "serve",
        "PICLUMEN_TLS_KEY",
        "/nonexistent/piclumen-key",
        &key_only,
        "/nonexistent/piclumen-key",
    );
    case(
        "serve",
        "PICLUMEN_TLS_CLIENT_CA",
        "/nonexistent/piclumen-ca",
        &tls,
        "/nonexistent/piclumen-ca",
    );
    case(
        "sim",
        "PICLUMEN_SIM_LISTEN",
        "nope",
        &[],
        &invalid_value("--listen", "nope"),
    );
    for (env, value, flag) in [
        ("PICLUMEN_SIM_JOB_DURATION", "0s", "--job-duration"),
        ("PICLUMEN_SIM_JOB_JITTER", "2", "--job-jitter"),
        ("PICLUMEN_SIM_LATENCY", "soon", "--latency"),
        ("PICLUMEN_SIM_FAIL_5XX_RATE", "2", "--fail-5xx-rate"),
        ("PICLUMEN_SIM_FAIL_429_RATE", "-1", "--fail-429-rate"),
    ] {
        case("sim", env, value, &listen, &invalid_value(flag, value));
    }
    case(
        "sim",
        "PICLUMEN_SIM_TOKENS",
        "a,b c",
        &listen,
        "--tokens (PICLUMEN_SIM_TOKENS)",
    );
    cases
}

#[test]
fn every_environment_variable_reaches_the_binary() {
    let existing = temp_file("exists.pem", "x");
    let cases = env_cases(path_str(&existing));
    let root = Cli::command();
    let mut expected = BTreeSet::new();
    for sub in ["serve", "sim"] {
        for arg in flags(subcommand(&root, sub))
            .into_iter()
            .chain(flags(&root))
        {
            let env = arg.get_env().expect("env").to_string_lossy().into_owned();
            if sub == "serve" || !env.starts_with("PICLUMEN_LOG") {
                expected.insert((sub, env));
            }
        }
    }
    let covered: BTreeSet<_> = cases
        .iter()
        .map(|(sub, env, ..)| (*sub, (*env).to_owned()))
        .collect();
    assert_eq!(covered, expected, "every variable has a case");
    for (sub, env, value, args, expect) in &cases {
        let args: Vec<&str> = [
            &[*sub][..],
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat();
        let stderr = refused(&args, &[(env, value)]);
        assert!(
            stderr.contains(expect.as_str()),
            "{env}={value:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_line_redacts_the_upstream_credentials() {
    let server = start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            "http://op:hunter2@127.0.0.1:9",
        ],
        &[],
    )
    .await;
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("listening line");
    assert!(line.contains("upstream=http://***@127.0.0.1:9"), "{line}");
    assert!(!log.contains("hunter2") && !log.contains("//op"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_applies() {
    let sim = Sim::start(long_jobs()).await;
    let upstream = sim.url();
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream-url",
        &upstream,
    ];
    let debug = start(&args, &[("PICLUMEN_LOG", "warn,piclumen_grpc=debug")]).await;
    let info = start(&args, &[]).await;
    for server in [&debug, &info] {
        let mut client = server.client().await;
        client
            .generate_image(authed(TOKEN, generate("p")))
            .await
            .expect("generate");
    }
    let answered = |s: &Running| s.log().contains("call answered");
    assert!(
        eventually(secs(10), || async { answered(&debug) }).await,
        "debug line missing: {}",
        debug.log()
    );
    assert!(!answered(&info), "debug line at info: {}", info.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_limits_reach_request_validation() {
    let sim = Sim::start(long_jobs()).await;
    let upstream = sim.url();
    let server = start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            &upstream,
            "--min-dimension",
            "128",
        ],
        &[
            ("PICLUMEN_MAX_DIMENSION", "512"),
            ("PICLUMEN_MAX_PROMPT_CHARS", "10"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let status = client
        .generate_image(authed(TOKEN, generate("eleven char")))
        .await
        .expect_err("prompt over the limit");
    assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert!(
        status.message().contains("11 characters, the limit is 10"),
        "{status:?}"
    );
    for width in [100, 600] {
        let mut request = generate("ten chars!");
        request.resolution = Some(pb::Resolution {
            width,
            height: 256,
            batch_size: 1,
        });
        let status = client
            .generate_image(authed(TOKEN, request))
            .await
            .expect_err("width out of range");
        assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
        assert!(
            status.message().contains("must be 128 to 512 pixels"),
            "{status:?}"
        );
    }
    let mut request = generate("ten chars!");
    request.resolution = Some(pb::Resolution {
        width: 512,
        height: 128,
        batch_size: 1,
    });
    client
        .generate_image(authed(TOKEN, request))
        .await
        .expect("at the limits");
    assert_eq!(sim.stat("create_calls").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_file_is_loaded_at_start() {
    let missing = "/nonexistent/piclumen-api-keys";
    let stderr = refused(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-keys-file",
            missing,
        ],
        &[],
    );
    assert!(
        stderr.contains(&format!("cannot read API keys file {missing}")),
        "{stderr}"
    );
    let empty = temp_file("empty-keys.txt", "# no key yet\n\n");
    let stderr = refused(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("PICLUMEN_API_KEYS_FILE", path_str(&empty))],
    );
    assert!(
        stderr.contains("the API keys file holds no key"),
        "{stderr}"
    );

    let sim = Sim::start(long_jobs()).await;
    let upstream = sim.url();
    let good = temp_file("good-keys.txt", "# callers\nkey-one\n  key-two  \n");
    let server = start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            &upstream,
            "--api-keys-file",
            path_str(&good),
        ],
        &[],
    )
    .await;
    let mut client = server.client().await;
    let status = client
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect_err("no key");
    assert_status(&status, Code::Unauthenticated, "API_KEY_MISSING");
    for (key, ok) in [("key-two", true), ("key-three", false)] {
        let mut request = authed(TOKEN, generate("p"));
        request
            .metadata_mut()
            .insert("x-api-key", key.parse().expect("ascii"));
        let result = client.generate_image(request).await;
        assert_eq!(result.is_ok(), ok, "{key}: {result:?}");
    }
    assert_eq!(sim.stat("create_calls").await, 1);
}

/// Opens a watch on each of three new jobs and waits until the hub has
/// polled them over several rounds; returns (status calls, ids asked).
async fn poll_three_watches(batch_max: Option<&str>) -> (u64, u64) {
    let sim = Sim::start(long_jobs()).await;
    let upstream = sim.url();
    let env: Vec<(&str, &str)> = batch_max
        .map(|b| ("PICLUMEN_BATCH_MAX", b))
        .into_iter()
        .collect();
    let server = start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream-url",
            &upstream,
            "--poll-interval",
            "250ms",
        ],
        &env,
    )
    .await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for n in 0..3 {
        let mark_id = client
            .generate_image(authed(TOKEN, generate(&format!("job {n}"))))
            .await
            .expect("generate")
            .into_inner()
            .mark_id;
        let watch = pb::WatchImageRequest { mark_id };
        let stream = client
            .watch_image(authed(TOKEN, watch))
            .await
            .expect("watch")
            .into_inner();
        streams.push(stream);
    }
    // Generous: a handful of 250 ms rounds, whatever the machine's load.
    let polled = eventually(secs(30), || async { sim.stat("status_ids").await >= 15 }).await;
    assert!(polled, "the hub polled too little: {}", sim.stats().await);
    drop(streams);
    (sim.stat("status_calls").await, sim.stat("status_ids").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_max_reaches_the_hub() {
    // One id per call: three watched jobs cost three calls a round.
    let (calls, ids) = poll_three_watches(Some("1")).await;
    assert_eq!(calls, ids, "every call asks for exactly one id");
    // The default batches them: after the first round, one call asks for all three.
    let (calls, ids) = poll_three_watches(None).await;
    assert!(ids > calls, "{ids} ids in {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_headers_from_the_environment_reach_piclumen() {
    // The flags themselves are covered in tests/contract.rs; this is the
    // environment's way in, as a container is usually configured.
    let sim = Sim::start(long_jobs()).await;
    let upstream = sim.url();
    let server = start(
        &["serve", "--listen", "127.0.0.1:0"],
        &[
            ("PICLUMEN_UPSTREAM_URL", &upstream),
            ("PICLUMEN_USER_AGENT", "Mozilla/5.0 (env agent)"),
            ("PICLUMEN_ORIGIN", "https://env.example"),
            ("PICLUMEN_REFERER", "https://env.example/create"),
            ("PICLUMEN_TOKEN", TOKEN),
        ],
    )
    .await;
    let mut client = server.client().await;
    client
        .generate_image(tonic::Request::new(generate("p")))
        .await
        .expect("generate with the default token");
    let headers = &sim.creates().await[0]["headers"];
    assert_eq!(
        headers["user-agent"], "Mozilla/5.0 (env agent)",
        "{headers}"
    );
    assert_eq!(headers["origin"], "https://env.example", "{headers}");
    assert_eq!(
        headers["referer"], "https://env.example/create",
        "{headers}"
    );
    assert_eq!(headers["authorization"], true, "{headers}");
}
