//! Round plans on plain values: what each kind of call end publishes,
//! closes, unwatches, remembers, shares and answers checks with.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use super::*;
use crate::{
    hub::tests::fake::status,
    job::{JobState, JobStatus},
};

/// When the rounds' replies arrived.
fn seen() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
}

fn ids(names: &[&str]) -> Vec<Id> {
    names.iter().map(|n| Id::from(*n)).collect()
}

/// Job facts by id; unlisted ids have no channel and are not remote.
fn facts(known: &[(&str, Job)]) -> impl Fn(&Id) -> Job {
    let map: HashMap<String, Job> = known.iter().map(|(id, j)| ((*id).into(), *j)).collect();
    move |id| map.get(&**id).copied().unwrap_or_default()
}

fn watched(receivers: usize) -> Job {
    Job {
        watchers: Some(receivers),
        remote: false,
    }
}

fn fate(plan: &Plan, id: &str) -> Fate {
    plan.jobs
        .iter()
        .find(|j| &*j.id == id)
        .map(|j| j.fate)
        .expect("the id is in the plan")
}

fn outcome<'a>(plan: &'a Plan, id: &str) -> &'a Outcome {
    plan.jobs
        .iter()
        .find(|j| &*j.id == id)
        .map(|j| &j.outcome)
        .expect("the id is in the plan")
}

const KEEP: Fate = Fate {
    publish: true,
    close: false,
    unwatch: false,
    leave_remote: false,
};
const END: Fate = Fate {
    publish: true,
    close: true,
    unwatch: true,
    leave_remote: false,
};

#[test]
fn an_answer_publishes_each_job_and_ends_only_the_finished_ones() {
    let sent = Instant::now();
    let call = ids(&["run", "done", "gone", "lonely", "bad"]);
    let round = Round {
        ids: &call,
        sent_at: sent,
        sharing: false,
        observed_at: seen(),
    };
    let answer = vec![
        Ok(status("run", JobState::Running)),
        Ok(status("done", JobState::Succeeded)),
        Ok(status("lonely", JobState::Running)),
        Err(BadEntry {
            mark_id: "bad".into(),
            error: UpstreamError::Decode {
                error: "nope".into(),
                body: "{}".into(),
            },
        }),
    ];
    let plan = round.plan(
        Ended::Answered(answer),
        facts(&[
            ("run", watched(2)),
            ("done", watched(1)),
            ("gone", watched(1)),
            ("lonely", watched(0)),
            ("bad", watched(1)),
        ]),
    );
    assert_eq!(plan.reply, Reply::Answered);
    assert_eq!(plan.checks_error, None);
    assert_eq!(plan.trouble, None);
    assert_eq!(fate(&plan, "run"), KEEP, "still running, still watched");
    assert_eq!(fate(&plan, "done"), END, "terminal");
    assert_eq!(fate(&plan, "lonely"), END, "no receiver left");
    assert_eq!(fate(&plan, "gone"), END, "absent: not found");
    assert_eq!(fate(&plan, "bad"), END, "unreadable");
    assert_eq!(
        outcome(&plan, "gone"),
        &Err(HubError::NotFound {
            mark_id: "gone".into()
        })
    );
    assert!(matches!(
        outcome(&plan, "bad"),
        Err(HubError::Upstream(UpstreamError::Decode { .. }))
    ));
    assert_eq!(plan.unreadable.len(), 1);
    // Only states are remembered, fresh from when the call was sent.
    let remembered: Vec<&str> = plan.known.iter().map(|(id, _)| &**id).collect();
    assert_eq!(remembered, ["run", "done", "lonely"]);
    assert_eq!(plan.fresh_from, sent);
    // Every state is stamped with when the reply arrived, remembered or
    // published alike.
    assert!(
        plan.known
            .iter()
            .all(|(_, s)| s.observed_at == Some(seen()))
    );
    let stamped = |id| matches!(outcome(&plan, id), Ok(s) if s.observed_at == Some(seen()));
    assert!(stamped("run") && stamped("done") && stamped("lonely"));
    assert!(plan.share.is_empty(), "not sharing");
    let order: Vec<&str> = plan.jobs.iter().map(|j| &*j.id).collect();
    assert_eq!(order, ["run", "done", "gone", "lonely", "bad"]);
}

#[test]
fn jobs_without_a_channel_are_unwatched_unless_another_replica_wants_them() {
    let call = ids(&["mine", "theirs", "theirs-done"]);
    let round = Round {
        ids: &call,
        sent_at: Instant::now(),
        sharing: true,
        observed_at: seen(),
    };
    let remote = Job {
        watchers: None,
        remote: true,
    };
    let plan = round.plan(
        Ended::Answered(vec![
            Ok(status("mine", JobState::Running)),
            Ok(status("theirs", JobState::Running)),
            Ok(status("theirs-done", JobState::Failed)),
        ]),
        facts(&[("theirs", remote), ("theirs-done", remote)]),
    );
    let unwatched_only = Fate {
        publish: false,
        close: false,
        unwatch: true,
        leave_remote: false,
    };
    assert_eq!(fate(&plan, "mine"), unwatched_only);
    assert_eq!(
        fate(&plan, "theirs"),
        Fate {
            unwatch: false,
            ..unwatched_only
        },
        "still polled for the other replica"
    );
    assert_eq!(
        fate(&plan, "theirs-done"),
        Fate {
            leave_remote: true,
            ..unwatched_only
        }
    );
    // Sharing: every answer goes to the other replicas, finished or not.
    let shared: Vec<(&str, bool)> = plan
        .share
        .iter()
        .map(|e| (e.id.as_str(), e.is_final()))
        .collect();
    assert_eq!(
        shared,
        [("mine", false), ("theirs", false), ("theirs-done", true)]
    );
}

#[test]
fn a_watched_remote_job_loses_its_channel_but_stays_polled_when_unwatched_here() {
    let call = ids(&["both"]);
    let round = Round {
        ids: &call,
        sent_at: Instant::now(),
        sharing: true,
        observed_at: seen(),
    };
    let plan = round.plan(
        Ended::Answered(vec![Ok(status("both", JobState::Running))]),
        facts(&[(
            "both",
            Job {
                watchers: Some(0),
                remote: true,
            },
        )]),
    );
    assert_eq!(
        fate(&plan, "both"),
        Fate {
            publish: true,
            close: true,
            unwatch: false,
            leave_remote: false,
        }
    );
}

#[test]
fn transient_trouble_answers_checks_with_it_and_leaves_watches_to_the_pause() {
    let call = ids(&["a", "b"]);
    let round = Round {
        ids: &call,
        sent_at: Instant::now(),
        sharing: true,
        observed_at: seen(),
    };
    let limited = UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(5)),
    };
    let plan = round.plan(Ended::Failed(limited.clone()), facts(&[("a", watched(1))]));
    assert!(plan.jobs.is_empty(), "nothing published: watches wait");
    assert!(plan.known.is_empty() && plan.share.is_empty());
    assert_eq!(plan.checks_error, Some(HubError::Upstream(limited.clone())));
    assert_eq!(
        plan.reply,
        Reply::Transient {
            retry_after: Some(Duration::from_secs(5))
        }
    );
    assert_eq!(plan.refused, None);
    // A 503 carries no Retry-After.
    let busy = UpstreamError::Http {
        status: 503,
        body: String::new(),
    };
    let plan_503 = round.plan(Ended::Failed(busy), facts(&[]));
    assert_eq!(plan_503.reply, Reply::Transient { retry_after: None });
}

#[test]
fn the_verdict_on_trouble_becomes_a_pause_or_an_outage() {
    let now = Instant::now();
    let call = ids(&["a"]);
    let round = Round {
        ids: &call,
        sent_at: now,
        sharing: false,
        observed_at: seen(),
    };
    let error = UpstreamError::Timeout(Duration::from_secs(1));
    let plan = round.plan(Ended::Failed(error.clone()), facts(&[]));
    let until = now + Duration::from_millis(250);
    assert_eq!(
        plan.then(Verdict::Paused(until), now),
        Then::Pause {
            until,
            left: Duration::from_millis(250),
            error: error.clone(),
        }
    );
    assert_eq!(plan.then(Verdict::Outage, now), Then::Outage(error.clone()));
    assert_eq!(plan.then(Verdict::Continue, now), Then::Continue);
    // An answered call asks for nothing more, whatever the verdict.
    let answered = round.plan(Ended::Answered(Vec::new()), facts(&[]));
    assert_eq!(answered.then(Verdict::Outage, now), Then::Continue);
}

#[test]
fn a_refusal_ends_every_job_of_the_call_and_tells_every_replica() {
    let call = ids(&["a", "b"]);
    let round = Round {
        ids: &call,
        sent_at: Instant::now(),
        sharing: false,
        observed_at: seen(),
    };
    let refused = UpstreamError::Http {
        status: 401,
        body: "bad token".into(),
    };
    let plan = round.plan(Ended::Failed(refused.clone()), facts(&[("a", watched(3))]));
    assert_eq!(plan.reply, Reply::Refused);
    assert_eq!(plan.refused, Some(refused.clone()));
    assert_eq!(plan.checks_error, None, "each check gets its job's end");
    for id in ["a", "b"] {
        assert_eq!(
            outcome(&plan, id),
            &Err(HubError::Upstream(refused.clone()))
        );
    }
    assert_eq!(fate(&plan, "a"), END);
    assert_eq!(plan.share.len(), 2, "shared even when answers are not");
    assert!(plan.share.iter().all(Entry::is_final));
    assert!(plan.known.is_empty());
}

#[test]
fn a_panicked_call_ends_its_jobs_with_an_internal_error() {
    let call = ids(&["a"]);
    let round = Round {
        ids: &call,
        sent_at: Instant::now(),
        sharing: false,
        observed_at: seen(),
    };
    let plan = round.plan(Ended::Panicked, facts(&[("a", watched(1))]));
    assert_eq!(outcome(&plan, "a"), &Err(HubError::Internal));
    assert_eq!(fate(&plan, "a"), END);
    assert_eq!(plan.refused, None);
    assert_eq!(plan.reply, Reply::Refused);
}

#[test]
fn another_replicas_answers_reach_only_jobs_watched_here() {
    let running: JobStatus = status("here", JobState::Running);
    let entries = [
        Entry::of("here", &Ok(running.clone())),
        Entry::of("elsewhere", &Ok(status("elsewhere", JobState::Running))),
        Entry::of(
            "missing",
            &Err(HubError::NotFound {
                mark_id: "missing".into(),
            }),
        ),
    ];
    let (jobs, known) = from_replica(&entries, facts(&[("here", watched(1))]));
    assert_eq!(
        jobs,
        vec![JobPlan {
            id: "here".into(),
            outcome: Ok(running),
            fate: KEEP,
        }]
    );
    let remembered: Vec<&str> = known.iter().map(|(id, _)| &**id).collect();
    assert_eq!(remembered, ["here", "elsewhere"]);
}

#[test]
fn a_check_during_a_pause_gets_its_cause_with_the_time_left() {
    let left = Duration::from_millis(1500);
    assert_eq!(
        paused_answer(None, left),
        HubError::Upstream(UpstreamError::RateLimited { retry_after: None })
    );
    assert_eq!(
        paused_answer(
            Some(UpstreamError::RateLimited {
                retry_after: Some(Duration::from_secs(9))
            }),
            left
        ),
        HubError::Upstream(UpstreamError::RateLimited {
            retry_after: Some(left)
        })
    );
    let busy = UpstreamError::Http {
        status: 503,
        body: String::new(),
    };
    assert_eq!(
        paused_answer(Some(busy.clone()), left),
        HubError::Upstream(busy)
    );
}

#[test]
fn only_transient_trouble_other_than_a_429_is_retried_within_the_round() {
    let interval = Duration::from_secs(2);
    let at_once = Duration::ZERO;
    let retried = [
        UpstreamError::Http {
            status: 503,
            body: String::new(),
        },
        UpstreamError::Http {
            status: 500,
            body: String::new(),
        },
        UpstreamError::Connect {
            detail: "refused".into(),
        },
        UpstreamError::Interrupted {
            detail: "reset".into(),
        },
        UpstreamError::Timeout(Duration::from_secs(1)),
    ];
    for error in &retried {
        assert_eq!(
            retry_delay(error, at_once, interval, 0.0),
            Some(RETRY_MIN),
            "{error:?}"
        );
        assert_eq!(
            retry_delay(error, at_once, interval, 1.0),
            Some(RETRY_MAX),
            "{error:?}"
        );
        let mid = retry_delay(error, at_once, interval, 0.5).expect("retried");
        assert!(RETRY_MIN < mid && mid < RETRY_MAX, "{mid:?}");
    }
    let not_retried = [
        UpstreamError::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
        },
        UpstreamError::RateLimited { retry_after: None },
        UpstreamError::Unauthorized,
        UpstreamError::Forbidden,
        UpstreamError::Http {
            status: 404,
            body: String::new(),
        },
        UpstreamError::Rejected {
            code: 1,
            message: "no".into(),
        },
        UpstreamError::Decode {
            error: "x".into(),
            body: String::new(),
        },
    ];
    for error in &not_retried {
        assert_eq!(
            retry_delay(error, at_once, interval, 0.5),
            None,
            "{error:?}"
        );
    }
}

#[test]
fn a_retry_never_goes_out_past_the_round() {
    let interval = Duration::from_secs(2);
    let busy = UpstreamError::Http {
        status: 503,
        body: String::new(),
    };
    // The wait is cut to what is left of the round.
    let left = Duration::from_millis(150);
    assert_eq!(
        retry_delay(&busy, interval - left, interval, 1.0),
        Some(left)
    );
    assert_eq!(
        retry_delay(&busy, interval - left, interval, 0.0),
        Some(RETRY_MIN)
    );
    // Less than the shortest wait left: the round fails instead.
    let late = interval - RETRY_MIN + Duration::from_millis(1);
    assert_eq!(retry_delay(&busy, late, interval, 0.0), None);
    assert_eq!(retry_delay(&busy, interval * 2, interval, 0.0), None);
    // A short interval still leaves room for one retry.
    let short = Duration::from_millis(200);
    let cut = retry_delay(&busy, Duration::from_millis(5), short, 1.0);
    assert_eq!(cut, Some(Duration::from_millis(195)));
}
