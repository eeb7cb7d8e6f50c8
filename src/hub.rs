//! The polling hub: one per process, shared by every WatchImage call.
//!
//! Watches of one token are polled together by one task per token, with
//! `ceil(jobs / batch_max)` batch-status calls per round spread over the poll
//! interval. Watchers of the same (token, mark id) share one
//! `tokio::sync::watch` channel: one poll, one fan-out, and a slow reader only
//! ever skips to the newest state (the terminal state is the last value, so
//! it is never skipped). A job no one watches is dropped at the next call or
//! round; a token with no jobs ends its task, so an idle hub holds nothing.
//!
//! The hub knows jobs, tokens and states; neither proto nor JSON.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
    time::{Instant, sleep_until},
};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    error::Error,
    job::{JobStatus, Token},
    upstream::{Client, UpstreamError},
};

/// What a watcher sees of its job.
#[derive(Debug, Clone, PartialEq)]
pub enum Snapshot {
    /// Not polled yet.
    Waiting,
    /// The latest state; terminal states are the channel's last value.
    Status(JobStatus),
    /// The watch cannot go on (unknown job, rejected token, long outage).
    Ended(Error),
}

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Time between two polls of the same job.
    pub poll_interval: Duration,
    /// Most ids in one batch-status call.
    pub batch_max: usize,
    /// How long newcomers are gathered into one call.
    pub gather: Duration,
    /// How long transient upstream trouble is retried before watches end
    /// with UNAVAILABLE.
    pub failure_budget: Duration,
}

/// The hub's handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: HubConfig,
    client: Client,
    tokens: Mutex<HashMap<Token, Arc<Poller>>>,
}

/// A watcher's end of a job's channel. Dropping it is how a watch leaves.
#[derive(Debug)]
pub struct Subscription {
    /// The job's state channel.
    pub rx: watch::Receiver<Snapshot>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!("piclumen_hub_watchers").decrement(1.0);
    }
}

impl Hub {
    /// A hub polling through `client`.
    pub fn new(config: HubConfig, client: Client) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                client,
                tokens: Mutex::default(),
            }),
        }
    }

    /// Joins the watchers of `mark_id` for `token`, starting to poll it when
    /// it is new. Tokens never share channels, even for the same mark id.
    pub fn subscribe(&self, token: &Token, mark_id: &str) -> Subscription {
        let mut tokens = lock(&self.inner.tokens);
        let poller = tokens
            .entry(token.clone())
            .or_insert_with(|| Poller::spawn(token.clone(), Arc::clone(&self.inner)));
        let mut jobs = lock(&poller.jobs);
        let rx = match jobs.get(mark_id) {
            Some(slot) => slot.tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(Snapshot::Waiting);
                jobs.insert(mark_id.to_owned(), Slot::new(tx));
                metrics::gauge!("piclumen_hub_jobs").increment(1.0);
                poller.wake.notify_one();
                rx
            }
        };
        metrics::gauge!("piclumen_hub_watchers").increment(1.0);
        Subscription { rx }
    }

    /// The job's state when the hub polled it less than one interval ago;
    /// lets CheckImage skip an upstream call for a watched job.
    pub fn fresh(&self, token: &Token, mark_id: &str) -> Option<JobStatus> {
        let poller = lock(&self.inner.tokens).get(token).cloned()?;
        let jobs = lock(&poller.jobs);
        let slot = jobs.get(mark_id)?;
        let fresh = slot
            .polled_at
            .is_some_and(|at| at.elapsed() < self.inner.config.poll_interval);
        match &*slot.tx.borrow() {
            Snapshot::Status(status) if fresh => Some(status.clone()),
            _ => None,
        }
    }
}

/// One job's channel and polling bookkeeping.
#[derive(Debug)]
struct Slot {
    tx: watch::Sender<Snapshot>,
    /// When the last answer for it arrived.
    polled_at: Option<Instant>,
    /// When a call last asked for it.
    sent_at: Option<Instant>,
    /// Polled as a newcomer: the round right after may skip it.
    newcomer: bool,
}

impl Slot {
    fn new(tx: watch::Sender<Snapshot>) -> Self {
        Self {
            tx,
            polled_at: None,
            sent_at: None,
            newcomer: false,
        }
    }

    fn watched(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

/// Polls every job of one token.
#[derive(Debug)]
struct Poller {
    token: Token,
    jobs: Mutex<HashMap<String, Slot>>,
    /// Signals a newcomer.
    wake: Notify,
}

type CallResult = (Vec<String>, Result<Vec<JobStatus>, UpstreamError>);

impl Poller {
    fn spawn(token: Token, hub: Arc<Inner>) -> Arc<Self> {
        let poller = Arc::new(Self {
            token,
            jobs: Mutex::default(),
            wake: Notify::new(),
        });
        let task = Arc::clone(&poller);
        tokio::spawn(async move { task.run(hub).await }.instrument(info_span!("poller")));
        poller
    }

    async fn run(self: Arc<Self>, hub: Arc<Inner>) {
        let config = &hub.config;
        let mut calls: JoinSet<CallResult> = JoinSet::new();
        // The current round's batches, oldest first, sent one every
        // `spacing`, or earlier when a batch's oldest job falls due: when
        // finished jobs leave, the later batches move up rather than wait
        // longer than an interval.
        let mut round: VecDeque<Batch> = VecDeque::new();
        let mut spacing = Duration::ZERO;
        let mut round_start = Instant::now();
        let mut sent_in_round: u32 = 0;
        let mut next_round = Instant::now() + config.poll_interval;
        let mut retry = Retry::new();
        loop {
            let resume = retry.paused_until.unwrap_or_else(Instant::now);
            let next_event = match round.front() {
                None => next_round,
                Some(batch) => {
                    let by_position = round_start + spacing * sent_in_round;
                    batch
                        .due(config.poll_interval)
                        .map_or(by_position, |due| due.min(by_position))
                }
            }
            .max(resume);
            tokio::select! {
                () = self.wake.notified() => {
                    // While backing off, newcomers wait for the next round
                    // like everyone else.
                    if retry.paused_until.is_some_and(|until| until > Instant::now()) {
                        continue;
                    }
                    // Let newcomers arriving together share one call.
                    tokio::time::sleep(config.gather).await;
                    let newcomers = self.take_batches(config, |slot| {
                        let new = slot.sent_at.is_none();
                        slot.newcomer |= new;
                        new
                    });
                    for batch in newcomers {
                        self.send(&hub, &mut calls, batch.ids);
                    }
                }
                () = sleep_until(next_event), if calls.len() < 64 => {
                    if let Some(batch) = round.pop_front() {
                        self.send(&hub, &mut calls, batch.ids);
                        sent_in_round += 1;
                    } else {
                        // A new round: every watched job, but newcomers
                        // polled within the last half interval.
                        let half = config.poll_interval / 2;
                        round = self
                            .take_batches(config, |slot| {
                                let skip = slot.newcomer
                                    && slot.sent_at.is_some_and(|at| at.elapsed() < half);
                                slot.newcomer = false;
                                !skip
                            })
                            .into();
                        let n = round.len().max(1) as u32;
                        spacing = config.poll_interval / n;
                        round_start = Instant::now();
                        sent_in_round = 0;
                        next_round = round_start + config.poll_interval;
                        let jobs = lock(&self.jobs).len();
                        metrics::counter!("piclumen_hub_rounds_total").increment(1);
                        debug!(jobs, calls = round.len(), "poll round");
                    }
                }
                Some(done) = calls.join_next() => {
                    match done {
                        Ok((ids, result)) => self.apply(config, &mut retry, ids, result),
                        Err(e) => warn!(error = %e, "poll call task failed"),
                    }
                }
            }
            if round.is_empty() && calls.is_empty() && self.retire(&hub) {
                return;
            }
        }
    }

    /// Drops unwatched jobs, then splits the wanted ones into even batches
    /// of at most `batch_max` ids, longest unasked first.
    fn take_batches(
        &self,
        config: &HubConfig,
        mut want: impl FnMut(&mut Slot) -> bool,
    ) -> Vec<Batch> {
        let mut jobs = lock(&self.jobs);
        forget_unwatched(&mut jobs);
        let mut wanted: Vec<(Option<Instant>, String)> = jobs
            .iter_mut()
            .filter_map(|(id, slot)| want(slot).then(|| (slot.sent_at, id.clone())))
            .collect();
        // Oldest first keeps each job's place in the round from one round to
        // the next, so it is asked for about once per interval, never early
        // in one round and late in the next.
        wanted.sort_unstable();
        let calls = wanted.len().div_ceil(config.batch_max.max(1));
        if calls == 0 {
            return Vec::new();
        }
        let per_call = wanted.len().div_ceil(calls);
        wanted
            .chunks(per_call)
            .map(|chunk| Batch {
                oldest: chunk[0].0,
                ids: chunk.iter().map(|(_, id)| id.clone()).collect(),
            })
            .collect()
    }

    /// Sends one batch-status call for the ids still watched, stamping them.
    fn send(&self, hub: &Arc<Inner>, calls: &mut JoinSet<CallResult>, ids: Vec<String>) {
        let batch: Vec<String> = {
            let mut jobs = lock(&self.jobs);
            forget_unwatched(&mut jobs);
            let now = Instant::now();
            ids.into_iter()
                .filter(|id| match jobs.get_mut(id) {
                    Some(slot) => {
                        slot.sent_at = Some(now);
                        true
                    }
                    None => false,
                })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        metrics::counter!("piclumen_upstream_calls_total", "endpoint" => "status").increment(1);
        metrics::histogram!("piclumen_hub_ids_per_call").record(batch.len() as f64);
        let client = hub.client.clone();
        let token = self.token.clone();
        calls.spawn(async move {
            let result = client.batch_status(&token, &batch, None).await;
            (batch, result)
        });
    }

    /// Publishes one call's answer to the watchers of its ids.
    fn apply(
        &self,
        config: &HubConfig,
        retry: &mut Retry,
        ids: Vec<String>,
        result: Result<Vec<JobStatus>, UpstreamError>,
    ) {
        let mut jobs = lock(&self.jobs);
        let now = Instant::now();
        match result {
            Ok(statuses) => {
                retry.reset();
                let mut by_id: HashMap<String, JobStatus> = statuses
                    .into_iter()
                    .map(|s| (s.mark_id.clone(), s))
                    .collect();
                for id in ids {
                    let Some(slot) = jobs.get_mut(&id) else {
                        continue;
                    };
                    slot.polled_at = Some(now);
                    let (snapshot, done) = match by_id.remove(&id) {
                        Some(status) => {
                            let done = status.state.is_terminal();
                            (Snapshot::Status(status), done)
                        }
                        None => (
                            Snapshot::Ended(Error::NotFound {
                                mark_id: id.clone(),
                            }),
                            true,
                        ),
                    };
                    publish(&slot.tx, snapshot);
                    if done {
                        remove(&mut jobs, &id);
                    }
                }
            }
            Err(error) if error.is_transient() => {
                let outage = *retry.since.get_or_insert(now);
                if now.duration_since(outage) >= config.failure_budget {
                    warn!(%error, "upstream trouble outlasted the failure budget; ending watches");
                    let ended = Error::UpstreamOutage {
                        budget: config.failure_budget,
                        last: error,
                    };
                    for (_, slot) in jobs.drain() {
                        publish(&slot.tx, Snapshot::Ended(ended.clone()));
                        metrics::gauge!("piclumen_hub_jobs").decrement(1.0);
                    }
                    retry.reset();
                    return;
                }
                let delay = match &error {
                    UpstreamError::RateLimited {
                        retry_after: Some(after),
                    } => *after,
                    _ => retry.next_delay(),
                };
                debug!(%error, ?delay, "transient upstream trouble; backing off");
                retry.paused_until = Some(now + delay);
            }
            Err(error) => {
                warn!(%error, "upstream refused a status call; ending its watches");
                let ended = Error::Upstream {
                    source: error,
                    default_token: false,
                };
                for id in ids {
                    if let Some(slot) = jobs.get(&id) {
                        publish(&slot.tx, Snapshot::Ended(ended.clone()));
                        remove(&mut jobs, &id);
                    }
                }
            }
        }
    }

    /// Ends this poller when it has nothing left, under the hub's lock so a
    /// concurrent subscribe either sees the old poller's jobs or a new poller.
    fn retire(self: &Arc<Self>, hub: &Inner) -> bool {
        let mut tokens = lock(&hub.tokens);
        let mut jobs = lock(&self.jobs);
        forget_unwatched(&mut jobs);
        if !jobs.is_empty() {
            return false;
        }
        if tokens
            .get(&self.token)
            .is_some_and(|p| Arc::ptr_eq(p, self))
        {
            tokens.remove(&self.token);
        }
        true
    }
}

/// Ids for one call, with when the longest-waiting of them was last asked.
#[derive(Debug)]
struct Batch {
    ids: Vec<String>,
    oldest: Option<Instant>,
}

impl Batch {
    /// When the oldest job is due again; `None` if it was never asked.
    fn due(&self, interval: Duration) -> Option<Instant> {
        self.oldest.map(|at| at + interval)
    }
}

/// Transient-failure state of one token: an outage start and a backoff.
#[derive(Debug)]
struct Retry {
    since: Option<Instant>,
    paused_until: Option<Instant>,
    backoff: ExponentialBackoff,
}

impl Retry {
    fn new() -> Self {
        Self {
            since: None,
            paused_until: None,
            backoff: Self::builder().build(),
        }
    }

    fn builder() -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(10))
            .without_max_times()
    }

    fn next_delay(&mut self) -> Duration {
        self.backoff.next().unwrap_or(Duration::from_secs(10))
    }

    fn reset(&mut self) {
        if self.since.take().is_some() {
            self.backoff = Self::builder().build();
        }
        self.paused_until = None;
    }
}

fn publish(tx: &watch::Sender<Snapshot>, snapshot: Snapshot) {
    tx.send_if_modified(|current| {
        let changed = *current != snapshot;
        if changed {
            *current = snapshot;
        }
        changed
    });
}

fn remove(jobs: &mut HashMap<String, Slot>, id: &str) {
    if jobs.remove(id).is_some() {
        metrics::gauge!("piclumen_hub_jobs").decrement(1.0);
    }
}

fn forget_unwatched(jobs: &mut HashMap<String, Slot>) {
    let before = jobs.len();
    jobs.retain(|_, slot| slot.watched());
    let gone = before - jobs.len();
    if gone > 0 {
        metrics::gauge!("piclumen_hub_jobs").decrement(gone as f64);
    }
}

/// Locks a mutex; a poisoned one still holds consistent maps (no code
/// panics while holding these locks), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
