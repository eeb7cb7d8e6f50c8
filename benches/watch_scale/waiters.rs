//! The waiters of `watch_scale`, one function per `--mode`: each starts one
//! task per waiter (a watch, a long-polling caller, a WatchImages stream)
//! that reports what it saw, and sends how long its first state took.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use piclumen_grpc::pb::{self, JobState, image_service_client::ImageServiceClient};
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};
use tonic::{Code, transport::Channel};

use super::{
    Args,
    common::{authed, change_share, unix_ms},
};

/// The `wait` of each long-polling CheckImage in `--mode wait`.
pub(crate) const CHECK_WAIT: Duration = Duration::from_secs(30);
/// The deadline of each long-polling CheckImage: above its wait, so a call
/// reaching the end of its wait must answer, not run out.
const CHECK_DEADLINE: Duration = Duration::from_secs(40);

/// What one waiter (a watch, a caller, a stream) saw: each first delivery
/// of a state change (mark id, share of the job's duration, unix ms), the
/// error codes its calls ended with, the ids whose terminal state it got,
/// and whether its stream ended OK (streams only).
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) seen: Vec<(String, f64, f64)>,
    pub(crate) errors: Vec<Code>,
    pub(crate) terminals: Vec<String>,
    pub(crate) ended_ok: Option<bool>,
}

/// Starts `job_count` jobs (256 creates at a time, as a fleet of services
/// would) and returns each one's (token, mark id).
pub(crate) async fn create_jobs(
    args: &Args,
    clients: &[ImageServiceClient<Channel>],
) -> Vec<(String, String)> {
    let creating = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..args.job_count() {
        let mut client = clients[i % clients.len()].clone();
        let creating = creating.clone();
        let token = args.token(i);
        tasks.push(tokio::spawn(async move {
            let _permit = creating.acquire_owned().await.expect("semaphore");
            let request = pb::GenerateImageRequest {
                prompt: format!("bench {i}"),
                ..Default::default()
            };
            let created = client
                .generate_image(authed(&token, request))
                .await
                .expect("generate")
                .into_inner();
            (token, created.mark_id)
        }));
    }
    let mut jobs = Vec::with_capacity(tasks.len());
    for task in tasks {
        jobs.push(task.await.expect("create task"));
    }
    jobs
}

/// `--mode watch`: starts every job and its watch; each task reports when
/// its job reached RUNNING and SUCCEEDED.
pub(crate) fn start_watches(
    args: &Args,
    clients: &[ImageServiceClient<Channel>],
    first_tx: UnboundedSender<f64>,
) -> Vec<JoinHandle<Report>> {
    // Callers start jobs a few hundred at a time, as a fleet of services
    // would; the watches then all stay open together.
    let creating = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..args.watches {
        let mut client = clients[i % clients.len()].clone();
        let first_tx = first_tx.clone();
        let creating = creating.clone();
        let token = args.token(i);
        tasks.push(tokio::spawn(async move {
            let permit = creating.acquire_owned().await.expect("semaphore");
            let created = client
                .generate_image(authed(
                    &token,
                    pb::GenerateImageRequest {
                        prompt: format!("bench {i}"),
                        ..Default::default()
                    },
                ))
                .await
                .expect("generate")
                .into_inner();
            drop(permit);
            let opened = Instant::now();
            let mut stream = client
                .watch_image(authed(
                    &token,
                    pb::WatchImageRequest {
                        mark_id: created.mark_id.clone(),
                    },
                ))
                .await
                .expect("watch")
                .into_inner();
            let mut first = true;
            let mut previous: Option<JobState> = None;
            let mut report = Report::default();
            while let Some(update) = stream.message().await.expect("stream") {
                if first {
                    let _ = first_tx.send(opened.elapsed().as_secs_f64());
                    first = false;
                }
                // Heartbeats repeat a state already delivered: only the
                // first delivery of a state measures change-to-delivery.
                if update.heartbeat {
                    continue;
                }
                let state = update.job.expect("job").state();
                let last_state = previous.replace(state);
                if let Some(change) = change_share(state).filter(|_| last_state != Some(state)) {
                    report
                        .seen
                        .push((created.mark_id.clone(), change, unix_ms()));
                }
            }
            report
        }));
    }
    tasks
}

/// `--mode wait`: caller i long-polls job i % jobs with CheckImage (`wait`
/// [`CHECK_WAIT`], the last etag; the first call, with no etag, answers at
/// once) until the job ends.
pub(crate) fn start_waiting_callers(
    args: &Args,
    clients: &[ImageServiceClient<Channel>],
    jobs: &[(String, String)],
    first_tx: UnboundedSender<f64>,
) -> Vec<JoinHandle<Report>> {
    let wait = prost_types::Duration {
        seconds: CHECK_WAIT.as_secs() as i64,
        nanos: 0,
    };
    (0..args.watches)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let (token, mark_id) = jobs[i % jobs.len()].clone();
            let first_tx = first_tx.clone();
            tokio::spawn(async move {
                let mut report = Report::default();
                let mut etag = String::new();
                let mut previous: Option<JobState> = None;
                let opened = Instant::now();
                loop {
                    let mut request = authed(
                        &token,
                        pb::CheckImageRequest {
                            mark_id: mark_id.clone(),
                            wait: Some(wait),
                            etag: etag.clone(),
                        },
                    );
                    request.set_timeout(CHECK_DEADLINE);
                    let job = match client.check_image(request).await {
                        Ok(answer) => answer.into_inner().job.expect("job"),
                        Err(status) => {
                            report.errors.push(status.code());
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if previous.is_none() {
                        let _ = first_tx.send(opened.elapsed().as_secs_f64());
                    }
                    let state = job.state();
                    let last_state = previous.replace(state);
                    if let Some(change) = change_share(state).filter(|_| last_state != Some(state))
                    {
                        report.seen.push((mark_id.clone(), change, unix_ms()));
                    }
                    etag = job.etag;
                    if matches!(state, JobState::Succeeded | JobState::Failed) {
                        report.terminals.push(mark_id);
                        return report;
                    }
                }
            })
        })
        .collect()
}

/// `--mode many`: one WatchImages stream per `--ids-per-stream` jobs, each
/// reporting every job's first delivery of each state.
pub(crate) fn start_streams(
    args: &Args,
    clients: &[ImageServiceClient<Channel>],
    jobs: &[(String, String)],
    first_tx: UnboundedSender<f64>,
) -> Vec<JoinHandle<Report>> {
    // A stream's jobs share a token: the jobs of token t are t, t + tokens...
    let mut by_token: HashMap<String, Vec<String>> = HashMap::new();
    for (token, mark_id) in jobs {
        by_token
            .entry(token.clone())
            .or_default()
            .push(mark_id.clone());
    }
    let mut tasks = Vec::new();
    for (token, ids) in by_token {
        for chunk in ids.chunks(args.ids_per_stream.max(1)) {
            let mut client = clients[tasks.len() % clients.len()].clone();
            let first_tx = first_tx.clone();
            let token = token.clone();
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                let opened = Instant::now();
                let mut report = Report::default();
                let request = authed(&token, pb::WatchImagesRequest { mark_ids: chunk });
                let mut stream = match client.watch_images(request).await {
                    Ok(stream) => stream.into_inner(),
                    Err(status) => {
                        report.errors.push(status.code());
                        report.ended_ok = Some(false);
                        return report;
                    }
                };
                let mut previous: HashMap<String, JobState> = HashMap::new();
                loop {
                    let update = match stream.message().await {
                        Ok(Some(update)) => update,
                        Ok(None) => {
                            report.ended_ok = Some(true);
                            return report;
                        }
                        Err(status) => {
                            report.errors.push(status.code());
                            report.ended_ok = Some(false);
                            return report;
                        }
                    };
                    if update.heartbeat {
                        continue;
                    }
                    let Some(job) = update.job else { continue };
                    if let Some(error) = update.error {
                        report.errors.push(Code::from(error.code));
                        continue;
                    }
                    let state = job.state();
                    let last_state = previous.insert(job.mark_id.clone(), state);
                    if last_state.is_none() {
                        let _ = first_tx.send(opened.elapsed().as_secs_f64());
                    }
                    if let Some(change) = change_share(state).filter(|_| last_state != Some(state))
                    {
                        report.seen.push((job.mark_id.clone(), change, unix_ms()));
                    }
                    if matches!(state, JobState::Succeeded | JobState::Failed) {
                        report.terminals.push(job.mark_id);
                    }
                }
            }));
        }
    }
    tasks
}
