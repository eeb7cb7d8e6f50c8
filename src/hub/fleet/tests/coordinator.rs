//! The fleet coordinator alone, on paused time: roles, exchanges, read-backs.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::hub::fleet::coordinator::{Coordinator, CoordinatorConfig, Role, Step};

const INTERVAL: Duration = Duration::from_secs(3);

fn exchange(c: &mut Coordinator, now: Instant, local: &[&str]) -> (Vec<String>, Vec<String>) {
    let ids = local.iter().map(|id| Arc::from(*id)).collect();
    match c.next(now, || ids) {
        Step::Exchange(e) => {
            let names = |v: Vec<Arc<str>>| v.iter().map(|i| i.to_string()).collect();
            (names(e.register), names(e.read))
        }
        other => panic!("expected an exchange at {now:?}, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn roles_follow_the_store_and_followers_read_back_what_they_miss() {
    let t0 = Instant::now();
    let mut c = Coordinator::new(CoordinatorConfig { interval: INTERVAL }, t0);
    assert_eq!(c.next(t0, Vec::new), Step::Idle, "no watcher, no exchange");
    assert!(!c.interest(true, t0));
    c.watched("a".into(), t0);
    assert_eq!(c.role(), Role::Joining);
    assert!(
        !c.role().polls_watches(),
        "nothing polled before the first answer"
    );
    let (register, read) = exchange(&mut c, t0, &["a"]);
    assert_eq!((register, read), (vec!["a".to_owned()], vec![]));
    assert_eq!(c.next(t0, Vec::new), Step::Idle, "one exchange at a time");
    let out = c.on_exchange(Ok(false), t0);
    assert_eq!(out.turn, Some((Role::Joining, Role::Follower)));
    // Every third of an interval; a new watch is registered at once.
    let every = INTERVAL / 3;
    assert_eq!(c.next(t0, Vec::new), Step::At(t0 + every));
    let t1 = t0 + Duration::from_millis(10);
    c.watched("b".into(), t1);
    let (mut register, _) = exchange(&mut c, t1, &["a", "b"]);
    register.sort();
    assert_eq!(register, ["a", "b"]);
    c.on_exchange(Ok(false), t1);
    // "a" has news, "b" none for two intervals: "b" is read back, once.
    let t2 = t1 + INTERVAL * 2;
    c.heard("a", t2 - Duration::from_millis(1));
    let (_, read) = exchange(&mut c, t2, &["a", "b"]);
    assert_eq!(read, ["b"]);
    c.on_exchange(Ok(false), t2);
    let (_, read) = exchange(&mut c, t2 + every, &["a", "b"]);
    assert!(read.is_empty());
    // The store goes away: poll alone; it comes back as holder.
    let out = c.on_exchange(Err(()), t2 + every);
    assert_eq!(out.turn, Some((Role::Follower, Role::Local)));
    assert!(c.role().polls_watches());
    let t3 = t2 + every * 2;
    let (register, _) = exchange(&mut c, t3, &["a", "b"]);
    assert_eq!(register.len(), 2);
    let out = c.on_exchange(Ok(true), t3);
    assert_eq!(out.turn, Some((Role::Local, Role::Holder)));
    let (register, read) = exchange(&mut c, t3 + every, &["a", "b"]);
    assert!(
        register.is_empty() && read.is_empty(),
        "the holder registers nothing"
    );
    c.on_exchange(Ok(true), t3 + every);
    // The last watcher leaves: the holder gives the lease back.
    assert!(c.interest(false, t3 + every));
    assert_eq!(c.role(), Role::Idle);
    assert_eq!(c.next(t3 + every * 2, Vec::new), Step::Idle);
}
