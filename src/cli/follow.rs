//! Following a job (`watch`, `generate --wait`) through server restarts:
//! when the server drains (UNAVAILABLE `SHUTTING_DOWN`), its watch is
//! interrupted, or the connection is lost, the watch is re-issued over a
//! new connection to the same `--server` (behind a load balancer, any
//! replica), within the command's overall deadline (`--timeout`), with one
//! line on stderr each time. The decision is [`resumable`]; the loop
//! ([`resuming`], shared by WatchImage and WatchImages) only reconnects and
//! re-issues.

use std::{error::Error as _, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::{CliError, Connection, describe};
use crate::{
    config::ClientArgs,
    pb::{self, JobState},
};

/// First pause before reconnecting; doubled per failed attempt up to
/// [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between two connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// The `ErrorInfo` domain of the server's own errors.
const DOMAIN: &str = "piclumen-grpc";

/// Why a watch ended in a way worth re-issuing it, as the line printed says.
pub(super) fn resumable(error: &CliError) -> Option<String> {
    match error {
        CliError::Status(status) => resumable_status(status),
        CliError::Connect { source, .. } => Some(format!("cannot connect: {source}")),
        CliError::Incomplete => Some("the watch ended early".into()),
        _ => None,
    }
}

fn resumable_status(status: &Status) -> Option<String> {
    let details = status.get_error_details();
    if let Some(info) = details.error_info().filter(|i| i.domain == DOMAIN) {
        // The server's own answer: only a drain or an interrupted watch.
        let again = status.code() == Code::Unavailable
            && matches!(info.reason.as_str(), "SHUTTING_DOWN" | "WATCH_INTERRUPTED");
        return again.then(|| format!("UNAVAILABLE {}", info.reason));
    }
    // Made here from a transport failure (the server sends no error
    // source): the connection was lost.
    let lost = status.source().is_some()
        && matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        );
    lost.then(|| {
        format!(
            "the connection to the server was lost: {}",
            status.message()
        )
    })
}

/// Follows a job until it succeeds or fails, showing progress on stderr,
/// and returns its final state; re-issues the watch as the module docs say
/// until `deadline`.
pub(super) async fn follow(
    conn: &mut Connection,
    args: &ClientArgs,
    mark_id: &str,
    deadline: Instant,
) -> Result<pb::ImageJob, CliError> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let announce = |why: &str| {
        bar.suspend(|| {
            eprintln!(
                "watch of {mark_id} interrupted ({why}): reconnecting to {} and watching again",
                args.server
            );
        });
    };
    let result = resuming(conn, args, deadline, announce, async |conn, updates| {
        watch_once(conn, mark_id, deadline, &bar, updates).await
    })
    .await;
    bar.finish_and_clear();
    result
}

/// Runs one watch call (`once`, which counts the updates it received) and
/// re-issues it as the module docs say until `deadline`, calling `announce`
/// with the cause once per interruption: a re-issued watch that fails
/// before its first update (the server was still going away) is retried
/// quietly, after a pause.
pub(super) async fn resuming<T>(
    conn: &mut Connection,
    args: &ClientArgs,
    deadline: Instant,
    announce: impl Fn(&str),
    mut once: impl AsyncFnMut(&mut Connection, &mut usize) -> Result<T, CliError>,
) -> Result<T, CliError> {
    let mut announced = false;
    let mut pause = RECONNECT_FIRST;
    loop {
        let mut updates = 0;
        let error = match once(conn, &mut updates).await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        if updates > 0 {
            announced = false;
            pause = RECONNECT_FIRST;
        }
        let Some(why) = resumable(&error).filter(|_| Instant::now() + pause < deadline) else {
            return Err(error);
        };
        if announced {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RECONNECT_MAX);
        } else {
            announced = true;
            announce(&why);
        }
        *conn = reconnect(args, deadline).await?;
    }
}

/// One WatchImage call to its end: the final job, or why it ended early;
/// counts the updates it received.
async fn watch_once(
    conn: &mut Connection,
    mark_id: &str,
    deadline: Instant,
    bar: &ProgressBar,
    updates: &mut usize,
) -> Result<pb::ImageJob, CliError> {
    let mut request = conn.request(pb::WatchImageRequest {
        mark_id: mark_id.to_owned(),
    });
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    let mut stream = conn.client.watch_image(request).await?.into_inner();
    while let Some(update) = stream.message().await? {
        *updates += 1;
        let job = update.job.unwrap_or_default();
        let line = describe(&job);
        if bar.is_hidden() {
            if !update.heartbeat {
                eprintln!("{line}");
            }
        } else {
            bar.set_message(line);
        }
        if matches!(job.state(), JobState::Succeeded | JobState::Failed) {
            return Ok(job);
        }
    }
    Err(CliError::Incomplete)
}

/// A new connection to `--server`, retried with backoff until `deadline`
/// (a replica that replaces a drained one may take a moment to listen).
async fn reconnect(args: &ClientArgs, deadline: Instant) -> Result<Connection, CliError> {
    let mut pause = RECONNECT_FIRST;
    loop {
        match Connection::open(args).await {
            Ok(conn) => return Ok(conn),
            Err(error @ CliError::Connect { .. }) => {
                if Instant::now() + pause >= deadline {
                    return Err(error);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_MAX);
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    fn ours(code: Code, reason: &str) -> CliError {
        let details =
            ErrorDetails::with_error_info(reason, DOMAIN, std::collections::HashMap::new());
        CliError::Status(Status::with_error_details(code, "m", details))
    }

    #[test]
    fn drains_and_lost_connections_resume_other_errors_do_not() {
        assert!(resumable(&ours(Code::Unavailable, "SHUTTING_DOWN")).is_some());
        assert!(resumable(&ours(Code::Unavailable, "WATCH_INTERRUPTED")).is_some());
        assert!(resumable(&ours(Code::Unavailable, "UPSTREAM_UNAVAILABLE")).is_none());
        assert!(resumable(&ours(Code::NotFound, "JOB_NOT_FOUND")).is_none());
        assert!(resumable(&ours(Code::DeadlineExceeded, "DEADLINE_EXCEEDED")).is_none());
        // A status the server sent (no local cause) is not a lost connection.
        assert!(resumable(&CliError::Status(Status::unavailable("busy"))).is_none());
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone");
        let lost = Status::from_error(Box::new(io));
        assert!(resumable(&CliError::Status(lost)).is_some());
        assert!(resumable(&CliError::Incomplete).is_some());
        assert!(resumable(&CliError::BadToken).is_none());
    }
}
