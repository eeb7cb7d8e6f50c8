//! A total outage of Piclumen's status calls, shorter than
//! `--stale-if-error`, end to end over sockets: every check of a job whose
//! state was observed before it keeps answering, every watch ends SUCCEEDED
//! exactly once, and no create is sent twice; and a job created through
//! the server and never seen by a status call answers from its create's
//! reply when its first status call is rate limited, counted in
//! `piclumen_checks_stale_total`.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{pb, sim::SimConfig};
use serde_json::json;
use tokio::time::{Instant, sleep};

#[tokio::test]
async fn an_outage_shorter_than_stale_if_error_fails_no_check_of_an_observed_job() {
    let sim = SimConfig {
        job_duration: Duration::from_secs(4),
        ..sim_config()
    };
    let h = Harness::with(sim, server_config()).await;
    let mut client = h.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(start_job(&mut client, TOKEN, &format!("job {i}")).await);
    }
    let watches: Vec<_> = ids
        .iter()
        .map(|id| {
            let (mut client, id) = (client.clone(), id.clone());
            tokio::spawn(async move { collect_watch(&mut client, TOKEN, &id).await })
        })
        .collect();
    let check = |id: &String| authed(TOKEN, check_request(id.clone()));
    for id in &ids {
        client
            .check_image(check(id))
            .await
            .expect("observed before");
    }
    h.sim
        .script(json!([{"endpoint": "status", "http_status": 503, "body": "down", "duration_ms": 2000}]))
        .await;
    // Through the outage (2 s, inside the 30 s window) and a little after.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut answered = 0;
    while Instant::now() < until {
        for id in &ids {
            let job = client
                .check_image(check(id))
                .await
                .unwrap_or_else(|s| panic!("a check of {id} failed in the outage: {s:?}"))
                .into_inner()
                .job
                .expect("job");
            assert!(job.observed_at.is_some(), "{job:?}");
            answered += 1;
        }
        sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 25, "{answered} checks");
    assert!(
        h.sim.stat("status_failed").await > 0,
        "the outage never met a status call"
    );
    for watch in watches {
        let (messages, end) = watch.await.expect("joined");
        end.expect("the watch ends OK");
        let succeeded = states(&messages)
            .iter()
            .filter(|s| **s == pb::JobState::Succeeded)
            .count();
        assert_eq!(succeeded, 1, "{:?}", states(&messages));
    }
    assert_eq!(h.sim.stat("create_calls").await, 5, "no create sent twice");
}

#[tokio::test]
async fn a_new_job_answers_from_its_create_when_its_first_status_call_is_rate_limited() {
    let sim = Sim::start(long_jobs()).await;
    let metrics = unused_addr().to_string();
    let server = Process::serve_against(&sim.url(), &["--metrics-listen", &metrics], &[]);
    let mut client = server.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a first light").await;
    sim.script(
        json!([{"endpoint": "status", "http_status": 429, "headers": {"Retry-After": "100"}}]),
    )
    .await;
    let check = check_request(mark_id.clone());
    let job = bounded("CheckImage", client.check_image(authed(TOKEN, check)))
        .await
        .expect("the create's reply answers, not the 429")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.state(), pb::JobState::Pending, "{job:?}");
    assert!(job.observed_at.is_some(), "as of the create's reply");
    assert_eq!(sim.stat("status_calls").await, 1, "the 429 was met");
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    assert!(
        text.lines().any(|l| l == "piclumen_checks_stale_total 1"),
        "{text}"
    );
}
