//! WatchImages on paused time against the scripted fake of `tests`: owned
//! and unknown jobs on one stream, the end after the last job, heartbeats,
//! slots taken up front and given back, the ids' checks; and the tracker's
//! rules on plain values.

use std::time::Duration;

use futures_util::Stream;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::{
    ManyEvent, ServiceConfig,
    tests::{Harness, bare, harness, next, status, watch_config},
    watch_many::{Step, Tracker},
};
use crate::{
    error::Error,
    hub::{HubError, Snapshot},
    job::JobState,
    upstream::UpstreamError,
};

fn watch_many(
    h: &Harness,
    ids: &[&str],
) -> Result<impl Stream<Item = Result<ManyEvent, Error>> + use<>, Error> {
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    h.core.watch_many(&bare("t"), &ids, None)
}

/// The next message, which must be a job's state.
async fn next_job<S: Stream<Item = Result<ManyEvent, Error>> + Unpin>(
    stream: &mut S,
) -> crate::job::JobStatus {
    match next(stream).await.expect("item").expect("message") {
        ManyEvent::Job(status) => status,
        other => panic!("not a job's state: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn owned_and_unknown_jobs_share_a_stream_that_ends_after_the_last() {
    let h = harness(watch_config());
    h.fake.set("a", JobState::Pending);
    h.fake.set("b", JobState::Running);
    // "a" twice: folded into one job.
    let mut stream = Box::pin(watch_many(&h, &["a", "nowhere", "b", "a"]).expect("watch"));
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(next(&mut stream).await.expect("item").expect("message"));
    }
    assert!(first.contains(&ManyEvent::Job(status("a", JobState::Pending))));
    assert!(first.contains(&ManyEvent::Job(status("b", JobState::Running))));
    let failed = first
        .iter()
        .find_map(|m| match m {
            ManyEvent::JobFailed { mark_id, error } => Some((mark_id, error.clone())),
            _ => None,
        })
        .expect("the unknown job's error");
    assert_eq!(failed.0, "nowhere");
    assert_eq!(Status::from(failed.1).code(), Code::NotFound);

    // The others go on: one message per change, the stream ends right
    // after the last job's terminal state.
    h.fake.set("a", JobState::Running);
    assert_eq!(next_job(&mut stream).await, status("a", JobState::Running));
    h.fake.set("a", JobState::Succeeded);
    assert_eq!(
        next_job(&mut stream).await,
        status("a", JobState::Succeeded)
    );
    h.fake.set("b", JobState::Failed);
    assert_eq!(next_job(&mut stream).await, status("b", JobState::Failed));
    assert!(next(&mut stream).await.is_none(), "ends OK after the last");
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_gets_heartbeats_without_a_job() {
    let h = harness(watch_config());
    h.fake.set("a", JobState::Pending);
    h.fake.set("b", JobState::Pending);
    let mut stream = Box::pin(watch_many(&h, &["a", "b"]).expect("watch"));
    next_job(&mut stream).await;
    next_job(&mut stream).await;
    let quiet = Instant::now();
    for _ in 0..2 {
        let beat = next(&mut stream).await.expect("item").expect("message");
        assert_eq!(beat, ManyEvent::Heartbeat);
    }
    // One per heartbeat interval (5 s), although the hub polled every 2 s.
    assert_eq!(quiet.elapsed(), Duration::from_secs(10));
    h.fake.set("b", JobState::Running);
    assert_eq!(next_job(&mut stream).await.mark_id, "b");
}

#[tokio::test(start_paused = true)]
async fn slots_are_taken_up_front_freed_per_job_and_all_on_drop() {
    let h = harness(ServiceConfig {
        max_watches: 3,
        ..watch_config()
    });
    for id in ["a", "b", "c"] {
        h.fake.set(id, JobState::Running);
    }
    let refused = watch_many(&h, &["a", "b", "c", "d"])
        .err()
        .expect("4 jobs, 3 slots");
    assert!(
        matches!(&refused, Error::ResourceExhausted(m) if m.contains("3 of its 3 watches free")),
        "{refused:?}"
    );
    let mut stream = Box::pin(watch_many(&h, &["a", "b", "c"]).expect("3 slots"));
    for _ in 0..3 {
        next_job(&mut stream).await;
    }
    assert!(h.watch("a").is_err(), "every slot is held");
    // A job that ends gives its slot back.
    h.fake.set("a", JobState::Succeeded);
    assert_eq!(next_job(&mut stream).await.state, JobState::Succeeded);
    let single = h.watch("a").expect("a's slot");
    assert!(h.watch("a").is_err());
    // Cancelling (dropping) the stream gives back the rest.
    drop(stream);
    let again = watch_many(&h, &["b", "c"]).expect("the two slots came back");
    drop((single, again));
}

#[tokio::test(start_paused = true)]
async fn the_ids_are_checked_before_anything_is_taken() {
    let h = harness(ServiceConfig {
        max_watches: 2,
        max_watch_ids: 2,
        ..watch_config()
    });
    let invalid = |ids: &[&str]| match watch_many(&h, ids).err() {
        Some(
            error @ Error::InvalidArgument {
                field: "mark_ids", ..
            },
        ) => Status::from(error).message().to_owned(),
        other => panic!("{ids:?}: {other:?}"),
    };
    assert!(invalid(&[]).contains("at least one"));
    assert!(invalid(&["a", "b", "c"]).contains("limit of 2"));
    assert!(invalid(&["a", " "]).contains("mark_ids[1]"));
    // Duplicates count once.
    assert!(watch_many(&h, &["a", "b", "a", "b"]).is_ok());
}

#[tokio::test(start_paused = true)]
async fn draining_and_the_maximum_watch_time_end_the_stream() {
    let h = harness(ServiceConfig {
        max_watch: Duration::from_secs(30),
        ..watch_config()
    });
    h.fake.set("a", JobState::Pending);
    let mut stream = Box::pin(watch_many(&h, &["a"]).expect("watch"));
    next_job(&mut stream).await;
    let started = Instant::now();
    let end = loop {
        match next(&mut stream).await.expect("item") {
            Ok(ManyEvent::Heartbeat) => {}
            Ok(other) => panic!("{other:?}"),
            Err(end) => break end,
        }
    };
    assert!(started.elapsed() <= Duration::from_secs(30));
    assert!(
        matches!(&end, Error::DeadlineExceeded(m) if m.contains("call WatchImages again")),
        "{end:?}"
    );
    assert!(next(&mut stream).await.is_none());

    let mut stream = Box::pin(watch_many(&h, &["a"]).expect("watch"));
    next_job(&mut stream).await;
    h.draining.cancel();
    let end = next(&mut stream).await.expect("item").expect_err("ends");
    assert_eq!(end, Error::ShuttingDown);
}

// === the tracker's rules, on plain values ===

#[test]
fn only_news_is_sent_and_the_stream_is_done_when_every_job_ended() {
    let now = Instant::now();
    let mut tracker = Tracker::new(vec!["a".into(), "b".into()], Duration::from_secs(5), now);
    assert_eq!(tracker.on(0, Some(&Snapshot::Waiting), now), Step::Nothing);
    let pending = status("a", JobState::Pending);
    let sent = tracker.on(0, Some(&Snapshot::Status(pending.clone())), now);
    assert_eq!(
        sent,
        Step::Job {
            status: pending.clone(),
            ended: false
        }
    );
    // The same state again (confirmed later) is no news.
    assert_eq!(
        tracker.on(0, Some(&Snapshot::Status(pending)), now),
        Step::Nothing
    );
    let done = status("a", JobState::Succeeded);
    assert!(matches!(
        tracker.on(0, Some(&Snapshot::Status(done.clone())), now),
        Step::Job { ended: true, .. }
    ));
    // After its end, a job's channel closing is not an interruption.
    assert_eq!(tracker.on(0, None, now), Step::Nothing);
    assert!(!tracker.done());
    let gone = HubError::NotFound {
        mark_id: "b".into(),
    };
    assert!(matches!(
        tracker.on(1, Some(&Snapshot::Ended(gone)), now),
        Step::JobFailed { .. }
    ));
    assert!(tracker.done());
}

#[test]
fn trouble_of_the_token_or_server_ends_the_stream_and_heartbeats_follow_quiet() {
    let now = Instant::now();
    let beat = Duration::from_secs(5);
    let mut tracker = Tracker::new(vec!["a".into(), "b".into()], beat, now);
    assert_eq!(tracker.quiet_until(), now + beat);
    let later = now + Duration::from_secs(2);
    tracker.on(
        0,
        Some(&Snapshot::Status(status("a", JobState::Pending))),
        later,
    );
    assert_eq!(tracker.quiet_until(), later + beat, "a message resets it");
    let outage = HubError::Outage {
        budget: Duration::from_secs(60),
        last: UpstreamError::Timeout(Duration::from_secs(30)),
    };
    assert_eq!(
        tracker.on(1, Some(&Snapshot::Ended(outage.clone())), later),
        Step::End(outage)
    );
    assert_eq!(tracker.on(1, None, later), Step::Interrupted);
    assert_eq!(
        tracker.on(1, Some(&Snapshot::Ended(HubError::Stopped)), later),
        Step::End(HubError::Stopped)
    );
}
