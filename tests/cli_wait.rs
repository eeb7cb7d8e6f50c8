//! The client's waiting forms, run as a child process against an
//! in-process server and simulator: `watch` of several ids on one
//! WatchImages stream (a line per job, an unknown id reported on its own
//! line while the others go on, the exit code of the worst outcome), and
//! `check --wait` answering at the job's next change.

mod common;

use common::{
    Harness, TOKEN,
    client::{client_args, one_json_object, run_client, stderr_of},
    long_jobs, server_config, start_job,
};
use serde_json::Value;

/// The `--json` object of a plain `check` of `mark_id`.
async fn check_json(server: &str, mark_id: &str, extra: &[&str]) -> (Value, String) {
    let args = [&[mark_id, "--json"][..], extra].concat();
    let output = run_client(&client_args("check", server, TOKEN, &args)).await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    (one_json_object(&output.stdout), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_several_ids_follows_every_job_to_its_end_on_one_stream() {
    let h = Harness::start().await;
    let server = h.url();
    let mut client = h.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(start_job(&mut client, TOKEN, &format!("a lighthouse {i}")).await);
    }
    let unknown = "no-such-job-of-this-token";
    let mut args: Vec<&str> = ids.iter().map(String::as_str).collect();
    args.extend([unknown, ids[0].as_str(), "--json"]);
    let output = run_client(&client_args("watch", &server, TOKEN, &args)).await;
    let stderr = stderr_of(&output);
    // Not found is a failed call: exit 3, yet every other job was followed
    // to its end and printed.
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let value = one_json_object(&output.stdout);
    let jobs = value["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4, "the repeated id once, in order: {value}");
    for (job, id) in jobs.iter().zip(&ids) {
        assert_eq!(job["mark_id"], id.as_str(), "{value}");
        assert_eq!(job["state"], "SUCCEEDED", "{value}");
        assert_eq!(job["images"].as_array().map(Vec::len), Some(1), "{value}");
        assert!(job["etag"].as_str().is_some_and(|e| !e.is_empty()), "{job}");
        // One progress line per change of each job, its end among them.
        assert!(
            stderr.contains(&format!("{id}: succeeded, 1 image(s)")),
            "{stderr}"
        );
    }
    assert_eq!(jobs[3]["mark_id"], unknown);
    assert_eq!(jobs[3]["error"]["code"], "NOT_FOUND", "{value}");
    assert!(jobs[3].get("state").is_none(), "{value}");
    assert!(
        stderr.contains(&format!("{unknown}: not found")),
        "the unknown id on its own line: {stderr}"
    );
    assert!(stderr.contains("not found: no-such-job"), "{stderr}");

    // All found and succeeded: exit 0, each job's line then its URL.
    let args: Vec<&str> = ids.iter().map(String::as_str).collect();
    let output = run_client(&client_args("watch", &server, TOKEN, &args)).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    for (pair, id) in lines.chunks(2).zip(&ids) {
        assert_eq!(pair[0], format!("{id}: succeeded, 1 image(s)"), "{stdout}");
        assert!(pair[1].starts_with("http"), "{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_several_ids_exits_1_when_a_job_failed() {
    let h = Harness::start().await;
    let server = h.url();
    let mut client = h.client().await;
    let good = start_job(&mut client, TOKEN, "a harbour").await;
    let bad = start_job(&mut client, TOKEN, "a castle [sim:fail]").await;
    let output = run_client(&client_args("watch", &server, TOKEN, &[&good, &bad])).await;
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.contains(&format!("{good}: succeeded")), "{stdout}");
    assert!(stdout.contains(&format!("{bad}: failed")), "{stdout}");
    assert!(stderr.contains(&format!("failed: {bad}")), "{stderr}");
}

/// Each `check --wait --etag` answers at a change: its etag differs from
/// the one it was given, until the job has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_wait_answers_at_each_change_until_the_end() {
    let h = Harness::start().await;
    let server = h.url();
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a lighthouse").await;
    let (mut job, _) = check_json(&server, &mark_id, &[]).await;
    let mut answers = 0;
    while job["state"] != "SUCCEEDED" {
        answers += 1;
        assert!(answers < 20, "no end after {answers} answers: {job}");
        let etag = job["etag"].as_str().expect("etag").to_owned();
        assert!(!etag.is_empty(), "{job}");
        let (next, stderr) =
            check_json(&server, &mark_id, &["--wait", "30s", "--etag", &etag]).await;
        assert_ne!(next["etag"], etag.as_str(), "answered without a change");
        assert!(!stderr.contains("no change"), "{stderr}");
        job = next;
    }
    assert_eq!(job["images"].as_array().map(Vec::len), Some(1), "{job}");

    // A finished job answers at once, whatever the etag.
    let (ended, _) = check_json(&server, &mark_id, &["--wait", "30s", "--etag", "x"]).await;
    assert_eq!(ended["etag"], job["etag"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_wait_without_an_etag_waits_for_the_next_change() {
    let h = Harness::start().await;
    let server = h.url();
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a lighthouse").await;
    let (job, stderr) = check_json(&server, &mark_id, &["--wait", "30s"]).await;
    assert!(!stderr.contains("no change"), "{stderr}");
    assert!(job["etag"].as_str().is_some_and(|e| !e.is_empty()), "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_wait_ends_with_the_unchanged_state_when_nothing_changes() {
    let h = Harness::with(long_jobs(), server_config()).await;
    let server = h.url();
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a slow lighthouse").await;
    let (job, _) = check_json(&server, &mark_id, &[]).await;
    let etag = job["etag"].as_str().expect("etag").to_owned();
    let (same, stderr) = check_json(&server, &mark_id, &["--wait", "1s", "--etag", &etag]).await;
    assert_eq!(same["etag"], etag.as_str(), "{same}");
    assert!(stderr.contains("no change within 1s"), "{stderr}");
}
