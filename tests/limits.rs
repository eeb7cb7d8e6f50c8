//! Server limits hold, answer RESOURCE_EXHAUSTED (or the transport's own
//! refusal), and the server stays healthy past them.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::pb::{self, image_service_client::ImageServiceClient};
use serde_json::json;
use tonic::Code;

async fn still_healthy(client: &mut ImageServiceClient<tonic::transport::Channel>) {
    let mark_id = start_job(client, TOKEN, "still fine").await;
    let (_, end) = collect_watch(client, TOKEN, &mark_id).await;
    end.expect("the server keeps serving past the limit");
}

#[tokio::test]
async fn total_watches_are_capped() {
    let sim = long_jobs();
    let mut config = server_config();
    config.service.max_watches = 3;
    let h = Harness::with(sim, config).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "long").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let request = authed(
            TOKEN,
            pb::WatchImageRequest {
                mark_id: mark_id.clone(),
            },
        );
        open.push(
            client
                .watch_image(request)
                .await
                .expect("within the limit")
                .into_inner(),
        );
    }
    let (_, end) = collect_watch(&mut client, TOKEN, &mark_id).await;
    let status = end.expect_err("over the limit");
    assert_status(&status, Code::ResourceExhausted, "SERVER_LIMIT");
    open.pop();
    // The place frees once the server sees the stream go.
    let reused = eventually(Duration::from_secs(30), || {
        let mut client = client.clone();
        let request = authed(
            TOKEN,
            pb::WatchImageRequest {
                mark_id: mark_id.clone(),
            },
        );
        async move { client.watch_image(request).await.is_ok() }
    })
    .await;
    assert!(reused, "a freed place is reusable");
}

#[tokio::test]
async fn generate_calls_in_flight_are_capped_per_token() {
    let mut config = server_config();
    config.service.max_generates_per_token = 2;
    let h = Harness::with(sim_config(), config).await;
    // The first two creates are held long enough for the other three to
    // arrive and be refused.
    h.sim
        .script(json!([{"endpoint": "create", "delay_ms": 3000, "times": 2}]))
        .await;
    let client = h.client().await;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.generate_image(authed(TOKEN, generate("p"))).await })
        })
        .collect();
    // Another token is not affected by the first one's limit, reached once
    // both held calls are at the simulator.
    assert!(
        eventually(Duration::from_secs(30), || async {
            h.sim.stat("scripted_faults").await == 2
        })
        .await,
        "two calls in flight"
    );
    let mut other = client.clone();
    other
        .generate_image(authed(OTHER_TOKEN, generate("p")))
        .await
        .expect("other token");
    let mut ok = 0;
    for call in calls {
        match call.await.expect("join") {
            Ok(_) => ok += 1,
            Err(status) => assert_status(&status, Code::ResourceExhausted, "SERVER_LIMIT"),
        }
    }
    assert_eq!(ok, 2, "exactly the limit went through");
    let mut client = client;
    client
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .expect("places are freed");
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let mut config = server_config();
    config.max_request_bytes = 1024;
    let h = Harness::with(sim_config(), config).await;
    let mut client = h.client().await;
    let status = client
        .generate_image(authed(TOKEN, generate(&"x".repeat(2000))))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    assert_eq!(h.sim.stat("create_calls").await, 0);
    still_healthy(&mut client).await;
}

#[tokio::test]
async fn streams_per_connection_are_capped() {
    let sim = long_jobs();
    let mut config = server_config();
    config.max_streams_per_connection = 2;
    let h = Harness::with(sim, config).await;
    let mut client = h.client().await;
    let mark_id = start_job(&mut client, TOKEN, "long").await;
    let watch = |client: &mut ImageServiceClient<_>, timeout: Option<Duration>| {
        let mut request = authed(
            TOKEN,
            pb::WatchImageRequest {
                mark_id: mark_id.clone(),
            },
        );
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        let mut client = client.clone();
        async move { client.watch_image(request).await }
    };
    let mut first = watch(&mut client, None)
        .await
        .expect("first stream")
        .into_inner();
    let second = watch(&mut client, None)
        .await
        .expect("second stream")
        .into_inner();
    first.message().await.expect("first").expect("message");
    // A third stream on the same connection waits for a free place, here
    // until its deadline...
    let third = watch(&mut client, Some(Duration::from_millis(500))).await;
    let code = match third {
        Err(status) => status.code(),
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .err()
            .map_or(Code::Ok, |s| s.code()),
    };
    assert!(
        matches!(code, Code::DeadlineExceeded | Code::Cancelled),
        "{code:?}"
    );
    // ...while another connection is served at once.
    let mut fresh = h.client().await;
    fresh
        .check_image(authed(TOKEN, check_request(mark_id.clone())))
        .await
        .expect("other connection");
    drop((first, second));
}

/// A loopback TCP proxy that can go silent, as a dead peer or a cut network
/// path would. Returns its address and a switch; the returned receiver
/// fires when the server closes its side.
async fn freezable_proxy(
    server: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::sync::oneshot::Receiver<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let frozen = std::sync::Arc::new(AtomicBool::new(false));
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let switch = frozen.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("accept");
        let upstream = tokio::net::TcpStream::connect(server)
            .await
            .expect("connect");
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = upstream.into_split();
        let up_frozen = switch.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; 16 * 1024];
            while let Ok(n) = client_read.read(&mut buf).await {
                if n == 0 || up_frozen.load(Ordering::SeqCst) {
                    break;
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            // Hold the server-facing write side open: silence, not a close.
            std::future::pending::<()>().await;
            drop(server_write);
        });
        let mut buf = vec![0; 16 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !switch.load(Ordering::SeqCst) {
                        let _ = client_write.write_all(&buf[..n]).await;
                    }
                }
            }
        }
        let _ = closed_tx.send(());
    });
    (addr, frozen, closed_rx)
}

// Server, simulator, proxy and client share this runtime: more than one
// worker, so that a busy machine does not delay a ping's answer past its
// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_close_connections_to_dead_peers() {
    let mut config = server_config();
    config.http2_keepalive_interval = Duration::from_millis(200);
    // Generous for a live peer's answer, and still well inside the live
    // window below: a peer that never answered would be closed within it.
    config.http2_keepalive_timeout = Duration::from_secs(1);
    let h = Harness::with(long_jobs(), config).await;
    let mut direct = h.client().await;
    let mark_id = start_job(&mut direct, TOKEN, "long").await;
    let (proxy, frozen, mut closed) = freezable_proxy(h.server.addr).await;
    let mut client = ImageServiceClient::new(channel_to(proxy).await);
    let (_watch, _) = open_watch(&mut client, TOKEN, mark_id).await;
    // A live peer answers the server's pings: the connection stays up over
    // many ping intervals and more than interval + timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(closed.try_recv().is_err(), "a live connection was closed");
    // A silent peer does not: the server closes the connection.
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), &mut closed)
        .await
        .expect("the server closed the dead connection")
        .expect("closed");
    direct
        .check_image(authed(TOKEN, check_request("x")))
        .await
        .expect_err("the server still answers (NOT_FOUND)");
}
