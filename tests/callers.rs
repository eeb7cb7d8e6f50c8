//! Named callers end to end: three real `serve` replicas (child processes)
//! sharing one real `redis-server` and one simulator, a callers file with
//! `batch` (10 images a day) and `web` (no limit), each with a Piclumen
//! token of its own. The simulator's jobs, counted by the SHA-256 of the
//! token that paid for them, are the ground truth.

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::{collections::HashMap, path::Path, time::Duration};

use common::{
    args::{path_str, secs},
    process::command,
    *,
};
use piclumen_grpc::{
    pb::{self, image_service_client::ImageServiceClient},
    support::hex,
};
use redis_server::Redis;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

const BATCH_KEY: &str = "batch-key-s3cret-1";
const WEB_KEY: &str = "web-key-s3cret-2";
const BATCH_TOKEN: &str = "batch-token-s3cret";
const WEB_TOKEN: &str = "web-token-s3cret";
const SECRETS: [&str; 4] = [BATCH_KEY, WEB_KEY, BATCH_TOKEN, WEB_TOKEN];

fn sha256(text: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

fn callers_file(batch_per_day: u64) -> String {
    format!(
        "# who spends the account\n\
         [[caller]]\nname = \"batch\"\nkey_sha256 = \"{}\"\nimages_per_day = {batch_per_day}\ntoken = \"{BATCH_TOKEN}\"\n\n\
         [[caller]]\nname = \"web\"\nkey_sha256 = [\"{}\"]\ntoken = \"{WEB_TOKEN}\"\n",
        sha256(BATCH_KEY),
        sha256(WEB_KEY)
    )
}

/// Replaces the file whole, as a Secret update does (a new file renamed
/// over the old one).
fn rewrite(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).expect("write");
    std::fs::rename(&next, path).expect("rename");
}

fn as_caller<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", key.parse().expect("ascii key"));
    request
}

/// Jobs the simulator holds, per SHA-256 of the token that created them.
async fn creates_per_token(sim: &Sim) -> HashMap<String, u64> {
    let jobs = sim
        .http
        .get(format!("{}/_sim/jobs", sim.url()))
        .send()
        .await
        .expect("jobs")
        .bytes()
        .await
        .map(|b| serde_json::from_slice::<serde_json::Value>(&b).expect("json"))
        .expect("body");
    let mut counts = HashMap::new();
    for job in jobs.as_object().expect("object").values() {
        let token = job["token_sha256"].as_str().expect("hash").to_owned();
        *counts.entry(token).or_default() += job["images"].as_u64().expect("images");
    }
    counts
}

/// `n` concurrent GenerateImage calls of `key`, spread over `clients`.
async fn burst(
    clients: &[ImageServiceClient<Channel>],
    key: &str,
    n: usize,
) -> Vec<Result<(), Status>> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = as_caller(key, generate(&format!("{key} {i}")));
            tokio::spawn(async move { client.generate_image(request).await.map(|_| ()) })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.expect("join"));
    }
    results
}

/// Checks the refusals are the caller's quota, with its details.
fn assert_quota_refusals(results: &[Result<(), Status>], expected_ok: usize) {
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, expected_ok, "{results:?}");
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_status(status, Code::ResourceExhausted, "CALLER_QUOTA_EXCEEDED");
        let details = status.get_error_details();
        let quota = details.quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations[0].subject, "caller:batch");
        assert!(
            quota.violations[0]
                .description
                .starts_with("images_per_day")
        );
        let retry = details.retry_info().expect("RetryInfo");
        assert!(
            retry
                .retry_delay
                .is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(86_400))
        );
    }
}

async fn metrics_of(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

fn usage(file: &Path, redis: &Redis, sim: &Sim, json: bool) -> String {
    let mut args = vec!["usage", "--callers-file", path_str(file), "--upstream-url"];
    let (url, store) = (sim.url(), redis.url());
    args.extend([url.as_str(), "--idempotency-store", store.as_str()]);
    if json {
        args.push("--json");
    }
    let output = command(&args).output().expect("usage");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test]
async fn a_callers_budget_holds_across_three_replicas_and_reloads_without_a_restart() {
    let redis = Redis::start();
    let sim = Sim::start(long_jobs()).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("callers.toml");
    std::fs::write(&file, callers_file(10)).expect("write");
    let (upstream, store) = (sim.url(), redis.url());
    let metrics: Vec<_> = (0..3).map(|_| unused_addr()).collect();
    let fleet: Vec<Process> = metrics
        .iter()
        .map(|addr| {
            let addr = addr.to_string();
            Process::serve_against(
                &upstream,
                &[
                    "--callers-file",
                    path_str(&file),
                    "--max-generates-per-token",
                    "100",
                    "--metrics-listen",
                    &addr,
                ],
                &[("PICLUMEN_IDEMPOTENCY_STORE", store.as_str())],
            )
        })
        .collect();
    let mut clients = Vec::new();
    for replica in &fleet {
        clients.push(replica.client().await);
    }

    // 30 of batch at once, over the three replicas, while web creates freely.
    let (batch, web) = tokio::join!(burst(&clients, BATCH_KEY, 30), burst(&clients, WEB_KEY, 12));
    assert_quota_refusals(&batch, 10);
    assert!(web.iter().all(Result::is_ok), "{web:?}");
    let counts = creates_per_token(&sim).await;
    assert_eq!(counts.get(&sha256(BATCH_TOKEN)), Some(&10));
    assert_eq!(counts.get(&sha256(WEB_TOKEN)), Some(&12));

    // The limit raised to 15: SIGHUP to each replica, with web's calls
    // running through the reload.
    let during = {
        let clients = clients.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..6 {
                results.extend(burst(&clients, WEB_KEY, 3).await);
            }
            results
        })
    };
    rewrite(&file, &callers_file(15));
    for replica in &fleet {
        replica.signal("HUP");
    }
    let reloaded = eventually(secs(10), || async {
        fleet
            .iter()
            .all(|r| r.log_text().contains("callers file reloaded"))
    })
    .await;
    assert!(reloaded, "every replica reloads the file");
    let during = during.await.expect("join");
    assert!(
        during.iter().all(Result::is_ok),
        "no call dropped: {during:?}"
    );
    let batch = burst(&clients, BATCH_KEY, 30).await;
    assert_quota_refusals(&batch, 5);
    let counts = creates_per_token(&sim).await;
    assert_eq!(counts.get(&sha256(BATCH_TOKEN)), Some(&15));
    let web_images = counts[&sha256(WEB_TOKEN)];
    assert_eq!(web_images, 12 + 18);

    // The bill: usage and the metrics agree with the simulator.
    let report: serde_json::Value =
        serde_json::from_str(&usage(&file, &redis, &sim, true)).expect("json");
    let line = |name: &str| {
        report["callers"]
            .as_array()
            .expect("callers")
            .iter()
            .find(|c| c["caller"] == name)
            .cloned()
            .expect("caller line")
    };
    assert_eq!(line("batch")["images_today"], 15);
    assert_eq!(line("batch")["images_this_month"], 15);
    assert_eq!(line("batch")["left"]["images_today"], 0);
    assert_eq!(line("web")["images_today"], web_images);
    let table = usage(&file, &redis, &sim, false);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("batch") && l.contains(" 15 ")),
        "{table}"
    );
    let mut scraped = String::new();
    for addr in &metrics {
        scraped.push_str(&metrics_of(*addr).await);
    }
    let total = |prefix: &str| -> f64 {
        scraped
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        total("piclumen_caller_images_total{caller=\"batch\"}"),
        15.0
    );
    assert_eq!(
        total("piclumen_caller_refusals_total{caller=\"batch\",limit=\"images_per_day\"}"),
        45.0
    );
    assert!(
        scraped.contains(
            "piclumen_caller_calls_total{caller=\"web\",rpc=\"GenerateImage\",code=\"OK\"}"
        ),
        "{scraped}"
    );

    // The caller's name is on the call's log lines; no key or token is
    // anywhere.
    let logs: String = fleet.iter().map(Process::log_text).collect();
    assert!(
        logs.contains("caller=batch") || logs.contains("caller=\"batch\""),
        "{logs}"
    );
    for secret in SECRETS {
        for (what, text) in [("logs", &logs), ("metrics", &scraped), ("usage", &table)] {
            assert!(!text.contains(secret), "{secret} in {what}");
        }
        assert!(!report.to_string().contains(secret));
    }
}

#[tokio::test]
async fn a_file_that_does_not_parse_is_refused_at_start_and_on_reload() {
    let sim = Sim::start(sim_config()).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("callers.toml");
    std::fs::write(
        &file,
        "[[caller]]\nname = \"a\"\nkey_sha256 = \"not-a-hash\"\n",
    )
    .expect("write");
    let error = common::process::refused(
        &common::process::serve_args(&sim.url(), &["--callers-file", path_str(&file)]),
        &[],
    );
    assert!(
        error.contains("line 1") && error.contains("64 lowercase hex"),
        "{error}"
    );

    std::fs::write(&file, callers_file(1)).expect("write");
    let http = unused_addr().to_string();
    let server = Process::serve_against(
        &sim.url(),
        &["--callers-file", path_str(&file), "--http-listen", &http],
        &[],
    );
    let mut client = server.client().await;
    client
        .generate_image(as_caller(BATCH_KEY, generate("one")))
        .await
        .expect("first");
    // A broken version is refused; the one in force stays (batch still at 1).
    rewrite(
        &file,
        &format!("{}\n[[caller]]\nname = \"batch\"\n", callers_file(100)),
    );
    server.signal("HUP");
    let refused = eventually(secs(10), || async {
        server.log_text().contains("callers file refused")
    })
    .await;
    assert!(refused, "{}", server.log_text());
    assert!(
        server.log_text().contains("a second caller named"),
        "{}",
        server.log_text()
    );
    let status = client
        .generate_image(as_caller(BATCH_KEY, generate("two")))
        .await
        .expect_err("still 1 a day");
    assert_status(&status, Code::ResourceExhausted, "CALLER_QUOTA_EXCEEDED");
    // Over HTTP: 429 with Retry-After.
    let reply = reqwest::Client::new()
        .post(format!(
            "http://{http}/generate-image?authorization_token=t"
        ))
        .header("x-api-key", BATCH_KEY)
        .header("content-type", "application/json")
        .body(r#"{"prompt": "over http"}"#)
        .send()
        .await
        .expect("http");
    assert_eq!(reply.status().as_u16(), 429);
    let retry_after: u64 = reply.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    assert!(
        reply
            .text()
            .await
            .expect("body")
            .contains("CALLER_QUOTA_EXCEEDED")
    );
    // A named caller need not hold a Piclumen token over HTTP either: its
    // own pays. Without a key the token stays required, as it was.
    let http_generate = |key: Option<&str>| {
        let request = reqwest::Client::new()
            .post(format!("http://{http}/generate-image"))
            .header("content-type", "application/json")
            .body(r#"{"prompt": "no token"}"#);
        match key {
            Some(key) => request.header("x-api-key", key),
            None => request,
        }
        .send()
    };
    let reply = http_generate(Some(WEB_KEY)).await.expect("http");
    assert_eq!(reply.status().as_u16(), 200, "{:?}", reply.text().await);
    let creates = creates_per_token(&sim).await;
    assert_eq!(creates.get(&sha256(WEB_TOKEN)), Some(&1), "{creates:?}");
    let reply = http_generate(None).await.expect("http");
    assert_eq!(reply.status().as_u16(), 422);
    // Unknown keys: UNAUTHENTICATED, as before callers.
    let status = client
        .generate_image(as_caller("nobody", generate("three")))
        .await
        .expect_err("unknown");
    assert_status(&status, Code::Unauthenticated, "API_KEY_INVALID");
    // Changing the file is enough: no signal.
    rewrite(&file, &callers_file(2));
    let reloaded = eventually(secs(10), || async {
        let mut client = client.clone();
        client
            .generate_image(as_caller(BATCH_KEY, generate("four")))
            .await
            .is_ok()
    })
    .await;
    assert!(reloaded, "{}", server.log_text());
}

#[tokio::test]
async fn hash_key_reads_the_key_from_stdin() {
    use std::io::Write;
    let mut child = command(&["hash-key"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hash-key");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{BATCH_KEY}\n").as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        sha256(BATCH_KEY)
    );
}

#[tokio::test]
async fn a_watch_of_many_jobs_frees_the_callers_place_of_each_job_that_ends() {
    let sim = Sim::start(long_jobs()).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("callers.toml");
    let text = format!(
        "[[caller]]\nname = \"w\"\nkey_sha256 = \"{}\"\nmax_watches = 2\ntoken = \"{WEB_TOKEN}\"\n",
        sha256(WEB_KEY)
    );
    std::fs::write(&file, text).expect("write");
    let server = Process::serve_against(&sim.url(), &["--callers-file", path_str(&file)], &[]);
    let mut client = server.client().await;
    let mark_id = client
        .generate_image(as_caller(WEB_KEY, generate("a long night")))
        .await
        .expect("created")
        .into_inner()
        .mark_id;
    let watch_one = || pb::WatchImageRequest {
        mark_id: mark_id.clone(),
    };
    // Two jobs on one stream take both places; the unknown one ends at once.
    let ids = vec![mark_id.clone(), "no-such-job".to_owned()];
    let mut many = client
        .watch_images(as_caller(WEB_KEY, pb::WatchImagesRequest { mark_ids: ids }))
        .await
        .expect("both places")
        .into_inner();
    loop {
        let message = bounded("WatchImages", many.message())
            .await
            .expect("stream")
            .expect("open");
        if message.error.is_some() {
            break;
        }
    }
    // Its place is free again: one more watch fits, a second does not.
    let mut one = client
        .watch_image(as_caller(WEB_KEY, watch_one()))
        .await
        .expect("the ended job's place")
        .into_inner();
    bounded("WatchImage", one.message())
        .await
        .expect("first state")
        .expect("open");
    let refused = client
        .watch_image(as_caller(WEB_KEY, watch_one()))
        .await
        .expect_err("two places taken");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
}
