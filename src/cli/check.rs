//! `check`: a job's current state once, or with `--wait` its next change.
//!
//! `--wait D` uses CheckImage's own wait: the call answers as soon as the
//! job's etag differs from the one given, or when the wait ends, with the
//! current state. The etag is `--etag` (what the caller saw last, e.g. from
//! an earlier `check --json`); without it, a first plain check supplies it,
//! so the command answers at the job's next change. A wait longer than the
//! server's `--max-check-wait` is asked again with the time left, until `D`
//! (and `--timeout`) runs out; the decision is [`WaitPlan`]. A server
//! that drains (or a lost connection) is left for a new connection, as
//! `watch` does.

use std::time::Duration;

use tokio::time::Instant;

use super::{CliError, Connection, Output, describe, finish, follow::resuming};
use crate::{
    config::CheckArgs,
    pb::{self, JobState},
};

/// Shortest wait worth asking again for.
const MIN_ASK: Duration = Duration::from_secs(1);

/// When `check --wait` asks again, and with what wait.
#[derive(Debug)]
pub(super) struct WaitPlan {
    /// The etag the answer must differ from.
    etag: String,
    /// When the caller's wait (or the command's deadline) runs out.
    until: Instant,
}

impl WaitPlan {
    /// A wait of `wait` from `now` for a change from `etag`, within
    /// `deadline`.
    pub(super) fn new(etag: String, now: Instant, wait: Duration, deadline: Instant) -> Self {
        Self {
            etag,
            until: (now + wait).min(deadline),
        }
    }

    /// The wait to ask for next, or `None` when `answer` is the one to
    /// show: it changed, it has ended, the wait is over, or it has no etag
    /// (a server that does not wait answers at once, and asking again would
    /// spin).
    pub(super) fn next(&self, answer: Option<&pb::ImageJob>, now: Instant) -> Option<Duration> {
        let left = self.until.saturating_duration_since(now);
        let Some(job) = answer else {
            return Some(left);
        };
        let settled = job.etag != self.etag
            || job.etag.is_empty()
            || matches!(job.state(), JobState::Succeeded | JobState::Failed);
        // The server answers a little before the deadline it is given (to
        // answer within it): less than this left, asking again would only
        // meet the deadline.
        (!settled && left >= MIN_ASK).then_some(left)
    }

    /// Whether `job` is still what the caller had.
    fn unchanged(&self, job: &pb::ImageJob) -> bool {
        job.etag == self.etag && !matches!(job.state(), JobState::Succeeded | JobState::Failed)
    }
}

/// `check`: prints a job's state once, or with `--wait` once it changed
/// (and with `--out`, saves its images if it has succeeded).
pub async fn check(args: CheckArgs) -> Result<(), CliError> {
    let deadline = Instant::now() + args.client.timeout;
    let mut conn = Connection::open(&args.client).await?;
    let job = match args.wait {
        None => call(&mut conn, &args.mark_id, None, deadline).await?,
        Some(wait) => next_change(&mut conn, &args, wait, deadline).await?,
    };
    let output = Output {
        json: args.json,
        out: args.out,
        state_line: true,
    };
    finish(job, None, &output).await
}

/// The job once its etag differs from `--etag` (or from a first plain
/// check's), it has ended, or `wait` is over.
async fn next_change(
    conn: &mut Connection,
    args: &CheckArgs,
    wait: Duration,
    deadline: Instant,
) -> Result<pb::ImageJob, CliError> {
    let mut answer = None;
    let etag = match &args.etag {
        Some(etag) => etag.clone(),
        None => {
            let job = call(conn, &args.mark_id, None, deadline).await?;
            let etag = job.etag.clone();
            answer = Some(job);
            etag
        }
    };
    let started = Instant::now();
    let plan = WaitPlan::new(etag, started, wait, deadline);
    let announce = |why: &str| {
        eprintln!(
            "check of {} interrupted ({why}): reconnecting to {} and waiting again",
            args.mark_id, args.client.server
        );
    };
    while plan.next(answer.as_ref(), Instant::now()).is_some() {
        // A drained server answers a wait at once and refuses the next
        // call: asked again on a new connection, for the time left then.
        let job = resuming(conn, &args.client, deadline, announce, async |conn, _| {
            let left = plan.until.saturating_duration_since(Instant::now());
            call(conn, &args.mark_id, Some((left, &plan.etag)), deadline).await
        })
        .await?;
        answer = Some(job);
    }
    let job = answer.unwrap_or_default();
    if plan.unchanged(&job) {
        eprintln!(
            "{}: no change within {}",
            describe(&job),
            // Whole seconds: the time waited, which --timeout may cut short.
            humantime::format_duration(Duration::from_secs(
                started.elapsed().as_secs_f64().round() as u64
            ))
        );
    }
    Ok(job)
}

/// One CheckImage call, waiting up to `wait.0` for a change from etag
/// `wait.1` when given, within `deadline`.
async fn call(
    conn: &mut Connection,
    mark_id: &str,
    wait: Option<(Duration, &str)>,
    deadline: Instant,
) -> Result<pb::ImageJob, CliError> {
    let mut request = conn.request(pb::CheckImageRequest {
        mark_id: mark_id.to_owned(),
        wait: wait.map(|(wait, _)| prost_types::Duration {
            seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(wait.subsec_nanos()).unwrap_or(0),
        }),
        etag: wait.map(|(_, etag)| etag.to_owned()).unwrap_or_default(),
    });
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    Ok(conn
        .client
        .check_image(request)
        .await?
        .into_inner()
        .job
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(etag: &str, state: JobState) -> pb::ImageJob {
        pb::ImageJob {
            etag: etag.into(),
            state: state.into(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn asks_again_with_the_time_left_until_a_change() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(600);
        let plan = WaitPlan::new("e1".into(), start, Duration::from_secs(100), deadline);
        // Without an answer yet (--etag given): the whole wait.
        assert_eq!(plan.next(None, start), Some(Duration::from_secs(100)));
        // The server's cap ended its wait after 60 s, unchanged: 40 s more.
        let same = job("e1", JobState::Running);
        assert_eq!(
            plan.next(Some(&same), start + Duration::from_secs(60)),
            Some(Duration::from_secs(40))
        );
        assert!(plan.unchanged(&same));
        // Our wait is over: the unchanged state is the answer.
        assert_eq!(
            plan.next(Some(&same), start + Duration::from_secs(100)),
            None
        );
        // A change, or an end, answers at once.
        let changed = job("e2", JobState::Running);
        assert_eq!(plan.next(Some(&changed), start), None);
        assert!(!plan.unchanged(&changed));
        let ended = job("e1", JobState::Succeeded);
        assert_eq!(plan.next(Some(&ended), start), None);
        assert!(!plan.unchanged(&ended));
        // A server without etags would answer at once each time: no loop.
        assert_eq!(plan.next(Some(&job("", JobState::Running)), start), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_commands_deadline_bounds_the_wait() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let plan = WaitPlan::new("e".into(), start, Duration::from_secs(30), deadline);
        assert_eq!(plan.next(None, start), Some(Duration::from_secs(10)));
        let same = job("e", JobState::Pending);
        assert_eq!(plan.next(Some(&same), deadline), None);
        // The server kept back a margin before the deadline: not asked
        // again for what is left of it.
        let margin = deadline - Duration::from_millis(900);
        assert_eq!(plan.next(Some(&same), margin), None);
    }
}
