//! `--out DIR`: saves a finished job's images, streamed to disk chunk by
//! chunk. Each image goes to a hidden temp file in DIR; only once every
//! image is complete are they renamed to their final names, so DIR never
//! holds a partial image and a failed download leaves nothing new behind
//! (the temp files are removed when dropped, on error or Ctrl-C alike).

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressStyle};
use tempfile::NamedTempFile;

use crate::pb;

/// Bound on connecting to an image host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for the next bytes of an image: a stalled host fails
/// instead of hanging, a slow but moving one is left alone.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest file name written (bytes; names are ASCII once sanitised).
const MAX_NAME_LEN: usize = 200;

/// Why saving the images failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The directory cannot be created or written to.
    #[error("cannot write to {}: {source}", .dir.display())]
    Dir {
        /// The `--out` directory.
        dir: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The job lists an image without a URL.
    #[error("image {name} has no URL")]
    NoUrl {
        /// The image's file name.
        name: String,
    },
    /// The HTTP client cannot be set up.
    #[error("cannot set up the HTTP client: {}", root_cause(.0))]
    Client(reqwest::Error),
    /// The request failed before an answer: connection, TLS, timeout.
    #[error("cannot download {url}: {}", request_failure(.error))]
    Request {
        /// The image URL.
        url: String,
        /// What reqwest said (its root cause is in the message).
        error: reqwest::Error,
    },
    /// The image host answered with an error status.
    #[error("cannot download {url}: the server answered HTTP {status}")]
    HttpStatus {
        /// The image URL.
        url: String,
        /// The status received.
        status: reqwest::StatusCode,
    },
    /// The body broke off.
    #[error("cannot download {url}: the connection broke after {received} bytes ({})", root_cause(.error))]
    Broken {
        /// The image URL.
        url: String,
        /// Bytes received before the break.
        received: u64,
        /// What reqwest said (its root cause is in the message).
        error: reqwest::Error,
    },
    /// The body ended before its announced length.
    #[error("cannot download {url}: the body ended after {received} of {expected} bytes")]
    Short {
        /// The image URL.
        url: String,
        /// Bytes received.
        received: u64,
        /// `content-length`.
        expected: u64,
    },
    /// Writing or renaming a file failed.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Ctrl-C during the downloads.
    #[error("interrupted; no partial file was left in {}", .dir.display())]
    Interrupted {
        /// The `--out` directory.
        dir: PathBuf,
    },
}

/// Downloads every image into `dir` (created if missing) and returns the
/// paths written, in the job's order. All or nothing: on error no new file
/// is left in `dir`. A file of the same name is replaced.
pub(super) async fn save_all(
    dir: &Path,
    mark_id: &str,
    images: &[pb::Image],
) -> Result<Vec<PathBuf>, DownloadError> {
    let dir_error = |source| DownloadError::Dir {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_error)?;
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("piclumen-grpc/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(DownloadError::Client)?;
    let names = file_names(mark_id, images);
    let fetch_all = async {
        let mut done = Vec::with_capacity(images.len());
        for (image, name) in images.iter().zip(&names) {
            let file = fetch(&http, dir, image, name).await?;
            done.push(file);
        }
        Ok::<_, DownloadError>(done)
    };
    // Dropping the downloads on Ctrl-C drops their temp files, which
    // removes them.
    let fetched = tokio::select! {
        fetched = fetch_all => fetched?,
        _ = tokio::signal::ctrl_c() => {
            return Err(DownloadError::Interrupted { dir: dir.to_owned() });
        }
    };
    let mut saved = Vec::with_capacity(fetched.len());
    for ((temp, bytes), name) in fetched.into_iter().zip(&names) {
        let path = dir.join(name);
        temp.persist(&path).map_err(|e| DownloadError::Write {
            path: path.clone(),
            source: e.error,
        })?;
        eprintln!("saved {} ({bytes} bytes)", path.display());
        saved.push(path);
    }
    Ok(saved)
}

/// Streams one image into a temp file in `dir`; returns the (flushed,
/// synced) temp file and its size.
async fn fetch(
    http: &reqwest::Client,
    dir: &Path,
    image: &pb::Image,
    name: &str,
) -> Result<(NamedTempFile, u64), DownloadError> {
    let url = image.url.clone();
    if url.is_empty() {
        return Err(DownloadError::NoUrl {
            name: name.to_owned(),
        });
    }
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".part");
    // tempfile creates 0600 files; the saved image should get what a plain
    // `File::create` gets (0666 less the caller's umask), as curl -o or cp
    // leave it. Asking for it at creation lets the kernel apply the umask,
    // so the file never has other permissions, before or after the rename.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut temp = builder
        .tempfile_in(dir)
        .map_err(|source| DownloadError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
    let write_error = |source| DownloadError::Write {
        path: dir.join(name),
        source,
    };
    let mut response = match http.get(&url).send().await {
        Ok(response) => response,
        Err(error) => return Err(DownloadError::Request { url, error }),
    };
    let status = response.status();
    if !status.is_success() {
        return Err(DownloadError::HttpStatus { url, status });
    }
    let expected = response.content_length();
    let bar = progress_bar(name, expected);
    let mut received = 0u64;
    loop {
        // Local disk writes of network-sized chunks are short; the CLI has
        // nothing else to run meanwhile, so they are written in place.
        match response.chunk().await {
            Ok(Some(chunk)) => {
                temp.write_all(&chunk).map_err(write_error)?;
                received += chunk.len() as u64;
                bar.inc(chunk.len() as u64);
            }
            Ok(None) => break,
            Err(error) => {
                bar.abandon();
                return Err(DownloadError::Broken {
                    url,
                    received,
                    error,
                });
            }
        }
    }
    bar.finish_and_clear();
    if let Some(expected) = expected.filter(|&n| n != received) {
        return Err(DownloadError::Short {
            url,
            received,
            expected,
        });
    }
    temp.as_file_mut()
        .sync_all()
        .map_err(|source| DownloadError::Write {
            path: temp.path().to_owned(),
            source,
        })?;
    Ok((temp, received))
}

/// A bar with bytes when the size is known, a spinner otherwise; hidden
/// (drawing nothing) when stderr is not a terminal.
fn progress_bar(name: &str, len: Option<u64>) -> ProgressBar {
    let (bar, template) = match len {
        Some(len) => (
            ProgressBar::new(len),
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ),
        None => (ProgressBar::new_spinner(), "{spinner} {msg} {bytes}"),
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(name.to_owned());
    // Draw at once, so even a quick download shows what it is saving.
    bar.tick();
    bar
}

/// One directory under `dir` per job of a multi-job `watch --out`, named
/// after its mark id (sanitised as the file names are, and distinct).
pub(super) fn job_dirs(dir: &Path, mark_ids: &[String]) -> Vec<PathBuf> {
    let mut used = HashSet::new();
    mark_ids
        .iter()
        .map(|id| {
            dir.join(distinct(
                sanitise(id).unwrap_or_else(|| "job".into()),
                &mut used,
            ))
        })
        .collect()
}

/// One safe, distinct file name per image: the image's name (else the last
/// segment of its URL, else `MARKID-N`), sanitised.
fn file_names(mark_id: &str, images: &[pb::Image]) -> Vec<String> {
    let mut used = HashSet::new();
    images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let from_url = image
                .url
                .split(['?', '#'])
                .next()
                .and_then(|u| u.rsplit('/').next())
                .unwrap_or_default();
            let raw = if image.name.is_empty() {
                from_url
            } else {
                &image.name
            };
            let name = sanitise(raw).unwrap_or_else(|| {
                sanitise(&format!("{mark_id}-{i}")).unwrap_or_else(|| format!("image-{i}"))
            });
            distinct(name, &mut used)
        })
        .collect()
}

/// Keeps ASCII letters, digits, `-`, `_` and single dots; every other
/// character (path separators included) becomes `_`; no leading dot, so no
/// `.`, `..` or hidden file. `None` when nothing usable is left.
fn sanitise(raw: &str) -> Option<String> {
    let mut name = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
            c
        } else {
            '_'
        };
        if c == '.' && (name.is_empty() || name.ends_with('.')) {
            continue;
        }
        name.push(c);
        if name.len() == MAX_NAME_LEN {
            break;
        }
    }
    name.chars()
        .any(|c| c.is_ascii_alphanumeric())
        .then_some(name)
}

/// Appends `-2`, `-3`, ... before the extension until the name is unused.
fn distinct(name: String, used: &mut HashSet<String>) -> String {
    if used.insert(name.clone()) {
        return name;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(dot) if dot > 0 => name.split_at(dot),
        _ => (name.as_str(), ""),
    };
    let mut n = 2;
    loop {
        let candidate = format!("{stem}-{n}{ext}");
        if used.insert(candidate.clone()) {
            return candidate;
        }
        n += 1;
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn request_failure(error: &reqwest::Error) -> String {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    format!("{what} ({})", root_cause(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(url: &str, name: &str) -> pb::Image {
        pb::Image {
            url: url.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_never_leave_the_directory() {
        assert_eq!(sanitise("a.webp").as_deref(), Some("a.webp"));
        assert_eq!(
            sanitise("../../etc/passwd").as_deref(),
            Some("_._etc_passwd")
        );
        assert_eq!(sanitise("..").as_deref(), None);
        assert_eq!(sanitise(".").as_deref(), None);
        assert_eq!(sanitise("/").as_deref(), None);
        assert_eq!(sanitise("a\\b..c").as_deref(), Some("a_b.c"));
        assert_eq!(sanitise(".hidden").as_deref(), Some("hidden"));
        assert_eq!(sanitise("x\0y\n").as_deref(), Some("x_y_"));
        assert_eq!(sanitise(&"a".repeat(500)).map(|n| n.len()), Some(200));
        for raw in ["../x", "a/../../b", "..\\..\\c", "x/./y", "...."] {
            if let Some(name) = sanitise(raw) {
                assert!(!name.contains(['/', '\\']), "{raw} -> {name}");
                assert!(!name.contains(".."), "{raw} -> {name}");
                assert!(!name.starts_with('.'), "{raw} -> {name}");
            }
        }
    }

    #[test]
    fn job_directories_stay_inside_and_are_distinct() {
        let ids = ["../up", "a", "a", "..."].map(String::from);
        let dirs = job_dirs(Path::new("out"), &ids);
        let names: Vec<_> = dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["out/_up", "out/a", "out/a-2", "out/job"]);
    }

    #[test]
    fn names_come_from_the_image_then_the_url_then_the_job_and_are_distinct() {
        let images = [
            image("http://h/x/one.png?sig=1", "a.png"),
            image("http://h/x/one.png?sig=1", ""),
            image("http://h/x/", ""),
            image("http://h/y", "a.png"),
            image("http://h/z", "a.png"),
        ];
        assert_eq!(
            file_names("m1", &images),
            ["a.png", "one.png", "m1-2", "a-2.png", "a-3.png"]
        );
    }
}
