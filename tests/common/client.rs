//! The client subcommands run as scripts and terminals run them: the
//! binary run to its end, its stdout read as JSON, the images it saves
//! decoded, and a loopback image host and scripted simulator replies for
//! the download cases.

use std::{path::Path, process::Output, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::{Harness, process};

/// Runs a client command to its end off the runtime, which keeps serving
/// the in-process server and simulator meanwhile. No token or server comes
/// from the environment (see [`process::command`]).
pub async fn run_client(args: &[&str]) -> Output {
    let mut command = process::command(args);
    tokio::task::spawn_blocking(move || command.output().expect("run client"))
        .await
        .expect("join")
}

/// [`run_client`] under the file-creation mask `umask`.
pub async fn run_client_with_umask(umask: &str, args: &[&str]) -> Output {
    let mut command = process::command_with_umask(umask, args);
    tokio::task::spawn_blocking(move || command.output().expect("run client"))
        .await
        .expect("join")
}

/// `COMMAND --server SERVER --token TOKEN ARGS...`: a client call to the
/// server at the URL `server` as `token`.
pub fn client_args<'a>(
    command: &'a str,
    server: &'a str,
    token: &'a str,
    args: &[&'a str],
) -> Vec<&'a str> {
    [&[command, "--server", server, "--token", token][..], args].concat()
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The whole of stdout as exactly one JSON object on one line.
pub fn one_json_object(stdout: &[u8]) -> Value {
    let text = std::str::from_utf8(stdout).expect("stdout is UTF-8");
    let values = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text:?}"));
    assert_eq!(values.len(), 1, "one JSON value on stdout: {text:?}");
    assert_eq!(text.lines().count(), 1, "on one line: {text:?}");
    let value = values.into_iter().next().expect("one value");
    assert!(value.is_object(), "{value}");
    value
}

pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Decodes a PNG file whole and returns its width and height.
pub fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    let mut pixels = vec![0; reader.output_buffer_size().expect("buffer size")];
    let frame = reader
        .next_frame(&mut pixels)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
    (frame.width, frame.height)
}

/// An image host for the failure cases, on loopback: `/ok.png` answers a
/// whole body; `/cut.png` promises 100000 bytes, sends 5000 and closes;
/// `/slow.png` trickles 64 KiB over about a second.
pub async fn image_host() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let header = |len: usize| {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                    )
                };
                let _ = match path.as_str() {
                    "/ok.png" => {
                        socket.write_all(header(2000).as_bytes()).await.ok();
                        socket.write_all(&[7u8; 2000]).await
                    }
                    "/cut.png" => {
                        socket.write_all(header(100_000).as_bytes()).await.ok();
                        socket.write_all(&[7u8; 5000]).await
                    }
                    "/slow.png" => {
                        socket.write_all(header(64 * 1024).as_bytes()).await.ok();
                        for _ in 0..16 {
                            tokio::time::sleep(Duration::from_millis(60)).await;
                            if socket.write_all(&[7u8; 4096]).await.is_err() {
                                break;
                            }
                        }
                        Ok(())
                    }
                    _ => {
                        socket
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await
                    }
                };
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// Makes the simulator report `mark_id` of `token` as succeeded with these
/// images (`(url, name)`), 64x48 each: a scripted status reply.
pub async fn script_success(h: &Harness, token: &str, mark_id: &str, images: &[(&str, &str)]) {
    let images: Vec<Value> = images
        .iter()
        .map(|(url, name)| json!({"imgUrl": url, "imgName": name, "realWidth": 64, "realHeight": 48}))
        .collect();
    let body = json!({
        "status": 0,
        "message": "success",
        "data": [{"markId": mark_id, "status": "success", "promptId": "p1", "img_urls": images}],
    });
    h.sim
        .script(json!([{
            "endpoint": "status",
            "token": token,
            "times": 100,
            "http_status": 200,
            "body": body.to_string(),
        }]))
        .await;
}
