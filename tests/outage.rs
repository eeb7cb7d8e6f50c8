//! A total outage of Piclumen's status calls, shorter than
//! `--stale-if-error`, end to end over sockets: every check of a job whose
//! state was observed before it keeps answering, every watch ends SUCCEEDED
//! exactly once, and no create is sent twice.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{pb, sim::SimConfig};
use serde_json::json;
use tokio::time::{Instant, sleep};

#[tokio::test]
async fn an_outage_shorter_than_stale_if_error_fails_no_check_of_an_observed_job() {
    let sim = SimConfig {
        job_duration: Duration::from_secs(4),
        ..sim_config()
    };
    let h = Harness::with(sim, server_config()).await;
    let mut client = h.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(start_job(&mut client, TOKEN, &format!("job {i}")).await);
    }
    let watches: Vec<_> = ids
        .iter()
        .map(|id| {
            let (mut client, id) = (client.clone(), id.clone());
            tokio::spawn(async move { collect_watch(&mut client, TOKEN, &id).await })
        })
        .collect();
    let check = |id: &String| {
        authed(
            TOKEN,
            pb::CheckImageRequest {
                mark_id: id.clone(),
                ..Default::default()
            },
        )
    };
    for id in &ids {
        client
            .check_image(check(id))
            .await
            .expect("observed before");
    }
    h.sim
        .script(json!([{"endpoint": "status", "http_status": 503, "body": "down", "duration_ms": 2000}]))
        .await;
    // Through the outage (2 s, inside the 30 s window) and a little after.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut answered = 0;
    while Instant::now() < until {
        for id in &ids {
            let job = client
                .check_image(check(id))
                .await
                .unwrap_or_else(|s| panic!("a check of {id} failed in the outage: {s:?}"))
                .into_inner()
                .job
                .expect("job");
            assert!(job.observed_at.is_some(), "{job:?}");
            answered += 1;
        }
        sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 25, "{answered} checks");
    assert!(
        h.sim.stat("status_failed").await > 0,
        "the outage never met a status call"
    );
    for watch in watches {
        let (messages, end) = watch.await.expect("joined");
        end.expect("the watch ends OK");
        let succeeded = states(&messages)
            .iter()
            .filter(|s| **s == pb::JobState::Succeeded)
            .count();
        assert_eq!(succeeded, 1, "{:?}", states(&messages));
    }
    assert_eq!(h.sim.stat("create_calls").await, 5, "no create sent twice");
}
