//! The flags and environment variables as the binary reads them: a value
//! that cannot work stops it before it listens, naming the flag and its
//! range; every variable reaches the binary; and limits, API keys, the
//! batch size and the upstream headers set at start reach the behaviour.

mod common;

use std::collections::BTreeSet;

use clap::CommandFactory;
use common::{
    Process, Sim,
    args::{flags, path_str, secs, subcommand, temp_file},
    assert_api_key_missing, authed, eventually, generate, generate_refused, long_jobs,
    process::refused,
};
use piclumen_grpc::{
    config::Cli,
    pb::{self, image_service_client::ImageServiceClient},
};
use tonic::{Code, transport::Channel};

const TOKEN: &str = "config-token";

/// `serve --listen 127.0.0.1:0 ARGS...` with `env`, which must refuse to
/// start; its stderr.
fn refused_serve(args: &[&str], env: &[(&str, &str)]) -> String {
    refused(
        &[&["serve", "--listen", "127.0.0.1:0"][..], args].concat(),
        env,
    )
}

#[test]
fn bad_values_stop_the_binary_before_it_listens() {
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
        let stderr = refused_serve(&[flag, value], &[]);
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag} "))
                && stderr.contains(range),
            "{flag} {value}: {stderr}"
        );
    }
    let stderr = refused_serve(&[], &[("PICLUMEN_TOKEN", "secret-part\nrest")]);
    assert!(stderr.contains("--token (PICLUMEN_TOKEN)"), "{stderr}");
    assert!(stderr.contains("printable ASCII"), "{stderr}");
    assert!(
        !stderr.contains("secret-part"),
        "the token is printed: {stderr}"
    );
    let stderr = refused_serve(&["--min-dimension", "600", "--max-dimension", "512"], &[]);
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
    // The flag a variable stands for is its name less the prefix, in kebab
    // case: PICLUMEN_POLL_INTERVAL is --poll-interval.
    let flag_of = |prefix: &str, env: &str| {
        format!("--{}", env[prefix.len()..].to_lowercase().replace('_', "-"))
    };
    for (env, value) in [
        ("PICLUMEN_POLL_INTERVAL", "0s"),
        ("PICLUMEN_BATCH_MAX", "0"),
        ("PICLUMEN_MAX_WATCH", "0s"),
        ("PICLUMEN_HEARTBEAT", "0s"),
        ("PICLUMEN_MAX_WATCHES", "0"),
        ("PICLUMEN_FAILURE_BUDGET", "0s"),
        ("PICLUMEN_UPSTREAM_TIMEOUT", "0s"),
        ("PICLUMEN_UPSTREAM_CONNECT_TIMEOUT", "0s"),
        ("PICLUMEN_IDEMPOTENCY_TTL", "0s"),
        ("PICLUMEN_MIN_DIMENSION", "0"),
        ("PICLUMEN_MAX_DIMENSION", "0"),
        ("PICLUMEN_MAX_PROMPT_CHARS", "0"),
        ("PICLUMEN_DRAIN_TIMEOUT", "0s"),
        ("PICLUMEN_MAX_CONNECTION_AGE", "500ms"),
        ("PICLUMEN_MAX_CONNECTION_AGE_GRACE", "soon"),
        ("PICLUMEN_MAX_GENERATES_PER_TOKEN", "0"),
        ("PICLUMEN_MAX_REQUEST_BYTES", "0"),
        ("PICLUMEN_HTTP2_KEEPALIVE_INTERVAL", "0s"),
        ("PICLUMEN_HTTP2_KEEPALIVE_TIMEOUT", "0s"),
        ("PICLUMEN_MAX_STREAMS_PER_CONNECTION", "0"),
        ("PICLUMEN_ALLOW_UNAUTHENTICATED", "maybe"),
        ("PICLUMEN_CALLERS_FAIL_OPEN", "maybe"),
        ("PICLUMEN_METRICS_LISTEN", "nope"),
        ("PICLUMEN_HTTP_LISTEN", "nope"),
        ("PICLUMEN_OTLP_ENDPOINT", "collector:4317"),
        ("PICLUMEN_IDEMPOTENCY_STORE", "mysql://h"),
        ("PICLUMEN_STORE_NAMESPACE", "team:a"),
        ("PICLUMEN_SIMULATE", "maybe"),
        ("PICLUMEN_FLEET_POLLING", "sometimes"),
        ("PICLUMEN_SIM_JOB_DURATION", "0s"),
        ("PICLUMEN_LOG_FORMAT", "xml"),
        ("PICLUMEN_LOG", "piclumen_grpc=loud"),
    ] {
        let flag = flag_of("PICLUMEN_", env);
        case("serve", env, value, &listen, &invalid_value(&flag, value));
    }
    for env in ["PICLUMEN_USER_AGENT", "PICLUMEN_ORIGIN", "PICLUMEN_REFERER"] {
        let flag = flag_of("PICLUMEN_", env);
        case(
            "serve",
            env,
            "two\nlines",
            &listen,
            &format!("{flag} is not a valid HTTP header"),
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
        "PICLUMEN_CALLERS_FILE",
        "/nonexistent/piclumen-callers",
        &listen,
        "--callers-file (PICLUMEN_CALLERS_FILE): cannot read /nonexistent/piclumen-callers",
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
    for (env, value) in [
        ("PICLUMEN_SIM_JOB_DURATION", "0s"),
        ("PICLUMEN_SIM_JOB_JITTER", "2"),
        ("PICLUMEN_SIM_LATENCY", "soon"),
        ("PICLUMEN_SIM_FAIL_5XX_RATE", "2"),
        ("PICLUMEN_SIM_FAIL_429_RATE", "-1"),
    ] {
        let flag = flag_of("PICLUMEN_SIM_", env);
        case("sim", env, value, &listen, &invalid_value(&flag, value));
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

/// A case for a variable `env_cases` leaves out, when its flag takes a
/// duration or a number (told by its default): a value no duration or
/// number parser accepts, which the binary must refuse for that flag. So a
/// new flag of those kinds needs no line here.
fn derived_case(arg: &clap::Arg) -> Option<(String, &'static str, String)> {
    let default = arg.get_default_values().first()?.to_str()?;
    let value = if humantime::parse_duration(default).is_ok() {
        "soon"
    } else if default.parse::<f64>().is_ok() {
        "many"
    } else {
        return None;
    };
    let env = arg.get_env()?.to_str()?.to_owned();
    let flag = format!("--{}", arg.get_long()?);
    Some((env, value, invalid_value(&flag, value)))
}

#[test]
fn every_environment_variable_reaches_the_binary() {
    let existing = temp_file("exists.pem", "x");
    let mut cases: Vec<_> = env_cases(path_str(&existing))
        .into_iter()
        .map(|(sub, env, value, args, expect)| (sub, env.to_owned(), value, args, expect))
        .collect();
    let root = Cli::command();
    let mut expected = BTreeSet::new();
    for sub in ["serve", "sim"] {
        for arg in flags(subcommand(&root, sub))
            .into_iter()
            .chain(flags(&root))
        {
            let env = arg.get_env().expect("env").to_string_lossy().into_owned();
            if sub == "serve" || !env.starts_with("PICLUMEN_LOG") {
                expected.insert((sub, env.clone()));
            }
            let listed = cases.iter().any(|(s, e, ..)| *s == sub && *e == env);
            if let Some((env, value, expect)) = derived_case(arg).filter(|_| !listed) {
                let args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
                cases.push((sub, env, value.to_owned(), args, expect));
            }
        }
    }
    let covered: BTreeSet<_> = cases
        .iter()
        .map(|(sub, env, ..)| (*sub, env.clone()))
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

/// `request` is refused as INVALID_REQUEST, its message saying `says`.
async fn assert_invalid(
    client: &mut ImageServiceClient<Channel>,
    request: pb::GenerateImageRequest,
    says: &str,
) {
    let request = authed(TOKEN, request);
    let status = generate_refused(client, request, Code::InvalidArgument, "INVALID_REQUEST").await;
    assert!(status.message().contains(says), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_limits_reach_request_validation() {
    let sim = Sim::start(long_jobs()).await;
    let server = Process::serve_against_async(
        &sim.url(),
        &["--min-dimension", "128"],
        &[
            ("PICLUMEN_MAX_DIMENSION", "512"),
            ("PICLUMEN_MAX_PROMPT_CHARS", "10"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let request = generate("eleven char");
    assert_invalid(&mut client, request, "11 characters, the limit is 10").await;
    for width in [100, 600] {
        let mut request = generate("ten chars!");
        request.resolution = Some(pb::Resolution {
            width,
            height: 256,
            batch_size: 1,
        });
        assert_invalid(&mut client, request, "must be 128 to 512 pixels").await;
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
    let stderr = refused_serve(&["--api-keys-file", missing], &[]);
    assert!(
        stderr.contains(&format!("cannot read API keys file {missing}")),
        "{stderr}"
    );
    let empty = temp_file("empty-keys.txt", "# no key yet\n\n");
    let stderr = refused_serve(&[], &[("PICLUMEN_API_KEYS_FILE", path_str(&empty))]);
    assert!(
        stderr.contains("the API keys file holds no key"),
        "{stderr}"
    );

    let sim = Sim::start(long_jobs()).await;
    let good = temp_file("good-keys.txt", "# callers\nkey-one\n  key-two  \n");
    let server =
        Process::serve_against_async(&sim.url(), &["--api-keys-file", path_str(&good)], &[]).await;
    let mut client = server.client().await;
    assert_api_key_missing(&mut client, TOKEN).await;
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
    let env: Vec<(&str, &str)> = batch_max
        .map(|b| ("PICLUMEN_BATCH_MAX", b))
        .into_iter()
        .collect();
    let server =
        Process::serve_against_async(&sim.url(), &["--poll-interval", "250ms"], &env).await;
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
    let server = Process::start_async(
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
