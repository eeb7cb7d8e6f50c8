//! Properties of the request mapping: any valid GenerateImage request becomes
//! upstream JSON that decodes back to the same values (unicode prompts,
//! extreme numbers, nested Structs).

use piclumen_grpc::{
    convert::{self, json_to_struct},
    pb,
    upstream::CreatePayload,
    upstream::Limits,
};
use proptest::prelude::*;
use prost_types::{ListValue, Struct, Value, value::Kind};

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Kind::NumberValue),
        (-1e15f64..1e15).prop_map(|f| Kind::NumberValue(f.trunc())),
        "\\PC{0,20}".prop_map(Kind::StringValue),
    ]
    .prop_map(|kind| Value { kind: Some(kind) });
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|values| Kind::ListValue(ListValue { values })),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|fields| Kind::StructValue(Struct { fields })),
        ]
        .prop_map(|kind| Value { kind: Some(kind) })
    })
}

fn structure() -> impl Strategy<Value = Struct> {
    prop::collection::btree_map("\\PC{0,8}", value(), 0..4).prop_map(|fields| Struct { fields })
}

fn dimension() -> impl Strategy<Value = i32> {
    prop_oneof![Just(0), 64..=4096]
}

prop_compose! {
    fn request()(
        prompt in "\\PC{0,300}[^\\s]\\PC{0,50}",
        negative_prompt in "\\PC{0,100}",
        model_id in "[a-z0-9-]{0,40}",
        width in dimension(),
        height in dimension(),
        batch_size in 0..=4,
        seed in prop::option::of(0..=i64::MAX),
        steps in prop::option::of(1..=100),
        cfg in prop::option::of(0.0..=100.0),
        denoise in prop::option::of(0.0..=1.0),
        hires_fix_denoise in prop::option::of(0.0..=1.0),
        hires_scale in prop::option::of(1.0..=8.0),
        high_pixels in prop::option::of(any::<bool>()),
        model_ability in prop::option::of(structure()),
        pony_tags in prop::option::of(structure()),
        styles in prop::collection::vec(structure(), 0..3),
        continue_create in prop::option::of(any::<bool>()),
    ) -> pb::GenerateImageRequest {
        pb::GenerateImageRequest {
            prompt, negative_prompt, model_id,
            resolution: Some(pb::Resolution { width, height, batch_size }),
            seed, steps, cfg, sampler_name: String::new(), scheduler: "karras".into(),
            denoise, hires_fix_denoise, hires_scale, high_pixels, model_ability, pony_tags,
            multi_img2img_info: Some(pb::StyleInfo { style_list: styles }),
            img_control_info: None, continue_create,
            ..Default::default()
        }
    }
}

proptest! {
    #[test]
    fn valid_requests_round_trip_through_upstream_json(req in request()) {
        let payload = convert::create_payload(&req, &Limits::default()).expect("valid request");
        let json = serde_json::to_string(&payload).expect("encode");
        let back: CreatePayload = serde_json::from_str(&json).expect("decode");
        prop_assert_eq!(&back, &payload);

        prop_assert_eq!(&back.prompt, &req.prompt);
        prop_assert_eq!(&back.negative_prompt, &req.negative_prompt);
        let res = req.resolution.unwrap_or_default();
        prop_assert_eq!(back.resolution.width, i64::from(if res.width == 0 { 1344 } else { res.width }));
        prop_assert_eq!(back.resolution.height, i64::from(if res.height == 0 { 768 } else { res.height }));
        prop_assert_eq!(back.resolution.batch_size, i64::from(res.batch_size.max(1)));
        if let Some(seed) = req.seed {
            prop_assert_eq!(back.seed, seed);
        }
        prop_assert_eq!(back.cfg, req.cfg.unwrap_or(1.0));
        prop_assert_eq!(back.denoise, req.denoise.unwrap_or(1.0));
        prop_assert_eq!(back.hires_fix_denoise, req.hires_fix_denoise.unwrap_or(0.5));
        prop_assert_eq!(back.hires_scale, req.hires_scale.unwrap_or(2.0));
        prop_assert_eq!(back.scheduler.as_str(), "karras");
        prop_assert_eq!(back.sampler_name.as_str(), "euler");
        prop_assert_eq!(json_to_struct(&back.model_ability), req.model_ability.clone().unwrap_or_default());
        prop_assert_eq!(json_to_struct(&back.pony_tags), req.pony_tags.clone().unwrap_or_default());
        let styles: Vec<Struct> = back.multi_img2img_info.style_list.iter().map(json_to_struct).collect();
        prop_assert_eq!(&styles, &req.multi_img2img_info.as_ref().expect("styles").style_list);
    }

    #[test]
    fn invalid_sizes_are_always_refused(width in prop_oneof![i32::MIN..0, 1..64, 4097..=i32::MAX]) {
        let req = pb::GenerateImageRequest {
            prompt: "p".into(),
            resolution: Some(pb::Resolution { width, height: 0, batch_size: 0 }),
            ..Default::default()
        };
        let error = convert::create_payload(&req, &Limits::default()).expect_err("out of range");
        prop_assert!(error.to_string().starts_with("resolution.width"));
    }
}
