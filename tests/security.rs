//! Caller authentication and transport security: API keys, TLS, mutual TLS
//! with certificates made at test time, and an upstream no caller can move.

mod common;

use std::{net::SocketAddr, path::PathBuf};

use common::*;
use piclumen_grpc::{
    auth::{self, ApiKeys},
    pb::{self, image_service_client::ImageServiceClient},
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test]
async fn api_keys_gate_image_calls_but_not_health() {
    let sim = Sim::start(sim_config()).await;
    let mut config = server_config();
    config.service.api_keys = Some(ApiKeys::parse("key-alpha\nkey-beta\n").expect("keys"));
    let server = Server::start(config, sim.url()).await;
    let mut client = server.client().await;

    assert_api_key_missing(&mut client, TOKEN).await;
    let mut wrong = authed(TOKEN, generate("p"));
    wrong
        .metadata_mut()
        .insert("x-api-key", "key-alph".parse().expect("ascii"));
    generate_refused(&mut client, wrong, Code::Unauthenticated, "API_KEY_INVALID").await;
    let (_, end) = collect_watch(&mut client, TOKEN, "m").await;
    assert_status(
        &end.expect_err("watch without key"),
        Code::Unauthenticated,
        "API_KEY_MISSING",
    );
    assert_eq!(
        sim.stat("create_calls").await + sim.stat("status_calls").await,
        0,
        "nothing sent upstream"
    );

    let mut right = authed(TOKEN, generate("p"));
    right
        .metadata_mut()
        .insert("x-api-key", "key-beta".parse().expect("ascii"));
    client.generate_image(right).await.expect("valid key");

    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("probes need no key");
}

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn pki() -> Pki {
    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
    }
    fn leaf(name: &str, issuer: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        let cert = params.signed_by(&key, issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
    let ours = ca();
    let theirs = ca();
    Pki {
        ca: ours.pem(),
        server: leaf("localhost", &ours),
        client: leaf("payments-service", &ours),
        stranger: leaf("stranger", &theirs),
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write pem");
    path
}

async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

async fn generate_over(channel: Channel) -> Result<(), tonic::Status> {
    ImageServiceClient::new(channel)
        .generate_image(authed(TOKEN, generate("p")))
        .await
        .map(|_| ())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("piclumen-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn tls_serves_encrypted_calls_only() {
    let pki = pki();
    let dir = temp_dir("tls");
    let cert = write(&dir, "server.pem", &pki.server.0);
    let key = write(&dir, "server.key", &pki.server.1);
    let sim = Sim::start(sim_config()).await;
    let mut config = server_config();
    config.tls = Some(auth::server_tls(&cert, &key, None).expect("tls config"));
    let server = Server::start(config, sim.url()).await;

    let channel = tls_channel(server.addr, &pki.ca, None)
        .await
        .expect("tls connect");
    generate_over(channel).await.expect("call over TLS");
    // Plaintext HTTP/2 to a TLS port gets nowhere.
    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(
            generate_over(channel).await.is_err(),
            "plaintext call accepted on a TLS port"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_our_ca() {
    let pki = pki();
    let dir = temp_dir("mtls");
    let cert = write(&dir, "server.pem", &pki.server.0);
    let key = write(&dir, "server.key", &pki.server.1);
    let ca = write(&dir, "ca.pem", &pki.ca);
    let sim = Sim::start(sim_config()).await;
    let mut config = server_config();
    config.tls = Some(auth::server_tls(&cert, &key, Some(&ca)).expect("tls config"));
    let server = Server::start(config, sim.url()).await;

    let trusted = tls_channel(server.addr, &pki.ca, Some(&pki.client))
        .await
        .expect("mtls connect");
    generate_over(trusted)
        .await
        .expect("a client with our CA's certificate is served");
    for identity in [None, Some(&pki.stranger)] {
        let refused = match tls_channel(server.addr, &pki.ca, identity).await {
            Err(_) => true,
            Ok(channel) => generate_over(channel).await.is_err(),
        };
        assert!(refused, "a client without our certificate was served");
    }
    assert_eq!(
        sim.stat("create_calls").await,
        1,
        "only the trusted client reached upstream"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn callers_cannot_move_the_upstream() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let mut request = authed(
        TOKEN,
        pb::GenerateImageRequest {
            model_id: "http://127.0.0.2:9/api/gen/create".into(),
            ..generate("https://evil.invalid/ please fetch")
        },
    );
    for (key, value) in [
        ("x-upstream-url", "http://127.0.0.2:9"),
        ("x-forwarded-host", "evil.invalid"),
        ("x-original-url", "http://127.0.0.2:9/"),
    ] {
        request
            .metadata_mut()
            .insert(key, value.parse().expect("ascii"));
    }
    client.generate_image(request).await.expect("generate");
    assert_eq!(
        h.sim.stat("create_calls").await,
        1,
        "the call went to the configured upstream"
    );
}
