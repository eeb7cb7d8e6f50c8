//! The flags and environment variables of `serve` and `sim`, parsed in
//! process (no binary, no environment): every flag is documented in the
//! README with its variable and default, reaches its own setting, `serve`
//! with no flags runs on the documented defaults, and settings that cannot
//! work are refused with the flag named.

mod common;

use std::{collections::BTreeSet, net::SocketAddr};

use clap::{ArgAction, CommandFactory, FromArgMatches};
use common::args::{flags, ms, path_str, secs, subcommand, temp_file};
use piclumen_grpc::{
    config::{self, Cli, ConfigError, LogFormat, ServeArgs, Settings, SimArgs},
    hub::{FleetPolling, HubConfig},
    idempotency::IdempotencyConfig,
    server::{self, ServerConfig},
    service::ServiceConfig,
    sim::{self, SimConfig},
    upstream::ClientConfig,
};

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
    assert_eq!(
        s.listen,
        SocketAddr::from(([0, 0, 0, 0], server::defaults::PORT))
    );
    assert!(s.simulator.is_none() && s.metrics_listen.is_none() && s.http_listen.is_none());
    // The Default impls parse no flags; the settings are the flags run
    // through `settings()`: equal only if it fills nothing by default.
    assert_eq!(
        format!("{:?}", s.server),
        format!("{:?}", ServerConfig::default())
    );
    assert_eq!(
        format!("{:?}", s.client),
        format!("{:?}", ClientConfig::default())
    );
    let ServerConfig {
        service,
        hub,
        idempotency,
        ..
    } = s.server;
    // Not exhaustive: a new setting's default is checked by the README
    // test above (the documented default against the flag's).
    let HubConfig {
        poll_interval,
        batch_max,
        gather,
        failure_budget,
        ..
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
        max_check_wait,
        max_watch_ids,
        ..
    } = service;
    let IdempotencyConfig {
        ttl,
        store,
        namespace,
    } = idempotency;
    assert_eq!(store.to_string(), "memory");
    assert!(namespace.is_none(), "derived from the upstream URL");
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
        (max_watch, heartbeat, ttl),
        (secs(30 * 60), secs(30), secs(600))
    );
    assert_eq!((max_watches, max_generates_per_token), (30_000, 16));
    assert_eq!((max_check_wait, max_watch_ids), (secs(60), 1000));
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
    let callers = temp_file(
        "callers.toml",
        &format!(
            "[[caller]]\nname = \"a\"\nkey_sha256 = \"{}\"\n",
            "0".repeat(64)
        ),
    );
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
        row("max-check-wait", &["--max-check-wait", "20s"], |a| {
            with(a, |s| s.server.service.max_check_wait == secs(20))
        }),
        row("max-watch-ids", &["--max-watch-ids", "7"], |a| {
            with(a, |s| s.server.service.max_watch_ids == 7)
        }),
        row("failure-budget", &["--failure-budget", "11s"], |a| {
            with(a, |s| s.server.hub.failure_budget == secs(11))
        }),
        row("stale-if-error", &["--stale-if-error", "0"], |a| {
            with(a, |s| s.server.hub.stale_if_error.is_zero())
        }),
        row("stale-if-error", &["--stale-if-error", "45s"], |a| {
            with(a, |s| s.server.hub.stale_if_error == secs(45))
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
            with(a, |s| s.server.idempotency.ttl == secs(17))
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
            "max-connection-age",
            &["--max-connection-age", "90s"],
            |a| with(a, |s| s.server.max_connection_age == secs(90)),
        ),
        row(
            "max-connection-age-grace",
            &["--max-connection-age-grace", "5s"],
            |a| with(a, |s| s.server.max_connection_age_grace == secs(5)),
        ),
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
            "callers-file",
            &["--callers-file", path_str(&callers)],
            |a| {
                with(a, |s| {
                    format!("{:?}", s.server.service.callers.directory)
                        == "Some(Directory(1 callers))"
                })
            },
        ),
        row("callers-fail-open", &["--callers-fail-open"], |a| {
            with(a, |s| s.server.service.callers.fail_open)
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
                    let policy = format!("{:?}", s.server.cors);
                    policy.contains("https://a.example") && policy.contains("http://localhost:5173")
                })
            },
        ),
        row(
            "idempotency-store",
            &["--idempotency-store", "redis://127.0.0.1:6379/2"],
            |a| {
                with(a, |s| {
                    s.server.idempotency.store.to_string() == "redis://127.0.0.1:6379/2"
                })
            },
        ),
        row(
            "store-namespace",
            &["--store-namespace", "team-a.prod"],
            |a| {
                with(a, |s| {
                    s.server
                        .idempotency
                        .namespace("https://api.piclumen.com")
                        .as_str()
                        == "team-a.prod"
                })
            },
        ),
        row("fleet-polling", &["--fleet-polling", "off"], |a| {
            with(a, |s| s.server.fleet_polling == FleetPolling::Off)
        }),
        row("simulate", &["--simulate"], |a| {
            with(a, |s| {
                s.simulator.is_some()
                    && s.server.service.default_token.as_ref().map(|t| t.expose())
                        == Some(sim::defaults::SIMULATOR_TOKEN)
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
            a.config()
                .is_ok_and(|c| c.tokens.iter().map(|t| t.expose()).eq(["a", "b"]))
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
    for namespace in ["", "team:a", "a b", &"n".repeat(65)] {
        let message = parse(&["serve", "--store-namespace", namespace])
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains("--store-namespace") && message.contains("A-Z, a-z, 0-9, `.`"),
            "{message}"
        );
    }
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
