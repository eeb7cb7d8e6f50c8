//! The polling hub at scale, measured through the simulator's counters:
//! batching, sharing, token isolation, forgetting, and per-token backoff.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::pb::{self, JobState, image_service_client::ImageServiceClient};
use serde_json::json;
use tonic::{Code, Streaming, transport::Channel};

const INTERVAL: Duration = Duration::from_millis(300);

fn hub_config() -> piclumen_grpc::server::ServerConfig {
    let mut config = server_config();
    config.hub.poll_interval = INTERVAL;
    // These tests start hundreds of jobs of one token at once; the
    // per-token GenerateImage guard has its own test.
    config.service.max_generates_per_token = 10_000;
    config
}

/// Opens `n` connections, as many independent callers would.
async fn clients(h: &Harness, n: usize) -> Vec<ImageServiceClient<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(h.client().await);
    }
    out
}

async fn start_jobs(clients: &[ImageServiceClient<Channel>], token: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let token = token.to_owned();
            tokio::spawn(async move { start_job(&mut client, &token, &format!("job {i}")).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("join"));
    }
    ids
}

async fn open_watch(
    client: &mut ImageServiceClient<Channel>,
    token: &str,
    mark_id: &str,
) -> Streaming<pb::WatchImageResponse> {
    client
        .watch_image(authed(
            token,
            pb::WatchImageRequest {
                mark_id: mark_id.into(),
            },
        ))
        .await
        .expect("watch")
        .into_inner()
}

/// Reads a watch to its end; returns the states seen and how it ended.
async fn drain(
    mut stream: Streaming<pb::WatchImageResponse>,
) -> (Vec<JobState>, Result<(), tonic::Status>) {
    let mut seen = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => seen.push(m.job.expect("job").state()),
            Ok(None) => return (seen, Ok(())),
            Err(status) => return (seen, Err(status)),
        }
    }
}

/// Calls and ids the simulator received during `window`.
async fn rate(h: &Harness, window: Duration) -> (f64, f64) {
    let (c0, i0) = (
        h.sim.stat("status_calls").await,
        h.sim.stat("status_ids").await,
    );
    tokio::time::sleep(window).await;
    let (c1, i1) = (
        h.sim.stat("status_calls").await,
        h.sim.stat("status_ids").await,
    );
    let rounds = window.as_secs_f64() / INTERVAL.as_secs_f64();
    ((c1 - c0) as f64 / rounds, (i1 - i0) as f64 / rounds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_watches_share_batched_polls() {
    // End to end and on the wall clock, so bounds are generous: the exact
    // counts and timings are pinned on paused time in `src/hub/tests/`.
    let h = Harness::with(long_jobs(), hub_config()).await;
    let clients = clients(&h, 8).await;
    let ids = start_jobs(&clients, TOKEN, 400).await;
    let mut streams = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        streams.push(open_watch(&mut client, TOKEN, id).await);
    }
    // Every watch gets its first state.
    for stream in &mut streams {
        let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a first state in time")
            .expect("stream")
            .expect("message");
        assert_eq!(first.job.expect("job").mark_id.len(), 32);
    }
    // Steady state: ceil(400 / 50) = 8 calls a round, 400 ids a round (jobs
    // outlast the test). Under load rounds may stretch, never multiply.
    let (calls, ids_per_round) = rate(&h, INTERVAL * 10).await;
    assert!(
        calls <= 8.0 * 1.5,
        "{calls} calls per round, expected about 8"
    );
    assert!(
        ids_per_round <= 400.0 * 1.5,
        "{ids_per_round} ids per round, expected about 400"
    );
    let status_calls = h.sim.stat("status_calls").await;
    let status_ids = h.sim.stat("status_ids").await;
    assert!(
        status_ids / status_calls >= 25,
        "{status_ids} ids in {status_calls} calls: batches too small"
    );
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_watchers_of_one_job_share_one_poll() {
    let mut sim = sim_config();
    sim.job_duration = Duration::from_secs(3);
    let h = Harness::with(sim, hub_config()).await;
    let clients = clients(&h, 4).await;
    let mark_id = start_jobs(&clients, TOKEN, 1).await.remove(0);
    let mut watchers = Vec::new();
    for i in 0..100 {
        let mut client = clients[i % clients.len()].clone();
        watchers.push(tokio::spawn(drain(
            open_watch(&mut client, TOKEN, &mark_id).await,
        )));
    }
    tokio::time::sleep(INTERVAL).await;
    let (calls, ids) = rate(&h, INTERVAL * 4).await;
    assert!(
        calls <= 1.5 && ids <= 1.5,
        "{calls} calls and {ids} ids a round for one job"
    );
    let mut sequences = Vec::new();
    for w in watchers {
        let (seen, end) = w.await.expect("join");
        end.expect("watch ends OK");
        sequences.push(seen);
    }
    let reference = &sequences[0];
    assert!(reference.contains(&JobState::Pending) && reference.contains(&JobState::Running));
    assert_eq!(reference.last(), Some(&JobState::Succeeded));
    for s in &sequences {
        // Every watcher saw each state change, ending with the terminal one.
        let mut distinct = s.clone();
        distinct.dedup();
        let mut expected = reference.clone();
        expected.dedup();
        assert_eq!(distinct, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tokens_watching_one_mark_id_get_their_own_answers() {
    let h = Harness::with(sim_config(), hub_config()).await;
    let clients = clients(&h, 2).await;
    let mark_id = start_jobs(&clients, TOKEN, 1).await.remove(0);
    let (mut a, mut b) = (clients[0].clone(), clients[1].clone());
    let owner = tokio::spawn(drain(open_watch(&mut a, TOKEN, &mark_id).await));
    let stranger = tokio::spawn(drain(open_watch(&mut b, OTHER_TOKEN, &mark_id).await));
    let (seen, end) = owner.await.expect("join");
    end.expect("owner's watch ends OK");
    assert_eq!(seen.last(), Some(&JobState::Succeeded));
    let (seen, end) = stranger.await.expect("join");
    assert!(
        seen.is_empty(),
        "nothing fetched with A's token reached B: {seen:?}"
    );
    assert_eq!(end.expect_err("B's own answer").code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_watches_are_forgotten_within_two_rounds() {
    let sim = long_jobs();
    let h = Harness::with(sim, hub_config()).await;
    let clients = clients(&h, 4).await;
    let ids = start_jobs(&clients, TOKEN, 200).await;
    let mut streams = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        let mut stream = open_watch(&mut client, TOKEN, id).await;
        stream.message().await.expect("first").expect("message");
        streams.push(stream);
    }
    let (_, before) = rate(&h, INTERVAL * 10).await;
    assert!(before >= 100.0, "{before} ids a round for 200 watches");
    streams.truncate(100);
    // The 100 closed watches are forgotten: fewer ids a round than before.
    // (Exact figures are pinned on paused time in `src/hub/tests/`.)
    let forgotten = eventually(Duration::from_secs(20), || async {
        let (_, after) = rate(&h, INTERVAL * 5).await;
        after > 0.0 && after <= before * 0.75
    })
    .await;
    assert!(forgotten, "closed watches are still polled");
    drop(streams);
    // An idle hub makes no upstream calls.
    let idle = eventually(Duration::from_secs(20), || async {
        rate(&h, INTERVAL * 3).await.0 == 0.0
    })
    .await;
    assert!(idle, "an idle hub still calls upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_does_not_hold_up_the_others() {
    let mut sim = sim_config();
    sim.job_duration = Duration::from_secs(2);
    let mut config = hub_config();
    // Many messages for the stalled reader to not read.
    config.service.heartbeat = Duration::from_millis(20);
    let h = Harness::with(sim, config).await;
    let clients = clients(&h, 2).await;
    let mark_id = start_jobs(&clients, TOKEN, 1).await.remove(0);
    let mut stalled_client = clients[0].clone();
    let stalled = open_watch(&mut stalled_client, TOKEN, &mark_id).await;
    let mut others = Vec::new();
    for i in 0..10 {
        let mut client = clients[i % 2].clone();
        others.push(tokio::spawn(drain(
            open_watch(&mut client, TOKEN, &mark_id).await,
        )));
    }
    for w in others {
        let (seen, end) = w.await.expect("join");
        end.expect("others finish");
        assert_eq!(seen.last(), Some(&JobState::Succeeded));
    }
    // The stalled reader still gets the terminal state last, whatever it
    // skipped or was held back by flow control.
    let (seen, end) = drain(stalled).await;
    end.expect("stalled reader ends OK");
    assert_eq!(seen.last(), Some(&JobState::Succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_one_token_does_not_delay_another() {
    let h = Harness::with(sim_config(), hub_config()).await;
    let clients = clients(&h, 2).await;
    let job_a = start_jobs(&clients, TOKEN, 1).await.remove(0);
    let job_b = start_jobs(&clients, OTHER_TOKEN, 1).await.remove(0);
    h.sim
        .script(
            json!([{"endpoint": "status", "token": TOKEN, "http_status": 429, "body": "{}",
        "headers": {"Retry-After": "2"}, "times": 3}]),
        )
        .await;
    let (mut a, mut b) = (clients[0].clone(), clients[1].clone());
    let mut stream_a = open_watch(&mut a, TOKEN, &job_a).await;
    let watch_b = tokio::spawn(drain(open_watch(&mut b, OTHER_TOKEN, &job_b).await));
    let first_a = tokio::spawn(async move {
        let first = stream_a.message().await;
        (first, stream_a)
    });
    let (seen_b, end_b) = watch_b.await.expect("join");
    end_b.expect("B's watch ends OK");
    assert_eq!(seen_b.last(), Some(&JobState::Succeeded));
    assert!(
        !first_a.is_finished(),
        "A is still backing off when B is done"
    );
    let (first, stream_a) = first_a.await.expect("join");
    first.expect("A recovers").expect("message");
    let (seen_a, end_a) = drain(stream_a).await;
    end_a.expect("A's watch ends OK");
    assert_eq!(
        seen_a.last().copied().unwrap_or(JobState::Succeeded),
        JobState::Succeeded
    );
}
