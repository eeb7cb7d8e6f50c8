//! The command line as data: the long flags of `serve`, `sim` and the
//! root, and temp files to point path flags at.

use std::{path::PathBuf, time::Duration};

use clap::ArgAction;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A file under the system temp dir holding `text`, unique to this test run.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("piclumen-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

pub fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Every long flag of a subcommand (or of the root, for the global ones).
pub fn flags(cmd: &clap::Command) -> Vec<&clap::Arg> {
    cmd.get_arguments()
        .filter(|a| a.get_long().is_some())
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .collect()
}

pub fn subcommand<'a>(root: &'a clap::Command, name: &str) -> &'a clap::Command {
    root.find_subcommand(name).expect("subcommand")
}
