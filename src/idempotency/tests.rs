//! The store's decisions on paused time, against the in-process backend: a
//! running create keeps its claim alive for as long as it runs; a claim
//! whose holder vanished frees the key if unsent and answers "outcome
//! unknown" if sent; the drain's count follows the creates. Also keys,
//! locations and fingerprints.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    Backend, Created, Entry, Fingerprint, IdempotencyStore, Record, StoreLocation, StoreNamespace,
    key, key_prefix, lease::TERM, memory::MemoryBackend,
};
use crate::{error::Error, job::Token};

const TTL: Duration = Duration::from_secs(600);

fn token() -> Token {
    Token::new("token-a").expect("token")
}

fn namespace() -> StoreNamespace {
    StoreNamespace::of_upstream("http://127.0.0.1:4001")
}

fn prefix() -> String {
    key_prefix(&namespace())
}

fn fingerprint() -> Fingerprint {
    Fingerprint::of(b"params")
}

fn created(mark_id: &str) -> Created {
    Created {
        mark_id: mark_id.into(),
        seed: 7,
    }
}

type Calls = Arc<AtomicUsize>;
type Create = Pin<Box<dyn Future<Output = Result<Created, Error>> + Send>>;

/// A create taking `took`, counted in `calls`.
fn create_taking(
    took: Duration,
    mark_id: &'static str,
    calls: Calls,
) -> impl FnMut() -> Result<Create, Error> + Send {
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(Box::pin(async move {
            tokio::time::sleep(took).await;
            Ok(created(mark_id))
        }))
    }
}

#[tokio::test(start_paused = true)]
async fn a_long_create_keeps_its_claim_alive_and_counted() {
    let store = IdempotencyStore::open(&StoreLocation::Memory, &namespace(), TTL);
    let calls = Calls::default();
    let running = {
        let store = store.clone();
        let start = create_taking(TERM * 5, "m1", Arc::clone(&calls));
        tokio::spawn(async move { store.run(&token(), "r", &fingerprint(), None, start).await })
    };
    // Far past one term, the claim is still held and marked sent.
    tokio::time::sleep(TERM * 3).await;
    let entry = store
        .inner_backend()
        .get(&key(&prefix(), &token(), "r"))
        .await
        .expect("get")
        .expect("a claim");
    assert!(entry.held, "renewed while the create runs");
    assert!(matches!(entry.record, Record::Pending { sent: true, .. }));
    assert_eq!(store.creates().count(), 1);
    // A retry meanwhile waits for it rather than creating.
    let (token, fingerprint) = (token(), fingerprint());
    let retry = store.run(
        &token,
        "r",
        &fingerprint,
        Some(Instant::now() + TERM * 3),
        create_taking(Duration::ZERO, "m2", Arc::clone(&calls)),
    );
    assert_eq!(
        retry.await.expect("the first create's outcome"),
        created("m1")
    );
    assert_eq!(
        running.await.expect("join").expect("created"),
        created("m1")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    store.creates().idle().await;
}

#[tokio::test(start_paused = true)]
async fn a_vanished_holder_frees_an_unsent_claim_and_leaves_a_sent_one_unknown() {
    let backend = MemoryBackend::new(TTL);
    let claim = |owner: &str, sent| Record::Pending {
        owner: owner.into(),
        fingerprint: fingerprint().0,
        sent,
    };
    let (unsent, sent) = (
        key(&prefix(), &token(), "unsent"),
        key(&prefix(), &token(), "sent"),
    );
    assert!(
        backend
            .claim(&unsent, &claim("x", false), TERM)
            .await
            .expect("claim")
    );
    assert!(
        backend
            .claim(&sent, &claim("y", false), TERM)
            .await
            .expect("claim")
    );
    assert!(
        backend
            .renew(&sent, "y", &claim("y", true), TTL, TERM)
            .await
            .expect("mark sent")
    );
    // Live: nobody else may claim either key.
    assert!(
        !backend
            .claim(&unsent, &claim("z", false), TERM)
            .await
            .expect("claim")
    );
    // The holders vanish: no renewal for a term.
    tokio::time::sleep(TERM + Duration::from_millis(1)).await;
    assert!(
        backend
            .claim(&unsent, &claim("z", false), TERM)
            .await
            .expect("claim")
    );
    assert!(
        !backend
            .claim(&sent, &claim("z", false), TERM)
            .await
            .expect("claim")
    );
    let entry = backend.get(&sent).await.expect("get").expect("kept");
    assert_eq!(
        entry,
        Entry {
            record: claim("y", true),
            held: false
        }
    );
    // The late holder can still record its outcome; a stranger cannot.
    backend.settle(&sent, "z", None, TTL).await.expect("settle");
    assert!(backend.get(&sent).await.expect("get").is_some());
    let done = Record::Done {
        fingerprint: fingerprint().0,
        mark_id: "m".into(),
        seed: 1,
    };
    backend
        .settle(&sent, "y", Some(&done), TTL)
        .await
        .expect("settle");
    assert_eq!(
        backend.get(&sent).await.expect("get").map(|e| e.record),
        Some(done)
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_a_dead_sender_answers_outcome_unknown() {
    let store = IdempotencyStore::open(&StoreLocation::Memory, &namespace(), TTL);
    let k = key(&prefix(), &token(), "r");
    let backend = store.inner_backend();
    let claim = |sent| Record::Pending {
        owner: "gone".into(),
        fingerprint: fingerprint().0,
        sent,
    };
    assert!(backend.claim(&k, &claim(false), TERM).await.expect("claim"));
    assert!(
        backend
            .renew(&k, "gone", &claim(true), TTL, TERM)
            .await
            .expect("renew")
    );
    let calls = Calls::default();
    let started = Instant::now();
    let answer = store
        .run(
            &token(),
            "r",
            &fingerprint(),
            Some(started + TERM * 3),
            create_taking(Duration::ZERO, "m", Arc::clone(&calls)),
        )
        .await;
    assert!(
        matches!(answer, Err(Error::CreateOutcomeUnknown { .. })),
        "{answer:?}"
    );
    assert!(
        started.elapsed() >= TERM - Duration::from_secs(1),
        "waited for the lease"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn keys_hide_the_token_and_separate_pairs() {
    let token = Token::new("secret-token").expect("token");
    let k = key(&prefix(), &token, "r1");
    assert!(k.starts_with(&prefix()));
    assert!(!k.contains("secret"));
    assert_eq!(k, key(&prefix(), &token, "r1"), "stable");
    assert_ne!(k, key(&prefix(), &token, "r2"));
    let other = Token::new("secret-toke").expect("token");
    assert_ne!(key(&prefix(), &other, "nr1"), k, "length-prefixed");
}

#[test]
fn keys_are_namespaced_by_deployment() {
    let token = Token::new("secret-token").expect("token");
    let here = StoreNamespace::of_upstream("http://127.0.0.1:4001");
    let there = StoreNamespace::of_upstream("http://127.0.0.1:4002");
    let k = key(&key_prefix(&here), &token, "r1");
    assert_eq!(
        k.strip_suffix(&k[k.len() - 64..]),
        Some(format!("piclumen-grpc:{here}:request-id:v1:").as_str())
    );
    assert_ne!(k, key(&key_prefix(&there), &token, "r1"));
    let named: StoreNamespace = "shared".parse().expect("valid");
    assert!(
        key(&key_prefix(&named), &token, "r1").starts_with("piclumen-grpc:shared:request-id:v1:")
    );
}

#[test]
fn locations_parse_and_hide_passwords() {
    assert_eq!("memory".parse(), Ok(StoreLocation::Memory));
    let redis: StoreLocation = "redis://:hunter2@127.0.0.1:6379/2".parse().expect("redis");
    assert!(matches!(redis, StoreLocation::Redis(_)));
    assert!(!redis.to_string().contains("hunter2"));
    assert!(!format!("{redis:?}").contains("hunter2"));
    assert!(
        "rediss://cache.internal:6380"
            .parse::<StoreLocation>()
            .is_ok()
    );
    assert!("http://127.0.0.1:6379".parse::<StoreLocation>().is_err());
    assert!("mem".parse::<StoreLocation>().is_err());
}

#[test]
fn fingerprints_are_stable_sha256() {
    assert_eq!(
        Fingerprint::of(b"abc").0,
        "v2:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn a_record_of_the_first_scheme_is_trusted_and_todays_are_compared() {
    let today = Fingerprint::of(b"params");
    assert!(today.matches(&today.0));
    assert!(!today.matches(&Fingerprint::of(b"other").0));
    // Written before the scheme had a name: a bare hex of another encoding.
    assert!(today.matches("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
}
