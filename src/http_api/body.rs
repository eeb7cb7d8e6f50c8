//! The first version's `/generate-image` body: Piclumen's create payload
//! with its web field names, every field optional, decoded leniently
//! (`lax`) and turned into the domain create request the core takes.

use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::lax::{
    Fields, ValidationDetail, boolean, integer, json_error_offset, number, object, string,
};
use crate::{
    error::Error,
    upstream::{CreateRequest, Resolution},
};

/// The first version's body: Piclumen's create payload with its web field
/// names, every field optional. `null` means unset.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
#[schema(example = json!({
    "prompt": "a magical landscape", "highPixels": false,
    "model_id": "23887bba-507e-4249-a0e3-6951e4027f2b", "negative_prompt": "",
    "resolution": {"width": 1344, "height": 768, "batch_size": 1},
    "model_ability": {}, "seed": 9896923949_i64, "steps": 6, "cfg": 1,
    "sampler_name": "euler", "scheduler": "normal", "ponyTags": {},
    "denoise": 1, "hires_fix_denoise": 0.5, "hires_scale": 2,
    "multi_img2img_info": {"style_list": []}, "img_control_info": {"style_list": []},
    "continueCreate": false
}))]
pub struct GenerateImageBody {
    /// The text to draw. Required by the service (400 when empty).
    pub prompt: Option<String>,
    /// What to keep out of the picture. Default: empty.
    pub negative_prompt: Option<String>,
    /// Piclumen model id. Default: `23887bba-507e-4249-a0e3-6951e4027f2b`.
    pub model_id: Option<String>,
    /// Size and number of images.
    pub resolution: Option<ResolutionBody>,
    /// Sampling seed, 0 or more. Default: a fresh random seed.
    pub seed: Option<i64>,
    /// Sampling steps, 1 to 100. Default: 6.
    pub steps: Option<i64>,
    /// Guidance scale, 0 to 100, may be fractional. Default: 1.
    pub cfg: Option<f64>,
    /// Sampler. Default: `euler`.
    pub sampler_name: Option<String>,
    /// Scheduler. Default: `normal`.
    pub scheduler: Option<String>,
    /// Denoising strength, 0 to 1. Default: 1.
    pub denoise: Option<f64>,
    /// High-resolution fix denoise, 0 to 1. Default: 0.5.
    pub hires_fix_denoise: Option<f64>,
    /// High-resolution fix scale, 1 to 8. Default: 2.
    pub hires_scale: Option<f64>,
    /// Piclumen's `highPixels` switch. Default: false.
    #[serde(rename = "highPixels")]
    pub high_pixels: Option<bool>,
    /// Free-form model capabilities, passed through. Default: `{}`.
    #[schema(value_type = Option<Object>)]
    pub model_ability: Option<Map<String, Value>>,
    /// Free-form Pony model tags, passed through. Default: `{}`.
    #[serde(rename = "ponyTags")]
    #[schema(value_type = Option<Object>)]
    pub pony_tags: Option<Map<String, Value>>,
    /// Reference images for image-to-image. Default: none.
    pub multi_img2img_info: Option<StyleInfoBody>,
    /// Reference images for image control. Default: none.
    pub img_control_info: Option<StyleInfoBody>,
    /// Piclumen's `continueCreate` switch. Default: false.
    #[serde(rename = "continueCreate")]
    pub continue_create: Option<bool>,
}

/// `resolution`: a field left out (or 0) takes its default.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
pub struct ResolutionBody {
    /// Width in pixels, within the server's bounds (64 to 4096 by default). Default: 1344.
    pub width: Option<i64>,
    /// Height in pixels, within the server's bounds. Default: 768.
    pub height: Option<i64>,
    /// Number of images, 1 to 4. Default: 1.
    pub batch_size: Option<i64>,
}

/// `{"style_list": [...]}`: reference images passed through as objects.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
pub struct StyleInfoBody {
    /// Entries such as `{"img_url": "https://...", "style": "characterRefer", "weight": 0.9}`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub style_list: Option<Vec<Map<String, Value>>>,
}

impl GenerateImageBody {
    /// Decodes a body as FastAPI with pydantic's lax mode did: numbers may be
    /// numeric strings, integers may be whole floats, booleans may be `0`/`1`
    /// or `"true"`/`"false"`; unknown fields are ignored. Every problem is
    /// reported, each with its location.
    pub fn parse(bytes: &[u8]) -> Result<Self, Vec<ValidationDetail>> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(vec![ValidationDetail::missing(vec!["body".into()])]);
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            vec![ValidationDetail {
                kind: "json_invalid",
                loc: vec!["body".into(), json_error_offset(bytes, &e).into()],
                msg: "JSON decode error".into(),
                input: json!({}),
                ctx: Some(json!({ "error": e.to_string() })),
            }]
        })?;
        let mut errors = Vec::new();
        let body = Fields::new(&value, vec!["body".into()], &mut errors).map(|mut f| Self {
            prompt: f.get("prompt", string),
            negative_prompt: f.get("negative_prompt", string),
            model_id: f.get("model_id", string),
            resolution: f.nested("resolution", |mut r| ResolutionBody {
                width: r.get("width", integer),
                height: r.get("height", integer),
                batch_size: r.get("batch_size", integer),
            }),
            seed: f.get("seed", integer),
            steps: f.get("steps", integer),
            cfg: f.get("cfg", number),
            sampler_name: f.get("sampler_name", string),
            scheduler: f.get("scheduler", string),
            denoise: f.get("denoise", number),
            hires_fix_denoise: f.get("hires_fix_denoise", number),
            hires_scale: f.get("hires_scale", number),
            high_pixels: f.get("highPixels", boolean),
            model_ability: f.get("model_ability", object),
            pony_tags: f.get("ponyTags", object),
            multi_img2img_info: f.nested("multi_img2img_info", style_info),
            img_control_info: f.nested("img_control_info", style_info),
            continue_create: f.get("continueCreate", boolean),
        });
        match body {
            Some(body) if errors.is_empty() => Ok(body),
            _ => Err(errors),
        }
    }

    /// The domain create request; unset fields stay unset, so the core
    /// fills the same defaults as for gRPC callers.
    pub fn into_request(self) -> Result<CreateRequest, Error> {
        let resolution = self.resolution.unwrap_or_default();
        let styles =
            |info: Option<StyleInfoBody>| info.and_then(|info| info.style_list).unwrap_or_default();
        Ok(CreateRequest {
            resolution: Resolution {
                width: int32("resolution.width", resolution.width)?.unwrap_or(0),
                height: int32("resolution.height", resolution.height)?.unwrap_or(0),
                batch_size: int32("resolution.batch_size", resolution.batch_size)?.unwrap_or(0),
            },
            steps: int32("steps", self.steps)?,
            prompt: self.prompt.unwrap_or_default(),
            negative_prompt: self.negative_prompt.unwrap_or_default(),
            model_id: self.model_id.unwrap_or_default(),
            seed: self.seed,
            cfg: self.cfg,
            sampler_name: self.sampler_name.unwrap_or_default(),
            scheduler: self.scheduler.unwrap_or_default(),
            denoise: self.denoise,
            hires_fix_denoise: self.hires_fix_denoise,
            hires_scale: self.hires_scale,
            high_pixels: self.high_pixels,
            model_ability: self.model_ability.unwrap_or_default(),
            pony_tags: self.pony_tags.unwrap_or_default(),
            multi_img2img_info: styles(self.multi_img2img_info),
            img_control_info: styles(self.img_control_info),
            continue_create: self.continue_create,
            // The key comes from the `Idempotency-Key` header, not the body.
            ..Default::default()
        })
    }
}

fn int32(field: &'static str, value: Option<i64>) -> Result<Option<i32>, Error> {
    value
        .map(|v| {
            i32::try_from(v).map_err(|_| Error::InvalidArgument {
                field,
                message: format!("out of range (got {v})"),
            })
        })
        .transpose()
}

fn style_info(mut fields: Fields<'_, '_>) -> StyleInfoBody {
    StyleInfoBody {
        style_list: fields.list("style_list", object),
    }
}
