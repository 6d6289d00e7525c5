//! Persistence: sqlx over SQLite (embedded default, WAL, one connection: see `db`) or
//! PostgreSQL (a pool), the numbered migrations of `migrations/{sqlite,postgres}`, and the store
//! traits the rest of the bridge uses.
//! Queries are written once in the subset of SQL both databases accept (`$n` placeholders in
//! first-use order, which SQLite binds positionally); dialect differences live in the migrations.
//!
//! It implements the core's store traits (portals, users, the inbound event queue, kv), the
//! vault's and matrix-sdk-crypto's `CryptoStore`; it must never depend on the Matrix or interop
//! side, the gateway or an HTTP server (`tests/architecture.rs` checks it).

use mib_core::store::StoreError as CoreError;
use std::{
    sync::{Arc, Once},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    Executor, Row,
    any::{AnyConnectOptions, AnyPoolOptions},
    pool::Pool,
};

use crate::settings::{DatabaseConfig, DatabaseType};

/// Runs each named check of the enclosing test module on SQLite and on PostgreSQL: an
/// `async fn(&SqlStore)`, or with `owned` first an `async fn(SqlStore)`.
#[cfg(test)]
macro_rules! on_both_databases {
    (owned $($name:ident),* $(,)?) => {
        mod sqlite_suite {
            $(#[tokio::test] async fn $name() { let (s, _d) = crate::testing::sqlite().await; super::$name(s).await; })*
        }
        mod postgres_suite {
            $(#[tokio::test] async fn $name() { let s = crate::testing::postgres().await; super::$name(s).await; })*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod sqlite_suite {
            $(#[tokio::test] async fn $name() { let (s, _d) = crate::testing::sqlite().await; super::$name(&s).await; })*
        }
        mod postgres_suite {
            $(#[tokio::test] async fn $name() { let s = crate::testing::postgres().await; super::$name(&s).await; })*
        }
    };
}

pub mod crypto;
mod db;
mod group;
mod lease;
pub mod portal;
pub mod requests;
pub mod settings;
mod vault;

pub use db::{Conn, Connections};

#[cfg(test)]
mod sql_check;

pub type AnyPool = Pool<sqlx::Any>;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database is not migrated: run `matrix-interop-bridge migrate` ({0} pending)")]
    NotMigrated(usize),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// The store's error as the core sees it: its message, and whether it comes back by itself.
impl From<StoreError> for mib_core::store::StoreError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            Self::unavailable(e)
        } else {
            Self::failed(e)
        }
    }
}

impl From<StoreError> for mib_core::BridgeError {
    fn from(e: StoreError) -> Self {
        mib_core::BridgeError::Store(e.into())
    }
}

/// A database result in the store's error, on its way to the core's (`.db()?`).
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(StoreError::from)
    }
}

impl StoreError {
    /// Whether the database is away or out of room (a connection lost, PostgreSQL restarting, a
    /// full disk) rather than refusing this one request: it comes back by itself, so what
    /// failed waits and is tried again.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Db(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(d) => {
                let code = d.code().unwrap_or_default();
                // SQLite: BUSY, LOCKED, IOERR, FULL, CANTOPEN (primary result codes, also as
                // the low byte of extended ones). PostgreSQL: connection exceptions (08),
                // insufficient resources (53, disk full among them), operator intervention
                // (57: shutdown, cannot connect now).
                // A SQLSTATE has five characters; SQLite's codes are numbers of at most four
                // digits.
                if code.len() == 5 {
                    ["08", "53", "57"].iter().any(|c| code.starts_with(c))
                } else {
                    code.parse::<i64>()
                        .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13 | 14))
                }
            }
            _ => false,
        }
    }
}

pub use mib_core::store::{KvStore, QueuedEvent, StoredEvent, TxnOutcome, TxnStore, UserStore};

/// The SQL store over SQLite or PostgreSQL.
#[derive(Clone, Debug)]
pub struct SqlStore {
    pool: Connections,
    kind: DatabaseType,
    /// Held while events are queued, so that queue sequence numbers become visible in the
    /// order they were taken (PostgreSQL would otherwise let a later number commit first, and the
    /// queue worker, which reads after the last number it saw, would pass over the earlier one).
    queue_writer: Arc<tokio::sync::Mutex<()>>,
    /// The vault's group commit (see `group`).
    vault_writer: group::GroupWriter<vault::VaultCommit>,
    /// The message map's group commit.
    map_writer: group::GroupWriter<portal::MappedMessage>,
    /// Portal records in memory, when this process is the only one (see `cache_portals`).
    portal_cache: Arc<portal::PortalCache>,
    /// PostgreSQL's address, for the connection that listens for other workers' queued events.
    listen_uri: Option<Secret>,
    /// The channel of those events: [`PG_QUEUE_CHANNEL`] (a test's own, in the test suite).
    queue_channel: Arc<str>,
    /// SQLite: the task that checkpoints the write-ahead log on its own connection.
    _checkpointer: Option<Arc<Checkpointer>>,
}

/// How often the checkpointer looks at how many pages the write-ahead log holds that are not
/// yet in the database file (a read of the log's index, no statement).
const LOG_LOOK_EVERY: Duration = Duration::from_millis(20);
/// The shortest time between two checkpoints. Often, so that little is left unsynced for the
/// writer's own checkpoint (see [`Checkpointer`]): every 500 ms, its syncs of the log and the
/// file still took 20–60 ms in the 1,000-chat bench.
const CHECKPOINT_AFTER: Duration = Duration::from_millis(100);
/// Pages logged and not yet copied that make a checkpoint due (once [`CHECKPOINT_AFTER`] has
/// passed). A store written to slowly (a contact's, a bridge with a few users) is
/// checkpointed by [`CHECKPOINT_WITHIN`] instead, a few times a second at most, where a fixed
/// clock fast enough for the busiest store would copy and sync its hot pages at every tick
/// (the bench's 100 contact stores, at every 100 ms, cost a quarter of its rate).
const CHECKPOINT_PAGES: u32 = 1_000;
/// The longest logged pages wait for a checkpoint. With `synchronous = NORMAL` a commit is
/// synced to disk by the next checkpoint (a passive checkpoint syncs the log before it copies),
/// so this bounds what a power cut can take; a killed process loses nothing either way.
const CHECKPOINT_WITHIN: Duration = Duration::from_millis(500);
/// Pages in the log past which the writer checkpoints on its own, should the checkpointer fall
/// behind (SQLite's default is 1,000).
const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// Checkpoints an SQLite database's write-ahead log from a connection of its own. A
/// checkpoint copies the logged pages into the database file and syncs it to disk, which takes
/// milliseconds; done by the writer as SQLite does by default, every statement of the bridge
/// waits behind it on the one connection. A passive checkpoint on another connection runs
/// beside the writer instead.
///
/// Under steady writes a passive checkpoint never copies the whole log (the writer adds to it
/// meanwhile), and SQLite syncs the database file only after a checkpoint that did: the pages
/// copied pile up unsynced, and the log is never started over, until it reaches
/// [`WRITER_CHECKPOINT_PAGES`] and the writer's own checkpoint copies the rest and syncs
/// everything piled up, with every statement waiting behind it (50–85 ms every two seconds in
/// the 1,000-chat bench). So after each checkpoint that copied pages, this syncs the database
/// file itself, beside the writer (a passive checkpoint syncs the log before it copies), and
/// the writer's syncs find little left to write.
///
/// When to checkpoint goes by how much is waiting, not by a clock alone: after
/// [`CHECKPOINT_PAGES`] logged pages or [`CHECKPOINT_WITHIN`], whichever comes first, and
/// never twice within [`CHECKPOINT_AFTER`] (see [`checkpoint_due`]). Each checkpoint copies the
/// pages written often (the queue's, the indexes' roots) again, so a clock fast enough for the
/// busiest store makes a quiet one pay for copies it does not need.
#[derive(Debug)]
struct Checkpointer {
    task: tokio::task::JoinHandle<()>,
    /// Syncs of the database file after a checkpoint copied pages into it (the tests read it).
    #[cfg_attr(not(test), allow(dead_code))]
    syncs: Arc<std::sync::atomic::AtomicU64>,
    /// Checkpoints run (the tests read it).
    #[cfg_attr(not(test), allow(dead_code))]
    checkpoints: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The index of an SQLite write-ahead log (the `-shm` file beside the database), read for how
/// many logged pages are not yet in the database file. Its layout is SQLite's documented
/// "wal-index" format: the header's `mxFrame` (the last valid frame of the log) at byte 16,
/// and the checkpoint information's `nBackfill` (frames copied so far) at byte 96, both in
/// the machine's byte order. SQLite maps the file shared, so a plain read sees its writes; a
/// read that races one is off by a few frames, which only moves a checkpoint by a tick.
#[derive(Debug)]
struct LogIndex(std::fs::File);

impl LogIndex {
    fn open(database: &str) -> std::io::Result<Self> {
        std::fs::File::open(format!("{database}-shm")).map(Self)
    }

    /// Frames logged and not yet copied into the database file.
    fn waiting(&self) -> std::io::Result<u32> {
        use std::os::unix::fs::FileExt;
        let mut header = [0u8; 100];
        self.0.read_exact_at(&mut header, 0)?;
        let word = |at: usize| {
            u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        Ok(word(16).saturating_sub(word(96)))
    }
}

/// Whether a checkpoint is due, `since` the last one, with `waiting` pages logged and not yet
/// copied (`None` when the log's index cannot be read: then at the shortest interval).
fn checkpoint_due(waiting: Option<u32>, since: Duration) -> bool {
    match waiting {
        Some(0) => false,
        _ if since < CHECKPOINT_AFTER => false,
        Some(pages) => pages >= CHECKPOINT_PAGES || since >= CHECKPOINT_WITHIN,
        None => true,
    }
}

impl Checkpointer {
    async fn start(opts: &AnyConnectOptions) -> Result<Self, StoreError> {
        use sqlx::Connection;
        use std::sync::atomic::Ordering::Relaxed;
        let mut conn = sqlx::AnyConnection::connect_with(opts).await?;
        let databases: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(&mut conn)
            .await?;
        let path = databases
            .into_iter()
            .find_map(|(_, name, file)| (name == "main").then_some(file))
            .ok_or_else(|| sqlx::Error::Protocol("the database has no main file".into()))?;
        // Read-only: a sync writes the file's pages that any handle left in memory.
        let file = Arc::new(std::fs::File::open(&path).map_err(sqlx::Error::Io)?);
        // SQLite creates the index with the first transaction on the log: opened once it is
        // there. Until then (or on a file system without one), at the shortest interval.
        let mut index: Option<LogIndex> = None;
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let checkpoints = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (counted_syncs, counted) = (syncs.clone(), checkpoints.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_LOOK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Log frames copied into the database file, as the last checkpoint reported.
            let mut copied = 0i64;
            let mut last = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                if index.is_none() {
                    index = LogIndex::open(&path).ok();
                }
                let waiting = index.as_ref().and_then(|index| index.waiting().ok());
                if !checkpoint_due(waiting, last.elapsed()) {
                    continue;
                }
                last = tokio::time::Instant::now();
                counted.fetch_add(1, Relaxed);
                let checkpoint: Result<(i64, i64, i64), _> =
                    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                        .fetch_one(&mut conn)
                        .await;
                match checkpoint {
                    Ok((_, _, now)) => {
                        if now > 0 && now != copied {
                            let file = file.clone();
                            let synced = tokio::task::spawn_blocking(move || file.sync_data())
                                .await
                                .map_err(std::io::Error::other)
                                .and_then(|synced| synced);
                            match synced {
                                Ok(()) => {
                                    counted_syncs.fetch_add(1, Relaxed);
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot sync the database file")
                                }
                            }
                        }
                        copied = now;
                    }
                    Err(e) => {
                        // The writer checkpoints on its own past WRITER_CHECKPOINT_PAGES.
                        tracing::warn!(error = %e, "cannot checkpoint the database's log");
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                }
            }
        });
        Ok(Self {
            task,
            syncs,
            checkpoints,
        })
    }
}

/// The settings of the bridge's SQLite connection.
async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute("PRAGMA busy_timeout = 10000").await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}"
    )))
    .await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    // Deleted rows (a logout's shredded vault) are overwritten, not left in free pages.
    conn.execute("PRAGMA secure_delete = ON").await?;
    Ok(())
}

/// A connection string that may hold a password: never printed.
#[derive(Clone)]
struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The channel on which the workers sharing a PostgreSQL database tell each other that they
/// queued events (`NOTIFY` is delivered at commit, and only if the transaction commits).
const PG_QUEUE_CHANNEL: &str = "mib_event_queue";
/// How long the queue listener waits before it connects again after a failure (doubling up to
/// `MAX_LISTEN_BACKOFF`).
const FIRST_LISTEN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(5);

/// The advisory lock of the queue's writers on PostgreSQL (the number is the bridge's own).
const PG_QUEUE_LOCK: &str = "SELECT pg_advisory_xact_lock(7305142081)";

/// How a statement built here writes its placeholders (each such statement has only these,
/// in the order its values are bound). SQLite keeps a statement's numbered placeholders (`$7`)
/// in a list that it searches for each one, when it parses the statement and again when a value
/// is bound: with the hundreds of values of a multi-row write, quadratic work in every group
/// commit. Anonymous ones (`?`, numbered in order) are not in that list. PostgreSQL knows only
/// the numbered ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Marks {
    Numbered,
    Anonymous,
}

impl Marks {
    /// The style for the database behind `conn`.
    pub(crate) fn of(conn: &sqlx::AnyConnection) -> Self {
        match conn.backend_name() {
            "SQLite" => Marks::Anonymous,
            _ => Marks::Numbered,
        }
    }

    pub(crate) fn for_kind(kind: DatabaseType) -> Self {
        match kind {
            DatabaseType::Sqlite => Marks::Anonymous,
            DatabaseType::Postgres => Marks::Numbered,
        }
    }

    /// The placeholders of an `IN (…)` list of `n` values (written `{MARKS}` in a statement, so
    /// that the SQL check can prepare it): `$1, $2, …, $n`, or `?, ?, …`.
    pub(crate) fn list(self, n: usize) -> String {
        self.from(1, n)
    }

    /// `n` placeholders numbered from `first`.
    pub(crate) fn from(self, first: usize, n: usize) -> String {
        (first..first + n)
            .map(|i| match self {
                Marks::Numbered => format!("${i}"),
                Marks::Anonymous => "?".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `($1, …, $w), ($w+1, …)`: `n` rows of `w` placeholders each.
    pub(crate) fn rows(self, n: usize, w: usize) -> String {
        (0..n)
            .map(|r| format!("({})", self.from(r * w + 1, w)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The core's clock, as stored (milliseconds since the Unix epoch).
pub fn now_ms() -> i64 {
    mib_core::now_ms() as i64
}

impl SqlStore {
    /// Opens a pool; for SQLite the file is created and switched to WAL.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Self, StoreError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let kind = cfg.db_type();
        let uri = match kind {
            DatabaseType::Sqlite if !cfg.uri.contains('?') && !cfg.uri.contains(":memory:") => {
                format!("{}?mode=rwc", cfg.uri)
            }
            _ => cfg.uri.clone(),
        };
        let opts: AnyConnectOptions = uri.parse()?;
        // SQLite has a single writer, and read-then-write transactions on several connections
        // can fail with SQLITE_BUSY instead of waiting: SQLite gets one connection (see `db`).
        let pool = match kind {
            DatabaseType::Sqlite => {
                use sqlx::Connection;
                let mut conn = tokio::time::timeout(
                    db::ACQUIRE_TIMEOUT,
                    sqlx::AnyConnection::connect_with(&opts),
                )
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??;
                sqlite_pragmas(&mut conn).await?;
                Connections::sole(conn)
            }
            DatabaseType::Postgres => Connections::pool(
                AnyPoolOptions::new()
                    .max_connections(cfg.max_connections)
                    .min_connections(cfg.min_connections.min(cfg.max_connections))
                    .acquire_timeout(db::ACQUIRE_TIMEOUT)
                    .connect_with(opts.clone())
                    .await?,
            ),
        };
        // After the writer: its connection switched the file to WAL.
        let checkpointer = match kind {
            DatabaseType::Sqlite if !cfg.uri.contains(":memory:") => {
                Some(Arc::new(Checkpointer::start(&opts).await?))
            }
            _ => None,
        };
        Ok(Self {
            pool,
            kind,
            queue_writer: Arc::default(),
            vault_writer: vault::group_writer(),
            map_writer: portal::map_writer(),
            portal_cache: Arc::default(),
            listen_uri: (kind == DatabaseType::Postgres).then(|| Secret(cfg.uri.as_str().into())),
            queue_channel: PG_QUEUE_CHANNEL.into(),
            _checkpointer: checkpointer,
        })
    }

    /// Begins a transaction that will write. On SQLite it holds the write lock from its first
    /// statement: a deferred transaction that reads first does not wait for a lock another
    /// connection holds when it then writes (it fails at once with `SQLITE_BUSY`, whatever the
    /// busy timeout), while a first statement that writes (and changes nothing) waits for it.
    /// Not `BEGIN IMMEDIATE`: sqlx keeps its own transaction depth, and a custom `BEGIN` is
    /// refused for good once a commit has failed (a full disk, say).
    pub(crate) async fn begin_write<'c>(
        &self,
        conn: &'c mut Conn,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, StoreError> {
        let mut tx = conn.begin().await?;
        if self.kind == DatabaseType::Sqlite {
            sqlx::query("DELETE FROM kv WHERE 1 = 0")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Tells the other workers sharing the database, at commit, that events were queued.
    async fn announce_queued(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        queued: usize,
    ) -> Result<(), StoreError> {
        if queued > 0 && self.kind == DatabaseType::Postgres {
            // Not a literal, as `PG_QUEUE_LOCK`: PostgreSQL's alone. The channel is ours.
            let notify = format!("NOTIFY {}", self.queue_channel);
            sqlx::query(sqlx::AssertSqlSafe(notify))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// On PostgreSQL, makes the queue writes of all the workers sharing the database take their
    /// turns, as `queue_writer` does within one process (a transaction-scoped advisory lock,
    /// released at commit or rollback). SQLite has one writer at a time anyway.
    async fn lock_queue(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<(), StoreError> {
        if self.kind == DatabaseType::Postgres {
            // Not a literal: the SQL check prepares statements on both databases, and this one
            // is PostgreSQL's alone.
            sqlx::query(PG_QUEUE_LOCK).execute(&mut **tx).await?;
        }
        Ok(())
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.kind {
            DatabaseType::Sqlite => &SQLITE_MIGRATIONS,
            DatabaseType::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.migrator().run(&mut *conn).await?;
        Ok(())
    }

    /// Fails with a clear message when migrations are pending.
    pub async fn check_migrated(&self) -> Result<(), StoreError> {
        let applied: Vec<i64> =
            match sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_all(&self.pool)
                .await
            {
                Ok(rows) => rows
                    .iter()
                    .map(|r| r.try_get::<i64, _>("version"))
                    .collect::<Result<_, _>>()?,
                Err(_) => Vec::new(),
            };
        let pending = self
            .migrator()
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count();
        if pending > 0 {
            Err(StoreError::NotMigrated(pending))
        } else {
            Ok(())
        }
    }

    /// The store's connections, on which a statement runs as on a pool.
    pub fn pool(&self) -> &Connections {
        &self.pool
    }

    pub fn kind(&self) -> DatabaseType {
        self.kind
    }

    /// A cheap round trip, for `/ready`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Rows per statement when events are queued (four values a row: far below either database's
/// limit on bound values).
const QUEUE_ROWS_PER_STATEMENT: usize = 256;

/// Queues the events whose ids were not queued before (events without an id always), in their
/// order, inside `tx`; returns how many were queued. A transaction's events take one statement
/// to note their ids and one to queue them, not two per event.
async fn queue_new(
    conn: &mut sqlx::AnyConnection,
    events: &[QueuedEvent],
    now: i64,
) -> Result<usize, StoreError> {
    let ids: Vec<&str> = events
        .iter()
        .filter_map(|e| e.event_id.as_deref())
        .collect();
    // The ids noted now: one seen before (or earlier in this batch) returns no row.
    let mut fresh = std::collections::HashSet::new();
    for chunk in ids.chunks(QUEUE_ROWS_PER_STATEMENT) {
        #[allow(non_snake_case)] // named as the SQL check expects a row list
        let SEEN_ROWS = Marks::of(conn).rows(chunk.len(), 2);
        let sql = format!(
            "INSERT INTO matrix_event_seen (event_id, received_at) VALUES {SEEN_ROWS} \
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        );
        // Only placeholders are spliced in; the values are bound.
        let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(*id).bind(now);
        }
        fresh.extend(q.fetch_all(&mut *conn).await?);
    }
    let new: Vec<&QueuedEvent> = events
        .iter()
        .filter(|e| e.event_id.as_ref().is_none_or(|id| fresh.remove(id)))
        .collect();
    // One multi-row insert keeps the events' order: the rows take their sequence numbers in
    // the order of the list (the store suite checks it on both databases).
    for chunk in new.chunks(QUEUE_ROWS_PER_STATEMENT) {
        #[allow(non_snake_case)] // named as the SQL check expects a row list
        let QUEUE_ROWS = Marks::of(conn).rows(chunk.len(), 4);
        let sql = format!(
            "INSERT INTO event_queue (room_id, sealed, attempts, created_at) VALUES {QUEUE_ROWS}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ev in chunk {
            q = q
                .bind(ev.room_id.as_deref())
                .bind(&ev.sealed[..])
                .bind(0i32)
                .bind(now);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(new.len())
}

#[async_trait]
impl TxnStore for SqlStore {
    async fn apply_transaction(
        &self,
        txn_id: &str,
        body_hash: &[u8],
        events: &[QueuedEvent],
    ) -> Result<TxnOutcome, CoreError> {
        let _writer = self.queue_writer.lock().await;
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let mut tx = self.begin_write(&mut conn).await?;
        self.lock_queue(&mut tx).await?;
        let seen: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body_hash FROM appservice_txn WHERE txn_id = $1")
                .bind(txn_id)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        if seen.as_deref() == Some(body_hash) {
            return Ok(TxnOutcome::Duplicate);
        }
        let now = now_ms();
        // Same id, other body: the homeserver restarted its counter. Take it as new.
        sqlx::query("DELETE FROM appservice_txn WHERE txn_id = $1")
            .bind(txn_id)
            .execute(&mut *tx)
            .await
            .db()?;
        sqlx::query(
            "INSERT INTO appservice_txn (txn_id, body_hash, received_at) VALUES ($1, $2, $3)",
        )
        .bind(txn_id)
        .bind(body_hash)
        .bind(now)
        .execute(&mut *tx)
        .await
        .db()?;
        let queued = queue_new(&mut tx, events, now).await?;
        self.announce_queued(&mut tx, queued).await?;
        tx.commit().await.db()?;
        Ok(TxnOutcome::Applied)
    }

    async fn queue_missed(&self, events: &[QueuedEvent]) -> Result<usize, CoreError> {
        let _writer = self.queue_writer.lock().await;
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        let mut tx = self.begin_write(&mut conn).await?;
        self.lock_queue(&mut tx).await?;
        let queued = queue_new(&mut tx, events, now_ms()).await?;
        self.announce_queued(&mut tx, queued).await?;
        tx.commit().await.db()?;
        Ok(queued)
    }

    async fn queued_events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, CoreError> {
        let rows = sqlx::query(
            "SELECT seq, room_id, sealed, attempts FROM event_queue WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await.db()?;
        let events = rows
            .iter()
            .map(|r| {
                Ok(StoredEvent {
                    seq: r.try_get("seq")?,
                    room_id: r.try_get("room_id")?,
                    sealed: r.try_get("sealed")?,
                    attempts: r.try_get::<i32, _>("attempts").map(i64::from)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .db()?;
        Ok(events)
    }

    async fn remove_events(&self, seqs: &[i64]) -> Result<(), CoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        #[allow(non_snake_case)] // named as the SQL check expects a placeholder list
        let MARKS = Marks::for_kind(self.kind).list(seqs.len());
        let sql = format!("DELETE FROM event_queue WHERE seq IN ({MARKS})");
        // Only placeholders are spliced in; the values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for seq in seqs {
            q = q.bind(*seq);
        }
        q.execute(&self.pool).await.db()?;
        Ok(())
    }

    async fn count_attempt(&self, seq: i64) -> Result<(), CoreError> {
        sqlx::query("UPDATE event_queue SET attempts = attempts + 1 WHERE seq = $1")
            .bind(seq)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(())
    }

    async fn prune_transactions(&self, max_age_ms: i64) -> Result<u64, CoreError> {
        let before = now_ms() - max_age_ms;
        let r = sqlx::query("DELETE FROM appservice_txn WHERE received_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .db()?;
        sqlx::query("DELETE FROM matrix_event_seen WHERE received_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(r.rows_affected())
    }

    async fn recorded_transactions(&self, txn_ids: &[String]) -> Result<Vec<String>, CoreError> {
        if txn_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT txn_id FROM appservice_txn WHERE txn_id IN ({MARKS})",
            MARKS = Marks::for_kind(self.kind).list(txn_ids.len())
        );
        let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
        for id in txn_ids {
            q = q.bind(id);
        }
        Ok(q.fetch_all(&self.pool).await.db()?)
    }

    fn watch_queue(&self, wake: Arc<tokio::sync::Notify>) -> bool {
        let Some(Secret(uri)) = self.listen_uri.clone() else {
            return false;
        };
        tokio::spawn(listen_for_queued(uri, self.queue_channel.clone(), wake));
        true
    }
}

/// Listens on `channel` and wakes `wake` for each notification, and after every
/// (re)connection, since what was queued while nobody listened was not heard. Ends when nobody
/// else holds `wake`.
async fn listen_for_queued(uri: Arc<str>, channel: Arc<str>, wake: Arc<tokio::sync::Notify>) {
    let mut backoff = FIRST_LISTEN_BACKOFF;
    while Arc::strong_count(&wake) > 1 {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&uri).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match listener.await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for the other workers' queued events; looking at the queue now and then instead");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_LISTEN_BACKOFF;
        wake.notify_one();
        while Arc::strong_count(&wake) > 1 {
            match tokio::time::timeout(MAX_LISTEN_BACKOFF, listener.try_recv()).await {
                Ok(Ok(Some(_))) => wake.notify_one(),
                // The connection was lost; the next call connects again. Meanwhile the queue
                // is read in case something was missed.
                Ok(Ok(None)) => wake.notify_one(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the queue listener failed");
                    break;
                }
                Err(_) => {}
            }
        }
    }
}

#[async_trait]
impl UserStore for SqlStore {
    async fn management_room(&self, mxid: &str) -> Result<Option<String>, CoreError> {
        let room: Option<Option<String>> =
            sqlx::query_scalar("SELECT management_room FROM matrix_user WHERE mxid = $1")
                .bind(mxid)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        Ok(room.flatten())
    }

    async fn set_management_room(&self, mxid: &str, room_id: &str) -> Result<(), CoreError> {
        sqlx::query(
            "INSERT INTO matrix_user (mxid, management_room) VALUES ($1, $2) \
             ON CONFLICT (mxid) DO UPDATE SET management_room = excluded.management_room",
        )
        .bind(mxid)
        .bind(room_id)
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }

    async fn space_room(&self, mxid: &str) -> Result<Option<String>, CoreError> {
        let room: Option<Option<String>> =
            sqlx::query_scalar("SELECT space_room FROM matrix_user WHERE mxid = $1")
                .bind(mxid)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        Ok(room.flatten())
    }

    async fn set_space_room(&self, mxid: &str, room_id: Option<&str>) -> Result<(), CoreError> {
        sqlx::query(
            "INSERT INTO matrix_user (mxid, space_room) VALUES ($1, $2) \
             ON CONFLICT (mxid) DO UPDATE SET space_room = excluded.space_room",
        )
        .bind(mxid)
        .bind(room_id)
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }

    async fn management_room_owner(&self, room_id: &str) -> Result<Option<String>, CoreError> {
        Ok(
            sqlx::query_scalar("SELECT mxid FROM matrix_user WHERE management_room = $1")
                .bind(room_id)
                .fetch_optional(&self.pool)
                .await
                .db()?,
        )
    }

    async fn pending_command(&self, mxid: &str) -> Result<Option<String>, CoreError> {
        Ok(
            sqlx::query_scalar("SELECT command FROM pending_command WHERE mxid = $1")
                .bind(mxid)
                .fetch_optional(&self.pool)
                .await
                .db()?,
        )
    }

    async fn set_pending_command(
        &self,
        mxid: &str,
        command: Option<&str>,
    ) -> Result<(), CoreError> {
        match command {
            Some(c) => sqlx::query(
                "INSERT INTO pending_command (mxid, command, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (mxid) DO UPDATE SET command = excluded.command, created_at = excluded.created_at",
            )
            .bind(mxid)
            .bind(c)
            .bind(now_ms()),
            None => sqlx::query("DELETE FROM pending_command WHERE mxid = $1").bind(mxid),
        }
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }
}

#[async_trait]
impl KvStore for SqlStore {
    async fn kv_get(&self, key: &str) -> Result<Option<String>, CoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM kv WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .db()?)
    }

    async fn kv_set(&self, key: &str, value: &str) -> Result<(), CoreError> {
        sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await.db()?;
        Ok(())
    }
}

/// Helpers for the store conformance suite: a fresh SQLite file, or a fresh PostgreSQL schema.
/// Only in test builds (this crate's tests, and the `testing` feature its integration tests and
/// benches turn on): production builds do not ship them.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// The PostgreSQL server the suite runs against; `MIB_TEST_PG_URL` overrides it.
    pub fn pg_url() -> String {
        std::env::var("MIB_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    /// A migrated store in a temporary SQLite file (the directory lives as long as the guard).
    pub async fn sqlite() -> (SqlStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = DatabaseConfig {
            kind: "sqlite".into(),
            uri: format!("sqlite://{}", dir.path().join("test.db").display()),
            max_connections: 4,
            min_connections: 1,
        };
        let store = SqlStore::connect(&cfg).await.expect("open sqlite");
        store.migrate().await.expect("migrate sqlite");
        (store, dir)
    }

    /// A migrated store in a new, uniquely named PostgreSQL schema.
    pub async fn postgres() -> SqlStore {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let base = pg_url();
        let admin = DatabaseConfig {
            kind: "postgres".into(),
            uri: base.clone(),
            max_connections: 1,
            min_connections: 0,
        };
        let admin = SqlStore::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {base} is needed for the store suite: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(admin.pool())
            .await
            .expect("create schema");
        admin.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let cfg = DatabaseConfig {
            kind: "postgres".into(),
            uri: format!("{base}{sep}options=-c%20search_path%3D{schema}"),
            max_connections: 4,
            min_connections: 0,
        };
        let mut store = SqlStore::connect(&cfg).await.expect("open postgres");
        store.migrate().await.expect("migrate postgres");
        // Notifications are the database's, not the schema's: each test hears only its own.
        store.queue_channel = format!("{PG_QUEUE_CHANNEL}_{schema}").into();
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The conformance suite: every check runs on both databases.
    on_both_databases!(
        retried_transaction_has_no_second_effect,
        restarted_txn_counter_is_new,
        users_and_kv,
        queue_order,
        an_event_is_queued_once_whichever_way_it_came,
        a_large_transaction_is_queued_in_order_once
    );

    fn ev(room: &str, body: &[u8]) -> QueuedEvent {
        QueuedEvent {
            room_id: Some(room.into()),
            event_id: None,
            sealed: body.to_vec(),
        }
    }

    fn pdu(id: &str) -> QueuedEvent {
        QueuedEvent {
            room_id: Some("!a:x".into()),
            event_id: Some(id.into()),
            sealed: id.as_bytes().to_vec(),
        }
    }

    /// A write that another connection's lock holds up waits for it (under the busy timeout)
    /// instead of failing with `SQLITE_BUSY`: `apply_transaction` reads before it writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waits_for_another_connections_lock() {
        use sqlx::Connection;
        let (s, dir) = testing::sqlite().await;
        let uri = format!("sqlite://{}", dir.path().join("test.db").display());
        let mut other = sqlx::SqliteConnection::connect(&uri)
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("lock");
        let write = tokio::spawn({
            let s = s.clone();
            async move { s.apply_transaction("1", b"h", &[pdu("$1")]).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!write.is_finished(), "the write did not wait for the lock");
        sqlx::query("COMMIT")
            .execute(&mut other)
            .await
            .expect("unlock");
        let out = write
            .await
            .expect("task")
            .expect("the write waited and went on");
        assert!(matches!(out, TxnOutcome::Applied));
    }

    /// Under steady writes, the pages each checkpoint copies into the database file are synced
    /// beside the writer, not left for the writer's own checkpoint to sync all at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pages_a_checkpoint_copies_are_synced_beside_the_writer() {
        let (s, dir) = testing::sqlite().await;
        let syncs = s
            ._checkpointer
            .as_ref()
            .expect("a checkpointer for a database on disk")
            .syncs
            .clone();
        let main_file = dir.path().join("test.db");
        let size = || std::fs::metadata(&main_file).map(|m| m.len()).unwrap_or(0);
        let before = size();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut i = 0u64;
        // Writes go on (about 1 MiB a second) while the checkpoints copy and sync.
        while syncs.load(std::sync::atomic::Ordering::Relaxed) < 2 || size() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no sync after the checkpoints (file {} bytes, was {before})",
                size()
            );
            for _ in 0..10 {
                i += 1;
                s.apply_transaction(&i.to_string(), b"h", &[ev("!a:x", &[7; 10_000])])
                    .await
                    .expect("apply");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The log's index is read as SQLite counts: the frames a passive checkpoint finds in the
    /// log, less those it copied, and a log started over counts from nothing again.
    #[tokio::test]
    async fn the_log_index_counts_the_frames_not_yet_copied() {
        use sqlx::{Connection, Executor};
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.db");
        let uri = format!("sqlite://{}?mode=rwc", path.display());
        let mut conn = sqlx::AnyConnection::connect(&uri).await.expect("open");
        conn.execute("PRAGMA journal_mode = WAL")
            .await
            .expect("wal");
        conn.execute("PRAGMA wal_autocheckpoint = 0")
            .await
            .expect("no autocheckpoint");
        conn.execute("CREATE TABLE t (v BLOB)")
            .await
            .expect("table");
        async fn write(conn: &mut sqlx::AnyConnection) {
            for _ in 0..20 {
                conn.execute("INSERT INTO t (v) VALUES (randomblob(20000))")
                    .await
                    .expect("insert");
            }
        }
        write(&mut conn).await;
        let index = LogIndex::open(path.to_str().expect("utf-8")).expect("index");
        let waiting = index.waiting().expect("read");
        assert!(waiting > 100, "20 rows of 20 kB logged: {waiting} frames");
        let (_, logged, copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut conn)
            .await
            .expect("checkpoint");
        assert_eq!(i64::from(waiting), logged);
        assert_eq!(i64::from(index.waiting().expect("read")), logged - copied);
        assert_eq!(logged, copied, "nothing else wrote");
        // Everything was copied, so the next write starts the log over.
        write(&mut conn).await;
        let again = index.waiting().expect("read");
        assert!(
            again > 100 && again < waiting * 3 / 2,
            "{again} after {waiting}"
        );
    }

    /// Checkpoints go by the pages waiting, between the shortest and the longest interval.
    #[test]
    fn a_checkpoint_is_due_by_the_pages_waiting_between_two_intervals() {
        let ms = Duration::from_millis;
        let many = Some(CHECKPOINT_PAGES);
        let few = Some(CHECKPOINT_PAGES / 10);
        // Nothing waiting: never.
        assert!(!checkpoint_due(Some(0), ms(10_000)));
        // Many pages: once the shortest interval has passed, not before.
        assert!(!checkpoint_due(many, CHECKPOINT_AFTER - ms(1)));
        assert!(checkpoint_due(many, CHECKPOINT_AFTER));
        // A few: only when they have waited the longest interval.
        assert!(!checkpoint_due(few, CHECKPOINT_AFTER));
        assert!(!checkpoint_due(few, CHECKPOINT_WITHIN - ms(1)));
        assert!(checkpoint_due(few, CHECKPOINT_WITHIN));
        // Unknown (the index cannot be read): at the shortest interval.
        assert!(!checkpoint_due(None, CHECKPOINT_AFTER - ms(1)));
        assert!(checkpoint_due(None, CHECKPOINT_AFTER));
    }

    /// A store written to a little at a time is checkpointed every `CHECKPOINT_WITHIN`, not
    /// at every look at the log (a contact's store, or a bridge with a few users, would copy
    /// and sync its hot pages 50 times a second).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_slowly_is_checkpointed_a_few_times_a_second() {
        let (s, _dir) = testing::sqlite().await;
        let checkpoints = s
            ._checkpointer
            .as_ref()
            .expect("a checkpointer for a database on disk")
            .checkpoints
            .clone();
        let started = tokio::time::Instant::now();
        for i in 0..75u64 {
            s.apply_transaction(&i.to_string(), b"h", &[pdu(&format!("${i}"))])
                .await
                .expect("apply");
            tokio::time::sleep(LOG_LOOK_EVERY).await;
        }
        let deadline = started + Duration::from_secs(30);
        while checkpoints.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never checkpointed");
            tokio::time::sleep(LOG_LOOK_EVERY).await;
        }
        let ran = checkpoints.load(std::sync::atomic::Ordering::Relaxed);
        let most = started.elapsed().as_millis() / CHECKPOINT_WITHIN.as_millis() + 1;
        assert!(
            u128::from(ran) <= most,
            "{ran} checkpoints in {:?}, at most {most} expected",
            started.elapsed()
        );
    }

    /// A worker hears at once when another worker sharing the PostgreSQL database queues
    /// events (LISTEN/NOTIFY), instead of at its next look at the queue; a transaction that
    /// queues nothing new says nothing. SQLite has no such channel (and no other workers).
    #[tokio::test]
    async fn workers_hear_of_each_others_queued_events() {
        let (lite, _dir) = testing::sqlite().await;
        assert!(!lite.watch_queue(Arc::default()));

        let s = testing::postgres().await;
        let wake = Arc::new(tokio::sync::Notify::new());
        assert!(s.watch_queue(wake.clone()));
        let heard = || tokio::time::timeout(Duration::from_secs(30), wake.notified());
        heard().await.expect("the listener wakes once it listens");
        let other = s.clone();
        other
            .apply_transaction("1", b"h", &[pdu("$1")])
            .await
            .expect("apply");
        heard().await.expect("a queued event is heard");
        other
            .apply_transaction("1", b"h", &[pdu("$1")])
            .await
            .expect("retry");
        assert_eq!(other.queue_missed(&[pdu("$1")]).await.expect("missed"), 0);
        let quiet = tokio::time::timeout(Duration::from_millis(500), wake.notified()).await;
        assert!(quiet.is_err(), "nothing new was queued");
        assert_eq!(other.queue_missed(&[pdu("$2")]).await.expect("missed"), 1);
        heard()
            .await
            .expect("an event the catch-up queued is heard");
    }

    async fn an_event_is_queued_once_whichever_way_it_came(s: &SqlStore) {
        // The catch-up finds $1 and $2; then a transaction brings $2 (late) and $3; another
        // transaction (the homeserver restarted its count) brings $3 again; the catch-up runs again.
        assert_eq!(
            s.queue_missed(&[pdu("$1"), pdu("$2")])
                .await
                .expect("missed"),
            2
        );
        s.apply_transaction("1", b"h1", &[pdu("$2"), pdu("$3")])
            .await
            .expect("apply");
        s.apply_transaction("1", b"h2", &[pdu("$3"), ev("!a:x", b"receipt")])
            .await
            .expect("apply");
        assert_eq!(
            s.queue_missed(&[pdu("$1"), pdu("$3")])
                .await
                .expect("missed"),
            0
        );
        let q = s.queued_events(10).await.expect("queue");
        assert_eq!(
            q.iter().map(|e| e.sealed.clone()).collect::<Vec<_>>(),
            vec![
                b"$1".to_vec(),
                b"$2".to_vec(),
                b"$3".to_vec(),
                b"receipt".to_vec()
            ]
        );
        // Once forgotten (after the retention), an id counts as new again.
        s.prune_transactions(-1000).await.expect("prune");
        assert_eq!(s.queue_missed(&[pdu("$1")]).await.expect("missed"), 1);
    }

    async fn a_large_transaction_is_queued_in_order_once(s: &SqlStore) {
        // More events than one statement takes, ids repeated within the transaction (across the
        // statements' boundary too) and one queued before: each queued once, in order.
        let n = QUEUE_ROWS_PER_STATEMENT * 2 + 7;
        s.queue_missed(&[pdu("$5")]).await.expect("missed");
        let mut events: Vec<QueuedEvent> = (0..n).map(|i| pdu(&format!("${i}"))).collect();
        events.insert(3, ev("!a:x", b"no id"));
        events.push(pdu("$1"));
        events.insert(QUEUE_ROWS_PER_STATEMENT + 1, pdu("$2"));
        assert_eq!(
            s.apply_transaction("big", b"h", &events)
                .await
                .expect("apply"),
            TxnOutcome::Applied
        );
        let want: Vec<Vec<u8>> = std::iter::once(b"$5".to_vec())
            .chain((0..3).map(|i| format!("${i}").into_bytes()))
            .chain(std::iter::once(b"no id".to_vec()))
            .chain(
                (3..n)
                    .filter(|i| *i != 5)
                    .map(|i| format!("${i}").into_bytes()),
            )
            .collect();
        let got: Vec<Vec<u8>> = s
            .queued_events(n as i64 + 10)
            .await
            .expect("queue")
            .into_iter()
            .map(|e| e.sealed)
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "the queue's order differs from the transaction's"
        );
    }

    async fn retried_transaction_has_no_second_effect(s: &SqlStore) {
        let events = [ev("!a:x", b"one"), ev("!a:x", b"two")];
        assert_eq!(
            s.apply_transaction("1", b"h1", &events)
                .await
                .expect("apply"),
            TxnOutcome::Applied
        );
        assert_eq!(
            s.apply_transaction("1", b"h1", &events)
                .await
                .expect("apply"),
            TxnOutcome::Duplicate
        );
        let q = s.queued_events(10).await.expect("queue");
        assert_eq!(
            q.iter().map(|e| e.sealed.clone()).collect::<Vec<_>>(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
    }

    async fn restarted_txn_counter_is_new(s: &SqlStore) {
        s.apply_transaction("1", b"h1", &[ev("!a:x", b"one")])
            .await
            .expect("apply");
        assert_eq!(
            s.apply_transaction("1", b"h2", &[ev("!a:x", b"new")])
                .await
                .expect("apply"),
            TxnOutcome::Applied
        );
        assert_eq!(s.queued_events(10).await.expect("queue").len(), 2);
        assert_eq!(s.prune_transactions(-1000).await.expect("prune"), 1);
    }

    async fn users_and_kv(s: &SqlStore) {
        assert_eq!(s.management_room("@a:x").await.expect("get"), None);
        s.set_management_room("@a:x", "!r1:x").await.expect("set");
        s.set_management_room("@a:x", "!r2:x").await.expect("set");
        assert_eq!(
            s.management_room("@a:x").await.expect("get").as_deref(),
            Some("!r2:x")
        );
        assert_eq!(
            s.management_room_owner("!r2:x")
                .await
                .expect("owner")
                .as_deref(),
            Some("@a:x")
        );
        assert_eq!(s.management_room_owner("!r1:x").await.expect("owner"), None);
        // A command in progress: set, replaced, read, cleared.
        assert_eq!(s.pending_command("@a:x").await.expect("get"), None);
        s.set_pending_command("@a:x", Some("one"))
            .await
            .expect("set");
        s.set_pending_command("@a:x", Some("two"))
            .await
            .expect("set");
        assert_eq!(
            s.pending_command("@a:x").await.expect("get").as_deref(),
            Some("two")
        );
        s.set_pending_command("@a:x", None).await.expect("clear");
        assert_eq!(s.pending_command("@a:x").await.expect("get"), None);
        s.kv_set("k", "v1").await.expect("kv");
        s.kv_set("k", "v2").await.expect("kv");
        assert_eq!(s.kv_get("k").await.expect("kv").as_deref(), Some("v2"));
        s.check_migrated().await.expect("migrated");
    }

    async fn queue_order(s: &SqlStore) {
        for i in 0..5u8 {
            s.apply_transaction(&i.to_string(), &[i], &[ev("!a:x", &[i])])
                .await
                .expect("apply");
        }
        let q = s.queued_events(3).await.expect("queue");
        assert_eq!(
            q.iter().map(|e| e.sealed[0]).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        s.count_attempt(q[0].seq).await.expect("attempt");
        s.remove_events(&[q[1].seq]).await.expect("remove");
        let q = s.queued_events(10).await.expect("queue");
        assert_eq!(
            q.iter().map(|e| e.sealed[0]).collect::<Vec<_>>(),
            vec![0, 2, 3, 4]
        );
        s.remove_events(&[q[1].seq, q[3].seq])
            .await
            .expect("remove");
        let q = s.queued_events(10).await.expect("queue");
        assert_eq!(
            q.iter().map(|e| e.sealed[0]).collect::<Vec<_>>(),
            vec![0, 3]
        );
        assert_eq!(q[0].attempts, 1);
    }
}
