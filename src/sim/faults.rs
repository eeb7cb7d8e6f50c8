//! What goes wrong on purpose before a Piclumen endpoint answers: the
//! latency knob, the scripted faults of `POST /_sim/faults` and the random
//! 5xx/429 rates. A new kind of trouble is one more field of `Faults` and
//! one more step in `Faults::meet`.

use std::{collections::HashMap, collections::VecDeque, sync::Mutex, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use super::{Calls, Sim, SimConfig, lock, reject};

/// Most faults queued at once. A test scripts a handful; the bound keeps a
/// runaway script from holding memory (one fault's `times` may still be
/// large).
const MAX_QUEUED: usize = 1_000;

/// A scripted reply, consumed by the next matching request(s).
///
/// Omitted keys take their defaults; an unknown key, an unknown endpoint,
/// an HTTP status out of range, a fault that would change nothing (no
/// `http_status`, `delay_ms` nor `reset`) or a script that would queue more
/// than 1,000 faults gets the whole script refused with HTTP 400 saying
/// why, so a misspelled key cannot pass unnoticed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// `create`, `status` or `any`.
    pub endpoint: String,
    /// Only requests with this token match (any when empty).
    pub token: String,
    /// How many requests it applies to (1 when 0).
    pub times: u32,
    /// Delay before replying, in milliseconds.
    pub delay_ms: u64,
    /// HTTP status to answer (the normal reply when 0).
    pub http_status: u16,
    /// Body of the answer (with `http_status`).
    pub body: String,
    /// Extra response headers.
    pub headers: HashMap<String, String>,
    /// Break the connection half-way through the body.
    pub reset: bool,
}

impl Fault {
    /// Refuses faults that cannot match or would change nothing.
    fn check(&self) -> Result<(), String> {
        if !["", "any", "create", "status"].contains(&self.endpoint.as_str()) {
            return Err(format!(
                "unknown endpoint `{}`, expected `create`, `status` or `any`",
                self.endpoint
            ));
        }
        if self.http_status != 0 && !(100..=599).contains(&self.http_status) {
            return Err(format!(
                "http_status {} is not an HTTP status",
                self.http_status
            ));
        }
        if self.http_status == 0 && self.delay_ms == 0 && !self.reset {
            return Err("changes nothing: set http_status, delay_ms or reset".into());
        }
        Ok(())
    }

    fn matches(&self, endpoint: &str, token: &str) -> bool {
        (self.endpoint == "any" || self.endpoint.is_empty() || self.endpoint == endpoint)
            && (self.token.is_empty() || self.token == token)
    }

    /// The reply this fault sends, or `None` when it only delays.
    fn reply(&self) -> Option<Response> {
        if self.http_status == 0 && !self.reset {
            return None;
        }
        // A reset without a status breaks a 200 reply.
        let status = StatusCode::from_u16(self.http_status).unwrap_or(StatusCode::OK);
        let body = if self.reset {
            // Promise more than is sent, then fail: the connection breaks mid-body.
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(self.body.clone())),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "simulated reset",
                )),
            ];
            Body::from_stream(futures_util::stream::iter(chunks))
        } else {
            Body::from(self.body.clone())
        };
        let mut reply = (status, body).into_response();
        reply.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                reply.headers_mut().insert(name, value);
            }
        }
        Some(reply)
    }
}

/// The faults queued by `POST /_sim/faults`, met in order.
#[derive(Debug, Default)]
struct Script {
    faults: VecDeque<Fault>,
}

impl Script {
    /// Queues `faults` after those already queued, or refuses them all.
    fn add(&mut self, faults: Vec<Fault>) -> Result<(), String> {
        for (i, fault) in faults.iter().enumerate() {
            fault.check().map_err(|why| format!("fault {i}: {why}"))?;
        }
        let queued = self.faults.len() + faults.len();
        if queued > MAX_QUEUED {
            return Err(format!(
                "{} faults would make {queued} queued, at most {MAX_QUEUED} may be",
                faults.len()
            ));
        }
        self.faults.extend(faults);
        Ok(())
    }

    /// The first fault matching a request, used up by one.
    fn take(&mut self, endpoint: &str, token: &str) -> Option<Fault> {
        let pos = self
            .faults
            .iter()
            .position(|f| f.matches(endpoint, token))?;
        let fault = &mut self.faults[pos];
        if fault.times > 1 {
            fault.times -= 1;
            Some(fault.clone())
        } else {
            self.faults.remove(pos)
        }
    }

    /// How many requests the queued faults will still meet.
    fn requests_left(&self) -> u64 {
        self.faults.iter().map(|f| u64::from(f.times.max(1))).sum()
    }
}

/// Every source of trouble, met by each Piclumen request in turn.
#[derive(Debug)]
pub(super) struct Faults {
    latency: Duration,
    fail_5xx_rate: f64,
    fail_429_rate: f64,
    script: Mutex<Script>,
}

impl Faults {
    pub(super) fn new(config: &SimConfig) -> Self {
        Self {
            latency: config.latency,
            fail_5xx_rate: config.fail_5xx_rate,
            fail_429_rate: config.fail_429_rate,
            script: Mutex::default(),
        }
    }

    /// Latency, then the next scripted fault, then the random rates; the
    /// reply to send instead of the normal one, if any.
    pub(super) async fn meet(
        &self,
        endpoint: &str,
        token: &str,
        calls: &Calls,
    ) -> Option<Response> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let fault = lock(&self.script).take(endpoint, token);
        if let Some(fault) = fault {
            Calls::count(&calls.scripted_faults, 1);
            tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
            if let Some(reply) = fault.reply() {
                return Some(reply);
            }
        }
        self.random(calls)
    }

    fn random(&self, calls: &Calls) -> Option<Response> {
        let roll: f64 = rand::random();
        if roll < self.fail_429_rate {
            Calls::count(&calls.injected_429, 1);
            let mut reply = reject(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Some(reply);
        }
        if roll < self.fail_429_rate + self.fail_5xx_rate {
            Calls::count(&calls.injected_5xx, 1);
            let codes = [
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ];
            let code = codes[rand::random_range(0..codes.len())];
            return Some((code, "upstream trouble (simulated)").into_response());
        }
        None
    }

    /// How many requests the scripted faults will still meet.
    pub(super) fn queued(&self) -> u64 {
        lock(&self.script).requests_left()
    }
}

/// `POST /_sim/faults`: queues a script (a JSON array of `Fault`s), all or
/// nothing.
pub(super) async fn add(State(sim): State<Sim>, body: Bytes) -> Response {
    let added = serde_json::from_slice::<Vec<Fault>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|faults| lock(&sim.faults.script).add(faults));
    match added {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(why) => {
            let message = format!("invalid fault script: {why}");
            (StatusCode::BAD_REQUEST, message).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(endpoint: &str, times: u32) -> Fault {
        Fault {
            endpoint: endpoint.into(),
            times,
            http_status: 503,
            ..Fault::default()
        }
    }

    #[test]
    fn faults_are_met_in_order_by_matching_requests_only() {
        let mut script = Script::default();
        script
            .add(vec![fault("status", 2), fault("create", 0)])
            .expect("valid");
        assert_eq!(script.requests_left(), 3);
        assert_eq!(
            script.take("create", "t").map(|f| f.endpoint),
            Some("create".into())
        );
        assert!(script.take("create", "t").is_none());
        assert!(script.take("status", "t").is_some());
        assert!(script.take("status", "t").is_some());
        assert!(script.take("status", "t").is_none());
    }

    #[test]
    fn a_script_beyond_the_bound_is_refused_whole() {
        let mut script = Script::default();
        let many = vec![fault("any", 1); MAX_QUEUED + 1];
        let why = script.add(many).expect_err("too long");
        assert!(why.contains("at most 1000"), "{why}");
        assert_eq!(script.requests_left(), 0, "none of it queued");
        script
            .add(vec![fault("any", 1); MAX_QUEUED - 1])
            .expect("fits");
        script
            .add(vec![fault("any", 1); 2])
            .expect_err("the queue is full");
        script.add(vec![fault("any", 1)]).expect("the last place");
        assert_eq!(script.requests_left(), MAX_QUEUED as u64);
    }
}
