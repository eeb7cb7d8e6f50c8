//! The callers file re-read while serving: on SIGHUP, and when its content
//! changes. Polling the content every [`POLL_EVERY`] rather than watching
//! for file events: a Kubernetes Secret update swaps a symlink to a new
//! directory, which an inotify watch on the file itself misses, and
//! reading a small file every two seconds costs nothing and works on every
//! filesystem, with no extra dependency. A new version is put in force
//! whole (calls under way keep the caller they were admitted as); one that
//! does not parse is refused with its line and reason, and the version in
//! force stays.

use std::{path::PathBuf, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::{CallerGate, Directory};

/// How often the file's content is compared.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// Starts re-reading `path` for `gate`, until the gate is dropped.
pub(super) fn spawn(gate: &CallerGate, path: PathBuf) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = gate.downgrade();
    let mut hangup = signal(SignalKind::hangup())
        .inspect_err(|e| warn!(error = %e, "cannot listen for SIGHUP: the callers file is re-read on change only"))
        .ok();
    // The content in force, not the file now: a change landing between
    // the start's read and this one is applied at the first tick.
    let mut last = gate.source();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = recv(&mut hangup) => true,
            };
            let Some(gate) = weak.upgrade() else { return };
            // A small file: read in place rather than on a blocking thread.
            let content = match std::fs::read(&path) {
                Ok(content) => content,
                Err(e) => {
                    if forced {
                        error!(file = %path.display(), error = %e, "SIGHUP: cannot read the callers file; the version in force stays");
                    }
                    continue;
                }
            };
            let digest = super::key_hash(&content);
            if !forced && last == Some(digest) {
                continue;
            }
            last = Some(digest);
            let parsed = std::str::from_utf8(&content)
                .map_err(|_| "the file is not UTF-8 text".to_owned())
                .and_then(|text| Directory::parse(text).map_err(|e| e.to_string()));
            match parsed {
                Ok(directory) => {
                    info!(file = %path.display(), callers = directory.callers().len(), sighup = forced, "callers file reloaded");
                    gate.replace(directory);
                }
                Err(reason) => error!(
                    file = %path.display(),
                    error = %reason,
                    "callers file refused; the version in force stays"
                ),
            }
        }
    });
}

async fn recv(hangup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::callers::Clock;

    fn file(name: &str) -> String {
        format!(
            "[[caller]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n",
            "ab".repeat(32)
        )
    }

    #[tokio::test]
    async fn a_change_made_before_the_reloader_started_is_applied() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("callers.toml");
        // In force: the file as read at start; on disk: a newer version
        // written before the reloader's first look.
        let started = Directory::parse(&file("old")).expect("parse");
        std::fs::write(&path, file("new")).expect("write");
        let gate = CallerGate::new(Arc::new(started), None, false, Clock::System);
        spawn(&gate, path);
        let names = || {
            let directory = gate.directory().expect("on");
            directory
                .callers()
                .iter()
                .map(|c| c.name.to_string())
                .collect::<Vec<_>>()
        };
        for _ in 0..50 {
            if names() == ["new"] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("still {:?}", names());
    }
}
