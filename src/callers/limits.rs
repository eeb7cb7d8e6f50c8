//! A caller's limits as plain logic: which UTC windows an instant falls
//! in, whether one more create fits, how long until a refused one would,
//! and the per-process counters of the memory store. Methods take `now`
//! (milliseconds since the Unix epoch, from a [`Clock`]) and return what to
//! do; the Redis counters (`super::redis`) run the same comparison in one
//! script.
//!
//! Windows are fixed UTC calendar windows, not rolling ones: a budget is
//! spoken of per day ("10 images a day"), `usage` reports today and this
//! month, every replica agrees on where a window starts without sharing a
//! clock beyond UTC, and a window is one counter (one Redis key) rather
//! than a log of every create. The price is the edge of a window: a caller
//! may spend a day's budget just before midnight UTC and another just
//! after, and up to twice `creates_per_minute` around a minute's turn.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::support::lock;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// The limits of one caller; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Images (`batch_size` per create) per UTC day.
    pub images_per_day: Option<u64>,
    /// Creates per UTC minute.
    pub creates_per_minute: Option<u64>,
    /// WatchImage streams open at once (per replica).
    pub max_watches: Option<u64>,
}

impl Limits {
    /// Whether any limit counts creates (the budget Redis holds).
    pub fn limits_creates(&self) -> bool {
        self.images_per_day.is_some() || self.creates_per_minute.is_some()
    }
}

/// Which limit refused a call, by its name in the callers file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `images_per_day`.
    ImagesPerDay,
    /// `creates_per_minute`.
    CreatesPerMinute,
    /// `max_watches`.
    MaxWatches,
}

impl LimitKind {
    /// The key's name in the callers file (and the metrics' `limit` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ImagesPerDay => "images_per_day",
            Self::CreatesPerMinute => "creates_per_minute",
            Self::MaxWatches => "max_watches",
        }
    }
}

/// A refused call: the limit, its value, what was used, and how long until
/// the window frees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The limit that refused.
    pub limit: LimitKind,
    /// Its value.
    pub allowed: u64,
    /// What the window had used.
    pub used: u64,
    /// Until the window turns (zero for `max_watches`: a watch ending frees it).
    pub retry_after: Duration,
}

/// Wall-clock time as milliseconds since the Unix epoch. The system clock
/// in service; in tests, one anchored at a chosen time that moves with
/// tokio's (paused) clock.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// `SystemTime::now()`.
    System,
    /// `at_ms` when `since` was the tokio instant, moving with it.
    Anchored {
        /// The wall time at `since`.
        at_ms: u64,
        /// The tokio instant of the anchor.
        since: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock showing `at_ms` now and moving with tokio's clock.
    pub fn anchored(at_ms: u64) -> Self {
        Self::Anchored {
            at_ms,
            since: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self {
            Self::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Self::Anchored { at_ms, since } => {
                at_ms + u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
            }
        }
    }
}

/// The UTC windows an instant falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Windows {
    /// Days since the epoch.
    pub day: u64,
    /// Minutes since the epoch.
    pub minute: u64,
    /// Year and month (1 to 12).
    pub month: (i64, u32),
    now_ms: u64,
}

impl Windows {
    /// The windows of `now_ms`.
    pub fn at(now_ms: u64) -> Self {
        let day = now_ms / DAY_MS;
        let (year, month, _) = civil_from_days(day);
        Self {
            day,
            minute: now_ms / MINUTE_MS,
            month: (year, month),
            now_ms,
        }
    }

    /// Until the next UTC midnight.
    pub fn until_next_day(&self) -> Duration {
        Duration::from_millis((self.day + 1) * DAY_MS - self.now_ms)
    }

    /// Until the next whole UTC minute.
    pub fn until_next_minute(&self) -> Duration {
        Duration::from_millis((self.minute + 1) * MINUTE_MS - self.now_ms)
    }

    /// Until the first day of next month, UTC (how long a month's counter
    /// must be kept).
    pub fn until_next_month(&self) -> Duration {
        let (year, month) = self.month;
        let (year, month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        let start = days_from_civil(year, month, 1) * DAY_MS;
        Duration::from_millis(start.saturating_sub(self.now_ms))
    }

    /// The day as `YYYY-MM-DD`.
    pub fn day_label(&self) -> String {
        let (y, m, d) = civil_from_days(self.day);
        format!("{y:04}-{m:02}-{d:02}")
    }

    /// The month as `YYYY-MM`.
    pub fn month_label(&self) -> String {
        format!("{:04}-{:02}", self.month.0, self.month.1)
    }
}

/// Whether a create of `images` fits, given what the day and the minute
/// have used: the one rule both stores apply.
pub fn decide(
    limits: &Limits,
    day_images: u64,
    minute_creates: u64,
    images: u64,
    windows: &Windows,
) -> Result<(), Refusal> {
    if let Some(allowed) = limits.images_per_day
        && day_images + images > allowed
    {
        return Err(Refusal {
            limit: LimitKind::ImagesPerDay,
            allowed,
            used: day_images,
            retry_after: windows.until_next_day(),
        });
    }
    if let Some(allowed) = limits.creates_per_minute
        && minute_creates + 1 > allowed
    {
        return Err(Refusal {
            limit: LimitKind::CreatesPerMinute,
            allowed,
            used: minute_creates,
            retry_after: windows.until_next_minute(),
        });
    }
    Ok(())
}

/// What a reservation took, so that giving it back hits the same windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// The caller's name.
    pub caller: Arc<str>,
    /// Images taken from the day (and the month).
    pub images: u64,
    /// The windows it was taken in.
    pub windows: Windows,
}

/// One caller's counters in this process.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    day: u64,
    day_images: u64,
    month: (i64, u32),
    month_images: u64,
    minute: u64,
    minute_creates: u64,
}

impl Counts {
    /// Starts the windows that turned since the last use.
    fn roll(&mut self, windows: &Windows) {
        if self.day != windows.day {
            (self.day, self.day_images) = (windows.day, 0);
        }
        if self.month != windows.month {
            (self.month, self.month_images) = (windows.month, 0);
        }
        if self.minute != windows.minute {
            (self.minute, self.minute_creates) = (windows.minute, 0);
        }
    }
}

/// The counters of the memory store: per process, per caller name.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    counts: Mutex<HashMap<Arc<str>, Counts>>,
}

impl MemoryCounters {
    /// Takes one create of `images` from `caller`'s windows at `now_ms`,
    /// or refuses.
    pub fn reserve(
        &self,
        caller: &Arc<str>,
        limits: &Limits,
        images: u64,
        now_ms: u64,
    ) -> Result<Reserved, Refusal> {
        let windows = Windows::at(now_ms);
        let mut counts = lock(&self.counts);
        let counts = counts.entry(Arc::clone(caller)).or_default();
        counts.roll(&windows);
        decide(
            limits,
            counts.day_images,
            counts.minute_creates,
            images,
            &windows,
        )?;
        counts.day_images += images;
        counts.month_images += images;
        counts.minute_creates += 1;
        Ok(Reserved {
            caller: Arc::clone(caller),
            images,
            windows,
        })
    }

    /// Gives back a create that created nothing, in the windows it was
    /// taken from (a window that has turned since is left alone).
    pub fn give_back(&self, reserved: &Reserved) {
        let mut counts = lock(&self.counts);
        let Some(counts) = counts.get_mut(&reserved.caller) else {
            return;
        };
        let w = &reserved.windows;
        if counts.day == w.day {
            counts.day_images = counts.day_images.saturating_sub(reserved.images);
        }
        if counts.month == w.month {
            counts.month_images = counts.month_images.saturating_sub(reserved.images);
        }
        if counts.minute == w.minute {
            counts.minute_creates = counts.minute_creates.saturating_sub(1);
        }
    }

    /// Images of `caller` today and this month, at `now_ms`.
    pub fn used(&self, caller: &str, now_ms: u64) -> (u64, u64) {
        let windows = Windows::at(now_ms);
        let counts = lock(&self.counts);
        counts.get(caller).map_or((0, 0), |c| {
            let mut c = *c;
            c.roll(&windows);
            (c.day_images, c.month_images)
        })
    }
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).unwrap_or(0)
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
