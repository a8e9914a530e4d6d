//! The embedded store loses nothing that was committed when its process is killed with
//! SIGKILL mid-stream (WAL mode), and a reopened file sees everything.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kitebridge::store::{Kv, Order, SqliteKv};

#[tokio::test]
async fn kill_9_loses_nothing_committed() {
    let dir = std::env::temp_dir().join(format!("kitebridge-crash-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("store.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
        .arg(&db)
        .arg("1000000")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start store-writer");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut committed = Vec::new();
    while committed.len() < 300 {
        let line = lines.next().expect("writer ended early").unwrap();
        committed.push(line.parse::<u64>().unwrap());
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();

    let kv = SqliteKv::open(&db).unwrap();
    let stored = kv
        .query("CRASH", "", None, usize::MAX >> 1, Order::Ascending)
        .await
        .unwrap();
    assert!(
        stored.len() >= committed.len(),
        "{} stored < {} committed",
        stored.len(),
        committed.len()
    );
    for i in &committed {
        assert!(
            kv.get("CRASH", &format!("{i:08}")).await.unwrap().is_some(),
            "committed write {i} was lost"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_embedded_store_reclaims_expired_records() {
    use kitebridge::store::{Cond, Item, Write};
    let kv = SqliteKv::in_memory().unwrap();
    let item = |sk: &str, expires_at| Item {
        pk: "P".into(),
        sk: sk.into(),
        rev: 1,
        doc: "{}".into(),
        expires_at,
    };
    let past = chrono::Utc::now().timestamp() - 5;
    kv.write(vec![
        Write::Put {
            item: item("old", Some(past)),
            cond: Cond::Always,
        },
        Write::Put {
            item: item("kept", None),
            cond: Cond::Always,
        },
    ])
    .await
    .unwrap();
    assert_eq!(kv.purge_expired().await.unwrap(), 1);
    assert_eq!(kv.purge_expired().await.unwrap(), 0);
    assert!(kv.get("P", "kept").await.unwrap().is_some());
}
