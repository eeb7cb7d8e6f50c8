//! Free functions between proto messages, domain types and the upstream wire
//! structs: request validation with Piclumen's defaults, and job mapping.

use prost_types::{Struct, value::Kind};
use serde_json::{Map, Number, Value};

use crate::{
    error::Error,
    job::{self, JobState, JobStatus},
    pb,
    upstream::{CreatePayload, ResolutionWire, StyleListWire},
};

/// Piclumen web app defaults, as the first service built on it sent them.
pub mod defaults {
    /// Model id.
    pub const MODEL_ID: &str = "23887bba-507e-4249-a0e3-6951e4027f2b";
    /// Width in pixels.
    pub const WIDTH: i32 = 1344;
    /// Height in pixels.
    pub const HEIGHT: i32 = 768;
    /// Images per generation.
    pub const BATCH_SIZE: i32 = 1;
    /// Sampling steps.
    pub const STEPS: i32 = 6;
    /// Guidance scale.
    pub const CFG: f64 = 1.0;
    /// Sampler.
    pub const SAMPLER: &str = "euler";
    /// Scheduler.
    pub const SCHEDULER: &str = "normal";
    /// Denoise.
    pub const DENOISE: f64 = 1.0;
    /// High-resolution fix denoise.
    pub const HIRES_FIX_DENOISE: f64 = 0.5;
    /// High-resolution scale.
    pub const HIRES_SCALE: f64 = 2.0;
}

/// Request bounds: `serve` flags, declared here (`config` checks that
/// --min-dimension does not exceed --max-dimension).
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Smallest accepted width or height, in pixels.
    #[arg(long, env = "PICLUMEN_MIN_DIMENSION", default_value = "64", value_parser = crate::config::parse::positive::<i32>)]
    pub min_dimension: i32,
    /// Largest accepted width or height, in pixels (at least --min-dimension).
    #[arg(long, env = "PICLUMEN_MAX_DIMENSION", default_value = "4096", value_parser = crate::config::parse::positive::<i32>)]
    pub max_dimension: i32,
    /// Longest accepted prompt, in characters.
    #[arg(long, env = "PICLUMEN_MAX_PROMPT_CHARS", default_value = "4000", value_parser = crate::config::parse::positive::<usize>)]
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        crate::config::parse::no_flags()
    }
}

/// Longest `request_id`.
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Longest model id, sampler or scheduler name.
const MAX_NAME_CHARS: usize = 200;
/// Largest seed a fresh random one is drawn below (Piclumen's seeds have ten
/// digits).
const RANDOM_SEED_BOUND: i64 = 10_000_000_000;

fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// Validates a GenerateImage request and builds Piclumen's create body,
/// filling defaults; an unset seed becomes a fresh random one.
pub fn create_payload(
    req: &pb::GenerateImageRequest,
    limits: &Limits,
) -> Result<CreatePayload, Error> {
    if req.prompt.trim().is_empty() {
        return Err(invalid("prompt", "must not be empty"));
    }
    check_len("prompt", &req.prompt, limits.max_prompt_chars)?;
    check_len(
        "negative_prompt",
        &req.negative_prompt,
        limits.max_prompt_chars,
    )?;
    check_len("request_id", &req.request_id, MAX_REQUEST_ID_CHARS)?;
    let model_id = name_or("model_id", &req.model_id, defaults::MODEL_ID)?;
    let sampler_name = name_or("sampler_name", &req.sampler_name, defaults::SAMPLER)?;
    let scheduler = name_or("scheduler", &req.scheduler, defaults::SCHEDULER)?;

    let res = req.resolution.unwrap_or_default();
    let width = dimension("resolution.width", res.width, defaults::WIDTH, limits)?;
    let height = dimension("resolution.height", res.height, defaults::HEIGHT, limits)?;
    let batch_size = match res.batch_size {
        0 => defaults::BATCH_SIZE,
        n @ 1..=4 => n,
        n => {
            return Err(invalid(
                "resolution.batch_size",
                format!("must be 1 to 4 (got {n})"),
            ));
        }
    };
    let seed = match req.seed {
        Some(seed) if seed < 0 => {
            return Err(invalid(
                "seed",
                format!("must not be negative (got {seed})"),
            ));
        }
        Some(seed) => seed,
        None => rand::random_range(1..RANDOM_SEED_BOUND),
    };
    let steps = match req.steps {
        None => defaults::STEPS,
        Some(n @ 1..=100) => n,
        Some(n) => return Err(invalid("steps", format!("must be 1 to 100 (got {n})"))),
    };
    Ok(CreatePayload {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        model_id,
        resolution: ResolutionWire {
            width: width.into(),
            height: height.into(),
            batch_size: batch_size.into(),
        },
        seed,
        steps: steps.into(),
        cfg: float("cfg", req.cfg, defaults::CFG, 0.0, 100.0)?,
        sampler_name,
        scheduler,
        denoise: float("denoise", req.denoise, defaults::DENOISE, 0.0, 1.0)?,
        hires_fix_denoise: float(
            "hires_fix_denoise",
            req.hires_fix_denoise,
            defaults::HIRES_FIX_DENOISE,
            0.0,
            1.0,
        )?,
        hires_scale: float(
            "hires_scale",
            req.hires_scale,
            defaults::HIRES_SCALE,
            1.0,
            8.0,
        )?,
        high_pixels: req.high_pixels.unwrap_or(false),
        model_ability: struct_or_empty("model_ability", req.model_ability.as_ref())?,
        pony_tags: struct_or_empty("pony_tags", req.pony_tags.as_ref())?,
        multi_img2img_info: styles("multi_img2img_info", req.multi_img2img_info.as_ref())?,
        img_control_info: styles("img_control_info", req.img_control_info.as_ref())?,
        continue_create: req.continue_create.unwrap_or(false),
    })
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    let chars = value.chars().count();
    if chars > max {
        return Err(invalid(
            field,
            format!("{chars} characters, the limit is {max}"),
        ));
    }
    Ok(())
}

fn name_or(field: &'static str, value: &str, default: &str) -> Result<String, Error> {
    check_len(field, value, MAX_NAME_CHARS)?;
    Ok(if value.is_empty() { default } else { value }.to_owned())
}

fn dimension(field: &'static str, value: i32, default: i32, limits: &Limits) -> Result<i32, Error> {
    match value {
        0 => Ok(default),
        v if (limits.min_dimension..=limits.max_dimension).contains(&v) => Ok(v),
        v => Err(invalid(
            field,
            format!(
                "must be {} to {} pixels, or 0 for the default (got {v})",
                limits.min_dimension, limits.max_dimension
            ),
        )),
    }
}

fn float(
    field: &'static str,
    value: Option<f64>,
    default: f64,
    min: f64,
    max: f64,
) -> Result<f64, Error> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(invalid(field, format!("must be {min} to {max} (got {v})"))),
    }
}

fn struct_or_empty(
    field: &'static str,
    value: Option<&Struct>,
) -> Result<Map<String, Value>, Error> {
    value.map_or_else(|| Ok(Map::new()), |s| struct_to_json(field, s))
}

fn styles(field: &'static str, value: Option<&pb::StyleInfo>) -> Result<StyleListWire, Error> {
    let style_list = value
        .map(|info| {
            info.style_list
                .iter()
                .map(|s| struct_to_json(field, s))
                .collect()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(StyleListWire { style_list })
}

/// A `google.protobuf.Struct` as a JSON object.
pub fn struct_to_json(field: &'static str, s: &Struct) -> Result<Map<String, Value>, Error> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), value_to_json(field, v)?)))
        .collect()
}

fn value_to_json(field: &'static str, v: &prost_types::Value) -> Result<Value, Error> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => Value::Number(
            json_number(*n)
                .ok_or_else(|| invalid(field, format!("numbers must be finite (got {n})")))?,
        ),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(field, s)?),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .iter()
                .map(|v| value_to_json(field, v))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Whole numbers as JSON integers (as a browser would send them).
fn json_number(n: f64) -> Option<Number> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() < EXACT {
        Some(Number::from(n as i64))
    } else {
        Number::from_f64(n)
    }
}

/// A JSON object as a `google.protobuf.Struct`.
pub fn json_to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A domain job as the proto `ImageJob` (taken by value: its strings move).
pub fn into_proto_job(status: JobStatus) -> pb::ImageJob {
    pb::ImageJob {
        mark_id: status.mark_id,
        state: to_proto_state(status.state) as i32,
        queue_position: status.queue_position,
        images: status.images.into_iter().map(into_proto_image).collect(),
        upstream_status: status.upstream_status,
        prompt_id: status.prompt_id,
    }
}

fn to_proto_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Unknown => pb::JobState::Unspecified,
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
    }
}

fn into_proto_image(image: job::Image) -> pb::Image {
    pb::Image {
        url: image.url,
        name: image.name,
        width: image.width,
        height: image.height,
        nsfw: image.nsfw,
    }
}

/// Validates a mark id from a request.
pub fn mark_id(value: &str) -> Result<String, Error> {
    let id = value.trim();
    if id.is_empty() {
        return Err(invalid("mark_id", "must not be empty"));
    }
    if id.len() > MAX_NAME_CHARS {
        return Err(invalid(
            "mark_id",
            format!("longer than {MAX_NAME_CHARS} bytes"),
        ));
    }
    if id.chars().any(char::is_control) {
        // Echoed as sent: the caller sees exactly which id was refused.
        return Err(invalid(
            "mark_id",
            format!("contains control characters: {id}"),
        ));
    }
    Ok(id.to_owned())
}
