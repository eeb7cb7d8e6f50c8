//! Browsers: CORS preflights answered for the allowed origins only (none
//! by default), and gRPC-Web over HTTP/1.1 with its status headers exposed.

mod common;

use common::*;
use piclumen_grpc::{pb, server::CorsPolicy};

const ALLOWED: &str = "https://app.example.com";

/// A server allowing `origins` to call over gRPC-Web.
async fn web_harness(origins: &[&str]) -> Harness {
    let mut config = server_config();
    config.cors = CorsPolicy::new(origins).expect("origins");
    Harness::with(sim_config(), config).await
}

/// A browser's preflight for a gRPC-Web GenerateImage call from `origin`.
async fn preflight(h: &Harness, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!(
                "http://{}/piclumen.v1.ImageService/GenerateImage",
                h.server.addr
            ),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web,x-user-agent,x-request-id,x-api-key,grpc-timeout",
        )
        .send()
        .await
        .expect("preflight")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
}

fn list(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

#[tokio::test]
async fn cors_preflight_answers_allowed_origins_only() {
    let h = web_harness(&[ALLOWED, "http://localhost:5173"]).await;
    for origin in [ALLOWED, "http://localhost:5173"] {
        let response = preflight(&h, origin).await;
        assert!(response.status().is_success(), "{}", response.status());
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some(origin)
        );
        assert!(list(header(&response, "access-control-allow-methods")).contains(&"post".into()));
        let allowed = list(header(&response, "access-control-allow-headers"));
        for name in [
            "authorization",
            "content-type",
            "x-grpc-web",
            "x-user-agent",
            "x-request-id",
            "x-api-key",
            "grpc-timeout",
        ] {
            assert!(allowed.contains(&name.into()), "{name} not in {allowed:?}");
        }
    }
    let response = preflight(&h, "https://evil.example.net").await;
    assert_eq!(header(&response, "access-control-allow-origin"), None);

    // Clients that send no `origin` (gRPC from servers) skip CORS entirely.
    let response = h
        .client()
        .await
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect("generate");
    for name in [
        "vary",
        "access-control-expose-headers",
        "access-control-allow-origin",
    ] {
        assert!(
            response.metadata().get(name).is_none(),
            "{name} on a call without origin: {:?}",
            response.metadata()
        );
    }
}

#[tokio::test]
async fn no_browser_origin_is_allowed_by_default() {
    let h = web_harness(&[]).await;
    for origin in [ALLOWED, "http://localhost:5173", "null"] {
        let response = preflight(&h, origin).await;
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            None,
            "{origin} allowed by default"
        );
    }
    let any = web_harness(&["*"]).await;
    let response = preflight(&any, "https://anywhere.example").await;
    assert_eq!(header(&response, "access-control-allow-origin"), Some("*"));
}

/// One gRPC-Web frame: (flag, payload).
fn grpc_web_frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated frame prefix");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        frames.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    frames
}

/// A gRPC-Web unary call over HTTP/1.1, as a browser sends it.
async fn grpc_web_call(
    h: &Harness,
    method: &str,
    message: impl prost::Message,
    token: &str,
) -> reqwest::Response {
    let payload = message.encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    reqwest::Client::new()
        .post(format!(
            "http://{}/piclumen.v1.ImageService/{method}",
            h.server.addr
        ))
        .header("origin", ALLOWED)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {token}"))
        .header("x-request-id", "web-4714")
        .body(body)
        .send()
        .await
        .expect("grpc-web call")
}

#[tokio::test]
async fn grpc_web_over_http1_with_exposed_status_headers() {
    let h = web_harness(&[ALLOWED]).await;
    let response = grpc_web_call(&h, "GenerateImage", generate("p"), TOKEN).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(ALLOWED)
    );
    assert_eq!(header(&response, "x-request-id"), Some("web-4714"));
    let exposed = list(header(&response, "access-control-expose-headers"));
    for name in [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-request-id",
    ] {
        assert!(exposed.contains(&name.into()), "{name} not in {exposed:?}");
    }
    assert!(
        header(&response, "content-type").is_some_and(|t| t.starts_with("application/grpc-web")),
        "{:?}",
        response.headers()
    );
    let body = response.bytes().await.expect("body");
    let frames = grpc_web_frames(&body);
    assert_eq!(frames.len(), 2, "a message and the trailers: {frames:?}");
    assert_eq!(frames[0].0, 0);
    let created = <pb::GenerateImageResponse as prost::Message>::decode(frames[0].1.as_slice())
        .expect("GenerateImageResponse");
    assert!(!created.mark_id.is_empty());
    assert_eq!(frames[1].0, 0x80, "trailer frame flag");
    let trailers = String::from_utf8(frames[1].1.clone()).expect("trailers text");
    assert!(
        trailers.to_ascii_lowercase().contains("grpc-status:0"),
        "{trailers:?}"
    );

    // An error arrives as a trailers-only response: the status in headers a
    // browser script may read.
    let response = grpc_web_call(&h, "GenerateImage", generate(""), TOKEN).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "grpc-status"), Some("3"));
    assert!(header(&response, "grpc-status-details-bin").is_some());
    assert!(header(&response, "grpc-message").is_some_and(|m| m.contains("prompt")));
}
