//! [`PgOutbox`]: the outbox table in PostgreSQL, with `LISTEN/NOTIFY` to wake the relay.

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Error, Message};
use sqlx::Row as _;
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use tokio::sync::Mutex;

use crate::{DEFAULT_TABLE, Due, OutboxStats, OutboxStore, checked_table, codec, storage};

/// The outbox in a PostgreSQL database. [`PgOutbox::enqueue`] also sends a notification on
/// the channel named like the table, which PostgreSQL delivers when the transaction commits:
/// the relay wakes within milliseconds of a commit and reads the table only every
/// [`RelayConfig::poll`](crate::RelayConfig::poll) otherwise. The relay listens on one
/// connection of its own, and holds its key partitions (below) on another, both besides the
/// pool's. `pg_notify` serialises committing transactions
/// on PostgreSQL's notification queue: at thousands of commits a second, measure it.
///
/// ## Several relays on one table
///
/// Relays may run side by side, in one process or many: the keys are spread over
/// [`PARTITIONS`] partitions (by a hash of the key; a message without a key by its id), and a
/// relay publishes only the partitions it holds, as PostgreSQL advisory locks on a connection
/// of its own. Each relay holds its share (partitions / relays, rounded up), gives extras back
/// between rounds when another relay joins, and takes over, at its next look (within 500 ms
/// or a poll), the partitions of a relay whose connection ended (a crash, a SIGKILL:
/// PostgreSQL drops the session's locks at once). A relay reads its locks back before every
/// round and publishes nothing it no longer holds. So a key is published by one relay at a
/// time, in commit order, and a relay taking over starts from the first row of each key not
/// marked published (the same id again if the other had published it). One window remains: a
/// relay whose lock connection dies in the middle of a round finishes that round while
/// another may already publish the same rows (copies under the same id). A relay cut off
/// from the database without its connection closing keeps its partitions until PostgreSQL
/// notices the dead connection (TCP keepalive; set `tcp_keepalives_idle` on the server to
/// bound it). The locks are per table (its oid) and per database. Every clone of a `PgOutbox`
/// is a relay of its own (its own locks and listening connection); enqueueing needs neither.
#[derive(Debug)]
pub struct PgOutbox {
    pool: PgPool,
    table: String,
    /// The relay's listening connection, opened on its first wait.
    listener: Arc<Mutex<Option<PgListener>>>,
    /// The key partitions this relay holds.
    claims: Arc<Mutex<Claims>>,
    /// `NOTIFY` on enqueue and `LISTEN` in the relay (see [`PgOutbox::notifications`]).
    notify: bool,
}

impl Clone for PgOutbox {
    /// Another relay on the same table (its own locks and listening connection).
    fn clone(&self) -> Self {
        PgOutbox {
            pool: self.pool.clone(),
            table: self.table.clone(),
            listener: Arc::default(),
            claims: Arc::default(),
            notify: self.notify,
        }
    }
}

/// Partitions the keys of one table are spread over, for relays working side by side: at most
/// this many relays share the work; more stand by.
pub const PARTITIONS: i32 = 16;

/// The second key of the advisory lock every relay of a table holds shared, so each can count
/// the relays.
const MEMBERS: i32 = 1_000_000;

/// How often a relay looks again at how many relays there are.
const CLAIM_EVERY: Duration = Duration::from_millis(500);

/// A relay's key partitions, held as advisory locks on `conn`.
#[derive(Debug, Default)]
struct Claims {
    conn: Option<PgConnection>,
    /// The first key of the table's advisory locks: the table's own oid (however its name is
    /// written), kept to 31 bits so it reads the same back from `pg_locks`.
    class: i32,
    owned: Vec<i32>,
    checked: Option<std::time::Instant>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl PgOutbox {
    /// The outbox in table [`DEFAULT_TABLE`] of `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        PgOutbox {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            listener: Arc::default(),
            claims: Arc::default(),
            notify: true,
        }
    }

    /// The same, in table `name` (letters, digits and `_`, optionally `schema.table`).
    pub fn with_table(pool: PgPool, name: &str) -> Result<Self, Error> {
        Ok(PgOutbox {
            pool,
            table: checked_table(name, true)?,
            listener: Arc::default(),
            claims: Arc::default(),
            notify: true,
        })
    }

    /// Whether [`PgOutbox::enqueue`] sends a notification and the relay listens for it
    /// (default on). Off, the relay reads the table every
    /// [`RelayConfig::poll`](crate::RelayConfig::poll) only, and a commit no longer queues on
    /// PostgreSQL's notification lock: for a connection pooler that cannot `LISTEN`
    /// (PgBouncer in transaction mode), or when the poll interval's delay is fine. Enqueue and
    /// relay must agree: a relay that listens for notifications nobody sends still polls. The
    /// relay itself needs a direct (or session-mode pooled) connection: its partitions are
    /// session advisory locks.
    pub fn notifications(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// The notification channel: the table name.
    fn channel(&self) -> String {
        self.table.replace('.', "_")
    }

    /// The statements that create the table and its indexes (what [`PgOutbox::migrate`]
    /// runs), for your own migration tool.
    pub fn schema(&self) -> Vec<String> {
        let t = &self.table;
        let i = self.channel();
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    seq BIGSERIAL PRIMARY KEY,
                    message_id TEXT NOT NULL,
                    topic TEXT NOT NULL,
                    msg_key BYTEA,
                    headers TEXT NOT NULL,
                    payload BYTEA NOT NULL,
                    state SMALLINT NOT NULL DEFAULT 0,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    published_at TIMESTAMPTZ,
                    last_error TEXT
                )"
            ),
            format!(
                // Due rows are read in seq order: this index yields them in that order, so a
                // round reads its batch and stops, however deep the backlog.
                "CREATE INDEX IF NOT EXISTS {i}_pending ON {t} (seq) WHERE state = 0"
            ),
            // Replaced by `_pending` (it made every round sort the backlog).
            format!("DROP INDEX IF EXISTS {i}_due"),
            // Per-key order needs to find, for a due row, an earlier row of its key that waits
            // (delayed by `enqueue_at` or by a retry). Only such rows are indexed: a row
            // enqueued to go at once (`available_at = created_at`) costs the writer no entry
            // here, and is due whatever the clock says. Replaces `_key`, which indexed every
            // pending row (created first, so a relay never runs without either).
            format!(
                "CREATE INDEX IF NOT EXISTS {i}_held ON {t} (msg_key, seq)
                 WHERE state = 0 AND available_at > created_at"
            ),
            format!("DROP INDEX IF EXISTS {i}_key"),
            format!("CREATE INDEX IF NOT EXISTS {i}_done ON {t} (published_at) WHERE state = 1"),
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
    pub async fn enqueue(&self, tx: &mut PgConnection, msg: &Message) -> Result<(), Error> {
        self.enqueue_at(tx, msg, Duration::ZERO).await
    }

    /// Like [`PgOutbox::enqueue`], published no earlier than `delay` after now.
    pub async fn enqueue_at(
        &self,
        tx: &mut PgConnection,
        msg: &Message,
        delay: Duration,
    ) -> Result<(), Error> {
        let c = codec::encode(msg);
        let insert = "INSERT INTO {t} (message_id, topic, msg_key, headers, payload, available_at)
             VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')";
        // With the notification in the same statement: one round trip per enqueue. PostgreSQL
        // delivers it on commit, once per transaction however many rows it adds.
        let sql = if self.notify {
            format!("WITH ins AS ({insert} RETURNING 1) SELECT pg_notify($7, '') FROM ins")
        } else {
            insert.to_owned()
        }
        .replace("{t}", &self.table);
        let mut q = sqlx::query(&sql)
            .bind(c.id)
            .bind(c.topic)
            .bind(c.key)
            .bind(c.headers)
            .bind(c.payload)
            .bind(ms(delay));
        if self.notify {
            q = q.bind(self.channel());
        }
        q.execute(&mut *tx)
            .await
            .map_err(|e| storage("outbox: enqueue failed", e))?;
        Ok(())
    }

    /// [`PgOutbox::enqueue`] for each of `msgs`, in order.
    pub async fn enqueue_all(&self, tx: &mut PgConnection, msgs: &[Message]) -> Result<(), Error> {
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
impl OutboxStore for PgOutbox {
    async fn due(&self, max: usize) -> Result<Vec<Due>, Error> {
        let owned = self.claim().await?;
        if owned.is_empty() {
            // Standing by: every partition is held by other relays.
            return Ok(Vec::new());
        }
        let t = &self.table;
        let rows = sqlx::query(&format!(
            "SELECT seq, message_id, topic, msg_key, headers, payload, attempts FROM {t} o
             -- due: its time has come, or it was enqueued to go at once (even if the clock
             -- has stepped back since: such a row is not in `_held`, so it must not wait)
             WHERE state = 0 AND (available_at <= now() OR available_at = created_at)
               -- the row's key partition (by its id without a key)
               AND (abs(hashtext(coalesce(encode(o.msg_key, 'hex'), o.message_id))::bigint)
                    % {PARTITIONS})::int4 = ANY($2)
               -- an earlier row of its key that waits (`available_at > created_at`: `_held`)
               AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.state = 0 AND p.msg_key = o.msg_key
                               AND p.available_at > p.created_at
                               AND p.seq < o.seq AND p.available_at > now())
             ORDER BY seq LIMIT $1"
        ))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(owned)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| storage("outbox: reading due rows failed", e))?;
        crate::due_rows(self, rows, |r| r.try_get::<i32, _>(6).map(i64::from)).await
    }

    async fn published(&self, seqs: &[i64]) -> Result<(), Error> {
        sqlx::query(&format!(
            "UPDATE {} SET state = 1, published_at = now(), attempts = attempts + 1
             WHERE seq = ANY($1)",
            self.table
        ))
        .bind(seqs)
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: marking rows published failed", e))?;
        Ok(())
    }

    async fn retry_later(&self, seq: i64, after: Duration, why: &str) -> Result<(), Error> {
        sqlx::query(&format!(
            // Later than `created_at` even if the clock went back: the row is then in
            // `_held`, where later rows of its key find it and wait.
            "UPDATE {} SET attempts = attempts + 1,
                 available_at = GREATEST(now() + $1 * interval '1 millisecond',
                                         created_at + interval '1 millisecond'),
                 last_error = $2
             WHERE seq = $3 AND state = 0",
            self.table
        ))
        .bind(ms(after))
        .bind(why)
        .bind(seq)
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: scheduling a retry failed", e))?;
        Ok(())
    }

    async fn failed(&self, seq: i64, why: &str) -> Result<(), Error> {
        sqlx::query(&format!(
            "UPDATE {} SET state = 2, attempts = attempts + 1, last_error = $1
             WHERE seq = $2 AND state = 0",
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
               (SELECT seq FROM {t} WHERE state = 1
                  AND published_at <= now() - $1 * interval '1 millisecond'
                ORDER BY seq LIMIT $2)"
        ))
        .bind(ms(older_than))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(|e| storage("outbox: purging published rows failed", e))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats, Error> {
        let r = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 2),
                    EXTRACT(EPOCH FROM now() - min(available_at)
                                       FILTER (WHERE state = 0 AND available_at <= now()))::float8
             FROM {} WHERE state IN (0, 2)",
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| storage("outbox: reading its size failed", e))?;
        let oldest: Option<f64> = r.get(2);
        Ok(OutboxStats {
            pending: u64::try_from(r.get::<i64, _>(0)).unwrap_or(0),
            failed: u64::try_from(r.get::<i64, _>(1)).unwrap_or(0),
            oldest_pending: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    async fn wait(&self, poll: Duration) {
        if !self.notify {
            tokio::time::sleep(poll).await;
            return;
        }
        let mut guard = self.listener.lock().await;
        let Some(listener) = guard.as_mut() else {
            // Listening starts (again) now: a commit before it was not heard, so return at once
            // and let the relay read the table; the next wait listens.
            match tokio::time::timeout(poll, self.listen()).await {
                Ok(Ok(l)) => *guard = Some(l),
                Ok(Err(e)) => {
                    tracing::debug!(error = ?e, "outbox: LISTEN failed; polling");
                    drop(guard);
                    tokio::time::sleep(poll).await;
                }
                Err(_) => tracing::debug!("outbox: LISTEN timed out; polling"),
            }
            return;
        };
        match tokio::time::timeout(poll, listener.recv()).await {
            // A notification (one per committed transaction): take the others already here
            // too, since one read of the table serves them all.
            Ok(Ok(_)) => while listener.next_buffered().is_some() {},
            Err(_) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = ?e, "outbox: listening connection lost; reconnecting");
                *guard = None;
            }
        }
    }
}

impl PgOutbox {
    /// The partitions this relay holds now, taken or given back to its share first (at most
    /// every [`CLAIM_EVERY`]; in between, the locks are read back from the server, so a relay
    /// whose lock connection died publishes nothing more). A failure drops the connection, and
    /// with it every lock.
    async fn claim(&self) -> Result<Vec<i32>, Error> {
        let mut c = self.claims.lock().await;
        let fresh = c.checked.is_some_and(|t| t.elapsed() < CLAIM_EVERY);
        let result = if fresh {
            self.held(&mut c).await
        } else {
            self.reclaim(&mut c).await
        };
        match result {
            Ok(()) => {
                if !fresh {
                    c.checked = Some(std::time::Instant::now());
                }
                Ok(c.owned.clone())
            }
            Err(e) => {
                *c = Claims::default();
                Err(storage("outbox: claiming key partitions failed", e))
            }
        }
    }

    /// The partitions this relay's lock connection holds, read back from `pg_locks` (fails
    /// when the connection is gone).
    async fn held(&self, c: &mut Claims) -> Result<(), sqlx::Error> {
        let conn = c.conn.as_mut().ok_or(sqlx::Error::PoolClosed)?;
        let mut owned: Vec<i32> = sqlx::query_scalar(
            "SELECT objid::int4 FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND pid = pg_backend_pid() AND classid::int8 = $1 AND objsubid = 2
               AND objid::int8 < $2",
        )
        .bind(i64::from(c.class))
        .bind(i64::from(PARTITIONS))
        .fetch_all(&mut *conn)
        .await?;
        owned.sort_unstable();
        c.owned = owned;
        Ok(())
    }

    async fn reclaim(&self, c: &mut Claims) -> Result<(), sqlx::Error> {
        if c.conn.is_none() {
            let mut conn = self.pool.acquire().await?.detach();
            let oid: i64 =
                sqlx::query_scalar(&format!("SELECT '{}'::regclass::oid::int8", self.table))
                    .fetch_one(&mut conn)
                    .await?;
            let class = (oid & 0x7fff_ffff) as i32;
            sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
                .bind(class)
                .bind(MEMBERS)
                .execute(&mut conn)
                .await?;
            *c = Claims {
                conn: Some(conn),
                class,
                ..Claims::default()
            };
        }
        let class = c.class;
        let conn = c.conn.as_mut().expect("connected above");
        // Advisory locks are per database; pg_locks shows the whole server's.
        let relays: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = 2",
        )
        .bind(i64::from(class))
        .bind(i64::from(MEMBERS))
        .fetch_one(&mut *conn)
        .await?;
        let share = usize::try_from(PARTITIONS)
            .unwrap_or(16)
            .div_ceil(usize::try_from(relays.max(1)).unwrap_or(1));
        while c.owned.len() > share {
            let p = c.owned.pop().expect("longer than the share");
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(class)
                .bind(p)
                .execute(&mut *conn)
                .await?;
        }
        for p in 0..PARTITIONS {
            if c.owned.len() >= share {
                break;
            }
            if c.owned.contains(&p) {
                continue;
            }
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(class)
                .bind(p)
                .fetch_one(&mut *conn)
                .await?;
            if got {
                c.owned.push(p);
            }
        }
        c.owned.sort_unstable();
        Ok(())
    }

    /// A listening connection of its own (outside the caller's pool, which it would hold for
    /// good otherwise), on the table's channel.
    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(self.pool.connect_options().as_ref().clone());
        let mut l = PgListener::connect_with(&own).await?;
        l.listen(&self.channel()).await?;
        Ok(l)
    }
}
