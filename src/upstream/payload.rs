//! The create body the service sends, with the web app's field names, and
//! its parts. Whole numbers go out as integers, as the web app sends them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
