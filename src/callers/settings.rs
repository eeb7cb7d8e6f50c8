//! The callers' `serve` flags, declared here; `config` reads the file once
//! at start (refusing to start on a bad one) and the server opens the gate
//! with the store's counters.

use std::{path::PathBuf, sync::Arc};

use clap::Args;

use super::{CallerGate, Clock, Directory, FileError, reload};
use crate::{flags::no_flags, idempotency::StoreNamespace};

/// Named callers and how their limits behave.
#[derive(Debug, Clone, Args)]
pub struct CallersConfig {
    /// TOML file of named callers (`[[caller]]` tables: name, key_sha256
    /// and/or tls_subject, optional limits and token); re-read on SIGHUP
    /// and when it changes. See README, "Named callers".
    #[arg(
        id = "callers_file",
        long = "callers-file",
        env = "PICLUMEN_CALLERS_FILE"
    )]
    pub file: Option<PathBuf>,
    /// With a Redis store: when Redis cannot be reached, let creates of
    /// callers with a create limit through uncounted instead of refusing
    /// them with UNAVAILABLE (the default: a budget that cannot be checked
    /// is not spent); callers without one always go through.
    #[arg(long = "callers-fail-open", env = "PICLUMEN_CALLERS_FAIL_OPEN")]
    pub fail_open: bool,
    /// The file as read at start (by `config`).
    #[arg(skip)]
    pub directory: Option<Arc<Directory>>,
}

impl Default for CallersConfig {
    fn default() -> Self {
        no_flags()
    }
}

impl CallersConfig {
    /// Reads and checks the file, when there is one.
    pub fn load(&mut self) -> Result<(), FileError> {
        if let Some(path) = &self.file {
            self.directory = Some(Arc::new(Directory::load(path)?));
        }
        Ok(())
    }

    /// The gate of these callers, counting in Redis when `redis` (URL and
    /// namespace) is given; re-reads the file from now on. Off without a
    /// file.
    pub fn open(&self, redis: Option<(&str, &StoreNamespace)>) -> CallerGate {
        let directory = match (&self.directory, &self.file) {
            (Some(directory), _) => Arc::clone(directory),
            // An embedder that set the path but did not load it.
            (None, Some(path)) => match Directory::load(path) {
                Ok(directory) => Arc::new(directory),
                Err(error) => {
                    tracing::error!(%error, "callers file refused: every call is refused until it is fixed");
                    Arc::new(Directory::default())
                }
            },
            (None, None) => return CallerGate::default(),
        };
        let gate = CallerGate::new(directory, redis, self.fail_open, Clock::System);
        if let Some(path) = &self.file {
            reload::spawn(&gate, path.clone());
        }
        gate
    }
}
