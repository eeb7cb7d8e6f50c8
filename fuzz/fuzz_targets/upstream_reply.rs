//! Any bytes Piclumen might answer, through the decoders production uses
//! (the status one is the poller's): decoding returns a value or an error,
//! never panics, and keeps at most a short prefix of the body, of the whole
//! reply as of each unreadable entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use piclumen_grpc::upstream::{UpstreamError, decode_create_reply, decode_status_entries};

fuzz_target!(|data: &[u8]| {
    let mut errors = Vec::new();
    errors.extend(decode_create_reply(data).err());
    match decode_status_entries(data) {
        Ok(entries) => errors.extend(
            entries
                .into_iter()
                .filter_map(|e| e.err())
                .map(|bad| bad.error),
        ),
        Err(e) => errors.push(e),
    }
    for error in errors {
        if let UpstreamError::Decode { body, .. } = error {
            assert!(body.len() <= 1024, "error keeps a bounded prefix");
        }
    }
});
