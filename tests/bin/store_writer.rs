//! Test helper: writes items one by one into an embedded store file and prints the index of each
//! committed write, so a test can `kill -9` it mid-stream and check nothing committed was lost.

use kitebridge::store::{Cond, Item, Kv, SqliteKv, Write};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(count)) = (args.next(), args.next().and_then(|c| c.parse::<u64>().ok()))
    else {
        eprintln!("usage: store-writer DB_FILE COUNT");
        std::process::exit(2);
    };
    let kv = SqliteKv::open(&path).unwrap_or_else(|e| {
        eprintln!("store-writer: {e}");
        std::process::exit(1);
    });
    for i in 0..count {
        let item = Item {
            pk: "CRASH".into(),
            sk: format!("{i:08}"),
            rev: 1,
            doc: format!("{{\"i\":{i}}}"),
            expires_at: None,
        };
        if let Err(e) = kv
            .write(vec![Write::Put {
                item,
                cond: Cond::Absent,
            }])
            .await
        {
            eprintln!("store-writer: {e}");
            std::process::exit(1);
        }
        // Printed only after the commit returned.
        println!("{i}");
    }
}
