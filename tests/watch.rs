//! WatchImage end to end: the stream's shape, terminal states, deadlines,
//! heartbeats, retries through upstream trouble, and token isolation.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{
    pb::{self, JobState, image_service_client::ImageServiceClient},
    server::ServerConfig,
};
use serde_json::json;
use tonic::{Code, transport::Channel};

/// A server with `config` in front of a simulator whose jobs outlast any
/// test, a client of it, and the mark id of one job started: what each
/// test of how a watch ends starts from.
async fn one_long_job(config: ServerConfig) -> (Harness, ImageServiceClient<Channel>, String) {
    let h = Harness::with(long_jobs(), config).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "long").await;
    (h, client, mark_id)
}

#[tokio::test]
async fn watch_streams_each_change_and_ends_ok_on_success() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let request = pb::GenerateImageRequest {
        resolution: Some(pb::Resolution {
            width: 0,
            height: 0,
            batch_size: 3,
        }),
        ..generate("a magical landscape [sim:nsfw]")
    };
    let mark_id = client
        .generate_image(authed(TOKEN, request))
        .await
        .expect("generate")
        .into_inner()
        .mark_id;
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    end.expect("stream ends OK");
    let states = states(&messages);
    assert_eq!(states.first(), Some(&JobState::Pending), "{states:?}");
    assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");
    assert!(states.contains(&JobState::Running), "{states:?}");
    // Only changes are sent: no two messages alike, none a heartbeat.
    for pair in messages.windows(2) {
        assert_ne!(pair[0].job, pair[1].job);
    }
    assert!(messages.iter().all(|m| !m.heartbeat));
    let pending: Vec<i32> = messages
        .iter()
        .filter_map(|m| m.job.as_ref())
        .filter(|j| j.state() == JobState::Pending)
        .map(|j| j.queue_position)
        .collect();
    assert!(
        pending.windows(2).all(|w| w[0] > w[1]),
        "queue falls: {pending:?}"
    );
    let last = messages.last().and_then(|m| m.job.clone()).expect("job");
    assert_eq!(last.mark_id, mark_id);
    assert_eq!(last.upstream_status, "success");
    assert_eq!(last.images.len(), 3);
    for image in &last.images {
        assert!(
            image
                .url
                .starts_with(&format!("{}/_sim/images/", h.sim.url()))
                && image.url.contains(&mark_id),
            "{}",
            image.url
        );
        assert_eq!((image.width, image.height), (1344, 768));
        assert!(image.nsfw);
    }
}

#[tokio::test]
async fn watch_ends_ok_on_failure() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "doomed [sim:fail]").await;
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    end.expect("a failed job still ends the stream OK");
    let last = messages.last().and_then(|m| m.job.clone()).expect("job");
    assert_eq!(last.state(), JobState::Failed);
    assert_eq!(last.upstream_status, "failed");
    assert!(last.images.is_empty());
}

#[tokio::test]
async fn check_image_follows_the_job() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    let check = |id: &str| authed(TOKEN, check_request(id));
    let job = client
        .check_image(check(&mark_id))
        .await
        .expect("check")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.state(), JobState::Pending);
    assert!(job.queue_position > 0);
    // The simulated job takes 1.2 s; each check asks again.
    let finished = || {
        let mut client = client.clone();
        let request = check(&mark_id);
        async move {
            let job = client
                .check_image(request)
                .await
                .expect("check")
                .into_inner()
                .job
                .expect("job");
            (job.state() == JobState::Succeeded).then_some(job)
        }
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            finished().await.is_some()
        })
        .await,
        "the job never succeeded"
    );
    let job = finished().await.expect("still succeeded");
    assert_eq!(job.images.len(), 1);
}

#[tokio::test]
async fn tokens_never_see_each_others_jobs() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "private").await;
    let (messages, end) = collect_watch(&mut client, OTHER_TOKEN, &mark_id).await;
    assert!(messages.is_empty(), "nothing of A's job reaches B");
    assert_status(
        &end.expect_err("B cannot watch A's job"),
        Code::NotFound,
        "JOB_NOT_FOUND",
    );
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    end.expect("A watches its own job");
    assert_eq!(states(&messages).last(), Some(&JobState::Succeeded));
}

#[tokio::test]
async fn cancelling_a_watch_stops_its_polling() {
    let (h, mut client, mark_id) = one_long_job(server_config()).await;
    let (stream, _) = open_watch(&mut client, TOKEN, mark_id).await;
    // Polled every 200 ms while watched...
    assert!(
        eventually(Duration::from_secs(30), || async {
            h.sim.stat("status_calls").await >= 3
        })
        .await,
        "a watched job is polled"
    );
    drop(stream);
    // ...and not at all once the caller is gone: soon, no call for a while
    // (three poll intervals).
    let quiet = eventually(Duration::from_secs(30), || async {
        let before = h.sim.stat("status_calls").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        h.sim.stat("status_calls").await == before
    })
    .await;
    assert!(quiet, "polling stopped");
}

#[tokio::test]
async fn max_watch_time_ends_with_deadline_exceeded() {
    let mut config = server_config();
    config.service.max_watch = Duration::from_millis(600);
    let (_h, mut client, mark_id) = one_long_job(config).await;
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    assert!(!messages.is_empty());
    let status = end.expect_err("max watch");
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert!(status.message().contains("maximum watch time"));
}

#[tokio::test]
async fn caller_deadline_ends_a_watch_with_deadline_exceeded() {
    let (_h, mut client, mark_id) = one_long_job(server_config()).await;
    let mut request = authed(TOKEN, pb::WatchImageRequest { mark_id });
    request.set_timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let mut stream = client
        .watch_image(request)
        .await
        .expect("watch")
        .into_inner();
    let status = final_status(&mut stream)
        .await
        .expect("the stream must not end OK before the job");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn quiet_watches_get_heartbeats() {
    let mut config = server_config();
    config.service.heartbeat = Duration::from_millis(300);
    let (_h, mut client, mark_id) = one_long_job(config).await;
    let (mut stream, first) = open_watch(&mut client, TOKEN, mark_id).await;
    assert!(!first.heartbeat, "the first message is the state itself");
    // The queue index changes over 12 s; within ~1 s we see heartbeats that
    // repeat the current state.
    let mut heartbeats = 0;
    let mut last = first.job.clone();
    for _ in 0..4 {
        let m = stream.message().await.expect("next").expect("message");
        let observed = |job: &Option<pb::ImageJob>| {
            job.as_ref()
                .and_then(|j| j.observed_at)
                .map(|t| (t.seconds, t.nanos))
        };
        let without_age = |job: &Option<pb::ImageJob>| {
            job.clone().map(|j| pb::ImageJob {
                observed_at: None,
                ..j
            })
        };
        if m.heartbeat {
            heartbeats += 1;
            assert_eq!(
                without_age(&m.job),
                without_age(&last),
                "a heartbeat repeats the latest state"
            );
            // Confirmed again every round (200 ms): a heartbeat (300 ms)
            // says so rather than the age of the state it last sent.
            assert!(
                observed(&m.job) > observed(&last),
                "{:?} after {:?}",
                observed(&m.job),
                observed(&last)
            );
        }
        last = m.job.clone();
    }
    assert!(heartbeats >= 3, "got {heartbeats} heartbeats");
}

#[tokio::test]
async fn watch_rides_out_transient_upstream_trouble() {
    let h = Harness::with_upstream_timeout(Duration::from_millis(300)).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "p").await;
    h.sim.script(json!([
        {"endpoint": "status", "http_status": 503, "body": "busy", "times": 2},
        {"endpoint": "status", "http_status": 429, "body": "{}", "headers": {"Retry-After": "1"}},
        {"endpoint": "status", "delay_ms": 1000},
        {"endpoint": "status", "reset": true, "http_status": 200, "body": "{"}
    ]))
    .await;
    let (messages, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    end.expect("the watch recovers and ends OK");
    assert_eq!(states(&messages).last(), Some(&JobState::Succeeded));
    assert_eq!(
        h.sim.stat("scripted_faults").await,
        5,
        "every fault was met and retried"
    );
}

#[tokio::test]
async fn a_long_outage_ends_watches_with_unavailable() {
    let mut config = server_config();
    config.hub.failure_budget = Duration::from_millis(800);
    let (h, mut client, mark_id) = one_long_job(config).await;
    h.sim
        .script(json!([{"endpoint": "status", "http_status": 502, "body": "down", "times": 1000}]))
        .await;
    let (_, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    let status = end.expect_err("outage");
    assert_status(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert!(status.message().contains("502"), "{}", status.message());
}

#[tokio::test]
async fn watch_of_a_rejected_token_is_unauthenticated() {
    let mut sim = sim_config();
    sim.tokens = vec![piclumen_grpc::job::Token::parse(TOKEN).expect("token")];
    let h = Harness::with(sim, server_config()).await;
    let mut client = h.client().await;
    let (_, end) = collect_watch(&mut client, "intruder", "any-id").await;
    assert_status(
        &end.expect_err("rejected"),
        Code::Unauthenticated,
        "TOKEN_REJECTED",
    );
}
