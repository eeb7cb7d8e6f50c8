//! A simulator and one server, in this process, serving gRPC and the first
//! version's HTTP API on two loopback ports.

use std::net::SocketAddr;

use piclumen_grpc::{
    server::{self, ServerConfig, ServerError},
    sim::SimConfig,
    upstream::Client,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use super::{Sim, client_config};

/// The simulator, the server's two addresses, and how to stop it.
pub struct WithHttp {
    pub sim: Sim,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Dropped or sent: the server drains and stops.
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), ServerError>>,
}

/// Starts the simulator and the server with `config`.
pub async fn with_http(sim: SimConfig, config: ServerConfig) -> WithHttp {
    let sim = Sim::start(sim).await;
    let client = Client::new(&client_config(sim.url())).expect("client");
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let grpc = grpc_listener.local_addr().expect("grpc addr");
    let http = http_listener.local_addr().expect("http addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run_with_http(
        config,
        client,
        grpc_listener,
        Some(http_listener),
        async {
            let _ = stopped.await;
        },
    ));
    WithHttp {
        sim,
        grpc,
        http,
        stop,
        task,
    }
}
