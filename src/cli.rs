//! The human client: `generate` (optionally `--wait`), `watch` (one job or
//! several, [`many`]) and `check` (optionally `--wait`, [`check`]).
//!
//! Results go to stdout: for people, the mark id then the image URLs (or the
//! saved files with `--out`); for scripts, with `--json`, one JSON object and
//! nothing else. Progress and errors go to stderr: a live line on a
//! terminal, one line per change otherwise. The exit code says how it ended
//! (see [`CliError::exit_code`]; the codes are listed in `--help`).
//! `watch` and `generate --wait` ride through a server's drain or a lost
//! connection ([`follow`]) within `--timeout`.

mod check;
mod download;
mod follow;
mod many;

use std::{error::Error as _, path::PathBuf, time::Duration};

use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

use crate::{
    config::{ClientArgs, GenerateArgs, WatchArgs},
    pb::{self, JobState, image_service_client::ImageServiceClient},
};

pub use check::check;
pub use download::DownloadError;

/// Exit code: the job failed.
pub const EXIT_JOB_FAILED: u8 = 1;
/// Exit code: a bad flag or argument (clap uses the same for its errors).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a call to the server or an image download failed.
pub const EXIT_CALL_FAILED: u8 = 3;

/// Bound on connecting to the server, so an address that swallows packets
/// fails instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server could not be reached.
    #[error("cannot connect to {server}: {source}")]
    Connect {
        /// The URL tried.
        server: String,
        /// What failed.
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The token cannot be sent as metadata.
    #[error("the token contains characters that cannot be sent")]
    BadToken,
    /// The job ended without images.
    #[error("job {mark_id} ended {state}")]
    JobFailed {
        /// The job.
        mark_id: String,
        /// Its final upstream status.
        state: String,
    },
    /// Some of several watched jobs failed, or were not found.
    #[error("{}", jobs_summary(.failed, .missing))]
    Jobs {
        /// The jobs that failed.
        failed: Vec<String>,
        /// The jobs the server did not know (or ended with another error).
        missing: Vec<String>,
    },
    /// The stream ended before a terminal state.
    #[error("the watch ended before the job finished")]
    Incomplete,
    /// Saving the job's images failed; nothing new was left in the directory.
    #[error(transparent)]
    Download(#[from] DownloadError),
}

impl CliError {
    /// The process exit code for this failure: 1 the job failed (of several
    /// jobs: one failed, all were found), 2 usage, 3 a call or download
    /// failed (or one of several jobs was not found).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::JobFailed { .. } => EXIT_JOB_FAILED,
            Self::Jobs { missing, .. } if missing.is_empty() => EXIT_JOB_FAILED,
            Self::Jobs { .. } => EXIT_CALL_FAILED,
            Self::BadToken => EXIT_USAGE,
            Self::Connect { .. } | Self::Status(_) | Self::Incomplete | Self::Download(_) => {
                EXIT_CALL_FAILED
            }
        }
    }

    /// The message and the causes it does not already say, for stderr.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        // A Status's own Display is a debug dump; its message is already
        // in ours, only its cause is new.
        let mut cause = match self {
            Self::Status(status) => status.source(),
            other => other.source(),
        };
        while let Some(c) = cause {
            let part = c.to_string();
            if !text.contains(&part) {
                text = format!("{text}: {part}");
            }
            cause = c.source();
        }
        text
    }
}

fn jobs_summary(failed: &[String], missing: &[String]) -> String {
    let mut parts = Vec::new();
    if !failed.is_empty() {
        parts.push(format!("failed: {}", failed.join(", ")));
    }
    if !missing.is_empty() {
        parts.push(format!("not found: {}", missing.join(", ")));
    }
    format!("not every job succeeded ({})", parts.join("; "))
}

struct Connection {
    client: ImageServiceClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Connection {
    async fn open(args: &ClientArgs) -> Result<Self, CliError> {
        let connect_error = |source| CliError::Connect {
            server: args.server.clone(),
            source,
        };
        let token = args
            .token
            .as_ref()
            .map(|t| t.expose())
            .filter(|t| !t.is_empty())
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CliError::BadToken)
            })
            .transpose()?;
        let channel = Endpoint::from_shared(args.server.clone())
            .map_err(connect_error)?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(connect_error)?;
        Ok(Self {
            client: ImageServiceClient::new(channel),
            token,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }
}

/// What to do with a job once it is known: print it as JSON or as lines,
/// and whether to save its images.
struct Output {
    json: bool,
    out: Option<PathBuf>,
    /// `check` starts its plain output with the job's state line.
    state_line: bool,
}

/// `generate`: prints the mark id; with `--wait`, follows the job and prints
/// the image URLs (or saves them with `--out`).
pub async fn generate(args: GenerateArgs) -> Result<(), CliError> {
    let deadline = Instant::now() + args.client.timeout;
    let mut conn = Connection::open(&args.client).await?;
    let mut request = conn.request(pb::GenerateImageRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        model_id: args.model_id,
        resolution: Some(pb::Resolution {
            width: args.width,
            height: args.height,
            batch_size: args.batch_size,
        }),
        seed: args.seed,
        request_id: args.request_id,
        ..Default::default()
    });
    request.set_timeout(args.client.timeout);
    let created = conn.client.generate_image(request).await?.into_inner();
    if !args.wait {
        if args.json {
            println!(
                "{}",
                json!({ "mark_id": created.mark_id, "seed": created.seed })
            );
        } else {
            println!("{}", created.mark_id);
            eprintln!("seed: {}", created.seed);
        }
        return Ok(());
    }
    if args.json {
        eprintln!("mark id: {}", created.mark_id);
    } else {
        println!("{}", created.mark_id);
    }
    eprintln!("seed: {}", created.seed);
    let job = follow::follow(&mut conn, &args.client, &created.mark_id, deadline).await?;
    let output = Output {
        json: args.json,
        out: args.out,
        state_line: false,
    };
    finish(job, Some(created.seed), &output).await
}

/// `watch`: follows a job to its end and prints the image URLs (or saves
/// them with `--out`); several jobs share one WatchImages stream
/// ([`many`]).
pub async fn watch(mut args: WatchArgs) -> Result<(), CliError> {
    let mut seen = std::collections::HashSet::new();
    args.mark_ids.retain(|id| seen.insert(id.clone()));
    if args.mark_ids.len() > 1 {
        return many::watch_many(args).await;
    }
    let mark_id = args.mark_ids.pop().unwrap_or_default();
    let deadline = Instant::now() + args.client.timeout;
    let mut conn = Connection::open(&args.client).await?;
    let job = follow::follow(&mut conn, &args.client, &mark_id, deadline).await?;
    let output = Output {
        json: args.json,
        out: args.out,
        state_line: false,
    };
    finish(job, None, &output).await
}

/// Saves the images if asked, prints the job, and turns a failed job into
/// its error (exit code 1).
async fn finish(job: pb::ImageJob, seed: Option<i64>, output: &Output) -> Result<(), CliError> {
    let saved = match &output.out {
        Some(dir) if job.state() == JobState::Succeeded => {
            download::save_all(dir, &job.mark_id, &job.images).await?
        }
        Some(_) if job.state() != JobState::Failed => {
            eprintln!("{}: no images to save yet", describe(&job));
            Vec::new()
        }
        _ => Vec::new(),
    };
    if output.json {
        println!("{}", job_json(&job, seed, &saved));
    } else {
        if output.state_line {
            println!("{}", describe(&job));
        }
        if saved.is_empty() {
            for image in &job.images {
                println!("{}", image.url);
            }
        } else {
            for path in &saved {
                println!("{}", path.display());
            }
        }
    }
    if job.state() == JobState::Failed {
        return Err(CliError::JobFailed {
            mark_id: job.mark_id,
            state: job.upstream_status,
        });
    }
    Ok(())
}

/// The job as `--json` prints it: the proto's fields with the state's short
/// name, `seed` for `generate`, and each image's `path` once saved.
fn job_json(job: &pb::ImageJob, seed: Option<i64>, saved: &[PathBuf]) -> Value {
    let images: Vec<Value> = job
        .images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let mut value = json!({
                "url": image.url,
                "name": image.name,
                "width": image.width,
                "height": image.height,
                "nsfw": image.nsfw,
            });
            if let Some(path) = saved.get(i) {
                value["path"] = json!(path.to_string_lossy());
            }
            value
        })
        .collect();
    let state = job.state().as_str_name();
    let mut value = json!({
        "mark_id": job.mark_id,
        "state": state.strip_prefix("JOB_STATE_").unwrap_or(state),
        "queue_position": job.queue_position,
        "upstream_status": job.upstream_status,
        "prompt_id": job.prompt_id,
        "etag": job.etag,
        "images": images,
    });
    if let Some(seed) = seed {
        value["seed"] = json!(seed);
    }
    // When Piclumen confirmed this state (RFC 3339), so a script sees a
    // stale-if-error answer's age.
    if let Some(at) = job
        .observed_at
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
    {
        value["observed_at"] = json!(humantime::format_rfc3339_millis(at).to_string());
    }
    value
}

fn describe(job: &pb::ImageJob) -> String {
    match job.state() {
        JobState::Pending => format!(
            "{}: pending, queue position {}",
            job.mark_id, job.queue_position
        ),
        JobState::Running => format!("{}: running", job.mark_id),
        JobState::Succeeded => format!("{}: succeeded, {} image(s)", job.mark_id, job.images.len()),
        JobState::Failed => format!("{}: failed", job.mark_id),
        JobState::Unspecified => {
            format!("{}: unknown state {:?}", job.mark_id, job.upstream_status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_job_fields_and_short_state_names() {
        let job = pb::ImageJob {
            mark_id: "m".into(),
            state: JobState::Succeeded.into(),
            queue_position: 0,
            images: vec![pb::Image {
                url: "http://h/a.png".into(),
                name: "a.png".into(),
                width: 64,
                height: 32,
                nsfw: true,
            }],
            upstream_status: "success".into(),
            prompt_id: "p".into(),
            etag: "e".into(),
            ..Default::default()
        };
        let value = job_json(&job, Some(7), &[PathBuf::from("out/a.png")]);
        assert_eq!(
            value,
            json!({
                "mark_id": "m",
                "state": "SUCCEEDED",
                "queue_position": 0,
                "upstream_status": "success",
                "prompt_id": "p",
                "etag": "e",
                "images": [{"url": "http://h/a.png", "name": "a.png", "width": 64,
                            "height": 32, "nsfw": true, "path": "out/a.png"}],
                "seed": 7,
            })
        );
        let pending = pb::ImageJob {
            state: JobState::Pending.into(),
            queue_position: 2,
            ..Default::default()
        };
        let value = job_json(&pending, None, &[]);
        assert_eq!(value["state"], "PENDING");
        assert_eq!(value["queue_position"], 2);
        assert!(value.get("seed").is_none());
        assert!(value.get("observed_at").is_none(), "none confirmed");
        let observed = pb::ImageJob {
            observed_at: Some(prost_types::Timestamp {
                seconds: 1_796_000_000,
                nanos: 250_000_000,
            }),
            ..pending
        };
        let value = job_json(&observed, None, &[]);
        assert_eq!(value["observed_at"], "2026-11-30T00:53:20.250Z");
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        let failed = CliError::JobFailed {
            mark_id: "m".into(),
            state: "failed".into(),
        };
        assert_eq!(failed.exit_code(), 1);
        assert_eq!(CliError::BadToken.exit_code(), 2);
        assert_eq!(CliError::Incomplete.exit_code(), 3);
        let jobs = |failed: &[&str], missing: &[&str]| CliError::Jobs {
            failed: failed.iter().map(|s| (*s).to_owned()).collect(),
            missing: missing.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert_eq!(jobs(&["a"], &[]).exit_code(), 1);
        assert_eq!(jobs(&["a"], &["b"]).exit_code(), 3);
        assert_eq!(jobs(&[], &["b"]).exit_code(), 3);
        assert_eq!(
            jobs(&["a"], &["b", "c"]).to_string(),
            "not every job succeeded (failed: a; not found: b, c)"
        );
        assert_eq!(
            CliError::Status(tonic::Status::unavailable("x")).exit_code(),
            3
        );
    }
}
