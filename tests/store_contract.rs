//! The store contract: every store trait behaves the same on DynamoDB (through the real
//! `aws-sdk-dynamodb` client against the emulator, a fresh table per test) and on the embedded
//! SQLite store. Each test below runs against both backends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use kitebridge::bitbucket::request::{BitbucketState, StatusBody, StatusRequest};
use kitebridge::buildkite::client::CreateBuild;
use kitebridge::release::model::*;
use kitebridge::status::StatusVersion;
use kitebridge::store::*;
use serde_json::json;

/// Generates one `#[tokio::test]` per backend for each contract test function.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let kv = kitebridge::store::SqliteKv::in_memory().expect("in-memory sqlite");
                    super::$name(std::sync::Arc::new(kv)).await;
                }
            )*
        }
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let dir = std::env::temp_dir().join(format!("kitebridge-test-{}", ulid::Ulid::new()));
                    let kv = kitebridge::store::SqliteKv::open(dir.join("store.db")).expect("sqlite file");
                    super::$name(std::sync::Arc::new(kv)).await;
                    let _ = std::fs::remove_dir_all(dir);
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let kv = kitebridge_tests::dynamodb().await;
                    super::$name(std::sync::Arc::new(kv)).await;
                }
            )*
        }
    };
}

contract!(
    kv_conditions_and_atomic_batches,
    kv_query_order_prefix_and_paging,
    kv_expired_items_are_absent,
    cursor_compare_and_set_never_backwards,
    cursor_race_exactly_one_wins,
    ledger_dedupes_and_never_regresses,
    ledger_outbox_holds_what_is_not_delivered,
    ledger_out_of_order_delivery_reposts_the_newest,
    ledger_an_unanswered_post_gets_the_newest_posted_after_it,
    ledger_race_keeps_the_newest,
    firing_once_per_source_build,
    firing_race_exactly_one_wins,
    idempotency_replays_the_first_answer,
    releases_projects_and_versions,
    projects_listed_and_deleted,
    recent_rings_are_bounded_newest_first,
    releases_version_race_exactly_one_wins,
    releases_candidate_race_exactly_one_wins,
    deployments_one_active_per_environment,
    build_links,
    active_deployment_index_follows_environment_state,
    rules_put_get_list_delete,
    pending_firings_lifecycle,
);

type Kv = Arc<dyn kitebridge::store::Kv>;

fn item(pk: &str, sk: &str, rev: u64, doc: &str) -> Item {
    Item {
        pk: pk.into(),
        sk: sk.into(),
        rev,
        doc: doc.into(),
        expires_at: None,
    }
}

fn put(i: Item, cond: Cond) -> Write {
    Write::Put { item: i, cond }
}

async fn kv_conditions_and_atomic_batches(kv: Kv) {
    assert_eq!(kv.get("P", "a").await.unwrap(), None);
    kv.write(vec![put(item("P", "a", 1, "1"), Cond::Absent)])
        .await
        .unwrap();
    assert_eq!(
        kv.get("P", "a").await.unwrap(),
        Some(item("P", "a", 1, "1"))
    );

    // Absent fails on an existing item; Rev fails on the wrong rev and on a missing item.
    let e = kv
        .write(vec![put(item("P", "a", 1, "x"), Cond::Absent)])
        .await;
    assert!(matches!(e, Err(StoreError::Conflict)), "{e:?}");
    let e = kv
        .write(vec![put(item("P", "a", 3, "x"), Cond::Rev(2))])
        .await;
    assert!(matches!(e, Err(StoreError::Conflict)), "{e:?}");
    let e = kv
        .write(vec![put(item("P", "zz", 2, "x"), Cond::Rev(1))])
        .await;
    assert!(matches!(e, Err(StoreError::Conflict)), "{e:?}");
    kv.write(vec![put(item("P", "a", 2, "2"), Cond::Rev(1))])
        .await
        .unwrap();
    assert_eq!(kv.get("P", "a").await.unwrap().unwrap().doc, "2");

    // A batch with one failing condition writes nothing.
    let e = kv
        .write(vec![
            put(item("P", "b", 1, "b"), Cond::Absent),
            put(item("P", "a", 3, "3"), Cond::Rev(1)),
        ])
        .await;
    assert!(matches!(e, Err(StoreError::Conflict)), "{e:?}");
    assert_eq!(kv.get("P", "b").await.unwrap(), None);
    assert_eq!(kv.get("P", "a").await.unwrap().unwrap().rev, 2);

    // A good batch writes everything, deletes included.
    kv.write(vec![
        put(item("P", "b", 1, "b"), Cond::Absent),
        Write::Delete {
            pk: "P".into(),
            sk: "a".into(),
            cond: Cond::Rev(2),
        },
    ])
    .await
    .unwrap();
    assert_eq!(kv.get("P", "a").await.unwrap(), None);
    assert_eq!(kv.get("P", "b").await.unwrap().unwrap().doc, "b");

    // Unconditional writes and deletes of missing items succeed.
    kv.write(vec![put(item("P", "b", 9, "b9"), Cond::Always)])
        .await
        .unwrap();
    kv.write(vec![Write::Delete {
        pk: "P".into(),
        sk: "missing".into(),
        cond: Cond::Always,
    }])
    .await
    .unwrap();
    assert_eq!(kv.get("P", "b").await.unwrap().unwrap().rev, 9);
}

async fn kv_query_order_prefix_and_paging(kv: Kv) {
    let mut writes = Vec::new();
    for i in 0..25 {
        writes.push(put(
            item("Q", &format!("X#{i:03}"), 1, &i.to_string()),
            Cond::Absent,
        ));
    }
    writes.push(put(item("Q", "Y#000", 1, "y"), Cond::Absent));
    writes.push(put(item("Q", "W#000", 1, "w"), Cond::Absent));
    writes.push(put(item("Other", "X#000", 1, "o"), Cond::Absent));
    kv.write(writes).await.unwrap();

    let first = kv
        .query("Q", "X#", None, 10, Order::Ascending)
        .await
        .unwrap();
    let sks: Vec<&str> = first.iter().map(|i| i.sk.as_str()).collect();
    assert_eq!(
        sks,
        (0..10).map(|i| format!("X#{i:03}")).collect::<Vec<_>>()
    );
    let rest = kv
        .query("Q", "X#", Some("X#009"), 100, Order::Ascending)
        .await
        .unwrap();
    assert_eq!(rest.len(), 15);
    assert_eq!(rest[0].sk, "X#010");
    assert_eq!(rest[14].sk, "X#024");

    let desc = kv
        .query("Q", "X#", None, 3, Order::Descending)
        .await
        .unwrap();
    let sks: Vec<&str> = desc.iter().map(|i| i.sk.as_str()).collect();
    assert_eq!(sks, vec!["X#024", "X#023", "X#022"]);
    let desc2 = kv
        .query("Q", "X#", Some("X#022"), 2, Order::Descending)
        .await
        .unwrap();
    let sks: Vec<&str> = desc2.iter().map(|i| i.sk.as_str()).collect();
    assert_eq!(sks, vec!["X#021", "X#020"]);

    let all = kv
        .query("Q", "", None, 1000, Order::Ascending)
        .await
        .unwrap();
    assert_eq!(all.len(), 27);
    assert!(
        kv.query("Nothing", "", None, 10, Order::Ascending)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn kv_expired_items_are_absent(kv: Kv) {
    let past = Utc::now().timestamp() - 10;
    let future = Utc::now().timestamp() + 3600;
    kv.write(vec![
        put(
            Item {
                expires_at: Some(past),
                ..item("E", "old", 1, "o")
            },
            Cond::Always,
        ),
        put(
            Item {
                expires_at: Some(future),
                ..item("E", "new", 1, "n")
            },
            Cond::Always,
        ),
    ])
    .await
    .unwrap();
    assert_eq!(kv.get("E", "old").await.unwrap(), None);
    assert!(kv.get("E", "new").await.unwrap().is_some());
    let listed = kv.query("E", "", None, 10, Order::Ascending).await.unwrap();
    assert_eq!(listed.len(), 1);
    // An expired item counts as absent for a conditional create.
    kv.write(vec![put(item("E", "old", 1, "again"), Cond::Absent)])
        .await
        .unwrap();
    assert_eq!(kv.get("E", "old").await.unwrap().unwrap().doc, "again");
}

async fn cursor_compare_and_set_never_backwards(kv: Kv) {
    let store = Store::from_arc(kv);
    let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let t1 = t0 + chrono::Duration::minutes(5);
    assert_eq!(store.cursor("acme").await.unwrap(), None);
    assert!(store.advance_cursor("acme", None, t0).await.unwrap());
    // A second "first" writer loses.
    assert!(!store.advance_cursor("acme", None, t1).await.unwrap());
    let c = store.cursor("acme").await.unwrap().unwrap();
    assert_eq!(c.value, t0);
    // Backwards or equal: refused.
    assert!(!store.advance_cursor("acme", Some(&c), t0).await.unwrap());
    assert!(
        !store
            .advance_cursor("acme", Some(&c), t0 - chrono::Duration::seconds(1))
            .await
            .unwrap()
    );
    assert!(store.advance_cursor("acme", Some(&c), t1).await.unwrap());
    // A stale read loses.
    assert!(
        !store
            .advance_cursor("acme", Some(&c), t1 + chrono::Duration::minutes(1))
            .await
            .unwrap()
    );
    assert_eq!(store.cursor("acme").await.unwrap().unwrap().value, t1);
    // Organizations are independent.
    assert_eq!(store.cursor("acme-labs").await.unwrap(), None);
}

async fn cursor_race_exactly_one_wins(kv: Kv) {
    let store = Store::from_arc(kv);
    let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    store.advance_cursor("acme", None, t0).await.unwrap();
    let read = store.cursor("acme").await.unwrap().unwrap();
    for round in 0..5 {
        let read = if round == 0 {
            read.clone()
        } else {
            store.cursor("acme").await.unwrap().unwrap()
        };
        let (a, b) = (store.clone(), store.clone());
        let (ra, rb) = (read.clone(), read.clone());
        let ta = read.value + chrono::Duration::minutes(1);
        let tb = read.value + chrono::Duration::minutes(2);
        let (wa, wb) = tokio::join!(
            tokio::spawn(async move { a.advance_cursor("acme", Some(&ra), ta).await.unwrap() }),
            tokio::spawn(async move { b.advance_cursor("acme", Some(&rb), tb).await.unwrap() }),
        );
        let (wa, wb) = (wa.unwrap(), wb.unwrap());
        assert!(wa ^ wb, "exactly one writer wins (a: {wa}, b: {wb})");
        let now = store.cursor("acme").await.unwrap().unwrap().value;
        assert_eq!(now, if wa { ta } else { tb });
    }
}

fn status(commit: &str, key: &str, version: u64, state: &str) -> StatusRecord {
    let bb_state = serde_json::from_value(json!(state)).unwrap_or(BitbucketState::Inprogress);
    StatusRecord {
        commit: commit.into(),
        key: key.into(),
        version: StatusVersion::from_legacy(version),
        state: state.into(),
        payload: StatusRequest {
            method: "POST".into(),
            path: format!("/rest/build-status/1.0/commits/{commit}"),
            body: StatusBody::new(
                key.into(),
                bb_state,
                format!("https://buildkite.com/acme/web/builds/{version}"),
                format!("v{version}"),
                String::new(),
            ),
            state: bb_state,
        },
        source: None,
    }
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const LEASE: Duration = Duration::from_secs(30);

async fn ledger_dedupes_and_never_regresses(kv: Kv) {
    let store = Store::from_arc(kv);
    let running = status(SHA, "acme/web", (7 << 8) | 3, "INPROGRESS");
    let passed = status(SHA, "acme/web", (7 << 8) | 7, "SUCCESSFUL");

    assert_eq!(
        store.begin_report(&running, LEASE).await.unwrap(),
        Begin::Post
    );
    assert_eq!(
        store
            .delivered(SHA, "acme/web", running.version)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .reported(SHA, "acme/web")
            .await
            .unwrap()
            .unwrap()
            .state,
        "INPROGRESS"
    );
    // The same status again: nothing to post.
    assert_eq!(
        store.begin_report(&running, LEASE).await.unwrap(),
        Begin::AlreadyReported
    );

    assert_eq!(
        store.begin_report(&passed, LEASE).await.unwrap(),
        Begin::Post
    );
    assert_eq!(
        store
            .delivered(SHA, "acme/web", passed.version)
            .await
            .unwrap(),
        None
    );
    // A late `running` after `passed` changes nothing.
    assert_eq!(
        store.begin_report(&running, LEASE).await.unwrap(),
        Begin::AlreadyReported
    );
    let r = store.reported(SHA, "acme/web").await.unwrap().unwrap();
    assert_eq!(
        (r.version, r.state.as_str()),
        (passed.version, "SUCCESSFUL")
    );

    // A rebuild (higher build number) replaces it.
    let rebuild = status(SHA, "acme/web", (8 << 8) | 2, "INPROGRESS");
    assert_eq!(
        store.begin_report(&rebuild, LEASE).await.unwrap(),
        Begin::Post
    );
    // Other keys and commits are independent.
    let other = status(SHA, "acme/api", (1 << 8) | 2, "INPROGRESS");
    assert_eq!(
        store.begin_report(&other, LEASE).await.unwrap(),
        Begin::Post
    );
    assert_eq!(store.reported(SHA, "acme/api").await.unwrap(), None);
}

async fn ledger_outbox_holds_what_is_not_delivered(kv: Kv) {
    let store = Store::from_arc(kv);
    let s = status(SHA, "acme/web", (3 << 8) | 3, "INPROGRESS");
    assert_eq!(
        store
            .begin_report(&s, Duration::from_secs(0))
            .await
            .unwrap(),
        Begin::Post
    );
    // Leased until now + 0: due at once, as if the poster had died.
    let due = store.due(Utc::now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].status, s);
    assert_eq!(due[0].attempts, 0);
    // A failed delivery is rescheduled, with the error kept.
    let later = Utc::now() + chrono::Duration::minutes(5);
    store
        .defer(SHA, "acme/web", s.version, later, "HTTP 503", false)
        .await
        .unwrap();
    assert!(store.due(Utc::now(), 10).await.unwrap().is_empty());
    let due = store.due(later, 10).await.unwrap();
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[0].last_error.as_deref(), Some("HTTP 503"));
    // Until delivered, the same status is still to be posted (not "already reported"), by
    // whoever holds it: the lease given above was 0 s, so it has run out and a retry takes over.
    assert_eq!(store.begin_report(&s, LEASE).await.unwrap(), Begin::Post);
    // ... and while that retry's lease runs, a concurrent reporter stands back.
    assert_eq!(
        store.begin_report(&s, LEASE).await.unwrap(),
        Begin::InFlight
    );
    store.delivered(SHA, "acme/web", s.version).await.unwrap();
    assert!(store.due(later, 10).await.unwrap().is_empty());

    // A leased entry is not due before its lease ends.
    let s2 = status(SHA, "acme/api", (3 << 8) | 3, "INPROGRESS");
    store.begin_report(&s2, LEASE).await.unwrap();
    assert!(store.due(Utc::now(), 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .due(Utc::now() + chrono::Duration::seconds(31), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Many entries: all listed, earliest first, limited.
    for i in 0..30u64 {
        let s = status(&format!("{:040x}", i + 1), "acme/web", 1 << 8, "INPROGRESS");
        store
            .begin_report(&s, Duration::from_secs(i))
            .await
            .unwrap();
    }
    let due = store
        .due(Utc::now() + chrono::Duration::hours(1), 1000)
        .await
        .unwrap();
    assert_eq!(due.len(), 31);
    assert!(
        due.windows(2)
            .all(|w| w[0].next_attempt_at <= w[1].next_attempt_at)
    );
    assert_eq!(
        store
            .due(Utc::now() + chrono::Duration::hours(1), 5)
            .await
            .unwrap()
            .len(),
        5
    );
}

async fn ledger_out_of_order_delivery_reposts_the_newest(kv: Kv) {
    let store = Store::from_arc(kv);
    let running = status(SHA, "acme/web", (5 << 8) | 3, "INPROGRESS");
    let passed = status(SHA, "acme/web", (5 << 8) | 7, "SUCCESSFUL");
    // Two deliveries in flight: running began first, passed second.
    assert_eq!(
        store.begin_report(&running, LEASE).await.unwrap(),
        Begin::Post
    );
    assert_eq!(
        store.begin_report(&passed, LEASE).await.unwrap(),
        Begin::Post
    );
    // An older one arriving now is superseded.
    let scheduled = status(SHA, "acme/web", (5 << 8) | 2, "INPROGRESS");
    assert_eq!(
        store.begin_report(&scheduled, LEASE).await.unwrap(),
        Begin::Superseded
    );
    // passed lands first, then running's post lands: running's poster must re-post passed.
    assert_eq!(
        store
            .delivered(SHA, "acme/web", passed.version)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .delivered(SHA, "acme/web", running.version)
            .await
            .unwrap(),
        Some(passed.clone())
    );
    let r = store.reported(SHA, "acme/web").await.unwrap().unwrap();
    assert_eq!(r.version, passed.version);
    assert!(
        store
            .due(Utc::now() + chrono::Duration::hours(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn ledger_an_unanswered_post_gets_the_newest_posted_after_it(kv: Kv) {
    let store = Store::from_arc(kv);
    let settle = Utc::now() + chrono::Duration::seconds(30);
    let due_after = |at| {
        let store = store.clone();
        async move { store.due(at, 10).await.unwrap() }
    };

    // 1. running's post times out (it may still land); passed comes and is delivered before
    //    running's post could have landed: passed goes out again after that.
    let running = status(SHA, "acme/web", (5 << 8) | 3, "INPROGRESS");
    let passed = status(SHA, "acme/web", (5 << 8) | 7, "SUCCESSFUL");
    store.begin_report(&running, LEASE).await.unwrap();
    store
        .defer(SHA, "acme/web", running.version, settle, "timed out", true)
        .await
        .unwrap();
    assert_eq!(
        store.begin_report(&passed, LEASE).await.unwrap(),
        Begin::Post
    );
    assert_eq!(
        store
            .delivered(SHA, "acme/web", passed.version)
            .await
            .unwrap(),
        None
    );
    assert!(
        due_after(Utc::now()).await.is_empty(),
        "not before it can land"
    );
    let due = due_after(settle).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].status, passed);
    // A poll cycle or a webhook that sees passed meanwhile does not post it before then.
    assert_eq!(
        store.begin_report(&passed, LEASE).await.unwrap(),
        Begin::InFlight
    );
    // Until re-posted, it is wanted, not "already reported".
    assert_eq!(
        store
            .standing(SHA, "acme/web", passed.version)
            .await
            .unwrap(),
        Standing::Wanted
    );
    // The re-post is delivered: done, nothing more.
    assert_eq!(
        store
            .delivered(SHA, "acme/web", passed.version)
            .await
            .unwrap(),
        None
    );
    assert!(
        due_after(settle + chrono::Duration::hours(1))
            .await
            .is_empty()
    );
    assert_eq!(
        store
            .standing(SHA, "acme/web", passed.version)
            .await
            .unwrap(),
        Standing::AlreadyReported
    );

    // 2. The other order: passed was delivered while running's post hung; running's post then
    //    times out: passed goes back in the outbox, due once running's post can have landed.
    let other = "acme/api";
    let running = status(SHA, other, (6 << 8) | 3, "INPROGRESS");
    let passed = status(SHA, other, (6 << 8) | 7, "SUCCESSFUL");
    store.begin_report(&running, LEASE).await.unwrap();
    store.begin_report(&passed, LEASE).await.unwrap();
    store.delivered(SHA, other, passed.version).await.unwrap();
    store
        .defer(SHA, other, running.version, settle, "timed out", true)
        .await
        .unwrap();
    assert!(due_after(Utc::now()).await.is_empty());
    let due = due_after(settle).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].status, passed);
    assert_eq!(
        store.begin_report(&passed, LEASE).await.unwrap(),
        Begin::InFlight
    );

    // 3. A post that failed for sure (not ambiguous) asks for nothing more.
    let key = "acme/docs";
    let running = status(SHA, key, (7 << 8) | 3, "INPROGRESS");
    let passed = status(SHA, key, (7 << 8) | 7, "SUCCESSFUL");
    store.begin_report(&running, LEASE).await.unwrap();
    store
        .defer(SHA, key, running.version, settle, "HTTP 503", false)
        .await
        .unwrap();
    store.begin_report(&passed, LEASE).await.unwrap();
    store.delivered(SHA, key, passed.version).await.unwrap();
    let due = due_after(settle + chrono::Duration::hours(1)).await;
    assert!(due.iter().all(|p| p.status.key != key), "{due:?}");
}

async fn ledger_race_keeps_the_newest(kv: Kv) {
    let store = Store::from_arc(kv);
    let mut tasks = Vec::new();
    for rank in 1..=7u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = status(SHA, "acme/web", (9 << 8) | rank, &format!("S{rank}"));
            let b = store.begin_report(&s, LEASE).await.unwrap();
            if b == Begin::Post {
                let mut newer = store.delivered(SHA, "acme/web", s.version).await.unwrap();
                while let Some(n) = newer {
                    newer = store.delivered(SHA, "acme/web", n.version).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = store.reported(SHA, "acme/web").await.unwrap().unwrap();
    assert_eq!(r.version, StatusVersion::from_legacy((9 << 8) | 7));
    assert_eq!(r.state, "S7");
    assert!(
        store
            .due(Utc::now() + chrono::Duration::hours(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn firing_once_per_source_build(kv: Kv) {
    let store = Store::from_arc(kv);
    let FiringClaim::Won { rev } = store
        .claim_firing("deploy", "build-1", LEASE)
        .await
        .unwrap()
    else {
        panic!("first claim must win");
    };
    assert!(matches!(
        store
            .claim_firing("deploy", "build-1", LEASE)
            .await
            .unwrap(),
        FiringClaim::Taken(Firing::Claimed { .. })
    ));
    // Giving up lets a retry claim it.
    store
        .release_firing("deploy", "build-1", rev)
        .await
        .unwrap();
    let FiringClaim::Won { rev } = store
        .claim_firing("deploy", "build-1", LEASE)
        .await
        .unwrap()
    else {
        panic!("claim after release must win");
    };
    store
        .record_fired(
            "deploy",
            "build-1",
            rev,
            json!({"pipeline": "cd", "number": 3}),
        )
        .await
        .unwrap();
    let taken = store
        .claim_firing("deploy", "build-1", LEASE)
        .await
        .unwrap();
    assert!(
        matches!(&taken, FiringClaim::Taken(Firing::Fired { target, .. }) if target["number"] == 3)
    );
    // Another rule, or another source build, is independent.
    assert!(matches!(
        store
            .claim_firing("notify", "build-1", LEASE)
            .await
            .unwrap(),
        FiringClaim::Won { .. }
    ));
    // A lapsed claim (its owner died) can be taken over.
    assert!(matches!(
        store
            .claim_firing("deploy", "build-2", Duration::ZERO)
            .await
            .unwrap(),
        FiringClaim::Won { .. }
    ));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(
        store
            .claim_firing("deploy", "build-2", LEASE)
            .await
            .unwrap(),
        FiringClaim::Won { .. }
    ));
}

async fn firing_race_exactly_one_wins(kv: Kv) {
    let store = Store::from_arc(kv);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .claim_firing("deploy", "build-9", LEASE)
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), FiringClaim::Won { .. }) {
            won += 1;
        }
    }
    assert_eq!(won, 1);
}

async fn idempotency_replays_the_first_answer(kv: Kv) {
    let store = Store::from_arc(kv);
    let IdempotencyBegin::New { rev } = store
        .idempotency_begin("cut", "k1", "fp1", LEASE)
        .await
        .unwrap()
    else {
        panic!("first use must be new");
    };
    assert_eq!(
        store
            .idempotency_begin("cut", "k1", "fp1", LEASE)
            .await
            .unwrap(),
        IdempotencyBegin::InFlight
    );
    assert_eq!(
        store
            .idempotency_begin("cut", "k1", "other", LEASE)
            .await
            .unwrap(),
        IdempotencyBegin::Mismatch
    );
    let answer = StoredResponse {
        status: 201,
        body: json!({"version": "1.0.0-rc1"}),
    };
    store
        .idempotency_finish("cut", "k1", rev, &answer)
        .await
        .unwrap();
    assert_eq!(
        store
            .idempotency_begin("cut", "k1", "fp1", LEASE)
            .await
            .unwrap(),
        IdempotencyBegin::Replay(answer)
    );
    // Abandoned keys run again.
    let IdempotencyBegin::New { rev } = store
        .idempotency_begin("cut", "k2", "fp", LEASE)
        .await
        .unwrap()
    else {
        panic!("new key");
    };
    store.idempotency_abandon("cut", "k2", rev).await.unwrap();
    assert!(matches!(
        store
            .idempotency_begin("cut", "k2", "fp", LEASE)
            .await
            .unwrap(),
        IdempotencyBegin::New { .. }
    ));
    // Scopes are independent.
    assert!(matches!(
        store
            .idempotency_begin("deploy", "k1", "fp1", LEASE)
            .await
            .unwrap(),
        IdempotencyBegin::New { .. }
    ));
}

fn project(name: &str) -> Project {
    Project {
        name: name.into(),
        build_pipeline: Some(PipelineRef {
            organization: "acme".into(),
            pipeline: "web-release".into(),
        }),
        environments: vec![Environment {
            name: "staging".into(),
            deploy_pipeline: None,
            requires: None,
            env: BTreeMap::new(),
        }],
        repository: None,
        paths: Vec::new(),
        version_scheme: VersionScheme::Semver,
        env: BTreeMap::from([("REGION".to_string(), "eu".to_string())]),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}

fn release(project: &str, version: &str) -> (Release, Candidate) {
    let cut_id = ulid::Ulid::new().to_string();
    let now = Utc::now();
    let r = Release {
        project: project.into(),
        version: version.into(),
        cut_id: cut_id.clone(),
        commit: SHA.into(),
        branch: "main".into(),
        created_at: now,
    };
    let c = candidate(project, version, 1, &cut_id);
    (r, c)
}

fn candidate(project: &str, version: &str, number: u32, cut_id: &str) -> Candidate {
    Candidate {
        project: project.into(),
        release_version: version.into(),
        number,
        version: format!("{version}-rc{number}"),
        cut_id: cut_id.into(),
        commit: SHA.into(),
        branch: "main".into(),
        state: CandidateState::Pending,
        build: None,
        build_state: None,
        error_message: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}

async fn recent_rings_are_bounded_newest_first(kv: Kv) {
    use kitebridge::store::{Ring, StatusLedger};
    let store = Store::from_arc(kv);
    assert!(store.recent(Ring::Refused).await.unwrap().is_empty());
    for i in 0..3 {
        store
            .note_recent(Ring::Refused, serde_json::json!({"n": i}))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let got = store.recent(Ring::Refused).await.unwrap();
    let ns: Vec<_> = got.iter().map(|v| v["n"].clone()).collect();
    assert_eq!(ns, [2, 1, 0]);
    assert!(got[0]["at"].is_string());
    // Other rings are apart; a ring never holds more than its size.
    assert!(store.recent(Ring::Posted).await.unwrap().is_empty());
    for i in 0..(Ring::PollCycles.size() + 5) {
        store
            .note_recent(Ring::PollCycles, serde_json::json!({"n": i}))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cycles = store.recent(Ring::PollCycles).await.unwrap();
    assert!(cycles.len() <= Ring::PollCycles.size());
    assert_eq!(cycles[0]["n"], Ring::PollCycles.size() + 4);
    // Exactly the newest, in order, however close together they came.
    let ns: Vec<usize> = cycles
        .iter()
        .map(|v| v["n"].as_u64().unwrap() as usize)
        .collect();
    let newest: Vec<usize> = (5..Ring::PollCycles.size() + 5).rev().collect();
    assert_eq!(ns, newest);
    for i in 0..30 {
        store
            .note_recent(Ring::Posted, serde_json::json!({"n": i}))
            .await
            .unwrap();
    }
    let posted = store.recent(Ring::Posted).await.unwrap();
    assert_eq!(posted.len(), 30);
    assert_eq!(posted[0]["n"], 29);
    assert_eq!(posted[29]["n"], 0);
}

async fn projects_listed_and_deleted(kv: Kv) {
    let store = Store::from_arc(kv);
    let empty = store.list_projects(None, 10).await.unwrap();
    assert!(empty.items.is_empty() && empty.next.is_none());
    let mut revs = std::collections::HashMap::new();
    for name in ["web", "api", "zeta"] {
        revs.insert(name, store.put_project(&project(name), None).await.unwrap());
    }
    // An update is listed as it is now (written in the same batch as the project).
    let mut web = project("web");
    web.env.insert("X".into(), "y".into());
    let web_rev = store.put_project(&web, Some(revs["web"])).await.unwrap();
    let p1 = store.list_projects(None, 2).await.unwrap();
    let names = |items: &[Project]| items.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&p1.items), ["api", "web"]);
    assert_eq!(p1.items[1], web);
    assert_eq!(p1.next.as_deref(), Some("web"));
    let p2 = store.list_projects(p1.next.as_deref(), 2).await.unwrap();
    assert_eq!(names(&p2.items), ["zeta"]);
    assert_eq!(p2.next, None);

    // Deleting takes every record of the project, and only that project's.
    let (r, c) = release("web", "1.0.0");
    store.create_release(&r, &c).await.unwrap();
    let (other, other_c) = release("api", "1.0.0");
    store.create_release(&other, &other_c).await.unwrap();
    assert!(matches!(
        store.delete_project("web", web_rev + 1).await,
        Err(StoreError::Conflict)
    ));
    store.delete_project("web", web_rev).await.unwrap();
    assert_eq!(store.project("web").await.unwrap(), None);
    assert_eq!(store.release("web", "1.0.0").await.unwrap(), None);
    assert!(store.candidates("web", "1.0.0").await.unwrap().is_empty());
    assert_eq!(
        names(&store.list_projects(None, 10).await.unwrap().items),
        ["api", "zeta"]
    );
    assert_eq!(store.release("api", "1.0.0").await.unwrap(), Some(other));
    // Created again, it starts empty.
    store.put_project(&project("web"), None).await.unwrap();
    assert!(
        store
            .list_releases("web", None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

async fn releases_projects_and_versions(kv: Kv) {
    let store = Store::from_arc(kv);
    assert_eq!(store.project("web").await.unwrap(), None);
    let p = project("web");
    let rev = store.put_project(&p, None).await.unwrap();
    assert!(matches!(
        store.put_project(&p, None).await,
        Err(StoreError::Conflict)
    ));
    let got = store.project("web").await.unwrap().unwrap();
    assert_eq!(got.value, p);
    let mut p2 = p.clone();
    p2.env.insert("X".into(), "y".into());
    let rev2 = store.put_project(&p2, Some(rev)).await.unwrap();
    assert!(matches!(
        store.put_project(&p2, Some(rev)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.project("web").await.unwrap().unwrap(),
        Versioned {
            rev: rev2,
            value: p2
        }
    );

    // Releases: unique versions, newest first, paginated.
    let mut versions = Vec::new();
    for i in 0..7 {
        let v = format!("1.{i}.0");
        let (r, c) = release("web", &v);
        store.create_release(&r, &c).await.unwrap();
        versions.push(v);
        // ULIDs made in the same millisecond are not ordered; keep cuts apart.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (dup, dup_c) = release("web", "1.3.0");
    assert!(matches!(
        store.create_release(&dup, &dup_c).await,
        Err(StoreError::Conflict)
    ));
    let page1 = store.list_releases("web", None, 3).await.unwrap();
    let got: Vec<&str> = page1.items.iter().map(|r| r.version.as_str()).collect();
    assert_eq!(got, vec!["1.6.0", "1.5.0", "1.4.0"]);
    let page2 = store
        .list_releases("web", page1.next.as_deref(), 3)
        .await
        .unwrap();
    let got: Vec<&str> = page2.items.iter().map(|r| r.version.as_str()).collect();
    assert_eq!(got, vec!["1.3.0", "1.2.0", "1.1.0"]);
    let page3 = store
        .list_releases("web", page2.next.as_deref(), 3)
        .await
        .unwrap();
    assert_eq!(page3.items.len(), 1);
    assert_eq!(page3.next, None);
    assert_eq!(
        store
            .release("web", "1.2.0")
            .await
            .unwrap()
            .unwrap()
            .version,
        "1.2.0"
    );
    assert!(
        store
            .list_releases("other", None, 3)
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Candidates: numbered, unique, compare-and-set updates.
    let cut = store.release("web", "1.2.0").await.unwrap().unwrap().cut_id;
    store
        .add_candidate(&candidate("web", "1.2.0", 2, &cut))
        .await
        .unwrap();
    assert!(matches!(
        store
            .add_candidate(&candidate("web", "1.2.0", 2, &cut))
            .await,
        Err(StoreError::Conflict)
    ));
    let cands = store.candidates("web", "1.2.0").await.unwrap();
    assert_eq!(
        cands.iter().map(|c| c.value.number).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let c2 = store.candidate("web", "1.2.0", 2).await.unwrap().unwrap();
    let mut building = c2.value.clone();
    building.state = CandidateState::Building;
    let rev = store.update_candidate(&building, c2.rev).await.unwrap();
    assert!(matches!(
        store.update_candidate(&building, c2.rev).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.candidate("web", "1.2.0", 2).await.unwrap().unwrap(),
        Versioned {
            rev,
            value: building
        }
    );
    // 1.2.0's candidates do not include 1.2.0x's (prefix boundaries hold).
    let (r, c) = release("web", "1.2.0x");
    store.create_release(&r, &c).await.unwrap();
    assert_eq!(store.candidates("web", "1.2.0").await.unwrap().len(), 2);
}

async fn releases_version_race_exactly_one_wins(kv: Kv) {
    let store = Store::from_arc(kv);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let (r, c) = release("web", "2.0.0");
            store.create_release(&r, &c).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        store
            .list_releases("web", None, 10)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

async fn releases_candidate_race_exactly_one_wins(kv: Kv) {
    let store = Store::from_arc(kv);
    let (r, c) = release("web", "3.0.0");
    store.create_release(&r, &c).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (store, cut) = (store.clone(), r.cut_id.clone());
        tasks.push(tokio::spawn(async move {
            store
                .add_candidate(&candidate("web", "3.0.0", 2, &cut))
                .await
        }));
    }
    let wins = futures_count(tasks).await;
    assert_eq!(wins, 1);
    assert_eq!(store.candidates("web", "3.0.0").await.unwrap().len(), 2);
}

async fn futures_count(tasks: Vec<tokio::task::JoinHandle<Result<(), StoreError>>>) -> usize {
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    won
}

fn deployment(id: &str, env: &str) -> Deployment {
    Deployment {
        id: id.into(),
        project: "web".into(),
        environment: env.into(),
        release_version: "1.0.0".into(),
        candidate_version: "1.0.0-rc1".into(),
        commit: SHA.into(),
        status: DeploymentStatus::Pending,
        build: None,
        from_candidate_version: None,
        rollback: false,
        forced: false,
        created_at: Utc::now(),
        updated_at: Utc::now(),
        finished_at: None,
        error_message: None,
    }
}

async fn deployments_one_active_per_environment(kv: Kv) {
    let store = Store::from_arc(kv);
    assert_eq!(store.environment("web", "prod").await.unwrap(), None);
    // Two deployments race to start in one environment: the environment's state is the lock.
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let env = store.environment("web", "prod").await.unwrap();
            if env
                .as_ref()
                .is_some_and(|e| e.value.active_deployment.is_some())
            {
                return Err(StoreError::Conflict);
            }
            let id = ulid::Ulid::new().to_string();
            let mut state = env
                .as_ref()
                .map(|e| e.value.clone())
                .unwrap_or(EnvironmentState {
                    project: "web".into(),
                    environment: "prod".into(),
                    frozen: false,
                    freeze_reason: None,
                    active_deployment: None,
                    successes: vec![],
                });
            state.active_deployment = Some(id.clone());
            store
                .create_deployment(&deployment(&id, "prod"), &state, env.map(|e| e.rev))
                .await
        }));
    }
    assert_eq!(futures_count(tasks).await, 1);
    let env = store.environment("web", "prod").await.unwrap().unwrap();
    let active = env.value.active_deployment.clone().unwrap();
    let d = store
        .deployment("web", "prod", &active)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.value.status, DeploymentStatus::Pending);

    // Finishing it frees the environment, atomically with the deployment's update.
    let mut done = d.value.clone();
    done.status = DeploymentStatus::Success;
    let mut state = env.value.clone();
    state.active_deployment = None;
    state.successes.push(done.candidate_version.clone());
    store
        .update_deployment(&done, d.rev, Some((&state, Some(env.rev))))
        .await
        .unwrap();
    // A stale environment rev fails the whole write.
    let mut again = done.clone();
    again.error_message = Some("x".into());
    let d2 = store
        .deployment("web", "prod", &active)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        store
            .update_deployment(&again, d2.rev, Some((&state, Some(env.rev))))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .deployment("web", "prod", &active)
            .await
            .unwrap()
            .unwrap()
            .value
            .error_message,
        None
    );
    let env = store.environment("web", "prod").await.unwrap().unwrap();
    assert_eq!(env.value.active_deployment, None);
    assert_eq!(env.value.successes, vec!["1.0.0-rc1".to_string()]);

    // Listing: newest first, paginated, per environment.
    let mut ids = vec![active];
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let id = ulid::Ulid::new().to_string();
        let env = store.environment("web", "prod").await.unwrap().unwrap();
        store
            .create_deployment(&deployment(&id, "prod"), &env.value, Some(env.rev))
            .await
            .unwrap();
        ids.push(id);
    }
    store
        .create_deployment(
            &deployment(&ulid::Ulid::new().to_string(), "staging"),
            &EnvironmentState {
                project: "web".into(),
                environment: "staging".into(),
                frozen: false,
                freeze_reason: None,
                active_deployment: None,
                successes: vec![],
            },
            None,
        )
        .await
        .unwrap();
    ids.reverse();
    let p1 = store
        .list_deployments("web", "prod", None, 3)
        .await
        .unwrap();
    assert_eq!(
        p1.items
            .iter()
            .map(|d| d.value.id.clone())
            .collect::<Vec<_>>(),
        ids[..3].to_vec()
    );
    let p2 = store
        .list_deployments("web", "prod", p1.next.as_deref(), 3)
        .await
        .unwrap();
    assert_eq!(
        p2.items
            .iter()
            .map(|d| d.value.id.clone())
            .collect::<Vec<_>>(),
        ids[3..].to_vec()
    );
    assert_eq!(p2.next, None);
}

async fn build_links(kv: Kv) {
    let store = Store::from_arc(kv);
    assert_eq!(store.build_link("b-1").await.unwrap(), None);
    let link = BuildLink::Candidate {
        project: "web".into(),
        release_version: "1.0.0".into(),
        number: 2,
    };
    store.link_build("b-1", &link).await.unwrap();
    assert_eq!(store.build_link("b-1").await.unwrap(), Some(link));
    let dlink = BuildLink::Deployment {
        project: "web".into(),
        environment: "prod".into(),
        id: "01J".into(),
    };
    store.link_build("b-2", &dlink).await.unwrap();
    assert_eq!(store.build_link("b-2").await.unwrap(), Some(dlink));
}

/// The index of active deployments (for the stuck-deployment sweep) is written with each
/// environment state, so it lists exactly the environments whose state names an active one.
async fn active_deployment_index_follows_environment_state(kv: Kv) {
    let store = Store::from_arc(kv);
    let listed = |p: Page<ActiveDeployment>| {
        p.items
            .into_iter()
            .map(|a| (a.project, a.environment, a.id))
            .collect::<Vec<_>>()
    };
    assert!(
        store
            .active_deployments(None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let state = |env: &str, active: Option<&str>| EnvironmentState {
        project: "web".into(),
        environment: env.into(),
        frozen: false,
        freeze_reason: None,
        active_deployment: active.map(str::to_string),
        successes: vec![],
    };
    // create_deployment adds the entry.
    store
        .create_deployment(&deployment("d1", "prod"), &state("prod", Some("d1")), None)
        .await
        .unwrap();
    store
        .create_deployment(
            &deployment("d2", "staging"),
            &state("staging", Some("d2")),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        listed(store.active_deployments(None, 10).await.unwrap()),
        vec![
            ("web".into(), "prod".into(), "d1".into()),
            ("web".into(), "staging".into(), "d2".into())
        ]
    );
    // Paging.
    let p1 = store.active_deployments(None, 1).await.unwrap();
    assert_eq!(p1.items.len(), 1);
    let p2 = store
        .active_deployments(p1.next.as_deref(), 1)
        .await
        .unwrap();
    assert_eq!(p2.items[0].id, "d2");
    // A failed (conditional) write changes nothing, the index included.
    let d1 = store
        .deployment("web", "prod", "d1")
        .await
        .unwrap()
        .unwrap();
    let env = store.environment("web", "prod").await.unwrap().unwrap();
    let mut done = d1.value.clone();
    done.status = DeploymentStatus::Success;
    assert!(matches!(
        store
            .update_deployment(
                &done,
                d1.rev,
                Some((&state("prod", None), Some(env.rev + 7)))
            )
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .active_deployments(None, 10)
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    // update_deployment that clears the lock removes the entry.
    store
        .update_deployment(&done, d1.rev, Some((&state("prod", None), Some(env.rev))))
        .await
        .unwrap();
    assert_eq!(
        listed(store.active_deployments(None, 10).await.unwrap()),
        vec![("web".into(), "staging".into(), "d2".into())]
    );
    // put_environment keeps it too (and clearing an absent entry is fine).
    let env = store.environment("web", "staging").await.unwrap().unwrap();
    store
        .put_environment(&state("staging", None), Some(env.rev))
        .await
        .unwrap();
    store
        .put_environment(&state("qa", None), None)
        .await
        .unwrap();
    assert!(
        store
            .active_deployments(None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

async fn rules_put_get_list_delete(kv: Kv) {
    let store = Store::from_arc(kv);
    assert_eq!(store.rules().await.unwrap(), vec![]);
    assert_eq!(store.rule("deploy").await.unwrap(), None);
    let doc = json!({"rule": "pipeline.trigger_build.pipeline",
        "value": {"source_pipeline": "web", "target_pipeline": "deploy"}});
    let rule = |name: &str, doc: &serde_json::Value| StoredRule {
        name: name.into(),
        document: doc.clone(),
        updated_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
    };
    assert!(
        store.put_rule(&rule("deploy", &doc)).await.unwrap(),
        "created"
    );
    assert!(store.put_rule(&rule("alpha", &doc)).await.unwrap());
    let mut changed = doc.clone();
    changed["value"]["conditions"] = json!(["source.build.branch == 'main'"]);
    assert!(
        !store.put_rule(&rule("deploy", &changed)).await.unwrap(),
        "replaced"
    );
    assert_eq!(
        store.rule("deploy").await.unwrap(),
        Some(rule("deploy", &changed))
    );
    let names: Vec<String> = store
        .rules()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["alpha", "deploy"], "by name");
    assert!(store.delete_rule("deploy").await.unwrap());
    assert!(!store.delete_rule("deploy").await.unwrap(), "already gone");
    assert_eq!(store.rule("deploy").await.unwrap(), None);
    assert_eq!(store.rules().await.unwrap().len(), 1);

    // Concurrent writers of one name: every write lands, one of them created it.
    let created: Vec<bool> = futures_join(
        (0..8)
            .map(|i| {
                let store = store.clone();
                let mut d = doc.clone();
                d["value"]["target_pipeline"] = json!(format!("t{i}"));
                async move { store.put_rule(&rule("raced", &d)).await.unwrap() }
            })
            .collect(),
    )
    .await;
    assert_eq!(created.iter().filter(|c| **c).count(), 1);
}

async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futures: Vec<F>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn pending_firings_lifecycle(kv: Kv) {
    let store = Store::from_arc(kv);
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let pending = |rule: &str, build: &str, due: chrono::DateTime<Utc>| PendingFiring {
        rule: rule.into(),
        source_build: build.into(),
        source: "acme/web#1".into(),
        target_organization: "acme".into(),
        target_pipeline: "deploy".into(),
        request: CreateBuild {
            commit: "abc".into(),
            branch: "main".into(),
            message: String::new(),
            env: Default::default(),
            meta_data: Default::default(),
        },
        created_at: t0,
        attempted_at: None,
        attempts: 0,
        next_attempt_at: due,
        last_error: None,
    };
    let a = pending("deploy", "b1", t0);
    assert!(store.add_pending(&a).await.unwrap());
    let mut other = a.clone();
    other.request.commit = "zzz".into();
    assert!(!store.add_pending(&other).await.unwrap(), "the first stays");
    assert_eq!(
        store.pending("deploy", "b1").await.unwrap(),
        Some(a.clone())
    );
    assert!(
        store
            .add_pending(&pending("deploy", "b2", t0 + chrono::Duration::minutes(5)))
            .await
            .unwrap()
    );
    assert!(
        store
            .add_pending(&pending("other", "b1", t0 - chrono::Duration::minutes(1)))
            .await
            .unwrap()
    );

    let due: Vec<(String, String)> = store
        .due_pending(t0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.rule, p.source_build))
        .collect();
    assert_eq!(
        due,
        vec![
            ("other".into(), "b1".into()),
            ("deploy".into(), "b1".into())
        ],
        "due only, oldest due first"
    );
    assert_eq!(store.due_pending(t0, 1).await.unwrap().len(), 1);

    // The first attempt time is kept.
    let t1 = t0 + chrono::Duration::seconds(30);
    let marked = store
        .mark_attempted("deploy", "b1", t1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(marked.attempted_at, Some(t1));
    let again = store
        .mark_attempted("deploy", "b1", t1 + chrono::Duration::hours(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempted_at, Some(t1));
    assert_eq!(
        store.mark_attempted("deploy", "nope", t1).await.unwrap(),
        None
    );

    store
        .defer_pending(
            "deploy",
            "b1",
            "Buildkite answered 502",
            t0 + chrono::Duration::hours(2),
        )
        .await
        .unwrap();
    let p = store.pending("deploy", "b1").await.unwrap().unwrap();
    assert_eq!(p.attempts, 1);
    assert_eq!(p.last_error.as_deref(), Some("Buildkite answered 502"));
    assert_eq!(p.attempted_at, Some(t1));
    assert_eq!(
        store
            .due_pending(t0 + chrono::Duration::minutes(10), 10)
            .await
            .unwrap()
            .len(),
        2
    );

    store.remove_pending("deploy", "b1").await.unwrap();
    store.remove_pending("deploy", "b1").await.unwrap();
    assert_eq!(store.pending("deploy", "b1").await.unwrap(), None);
    // Rules and pending firings live apart.
    assert_eq!(store.rules().await.unwrap(), vec![]);
}
