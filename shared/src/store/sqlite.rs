//! The embedded backend for `kitebridge serve`: one SQLite file in WAL mode.
//!
//! Durability: every batch is one `BEGIN IMMEDIATE` transaction. With WAL and
//! `synchronous=NORMAL` a committed transaction is in the WAL file before `COMMIT` returns, so a
//! `kill -9` of the process loses nothing committed (only a power loss can drop the last
//! transactions, which the poller's overlap then redoes). Conditions are checked inside the write
//! transaction, so concurrent tasks, and other processes on the same file, cannot interleave
//! between check and write.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::StoreError;
use super::kv::{Cond, Item, Kv, MAX_BATCH, Order, Write, now_epoch};

/// SQLite-backed [`Kv`]. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct SqliteKv {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteKv")
            .field("path", &self.path)
            .finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    rev INTEGER NOT NULL,
    doc TEXT NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (pk, sk)
) WITHOUT ROWID;
";

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

impl SqliteKv {
    /// Opens (creating if needed) the store file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteKv, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(&path)
            .map_err(|e| StoreError::Config(format!("cannot open {}: {e}", path.display())))?;
        Self::setup(conn, path)
    }

    /// A private in-memory store (tests, dry runs).
    pub fn in_memory() -> Result<SqliteKv, StoreError> {
        let conn = Connection::open_in_memory().map_err(unavailable)?;
        Self::setup(conn, PathBuf::from(":memory:"))
    }

    fn setup(conn: Connection, path: PathBuf) -> Result<SqliteKv, StoreError> {
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(unavailable)?;
        // journal_mode answers with a row, so it is read rather than executed.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(unavailable)?;
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        let kv = SqliteKv {
            conn: Arc::new(Mutex::new(conn)),
            path,
        };
        kv.purge_expired_blocking()?;
        Ok(kv)
    }

    fn purge_expired_blocking(&self) -> Result<usize, StoreError> {
        let conn = self.lock()?;
        conn.execute(
            "DELETE FROM items WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            [now_epoch()],
        )
        .map_err(unavailable)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        // A poisoned lock means a panic happened while holding it; SQLite's own transaction
        // rolled back, so the connection is still consistent and safe to reuse.
        Ok(self.conn.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("sqlite worker: {e}")))?
}

fn row_to_item(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    Ok(Item {
        pk: r.get(0)?,
        sk: r.get(1)?,
        rev: r.get::<_, i64>(2)? as u64,
        doc: r.get(3)?,
        expires_at: r.get(4)?,
    })
}

const LIVE: &str = "(expires_at IS NULL OR expires_at > ?)";

#[async_trait]
impl Kv for SqliteKv {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let (this, pk, sk) = (self.clone(), pk.to_string(), sk.to_string());
        blocking(move || {
            let conn = this.lock()?;
            conn.query_row(
                &format!("SELECT pk, sk, rev, doc, expires_at FROM items WHERE pk = ?1 AND sk = ?2 AND {LIVE}"),
                params![pk, sk, now_epoch()],
                row_to_item,
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        if writes.len() > MAX_BATCH {
            return Err(StoreError::Config(format!(
                "a batch holds at most {MAX_BATCH} writes"
            )));
        }
        let this = self.clone();
        blocking(move || {
            let mut conn = this.lock()?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let now = now_epoch();
            for w in &writes {
                let (pk, sk, cond) = match w {
                    Write::Put { item, cond } => (&item.pk, &item.sk, *cond),
                    Write::Delete { pk, sk, cond } => (pk, sk, *cond),
                };
                let current: Option<u64> = tx
                    .query_row(
                        &format!("SELECT rev FROM items WHERE pk = ?1 AND sk = ?2 AND {LIVE}"),
                        params![pk, sk, now],
                        |r| r.get::<_, i64>(0).map(|v| v as u64),
                    )
                    .optional()
                    .map_err(unavailable)?;
                let ok = match cond {
                    Cond::Always => true,
                    Cond::Absent => current.is_none(),
                    Cond::Rev(rev) => current == Some(rev),
                };
                if !ok {
                    // Dropping `tx` rolls back the writes already made in this batch.
                    return Err(StoreError::Conflict);
                }
                match w {
                    Write::Put { item, .. } => tx.execute(
                        "INSERT OR REPLACE INTO items (pk, sk, rev, doc, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![item.pk, item.sk, item.rev as i64, item.doc, item.expires_at],
                    ),
                    Write::Delete { pk, sk, .. } => {
                        tx.execute("DELETE FROM items WHERE pk = ?1 AND sk = ?2", params![pk, sk])
                    }
                }
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn query(
        &self,
        pk: &str,
        sk_prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Item>, StoreError> {
        let (this, pk, prefix, after) = (
            self.clone(),
            pk.to_string(),
            sk_prefix.to_string(),
            after.map(str::to_string),
        );
        blocking(move || {
            let conn = this.lock()?;
            let (cmp, dir) = match order {
                Order::Ascending => (">", "ASC"),
                Order::Descending => ("<", "DESC"),
            };
            let after_clause = if after.is_some() {
                format!("AND sk {cmp} ?5")
            } else {
                "AND ?5 IS NULL".into()
            };
            // Sort keys compare as UTF-8 bytes (SQLite's BINARY collation), as DynamoDB's do.
            // The range [prefix, prefix + U+10FFFF) lets SQLite seek the primary key to the
            // prefix instead of reading the whole partition; `substr` keeps the match exact.
            let sql = format!(
                "SELECT pk, sk, rev, doc, expires_at FROM items
                 WHERE pk = ?1 AND sk >= ?2 AND sk < ?2 || char(1114111)
                   AND substr(sk, 1, length(?2)) = ?2 AND (expires_at IS NULL OR expires_at > ?3)
                 {after_clause} ORDER BY sk {dir} LIMIT ?4"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let rows = stmt
                .query_map(
                    params![pk, prefix, now_epoch(), limit as i64, after],
                    row_to_item,
                )
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let this = self.clone();
        blocking(move || {
            let conn = this.lock()?;
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        let this = self.clone();
        blocking(move || this.purge_expired_blocking()).await
    }
}
