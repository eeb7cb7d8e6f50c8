//! What goes wrong on purpose before a Piclumen endpoint answers: the
//! latency knob, the scripted faults of `POST /_sim/faults` (for a number
//! of requests, or for a span of time) and the random 5xx/429 rates. A new kind of trouble is one more field of `Faults` and
//! one more step in `Faults::meet`.

use std::{collections::HashMap, collections::VecDeque, sync::Mutex, time::Duration};

use tokio::time::Instant;

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
/// `http_status`, `delay_ms` nor `reset`), one with both `times` and
/// `duration_ms`, or a script that would queue more than 1,000 faults gets
/// the whole script refused with HTTP 400 saying why, so a misspelled key
/// cannot pass unnoticed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// `create`, `status` or `any`.
    pub endpoint: String,
    /// Only requests with this token match (any when empty).
    pub token: String,
    /// How many requests it applies to (1 when 0).
    pub times: u32,
    /// Instead of `times`: every matching request for this many
    /// milliseconds from when the script is accepted (an outage), after
    /// which the fault is dropped. Faults behind it in the queue wait.
    pub duration_ms: u64,
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
        if self.times != 0 && self.duration_ms != 0 {
            return Err("set times or duration_ms, not both".into());
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

/// A queued fault and, for a timed one (`duration_ms`), when it ends.
#[derive(Debug)]
struct Queued {
    fault: Fault,
    until: Option<Instant>,
}

/// The faults queued by `POST /_sim/faults`, met in order.
#[derive(Debug, Default)]
struct Script {
    faults: VecDeque<Queued>,
}

impl Script {
    /// Queues `faults` after those already queued, or refuses them all;
    /// timed faults run from `now`.
    fn add(&mut self, faults: Vec<Fault>, now: Instant) -> Result<(), String> {
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
        self.faults.extend(faults.into_iter().map(|fault| Queued {
            until: (fault.duration_ms > 0).then(|| now + Duration::from_millis(fault.duration_ms)),
            fault,
        }));
        Ok(())
    }

    /// The first fault matching a request at `now`, used up by one (a
    /// timed fault is not used up; it is dropped once its time is over).
    fn take(&mut self, endpoint: &str, token: &str, now: Instant) -> Option<Fault> {
        self.expire(now);
        let pos = self
            .faults
            .iter()
            .position(|q| q.fault.matches(endpoint, token))?;
        let queued = &mut self.faults[pos];
        if queued.until.is_some() {
            return Some(queued.fault.clone());
        }
        if queued.fault.times > 1 {
            queued.fault.times -= 1;
            Some(queued.fault.clone())
        } else {
            self.faults.remove(pos).map(|q| q.fault)
        }
    }

    /// Drops the timed faults whose time is over at `now`.
    fn expire(&mut self, now: Instant) {
        self.faults
            .retain(|q| q.until.is_none_or(|until| now < until));
    }

    /// How many requests the queued counted faults will still meet.
    fn requests_left(&self) -> u64 {
        self.faults
            .iter()
            .filter(|q| q.until.is_none())
            .map(|q| u64::from(q.fault.times.max(1)))
            .sum()
    }

    /// How many timed faults are still in force at `now`.
    fn timed_left(&mut self, now: Instant) -> u64 {
        self.expire(now);
        self.faults.iter().filter(|q| q.until.is_some()).count() as u64
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
        let fault = lock(&self.script).take(endpoint, token, Instant::now());
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

    /// How many requests the counted scripted faults will still meet.
    pub(super) fn queued(&self) -> u64 {
        lock(&self.script).requests_left()
    }

    /// How many timed scripted faults (`duration_ms`) are in force.
    pub(super) fn timed(&self) -> u64 {
        lock(&self.script).timed_left(Instant::now())
    }
}

/// `POST /_sim/faults`: queues a script (a JSON array of `Fault`s), all or
/// nothing.
pub(super) async fn add(State(sim): State<Sim>, body: Bytes) -> Response {
    let added = serde_json::from_slice::<Vec<Fault>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|faults| lock(&sim.faults.script).add(faults, Instant::now()));
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
        let now = Instant::now();
        let mut script = Script::default();
        script
            .add(vec![fault("status", 2), fault("create", 0)], now)
            .expect("valid");
        assert_eq!(script.requests_left(), 3);
        assert_eq!(
            script.take("create", "t", now).map(|f| f.endpoint),
            Some("create".into())
        );
        assert!(script.take("create", "t", now).is_none());
        assert!(script.take("status", "t", now).is_some());
        assert!(script.take("status", "t", now).is_some());
        assert!(script.take("status", "t", now).is_none());
    }

    #[test]
    fn a_script_beyond_the_bound_is_refused_whole() {
        let now = Instant::now();
        let mut script = Script::default();
        let many = vec![fault("any", 1); MAX_QUEUED + 1];
        let why = script.add(many, now).expect_err("too long");
        assert!(why.contains("at most 1000"), "{why}");
        assert_eq!(script.requests_left(), 0, "none of it queued");
        script
            .add(vec![fault("any", 1); MAX_QUEUED - 1], now)
            .expect("fits");
        script
            .add(vec![fault("any", 1); 2], now)
            .expect_err("the queue is full");
        script
            .add(vec![fault("any", 1)], now)
            .expect("the last place");
        assert_eq!(script.requests_left(), MAX_QUEUED as u64);
    }

    #[test]
    fn a_timed_fault_meets_every_match_until_its_time_is_over() {
        let now = Instant::now();
        let mut script = Script::default();
        let outage = Fault {
            duration_ms: 10_000,
            ..fault("status", 0)
        };
        script
            .add(vec![outage, fault("status", 1)], now)
            .expect("valid");
        assert_eq!(script.requests_left(), 1, "the timed fault is not counted");
        assert_eq!(script.timed_left(now), 1);
        for _ in 0..100 {
            assert!(script.take("status", "t", now).is_some());
        }
        assert!(script.take("create", "t", now).is_none(), "status only");
        let later = now + Duration::from_millis(9_999);
        assert!(script.take("status", "t", later).is_some());
        assert_eq!(script.requests_left(), 1, "the fault behind it waited");
        let over = now + Duration::from_millis(10_000);
        assert_eq!(script.timed_left(over), 0);
        assert!(script.take("status", "t", over).is_some(), "the next one");
        assert!(script.take("status", "t", over).is_none());
    }

    #[test]
    fn times_and_duration_together_are_refused() {
        let both = Fault {
            duration_ms: 1_000,
            ..fault("status", 2)
        };
        let why = Script::default()
            .add(vec![both], Instant::now())
            .expect_err("ambiguous");
        assert!(why.contains("not both"), "{why}");
    }
}
