//! Piclumen's replies as they come over the wire: private decode-only
//! structs and the decoders that turn them into domain types. Decoding is
//! tolerant (missing fields default, unknown ones are skipped) and every
//! error keeps only a short prefix of the text it could not read.

use serde::Deserialize;

use super::UpstreamError;
use crate::job::{Image, JobState, JobStatus};

/// How much of an unexpected reply body errors keep.
const BODY_PREFIX: usize = 256;

/// Decodes a create reply to its mark id.
pub fn decode_create_reply(bytes: &[u8]) -> Result<String, UpstreamError> {
    let data: Option<CreateData> = decode_envelope(bytes)?;
    data.and_then(|d| d.mark_id)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| UpstreamError::Decode {
            error: "reply has no data.markId".into(),
            body: body_prefix(bytes),
        })
}

/// One entry of a batch status reply: the job, or why its entry is unreadable.
pub type StatusEntry = Result<JobStatus, BadEntry>;

/// An entry of a batch status reply that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct BadEntry {
    /// The entry's `markId`.
    pub mark_id: String,
    /// What was wrong, with the entry's text.
    pub error: UpstreamError,
}

/// Decodes a batch status reply entry by entry: an entry that is not the
/// shape we know becomes a `BadEntry` for its `markId` (entries without one
/// are skipped), and the others still count.
pub fn decode_status_entries(bytes: &[u8]) -> Result<Vec<StatusEntry>, UpstreamError> {
    // Entries stay raw (borrowed) until each is decoded on its own.
    let entries: Vec<&serde_json::value::RawValue> = decode_envelope(bytes)?.unwrap_or_default();
    let mut out = Vec::with_capacity(entries.len());
    for raw in entries {
        match serde_json::from_str::<TaskWire>(raw.get()) {
            Ok(task) => out.push(Ok(task.into_status())),
            Err(e) => {
                let Some(mark_id) = serde_json::from_str::<IdOnly>(raw.get())
                    .ok()
                    .and_then(|i| i.mark_id)
                else {
                    tracing::warn!(entry = %body_prefix(raw.get().as_bytes()), "status entry without markId skipped");
                    continue;
                };
                out.push(Err(BadEntry {
                    mark_id,
                    error: UpstreamError::Decode {
                        error: e.to_string(),
                        body: body_prefix(raw.get().as_bytes()),
                    },
                }));
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    #[serde(rename = "markId", default)]
    mark_id: Option<String>,
}

/// Decodes `{"status", "message", "data"}`; a non-zero status is a rejection.
fn decode_envelope<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<Option<T>, UpstreamError> {
    let envelope: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| UpstreamError::Decode {
            error: e.to_string(),
            body: body_prefix(bytes),
        })?;
    if envelope.status != 0 {
        return Err(UpstreamError::Rejected {
            code: envelope.status,
            message: envelope.message,
        });
    }
    Ok(envelope.data)
}

/// The first bytes of a body as text, cut on a character boundary.
pub(super) fn body_prefix(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_PREFIX)]);
    let mut text = text.into_owned();
    if bytes.len() > BODY_PREFIX {
        text.push('…');
    }
    text
}

#[derive(Debug, Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    status: i64,
    #[serde(default)]
    message: String,
    #[serde(default = "Option::default")]
    data: Option<T>,
}

#[derive(Debug, Deserialize)]
struct CreateData {
    #[serde(rename = "markId", default)]
    mark_id: Option<String>,
}

/// One entry of the batch status reply.
#[derive(Debug, Deserialize)]
struct TaskWire {
    /// The job id.
    #[serde(rename = "markId")]
    mark_id: String,
    /// `pending`, `running`, `success`, `failed` or newer.
    #[serde(default)]
    status: String,
    /// Queue position while pending.
    #[serde(default)]
    index: Option<i64>,
    /// Prompt id, once known.
    #[serde(rename = "promptId", default)]
    prompt_id: Option<String>,
    /// Images, once done.
    #[serde(default)]
    img_urls: Option<Vec<ImageWire>>,
    // `info`, sent while pending, is not used: serde skips it unread.
}

impl TaskWire {
    fn into_status(self) -> JobStatus {
        let state = JobState::from_upstream(&self.status);
        let queue_position = if state == JobState::Pending {
            clamp_i32(self.index.unwrap_or(0))
        } else {
            0
        };
        JobStatus {
            mark_id: self.mark_id,
            state,
            queue_position,
            images: self
                .img_urls
                .unwrap_or_default()
                .into_iter()
                .map(|i| Image {
                    url: i.img_url.unwrap_or_default(),
                    name: i.img_name.unwrap_or_default(),
                    width: clamp_i32(i.real_width.unwrap_or(0)),
                    height: clamp_i32(i.real_height.unwrap_or(0)),
                    nsfw: i.sensitive.is_some_and(|s| s.eq_ignore_ascii_case("NSFW")),
                })
                .collect(),
            upstream_status: self.status,
            prompt_id: self.prompt_id.unwrap_or_default(),
            // Stamped by the hub, which knows when the reply arrived.
            observed_at: None,
        }
    }
}

fn clamp_i32(v: i64) -> i32 {
    v.clamp(i32::MIN.into(), i32::MAX.into()) as i32
}

/// One image of a finished job.
#[derive(Debug, Deserialize)]
struct ImageWire {
    /// Download URL.
    #[serde(rename = "imgUrl", default)]
    img_url: Option<String>,
    /// File name.
    #[serde(rename = "imgName", default)]
    img_name: Option<String>,
    /// Width.
    #[serde(rename = "realWidth", default)]
    real_width: Option<i64>,
    /// Height.
    #[serde(rename = "realHeight", default)]
    real_height: Option<i64>,
    /// `"NSFW"` when flagged.
    #[serde(default)]
    sensitive: Option<String>,
}
