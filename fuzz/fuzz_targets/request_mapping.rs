//! Any bytes a caller might send as a GenerateImageRequest: validation and
//! mapping to upstream JSON return a payload or an error, never panic, and a
//! payload always encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use piclumen_grpc::{
    convert::create_payload, pb::GenerateImageRequest, service::mark_id, upstream::Limits,
};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = GenerateImageRequest::decode(data) {
        if let Ok(payload) = create_payload(&request, &Limits::default()) {
            serde_json::to_vec(&payload).expect("a valid payload always encodes");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mark_id(text);
    }
});
