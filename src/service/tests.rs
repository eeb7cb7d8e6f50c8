//! The service's core on paused time against a scripted fake `Upstream`:
//! the watch stream (heartbeat, maximum watch time, drain, terminal state),
//! watch admission, the per-token create limit, and the token rules.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::{
    sync::{Semaphore, watch},
    time::{Instant, timeout},
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::*;
use crate::{
    error::Error,
    hub::{Hub, HubConfig},
    idempotency::IdempotencyConfig,
    job::{Image, JobState, JobStatus, Token},
    upstream::{BoxFuture, CreatePayload, CreateRequest, StatusEntry, Upstream, UpstreamError},
};

pub(super) const POLL: Duration = Duration::from_secs(2);
/// Bound on every wait of a test, in paused (virtual) time.
pub(super) const WAIT: Duration = Duration::from_secs(3600);

// === the fake ===

#[derive(Debug)]
pub(super) struct FakeState {
    jobs: HashMap<String, JobState>,
    /// Status calls answered so far.
    pub(super) status_calls: usize,

    /// Creates started so far.
    started: watch::Sender<usize>,
}

/// Piclumen as a script: jobs in the states the test sets, creates that
/// finish only when the test releases them.
#[derive(Debug, Clone)]
pub(super) struct Fake {
    state: Arc<Mutex<FakeState>>,
    /// One permit per create allowed to finish.
    release: Arc<Semaphore>,
}

impl Fake {
    fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(FakeState {
                jobs: HashMap::new(),
                status_calls: 0,
                started: watch::channel(0).0,
            })),
            release: Arc::new(Semaphore::new(0)),
        }
    }

    pub(super) fn set(&self, mark_id: &str, state: JobState) {
        self.lock().jobs.insert(mark_id.into(), state);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state")
    }

    /// Waits (bounded) until `n` creates have started.
    async fn started(&self, n: usize) {
        let mut rx = self.lock().started.subscribe();
        timeout(WAIT, rx.wait_for(|started| *started >= n))
            .await
            .expect("creates started in time")
            .expect("fake alive");
    }
}

pub(super) fn status(mark_id: &str, state: JobState) -> JobStatus {
    let succeeded = state == JobState::Succeeded;
    JobStatus {
        mark_id: mark_id.into(),
        state,
        queue_position: 0,
        images: succeeded
            .then(|| Image {
                url: format!("https://images.example/{mark_id}.webp"),
                name: format!("{mark_id}.webp"),
                width: 64,
                height: 64,
                nsfw: false,
            })
            .into_iter()
            .collect(),
        upstream_status: format!("{state:?}").to_lowercase(),
        prompt_id: String::new(),
        observed_at: None,
    }
}

impl Upstream for Fake {
    fn create(
        &self,
        _token: &Token,
        _payload: &CreatePayload,
        _deadline: Option<Instant>,
    ) -> BoxFuture<Result<String, UpstreamError>> {
        let fake = self.clone();
        Box::pin(async move {
            let n = {
                let state = fake.lock();
                state.started.send_modify(|n| *n += 1);
                *state.started.borrow()
            };
            fake.release.acquire().await.expect("open").forget();
            Ok(format!("created-{n}"))
        })
    }

    fn batch_status(
        &self,
        _token: &Token,
        mark_ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>> {
        let mut state = self.lock();
        state.status_calls += 1;

        let entries: Vec<StatusEntry> = mark_ids
            .iter()
            .filter_map(|id| state.jobs.get(&**id).map(|s| Ok(status(id, *s))))
            .collect();
        Box::pin(async move { Ok(entries) })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

// === harness ===

pub(super) struct Harness {
    pub(super) fake: Fake,
    pub(super) core: Arc<Core>,
    pub(super) draining: CancellationToken,
}

pub(super) fn harness(config: ServiceConfig) -> Harness {
    let fake = Fake::new();
    let upstream: Arc<dyn Upstream> = Arc::new(fake.clone());
    let hub = Hub::new(
        HubConfig {
            poll_interval: POLL,
            ..HubConfig::default()
        },
        Arc::new(Arc::clone(&upstream)),
    );
    let draining = CancellationToken::new();
    let core = Arc::new(Core::new(
        config,
        upstream,
        IdempotencyConfig::default().open(&"test".parse().expect("namespace")),
        hub,
        draining.clone(),
    ));
    Harness {
        fake,
        core,
        draining,
    }
}

pub(super) fn bare(token: &str) -> Credentials<'_> {
    Credentials {
        token: TokenInput::Bare(token),
        ..Credentials::default()
    }
}

impl Harness {
    pub(super) fn watch(
        &self,
        mark_id: &str,
    ) -> Result<impl Stream<Item = Result<WatchEvent, Error>> + use<>, Error> {
        self.core.watch(&bare("t"), mark_id, None)
    }

    /// A GenerateImage of `token` running on its own task.
    fn generate(&self, token: &'static str) -> tokio::task::JoinHandle<Result<String, Error>> {
        let core = Arc::clone(&self.core);
        tokio::spawn(async move {
            let request = CreateRequest {
                prompt: "a lighthouse".into(),
                ..Default::default()
            };
            core.generate(&bare(token), request, None)
                .await
                .map(|created| created.mark_id)
        })
    }
}

/// A harness allowing `max_generates_per_token` creates per token.
fn create_limit(max_generates_per_token: usize) -> Harness {
    harness(ServiceConfig {
        max_generates_per_token,
        ..ServiceConfig::default()
    })
}

pub(super) async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    timeout(WAIT, stream.next()).await.expect("stream answered")
}

pub(super) fn watch_config() -> ServiceConfig {
    ServiceConfig {
        heartbeat: Duration::from_secs(5),
        max_watch: Duration::from_secs(600),
        ..ServiceConfig::default()
    }
}

// === the watch stream ===

#[tokio::test(start_paused = true)]
async fn a_quiet_watch_repeats_its_state_every_heartbeat() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Running);
    let mut stream = Box::pin(h.watch("j").expect("watch"));
    let first = next(&mut stream).await.expect("item").expect("state");
    assert_eq!(first.status, status("j", JobState::Running));
    assert!(!first.heartbeat);
    let at = Instant::now();
    for _ in 0..3 {
        let beat = next(&mut stream).await.expect("item").expect("state");
        assert!(beat.heartbeat, "quiet watch repeats as a heartbeat");
        assert_eq!(beat.status, first.status);
    }
    // Three heartbeats, one every 5 s, although the hub polled every 2 s.
    assert_eq!(at.elapsed().as_secs(), 15);
}

#[tokio::test(start_paused = true)]
async fn a_watch_ends_at_the_maximum_watch_time() {
    let h = harness(ServiceConfig {
        heartbeat: Duration::from_secs(3600),
        max_watch: Duration::from_secs(10),
        ..ServiceConfig::default()
    });
    h.fake.set("j", JobState::Pending);
    let started = Instant::now();
    let mut stream = Box::pin(h.watch("j").expect("watch"));
    assert!(next(&mut stream).await.expect("item").is_ok());
    let end = next(&mut stream).await.expect("item").expect_err("ends");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert!(
        matches!(&end, Error::DeadlineExceeded(m) if m.contains("maximum watch time of 10s")),
        "{end:?}"
    );
    assert_eq!(Status::from(end).code(), Code::DeadlineExceeded);
    assert!(next(&mut stream).await.is_none(), "nothing after the end");
}

#[tokio::test(start_paused = true)]
async fn draining_ends_open_watches_and_refuses_new_calls() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Running);
    let mut stream = Box::pin(h.watch("j").expect("watch"));
    assert!(next(&mut stream).await.expect("item").is_ok());
    h.draining.cancel();
    let end = next(&mut stream).await.expect("item").expect_err("ends");
    assert_eq!(end, Error::ShuttingDown);
    let status = Status::from(end);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("shutting down"));
    assert!(next(&mut stream).await.is_none());
    assert_eq!(
        h.core.admit(&bare("t")).expect_err("refused"),
        Error::ShuttingDown
    );
}

#[tokio::test(start_paused = true)]
async fn a_terminal_state_is_the_last_message() {
    let h = harness(watch_config());
    h.fake.set("j", JobState::Running);
    let mut stream = Box::pin(h.watch("j").expect("watch"));
    let running = next(&mut stream).await.expect("item").expect("state");
    assert_eq!(running.status.state, JobState::Running);
    h.fake.set("j", JobState::Succeeded);
    let done = next(&mut stream).await.expect("item").expect("state");
    assert_eq!(done.status, status("j", JobState::Succeeded));
    assert!(!done.heartbeat);
    assert!(next(&mut stream).await.is_none(), "the stream ends");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_job_ends_the_watch_with_not_found() {
    let h = harness(watch_config());
    let mut stream = Box::pin(h.watch("nowhere").expect("watch"));
    let end = next(&mut stream).await.expect("item").expect_err("ends");
    assert_eq!(Status::from(end).code(), Code::NotFound);
    assert!(next(&mut stream).await.is_none());
}

// === admission ===

#[tokio::test(start_paused = true)]
async fn watch_slots_run_out_and_come_back_when_a_watch_ends() {
    let h = harness(ServiceConfig {
        max_watches: 2,
        ..watch_config()
    });
    h.fake.set("j", JobState::Running);
    let first = h.watch("j").expect("first");
    let second = h.watch("j").expect("second");
    let refused = h.watch("j").err().expect("third refused");
    assert!(
        matches!(&refused, Error::ResourceExhausted(m) if m.contains("limit of 2 watches")),
        "{refused:?}"
    );
    assert_eq!(Status::from(refused).code(), Code::ResourceExhausted);
    // A refused watch took nothing: still refused while both are open.
    assert!(h.watch("j").is_err());
    drop(first);
    let mut third = Box::pin(h.watch("j").expect("a slot was freed"));
    assert!(next(&mut third).await.expect("item").is_ok());
    drop(second);
    assert!(h.watch("j").is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_malformed_mark_id_takes_no_slot() {
    let h = harness(ServiceConfig {
        max_watches: 1,
        ..watch_config()
    });
    let error = h.watch("  ").err().expect("refused");
    assert!(matches!(
        error,
        Error::InvalidArgument {
            field: "mark_id",
            ..
        }
    ));
    assert!(h.watch("j").is_ok());
}

// === the per-token create limit ===

#[tokio::test(start_paused = true)]
async fn the_create_beyond_the_limit_is_refused_until_one_finishes() {
    let h = create_limit(2);
    let first = h.generate("a");
    let second = h.generate("a");
    h.fake.started(2).await;
    let refused = h.generate("a").await.expect("joined").expect_err("refused");
    assert!(
        matches!(&refused, Error::ResourceExhausted(m) if m.contains("already has 2 GenerateImage creates in flight")),
        "{refused:?}"
    );
    assert_eq!(Status::from(refused).code(), Code::ResourceExhausted);
    // Another token has places of its own.
    let other = h.generate("b");
    h.fake.started(3).await;

    h.fake.release.add_permits(1);
    let finished = timeout(WAIT, async {
        tokio::select! {
            r = first => r,
            r = second => r,
        }
    })
    .await
    .expect("one create finished")
    .expect("joined");
    assert!(finished.expect("created").starts_with("created-"));
    // The finished create freed its place: the next one is admitted.
    let again = h.generate("a");
    h.fake.started(4).await;
    h.fake.release.add_permits(3);
    for handle in [again, other] {
        let joined = timeout(WAIT, handle).await.expect("finished");
        assert!(joined.expect("joined").is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_create_holds_its_place_after_its_caller_gives_up() {
    let h = create_limit(1);
    let call = bare("a");
    let request = CreateRequest {
        prompt: "p".into(),
        request_id: "key-1".into(),
        ..Default::default()
    };
    // The caller's deadline passes; the keyed create goes on in the store's task.
    let deadline = Some(Instant::now() + Duration::from_secs(1));
    let gave_up = h.core.generate(&call, request.clone(), deadline).await;
    assert!(
        matches!(gave_up, Err(Error::DeadlineExceeded(_))),
        "{gave_up:?}"
    );
    h.fake.started(1).await;
    let refused = h.generate("a").await.expect("joined").expect_err("refused");
    assert!(matches!(refused, Error::ResourceExhausted(_)));
    h.fake.release.add_permits(1);
    // The retry with the same key gets the first create's outcome, not a second create.
    let retried = timeout(WAIT, h.core.generate(&call, request, None))
        .await
        .expect("answered")
        .expect("created");
    assert_eq!(retried.mark_id, "created-1");
    assert_eq!(*h.fake.lock().started.borrow(), 1);
}

// === token rules ===

#[test]
fn tokens_resolve_from_metadata_and_query_alike() {
    let default = Token::parse("server-token").expect("token");
    let resolve = |token: TokenInput<'_>| {
        admission::resolve(
            None,
            Some(&default),
            &Credentials {
                token,
                ..Credentials::default()
            },
        )
        .map(|call| (call.token.expose().to_owned(), call.is_default))
    };
    let ok = |s: &str| Ok((s.to_owned(), false));
    assert_eq!(
        resolve(TokenInput::Absent),
        Ok(("server-token".into(), true))
    );
    assert_eq!(resolve(TokenInput::Authorization(b"Bearer abc")), ok("abc"));
    assert_eq!(
        resolve(TokenInput::Authorization(b"bearer  abc ")),
        ok("abc")
    );
    assert_eq!(resolve(TokenInput::Authorization(b"abc")), ok("abc"));
    assert_eq!(resolve(TokenInput::Bare(" abc")), ok("abc"));
    for bad in [
        TokenInput::Authorization(b"Bearer"),
        TokenInput::Authorization(b"Bearer a b"),
        TokenInput::Authorization(b"Bearer \xc3\xa9"),
        TokenInput::Bare(""),
        TokenInput::Bare("Bearer abc"),
        TokenInput::Bare("abc\u{a0}"),
        TokenInput::Bare("a\nb"),
    ] {
        assert_eq!(resolve(bad), Err(Error::MalformedToken), "{bad:?}");
    }
    let no_default = admission::resolve(None, None, &Credentials::default());
    assert_eq!(no_default.err(), Some(Error::MissingToken));
}

#[test]
fn an_api_key_is_checked_before_the_token() {
    let keys = crate::auth::ApiKeys::parse("key-1\n").expect("keys");
    let check = |api_key: Option<&'static [u8]>| {
        admission::resolve(
            Some(&keys),
            None,
            &Credentials {
                token: TokenInput::Bare("bad token"),
                api_key,
                ..Credentials::default()
            },
        )
        .err()
    };
    assert_eq!(check(None), Some(Error::ApiKeyMissing));
    assert_eq!(check(Some(b"key-2")), Some(Error::ApiKeyInvalid));
    assert_eq!(check(Some(b"key-1")), Some(Error::MalformedToken));
}

#[test]
fn grpc_timeouts_parse_every_unit() {
    assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
    assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
    assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
    assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
    assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
    assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
    for bad in ["", "S", "5", "5x", "123456789S", "-1S"] {
        assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
    }
}
