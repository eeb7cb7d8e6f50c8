//! The schedule alone, on paused time: pauses, backoff and queued checks.

use std::time::Duration;

use tokio::time::Instant;

use super::fake::{GATHER, INTERVAL};
use crate::hub::schedule::{Call, Next, Reply, Schedule, ScheduleConfig, Verdict};

fn schedule() -> Schedule {
    Schedule::new(ScheduleConfig {
        interval: INTERVAL,
        batch_max: 50,
        gather: GATHER,
        failure_budget: Duration::from_secs(20),
        max_calls: 64,
        max_check_calls: 4,
        jitter: false,
    })
}

fn send(schedule: &mut Schedule, now: Instant) -> Call {
    match schedule.next(now) {
        Next::Send(call) => call,
        other => panic!("expected a call at {now:?}, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_success_does_not_cancel_a_fresh_pause() {
    let mut s = schedule();
    let t0 = Instant::now();
    s.check("a".into());
    let early = send(&mut s, t0);
    s.check("b".into());
    let failing = send(&mut s, t0 + Duration::from_millis(10));
    let t1 = t0 + Duration::from_millis(20);
    let verdict = s.on_reply(
        &failing,
        &Reply::Transient {
            retry_after: Some(Duration::from_secs(3)),
        },
        t1,
    );
    assert_eq!(verdict, Verdict::Paused(t1 + Duration::from_secs(3)));
    // The call sent before the pause answers late: still paused.
    s.on_reply(&early, &Reply::Answered, t0 + Duration::from_millis(500));
    assert_eq!(
        s.paused_until(t0 + Duration::from_secs(1)),
        Some(t1 + Duration::from_secs(3))
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_failures_advance_the_backoff_once() {
    let mut s = schedule();
    let t0 = Instant::now();
    let calls: Vec<Call> = (0..4)
        .map(|i| {
            s.check(format!("c{i}").into());
            send(&mut s, t0)
        })
        .collect();
    let transient = Reply::Transient { retry_after: None };
    let t1 = t0 + Duration::from_millis(10);
    let first = s.on_reply(&calls[0], &transient, t1);
    assert_eq!(first, Verdict::Paused(t1 + Duration::from_millis(250)));
    for call in &calls[1..] {
        let v = s.on_reply(call, &transient, t1 + Duration::from_millis(5));
        assert_eq!(v, Verdict::Paused(t1 + Duration::from_millis(250)));
    }
    // The next failure, of a call sent after the pause, doubles it.
    let resume = t1 + Duration::from_millis(250);
    s.check("d".into());
    let after = send(&mut s, resume);
    let v = s.on_reply(&after, &transient, resume + Duration::from_millis(10));
    assert_eq!(
        v,
        Verdict::Paused(resume + Duration::from_millis(10) + Duration::from_millis(500))
    );
}

#[tokio::test(start_paused = true)]
async fn checks_wait_while_four_check_calls_are_in_flight_then_go_together() {
    let mut s = schedule();
    let t0 = Instant::now();
    let mut in_flight = Vec::new();
    for i in 0..4 {
        s.check(format!("c{i}").into());
        in_flight.push(send(&mut s, t0));
    }
    for i in 0..80 {
        s.check(format!("q{}", i % 60).into());
    }
    assert_eq!(s.next(t0), Next::Idle, "waits for a reply");
    s.on_reply(
        &in_flight[0],
        &Reply::Answered,
        t0 + Duration::from_millis(20),
    );
    let batch = send(&mut s, t0 + Duration::from_millis(20));
    assert_eq!(batch.ids.len(), 50, "at most batch_max, duplicates once");
    assert_eq!(s.next(t0 + Duration::from_millis(20)), Next::Idle);
    s.on_reply(
        &in_flight[1],
        &Reply::Answered,
        t0 + Duration::from_millis(21),
    );
    let rest = send(&mut s, t0 + Duration::from_millis(21));
    assert_eq!(rest.ids.len(), 10);
}
