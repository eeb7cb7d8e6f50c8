//! The simulator over HTTP on loopback: what a client of Piclumen's two
//! endpoints and of the image URLs meets.

use std::time::Duration;

use axum::http::{StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{CREATE_PATH, STATUS_PATH, SimConfig, images::tests::decode_png, serve};

/// Where the simulator serves images, as its image URLs say.
const IMAGES_PATH: &str = "/_sim/images/";

/// A simulator on a loopback port of its own, stopped when dropped.
struct Running {
    url: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(config: SimConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, config, async {
        let _ = stopped.await;
    }));
    Running {
        url,
        http: reqwest::Client::new(),
        _stop: stop,
    }
}

impl Running {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .header(header::AUTHORIZATION, "t")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("post")
    }

    async fn json(&self, response: reqwest::Response) -> Value {
        let bytes = response.bytes().await.expect("body");
        serde_json::from_slice(&bytes).expect("json")
    }

    async fn create(&self, body: Value) -> String {
        let reply = self.post(CREATE_PATH, body).await;
        let reply = self.json(reply).await;
        reply["data"]["markId"].as_str().expect("markId").to_owned()
    }

    /// `GET` of the image `name`.
    async fn image(&self, name: &str) -> reqwest::Response {
        let url = format!("{}{IMAGES_PATH}{name}", self.url);
        self.http.get(url).send().await.expect("get image")
    }

    /// The job's status entry, polled until `state` (bounded).
    async fn wait_for(&self, mark_id: &str, state: &str) -> Value {
        for _ in 0..500 {
            let reply = self.post(STATUS_PATH, json!([mark_id])).await;
            let entry = self.json(reply).await["data"][0].clone();
            if entry["status"] == state {
                return entry;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{mark_id} never reached {state}");
    }
}

fn quick() -> SimConfig {
    SimConfig {
        job_duration: Duration::from_millis(200),
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn image_urls_lead_back_to_real_pngs_of_the_job_size() {
    let sim = start(quick()).await;
    let mark_id = sim
        .create(json!({
            "prompt": "p",
            "resolution": {"width": 640, "height": 320, "batch_size": 2},
        }))
        .await;
    let early = sim.image(&format!("{mark_id}-0.png")).await;
    assert_eq!(early.status(), StatusCode::NOT_FOUND, "not before success");

    let entry = sim.wait_for(&mark_id, "success").await;
    let images = entry["img_urls"].as_array().expect("img_urls");
    assert_eq!(images.len(), 2);
    for (i, image) in images.iter().enumerate() {
        let name = format!("{mark_id}-{i}.png");
        assert_eq!(image["imgName"], name.as_str());
        assert_eq!(
            image["imgUrl"],
            format!("{}{IMAGES_PATH}{name}", sim.url).as_str()
        );
        let url = image["imgUrl"].as_str().expect("url");
        let reply = sim.http.get(url).send().await.expect("get image");
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()[header::CONTENT_TYPE], "image/png");
        let length: usize = reply.headers()[header::CONTENT_LENGTH]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        let bytes = reply.bytes().await.expect("image body");
        assert_eq!(bytes.len(), length);
        let (width, height, pixels) = decode_png(&bytes);
        assert_eq!((width, height), (640, 320));
        assert_eq!(pixels.len(), 640 * 320 * 3, "RGB, 8 bits");
        assert!(bytes.len() < 16 * 1024, "small: {} bytes", bytes.len());
    }
}

#[tokio::test]
async fn unknown_or_unfinished_image_names_get_404() {
    let sim = start(quick()).await;
    let done = sim.create(json!({"prompt": "p"})).await;
    let failed = sim.create(json!({"prompt": "p [sim:fail]"})).await;
    sim.wait_for(&done, "success").await;
    sim.wait_for(&failed, "failed").await;
    let ok = format!("{done}-0.png");
    for name in [
        ok.as_str(),
        &format!("{done}-1.png"),
        &format!("{done}--1.png"),
        &format!("{done}-0.webp"),
        &format!("{failed}-0.png"),
        "nope-0.png",
        "nothing",
    ] {
        let reply = sim.image(name).await;
        let expected = if name == ok {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        assert_eq!(reply.status(), expected, "{name}");
    }
}

impl Running {
    async fn stats(&self) -> Value {
        let reply = self
            .http
            .get(format!("{}/_sim/stats", self.url))
            .send()
            .await
            .expect("stats");
        self.json(reply).await
    }

    async fn script(&self, faults: Value) {
        let reply = self.post("/_sim/faults", faults).await;
        assert_eq!(reply.status(), StatusCode::NO_CONTENT, "script accepted");
    }
}

#[tokio::test]
async fn stats_count_failed_replies_per_endpoint_and_timed_faults_end() {
    let sim = start(quick()).await;
    let mark_id = sim.create(json!({"prompt": "p"})).await;
    sim.script(json!([
        {"endpoint": "create", "http_status": 500},
        {"endpoint": "status", "http_status": 503, "duration_ms": 300},
    ]))
    .await;
    assert_eq!(sim.stats().await["faults_timed"], 1);
    let create = sim.post(CREATE_PATH, json!({"prompt": "p"})).await;
    assert_eq!(create.status(), StatusCode::INTERNAL_SERVER_ERROR);
    for _ in 0..5 {
        let reply = sim.post(STATUS_PATH, json!([mark_id])).await;
        assert_eq!(
            reply.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "in the outage"
        );
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    let reply = sim.post(STATUS_PATH, json!([mark_id])).await;
    assert_eq!(reply.status(), StatusCode::OK, "the outage is over");
    let unauthorized = sim
        .http
        .post(format!("{}{STATUS_PATH}", sim.url))
        .body("[]")
        .send()
        .await
        .expect("post");
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);

    let stats = sim.stats().await;
    assert_eq!(stats["create_calls"], 2);
    assert_eq!(stats["create_failed"], 1);
    assert_eq!(stats["status_calls"], 7);
    assert_eq!(stats["status_failed"], 6, "5 in the outage, 1 refused");
    assert_eq!(stats["scripted_faults"], 6);
    assert_eq!(stats["faults_timed"], 0);
    assert_eq!(stats["faults_queued"], 0);
}
