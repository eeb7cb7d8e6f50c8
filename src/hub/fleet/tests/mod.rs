//! Fleet polling on paused time: several hubs (replicas) in one runtime,
//! one scripted `StatusSource` counting every status call, and a scripted
//! shared store that can go down or lose a replica (a crash: its calls and
//! store operations never end). Exact counts of calls per round, handover
//! within two intervals, fleet-wide pauses, the fallback to polling alone,
//! and what the store ever sees of a token. The coordinator alone is in
//! `coordinator`; what an entry carries across the wire in `wire`.

mod coordinator;
mod wire;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::mpsc,
    time::{Instant, sleep},
};

use super::{
    ExchangeReply, ExchangeRequest, FleetError, FleetLink, FleetStore, TokenKey,
    wire::{Encoded, Entry, Round},
};
use crate::{
    hub::{
        Hub, HubError, Snapshot, StatusSource, Subscription,
        schedule::Id,
        tests::fake::{Fake, INTERVAL, Scripted, config, id, next_state, token},
    },
    job::{JobState, Token},
    upstream::{BoxFuture, StatusEntry, UpstreamError},
};

#[derive(Default)]
struct StoreState {
    down: bool,
    leases: HashMap<String, (String, Instant)>,
    want: HashMap<String, HashMap<String, Instant>>,
    states: HashMap<(String, String), (Entry, Instant)>,
    subscribers: Vec<mpsc::Sender<Arc<Round>>>,
    /// Every key and id text the store was given.
    seen: Vec<String>,
    /// Replicas that ever exchanged.
    exchanged: Vec<String>,
}

/// The shared store, in memory, on the test's (paused) clock.
#[derive(Clone, Default)]
struct Store(Arc<Mutex<StoreState>>);

impl Store {
    fn set_down(&self, down: bool) {
        let mut s = self.0.lock().expect("store");
        s.down = down;
        if down {
            // A restarted Redis: subscriptions end, keys are gone.
            s.subscribers.clear();
            s.leases.clear();
            s.want.clear();
            s.states.clear();
        }
    }

    fn holder(&self, key: &str) -> Option<String> {
        let s = self.0.lock().expect("store");
        let now = Instant::now();
        s.leases
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(who, _)| who.clone())
    }
}

/// One replica's view of the store: stops answering when the replica dies.
struct Replica {
    store: Store,
    dead: Arc<AtomicBool>,
}

fn unreachable() -> FleetError {
    FleetError("connection refused".into())
}

impl Replica {
    fn gate<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut StoreState) -> Result<T, FleetError>,
    ) -> BoxFuture<Result<T, FleetError>> {
        if self.dead.load(Ordering::Relaxed) {
            return Box::pin(std::future::pending());
        }
        let result = {
            let mut s = self.store.0.lock().expect("store");
            if s.down {
                Err(unreachable())
            } else {
                f(&mut s)
            }
        };
        Box::pin(async move { result })
    }
}

impl FleetStore for Replica {
    fn exchange(&self, r: ExchangeRequest) -> BoxFuture<Result<ExchangeReply, FleetError>> {
        self.gate(move |s| {
            let now = Instant::now();
            let key = r.key.as_str().to_owned();
            s.seen.push(key.clone());
            s.exchanged.push(r.me.to_string());
            let lease = s.leases.get(&key).filter(|(_, until)| *until > now);
            let holder = lease.is_none_or(|(who, _)| **who == *r.me);
            let want = s.want.entry(key.clone()).or_default();
            let mut wanted = Vec::new();
            if holder {
                s.leases
                    .insert(key.clone(), (r.me.to_string(), now + r.lease));
                want.retain(|_, until| *until > now);
                wanted = want.keys().map(|id| Id::from(id.as_str())).collect();
            } else {
                for id in &r.register {
                    let until = want.entry(id.to_string()).or_insert(now);
                    *until = (*until).max(now + r.want_ttl);
                }
            }
            let states = r
                .read
                .iter()
                .filter_map(|id| s.states.get(&(key.clone(), id.to_string())))
                .filter(|(_, until)| *until > now)
                .map(|(entry, _)| entry.clone())
                .collect();
            s.seen.extend(r.register.iter().map(|id| id.to_string()));
            Ok(ExchangeReply {
                holder,
                wanted,
                states,
            })
        })
    }

    fn publish(
        &self,
        round: Encoded,
        done: Vec<Id>,
        keep: Duration,
    ) -> BoxFuture<Result<(), FleetError>> {
        self.gate(move |s| {
            let now = Instant::now();
            let key = round.round.key.clone();
            s.seen.push(round.json.clone());
            for entry in &round.round.entries {
                s.states
                    .insert((key.clone(), entry.id.clone()), (entry.clone(), now + keep));
            }
            if let Some(want) = s.want.get_mut(&key) {
                for id in &done {
                    want.remove(&**id);
                }
            }
            s.subscribers
                .retain(|tx| tx.try_send(Arc::clone(&round.round)).is_ok());
            Ok(())
        })
    }

    fn release(&self, key: TokenKey, me: Arc<str>) -> BoxFuture<Result<(), FleetError>> {
        self.gate(move |s| {
            if s.leases
                .get(key.as_str())
                .is_some_and(|(who, _)| **who == *me)
            {
                s.leases.remove(key.as_str());
            }
            Ok(())
        })
    }

    fn subscribe(&self) -> BoxFuture<Result<mpsc::Receiver<Arc<Round>>, FleetError>> {
        self.gate(|s| {
            let (tx, rx) = mpsc::channel(1024);
            s.subscribers.push(tx);
            Ok(rx)
        })
    }
}

/// The upstream as one replica sees it: silent once the replica is dead.
struct Upstream {
    fake: Fake,
    dead: Arc<AtomicBool>,
}

impl StatusSource for Upstream {
    fn batch_status(
        &self,
        token: &Token,
        ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>> {
        if self.dead.load(Ordering::Relaxed) {
            return Box::pin(std::future::pending());
        }
        self.fake.batch_status(token, ids)
    }
}

struct Node {
    hub: Hub,
    me: Arc<str>,
    dead: Arc<AtomicBool>,
}

fn fleet(n: usize, fake: &Fake, store: &Store) -> Vec<Node> {
    (0..n)
        .map(|_| {
            let dead = Arc::new(AtomicBool::new(false));
            let replica = Replica {
                store: store.clone(),
                dead: Arc::clone(&dead),
            };
            let link = Arc::new(FleetLink::new(Arc::new(replica)));
            let me = Arc::clone(&link.me);
            let source = Upstream {
                fake: fake.clone(),
                dead: Arc::clone(&dead),
            };
            Node {
                hub: Hub::with_fleet(config(), Arc::new(source), link),
                me,
                dead,
            }
        })
        .collect()
}

fn key() -> String {
    TokenKey::of(&token()).as_str().to_owned()
}

async fn state_of(sub: &mut Subscription) -> Option<JobState> {
    match next_state(sub).await {
        Snapshot::Status(s) => Some(s.state),
        _ => None,
    }
}

/// Every node watches jobs `0..jobs`.
fn watch_all(nodes: &[Node], jobs: usize) -> Vec<Subscription> {
    nodes
        .iter()
        .flat_map(|n| (0..jobs).map(|i| n.hub.subscribe(&token(), &id(i))))
        .collect()
}

/// Each subscription's next state is `state`.
async fn expect_each(subs: &mut [Subscription], state: JobState) {
    for sub in subs {
        assert_eq!(state_of(sub).await, Some(state));
    }
}

/// The calls sent in `measured` rounds after `settle` rounds.
async fn calls_after(fake: &Fake, settle: u32, measured: u32) -> Vec<Vec<String>> {
    sleep(INTERVAL * settle).await;
    let from = Instant::now();
    sleep(INTERVAL * measured).await;
    fake.calls_between(from, from + INTERVAL * measured)
}

#[tokio::test(start_paused = true)]
async fn four_replicas_watching_every_job_make_one_call_per_round() {
    let fake = Fake::with_jobs(40);
    let store = Store::default();
    let nodes = fleet(4, &fake, &store);
    let mut subs = watch_all(&nodes, 40);
    expect_each(&mut subs, JobState::Pending).await;
    // Two rounds to settle, then five measured rounds.
    let calls = calls_after(&fake, 2, 5).await;
    assert_eq!(
        calls.len(),
        5,
        "one call per round for the fleet: {calls:?}"
    );
    assert!(store.holder(&key()).is_some());
    assert!(calls.iter().all(|ids| ids.len() == 40));
    // A change reaches every replica's watchers within the round.
    for i in 0..40 {
        fake.set(&id(i), JobState::Succeeded);
    }
    let changed = Instant::now();
    expect_each(&mut subs, JobState::Succeeded).await;
    assert!(changed.elapsed() <= INTERVAL + Duration::from_millis(100));
    // Every job finished: no watcher is left, and the lease was given back.
    sleep(INTERVAL).await;
    assert_eq!(store.holder(&key()), None);
}

#[tokio::test(start_paused = true)]
async fn one_viewer_per_job_spread_over_replicas_makes_one_call_per_round() {
    let fake = Fake::with_jobs(40);
    let store = Store::default();
    let nodes = fleet(4, &fake, &store);
    let mut subs: Vec<Subscription> = (0..40)
        .map(|i| nodes[i % 4].hub.subscribe(&token(), &id(i)))
        .collect();
    expect_each(&mut subs, JobState::Pending).await;
    let calls = calls_after(&fake, 2, 5).await;
    assert_eq!(calls.len(), 5, "{calls:?}");
    assert!(calls.iter().all(|ids| ids.len() == 40), "{calls:?}");
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_replaced_within_two_intervals_and_no_change_is_lost() {
    let fake = Fake::with_jobs(10);
    let store = Store::default();
    let nodes = fleet(3, &fake, &store);
    let mut subs: Vec<(usize, Subscription)> = nodes
        .iter()
        .enumerate()
        .flat_map(|(n, node)| (0..10).map(move |i| (n, node.hub.subscribe(&token(), &id(i)))))
        .collect();
    for (_, sub) in &mut subs {
        assert_eq!(state_of(sub).await, Some(JobState::Pending));
    }
    sleep(INTERVAL).await;
    let holder = store.holder(&key()).expect("a holder");
    let dead = nodes
        .iter()
        .position(|n| *n.me == *holder)
        .expect("holder node");
    nodes[dead].dead.store(true, Ordering::Relaxed);
    let killed = Instant::now();
    // Every job finishes right after the holder died.
    for i in 0..10 {
        fake.set(&id(i), JobState::Succeeded);
    }
    for (n, sub) in &mut subs {
        if *n != dead {
            assert_eq!(state_of(sub).await, Some(JobState::Succeeded));
        }
    }
    let first = fake
        .calls()
        .into_iter()
        .map(|(at, _)| at)
        .find(|at| *at > killed)
        .expect("a survivor polls");
    assert!(
        first - killed <= INTERVAL * 2,
        "handover took {:?}",
        first - killed
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_the_whole_fleet() {
    let fake = Fake::with_jobs(4);
    let store = Store::default();
    let nodes = fleet(2, &fake, &store);
    let mut subs = watch_all(&nodes, 4);
    expect_each(&mut subs, JobState::Pending).await;
    fake.script(Scripted::Fail(UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(7)),
    }));
    let before = fake.calls().len();
    // The next round gets the 429.
    sleep(INTERVAL + Duration::from_millis(100)).await;
    let limited_at = fake.calls().last().expect("calls").0;
    assert_eq!(fake.calls().len(), before + 1);
    // Both replicas hold their calls: a check on either is answered at
    // once with the cause, and nobody calls until the pause ends.
    for node in &nodes {
        let answer = tokio::time::timeout(
            Duration::from_millis(1),
            node.hub.check(&token(), &id(9), None),
        )
        .await
        .expect("answered at once");
        assert!(
            matches!(
                answer,
                Err(HubError::Upstream(UpstreamError::RateLimited { .. }))
            ),
            "{answer:?}"
        );
    }
    sleep(Duration::from_secs(6)).await;
    assert_eq!(
        fake.calls().len(),
        before + 1,
        "nothing sent during the pause"
    );
    sleep(Duration::from_secs(2)).await;
    let after: Vec<_> = fake
        .calls()
        .into_iter()
        .filter(|(at, _)| *at > limited_at)
        .collect();
    assert_eq!(after.len(), 1, "one call for the fleet once the pause ends");
    assert!(after[0].0 >= limited_at + Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_store_means_each_replica_polls_alone_until_it_is_back() {
    let fake = Fake::with_jobs(5);
    let store = Store::default();
    store.set_down(true);
    let nodes = fleet(3, &fake, &store);
    let mut subs = watch_all(&nodes, 5);
    expect_each(&mut subs, JobState::Pending).await;
    assert_eq!(
        calls_after(&fake, 1, 3).await.len(),
        9,
        "each replica alone"
    );
    store.set_down(false);
    assert_eq!(calls_after(&fake, 2, 3).await.len(), 3, "shared again");
    for i in 0..5 {
        fake.set(&id(i), JobState::Succeeded);
    }
    expect_each(&mut subs, JobState::Succeeded).await;
}

#[tokio::test(start_paused = true)]
async fn only_replicas_with_watchers_take_part_and_tokens_stay_hashed() {
    let fake = Fake::with_jobs(3);
    let store = Store::default();
    let nodes = fleet(2, &fake, &store);
    let secret = Token::new("s3cret-token-value").expect("token");
    let mut subs: Vec<Subscription> = (0..3)
        .map(|i| nodes[0].hub.subscribe(&secret, &id(i)))
        .collect();
    // The other replica only checks: it never exchanges, so it never
    // takes the lease of a token none of its callers watches with.
    nodes[1]
        .hub
        .check(&secret, &id(0), None)
        .await
        .expect("check");
    for sub in &mut subs {
        state_of(sub).await;
    }
    sleep(INTERVAL * 3).await;
    {
        let s = store.0.lock().expect("store");
        assert!(!s.exchanged.is_empty());
        assert!(s.exchanged.iter().all(|me| **me == *nodes[0].me));
        assert!(!s.seen.is_empty());
        assert!(s.seen.iter().all(|text| !text.contains(secret.expose())));
        assert!(s.leases.keys().all(|k| k.len() == 64));
    }
    // When the last watcher leaves, the lease is given back at once.
    drop(subs);
    sleep(INTERVAL).await;
    assert_eq!(store.holder(TokenKey::of(&secret).as_str()), None);
}
