//! WatchImages end to end over loopback sockets: one stream of 1,000 jobs
//! of one token costs the simulator `ceil(1000 / 50)` = 20 status calls a
//! round, delivers every job's terminal state exactly once and ends OK;
//! unknown ids get a NOT_FOUND message while the others go on.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use futures_util::{StreamExt, stream};
use piclumen_grpc::{
    hub::HubConfig,
    pb::{self, JobState},
    server::ServerConfig,
    service::ServiceConfig,
    sim::SimConfig,
};
use tonic::Code;

const INTERVAL: Duration = Duration::from_secs(1);
const JOBS: usize = 1000;

fn config() -> ServerConfig {
    ServerConfig {
        service: ServiceConfig {
            max_watch: Duration::from_secs(120),
            max_watches: 20_000,
            ..Default::default()
        },
        hub: HubConfig {
            poll_interval: INTERVAL,
            gather: Duration::from_millis(50),
            failure_budget: Duration::from_secs(10),
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_of_a_thousand_jobs_polls_in_batches_and_ends_ok() {
    let sim = SimConfig {
        job_duration: Duration::from_secs(14),
        ..sim_config()
    };
    let h = Harness::with(sim, config()).await;
    let client = h.client().await;
    let ids: Vec<String> = stream::iter(0..JOBS)
        .map(|i| {
            let mut client = client.clone();
            async move { start_job(&mut client, TOKEN, &format!("job {i}")).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let request = pb::WatchImagesRequest {
        mark_ids: ids.clone(),
    };
    let mut stream = bounded(
        "WatchImages",
        client.clone().watch_images(authed(TOKEN, request)),
    )
    .await
    .expect("watch")
    .into_inner();

    // The first message of each job is its current state.
    let mut seen = Seen::default();
    while seen.last.len() < JOBS {
        let message = bounded("first states", stream.message())
            .await
            .expect("stream")
            .expect("message");
        seen.read(message);
    }

    // Steady state: ceil(1000 / 50) = 20 calls a round for the 1,000 jobs.
    // On the wall clock rounds may stretch under load, never multiply.
    let rounds = 5;
    let (calls0, ids0) = (
        h.sim.stat("status_calls").await,
        h.sim.stat("status_ids").await,
    );
    let window = tokio::time::Instant::now() + INTERVAL * rounds;
    loop {
        let left = window.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(message) => seen.read(message.expect("stream").expect("message")),
            Err(_) => break,
        }
    }
    let calls = h.sim.stat("status_calls").await - calls0;
    let polled = h.sim.stat("status_ids").await - ids0;
    let per_round = calls as f64 / f64::from(rounds);
    eprintln!("{per_round} status calls per round, {polled} ids in {calls} calls");
    assert!(
        per_round <= 20.0 * 1.25,
        "{per_round} calls per round, expected 20"
    );
    assert!(
        polled >= 45 * calls,
        "{polled} ids in {calls} calls: batches too small"
    );

    // Every job's terminal state exactly once, then the stream ends OK.
    loop {
        match bounded("the rest of the stream", stream.message()).await {
            Ok(Some(message)) => seen.read(message),
            Ok(None) => break,
            Err(status) => panic!("the stream ended with {status:?}"),
        }
    }
    assert_eq!(seen.terminal.len(), JOBS);
    assert!(
        seen.terminal.values().all(|&n| n == 1),
        "a terminal state twice"
    );
    assert!(seen.last.values().all(|s| *s == JobState::Succeeded));
}

/// What a stream showed of each job: its last state, and how many terminal
/// messages it got.
#[derive(Default)]
struct Seen {
    last: HashMap<String, JobState>,
    terminal: HashMap<String, usize>,
}

impl Seen {
    fn read(&mut self, m: pb::WatchImagesResponse) {
        assert!(m.error.is_none(), "{m:?}");
        if m.heartbeat {
            return;
        }
        let job = m.job.expect("job");
        let state = job.state();
        if matches!(state, JobState::Succeeded | JobState::Failed) {
            *self.terminal.entry(job.mark_id.clone()).or_default() += 1;
        }
        let before = self.last.insert(job.mark_id, state);
        assert_ne!(before, Some(JobState::Succeeded), "a message after the end");
    }
}

#[tokio::test]
async fn unknown_ids_get_not_found_and_the_others_go_on() {
    let h = Harness::with(
        SimConfig {
            job_duration: Duration::from_secs(2),
            ..sim_config()
        },
        server_config(),
    )
    .await;
    let mut client = h.client().await;
    let mine = start_job(&mut client, TOKEN, "mine").await;
    let theirs = start_job(&mut client, OTHER_TOKEN, "theirs").await;
    let request = pb::WatchImagesRequest {
        mark_ids: vec![mine.clone(), theirs.clone(), "nowhere".into(), mine.clone()],
    };
    let mut stream = bounded("WatchImages", client.watch_images(authed(TOKEN, request)))
        .await
        .expect("watch")
        .into_inner();
    let mut errors = HashMap::new();
    let mut states = Vec::new();
    loop {
        match bounded("WatchImages", stream.message()).await {
            Ok(Some(m)) if m.heartbeat => {}
            Ok(Some(m)) => {
                let job = m.job.expect("job");
                match m.error {
                    Some(error) => {
                        assert_eq!(job.state(), JobState::Unspecified, "only the id");
                        assert!(errors.insert(job.mark_id, error.code).is_none());
                    }
                    None => {
                        assert_eq!(job.mark_id, mine);
                        states.push(job.state());
                    }
                }
            }
            Ok(None) => break,
            Err(status) => panic!("ended with {status:?}"),
        }
    }
    let not_found = Code::NotFound as i32;
    assert_eq!(
        errors,
        HashMap::from([(theirs, not_found), ("nowhere".to_owned(), not_found)])
    );
    assert_eq!(states.first(), Some(&JobState::Pending), "{states:?}");
    assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");

    // No ids, or a malformed one: INVALID_ARGUMENT.
    for ids in [vec![], vec![mine.clone(), "\n".into()]] {
        let request = pb::WatchImagesRequest { mark_ids: ids };
        let refused = bounded("WatchImages", client.watch_images(authed(TOKEN, request)))
            .await
            .expect_err("invalid");
        assert_eq!(refused.code(), Code::InvalidArgument);
    }
}
