//! The scripted `StatusSource` the hub's paused-time tests poll, and their
//! shared helpers.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::{Instant, sleep};

use crate::{
    hub::{Hub, HubConfig, Snapshot, StatusSource, Subscription},
    job::{JobState, JobStatus, Token},
    upstream::{BadEntry, BoxFuture, StatusEntry, UpstreamError},
};

pub(crate) const INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const GATHER: Duration = Duration::from_millis(50);

/// What the fake does with one call instead of answering normally.
#[derive(Debug, Clone)]
pub(crate) enum Scripted {
    Fail(UpstreamError),
    /// Answer with an unreadable entry for this id.
    Garble(String),
    /// The call's task panics (a bug in the client).
    Panic,
}

#[derive(Debug, Default)]
pub(crate) struct FakeState {
    /// (sent at, ids) of every call.
    calls: Vec<(Instant, Vec<String>)>,
    jobs: HashMap<String, JobState>,
    latency: Duration,
    script: VecDeque<Scripted>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Fake(pub(crate) Arc<Mutex<FakeState>>);

impl Fake {
    pub(crate) fn with_jobs(n: usize) -> Self {
        let fake = Self::default();
        for i in 0..n {
            fake.set(&id(i), JobState::Pending);
        }
        fake
    }

    pub(crate) fn set(&self, id: &str, state: JobState) {
        self.0.lock().expect("fake").jobs.insert(id.into(), state);
    }

    pub(crate) fn latency(&self, latency: Duration) {
        self.0.lock().expect("fake").latency = latency;
    }

    pub(crate) fn script(&self, step: Scripted) {
        self.0.lock().expect("fake").script.push_back(step);
    }

    pub(crate) fn calls(&self) -> Vec<(Instant, Vec<String>)> {
        self.0.lock().expect("fake").calls.clone()
    }

    pub(crate) fn calls_between(&self, from: Instant, to: Instant) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, ids)| ids)
            .collect()
    }
}

impl StatusSource for Fake {
    fn batch_status(
        &self,
        _token: &Token,
        ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>> {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let (latency, answer) = {
            let mut state = self.0.lock().expect("fake");
            state.calls.push((Instant::now(), ids.clone()));
            let step = state.script.pop_front();
            if matches!(step, Some(Scripted::Panic)) {
                return Box::pin(async { panic!("scripted panic in a status call") });
            }
            let answer = match step {
                Some(Scripted::Fail(error)) => Err(error),
                other => Ok(ids
                    .iter()
                    .filter_map(|id| {
                        if matches!(&other, Some(Scripted::Garble(bad)) if bad == id) {
                            return Some(Err(BadEntry {
                                mark_id: id.clone(),
                                error: UpstreamError::Decode {
                                    error: "invalid type: string \"3\", expected i64".into(),
                                    body: format!("{{\"markId\":\"{id}\",\"index\":\"3\"}}"),
                                },
                            }));
                        }
                        state.jobs.get(id).map(|s| Ok(status(id, *s)))
                    })
                    .collect()),
            };
            (state.latency, answer)
        };
        Box::pin(async move {
            sleep(latency).await;
            answer
        })
    }
}

pub(crate) fn id(i: usize) -> String {
    format!("job-{i:04}")
}

pub(crate) fn status(id: &str, state: JobState) -> JobStatus {
    JobStatus {
        mark_id: id.into(),
        state,
        queue_position: 0,
        images: Vec::new(),
        upstream_status: String::new(),
        prompt_id: String::new(),
        observed_at: None,
    }
}

pub(crate) fn config() -> HubConfig {
    HubConfig {
        poll_interval: INTERVAL,
        gather: GATHER,
        failure_budget: Duration::from_secs(20),
        ..HubConfig::default()
    }
}

pub(crate) fn hub(fake: &Fake) -> Hub {
    Hub::new(config(), Arc::new(fake.clone()))
}

pub(crate) fn token() -> Token {
    Token::new("t").expect("token")
}

/// Waits for the watch's next value other than `Waiting`.
pub(crate) async fn next_state(sub: &mut Subscription) -> Snapshot {
    loop {
        sub.rx.changed().await.expect("channel open");
        let value = sub.rx.borrow_and_update().clone();
        if value != Snapshot::Waiting {
            return value;
        }
    }
}
