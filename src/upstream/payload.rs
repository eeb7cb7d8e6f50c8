//! A create, from what a caller asks to what Piclumen gets: the
//! [`CreateRequest`] every edge (gRPC, the first version's HTTP API) turns
//! its message into, unset fields left unset; its checks against the
//! server's [`Limits`] and Piclumen's web defaults ([`defaults`]); and the
//! [`CreatePayload`] sent, with the web app's field names (whole numbers go
//! out as integers, as the web app sends them). A new create field is a
//! field of both structs and a line of [`CreateRequest::into_payload`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object, as free-form create fields carry it.
pub type JsonObject = Map<String, Value>;

// === the request ===

/// A create as the caller asked for it, whatever the transport: strings
/// empty, numbers 0 and options `None` when unset, each then taking
/// Piclumen's default. Serialized (without `request_id`) only to
/// fingerprint it: a `request_id` is bound to these values.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CreateRequest {
    /// The text to draw; required.
    pub prompt: String,
    /// What to keep out of the picture.
    pub negative_prompt: String,
    /// Piclumen model id.
    pub model_id: String,
    /// Size and number of images (0: the default).
    pub resolution: Resolution,
    /// Sampling seed; a fresh random one when unset.
    pub seed: Option<i64>,
    /// Sampling steps.
    pub steps: Option<i32>,
    /// Guidance scale.
    pub cfg: Option<f64>,
    /// Sampler.
    pub sampler_name: String,
    /// Scheduler.
    pub scheduler: String,
    /// Denoising strength.
    pub denoise: Option<f64>,
    /// High-resolution fix denoise.
    pub hires_fix_denoise: Option<f64>,
    /// High-resolution fix scale.
    pub hires_scale: Option<f64>,
    /// Piclumen's `highPixels`.
    pub high_pixels: Option<bool>,
    /// Free-form model capabilities, passed through.
    pub model_ability: JsonObject,
    /// Free-form Pony tags, passed through.
    pub pony_tags: JsonObject,
    /// Image-to-image reference styles.
    pub multi_img2img_info: Vec<JsonObject>,
    /// Image-control reference styles.
    pub img_control_info: Vec<JsonObject>,
    /// Piclumen's `continueCreate`.
    pub continue_create: Option<bool>,
    /// The caller's idempotency key (empty: none); not a parameter.
    #[serde(skip)]
    pub request_id: String,
}

/// Width, height and number of images; 0 takes the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Resolution {
    /// Width in pixels.
    pub width: i32,
    /// Height in pixels.
    pub height: i32,
    /// Images per generation.
    pub batch_size: i32,
}

/// A request field out of range, named as the proto names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

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
    #[arg(long, env = "PICLUMEN_MIN_DIMENSION", default_value = "64", value_parser = crate::flags::positive::<i32>)]
    pub min_dimension: i32,
    /// Largest accepted width or height, in pixels (at least --min-dimension).
    #[arg(long, env = "PICLUMEN_MAX_DIMENSION", default_value = "4096", value_parser = crate::flags::positive::<i32>)]
    pub max_dimension: i32,
    /// Longest accepted prompt, in characters.
    #[arg(long, env = "PICLUMEN_MAX_PROMPT_CHARS", default_value = "4000", value_parser = crate::flags::positive::<usize>)]
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        crate::flags::no_flags()
    }
}

/// Longest `request_id`.
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Longest model id, sampler or scheduler name.
pub const MAX_NAME_CHARS: usize = 200;
/// Largest seed a fresh random one is drawn below (Piclumen's seeds have ten
/// digits).
const RANDOM_SEED_BOUND: i64 = 10_000_000_000;

impl CreateRequest {
    /// Checks every field against `limits` and builds Piclumen's create
    /// body, filling defaults; an unset seed becomes a fresh random one.
    pub fn into_payload(self, limits: &Limits) -> Result<CreatePayload, InvalidField> {
        self.check_texts(limits)?;
        let model_id = name_or("model_id", self.model_id, defaults::MODEL_ID)?;
        let sampler_name = name_or("sampler_name", self.sampler_name, defaults::SAMPLER)?;
        let scheduler = name_or("scheduler", self.scheduler, defaults::SCHEDULER)?;
        let resolution = self.resolution.checked(limits)?;
        let seed = match self.seed {
            Some(seed) if seed < 0 => {
                return Err(invalid(
                    "seed",
                    format!("must not be negative (got {seed})"),
                ));
            }
            Some(seed) => seed,
            None => rand::random_range(1..RANDOM_SEED_BOUND),
        };
        let steps = match self.steps {
            None => defaults::STEPS,
            Some(n @ 1..=100) => n,
            Some(n) => return Err(invalid("steps", format!("must be 1 to 100 (got {n})"))),
        };
        Ok(CreatePayload {
            model_id,
            sampler_name,
            scheduler,
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            resolution,
            seed,
            steps: steps.into(),
            cfg: float("cfg", self.cfg, defaults::CFG, 0.0, 100.0)?,
            denoise: float("denoise", self.denoise, defaults::DENOISE, 0.0, 1.0)?,
            hires_fix_denoise: float(
                "hires_fix_denoise",
                self.hires_fix_denoise,
                defaults::HIRES_FIX_DENOISE,
                0.0,
                1.0,
            )?,
            hires_scale: float(
                "hires_scale",
                self.hires_scale,
                defaults::HIRES_SCALE,
                1.0,
                8.0,
            )?,
            high_pixels: self.high_pixels.unwrap_or(false),
            model_ability: self.model_ability,
            pony_tags: self.pony_tags,
            multi_img2img_info: StyleListWire {
                style_list: self.multi_img2img_info,
            },
            img_control_info: StyleListWire {
                style_list: self.img_control_info,
            },
            continue_create: self.continue_create.unwrap_or(false),
        })
    }

    /// The prompt is required; texts are bounded.
    fn check_texts(&self, limits: &Limits) -> Result<(), InvalidField> {
        if self.prompt.trim().is_empty() {
            return Err(invalid("prompt", "must not be empty"));
        }
        check_len("prompt", &self.prompt, limits.max_prompt_chars)?;
        check_len(
            "negative_prompt",
            &self.negative_prompt,
            limits.max_prompt_chars,
        )?;
        check_len("request_id", &self.request_id, MAX_REQUEST_ID_CHARS)
    }

    /// The parameters (not `request_id`) as stable bytes to fingerprint:
    /// fields in declaration order, JSON objects with sorted keys.
    pub fn fingerprint_bytes(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and JSON maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Resolution {
    fn checked(self, limits: &Limits) -> Result<ResolutionWire, InvalidField> {
        let width = dimension("resolution.width", self.width, defaults::WIDTH, limits)?;
        let height = dimension("resolution.height", self.height, defaults::HEIGHT, limits)?;
        let batch_size = match self.batch_size {
            0 => defaults::BATCH_SIZE,
            n @ 1..=4 => n,
            n => {
                return Err(invalid(
                    "resolution.batch_size",
                    format!("must be 1 to 4 (got {n})"),
                ));
            }
        };
        Ok(ResolutionWire {
            width: width.into(),
            height: height.into(),
            batch_size: batch_size.into(),
        })
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        message: message.into(),
    }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), InvalidField> {
    let chars = value.chars().count();
    if chars > max {
        return Err(invalid(
            field,
            format!("{chars} characters, the limit is {max}"),
        ));
    }
    Ok(())
}

fn name_or(field: &'static str, value: String, default: &str) -> Result<String, InvalidField> {
    check_len(field, &value, MAX_NAME_CHARS)?;
    Ok(if value.is_empty() {
        default.to_owned()
    } else {
        value
    })
}

fn dimension(
    field: &'static str,
    value: i32,
    default: i32,
    limits: &Limits,
) -> Result<i32, InvalidField> {
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
) -> Result<f64, InvalidField> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(invalid(field, format!("must be {min} to {max} (got {v})"))),
    }
}

// === the body sent ===

/// The create body, with the web app's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatePayload {
    /// Prompt text.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Model id.
    pub model_id: String,
    /// Size and count.
    pub resolution: ResolutionWire,
    /// Seed.
    pub seed: i64,
    /// Steps.
    pub steps: i64,
    /// Guidance scale.
    #[serde(serialize_with = "whole_as_integer")]
    pub cfg: f64,
    /// Sampler.
    pub sampler_name: String,
    /// Scheduler.
    pub scheduler: String,
    /// Denoise.
    #[serde(serialize_with = "whole_as_integer")]
    pub denoise: f64,
    /// High-resolution fix denoise.
    #[serde(serialize_with = "whole_as_integer")]
    pub hires_fix_denoise: f64,
    /// High-resolution scale.
    #[serde(serialize_with = "whole_as_integer")]
    pub hires_scale: f64,
    /// `highPixels`.
    #[serde(rename = "highPixels")]
    pub high_pixels: bool,
    /// Free-form model abilities.
    pub model_ability: Map<String, Value>,
    /// `ponyTags`.
    #[serde(rename = "ponyTags")]
    pub pony_tags: Map<String, Value>,
    /// Image-to-image styles.
    pub multi_img2img_info: StyleListWire,
    /// Image-control styles.
    pub img_control_info: StyleListWire,
    /// `continueCreate`.
    #[serde(rename = "continueCreate")]
    pub continue_create: bool,
}

/// `resolution` of the create body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolutionWire {
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Number of images.
    pub batch_size: i64,
}

/// `{"style_list": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StyleListWire {
    /// Style objects.
    #[serde(default)]
    pub style_list: Vec<Map<String, Value>>,
}

/// The web app sends `"cfg": 1`, not `1.0`; whole numbers go out as integers
/// so our payload matches it byte for byte.
fn whole_as_integer<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateRequest {
        CreateRequest {
            prompt: "a lighthouse".into(),
            ..Default::default()
        }
    }

    #[test]
    fn unset_fields_take_piclumens_defaults() {
        let payload = CreateRequest {
            seed: Some(7),
            ..request()
        }
        .into_payload(&Limits::default())
        .expect("valid");
        assert_eq!(payload.model_id, defaults::MODEL_ID);
        assert_eq!(
            (payload.resolution.width, payload.resolution.height),
            (defaults::WIDTH.into(), defaults::HEIGHT.into())
        );
        assert_eq!(payload.resolution.batch_size, 1);
        assert_eq!((payload.seed, payload.steps), (7, 6));
        assert_eq!(payload.cfg, defaults::CFG);
        assert!(payload.multi_img2img_info.style_list.is_empty());
    }

    #[test]
    fn the_first_bad_field_is_named() {
        let bad = CreateRequest {
            steps: Some(0),
            resolution: Resolution {
                width: 10,
                ..Default::default()
            },
            ..request()
        };
        let error = bad.into_payload(&Limits::default()).expect_err("invalid");
        assert_eq!(error.field, "resolution.width");
        let error = CreateRequest::default()
            .into_payload(&Limits::default())
            .expect_err("no prompt");
        assert_eq!(error.to_string(), "prompt: must not be empty");
    }

    #[test]
    fn the_fingerprint_binds_the_parameters_not_the_key() {
        let keyed = CreateRequest {
            request_id: "k".into(),
            ..request()
        };
        assert_eq!(keyed.fingerprint_bytes(), request().fingerprint_bytes());
        let other = CreateRequest {
            steps: Some(6),
            ..request()
        };
        assert_ne!(other.fingerprint_bytes(), request().fingerprint_bytes());
        let mut ability = JsonObject::new();
        ability.insert("b".into(), 1.into());
        ability.insert("a".into(), 2.into());
        let with = |model_ability| CreateRequest {
            model_ability,
            ..request()
        };
        // Keys sorted: the same object hashes the same whatever its order.
        let reversed: JsonObject = ability.clone().into_iter().rev().collect();
        assert_eq!(
            with(ability).fingerprint_bytes(),
            with(reversed).fingerprint_bytes()
        );
    }
}
