//! Waiting end to end over loopback sockets: CheckImage with `wait` and
//! `etag` answers OK on a change and OK at the end of its wait (also when
//! the caller's deadline is shorter), and `POST /check-image` with
//! `Prefer: wait` and `If-None-Match` answers on a change with `ETag` and
//! `Preference-Applied`.

mod common;

use std::time::Duration;

use common::{http::with_http, *};
use piclumen_grpc::{
    pb::{self, image_service_client::ImageServiceClient},
    sim::SimConfig,
};
use tonic::{Code, transport::Channel};

fn waiting(mark_id: &str, wait: Duration, etag: &str) -> pb::CheckImageRequest {
    pb::CheckImageRequest {
        mark_id: mark_id.into(),
        wait: Some(wait.try_into().expect("duration")),
        etag: etag.into(),
    }
}

async fn check(
    client: &mut ImageServiceClient<Channel>,
    request: tonic::Request<pb::CheckImageRequest>,
) -> Result<pb::ImageJob, tonic::Status> {
    bounded("CheckImage", client.check_image(request))
        .await
        .map(|r| r.into_inner().job.expect("job"))
}

/// The job's state now, from a CheckImage without waiting.
async fn now(client: &mut ImageServiceClient<Channel>, mark_id: &str) -> pb::ImageJob {
    let plain = check_request(mark_id);
    check(client, authed(TOKEN, plain)).await.expect("check")
}

#[tokio::test]
async fn a_waiting_check_answers_ok_when_the_job_changes() {
    let h = Harness::with(
        SimConfig {
            job_duration: Duration::from_secs(3),
            ..sim_config()
        },
        server_config(),
    )
    .await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a lighthouse").await;
    let mut last = now(&mut client, &mark_id).await;
    assert_eq!(last.etag.len(), 16, "{last:?}");
    let mut states = vec![last.state()];
    // A long-polling loop, as a caller writes it: each answer's etag is
    // the next call's, until a terminal state.
    while !matches!(last.state(), pb::JobState::Succeeded | pb::JobState::Failed) {
        let request = waiting(&mark_id, Duration::from_secs(30), &last.etag);
        let job = check(&mut client, authed(TOKEN, request))
            .await
            .expect("OK, never DEADLINE_EXCEEDED");
        assert_ne!(job.etag, last.etag, "answered on a change: {job:?}");
        states.push(job.state());
        last = job;
    }
    assert_eq!(states.last(), Some(&pb::JobState::Succeeded), "{states:?}");
    assert!(states.contains(&pb::JobState::Running), "{states:?}");
    assert!(!last.images.is_empty());
}

#[tokio::test]
async fn the_end_of_the_wait_is_an_ok_answer_within_the_callers_deadline() {
    let h = Harness::with(long_jobs(), server_config()).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a quiet job").await;
    let first = now(&mut client, &mark_id).await;

    // The wait runs out: the current state, the same etag.
    let request = waiting(&mark_id, Duration::from_secs(1), &first.etag);
    let job = check(&mut client, authed(TOKEN, request))
        .await
        .expect("OK at the end of the wait");
    assert_eq!((job.state(), &job.etag), (first.state(), &first.etag));
    assert!(job.observed_at.is_some());

    // A caller's deadline shorter than the wait: answered OK within it.
    let mut request = authed(
        TOKEN,
        waiting(&mark_id, Duration::from_secs(30), &first.etag),
    );
    request.set_timeout(Duration::from_secs(2));
    let job = check(&mut client, request)
        .await
        .expect("OK before the caller's deadline");
    assert_eq!(job.etag, first.etag);

    // A negative wait is refused.
    let negative = pb::CheckImageRequest {
        wait: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..waiting(&mark_id, Duration::ZERO, &first.etag)
    };
    let refused = check(&mut client, authed(TOKEN, negative))
        .await
        .expect_err("invalid");
    assert_eq!(refused.code(), Code::InvalidArgument);
    // Another token's job is NOT_FOUND, waiting or not.
    let request = waiting(&mark_id, Duration::from_secs(5), &first.etag);
    let other = check(&mut client, authed(OTHER_TOKEN, request))
        .await
        .expect_err("not this token's");
    assert_eq!(other.code(), Code::NotFound);
}

#[tokio::test]
async fn http_prefer_wait_with_if_none_match_answers_on_a_change() {
    let h = with_http(
        SimConfig {
            job_duration: Duration::from_secs(3),
            ..sim_config()
        },
        server_config(),
    )
    .await;
    assert!(h.sim.url().starts_with("http://"));
    let mut client = ImageServiceClient::new(channel_to(h.grpc).await);
    let mark_id = start_job(&mut client, TOKEN, "a harbour").await;
    let web = reqwest::Client::new();
    let url = format!(
        "http://{}/check-image?authorization_token={TOKEN}&mark_id={mark_id}",
        h.http
    );
    let post = |headers: &[(&str, &str)]| {
        let mut request = web.post(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move {
            bounded("POST /check-image", request.send())
                .await
                .expect("post")
        }
    };
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_owned())
    };

    let first = post(&[]).await;
    assert_eq!(first.status(), 202);
    let etag = header(&first, "etag").expect("an ETag");
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(header(&first, "preference-applied"), None);

    let mut etag = etag;
    let mut statuses = Vec::new();
    loop {
        let answer = post(&[("prefer", "wait=20"), ("if-none-match", &etag)]).await;
        let status = answer.status().as_u16();
        assert_eq!(
            header(&answer, "preference-applied").as_deref(),
            Some("wait=20")
        );
        let next = header(&answer, "etag").expect("an ETag");
        assert_ne!(next, etag, "answered on a change");
        let bytes = answer.bytes().await.expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        statuses.push((status, body));
        etag = next;
        if status != 202 {
            break;
        }
    }
    let (status, body) = statuses.last().expect("answers");
    assert_eq!(*status, 200, "{statuses:?}");
    assert_eq!(body["message"], "Image generation successful");

    // A terminal job answers at once with its ETag, the same again.
    let again = post(&[("prefer", "wait=20"), ("if-none-match", &etag)]).await;
    assert_eq!(again.status(), 200);
    assert_eq!(header(&again, "etag"), Some(etag));
}

#[tokio::test]
async fn a_wait_ends_with_an_answer_before_its_connection_ages_out() {
    let mut config = server_config();
    config.max_connection_age = Duration::from_secs(1);
    config.max_connection_age_grace = Duration::from_secs(3);
    let h = Harness::with(long_jobs(), config).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a slow tide").await;
    let last = now(&mut client, &mark_id).await;
    // Asked for 30 s on a connection cut 3 s after its GOAWAY (about 1 s
    // from now): the wait ends a second before the cut, with the same
    // state, OK, rather than being cut (UNAVAILABLE).
    let request = waiting(&mark_id, Duration::from_secs(30), &last.etag);
    let job = check(&mut client, authed(TOKEN, request))
        .await
        .expect("OK at the end of the shortened wait");
    assert_eq!(job.etag, last.etag, "{job:?}");
    assert_eq!(job.state(), pb::JobState::Pending);
}

#[tokio::test]
async fn a_wait_whose_state_grew_old_answers_it_when_piclumen_stops_replying() {
    let mut config = server_config();
    config.hub.poll_interval = Duration::from_millis(250);
    config.hub.stale_if_error = Duration::from_secs(1);
    let h = Harness::with(long_jobs(), config).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "a still pond").await;
    let last = now(&mut client, &mark_id).await;
    // From now on status calls get no reply for 30 s: the channel's state
    // ages past the 1 s window during a 2 s wait, and asking again at its
    // end gets no reply before the caller's deadline.
    h.sim
        .script(
            serde_json::json!([{"endpoint": "status", "duration_ms": 30000, "delay_ms": 30000}]),
        )
        .await;
    let mut request = authed(TOKEN, waiting(&mark_id, Duration::from_secs(2), &last.etag));
    request.set_timeout(Duration::from_secs(5));
    let job = check(&mut client, request)
        .await
        .expect("the end of a wait is an answer, never DEADLINE_EXCEEDED");
    assert_eq!(job.etag, last.etag, "the state the channel had: {job:?}");
    assert!(job.observed_at.is_some(), "with its age");
}
