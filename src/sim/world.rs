//! The simulator's job world: the jobs, the state each is in at a given
//! `now`, the status entries Piclumen would answer, the accepted creates and
//! the call counters. A plain type whose methods take `now`, so its timing
//! and eviction are tested without HTTP or a clock.

use std::{
    collections::{HashMap, VecDeque},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::time::Instant;

use super::images;

/// How long a job stays after it finished. A client reads a finished job
/// within seconds; ten minutes leave every test, benchmark and a human at
/// the quick start ample time to check it again, while a simulator left
/// running sheds its finished jobs instead of growing for ever.
const RETENTION: Duration = Duration::from_secs(10 * 60);
/// Most jobs kept at once, finished or not; beyond it the oldest go first.
/// `proxy_cost`'s GenerateImage creates about 25,000 jobs a second that
/// never finish (100,000 s), about a million in a default run, and then
/// checks jobs seeded before them: the bound sits well above that, at
/// about 2 GB of jobs (some 540 bytes each), only to stop a runaway.
const MAX_JOBS: usize = 4_000_000;
/// How many recent create bodies `/_sim/creates` keeps.
const KEEP_CREATES: usize = 200;
/// Queue index of a new job.
const QUEUE_START: i64 = 3;
/// Share of a job's duration it spends queued (`pending`).
const QUEUED_SHARE: f64 = 0.4;

/// Request counters, as `/_sim/stats` reports them.
#[derive(Debug, Default)]
pub(super) struct Calls {
    pub(super) create_calls: AtomicU64,
    pub(super) status_calls: AtomicU64,
    pub(super) status_ids: AtomicU64,
    /// Create requests answered with anything but a mark id: a fault's
    /// reply (scripted or random) or a refusal (401, 400, no prompt).
    pub(super) create_failed: AtomicU64,
    /// Status requests answered with anything but the jobs' states.
    pub(super) status_failed: AtomicU64,
    pub(super) injected_5xx: AtomicU64,
    pub(super) injected_429: AtomicU64,
    pub(super) scripted_faults: AtomicU64,
    pub(super) unauthorized: AtomicU64,
    /// TCP connections accepted, so tests can see whether callers reuse them.
    pub(super) connections: AtomicU64,
}

impl Calls {
    /// Adds `n` to `counter`.
    pub(super) fn count(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The value of `counter`.
    pub(super) fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One simulated job.
#[derive(Debug)]
pub(super) struct Job {
    token: String,
    created: Instant,
    pub(super) duration: Duration,
    batch_size: i64,
    width: i64,
    height: i64,
    fail: bool,
    nsfw: bool,
    prompt_id: String,
    /// Wall-clock creation time, for measurements across processes.
    pub(super) created_unix_ms: u128,
}

impl Job {
    /// The SHA-256 of the job's token, as lowercase hex.
    pub(super) fn token_sha256(&self) -> String {
        crate::support::hex(
            ring::digest::digest(&ring::digest::SHA256, self.token.as_bytes()).as_ref(),
        )
    }

    /// Images the job makes.
    pub(super) fn batch_size(&self) -> i64 {
        self.batch_size
    }

    /// The job a create body orders for `token`, or `None` when the body
    /// names no prompt.
    pub(super) fn ordered(
        token: String,
        payload: &Value,
        created: Instant,
        duration: Duration,
    ) -> Option<Self> {
        let prompt = payload["prompt"].as_str().unwrap_or_default();
        if prompt.is_empty() {
            return None;
        }
        let resolution = &payload["resolution"];
        Some(Self {
            token,
            created,
            duration,
            batch_size: resolution["batch_size"].as_i64().unwrap_or(1).clamp(1, 4),
            width: resolution["width"].as_i64().unwrap_or(1344),
            height: resolution["height"].as_i64().unwrap_or(768),
            fail: prompt.contains("[sim:fail]"),
            nsfw: prompt.contains("[sim:nsfw]"),
            prompt_id: format!("{:016x}", rand::random::<u64>()),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        })
    }

    fn finished(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.created) >= self.duration
    }

    /// When the job may be forgotten; `None` beyond the clock's range.
    fn expires(&self) -> Option<Instant> {
        self.created
            .checked_add(self.duration)?
            .checked_add(RETENTION)
    }

    /// The job's status entry at `now`, with Piclumen's field names.
    fn entry(&self, mark_id: &str, now: Instant, host: &str) -> Value {
        let elapsed = now.saturating_duration_since(self.created).as_secs_f64();
        let total = self.duration.as_secs_f64();
        let queued = total * QUEUED_SHARE;
        if elapsed < queued {
            let left = 1.0 - elapsed / queued;
            let index = (QUEUE_START as f64 * left).ceil() as i64;
            return json!({"markId": mark_id, "status": "pending", "index": index, "info": null});
        }
        let status = if elapsed < total {
            "running"
        } else if self.fail {
            "failed"
        } else {
            "success"
        };
        let mut entry = json!({"markId": mark_id, "status": status, "promptId": self.prompt_id});
        if status == "success" {
            let images: Vec<Value> = (0..self.batch_size)
                .map(|i| {
                    let name = images::name(mark_id, i);
                    json!({
                        "imgUrl": images::url(host, &name),
                        "imgName": name,
                        "realWidth": self.width,
                        "realHeight": self.height,
                        "sensitive": if self.nsfw { json!("NSFW") } else { Value::Null },
                    })
                })
                .collect();
            entry["img_urls"] = Value::Array(images);
        }
        entry
    }
}

/// The jobs, the recent creates and the latest request headers.
#[derive(Debug)]
pub(super) struct World {
    jobs: HashMap<String, Job>,
    /// Mark ids in creation order, each with the time it may go. Eviction
    /// walks from the front and stops at the first job still wanted; with
    /// jitter a later job may wait behind an earlier one, never go early.
    by_age: VecDeque<(Option<Instant>, String)>,
    max_jobs: usize,
    creates: VecDeque<Value>,
    /// Headers of the latest create and status requests.
    pub(super) last_create: Option<Value>,
    pub(super) last_status: Option<Value>,
}

impl Default for World {
    fn default() -> Self {
        Self::with_max_jobs(MAX_JOBS)
    }
}

impl World {
    fn with_max_jobs(max_jobs: usize) -> Self {
        Self {
            jobs: HashMap::new(),
            by_age: VecDeque::new(),
            max_jobs,
            creates: VecDeque::new(),
            last_create: None,
            last_status: None,
        }
    }

    /// Adds a job created at `now`, first forgetting jobs past their
    /// retention and, at the bound, the oldest.
    pub(super) fn insert(&mut self, now: Instant, mark_id: String, job: Job) {
        self.evict(now);
        while self.jobs.len() >= self.max_jobs.max(1) {
            let Some((_, oldest)) = self.by_age.pop_front() else {
                break;
            };
            self.jobs.remove(&oldest);
        }
        self.by_age.push_back((job.expires(), mark_id.clone()));
        self.jobs.insert(mark_id, job);
    }

    /// Forgets the jobs that finished more than `RETENTION` before `now`.
    fn evict(&mut self, now: Instant) {
        while let Some((Some(expires), _)) = self.by_age.front()
            && *expires <= now
        {
            if let Some((_, mark_id)) = self.by_age.pop_front() {
                self.jobs.remove(&mark_id);
            }
        }
    }

    /// The status entries of those `ids` that are jobs of `token`, as of
    /// `now`; image URLs lead to `host`.
    pub(super) fn status(
        &mut self,
        now: Instant,
        token: &str,
        ids: &[String],
        host: &str,
    ) -> Vec<Value> {
        self.evict(now);
        ids.iter()
            .filter_map(|id| {
                let job = self.jobs.get(id).filter(|j| j.token == token)?;
                Some(job.entry(id, now, host))
            })
            .collect()
    }

    /// The width and height of image `index` of job `mark_id`, when that job
    /// has succeeded by `now` with at least `index + 1` images.
    pub(super) fn image_size(&self, now: Instant, mark_id: &str, index: i64) -> Option<(i64, i64)> {
        let job = self.jobs.get(mark_id)?;
        let done = job.finished(now) && !job.fail;
        (done && (0..job.batch_size).contains(&index)).then_some((job.width, job.height))
    }

    /// Keeps an accepted create (`{"headers", "body"}`), the latest few.
    pub(super) fn record_create(&mut self, create: Value) {
        if self.creates.len() == KEEP_CREATES {
            self.creates.pop_front();
        }
        self.creates.push_back(create);
    }

    /// The latest accepted creates, oldest first.
    pub(super) fn creates(&self) -> impl Iterator<Item = &Value> {
        self.creates.iter()
    }

    /// Every job by mark id.
    pub(super) fn jobs(&self) -> impl Iterator<Item = (&String, &Job)> {
        self.jobs.iter()
    }

    /// How many jobs there are.
    pub(super) fn len(&self) -> usize {
        self.jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn job(prompt: &str, created: Instant, duration: Duration) -> Job {
        let body = json!({"prompt": prompt, "resolution": {"batch_size": 2}});
        Job::ordered("t".into(), &body, created, duration).expect("a prompt")
    }

    fn state(world: &mut World, now: Instant, id: &str) -> Value {
        let entries = world.status(now, "t", &[id.to_owned()], "h:1");
        entries.first().map_or(Value::Null, |e| e["status"].clone())
    }

    #[test]
    fn a_create_without_a_prompt_orders_nothing() {
        let now = Instant::now();
        for body in [json!({}), json!({"prompt": ""}), json!({"prompt": 3})] {
            assert!(
                Job::ordered("t".into(), &body, now, SECOND).is_none(),
                "{body}"
            );
        }
    }

    #[test]
    fn jobs_queue_run_and_finish_on_their_clock_for_their_token_only() {
        let t0 = Instant::now();
        let mut world = World::default();
        world.insert(t0, "ok".into(), job("p", t0, 10 * SECOND));
        world.insert(t0, "bad".into(), job("p [sim:fail]", t0, 10 * SECOND));
        let entry = world.status(t0, "t", &["ok".into()], "h:1");
        assert_eq!(entry[0]["status"], "pending");
        assert_eq!(entry[0]["index"], QUEUE_START);
        assert_eq!(state(&mut world, t0 + 4 * SECOND, "ok"), "running");
        assert_eq!(world.image_size(t0 + 9 * SECOND, "ok", 0), None);
        let done = world.status(t0 + 10 * SECOND, "t", &["ok".into()], "h:1");
        assert_eq!(done[0]["status"], "success");
        assert_eq!(
            done[0]["img_urls"][1]["imgUrl"],
            "http://h:1/_sim/images/ok-1.png"
        );
        assert_eq!(
            world.image_size(t0 + 10 * SECOND, "ok", 1),
            Some((1344, 768))
        );
        assert_eq!(world.image_size(t0 + 10 * SECOND, "ok", 2), None);
        assert_eq!(state(&mut world, t0 + 10 * SECOND, "bad"), "failed");
        assert_eq!(world.image_size(t0 + 10 * SECOND, "bad", 0), None);
        let other = world.status(t0 + 10 * SECOND, "other", &["ok".into()], "h:1");
        assert!(other.is_empty(), "another token's job is not found");
    }

    #[test]
    fn finished_jobs_are_forgotten_after_the_retention_and_not_before() {
        let t0 = Instant::now();
        let mut world = World::default();
        world.insert(t0, "short".into(), job("p", t0, SECOND));
        world.insert(t0, "long".into(), job("p", t0, RETENTION * 2));
        let kept = t0 + SECOND + RETENTION - Duration::from_millis(1);
        assert_eq!(state(&mut world, kept, "short"), "success");
        assert_eq!(world.len(), 2);
        let gone = t0 + SECOND + RETENTION;
        assert_eq!(state(&mut world, gone, "short"), Value::Null);
        assert_eq!(world.len(), 1, "only the finished job went");
        assert_eq!(state(&mut world, gone, "long"), "running");
        // A create evicts too, without a status call.
        let later = t0 + RETENTION * 4 + SECOND;
        world.insert(later, "new".into(), job("p", later, SECOND));
        assert_eq!(
            world.jobs().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["new"]
        );
    }

    #[test]
    fn a_job_behind_a_longer_one_waits_for_it_and_is_then_evicted() {
        let t0 = Instant::now();
        let mut world = World::default();
        world.insert(t0, "slow".into(), job("p", t0, 5 * SECOND));
        world.insert(t0, "fast".into(), job("p", t0, SECOND));
        let after_fast = t0 + SECOND + RETENTION;
        assert_eq!(state(&mut world, after_fast, "fast"), "success", "waits");
        world.evict(t0 + 5 * SECOND + RETENTION);
        assert_eq!(world.len(), 0);
    }

    #[test]
    fn the_count_bound_drops_the_oldest_jobs_first() {
        let t0 = Instant::now();
        let mut world = World::with_max_jobs(3);
        for i in 0..5 {
            world.insert(t0, format!("j{i}"), job("p", t0, RETENTION));
        }
        let mut left: Vec<&str> = world.jobs().map(|(id, _)| id.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["j2", "j3", "j4"]);
        assert_eq!(state(&mut world, t0, "j0"), Value::Null);
        assert_eq!(state(&mut world, t0, "j4"), "pending");
    }

    #[test]
    fn jobs_beyond_the_clock_stay_until_the_count_bound() {
        let t0 = Instant::now();
        let mut world = World::with_max_jobs(2);
        world.insert(t0, "ever".into(), job("p", t0, Duration::MAX));
        world.evict(t0 + RETENTION * 1000);
        assert_eq!(world.len(), 1);
        world.insert(t0, "a".into(), job("p", t0, SECOND));
        world.insert(t0, "b".into(), job("p", t0, SECOND));
        assert_eq!(state(&mut world, t0, "ever"), Value::Null);
        assert_eq!(world.len(), 2);
    }

    #[test]
    fn only_the_latest_creates_are_kept() {
        let mut world = World::default();
        for i in 0..KEEP_CREATES + 5 {
            world.record_create(json!(i));
        }
        let kept: Vec<&Value> = world.creates().collect();
        assert_eq!(kept.len(), KEEP_CREATES);
        assert_eq!(kept[0], &json!(5));
    }
}
