//! The hub: one status path per token for WatchImage and CheckImage.
//!
//! Each token with work has one poller task (`poller`) driving a pure
//! schedule (`schedule`) over a `StatusSource` (`source`; the Piclumen
//! client in production). Watchers of the same (token, mark id) share one
//! `tokio::sync::watch` channel: one poll, one fan-out, and a slow reader
//! only ever skips to the newest state (the terminal state is the last
//! value, so it is never skipped). Checks are coalesced: asked at once when
//! the token is idle, batched while its calls are in flight, and answered
//! from the hub's state when that is younger than one poll interval. While
//! a token's calls are in transient trouble, a check is answered with its
//! job's last state when that is recent enough (`stale`) rather than with
//! the trouble.
//!
//! The hub knows jobs, tokens and states; neither proto nor JSON. It
//! returns its own error type; the service maps it to a `Status`.

mod created;
pub mod fleet;
mod poller;
pub mod schedule;
mod settle;
pub mod source;
mod stale;
mod state;

use crate::support::lock;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock, Weak},
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{idempotency::StoreNamespace, job::JobStatus, job::Token, upstream::UpstreamError};
pub use fleet::{FleetLink, FleetPolling};
pub use source::StatusSource;
use state::{Slot, State};

/// Most calls in flight per token.
pub const DEFAULT_MAX_CALLS: usize = 64;
/// Most calls carrying checks in flight per token; checks arriving beyond
/// it wait and share the next call.
pub const DEFAULT_MAX_CHECK_CALLS: usize = 4;

/// Why the hub could not give a job's state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    /// The token's account has no such job.
    #[error("no job with mark id {mark_id:?} for this token")]
    NotFound {
        /// The id asked for.
        mark_id: String,
    },
    /// Piclumen failed the call (or its entry for this job).
    #[error("{0}")]
    Upstream(UpstreamError),
    /// Piclumen stayed in trouble for longer than the failure budget.
    #[error("Piclumen unreachable for over {budget:?}; last error: {last}")]
    Outage {
        /// The configured budget.
        budget: Duration,
        /// The last failure seen.
        last: UpstreamError,
    },
    /// The check's deadline passed before an answer came.
    #[error("the caller's deadline ran out before Piclumen answered")]
    DeadlineExceeded,
    /// The token's poller went away (the server is stopping).
    #[error("the hub stopped")]
    Stopped,
    /// The status call for this job failed inside the server (a bug, logged
    /// where it happened).
    #[error("the server failed while asking Piclumen for this job's state")]
    Internal,
}

/// What a watcher sees of its job.
#[derive(Debug, Clone, PartialEq)]
pub enum Snapshot {
    /// Not polled yet.
    Waiting,
    /// The latest state; terminal states are the channel's last value.
    Status(JobStatus),
    /// The watch cannot go on.
    Ended(HubError),
}

/// Hub settings; the fields that are `serve` flags declare them here.
#[derive(Debug, Clone, clap::Args)]
pub struct HubConfig {
    /// Time between two polls of a watched job (at least 250ms); also how
    /// long an answer stays fresh enough for CheckImage.
    #[arg(
        long,
        env = "PICLUMEN_POLL_INTERVAL",
        default_value = "2s",
        value_parser = crate::flags::duration_at_least(defaults::MIN_POLL_INTERVAL)
    )]
    pub poll_interval: Duration,
    /// Most mark ids in one batch-status call (1 to 500).
    #[arg(
        long,
        env = "PICLUMEN_BATCH_MAX",
        default_value = "50",
        value_parser = crate::flags::up_to(defaults::MAX_BATCH)
    )]
    pub batch_max: usize,
    /// How long newcomers are gathered into one call (not a flag: short
    /// enough to be unnoticeable, long enough to batch a burst of new
    /// watches).
    #[arg(skip = defaults::GATHER)]
    pub gather: Duration,
    /// How long upstream trouble is retried before watches end UNAVAILABLE.
    #[arg(
        long,
        env = "PICLUMEN_FAILURE_BUDGET",
        default_value = "1m",
        value_parser = crate::flags::positive_duration
    )]
    pub failure_budget: Duration,
    /// While Piclumen is in trouble for a token (429, 5xx, timeouts, no
    /// connection), CheckImage answers with the job's last state when it
    /// was observed within this long, instead of the error (terminal
    /// states whatever their age); 0 turns it off.
    #[arg(
        long,
        env = "PICLUMEN_STALE_IF_ERROR",
        default_value = "30s",
        value_parser = crate::flags::duration_or_zero
    )]
    pub stale_if_error: Duration,
}

impl HubConfig {
    /// The stale-if-error rules these settings make.
    fn stale(&self) -> stale::StaleIfError {
        stale::StaleIfError {
            window: self.stale_if_error,
            interval: self.poll_interval,
            budget: self.failure_budget,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        crate::flags::no_flags()
    }
}

/// The hub's bounds and its one setting that is not a flag (the flags'
/// defaults are on [`HubConfig`]'s fields).
pub mod defaults {
    use std::time::Duration;

    /// How long the hub gathers newly watched jobs into one batch-status
    /// call.
    pub const GATHER: Duration = Duration::from_millis(50);
    /// Shortest `--poll-interval`: below it a watch costs Piclumen a status
    /// call several times a second for no visible gain.
    pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(250);
    /// Largest `--batch-max`: more mark ids than this in one batch-status
    /// call makes one slow call carry too many watches.
    pub const MAX_BATCH: usize = 500;
}

/// The hub's handle; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: HubConfig,
    source: Arc<dyn StatusSource>,
    tokens: Mutex<HashMap<Token, Arc<Shared>>>,
    /// With fleet polling: the link, and each token's poller by its key
    /// (how rounds published by other replicas find their poller).
    fleet: Option<Arc<FleetLink>>,
    keys: Mutex<HashMap<Arc<str>, Weak<Shared>>>,
    /// Jobs created here, standing for their state during trouble until
    /// a status call sees them.
    created: created::Created,
    /// Test fault: the next round applied by any poller panics.
    #[cfg(test)]
    panic_next_round: std::sync::atomic::AtomicBool,
}

/// What a token's poller shares with the handles.
#[derive(Debug)]
struct Shared {
    token: Token,
    state: Mutex<State>,
    /// Unbounded, and bounded by what feeds it: one `Watch` per new job
    /// slot (at most `--max-watches`), one `Check` per CheckImage call in
    /// flight (each caller waits for its answer), and fleet rounds of this
    /// token (a few per interval); the poller drains it before each step.
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl From<Result<JobStatus, HubError>> for Snapshot {
    /// A job's state, or the end of its watch.
    fn from(outcome: Result<JobStatus, HubError>) -> Self {
        match outcome {
            Ok(status) => Self::Status(status),
            Err(e) => Self::Ended(e),
        }
    }
}

/// A request from a handle to a token's poller.
#[derive(Debug)]
enum Cmd {
    Watch(Arc<str>, crate::otel::Link),
    Check(
        Arc<str>,
        oneshot::Sender<Result<JobStatus, HubError>>,
        crate::otel::Link,
    ),
    /// A round another replica published for this token.
    Round(Arc<fleet::wire::Round>),
}

/// A watcher's end of a job's channel. Dropping it is how a watch leaves.
#[derive(Debug)]
pub struct Subscription {
    /// The job's state channel.
    pub rx: watch::Receiver<Snapshot>,
}

impl Subscription {
    /// A watcher joining through `rx`, counted in `piclumen_hub_watchers`
    /// until it drops.
    fn new(rx: watch::Receiver<Snapshot>) -> Self {
        gauges().watchers.increment(1.0);
        Self { rx }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        gauges().watchers.decrement(1.0);
    }
}

impl Hub {
    /// A hub polling through `source`.
    pub fn new(config: HubConfig, source: Arc<dyn StatusSource>) -> Self {
        Self::build(config, source, None)
    }

    /// A hub sharing its polling with the other replicas linked to the same
    /// store (see [`fleet`]). Must be called within a tokio runtime: it
    /// starts the task that listens to the other replicas' rounds.
    pub fn with_fleet(
        config: HubConfig,
        source: Arc<dyn StatusSource>,
        link: Arc<FleetLink>,
    ) -> Self {
        let hub = Self::build(config, source, Some(Arc::clone(&link)));
        tokio::spawn(fleet_rounds(Arc::downgrade(&hub.inner), link));
        hub
    }

    /// [`Hub::with_fleet`] through `redis` (the store's URL and the
    /// deployment's namespace) when given (fleet polling on with a Redis
    /// store), else [`Hub::new`].
    pub fn for_store(
        config: HubConfig,
        source: Arc<dyn StatusSource>,
        redis: Option<(&str, &StoreNamespace)>,
    ) -> Self {
        match redis {
            Some((url, namespace)) => {
                let store = Arc::new(fleet::redis::RedisFleet::new(url, namespace));
                Self::with_fleet(config, source, Arc::new(FleetLink::new(store)))
            }
            None => Self::new(config, source),
        }
    }

    fn build(
        config: HubConfig,
        source: Arc<dyn StatusSource>,
        fleet: Option<Arc<FleetLink>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                created: created::Created::new(config.stale_if_error),
                config,
                source,
                tokens: Mutex::default(),
                fleet,
                keys: Mutex::default(),
                #[cfg(test)]
                panic_next_round: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Test fault: the next round a poller applies panics in the poller
    /// itself (not in the call's task).
    #[cfg(test)]
    pub(crate) fn panic_next_round(&self) {
        self.inner
            .panic_next_round
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Notes that `token` just created `mark_id`: until a status call sees
    /// the job, its create's reply answers checks during trouble (within
    /// `--stale-if-error`) as PENDING.
    pub fn created(&self, token: &Token, mark_id: &str) {
        self.inner.created.record(token, mark_id, Instant::now());
    }

    /// Joins the watchers of `mark_id` for `token`, starting to poll it when
    /// it is new. Tokens never share channels, even for the same mark id.
    pub fn subscribe(&self, token: &Token, mark_id: &str) -> Subscription {
        let link = crate::otel::Link::current(mark_id);
        let mut tokens = lock(&self.inner.tokens);
        let shared = self.shared(&mut tokens, token);
        let mut state = lock(&shared.state);
        let rx = match state.slots.get(mark_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let id: Arc<str> = mark_id.into();
                // A fresh answer is the watch's first message at once.
                let first = state
                    .known
                    .get(mark_id)
                    .filter(|(_, at)| at.elapsed() < self.inner.config.poll_interval)
                    .map_or(Snapshot::Waiting, |(status, _)| {
                        Snapshot::Status(status.clone())
                    });
                let (slot, rx) = Slot::open(first);
                state.slots.insert(Arc::clone(&id), slot);
                // The receiver lives as long as `shared`, which we hold.
                let _ = shared.cmds.send(Cmd::Watch(id, link));
                rx
            }
        };
        Subscription::new(rx)
    }

    /// The job's state: from the hub when its answer is younger than one
    /// poll interval, else from a call sent after this check arrived
    /// (shared with other checks and watches of the token). While the
    /// token's calls are in transient trouble (a failed round, a pause),
    /// the job's last state observed within `--stale-if-error` (a terminal
    /// one whatever its age) answers instead of the trouble. Waits at most
    /// until `deadline`.
    pub async fn check(
        &self,
        token: &Token,
        mark_id: &str,
        deadline: Option<Instant>,
    ) -> Result<JobStatus, HubError> {
        let metrics = check_metrics();
        metrics.checks.increment(1);
        let link = crate::otel::Link::current(mark_id);
        let rx = {
            let mut tokens = lock(&self.inner.tokens);
            let shared = self.shared(&mut tokens, token);
            let state = lock(&shared.state);
            if let Some((status, at)) = state.known.get(mark_id)
                && at.elapsed() < self.inner.config.poll_interval
            {
                metrics.from_state.increment(1);
                return Ok(status.clone());
            }
            drop(state);
            let (tx, rx) = oneshot::channel();
            let _ = shared.cmds.send(Cmd::Check(mark_id.into(), tx, link));
            rx
        };
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, rx)
                .await
                .map_err(|_| HubError::DeadlineExceeded)?,
            None => rx.await,
        };
        answer.unwrap_or(Err(HubError::Stopped))
    }

    /// The token's poller, started when it has none.
    fn shared(
        &self,
        tokens: &mut MutexGuard<'_, HashMap<Token, Arc<Shared>>>,
        token: &Token,
    ) -> Arc<Shared> {
        if let Some(shared) = tokens.get(token) {
            return Arc::clone(shared);
        }
        let shared = poller::spawn(token.clone(), Arc::clone(&self.inner));
        tokens.insert(token.clone(), Arc::clone(&shared));
        shared
    }
}

/// Listens to the rounds every replica publishes and hands each to its
/// token's poller here, if any; subscribes again when the subscription is
/// lost. Ends when the hub is gone.
async fn fleet_rounds(hub: Weak<Inner>, link: Arc<FleetLink>) {
    /// Wait before subscribing again after a failure.
    const RETRY: Duration = Duration::from_millis(500);
    loop {
        if hub.strong_count() == 0 {
            return;
        }
        let subscribed = link.store.subscribe().await;
        link.report(&subscribed);
        if let Ok(mut rounds) = subscribed {
            while let Some(round) = rounds.recv().await {
                let Some(inner) = hub.upgrade() else {
                    return;
                };
                if *round.from == *link.me {
                    continue;
                }
                let shared = lock(&inner.keys)
                    .get(round.key.as_str())
                    .and_then(Weak::upgrade);
                if let Some(shared) = shared {
                    let _ = shared.cmds.send(Cmd::Round(round));
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Metric handles resolved once: a registry lookup per call would cost more
/// than the rest of a cached check.
struct Gauges {
    jobs: metrics::Gauge,
    watchers: metrics::Gauge,
}

fn gauges() -> &'static Gauges {
    static G: OnceLock<Gauges> = OnceLock::new();
    G.get_or_init(|| Gauges {
        jobs: metrics::gauge!("piclumen_hub_jobs"),
        watchers: metrics::gauge!("piclumen_hub_watchers"),
    })
}

struct CheckMetrics {
    /// Every CheckImage that reached the hub.
    checks: metrics::Counter,
    /// Checks answered from state younger than one interval.
    from_state: metrics::Counter,
    /// Checks answered by a call that also carried other checks or watches.
    coalesced: metrics::Counter,
    /// Upstream calls that carried at least one check.
    calls: metrics::Counter,
}

fn check_metrics() -> &'static CheckMetrics {
    static M: OnceLock<CheckMetrics> = OnceLock::new();
    M.get_or_init(|| CheckMetrics {
        checks: metrics::counter!("piclumen_checks_total"),
        from_state: metrics::counter!("piclumen_checks_from_state_total"),
        coalesced: metrics::counter!("piclumen_checks_coalesced_total"),
        calls: metrics::counter!("piclumen_check_upstream_calls_total"),
    })
}

/// The status calls' own metrics: retries after trouble, ids per call.
pub(super) struct UpstreamMetrics {
    pub(super) retries: metrics::Counter,
    pub(super) ids: metrics::Histogram,
}

pub(super) fn upstream_metrics() -> &'static UpstreamMetrics {
    static M: std::sync::OnceLock<UpstreamMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| UpstreamMetrics {
        retries: metrics::counter!("piclumen_upstream_retries_total", "endpoint" => "status"),
        ids: metrics::histogram!("piclumen_hub_ids_per_call"),
    })
}

#[cfg(test)]
mod tests;
