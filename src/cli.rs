//! The human client: `generate` (optionally `--wait`), `watch` and `check`.
//! Results go to stdout (the mark id, then image URLs); progress to stderr.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

use crate::{
    config::{ClientArgs, GenerateArgs, JobArgs},
    pb::{self, JobState, image_service_client::ImageServiceClient},
};

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
    /// The stream ended before a terminal state.
    #[error("the watch ended before the job finished")]
    Incomplete,
}

struct Connection {
    client: ImageServiceClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Connection {
    async fn open(args: &ClientArgs) -> Result<Self, CliError> {
        let client = ImageServiceClient::connect(args.server.clone())
            .await
            .map_err(|source| CliError::Connect {
                server: args.server.clone(),
                source,
            })?;
        let token = args
            .token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CliError::BadToken)
            })
            .transpose()?;
        Ok(Self { client, token })
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

/// `generate`: prints the mark id; with `--wait`, follows the job and prints
/// the image URLs.
pub async fn generate(args: GenerateArgs) -> Result<(), CliError> {
    let mut conn = Connection::open(&args.client).await?;
    let request = conn.request(pb::GenerateImageRequest {
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
    let created = conn.client.generate_image(request).await?.into_inner();
    println!("{}", created.mark_id);
    eprintln!("seed: {}", created.seed);
    if args.wait {
        follow(&mut conn, created.mark_id).await?;
    }
    Ok(())
}

/// `watch`: follows a job to its end and prints the image URLs.
pub async fn watch(args: JobArgs) -> Result<(), CliError> {
    let mut conn = Connection::open(&args.client).await?;
    follow(&mut conn, args.mark_id).await
}

/// `check`: prints a job's state once.
pub async fn check(args: JobArgs) -> Result<(), CliError> {
    let mut conn = Connection::open(&args.client).await?;
    let request = conn.request(pb::CheckImageRequest {
        mark_id: args.mark_id,
    });
    let job = conn
        .client
        .check_image(request)
        .await?
        .into_inner()
        .job
        .unwrap_or_default();
    println!("{}", describe(&job));
    for image in &job.images {
        println!("{}", image.url);
    }
    Ok(())
}

async fn follow(conn: &mut Connection, mark_id: String) -> Result<(), CliError> {
    let request = conn.request(pb::WatchImageRequest {
        mark_id: mark_id.clone(),
    });
    let mut stream = conn.client.watch_image(request).await?.into_inner();
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    while let Some(update) = stream.message().await? {
        let job = update.job.unwrap_or_default();
        let line = describe(&job);
        if bar.is_hidden() {
            if !update.heartbeat {
                eprintln!("{line}");
            }
        } else {
            bar.set_message(line);
        }
        match job.state() {
            JobState::Succeeded => {
                bar.finish_and_clear();
                for image in &job.images {
                    println!("{}", image.url);
                }
                return Ok(());
            }
            JobState::Failed => {
                bar.finish_and_clear();
                return Err(CliError::JobFailed {
                    mark_id,
                    state: job.upstream_status,
                });
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    Err(CliError::Incomplete)
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
