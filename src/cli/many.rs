//! `watch` of several jobs: one WatchImages stream for all of them, one
//! progress line per job (live lines on a terminal, one line per change
//! otherwise), re-issued with the jobs not yet ended when the server drains
//! or the connection is lost ([`follow::resuming`]). A job the server does
//! not know gets its NOT_FOUND on its own line and the others go on.
//!
//! What each message changes is decided by [`Tracker`], a plain type; the
//! stream loop only receives, shows and re-issues. At the end stdout gets,
//! for each job in the order given, its state line and its image URLs (or
//! saved files), or with `--json` one object `{"jobs": [...]}`. The exit
//! code: 0 every job succeeded; 1 one or more failed and every one was
//! found; 3 a job was not found (or ended with another error) or the call
//! failed.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::Code;

use super::{CliError, Connection, describe, download, follow, job_json};
use crate::{
    config::WatchArgs,
    pb::{self, JobState},
};

/// Where one job of the watch stands.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    /// Not ended; its last state, once one came.
    Open(Option<pb::ImageJob>),
    /// Succeeded or failed: its final state.
    Ended(pb::ImageJob),
    /// The server ended this job's part of the stream with an error
    /// (NOT_FOUND: the token does not own it, or Piclumen stopped knowing it).
    Error {
        /// The error's code.
        code: Code,
        /// The error's message.
        message: String,
    },
}

/// What a message changed: the job's position, its new line, and whether
/// that line is its last.
#[derive(Debug, PartialEq)]
pub(super) struct Shown {
    index: usize,
    line: String,
    ended: bool,
}

/// The jobs of one multi-job watch and what each message changes.
#[derive(Debug)]
pub(super) struct Tracker {
    /// The ids in the order given, duplicates folded.
    order: Vec<String>,
    entries: HashMap<String, Entry>,
}

impl Tracker {
    /// The ids to follow, in this order; a repeated id is followed once.
    pub(super) fn new(ids: &[String]) -> Self {
        let mut order = Vec::with_capacity(ids.len());
        let mut entries = HashMap::with_capacity(ids.len());
        for id in ids {
            if entries.insert(id.clone(), Entry::Open(None)).is_none() {
                order.push(id.clone());
            }
        }
        Self { order, entries }
    }

    /// The ids, in order.
    pub(super) fn ids(&self) -> &[String] {
        &self.order
    }

    /// The ids not ended yet, in order: what a re-issued stream asks for.
    pub(super) fn open_ids(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|id| matches!(self.entries.get(*id), Some(Entry::Open(_))))
            .cloned()
            .collect()
    }

    /// Every job has ended (or was not found).
    pub(super) fn done(&self) -> bool {
        self.entries.values().all(|e| !matches!(e, Entry::Open(_)))
    }

    /// Takes one message: what to show of the job it moved, or `None` (a
    /// heartbeat, an id not asked for, a job already ended).
    pub(super) fn apply(&mut self, update: pb::WatchImagesResponse) -> Option<Shown> {
        let job = update.job?;
        let index = self.order.iter().position(|id| *id == job.mark_id)?;
        let entry = self.entries.get_mut(&job.mark_id)?;
        if !matches!(entry, Entry::Open(_)) {
            return None;
        }
        if let Some(error) = update.error.filter(|e| e.code != Code::Ok as i32) {
            *entry = Entry::Error {
                code: Code::from(error.code),
                message: error.message,
            };
        } else if ended(&job) {
            *entry = Entry::Ended(job);
        } else if update.heartbeat {
            return None;
        } else {
            *entry = Entry::Open(Some(job));
        }
        Some(Shown {
            index,
            line: line(&self.order[index], entry),
            ended: !matches!(entry, Entry::Open(_)),
        })
    }

    /// Every job with where it stands, in order.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.order
            .iter()
            .filter_map(|id| Some((id.as_str(), self.entries.get(id)?)))
    }
}

fn ended(job: &pb::ImageJob) -> bool {
    matches!(job.state(), JobState::Succeeded | JobState::Failed)
}

/// The progress (and final) line of a job.
fn line(mark_id: &str, entry: &Entry) -> String {
    match entry {
        Entry::Open(None) => format!("{mark_id}: waiting for its first state"),
        Entry::Open(Some(job)) | Entry::Ended(job) => describe(job),
        Entry::Error {
            code: Code::NotFound,
            message,
        } => format!("{mark_id}: not found ({message})"),
        Entry::Error { code, message } => {
            format!(
                "{mark_id}: ended with an error ({}: {message})",
                code_name(*code)
            )
        }
    }
}

/// A code's canonical name (`NOT_FOUND`), as gRPC and JSON spell it.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The progress display: one line per job, live on a terminal under a
/// header line (whose steady tick redraws them all, so the job lines need
/// no ticker of their own); one line per change on stderr otherwise.
struct Display {
    multi: MultiProgress,
    header: ProgressBar,
    bars: Vec<ProgressBar>,
    ended: std::cell::Cell<usize>,
}

impl Display {
    fn new(tracker: &Tracker) -> Self {
        let multi = MultiProgress::new();
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let style = ProgressStyle::with_template("  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = tracker
            .entries()
            .map(|(id, entry)| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_message(line(id, entry));
                bar
            })
            .collect();
        let display = Self {
            multi,
            header,
            bars,
            ended: std::cell::Cell::new(0),
        };
        display.count();
        display
            .header
            .enable_steady_tick(Duration::from_millis(120));
        display
    }

    fn count(&self) {
        self.header.set_message(format!(
            "{} of {} jobs ended",
            self.ended.get(),
            self.bars.len()
        ));
    }

    fn show(&self, shown: Shown) {
        if shown.ended {
            self.ended.set(self.ended.get() + 1);
        }
        if self.multi.is_hidden() {
            eprintln!("{}", shown.line);
        } else if let Some(bar) = self.bars.get(shown.index) {
            bar.set_message(shown.line);
            self.count();
        }
    }

    fn announce(&self, text: &str) {
        self.multi.suspend(|| eprintln!("{text}"));
    }

    fn clear(&self) {
        self.header.finish_and_clear();
        for bar in &self.bars {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

/// `watch` of several ids: follows them all on one stream, then prints
/// each job's result (see the module docs).
pub(super) async fn watch_many(args: WatchArgs) -> Result<(), CliError> {
    let deadline = Instant::now() + args.client.timeout;
    let mut conn = Connection::open(&args.client).await?;
    let mut tracker = Tracker::new(&args.mark_ids);
    let display = Display::new(&tracker);
    let count = tracker.ids().len();
    let announce = |why: &str| {
        display.announce(&format!(
            "watch of {count} jobs interrupted ({why}): reconnecting to {} and watching again",
            args.client.server
        ));
    };
    let result = follow::resuming(
        &mut conn,
        &args.client,
        deadline,
        announce,
        async |conn, updates| watch_stream(conn, &mut tracker, deadline, &display, updates).await,
    )
    .await;
    display.clear();
    result?;
    report(&tracker, &args).await
}

/// One WatchImages call for the jobs not ended yet, until every job has
/// ended; counts the messages received.
async fn watch_stream(
    conn: &mut Connection,
    tracker: &mut Tracker,
    deadline: Instant,
    display: &Display,
    updates: &mut usize,
) -> Result<(), CliError> {
    let mut request = conn.request(pb::WatchImagesRequest {
        mark_ids: tracker.open_ids(),
    });
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    let mut stream = conn.client.watch_images(request).await?.into_inner();
    while let Some(update) = stream.message().await? {
        *updates += 1;
        if let Some(shown) = tracker.apply(update) {
            display.show(shown);
        }
        if tracker.done() {
            return Ok(());
        }
    }
    Err(CliError::Incomplete)
}

/// Saves the images if asked, prints every job's result, and turns failed
/// or missing jobs into the command's error.
async fn report(tracker: &Tracker, args: &WatchArgs) -> Result<(), CliError> {
    let dirs: Vec<Option<PathBuf>> = match &args.out {
        Some(dir) => download::job_dirs(dir, tracker.ids())
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None; tracker.ids().len()],
    };
    let mut lines = Vec::new();
    let mut values = Vec::new();
    let (mut failed, mut missing) = (Vec::new(), Vec::new());
    for ((id, entry), dir) in tracker.entries().zip(dirs) {
        match entry {
            Entry::Ended(job) => {
                let saved = match dir {
                    Some(dir) if job.state() == JobState::Succeeded => {
                        download::save_all(&dir, &job.mark_id, &job.images).await?
                    }
                    _ => Vec::new(),
                };
                if job.state() == JobState::Failed {
                    failed.push(id.to_owned());
                }
                lines.push(describe(job));
                if saved.is_empty() {
                    lines.extend(job.images.iter().map(|i| i.url.clone()));
                } else {
                    lines.extend(saved.iter().map(|p| p.display().to_string()));
                }
                values.push(job_json(job, None, &saved));
            }
            Entry::Error { code, message } => {
                missing.push(id.to_owned());
                lines.push(line(id, entry));
                values.push(error_json(id, *code, message));
            }
            Entry::Open(_) => return Err(CliError::Incomplete),
        }
    }
    if args.json {
        println!("{}", json!({ "jobs": values }));
    } else {
        for line in lines {
            println!("{line}");
        }
    }
    if failed.is_empty() && missing.is_empty() {
        return Ok(());
    }
    Err(CliError::Jobs { failed, missing })
}

/// A job that ended with an error, as `--json` lists it.
fn error_json(mark_id: &str, code: Code, message: &str) -> Value {
    json!({
        "mark_id": mark_id,
        "error": { "code": code_name(code), "message": message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(mark_id: &str, state: JobState) -> pb::ImageJob {
        pb::ImageJob {
            mark_id: mark_id.into(),
            state: state.into(),
            ..Default::default()
        }
    }

    fn update(job: pb::ImageJob) -> pb::WatchImagesResponse {
        pb::WatchImagesResponse {
            job: Some(job),
            ..Default::default()
        }
    }

    #[test]
    fn each_job_ends_once_and_a_missing_one_does_not_stop_the_others() {
        let ids: Vec<String> = ["a", "b", "a", "c"].map(String::from).to_vec();
        let mut tracker = Tracker::new(&ids);
        assert_eq!(tracker.ids(), ["a", "b", "c"], "duplicates folded");
        assert_eq!(
            tracker.apply(update(job("a", JobState::Pending))),
            Some(Shown {
                index: 0,
                line: "a: pending, queue position 0".into(),
                ended: false
            })
        );
        let mut missing = update(job("b", JobState::Unspecified));
        missing.error = Some(tonic_types::Status {
            code: Code::NotFound as i32,
            message: "no such job".into(),
            details: Vec::new(),
        });
        assert_eq!(
            tracker.apply(missing),
            Some(Shown {
                index: 1,
                line: "b: not found (no such job)".into(),
                ended: true
            })
        );
        assert_eq!(tracker.open_ids(), ["a", "c"]);
        // A heartbeat (no job) and an id not asked for change nothing.
        assert_eq!(
            tracker.apply(pb::WatchImagesResponse {
                heartbeat: true,
                ..Default::default()
            }),
            None
        );
        assert_eq!(tracker.apply(update(job("z", JobState::Running))), None);
        assert_eq!(
            tracker
                .apply(update(job("c", JobState::Failed)))
                .map(|u| (u.index, u.ended)),
            Some((2, true))
        );
        assert!(!tracker.done());
        assert_eq!(
            tracker
                .apply(update(job("a", JobState::Succeeded)))
                .map(|u| (u.index, u.ended)),
            Some((0, true))
        );
        assert!(tracker.done());
        // A terminal state repeated (after a re-issue) is not taken twice.
        assert_eq!(tracker.apply(update(job("a", JobState::Running))), None);
        let states: Vec<_> = tracker
            .entries()
            .map(|(id, e)| match e {
                Entry::Ended(job) => format!("{id} {:?}", job.state()),
                Entry::Error { code, .. } => format!("{id} {}", code_name(*code)),
                Entry::Open(_) => format!("{id} open"),
            })
            .collect();
        assert_eq!(states, ["a Succeeded", "b NOT_FOUND", "c Failed"]);
    }

    #[test]
    fn heartbeats_of_an_open_job_show_nothing() {
        let mut tracker = Tracker::new(&["a".to_owned()]);
        let mut beat = update(job("a", JobState::Running));
        beat.heartbeat = true;
        assert_eq!(tracker.apply(beat), None);
        assert_eq!(
            error_json("m", Code::DeadlineExceeded, "x"),
            json!({"mark_id": "m", "error": {"code": "DEADLINE_EXCEEDED", "message": "x"}})
        );
        assert_eq!(code_name(Code::Ok), "OK");
    }
}
