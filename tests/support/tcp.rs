//! TCP stand-ins for the network between a replica and what it talks to:
//! a relay that counts connections, and a gate in front of Redis that
//! stops forwarding at a chosen command. Included with `#[path]`.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A TCP proxy in front of Redis that forwards a replica's commands until
/// its `hold_at`-th `EVAL` (every store operation is one script), which it
/// holds for ever, with the connection left open.
pub struct Gate {
    pub addr: std::net::SocketAddr,
    pub holding: Arc<AtomicBool>,
}

impl Gate {
    pub async fn start(redis_port: u16, hold_at: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let holding = Arc::new(AtomicBool::new(false));
        let evals = Arc::new(AtomicUsize::new(0));
        let flag = Arc::clone(&holding);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    return;
                };
                let (evals, flag) = (Arc::clone(&evals), Arc::clone(&flag));
                tokio::spawn(forward(client, server, evals, flag, hold_at));
            }
        });
        Self { addr, holding }
    }
}

async fn forward(
    client: TcpStream,
    server: TcpStream,
    evals: Arc<AtomicUsize>,
    holding: Arc<AtomicBool>,
    hold_at: usize,
) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let found = chunk.windows(6).filter(|w| w == b"EVAL\r\n").count();
        let seen = evals.fetch_add(found, Ordering::SeqCst) + found;
        if seen >= hold_at || holding.load(Ordering::SeqCst) {
            holding.store(true, Ordering::SeqCst);
            // Hold: read on (so the replica's writes never block) but
            // forward nothing more.
            while matches!(client_rx.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
        if server_tx.write_all(chunk).await.is_err() {
            return;
        }
    }
}

/// A TCP relay to `target` that counts the connections it accepted.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
