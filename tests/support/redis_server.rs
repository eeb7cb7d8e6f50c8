//! A real `redis-server` for the tests of `--idempotency-store redis://`
//! (Debian's package, installed by `scripts/redis.sh` when missing): each
//! test starts its own on a free loopback port with persistence off. A
//! missing redis-server that cannot be installed fails the tests; it never
//! skips them. Included with `#[path]` by the test files that need it.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use piclumen_grpc::idempotency::StoreLocation;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::common::unused_addr;

/// The `redis-server` binary, installed once per test run when missing.
pub fn redis_server_binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis.sh");
        let output = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/redis.sh");
        assert!(
            output.status.success(),
            "redis-server is missing and scripts/redis.sh could not install it ({})",
            output.status
        );
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(!path.is_empty(), "scripts/redis.sh named no binary");
        PathBuf::from(path)
    })
}

/// A `redis-server` child on a loopback port, killed (by its own handle)
/// when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    _dir: TempDir,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(unused_addr().port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir = TempDir::new("redis");
        let redis = Self::spawn(port, &["--port", &port.to_string()], dir);
        redis.wait_ready(|| ping(port));
        redis
    }

    /// A server speaking TLS only, with a certificate for 127.0.0.1 signed
    /// by a CA made here; returns it and the CA's PEM file.
    pub fn start_tls() -> (Self, PathBuf) {
        let port = unused_addr().port();
        let dir = TempDir::new("redis-tls");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        let file = |name: &str, text: String| {
            let path = dir.0.join(name);
            std::fs::write(&path, text).expect("write pem");
            path.to_string_lossy().into_owned()
        };
        let ca_file = file("ca.pem", ca.pem());
        let cert_file = file("server.pem", cert.pem());
        let key_file = file("server.key", key.serialize_pem());
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert_file,
            "--tls-key-file",
            &key_file,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            "no",
        ];
        let redis = Self::spawn(port, &args, dir);
        redis.wait_ready(|| TcpStream::connect(("127.0.0.1", port)).is_ok());
        (redis, PathBuf::from(ca_file))
    }

    fn spawn(port: u16, args: &[&str], dir: TempDir) -> Self {
        let child = Command::new(redis_server_binary())
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        Self {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn location(&self) -> StoreLocation {
        self.url().parse().expect("redis url")
    }

    /// `ready` holds within 10 s, or the test fails.
    fn wait_ready(&self, ready: impl Fn() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if ready() {
                return;
            }
            assert!(
                std::time::Instant::now() < end,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server, as a crash or an outage would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A directory removed when dropped (redis-server wants a working dir).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "piclumen-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
