//! What each named caller spent, as Prometheus metrics:
//!
//! - `piclumen_caller_images_total{caller}`: images of creates Piclumen
//!   accepted (answered with a mark id);
//! - `piclumen_caller_calls_total{caller,rpc,code}`: calls of the caller
//!   by RPC and gRPC code (Go's names; a WatchImage is counted as it opens
//!   or is refused);
//! - `piclumen_caller_refusals_total{caller,limit}`: calls refused by one
//!   of the caller's limits.
//!
//! Handles are made on first use (the recorder is installed after the
//! callers file is read) and kept with the caller, so a call costs no
//! label building.

use std::sync::{Arc, OnceLock};

use metrics::Counter;

use super::limits::LimitKind;
use crate::{error::ErrorClass, grpc_metrics::CODE_NAMES};

/// The RPC a call is, as the `rpc` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// GenerateImage (gRPC or `POST /generate-image`).
    Generate,
    /// CheckImage (gRPC or `POST /check-image`).
    Check,
    /// WatchImage.
    Watch,
    /// WatchImages.
    WatchMany,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Self::Generate => "GenerateImage",
            Self::Check => "CheckImage",
            Self::Watch => "WatchImage",
            Self::WatchMany => "WatchImages",
        }
    }
}

/// One caller's metric handles.
#[derive(Debug)]
pub struct Bill {
    name: Arc<str>,
    images: OnceLock<Counter>,
    calls: [[OnceLock<Counter>; CODE_NAMES.len()]; 4],
    refusals: [OnceLock<Counter>; 3],
}

impl Bill {
    /// The handles of `name`, none made yet.
    pub fn new(name: Arc<str>) -> Self {
        Self {
            name,
            images: OnceLock::new(),
            calls: Default::default(),
            refusals: Default::default(),
        }
    }

    /// Images Piclumen accepted.
    pub fn images(&self, images: u64) {
        self.images
            .get_or_init(|| {
                metrics::counter!("piclumen_caller_images_total", "caller" => self.name.to_string())
            })
            .increment(images);
    }

    /// One call ended: `None` is OK, else the class of its error.
    pub fn call(&self, rpc: Rpc, class: Option<ErrorClass>) {
        let code = class.map_or(0, code_number);
        let slot = &self.calls[rpc as usize][usize::from(code)];
        slot.get_or_init(|| {
            metrics::counter!(
                "piclumen_caller_calls_total",
                "caller" => self.name.to_string(),
                "rpc" => rpc.name(),
                "code" => CODE_NAMES[usize::from(code)],
            )
        })
        .increment(1);
    }

    /// One call refused by `limit`.
    pub fn refused(&self, limit: LimitKind) {
        self.refusals[limit as usize]
            .get_or_init(|| {
                metrics::counter!(
                    "piclumen_caller_refusals_total",
                    "caller" => self.name.to_string(),
                    "limit" => limit.as_str(),
                )
            })
            .increment(1);
    }
}

/// The gRPC code number of an error class (the classes are the codes' names).
fn code_number(class: ErrorClass) -> u8 {
    match class {
        ErrorClass::InvalidArgument => 3,
        ErrorClass::DeadlineExceeded => 4,
        ErrorClass::NotFound => 5,
        ErrorClass::PermissionDenied => 7,
        ErrorClass::ResourceExhausted => 8,
        ErrorClass::FailedPrecondition => 9,
        ErrorClass::Aborted => 10,
        ErrorClass::Internal => 13,
        ErrorClass::Unavailable => 14,
        ErrorClass::Unauthenticated => 16,
    }
}
