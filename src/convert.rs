//! The gRPC edge's conversions: proto messages to and from domain types (a
//! GenerateImage message to the [`CreateRequest`] the core takes, a
//! CheckImage `wait` to a `Duration`, a job to the proto `ImageJob`), and
//! `google.protobuf.Struct` to and from JSON.
//! Checks and defaults are the domain's (`upstream::CreateRequest`).

use prost_types::{Struct, value::Kind};
use serde_json::{Map, Number, Value};

use crate::{
    error::Error,
    job::{self, JobState, JobStatus},
    pb,
    upstream::{CreatePayload, CreateRequest, JsonObject, Limits, Resolution},
};

/// The domain create request of a GenerateImage message. Fails only on a
/// `Struct` holding a number JSON cannot carry (NaN, infinity); every other
/// check is the core's, after it admits the caller.
pub fn create_request(req: pb::GenerateImageRequest) -> Result<CreateRequest, Error> {
    let resolution = req.resolution.unwrap_or_default();
    Ok(CreateRequest {
        model_ability: object_or_empty("model_ability", req.model_ability.as_ref())?,
        pony_tags: object_or_empty("pony_tags", req.pony_tags.as_ref())?,
        multi_img2img_info: styles("multi_img2img_info", req.multi_img2img_info.as_ref())?,
        img_control_info: styles("img_control_info", req.img_control_info.as_ref())?,
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        model_id: req.model_id,
        resolution: Resolution {
            width: resolution.width,
            height: resolution.height,
            batch_size: resolution.batch_size,
        },
        seed: req.seed,
        steps: req.steps,
        cfg: req.cfg,
        sampler_name: req.sampler_name,
        scheduler: req.scheduler,
        denoise: req.denoise,
        hires_fix_denoise: req.hires_fix_denoise,
        hires_scale: req.hires_scale,
        high_pixels: req.high_pixels,
        continue_create: req.continue_create,
        request_id: req.request_id,
    })
}

/// A GenerateImage message all the way to Piclumen's create body, as the
/// service sends it (for tests and fuzzing of the whole mapping).
pub fn create_payload(
    req: &pb::GenerateImageRequest,
    limits: &Limits,
) -> Result<CreatePayload, Error> {
    Ok(create_request(req.clone())?.into_payload(limits)?)
}

fn object_or_empty(field: &'static str, value: Option<&Struct>) -> Result<JsonObject, Error> {
    value.map_or_else(|| Ok(JsonObject::new()), |s| struct_to_json(field, s))
}

fn styles(field: &'static str, value: Option<&pb::StyleInfo>) -> Result<Vec<JsonObject>, Error> {
    value.map_or_else(
        || Ok(Vec::new()),
        |info| {
            info.style_list
                .iter()
                .map(|s| struct_to_json(field, s))
                .collect()
        },
    )
}

fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        message: message.into(),
    }
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

/// CheckImage's `wait`: `None` when unset; INVALID_ARGUMENT for a
/// negative or malformed Duration.
pub fn check_wait(
    wait: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Error> {
    let Some(wait) = wait else {
        return Ok(None);
    };
    let invalid = |message: &str| Error::InvalidArgument {
        field: "wait",
        message: message.into(),
    };
    if !(0..1_000_000_000).contains(&wait.nanos) {
        return Err(invalid(
            "nanos must be from 0 to 999,999,999 (a Duration's rules for a positive one)",
        ));
    }
    std::time::Duration::try_from(wait)
        .map(Some)
        .map_err(|_| invalid("must not be negative"))
}

/// A domain job as the proto `ImageJob` (taken by value: its strings move).
pub fn into_proto_job(status: JobStatus) -> pb::ImageJob {
    let etag = status.etag().to_string();
    pb::ImageJob {
        mark_id: status.mark_id,
        state: to_proto_state(status.state) as i32,
        queue_position: status.queue_position,
        images: status.images.into_iter().map(into_proto_image).collect(),
        upstream_status: status.upstream_status,
        prompt_id: status.prompt_id,
        observed_at: status.observed_at.map(prost_types::Timestamp::from),
        etag,
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
