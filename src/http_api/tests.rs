//! The HTTP API's own pieces without a socket: the lenient body decoder
//! and the error-class-to-HTTP table (tests/http_api.rs covers the endpoints).

use serde_json::{Value, json};

use utoipa::OpenApi;

use super::{ApiDoc, GenerateImageBody, http_status};
use crate::{
    error::{Error, ErrorClass},
    upstream::{CreateRequest, Resolution},
};

#[test]
fn the_first_versions_example_maps_to_its_values() {
    // The example the OpenAPI document shows is the first version's own.
    let doc = serde_json::to_value(ApiDoc::openapi()).expect("document");
    let example = &doc["components"]["schemas"]["GenerateImageBody"]["example"];
    assert!(example.is_object(), "{example}");
    let body = serde_json::to_vec(example).expect("example");
    let request = GenerateImageBody::parse(&body)
        .expect("valid body")
        .into_request()
        .expect("in range");
    assert_eq!(request.prompt, "a magical landscape");
    assert_eq!(request.seed, Some(9_896_923_949));
    assert_eq!(request.steps, Some(6));
    assert_eq!(request.cfg, Some(1.0));
    assert_eq!(request.high_pixels, Some(false));
    assert_eq!(
        request.resolution,
        Resolution {
            width: 1344,
            height: 768,
            batch_size: 1
        }
    );
    assert!(request.multi_img2img_info.is_empty());
}

#[test]
fn absent_and_null_fields_stay_unset() {
    let request = GenerateImageBody::parse(br#"{"prompt": "p", "seed": null}"#)
        .expect("valid")
        .into_request()
        .expect("in range");
    assert_eq!(
        request,
        CreateRequest {
            prompt: "p".into(),
            ..Default::default()
        }
    );
}

#[test]
fn lax_values_convert_as_pydantic_does() {
    let body = GenerateImageBody::parse(
        br#"{"steps": "7", "seed": 12.0, "cfg": "4.5", "highPixels": "yes", "continueCreate": 0}"#,
    )
    .expect("lax values");
    assert_eq!(body.steps, Some(7));
    assert_eq!(body.seed, Some(12));
    assert_eq!(body.cfg, Some(4.5));
    assert_eq!(body.high_pixels, Some(true));
    assert_eq!(body.continue_create, Some(false));
}

#[test]
fn every_wrong_type_is_reported_where_it_is() {
    let errors = GenerateImageBody::parse(
        br#"{"prompt": 5, "steps": 1.5, "resolution": {"width": "wide"}, "ponyTags": [], "multi_img2img_info": {"style_list": [1]}}"#,
    )
    .expect_err("wrong types");
    let found: Vec<(&str, Value)> = errors
        .iter()
        .map(|d| (d.kind, serde_json::to_value(&d.loc).expect("loc")))
        .collect();
    assert_eq!(
        found,
        vec![
            ("string_type", json!(["body", "prompt"])),
            ("int_parsing", json!(["body", "resolution", "width"])),
            ("int_from_float", json!(["body", "steps"])),
            ("dict_type", json!(["body", "ponyTags"])),
            (
                "dict_type",
                json!(["body", "multi_img2img_info", "style_list", 0])
            ),
        ]
    );
}

#[test]
fn bodies_that_are_not_objects_are_refused() {
    let missing = GenerateImageBody::parse(b"  ").expect_err("empty");
    assert_eq!(missing[0].kind, "missing");
    // Python's json module (so FastAPI) puts this error at char 19.
    let cut = GenerateImageBody::parse(b"{\"prompt\": ").expect_err("cut short");
    assert_eq!(
        serde_json::to_value(&cut[0].loc).expect("loc"),
        json!(["body", 11])
    );
    let invalid = GenerateImageBody::parse(b"{\"steps\": 6,\n \"a\": x}").expect_err("bad");
    assert_eq!(invalid[0].kind, "json_invalid");
    assert_eq!(
        serde_json::to_value(&invalid[0].loc).expect("loc"),
        json!(["body", 19])
    );
    let list = GenerateImageBody::parse(b"[1]").expect_err("list");
    assert_eq!(list[0].kind, "model_attributes_type");
}

#[test]
fn out_of_range_integers_are_invalid_arguments() {
    let body =
        GenerateImageBody::parse(br#"{"resolution": {"width": 3000000000}}"#).expect("an integer");
    assert!(matches!(
        body.into_request(),
        Err(Error::InvalidArgument {
            field: "resolution.width",
            ..
        })
    ));
    let errors =
        GenerateImageBody::parse(br#"{"seed": 99999999999999999999}"#).expect_err("too big");
    assert_eq!(errors[0].kind, "int_parsing_size");
}

#[test]
fn error_classes_map_to_http() {
    for (class, http) in [
        (ErrorClass::InvalidArgument, 400),
        (ErrorClass::FailedPrecondition, 400),
        (ErrorClass::Unauthenticated, 401),
        (ErrorClass::PermissionDenied, 403),
        (ErrorClass::NotFound, 404),
        (ErrorClass::Aborted, 409),
        (ErrorClass::ResourceExhausted, 429),
        (ErrorClass::Internal, 500),
        (ErrorClass::Unavailable, 503),
        (ErrorClass::DeadlineExceeded, 504),
    ] {
        assert_eq!(http_status(class).as_u16(), http, "{class:?}");
    }
}
