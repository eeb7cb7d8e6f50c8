//! Any bytes Piclumen might answer: decoding returns a value or an error,
//! never panics, and keeps at most a short prefix of the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use piclumen_grpc::upstream::{UpstreamError, decode_create_reply, decode_status_reply};

fuzz_target!(|data: &[u8]| {
    for result in [decode_create_reply(data).map(|_| ()), decode_status_reply(data).map(|_| ())] {
        if let Err(UpstreamError::Decode { body, .. }) = result {
            assert!(body.len() <= 1024, "error keeps a bounded prefix");
        }
    }
});
