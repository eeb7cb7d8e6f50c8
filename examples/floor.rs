//! The plain-proxy floor for `benches/proxy_cost.rs`: the least any
//! gRPC-to-HTTP proxy of Piclumen pays per call. Each GenerateImage is one
//! reqwest POST of the create body, each CheckImage one batch-status POST
//! with one id; the JSON reply is decoded and mapped. No validation, no
//! metrics, no logging, no sharing: the same two calls and nothing else.
//!
//! `floor LISTEN UPSTREAM_URL`; prints `listening on ADDR` on stderr.

use std::net::SocketAddr;

use piclumen_grpc::pb::{self, image_service_server::ImageServiceServer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::Server};

#[derive(Clone)]
struct Floor {
    http: reqwest::Client,
    create_url: reqwest::Url,
    status_url: reqwest::Url,
}

impl Floor {
    async fn post(&self, url: &reqwest::Url, token: &str, body: Vec<u8>) -> Result<Value, Status> {
        let reply = self
            .http
            .post(url.clone())
            .header("authorization", token)
            .header("platform", "Web")
            .header("content-type", "application/json;charset=UTF-8")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !reply.status().is_success() {
            return Err(Status::unavailable(reply.status().to_string()));
        }
        let bytes = reply
            .bytes()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| Status::internal(e.to_string()))
    }
}

fn token<T>(request: &Request<T>) -> Result<String, Status> {
    let value = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("no token"))?;
    Ok(value.trim_start_matches("Bearer ").to_owned())
}

#[tonic::async_trait]
impl pb::image_service_server::ImageService for Floor {
    async fn generate_image(
        &self,
        request: Request<pb::GenerateImageRequest>,
    ) -> Result<Response<pb::GenerateImageResponse>, Status> {
        let token = token(&request)?;
        let req = request.into_inner();
        let seed = req.seed.unwrap_or(9_896_923_949);
        let body = json!({
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "model_id": "23887bba-507e-4249-a0e3-6951e4027f2b",
            "resolution": {"width": 1344, "height": 768, "batch_size": 1},
            "seed": seed,
            "steps": 6,
            "cfg": 1,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "hires_fix_denoise": 0.5,
            "hires_scale": 2,
            "highPixels": false,
            "model_ability": {},
            "ponyTags": {},
            "multi_img2img_info": {"style_list": []},
            "img_control_info": {"style_list": []},
            "continueCreate": false
        });
        let reply = self
            .post(&self.create_url, &token, body.to_string().into_bytes())
            .await?;
        let mark_id = reply["data"]["markId"]
            .as_str()
            .ok_or_else(|| Status::internal("no markId"))?
            .to_owned();
        Ok(Response::new(pb::GenerateImageResponse { mark_id, seed }))
    }

    async fn check_image(
        &self,
        request: Request<pb::CheckImageRequest>,
    ) -> Result<Response<pb::CheckImageResponse>, Status> {
        let token = token(&request)?;
        let mark_id = request.into_inner().mark_id;
        let body = serde_json::to_vec(&[&mark_id]).map_err(|e| Status::internal(e.to_string()))?;
        let reply = self.post(&self.status_url, &token, body).await?;
        let entry = reply["data"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["markId"] == mark_id.as_str()))
            .ok_or_else(|| Status::not_found("no such job"))?;
        let state = match entry["status"].as_str().unwrap_or_default() {
            "pending" => pb::JobState::Pending,
            "running" => pb::JobState::Running,
            "success" => pb::JobState::Succeeded,
            "failed" => pb::JobState::Failed,
            _ => pb::JobState::Unspecified,
        };
        Ok(Response::new(pb::CheckImageResponse {
            job: Some(pb::ImageJob {
                mark_id,
                state: state.into(),
                queue_position: entry["index"].as_i64().unwrap_or(0) as i32,
                upstream_status: entry["status"].as_str().unwrap_or_default().to_owned(),
                ..Default::default()
            }),
        }))
    }

    type WatchImageStream = tokio_stream::Empty<Result<pb::WatchImageResponse, Status>>;

    async fn watch_image(
        &self,
        _request: Request<pb::WatchImageRequest>,
    ) -> Result<Response<Self::WatchImageStream>, Status> {
        Err(Status::unimplemented("the floor proxies unary calls only"))
    }

    type WatchImagesStream = tokio_stream::Empty<Result<pb::WatchImagesResponse, Status>>;

    async fn watch_images(
        &self,
        _request: Request<pb::WatchImagesRequest>,
    ) -> Result<Response<Self::WatchImagesStream>, Status> {
        Err(Status::unimplemented("the floor proxies unary calls only"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or("127.0.0.1:0".into()).parse()?;
    let upstream = args.next().ok_or("usage: floor LISTEN UPSTREAM_URL")?;
    let floor = Floor {
        http: reqwest::Client::builder().tcp_nodelay(true).build()?,
        create_url: format!("{upstream}/api/gen/create").parse()?,
        status_url: format!("{upstream}/api/task/batch-process-task").parse()?,
    };
    let listener = TcpListener::bind(listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_service(ImageServiceServer::new(floor))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
