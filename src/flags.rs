//! The value parsers every settings struct's flags use, and the one bound
//! they share ([`MAX_DURATION`]). A leaf: it imports nothing of the crate,
//! so every module can declare its flags with it while `config`, which
//! flattens those modules' settings, stays above them all. Each error says what the flag accepts;
//! clap puts the flag and the value in front:
//! `invalid value '0s' for '--poll-interval <POLL_INTERVAL>': ...`.
//!
//! [`no_flags`] builds a settings struct from its clap defaults, so each
//! default is written once, in its field's `default_value`, and `Default`
//! cannot drift from the flags.

use std::{fmt::Display, str::FromStr, time::Duration};

use clap::{Args, FromArgMatches};
use tracing_subscriber::EnvFilter;

/// Longest accepted duration of any flag: far beyond any sensible setting,
/// and far from the overflow of `Instant + Duration`.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A settings struct as its flags' defaults make it: parsed from no
/// arguments and no environment. Settings structs implement `Default` with
/// it.
pub fn no_flags<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .no_binary_name(true)
        .mut_args(|arg| arg.env(None::<&str>));
    // Every default goes through its own value parser here; one that fails
    // is a bug in a `default_value`, caught by the first test that runs.
    command
        .try_get_matches_from(std::iter::empty::<String>())
        .and_then(|matches| T::from_arg_matches(&matches))
        .unwrap_or_else(|e| panic!("a default_value fails its own parser: {e}"))
}

/// A duration as clap's default text (`2s`, `30m`).
pub fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

fn duration_from(s: &str, min: Duration, range: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; expected a duration such as 300ms, 2s or 10m; {range}"))?;
    if (min..=MAX_DURATION).contains(&value) {
        Ok(value)
    } else {
        Err(range.to_owned())
    }
}

/// A duration above zero.
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    let range = format!(
        "accepted range: more than 0s, up to {}",
        human(MAX_DURATION)
    );
    duration_from(s, Duration::from_nanos(1), &range)
}

/// A duration, zero included.
pub fn duration_or_zero(s: &str) -> Result<Duration, String> {
    duration_at_least(Duration::ZERO)(s)
}

/// A duration of at least `min` (a parser, for `value_parser = ...`).
pub fn duration_at_least(
    min: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let range = format!("accepted range: {} to {}", human(min), human(MAX_DURATION));
        duration_from(s, min, &range)
    }
}

fn number<T>(s: &str, min: T, max: Option<T>) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display,
    T::Err: Display,
{
    let range = match &max {
        Some(max) => format!("accepted range: {min} to {max}"),
        None => format!("accepted range: {min} or more"),
    };
    match s.trim().parse::<T>() {
        Ok(v) if v >= min && max.as_ref().is_none_or(|max| v <= *max) => Ok(v),
        Ok(_) => Err(range),
        Err(e) => Err(format!("{e}; {range}")),
    }
}

/// A whole number of at least 1.
pub fn positive<T>(s: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display + From<u8>,
    T::Err: Display,
{
    number(s, T::from(1), None)
}

/// A whole number from 1 to `max` (a parser, for `value_parser = ...`).
pub fn up_to<T>(max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + From<u8> + Clone + Send + Sync + 'static,
    T::Err: Display,
{
    move |s| number(s, T::from(1), Some(max.clone()))
}

/// A share from 0 to 1.
pub fn rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{e}; accepted range: 0 to 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("accepted range: 0 to 1".into())
    }
}

/// `--log`: a filter the log subscriber accepts.
pub fn log_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{e}; expected a filter such as info or piclumen_grpc=debug"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_say_what_they_accept() {
        assert_eq!(
            positive_duration("0s"),
            Err("accepted range: more than 0s, up to 30days".into())
        );
        assert_eq!(
            duration_at_least(Duration::from_secs(1))("500ms"),
            Err("accepted range: 1s to 30days".into())
        );
        assert_eq!(
            up_to(500_usize)("501"),
            Err("accepted range: 1 to 500".into())
        );
        assert_eq!(
            positive::<u32>("0"),
            Err("accepted range: 1 or more".into())
        );
        assert_eq!(rate("1.5"), Err("accepted range: 0 to 1".into()));
    }
}
