//! `piclumen-grpc usage`: each caller's images today and this month and
//! what is left of its limits, read from the fleet's Redis counters; and
//! `piclumen-grpc hash-key`: the `key_sha256` of an API key read from
//! stdin (never an argument, so the key stays out of shell history and
//! process lists). Neither prints a key or a token.

use std::{io::BufRead, path::PathBuf, str::FromStr};

use clap::Args;
use serde_json::json;

use super::{CallerGate, Clock, Directory, Windows, key_hash};
use crate::{
    idempotency::{StoreLocation, StoreNamespace},
    support::hex,
    upstream::ClientConfig,
};

/// `usage` flags.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The callers file the servers run with.
    #[arg(long = "callers-file", env = "PICLUMEN_CALLERS_FILE")]
    pub callers_file: PathBuf,
    /// The servers' Redis store (`redis://HOST:PORT[/DB]` or `rediss://...`).
    #[arg(long = "idempotency-store", env = "PICLUMEN_IDEMPOTENCY_STORE", hide_env_values = true, value_parser = StoreLocation::from_str)]
    pub store: StoreLocation,
    /// The servers' `--store-namespace`, when they set one.
    #[arg(long = "store-namespace", env = "PICLUMEN_STORE_NAMESPACE", value_parser = StoreNamespace::from_str)]
    pub namespace: Option<StoreNamespace>,
    /// The servers' `--upstream-url` (their namespace is derived from it
    /// when they set no `--store-namespace`); Piclumen's when unset.
    #[arg(
        long = "upstream-url",
        env = "PICLUMEN_UPSTREAM_URL",
        hide_env_values = true
    )]
    pub upstream_url: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `hash-key` takes no flags: the key comes on stdin.
#[derive(Debug, Args)]
pub struct HashKeyArgs {}

/// One caller's line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    name: String,
    today: u64,
    month: u64,
    minute: u64,
    limits: super::Limits,
}

/// Runs `usage`, printing to stdout.
pub async fn usage(args: UsageArgs) -> Result<(), String> {
    let directory = Directory::load(&args.callers_file)
        .map_err(|e| format!("--callers-file {}: {e}", args.callers_file.display()))?;
    let StoreLocation::Redis(url) = &args.store else {
        return Err(
            "usage reads the fleet's counters in Redis: give --idempotency-store redis://... \
             (with the memory store, each server counts for itself)"
                .into(),
        );
    };
    let upstream = args
        .upstream_url
        .clone()
        .unwrap_or_else(|| ClientConfig::default().base_url.expose().to_owned());
    let namespace = StoreNamespace::resolve(args.namespace.as_ref(), &upstream);
    let directory = std::sync::Arc::new(directory);
    let gate = CallerGate::new(
        std::sync::Arc::clone(&directory),
        Some((url, &namespace)),
        false,
        Clock::System,
    );
    let names: Vec<&str> = directory.callers().iter().map(|c| &*c.name).collect();
    let (windows, used) = gate
        .used(&names)
        .await
        .map_err(|e| format!("cannot read the counters from {}: {e}", args.store))?;
    let lines: Vec<Line> = directory
        .callers()
        .iter()
        .zip(used)
        .map(|(caller, [today, month, minute])| Line {
            name: caller.name.to_string(),
            today,
            month,
            minute,
            limits: caller.limits,
        })
        .collect();
    let out = if args.json {
        json_report(&windows, &lines)
    } else {
        table(&windows, &lines)
    };
    println!("{out}");
    Ok(())
}

fn left(limit: Option<u64>, used: u64) -> Option<u64> {
    limit.map(|l| l.saturating_sub(used))
}

fn json_report(windows: &Windows, lines: &[Line]) -> String {
    let callers: Vec<_> = lines
        .iter()
        .map(|l| {
            json!({
                "caller": l.name,
                "images_today": l.today,
                "images_this_month": l.month,
                "creates_this_minute": l.minute,
                "limits": {
                    "images_per_day": l.limits.images_per_day,
                    "creates_per_minute": l.limits.creates_per_minute,
                    "max_watches": l.limits.max_watches,
                },
                "left": {
                    "images_today": left(l.limits.images_per_day, l.today),
                    "creates_this_minute": left(l.limits.creates_per_minute, l.minute),
                },
            })
        })
        .collect();
    json!({"day": windows.day_label(), "month": windows.month_label(), "callers": callers})
        .to_string()
}

fn table(windows: &Windows, lines: &[Line]) -> String {
    let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let mut rows = vec![[
        "CALLER".to_owned(),
        "TODAY".into(),
        "THIS MONTH".into(),
        "IMAGES/DAY".into(),
        "LEFT TODAY".into(),
        "CREATES/MIN".into(),
        "LEFT THIS MINUTE".into(),
        "MAX WATCHES".into(),
    ]];
    for l in lines {
        rows.push([
            l.name.clone(),
            l.today.to_string(),
            l.month.to_string(),
            show(l.limits.images_per_day),
            show(left(l.limits.images_per_day, l.today)),
            show(l.limits.creates_per_minute),
            show(left(l.limits.creates_per_minute, l.minute)),
            show(l.limits.max_watches),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "images per caller on {} (UTC) and in {}\n",
        windows.day_label(),
        windows.month_label()
    );
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.trim_end().to_owned()
}

/// Runs `hash-key`: the SHA-256 of the first line of stdin (surrounding
/// whitespace and the line break left out), as lowercase hex.
pub fn hash_key(_: HashKeyArgs) -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
    let key = line.trim();
    if key.is_empty() {
        return Err("no key on stdin: pipe it in, e.g. `piclumen-grpc hash-key < key.txt`".into());
    }
    println!("{}", hex(&key_hash(key.as_bytes())));
    Ok(())
}
