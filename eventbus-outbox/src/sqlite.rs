//! [`SqliteOutbox`]: the outbox table in SQLite.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventbus_core::{Error, Message};
use sqlx::{Row as _, SqliteConnection, SqlitePool};

use crate::{DEFAULT_TABLE, Due, OutboxStats, OutboxStore, checked_table, codec, storage};

/// The outbox in a SQLite database: the embedded store, for tests, single-node services and
/// `cargo run` with nothing installed. Times are Unix milliseconds. The relay reads the table
/// every [`RelayConfig::poll`](crate::RelayConfig::poll): SQLite has no notifications.
#[derive(Clone, Debug)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    table: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteOutbox {
    /// The outbox in table [`DEFAULT_TABLE`] of `pool`'s database.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteOutbox {
            pool,
            table: DEFAULT_TABLE.to_owned(),
        }
    }

    /// The same, in table `name` (letters, digits and `_`).
    pub fn with_table(pool: SqlitePool, name: &str) -> Result<Self, Error> {
        Ok(SqliteOutbox {
            pool,
            table: checked_table(name, false)?,
        })
    }

    /// The statements that create the table and its indexes (what [`SqliteOutbox::migrate`]
    /// runs), for your own migration tool.
    pub fn schema(&self) -> Vec<String> {
        let t = &self.table;
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    message_id TEXT NOT NULL,
                    topic TEXT NOT NULL,
                    msg_key BLOB,
                    headers TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    state INTEGER NOT NULL DEFAULT 0,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    available_at INTEGER NOT NULL,
                    created_at INTEGER NOT NULL,
                    published_at INTEGER,
                    last_error TEXT
                )"
            ),
            // Due rows are read in seq order: a round reads its batch and stops.
            format!("CREATE INDEX IF NOT EXISTS {t}_pending ON {t} (state, seq)"),
            // Replaced by `_pending` (it made every round sort the backlog).
            format!("DROP INDEX IF EXISTS {t}_due"),
            // Only rows that wait (delayed or retried) are indexed for per-key order: a row
            // enqueued to go at once costs the writer no entry here, and is due whatever the
            // clock says. Replaces `_key` (created first, so a relay never runs without either).
            format!(
                "CREATE INDEX IF NOT EXISTS {t}_held ON {t} (msg_key, seq)
                 WHERE state = 0 AND available_at > created_at"
            ),
            format!("DROP INDEX IF EXISTS {t}_key"),
        ]
    }

    /// Create the table and its indexes if they do not exist.
    pub async fn migrate(&self) -> Result<(), Error> {
        for statement in self.schema() {
            sqlx::query(&statement)
                .execute(&self.pool)
                .await
                .map_err(|e| storage("outbox: creating the table failed", e))?;
        }
        Ok(())
    }

    /// Add `msg` to the outbox inside the caller's transaction (`&mut tx`): it is published
    /// once, and only if, that transaction commits.
    pub async fn enqueue(&self, tx: &mut SqliteConnection, msg: &Message) -> Result<(), Error> {
        self.enqueue_at(tx, msg, Duration::ZERO).await
    }

    /// Like [`SqliteOutbox::enqueue`], published no earlier than `delay` after now.
    pub async fn enqueue_at(
        &self,
        tx: &mut SqliteConnection,
        msg: &Message,
        delay: Duration,
    ) -> Result<(), Error> {
        let c = codec::encode(msg);
        let now = now_ms();
        sqlx::query(&format!(
            "INSERT INTO {} (message_id, topic, msg_key, headers, payload, available_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            self.table
        ))
        .bind(c.id)
        .bind(c.topic)
        .bind(c.key)
        .bind(c.headers)
        .bind(c.payload)
        .bind(now.saturating_add(ms(delay)))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| storage("outbox: enqueue failed", e))?;
        Ok(())
    }

    /// [`SqliteOutbox::enqueue`] for each of `msgs`, in order.
    pub async fn enqueue_all(
        &self,
        tx: &mut SqliteConnection,
        msgs: &[Message],
    ) -> Result<(), Error> {
        for m in msgs {
            self.enqueue(tx, m).await?;
        }
        Ok(())
    }

    /// The error kind and text of every failed row, by its message id, oldest first.
    pub async fn failures(&self) -> Result<Vec<(String, String)>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT message_id, last_error FROM {} WHERE state = 2 ORDER BY seq",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| storage("outbox: reading failed rows failed", e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<Option<String>, _>(1).unwrap_or_default()))
            .collect())
    }
}

#[async_trait::async_trait]
impl OutboxStore for SqliteOutbox {
    async fn due(&self, max: usize) -> Result<Vec<Due>, Error> {
        let t = &self.table;
        let rows = sqlx::query(&format!(
            "SELECT seq, message_id, topic, msg_key, headers, payload, attempts FROM {t} o
             WHERE state = 0 AND (available_at <= ?1 OR available_at = created_at)
               AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.state = 0 AND p.msg_key = o.msg_key
                               AND p.available_at > p.created_at
                               AND p.seq < o.seq AND p.available_at > ?1)
             ORDER BY seq LIMIT ?2"
        ))
        .bind(now_ms())
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| storage("outbox: reading due rows failed", e))?;
        crate::due_rows(self, rows, |r| r.try_get::<i64, _>(6)).await
    }

    async fn published(&self, seqs: &[i64]) -> Result<(), Error> {
        let list = serde_json::to_string(seqs).expect("integers serialize");
        sqlx::query(&format!(
            "UPDATE {} SET state = 1, published_at = ?, attempts = attempts + 1
             WHERE seq IN (SELECT value FROM json_each(?))",
            self.table
        ))
        .bind(now_ms())
        .bind(list)
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: marking rows published failed", e))?;
        Ok(())
    }

    async fn retry_later(&self, seq: i64, after: Duration, why: &str) -> Result<(), Error> {
        sqlx::query(&format!(
            // Later than `created_at` even if the clock went back: the row is then in
            // `_held`, where later rows of its key find it and wait.
            "UPDATE {} SET attempts = attempts + 1, available_at = max(?, created_at + 1),
                 last_error = ?
             WHERE seq = ? AND state = 0",
            self.table
        ))
        .bind(now_ms().saturating_add(ms(after)))
        .bind(why)
        .bind(seq)
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: scheduling a retry failed", e))?;
        Ok(())
    }

    async fn failed(&self, seq: i64, why: &str) -> Result<(), Error> {
        sqlx::query(&format!(
            "UPDATE {} SET state = 2, attempts = attempts + 1, last_error = ?
             WHERE seq = ? AND state = 0",
            self.table
        ))
        .bind(why)
        .bind(seq)
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: marking a row failed failed", e))?;
        Ok(())
    }

    async fn purge(&self, older_than: Duration, max: usize) -> Result<u64, Error> {
        let t = &self.table;
        let done = sqlx::query(&format!(
            "DELETE FROM {t} WHERE seq IN
               (SELECT seq FROM {t} WHERE state = 1 AND published_at <= ? ORDER BY seq LIMIT ?)"
        ))
        .bind(now_ms().saturating_sub(ms(older_than)))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: purging published rows failed", e))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats, Error> {
        let r = sqlx::query(&format!(
            "SELECT COALESCE(SUM(state = 0), 0), COALESCE(SUM(state = 2), 0),
                    MIN(CASE WHEN state = 0 AND available_at <= ?1 THEN available_at END)
             FROM {} WHERE state IN (0, 2)",
            self.table
        ))
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| storage("outbox: reading its size failed", e))?;
        let oldest: Option<i64> = r.get(2);
        Ok(OutboxStats {
            pending: u64::try_from(r.get::<i64, _>(0)).unwrap_or(0),
            failed: u64::try_from(r.get::<i64, _>(1)).unwrap_or(0),
            oldest_pending: oldest.map(|at| {
                Duration::from_millis(u64::try_from(now_ms().saturating_sub(at)).unwrap_or(0))
            }),
        })
    }

    async fn wait(&self, poll: Duration) {
        tokio::time::sleep(poll).await;
    }
}
