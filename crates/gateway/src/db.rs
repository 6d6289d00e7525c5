//! The gateway's SQLite state. Envelopes and everything they depend on are written in one
//! transaction, so a crash never loses an acknowledged `Send`.

use std::collections::HashMap;
use std::str::FromStr;

use std::sync::Arc;

use sqlx::{
    Connection, Row,
    sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous},
};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::GatewayError;
use mib_wire::pb;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct GatewayDb {
    /// The one connection, taken in turn. SQLite has one writer anyway, and read-then-write
    /// transactions on several connections can fail with `SQLITE_BUSY` instead of waiting. Not
    /// a pool of one: sqlx's pool tests a connection given back to it with a round trip to the
    /// connection's thread, after every statement, and the next statement waits behind it.
    conn: Arc<Mutex<SqliteConnection>>,
    /// Connections for the delivery reads (see [`Readers`]).
    readers: Arc<Readers>,
    /// How to open another connection to the same database (the log's checkpoints).
    opts: SqliteConnectOptions,
    /// Envelopes and blobs older than these are gone, also before the sweep deletes them.
    pub(crate) envelope_ttl_ms: i64,
    pub(crate) blob_ttl_ms: i64,
    /// `Send`s and `Ack`s waiting for the group commit (see [`WriteGroup`]).
    writes: std::sync::Arc<WriteGroup>,
    /// Syncs of the database file after a checkpoint copied pages into it.
    log_syncs: Arc<std::sync::atomic::AtomicU64>,
    /// Accounts known to exist (see [`GatewayDb::account_exists`]).
    known: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Connections that read beside the one that writes: the delivery reads, and every read that
/// needs only what was committed before it (a login's secret and counts, keys, profiles,
/// groups, blobs). In WAL mode a reader sees every transaction committed before its read began
/// and neither waits for the writer nor holds it up; on the one connection, every such read
/// waited for the group commit under way, and the next commit for the reads queued before it.
/// Empty for an in-memory database, which has no log to read beside a writer: its reads take
/// the one connection.
#[derive(Debug, Default)]
struct Readers {
    conns: Vec<Arc<Mutex<SqliteConnection>>>,
    /// Where the next reader that finds them all busy waits.
    next: std::sync::atomic::AtomicUsize,
    /// Delivery reads so far.
    reads: std::sync::atomic::AtomicU64,
}

/// Reader connections of a database on disk.
const READERS: usize = 2;

/// How long a statement waits for the connection before it fails.
const CONN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Pages in the write-ahead log past which a commit checkpoints it itself (SQLite's default is
/// 1,000); below, [`GatewayDb::checkpoint_log`] does.
const COMMIT_CHECKPOINT_PAGES: u32 = 10_000;

/// Accounts remembered as existing, at most (about 100 bytes each).
const KNOWN_ACCOUNTS: usize = 100_000;

/// The group commit of `Send`s and `Ack`s: one that comes while others are being written
/// waits, and all that waited are written in one transaction, in the order they came, so a
/// busy gateway commits once per batch rather than once per message or acknowledgement; one
/// that finds the database idle is written at once. The writing is a task of its own, which no
/// caller's cancellation stops, and there is one such task at a time: a write that comes while
/// it runs is only put in line. (With many accounts, each acknowledges one envelope at a time:
/// alone, their `Ack`s were a transaction each on the one connection. A task per write, each
/// waking in turn to find its write done, was thread hand-offs per message.)
#[derive(Debug, Default)]
struct WriteGroup {
    waiting: std::sync::Mutex<Waiting>,
    /// Taken by the writing task before it writes, so a test that holds it gathers a batch (or
    /// stops the task where it waits). The gateway needs no lock for it: `Waiting::writing`
    /// already keeps to one writing task.
    #[cfg(test)]
    writer: tokio::sync::Mutex<()>,
    /// Transactions written so far.
    batches: std::sync::atomic::AtomicU64,
    /// Statements those transactions took, their begin and commit included (the tests read it).
    #[cfg_attr(not(test), allow(dead_code))]
    statements: std::sync::atomic::AtomicU64,
    /// Writing tasks started so far (the tests read it).
    #[cfg_attr(not(test), allow(dead_code))]
    tasks: std::sync::atomic::AtomicU64,
    /// Told of each batch's envelopes once it is committed (see [`GatewayDb::on_stored`]).
    on_stored: std::sync::OnceLock<OnStored>,
    /// The id of the envelope stored last for each account that got one since the gateway
    /// started, by any writer, kept under the writing connection in the order of the commits;
    /// emptied when a write fails or when it would grow past `KNOWN_ACCOUNTS`. It is each
    /// [`Stored::after`].
    last_stored: std::sync::Mutex<HashMap<String, i64>>,
}

/// What the group commit tells of each batch it committed: the envelopes each account got.
struct OnStored(Box<Told>);

/// The function behind [`OnStored`].
type Told = dyn for<'a> Fn(&[Stored<'a>]) + Send + Sync;

/// The envelopes one committed batch stored for one account, in their order, and where they
/// follow on in the account's queue.
#[derive(Debug)]
pub struct Stored<'a> {
    pub recipient: &'a str,
    /// The id of the envelope stored for the account before these, by any writer since the
    /// gateway started: a reader that has everything up to that id and these has the whole
    /// queue. `None` when the gateway does not know it (the account's first envelope since
    /// it started, or since a write failed).
    pub after: Option<i64>,
    rows: Vec<(i64, &'a pb::Envelope)>,
    now: i64,
}

impl Stored<'_> {
    /// The envelopes as a delivery read returns them ([`GatewayDb::envelopes_after`]).
    pub fn envelopes(&self) -> Vec<pb::Envelope> {
        self.rows
            .iter()
            .map(|&(id, e)| {
                let (ts, extra) = envelope_columns(e, self.now);
                stored_envelope(StoredRow {
                    id,
                    from: e.from.clone(),
                    to: e.to.clone(),
                    timestamp: ts,
                    server_timestamp: self.now,
                    kind: e.kind,
                    ciphertext: e.ciphertext.clone(),
                    message_id: e.message_id.clone(),
                    group: e.group.clone(),
                    extra,
                })
            })
            .collect()
    }
}

/// An envelope's columns as stored.
struct StoredRow {
    id: i64,
    from: String,
    to: String,
    timestamp: i64,
    server_timestamp: i64,
    kind: i32,
    ciphertext: Vec<u8>,
    message_id: String,
    group: String,
    extra: Option<Vec<u8>>,
}

/// The envelope a stored row stands for: the one shape both the delivery read and the hand-over
/// of a commit ([`Stored::envelopes`]) give.
fn stored_envelope(r: StoredRow) -> pb::Envelope {
    use prost::Message;
    let mut env = pb::Envelope {
        id: r.id as u64,
        from: r.from,
        to: r.to,
        timestamp: r.timestamp as u64,
        server_timestamp: r.server_timestamp as u64,
        kind: r.kind,
        ciphertext: r.ciphertext,
        message_id: r.message_id,
        group: r.group,
        receipt: None,
        group_update: None,
    };
    if let Some(x) = r.extra {
        if r.kind == pb::Kind::Receipt as i32 {
            env.receipt = pb::Receipt::decode(&x[..]).ok();
        } else if r.kind == pb::Kind::GroupUpdate as i32 {
            env.group_update = pb::Group::decode(&x[..]).ok();
        }
    }
    env
}

impl std::fmt::Debug for OnStored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnStored")
    }
}

/// The writes in line for the group commit, and whether a task is there to write them.
#[derive(Debug, Default)]
struct Waiting {
    writes: Vec<PendingWrite>,
    /// A writing task is under way; it takes every write put in line before it ends.
    writing: bool,
}

#[derive(Debug)]
enum PendingWrite {
    Send(PendingSend),
    Ack {
        account: String,
        ids: Vec<u64>,
        reply: tokio::sync::oneshot::Sender<Result<(), sqlx::Error>>,
    },
    /// One envelope without an idempotency record (a receipt): `true` once stored, `false`
    /// when the recipient's queue is full.
    Envelope {
        envelope: Box<pb::Envelope>,
        queue_max: u32,
        reply: tokio::sync::oneshot::Sender<Result<bool, sqlx::Error>>,
    },
}

#[derive(Debug)]
struct PendingSend {
    sender: String,
    message_id: String,
    envelopes: Vec<pb::Envelope>,
    queue_max: u32,
    fanout: bool,
    reply: tokio::sync::oneshot::Sender<Result<SendOutcome, sqlx::Error>>,
}

impl PendingWrite {
    /// Answers the caller: a `Send`'s outcome once committed, or the batch's error.
    fn answer(self, written: Result<Option<SendOutcome>, &str>) {
        let error = |e: &str| sqlx::Error::Protocol(e.to_owned());
        match self {
            PendingWrite::Send(p) => {
                let outcome = written.and_then(|o| o.ok_or("a Send without an outcome"));
                let _ = p.reply.send(outcome.map_err(error));
            }
            PendingWrite::Ack { reply, .. } => {
                let _ = reply.send(written.map(drop).map_err(error));
            }
            PendingWrite::Envelope { reply, .. } => {
                let stored = written
                    .and_then(|o| o.ok_or("an envelope without an outcome"))
                    .map(|o| matches!(o, SendOutcome::Stored(..)));
                let _ = reply.send(stored.map_err(error));
            }
        }
    }
}

/// What a batch's writes did, before the commit: each write's outcome, and the envelopes
/// stored, in their order, with their ids and the time they were stored at.
struct Written<'a> {
    outcomes: Vec<Option<SendOutcome>>,
    rows: Vec<&'a pb::Envelope>,
    ids: Vec<i64>,
    now: i64,
}

/// Rows of one multi-row statement at most (an envelope's row binds 9 values; SQLite takes
/// 32,766 in a statement).
const ROWS_PER_STATEMENT: usize = 1_000;

/// `rows` groups of `width` placeholders, as a multi-row statement's `VALUES` take them:
/// `(?, ?), (?, ?)`; for a width of 1, a plain list: `?, ?`.
fn marks(rows: usize, width: usize) -> String {
    let row = match width {
        1 => "?".to_owned(),
        _ => format!("({})", vec!["?"; width].join(", ")),
    };
    vec![row; rows].join(", ")
}

/// Takes room in the recipients' queues (`sizes`, as the batch has filled them so far) for a
/// send's `envelopes`: those that fit, or, for a 1:1 send (not `fanout`), nothing at all
/// (`None`) when one does not.
fn take_room<'a>(
    sizes: &mut HashMap<&'a str, i64>,
    envelopes: &'a [pb::Envelope],
    queue_max: u32,
    fanout: bool,
) -> Option<Vec<&'a pb::Envelope>> {
    let mut kept = Vec::with_capacity(envelopes.len());
    for e in envelopes {
        let size = sizes.entry(&e.to).or_insert(0);
        if *size < i64::from(queue_max) {
            *size += 1;
            kept.push(e);
        } else if !fanout {
            for k in kept {
                if let Some(size) = sizes.get_mut(k.to.as_str()) {
                    *size -= 1;
                }
            }
            return None;
        }
    }
    Some(kept)
}

/// An envelope's `timestamp` and `extra` columns: receipts and group updates carry the
/// server's time (`now`) and their payload; messages the sender's time, as sent.
fn envelope_columns(e: &pb::Envelope, now: i64) -> (i64, Option<Vec<u8>>) {
    use prost::Message;
    let extra = match (&e.receipt, &e.group_update) {
        (Some(r), _) => Some(r.encode_to_vec()),
        (_, Some(g)) => Some(g.encode_to_vec()),
        _ => None,
    };
    let ts = if e.kind == pb::Kind::Receipt as i32 || e.kind == pb::Kind::GroupUpdate as i32 {
        now
    } else {
        e.timestamp as i64
    };
    (ts, extra)
}

/// `Send`s, `Ack`s and receipts written in one transaction at most.
const MAX_WRITE_GROUP: usize = 1_000;

/// Settings of the verification try budget (docs §6.2).
#[derive(Clone, Copy, Debug)]
pub struct VerifyBudget {
    pub code_ttl_ms: i64,
    pub tries: i64,
    pub window_ms: i64,
    pub lockout_ms: i64,
    pub lockout_max_ms: i64,
}

/// What a `Verify` came to.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The account's verification is locked for this many more milliseconds; nothing was checked.
    Locked(i64),
    NoCode,
    Expired,
    Wrong,
    Correct,
}

/// What storing a `Send` came to.
#[derive(Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Stored now: (server_timestamp, envelopes stored).
    Stored(i64, i64),
    /// A repeat of an earlier `Send`: its (server_timestamp, recipients).
    Repeat(i64, i64),
    /// The (single) recipient's queue is full; nothing was stored.
    QueueFull,
}

/// A group-commit answer; a writer that went away without answering (its runtime shutting
/// down) is an error.
async fn abandoned_as_error<T>(
    answer: tokio::sync::oneshot::Receiver<Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    answer
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::Protocol("the write was abandoned".into())))
}

/// Frees the group commit's writer if its task ends without finishing (see
/// [`GatewayDb::write_waiting`]).
struct WriterEnded<'a>(Option<&'a GatewayDb>);

impl Drop for WriterEnded<'_> {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            let mut waiting = db.lock_waiting();
            waiting.writes.clear();
            waiting.writing = false;
        }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The columns (one-time EC prekeys, one-time Kyber prekeys) of an account, each bound to the
/// account: the tail of a `SELECT` that `key_counts` and `login_counts` share.
macro_rules! prekey_counts {
    () => {
        "(SELECT COUNT(*) FROM prekey WHERE account = ? AND kind = 'one_time'), \
         (SELECT COUNT(*) FROM prekey WHERE account = ? AND kind = 'kyber')"
    };
}

/// What a login tells of its account (see [`GatewayDb::login_counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginCounts {
    pub queued: u32,
    /// The highest id queued: the delivery pushes `QueueDrained` after it.
    pub upto: i64,
    pub one_time_prekeys: u32,
    pub kyber_prekeys: u32,
}

/// A stored key of the directory.
#[derive(Clone, Debug)]
pub struct StoredKey {
    pub id: u32,
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

impl GatewayDb {
    pub async fn open(uri: &str) -> Result<Self, GatewayError> {
        let opts = SqliteConnectOptions::from_str(uri)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .pragma("wal_autocheckpoint", COMMIT_CHECKPOINT_PAGES.to_string());
        let mut conn = tokio::time::timeout(CONN_TIMEOUT, SqliteConnection::connect_with(&opts))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        MIGRATIONS.run(&mut conn).await?;
        let mut readers = Readers::default();
        if !(uri.contains(":memory:") || uri.contains("mode=memory")) {
            let read_opts = opts.clone().read_only(true);
            for _ in 0..READERS {
                let reader =
                    tokio::time::timeout(CONN_TIMEOUT, SqliteConnection::connect_with(&read_opts))
                        .await
                        .map_err(|_| sqlx::Error::PoolTimedOut)??;
                readers.conns.push(Arc::new(Mutex::new(reader)));
            }
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            readers: Arc::new(readers),
            opts,
            envelope_ttl_ms: i64::MAX,
            blob_ttl_ms: i64::MAX,
            writes: Default::default(),
            log_syncs: Default::default(),
            known: Default::default(),
        })
    }

    /// Copies the write-ahead log back into the database file every `every`, on a connection
    /// of its own, until `shutdown` turns true. A checkpoint writes the logged pages and syncs
    /// the file to disk, which takes milliseconds (tens on a busy disk). Left to SQLite, the
    /// commit that crosses 1,000 logged pages does it, holding the one connection meanwhile,
    /// so every `Send` and delivery behind it waits; a passive checkpoint from another
    /// connection runs beside the writer instead. Commits still checkpoint past
    /// [`COMMIT_CHECKPOINT_PAGES`], should this fall behind.
    ///
    /// Under steady writes a passive checkpoint never copies the whole log, and SQLite syncs the
    /// database file only after one that did, so the copied pages would pile up unsynced until
    /// a commit's own checkpoint synced them all, with every write waiting. After each
    /// checkpoint that copied pages, this syncs the file itself.
    pub(crate) async fn checkpoint_log(
        &self,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut conn: Option<(SqliteConnection, Arc<std::fs::File>)> = None;
        // Log frames copied into the database file, as the last checkpoint reported.
        let mut copied = 0i64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
            }
            if conn.is_none() {
                match self.checkpoint_conn().await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open a connection for checkpoints");
                        continue;
                    }
                }
            }
            let Some((c, file)) = conn.as_mut() else {
                continue;
            };
            let checkpoint: Result<(i64, i64, i64), _> =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_one(&mut *c)
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
                                self.log_syncs
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot sync the database file"),
                        }
                    }
                    copied = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot checkpoint the database's log");
                    conn = None;
                }
            }
        }
    }

    /// A connection for checkpoints, and the database file (read-only: a sync writes the
    /// file's pages that any handle left in memory).
    async fn checkpoint_conn(&self) -> Result<(SqliteConnection, Arc<std::fs::File>), sqlx::Error> {
        let mut conn = SqliteConnection::connect_with(&self.opts).await?;
        let databases: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(&mut conn)
            .await?;
        let path = databases
            .into_iter()
            .find_map(|(_, name, file)| (name == "main").then_some(file))
            .ok_or_else(|| sqlx::Error::Protocol("the database has no main file".into()))?;
        let file = std::fs::File::open(&path)?;
        Ok((conn, Arc::new(file)))
    }

    /// The connection, once the statements before have run; given back when dropped.
    pub(crate) async fn conn(&self) -> Result<OwnedMutexGuard<SqliteConnection>, sqlx::Error> {
        tokio::time::timeout(CONN_TIMEOUT, self.conn.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    /// A connection for a read that needs only what was committed before it: an idle reader,
    /// else the next reader in turn; the one connection when there are no readers.
    async fn reader(&self) -> Result<OwnedMutexGuard<SqliteConnection>, sqlx::Error> {
        let conns = &self.readers.conns;
        if conns.is_empty() {
            return self.conn().await;
        }
        if let Some(idle) = conns.iter().find_map(|c| c.clone().try_lock_owned().ok()) {
            return Ok(idle);
        }
        let next = self
            .readers
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(CONN_TIMEOUT, conns[next % conns.len()].clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    /// Begins a transaction that will write, holding SQLite's write lock from its first
    /// statement.
    ///
    /// A deferred transaction that reads first and writes later does not wait for a lock that
    /// another connection holds: the upgrade fails at once with `SQLITE_BUSY`, whatever the busy
    /// timeout. A first statement that writes (and changes nothing) takes the lock under the busy
    /// timeout instead. Not `BEGIN IMMEDIATE`: sqlx keeps its own transaction depth, and a custom
    /// `BEGIN` is refused for good once a commit has failed (a full disk, say).
    async fn write_tx(
        conn: &mut SqliteConnection,
    ) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, sqlx::Error> {
        let mut tx = conn.begin().await?;
        sqlx::query("DELETE FROM queue_size WHERE 1 = 0")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    fn envelope_cutoff(&self) -> i64 {
        now_ms().saturating_sub(self.envelope_ttl_ms)
    }

    fn blob_cutoff(&self) -> i64 {
        now_ms().saturating_sub(self.blob_ttl_ms)
    }

    /// Checks a verification code against the account's try budget, all in one transaction
    /// (the pool has one connection, so concurrent `Verify`s of any connections are serialized).
    pub async fn verify_code(
        &self,
        account: &str,
        code: &str,
        b: VerifyBudget,
    ) -> Result<VerifyOutcome, sqlx::Error> {
        use subtle::ConstantTimeEq;
        let now = now_ms();
        let mut conn = self.conn().await?;
        let mut tx = Self::write_tx(&mut conn).await?;
        let budget = sqlx::query(
            "SELECT window_start, failures, locked_until, lockouts FROM verify_budget WHERE account = ?",
        )
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?;
        let (mut window_start, mut failures, locked_until, mut lockouts) = match budget {
            Some(r) => (
                r.try_get::<i64, _>("window_start")?,
                r.try_get::<i64, _>("failures")?,
                r.try_get::<i64, _>("locked_until")?,
                r.try_get::<i64, _>("lockouts")?,
            ),
            None => (now, 0, 0, 0),
        };
        if locked_until > now {
            return Ok(VerifyOutcome::Locked(locked_until - now));
        }
        let pending = sqlx::query("SELECT code, created_at FROM verification WHERE account = ?")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(pending) = pending else {
            return Ok(VerifyOutcome::NoCode);
        };
        let (stored, created): (String, i64) =
            (pending.try_get("code")?, pending.try_get("created_at")?);
        if now - created > b.code_ttl_ms {
            sqlx::query("DELETE FROM verification WHERE account = ?")
                .bind(account)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(VerifyOutcome::Expired);
        }
        if bool::from(stored.as_bytes().ct_eq(code.as_bytes())) {
            for q in [
                "DELETE FROM verification WHERE account = ?",
                "DELETE FROM verify_budget WHERE account = ?",
            ] {
                sqlx::query(q).bind(account).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            return Ok(VerifyOutcome::Correct);
        }
        // A lock-out long past is forgiven: the next one starts short again.
        if locked_until > 0 && now - locked_until > b.lockout_max_ms {
            lockouts = 0;
        }
        if now - window_start > b.window_ms {
            window_start = now;
            failures = 0;
        }
        failures += 1;
        let mut new_lock = locked_until;
        if failures >= b.tries {
            let shift = lockouts.clamp(0, 30) as u32;
            new_lock = now
                + b.lockout_ms
                    .saturating_mul(1 << shift)
                    .min(b.lockout_max_ms);
            lockouts += 1;
            failures = 0;
            window_start = now;
            // The code is invalidated too: after the lock-out a new `Register` is needed.
            sqlx::query("DELETE FROM verification WHERE account = ?")
                .bind(account)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO verify_budget (account, window_start, failures, locked_until, lockouts) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET \
             window_start = excluded.window_start, failures = excluded.failures, \
             locked_until = excluded.locked_until, lockouts = excluded.lockouts",
        )
        .bind(account)
        .bind(window_start)
        .bind(failures)
        .bind(new_lock)
        .bind(lockouts)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(VerifyOutcome::Wrong)
    }

    /// Milliseconds the account's verification stays locked (0 when it is not).
    pub async fn verify_locked_for(&self, account: &str) -> Result<i64, sqlx::Error> {
        let until: Option<i64> =
            sqlx::query_scalar("SELECT locked_until FROM verify_budget WHERE account = ?")
                .bind(account)
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        Ok((until.unwrap_or(0) - now_ms()).max(0))
    }

    /// Deletes envelopes stored before `envelopes_before`, blobs stored before `blobs_before`
    /// and idempotency records before `sent_before`; returns the deleted blob ids.
    pub async fn expire(
        &self,
        envelopes_before: i64,
        blobs_before: i64,
        sent_before: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        let mut conn = self.conn().await?;
        let mut tx = Self::write_tx(&mut conn).await?;
        sqlx::query("DELETE FROM envelope WHERE server_timestamp < ?")
            .bind(envelopes_before)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sent WHERE server_timestamp < ?")
            .bind(sent_before)
            .execute(&mut *tx)
            .await?;
        let blobs: Vec<String> = sqlx::query_scalar("SELECT id FROM blob WHERE created_at < ?")
            .bind(blobs_before)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM blob WHERE created_at < ?")
            .bind(blobs_before)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(blobs)
    }

    /// The queue sizes of `recipients` (0 for an empty queue), in one statement per
    /// [`ROWS_PER_STATEMENT`] of them: what [`take_room`] starts from. Kept by triggers
    /// (migration 0003), so constant time however long the queues.
    async fn queue_sizes<'a>(
        tx: &mut SqliteConnection,
        recipients: impl IntoIterator<Item = &'a str>,
        statements: &mut u64,
    ) -> Result<HashMap<&'a str, i64>, sqlx::Error> {
        let mut sizes: HashMap<&str, i64> = recipients.into_iter().map(|r| (r, 0)).collect();
        let asked: Vec<&str> = sizes.keys().copied().collect();
        for chunk in asked.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT recipient, n FROM queue_size WHERE recipient IN ({})",
                marks(chunk.len(), 1)
            );
            let mut q = sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q.bind(*r);
            }
            for (recipient, n) in q.fetch_all(&mut *tx).await? {
                if let Some(size) = sizes.get_mut(recipient.as_str()) {
                    *size = n;
                }
            }
            *statements += 1;
        }
        Ok(sizes)
    }

    pub async fn account_secret_hash(&self, account: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        sqlx::query_scalar("SELECT secret_hash FROM account WHERE account = ?")
            .bind(account)
            .fetch_optional(&mut *self.reader().await?)
            .await
    }

    /// Whether an account is registered. Accounts are never deleted, so one found is
    /// remembered (up to [`KNOWN_ACCOUNTS`] of them): a `Send` to a known account then reads
    /// nothing before it joins the group commit.
    pub async fn account_exists(&self, account: &str) -> Result<bool, sqlx::Error> {
        if self.lock_known().contains(account) {
            return Ok(true);
        }
        let exists = self.account_secret_hash(account).await?.is_some();
        if exists {
            let mut known = self.lock_known();
            if known.len() < KNOWN_ACCOUNTS {
                known.insert(account.to_owned());
            }
        }
        Ok(exists)
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the account or replaces its secret.
    pub async fn set_secret(&self, account: &str, hash: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO account (account, secret_hash, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (account) DO UPDATE SET secret_hash = excluded.secret_hash",
        )
        .bind(account)
        .bind(hash)
        .bind(now_ms())
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    pub async fn set_code(&self, account: &str, code: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO verification (account, code, created_at, tries) VALUES (?, ?, ?, 0) \
             ON CONFLICT (account) DO UPDATE SET code = excluded.code, created_at = excluded.created_at, tries = 0",
        )
        .bind(account)
        .bind(code)
        .bind(now_ms())
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    /// What `LoggedIn` tells: the account's queued envelopes and the highest queued id, read
    /// together so that `queued` equals what the delivery up to that id pushes, and its
    /// one-time EC and Kyber prekeys. One statement.
    pub async fn login_counts(&self, account: &str) -> Result<LoginCounts, sqlx::Error> {
        let cutoff = self.envelope_cutoff();
        let (queued, upto, one_time, kyber): (i64, i64, i64, i64) = sqlx::query_as(
            concat!(
                "SELECT \
                 (SELECT COUNT(*) FROM envelope WHERE recipient = ? AND server_timestamp >= ?), \
                 (SELECT COALESCE(MAX(id), 0) FROM envelope WHERE recipient = ? AND server_timestamp >= ?), ",
                prekey_counts!()
            ),
        )
        .bind(account)
        .bind(cutoff)
        .bind(account)
        .bind(cutoff)
        .bind(account)
        .bind(account)
        .fetch_one(&mut *self.reader().await?)
        .await?;
        Ok(LoginCounts {
            queued: queued as u32,
            upto,
            one_time_prekeys: one_time as u32,
            kyber_prekeys: kyber as u32,
        })
    }

    /// (one-time EC prekeys, one-time Kyber prekeys) of an account.
    pub async fn key_counts(&self, account: &str) -> Result<(u32, u32), sqlx::Error> {
        let (one_time, kyber): (i64, i64) = sqlx::query_as(concat!("SELECT ", prekey_counts!()))
            .bind(account)
            .bind(account)
            .fetch_one(&mut *self.reader().await?)
            .await?;
        Ok((one_time as u32, kyber as u32))
    }

    pub async fn identity(&self, account: &str) -> Result<Option<(Vec<u8>, u32)>, sqlx::Error> {
        let row =
            sqlx::query("SELECT identity_key, registration_id FROM account WHERE account = ?")
                .bind(account)
                .fetch_optional(&mut *self.reader().await?)
                .await?;
        Ok(row.and_then(|r| {
            let ik: Option<Vec<u8>> = r.try_get("identity_key").ok()?;
            let reg: i64 = r.try_get("registration_id").ok()?;
            ik.map(|ik| (ik, reg as u32))
        }))
    }

    /// Applies a validated key upload in one transaction.
    pub async fn upload_keys(&self, account: &str, up: &pb::UploadKeys) -> Result<(), sqlx::Error> {
        let mut conn = self.conn().await?;
        let mut tx = Self::write_tx(&mut conn).await?;
        let current: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT identity_key FROM account WHERE account = ?")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?;
        if current.flatten().as_deref() != Some(&up.identity_key[..]) {
            sqlx::query("DELETE FROM prekey WHERE account = ?")
                .bind(account)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE account SET identity_key = ?, registration_id = ? WHERE account = ?")
            .bind(&up.identity_key[..])
            .bind(up.registration_id as i64)
            .bind(account)
            .execute(&mut *tx)
            .await?;
        let mut seq: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM prekey WHERE account = ?")
                .bind(account)
                .fetch_one(&mut *tx)
                .await?;
        let mut put = |kind: &'static str, id: u32, pk: Vec<u8>, sig: Option<Vec<u8>>| {
            seq += 1;
            (kind, id, pk, sig, seq)
        };
        let mut rows = Vec::new();
        if let Some(k) = &up.signed_prekey {
            rows.push(put(
                "signed",
                k.id,
                k.public_key.clone(),
                Some(k.signature.clone()),
            ));
        }
        if let Some(k) = &up.kyber_last_resort {
            rows.push(put(
                "kyber_last_resort",
                k.id,
                k.public_key.clone(),
                Some(k.signature.clone()),
            ));
        }
        for k in &up.one_time_prekeys {
            rows.push(put("one_time", k.id, k.public_key.clone(), None));
        }
        for k in &up.kyber_prekeys {
            rows.push(put(
                "kyber",
                k.id,
                k.public_key.clone(),
                Some(k.signature.clone()),
            ));
        }
        for (kind, id, pk, sig, seq) in rows {
            if kind == "signed" || kind == "kyber_last_resort" {
                sqlx::query("DELETE FROM prekey WHERE account = ? AND kind = ?")
                    .bind(account)
                    .bind(kind)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO prekey (account, kind, id, public_key, signature, seq) VALUES (?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (account, kind, id) DO UPDATE SET public_key = excluded.public_key, signature = excluded.signature, seq = excluded.seq",
            )
            .bind(account)
            .bind(kind)
            .bind(id as i64)
            .bind(pk)
            .bind(sig)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Ids of the stored one-time EC prekeys and one-time Kyber prekeys.
    pub async fn one_time_key_ids(
        &self,
        account: &str,
    ) -> Result<
        (
            std::collections::BTreeSet<u32>,
            std::collections::BTreeSet<u32>,
        ),
        sqlx::Error,
    > {
        let rows = sqlx::query(
            "SELECT kind, id FROM prekey WHERE account = ? AND kind IN ('one_time','kyber')",
        )
        .bind(account)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        let mut ids = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for r in rows {
            let kind: String = r.try_get("kind")?;
            let id = r.try_get::<i64, _>("id")? as u32;
            if kind == "one_time" {
                ids.0.insert(id);
            } else {
                ids.1.insert(id);
            }
        }
        Ok(ids)
    }

    /// Whether the account has a signed prekey and a Kyber last-resort key stored.
    pub async fn has_base_keys(&self, account: &str) -> Result<(bool, bool), sqlx::Error> {
        let kinds: Vec<String> = sqlx::query_scalar(
            "SELECT kind FROM prekey WHERE account = ? AND kind IN ('signed','kyber_last_resort')",
        )
        .bind(account)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        Ok((
            kinds.iter().any(|k| k == "signed"),
            kinds.iter().any(|k| k == "kyber_last_resort"),
        ))
    }

    async fn take_key(
        tx: &mut sqlx::SqliteConnection,
        account: &str,
        kind: &str,
        remove: bool,
    ) -> Result<Option<StoredKey>, sqlx::Error> {
        let row = sqlx::query("SELECT id, public_key, signature FROM prekey WHERE account = ? AND kind = ? ORDER BY seq LIMIT 1")
            .bind(account)
            .bind(kind)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(r) = row else { return Ok(None) };
        let key = StoredKey {
            id: r.try_get::<i64, _>("id")? as u32,
            public_key: r.try_get("public_key")?,
            signature: r
                .try_get::<Option<Vec<u8>>, _>("signature")?
                .unwrap_or_default(),
        };
        if remove {
            sqlx::query("DELETE FROM prekey WHERE account = ? AND kind = ? AND id = ?")
                .bind(account)
                .bind(kind)
                .bind(key.id as i64)
                .execute(&mut *tx)
                .await?;
        }
        Ok(Some(key))
    }

    /// Fetches a bundle, consuming one one-time key of each kind where available.
    pub async fn fetch_bundle(&self, account: &str) -> Result<Option<pb::Bundle>, sqlx::Error> {
        let Some((identity_key, registration_id)) = self.identity(account).await? else {
            return Ok(None);
        };
        let mut conn = self.conn().await?;
        let mut tx = Self::write_tx(&mut conn).await?;
        let Some(signed) = Self::take_key(&mut tx, account, "signed", false).await? else {
            return Ok(None);
        };
        let one_time = Self::take_key(&mut tx, account, "one_time", true).await?;
        let kyber = match Self::take_key(&mut tx, account, "kyber", true).await? {
            Some(k) => Some(k),
            None => Self::take_key(&mut tx, account, "kyber_last_resort", false).await?,
        };
        tx.commit().await?;
        let signed_key = |k: StoredKey| pb::SignedKey {
            id: k.id,
            public_key: k.public_key,
            signature: k.signature,
        };
        Ok(Some(pb::Bundle {
            account: account.to_owned(),
            device_id: mib_wire::DEVICE_ID,
            registration_id,
            identity_key,
            signed_prekey: Some(signed_key(signed)),
            one_time_prekey: one_time.map(|k| pb::PreKey {
                id: k.id,
                public_key: k.public_key,
            }),
            kyber_prekey: kyber.map(signed_key),
        }))
    }

    /// Stores envelopes of one `Send` (and the idempotency record) in one transaction, with the
    /// other writes that wait for it (the group commit, [`WriteGroup`]); answers once it is
    /// committed. A 1:1 send to a full queue stores nothing; a group fan-out (`fanout`) skips
    /// members whose queue is full.
    ///
    /// In two steps: the `Send` takes its place in the group commit when this is called (so
    /// sends stored one after the other are stored in that order), and the returned future
    /// gives its outcome once it is committed.
    pub fn store_send(
        &self,
        sender: &str,
        message_id: &str,
        envelopes: Vec<pb::Envelope>,
        queue_max: u32,
        fanout: bool,
    ) -> impl std::future::Future<Output = Result<SendOutcome, sqlx::Error>> + Send + 'static {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue_write(PendingWrite::Send(PendingSend {
            sender: sender.to_owned(),
            message_id: message_id.to_owned(),
            envelopes,
            queue_max,
            fanout,
            reply,
        }));
        abandoned_as_error(answer)
    }

    /// Deletes the acknowledged envelopes of `account`, with the other writes that wait for it
    /// (the group commit, [`WriteGroup`]); returns once that is committed.
    pub async fn ack(&self, account: &str, ids: &[u64]) -> Result<(), sqlx::Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue_write(PendingWrite::Ack {
            account: account.to_owned(),
            ids: ids.to_vec(),
            reply,
        });
        abandoned_as_error(answer).await
    }

    /// Has the group commit call `told` after each batch it commits, with the envelopes each
    /// account got in it, before any of its writes is answered. The writing task calls it,
    /// which no caller's going away stops: a sender whose connection closes meanwhile leaves
    /// nothing stored unannounced. Only the first call counts. (Group updates are stored
    /// apart, [`GatewayDb::save_group`]: their caller tells the members.)
    pub fn on_stored(&self, told: impl for<'a> Fn(&[Stored<'a>]) + Send + Sync + 'static) {
        let _ = self.writes.on_stored.set(OnStored(Box::new(told)));
    }

    /// Puts `write` in line for the group commit and makes sure a writer comes for it: a task
    /// of its own, started here unless one is under way. A caller that goes away (its
    /// connection closed) must not cancel a batch that holds other connections' writes.
    fn queue_write(&self, write: PendingWrite) {
        let mut waiting = self.lock_waiting();
        waiting.writes.push(write);
        if waiting.writing {
            return;
        }
        waiting.writing = true;
        drop(waiting);
        self.writes
            .tasks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let db = self.clone();
        tokio::spawn(async move { db.write_waiting().await });
    }

    /// Writes every `Send` and `Ack` that waits, in batches, until none is left; then the next
    /// write starts a task again.
    async fn write_waiting(&self) {
        // A task dropped midway (its runtime shutting down) hands nothing on: the writes in
        // line are dropped, so their callers hear that the write was abandoned, and a later
        // write starts a task again.
        let mut ended = WriterEnded(Some(self));
        #[cfg(test)]
        let _writer = self.writes.writer.lock().await;
        loop {
            let batch: Vec<PendingWrite> = {
                let mut w = self.lock_waiting();
                if w.writes.is_empty() {
                    w.writing = false;
                    ended.0 = None;
                    return;
                }
                let n = w.writes.len().min(MAX_WRITE_GROUP);
                w.writes.drain(..n).collect()
            };
            self.write_batch(batch).await;
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.writes
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `batch` in one transaction and answers each; a failure fails them all (nothing of
    /// the batch is stored).
    async fn write_batch(&self, batch: Vec<PendingWrite>) {
        let mut statements = 0;
        let written = async {
            let mut conn = self.conn().await?;
            let mut tx = Self::write_tx(&mut conn).await?;
            let w = Self::write_all(&mut tx, &batch, &mut statements).await?;
            let stored = self.chain_stored(&w.rows, &w.ids, w.now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>((w.outcomes, stored))
        }
        .await;
        use std::sync::atomic::Ordering::Relaxed;
        self.writes.batches.fetch_add(1, Relaxed);
        // The batch's statements, with its begin (two: `write_tx`) and commit.
        self.writes.statements.fetch_add(statements + 3, Relaxed);
        match written {
            Ok((outcomes, stored)) => {
                if let Some(told) = self.writes.on_stored.get() {
                    (told.0)(&stored);
                }
                for (w, outcome) in batch.into_iter().zip(outcomes) {
                    w.answer(Ok(outcome));
                }
            }
            Err(e) => {
                self.forget_last_stored();
                let e = e.to_string();
                for w in batch {
                    w.answer(Err(&e));
                }
            }
        }
    }

    /// The batch's writes inside its transaction, as a few multi-row statements however many
    /// writes and accounts it holds (`statements` counts them); each write's outcome.
    ///
    /// The writes of one batch come from different connections: a connection's `Ack` is
    /// handled only once its earlier `Send`s are answered, and its next request only once the
    /// `Ack` is, while its `Send`s may share a batch and keep their order. So the batch is
    /// written as if its `Ack`s had come first, which is an order they could have come in: the
    /// room they free counts for the `Send`s beside them. Then each `Send` and receipt, in
    /// order, against the queue sizes and earlier sends read once: a repeat (of an earlier
    /// batch's send or of one earlier in this batch) is answered as the first was, and a
    /// 1:1 send or receipt to a full queue stores nothing.
    async fn write_all<'a>(
        tx: &mut SqliteConnection,
        batch: &'a [PendingWrite],
        statements: &mut u64,
    ) -> Result<Written<'a>, sqlx::Error> {
        let acked: Vec<(&str, i64)> = batch
            .iter()
            .flat_map(|w| match w {
                PendingWrite::Ack { account, ids, .. } => ids
                    .iter()
                    .map(|id| (account.as_str(), *id as i64))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        for chunk in acked.chunks(ROWS_PER_STATEMENT) {
            // By id (the table's key), and only where the id is the acking account's.
            let sql = format!(
                "DELETE FROM envelope WHERE id IN ({}) AND (recipient, id) IN \
                 (SELECT column1, column2 FROM (VALUES {}))",
                marks(chunk.len(), 1),
                marks(chunk.len(), 2)
            );
            // Only placeholders are spliced in; the values are bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (_, id) in chunk {
                q = q.bind(*id);
            }
            for (account, id) in chunk {
                q = q.bind(*account).bind(*id);
            }
            q.execute(&mut *tx).await?;
            *statements += 1;
        }

        let sends: Vec<&PendingSend> = batch
            .iter()
            .filter_map(|w| match w {
                PendingWrite::Send(p) => Some(p),
                _ => None,
            })
            .collect();
        let mut known: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
        for chunk in sends.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT s.sender, s.message_id, s.server_timestamp, s.recipients \
                 FROM (VALUES {}) AS v JOIN sent AS s \
                 ON s.sender = v.column1 AND s.message_id = v.column2",
                marks(chunk.len(), 2)
            );
            let mut q = sqlx::query_as::<_, (String, String, i64, i64)>(sqlx::AssertSqlSafe(sql));
            for p in chunk {
                q = q.bind(&p.sender).bind(&p.message_id);
            }
            // Keyed by the batch's own strings, found by a lookup per row (a client could fill
            // a batch with repeats).
            let asked: HashMap<(&str, &str), usize> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| ((p.sender.as_str(), p.message_id.as_str()), i))
                .collect();
            for (sender, message_id, ts, n) in q.fetch_all(&mut *tx).await? {
                if let Some(&i) = asked.get(&(sender.as_str(), message_id.as_str())) {
                    known.insert((&chunk[i].sender, &chunk[i].message_id), (ts, n));
                }
            }
            *statements += 1;
        }

        let recipients = batch.iter().flat_map(|w| match w {
            PendingWrite::Send(p) => p.envelopes.iter().map(|e| e.to.as_str()).collect(),
            PendingWrite::Envelope { envelope, .. } => vec![envelope.to.as_str()],
            PendingWrite::Ack { .. } => Vec::new(),
        });
        let mut sizes = Self::queue_sizes(tx, recipients, statements).await?;

        let now = now_ms();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut rows: Vec<&pb::Envelope> = Vec::new();
        let mut sent: Vec<(&str, &str, i64)> = Vec::new();
        for w in batch {
            outcomes.push(match w {
                PendingWrite::Ack { .. } => None,
                PendingWrite::Send(p) => Some(
                    match known.get(&(p.sender.as_str(), p.message_id.as_str())) {
                        Some(&(ts, n)) => SendOutcome::Repeat(ts, n),
                        None => match take_room(&mut sizes, &p.envelopes, p.queue_max, p.fanout) {
                            None => SendOutcome::QueueFull,
                            Some(kept) => {
                                let n = kept.len() as i64;
                                rows.extend(kept);
                                known.insert((&p.sender, &p.message_id), (now, n));
                                sent.push((&p.sender, &p.message_id, n));
                                SendOutcome::Stored(now, n)
                            }
                        },
                    },
                ),
                PendingWrite::Envelope {
                    envelope,
                    queue_max,
                    ..
                } => Some(
                    match take_room(
                        &mut sizes,
                        std::slice::from_ref(&**envelope),
                        *queue_max,
                        false,
                    ) {
                        None => SendOutcome::QueueFull,
                        Some(kept) => {
                            rows.extend(kept);
                            SendOutcome::Stored(now, 1)
                        }
                    },
                ),
            });
        }

        let ids = Self::insert_envelopes(tx, &rows, now, statements).await?;
        for chunk in sent.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO sent (sender, message_id, server_timestamp, recipients) VALUES {}",
                marks(chunk.len(), 4)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (sender, message_id, n) in chunk {
                q = q.bind(*sender).bind(*message_id).bind(now).bind(*n);
            }
            q.execute(&mut *tx).await?;
            *statements += 1;
        }
        Ok(Written {
            outcomes,
            rows,
            ids,
            now,
        })
    }

    /// Stores envelopes, in their order, and records the two accounts of each as contacts
    /// (docs §10.3: envelopes of any kind count): multi-row statements, counted in `statements`.
    /// Each envelope's id, in the same order.
    ///
    /// The ids of one statement's rows are the last one's and those just below it: the table's
    /// key is `AUTOINCREMENT`, so each row inserted takes one more than any id the table ever
    /// held, and a statement inserts its rows in the order of its `VALUES`, with no other
    /// writer between them. (The queue-size triggers' own inserts do not change what
    /// `last_insert_rowid` gives once the statement is done.)
    async fn insert_envelopes(
        tx: &mut SqliteConnection,
        rows: &[&pb::Envelope],
        now: i64,
        statements: &mut u64,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO envelope (recipient, sender, timestamp, server_timestamp, kind, \
                 ciphertext, message_id, grp, extra) VALUES {}",
                marks(chunk.len(), 9)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for e in chunk {
                let (ts, extra) = envelope_columns(e, now);
                q = q
                    .bind(&e.to)
                    .bind(&e.from)
                    .bind(ts)
                    .bind(now)
                    .bind(e.kind)
                    .bind(&e.ciphertext[..])
                    .bind(&e.message_id)
                    .bind(&e.group)
                    .bind(extra);
            }
            let last = q.execute(&mut *tx).await?.last_insert_rowid();
            let n = chunk.len() as i64;
            ids.extend(last - n + 1..=last);
            *statements += 1;
        }
        let pairs: std::collections::BTreeSet<(&str, &str)> = rows
            .iter()
            .filter(|e| e.from != e.to)
            .flat_map(|e| {
                [
                    (e.from.as_str(), e.to.as_str()),
                    (e.to.as_str(), e.from.as_str()),
                ]
            })
            .collect();
        let pairs: Vec<_> = pairs.into_iter().collect();
        for chunk in pairs.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT OR IGNORE INTO contact (a, b) VALUES {}",
                marks(chunk.len(), 2)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (a, b) in chunk {
                q = q.bind(*a).bind(*b);
            }
            q.execute(&mut *tx).await?;
            *statements += 1;
        }
        Ok(ids)
    }

    /// Chains `rows`, just stored with `ids` and not yet committed, on from each recipient's
    /// last envelope ([`WriteGroup::last_stored`], which it moves on): what each recipient got,
    /// for [`GatewayDb::on_stored`]. Called with the writing connection held, so the commits
    /// that follow each other in the map follow each other in the database.
    fn chain_stored<'a>(
        &self,
        rows: &[&'a pb::Envelope],
        ids: &[i64],
        now: i64,
    ) -> Vec<Stored<'a>> {
        let mut last = self.lock_last_stored();
        let mut by_recipient: Vec<Stored<'a>> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (&e, &id) in rows.iter().zip(ids) {
            let i = *index.entry(e.to.as_str()).or_insert_with(|| {
                by_recipient.push(Stored {
                    recipient: &e.to,
                    after: last.get(e.to.as_str()).copied(),
                    rows: Vec::new(),
                    now,
                });
                by_recipient.len() - 1
            });
            by_recipient[i].rows.push((id, e));
        }
        if last.len() + by_recipient.len() > KNOWN_ACCOUNTS {
            // Bounded like the accounts known to exist: forgetting only costs the next envelope
            // of each a read.
            last.clear();
        }
        for s in &by_recipient {
            if let Some(&(id, _)) = s.rows.last() {
                match last.get_mut(s.recipient) {
                    Some(l) => *l = id,
                    None => {
                        last.insert(s.recipient.to_owned(), id);
                    }
                }
            }
        }
        by_recipient
    }

    /// Forgets where every queue ends: a write failed, and whether it was committed is not
    /// known for sure, so the next envelope of each account follows on from nothing known.
    fn forget_last_stored(&self) {
        self.lock_last_stored().clear();
    }

    fn lock_last_stored(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.writes
            .last_stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Stores one envelope that needs no idempotency (a receipt), with the other writes that
    /// wait for it (the group commit, [`WriteGroup`]); `false` when the recipient's queue is
    /// full and nothing was stored.
    pub async fn store_envelope(
        &self,
        envelope: &pb::Envelope,
        queue_max: u32,
    ) -> Result<bool, sqlx::Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue_write(PendingWrite::Envelope {
            envelope: Box::new(envelope.clone()),
            queue_max,
            reply,
        });
        abandoned_as_error(answer).await
    }

    /// Delivery reads ([`GatewayDb::envelopes_after`]) so far.
    pub fn delivery_reads(&self) -> u64 {
        self.readers
            .reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Envelopes for `account` with id in (`after`, `upto`], oldest first.
    pub async fn envelopes_after(
        &self,
        account: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<pb::Envelope>, sqlx::Error> {
        self.readers
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rows = sqlx::query(
            "SELECT id, sender, recipient, timestamp, server_timestamp, kind, ciphertext, message_id, grp, extra \
             FROM envelope WHERE recipient = ? AND id > ? AND id <= ? AND server_timestamp >= ? ORDER BY id LIMIT ?",
        )
        .bind(account)
        .bind(after)
        .bind(upto)
        .bind(self.envelope_cutoff())
        .bind(limit)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(stored_envelope(StoredRow {
                    id: r.try_get("id")?,
                    from: r.try_get("sender")?,
                    to: r.try_get("recipient")?,
                    timestamp: r.try_get("timestamp")?,
                    server_timestamp: r.try_get("server_timestamp")?,
                    kind: r.try_get("kind")?,
                    ciphertext: r.try_get("ciphertext")?,
                    message_id: r.try_get("message_id")?,
                    group: r.try_get("grp")?,
                    extra: r.try_get("extra")?,
                }))
            })
            .collect()
    }

    pub async fn contacts(&self, account: &str) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT b FROM contact WHERE a = ?")
            .bind(account)
            .fetch_all(&mut *self.reader().await?)
            .await
    }

    pub async fn set_profile(
        &self,
        account: &str,
        name: &str,
        avatar: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE account SET name = ?, avatar_blob = ? WHERE account = ?")
            .bind(name)
            .bind(avatar)
            .bind(account)
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    pub async fn profile(&self, account: &str) -> Result<Option<pb::Profile>, sqlx::Error> {
        let row = sqlx::query("SELECT name, avatar_blob FROM account WHERE account = ?")
            .bind(account)
            .fetch_optional(&mut *self.reader().await?)
            .await?;
        row.map(|r| {
            Ok(pb::Profile {
                account: account.to_owned(),
                name: r.try_get("name")?,
                avatar_blob: r.try_get("avatar_blob")?,
            })
        })
        .transpose()
    }

    /// A group and its members, read in one statement (so from one snapshot of the database:
    /// two statements on a reader could see a group from before an update and its members
    /// from after it).
    pub async fn group(&self, id: &str) -> Result<Option<pb::Group>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT g.name, g.avatar_blob, g.revision, g.changed_by, m.account FROM grp g \
             LEFT JOIN grp_member m ON m.grp = g.id WHERE g.id = ? ORDER BY m.account",
        )
        .bind(id)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let mut members = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(member) = row.try_get::<Option<String>, _>("account")? {
                members.push(member);
            }
        }
        Ok(Some(pb::Group {
            id: id.to_owned(),
            name: r.try_get("name")?,
            avatar_blob: r.try_get("avatar_blob")?,
            members,
            changed_by: r.try_get("changed_by")?,
            revision: r.try_get::<i64, _>("revision")? as u64,
        }))
    }

    /// Writes a group (create or update) and the update envelopes in one transaction; members
    /// whose queue is full get no update envelope.
    pub async fn save_group(
        &self,
        g: &pb::Group,
        envelopes: &[pb::Envelope],
        queue_max: u32,
    ) -> Result<(), sqlx::Error> {
        let mut conn = self.conn().await?;
        let mut tx = Self::write_tx(&mut conn).await?;
        sqlx::query(
            "INSERT INTO grp (id, name, avatar_blob, revision, created_at, changed_by) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, avatar_blob = excluded.avatar_blob, \
             revision = excluded.revision, changed_by = excluded.changed_by",
        )
        .bind(&g.id)
        .bind(&g.name)
        .bind(&g.avatar_blob)
        .bind(g.revision as i64)
        .bind(now_ms())
        .bind(&g.changed_by)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM grp_member WHERE grp = ?")
            .bind(&g.id)
            .execute(&mut *tx)
            .await?;
        for chunk in g.members.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO grp_member (grp, account) VALUES {}",
                marks(chunk.len(), 2)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for m in chunk {
                q = q.bind(&g.id).bind(m);
            }
            q.execute(&mut *tx).await?;
        }
        // The batch writer's queue-room rule, as a fan-out: full queues are skipped.
        let statements = &mut 0;
        let mut sizes =
            Self::queue_sizes(&mut tx, envelopes.iter().map(|e| e.to.as_str()), statements).await?;
        let kept = take_room(&mut sizes, envelopes, queue_max, true).unwrap_or_default();
        let now = now_ms();
        let ids = Self::insert_envelopes(&mut tx, &kept, now, statements).await?;
        // Not handed over (its caller wakes the members to read), but the queues moved on.
        self.chain_stored(&kept, &ids, now);
        tx.commit().await.inspect_err(|_| self.forget_last_stored())
    }

    pub async fn save_blob(&self, id: &str, size: u64, sha256: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO blob (id, size, sha256, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(size as i64)
            .bind(sha256)
            .bind(now_ms())
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    pub async fn blob_size(&self, id: &str) -> Result<Option<u64>, sqlx::Error> {
        let s: Option<i64> =
            sqlx::query_scalar("SELECT size FROM blob WHERE id = ? AND created_at >= ?")
                .bind(id)
                .bind(self.blob_cutoff())
                .fetch_optional(&mut *self.reader().await?)
                .await?;
        Ok(s.map(|s| s as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(from: &str, to: &str, id: &str) -> pb::Envelope {
        pb::Envelope {
            from: from.into(),
            to: to.into(),
            kind: pb::Kind::Message as i32,
            ciphertext: id.as_bytes().to_vec(),
            message_id: id.into(),
            ..Default::default()
        }
    }

    async fn db() -> (GatewayDb, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let uri = format!("sqlite://{}", dir.path().join("gw.db").display());
        (GatewayDb::open(&uri).await.expect("open"), dir)
    }

    /// Migration 0003 over a gateway that already holds queues: the queue sizes it adds count
    /// the envelopes already stored, so the queue limit holds for them from the first `Send`.
    #[tokio::test]
    async fn an_upgraded_gateway_counts_the_queues_it_already_holds() {
        let (db, _dir) = db().await;
        // The database as it was before 0003: no sizes, no triggers.
        sqlx::raw_sql(
            "DROP TRIGGER queue_size_insert; DROP TRIGGER queue_size_delete; \
             DROP TRIGGER queue_size_update; DROP TABLE queue_size;",
        )
        .execute(&mut *db.conn().await.expect("conn"))
        .await
        .expect("back to 0002");
        let (a, b, c) = ("+15550000001", "+15550000002", "+15550000003");
        for (to, n) in [(b, 3), (c, 5)] {
            for i in 0..n {
                GatewayDb::insert_envelopes(
                    &mut db.conn().await.expect("conn"),
                    &[&envelope(a, to, &format!("{to}-{i}"))],
                    now_ms(),
                    &mut 0,
                )
                .await
                .expect("insert");
            }
        }
        sqlx::raw_sql(include_str!("../migrations/0003_queue_size.sql"))
            .execute(&mut *db.conn().await.expect("conn"))
            .await
            .expect("0003");
        let sizes: Vec<(String, i64)> =
            sqlx::query_as("SELECT recipient, n FROM queue_size ORDER BY recipient")
                .fetch_all(&mut *db.conn().await.expect("conn"))
                .await
                .expect("sizes");
        assert_eq!(sizes, [(b.to_owned(), 3), (c.to_owned(), 5)]);
        // C's queue is full at 5: a send to it is refused, one to B is stored.
        let out = db
            .store_send(a, "x1", vec![envelope(a, c, "x1")], 5, false)
            .await
            .expect("store");
        assert!(matches!(out, SendOutcome::QueueFull), "{out:?}");
        let out = db
            .store_send(a, "x2", vec![envelope(a, b, "x2")], 5, false)
            .await
            .expect("store");
        assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
    }

    /// Sends one envelope from `sender` to each of `accounts` (its message id the account's
    /// number), one after the other; their ids.
    async fn one_envelope_each(
        db: &GatewayDb,
        sender: &str,
        accounts: &[String],
        queue_max: u32,
    ) -> Vec<u64> {
        let mut ids = Vec::new();
        for to in accounts {
            let out = db
                .store_send(sender, to, vec![envelope(sender, to, to)], queue_max, false)
                .await
                .expect("store");
            assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
            ids.push(db.envelopes_after(to, 0, i64::MAX, 10).await.expect("read")[0].id);
        }
        ids
    }

    /// `Ack`s of many accounts that come while a write is under way are written together, with
    /// the `Send`s beside them, in one transaction, by one task; each envelope acked is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_of_many_accounts_are_written_in_one_transaction() {
        let (db, _dir) = db().await;
        let sender = "+15550000001";
        let accounts: Vec<String> = (0..20).map(|i| format!("+155510000{i:02}")).collect();
        let ids = one_envelope_each(&db, sender, &accounts, 100).await;
        let writer = db.writes.writer.lock().await;
        let tasks = db.writes.tasks.load(std::sync::atomic::Ordering::Relaxed);
        let acks: Vec<_> = accounts
            .iter()
            .zip(&ids)
            .map(|(account, id)| {
                let (db, account, id) = (db.clone(), account.clone(), *id);
                tokio::spawn(async move { db.ack(&account, &[id]).await })
            })
            .collect();
        let send = db.store_send(
            sender,
            "late",
            vec![envelope(sender, &accounts[0], "late")],
            100,
            false,
        );
        while db.lock_waiting().writes.len() < accounts.len() + 1 {
            tokio::task::yield_now().await;
        }
        let before = db.writes.batches.load(std::sync::atomic::Ordering::Relaxed);
        drop(writer);
        for ack in acks {
            ack.await.expect("task").expect("acked");
        }
        let out = send.await.expect("stored");
        assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        let after = db.writes.batches.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after - before, 1, "transactions for 20 acks and a send");
        let tasks = db.writes.tasks.load(std::sync::atomic::Ordering::Relaxed) - tasks;
        assert_eq!(tasks, 1, "writing tasks started for 21 writes");
        let left: Vec<String> = sqlx::query_scalar("SELECT message_id FROM envelope")
            .fetch_all(&mut *db.conn().await.expect("conn"))
            .await
            .expect("left");
        assert_eq!(left, ["late"]);
    }

    /// A batch is written with a few multi-row statements, however many `Send`s, `Ack`s and
    /// receipts it holds and however many accounts they are for: with an account per chat, each
    /// message and each acknowledgement was statements of its own, on the one writer
    /// connection, which then bounded the gateway at about 1,100 messages/s with 1,000 chats.
    /// The batch's outcomes are each write's own, in the order they came: a repeat within the
    /// batch is answered as the first, a queue fills up within it, and an account's `Ack`
    /// deletes only its own envelopes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_many_accounts_writes_is_a_few_statements() {
        use std::sync::atomic::Ordering::Relaxed;
        let (db, _dir) = db().await;
        let sender = "+15550000001";
        let accounts: Vec<String> = (0..200).map(|i| format!("+15551000{i:03}")).collect();
        let ids = one_envelope_each(&db, sender, &accounts, 3).await;
        let writer = db.writes.writer.lock().await;
        let mut writes = Vec::new();
        // Each account but account 1 acks its envelope; account 0 also tries account 1's,
        // which stays.
        for (i, (account, id)) in accounts.iter().zip(&ids).enumerate() {
            if i == 1 {
                continue;
            }
            let (db, account, mut acked) = (db.clone(), account.clone(), vec![*id]);
            if i == 0 {
                acked.push(ids[1]);
            }
            writes.push(tokio::spawn(async move {
                db.ack(&account, &acked).await.map(|()| None)
            }));
        }
        // A new message to each account, each sent twice; then three more to account 2, whose
        // queue (of 3) has room for two of them once its ack is written.
        for _round in 0..2 {
            for to in &accounts {
                let id = format!("n-{to}");
                let e = envelope(sender, to, &id);
                let sent = db.store_send(sender, &id, vec![e], 3, false);
                writes.push(tokio::spawn(async move { sent.await.map(Some) }));
            }
        }
        for i in 0..3 {
            let id = format!("more-{i}");
            let e = envelope(sender, &accounts[2], &id);
            let sent = db.store_send(sender, &id, vec![e], 3, false);
            writes.push(tokio::spawn(async move { sent.await.map(Some) }));
        }
        let receipt = pb::Envelope {
            kind: pb::Kind::Receipt as i32,
            ..envelope(&accounts[3], sender, "")
        };
        let receipted = {
            let db = db.clone();
            tokio::spawn(async move { db.store_envelope(&receipt, 3).await })
        };
        // The receipt joins the batch too (it waits for the same writer).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while db.lock_waiting().writes.len() < writes.len() + 1
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let (batches, statements) = (
            db.writes.batches.load(Relaxed),
            db.writes.statements.load(Relaxed),
        );
        drop(writer);
        let mut outcomes = Vec::new();
        for w in writes {
            outcomes.push(w.await.expect("task").expect("written"));
        }
        assert!(receipted.await.expect("task").expect("written"));
        assert_eq!(
            db.writes.batches.load(Relaxed) - batches,
            1,
            "one transaction"
        );
        let took = db.writes.statements.load(Relaxed) - statements;
        assert!(
            took <= 12,
            "{took} statements for 199 acks, 403 sends and a receipt"
        );

        let (acks, rest) = outcomes.split_at(199);
        assert!(acks.iter().all(Option::is_none));
        let (firsts, rest) = rest.split_at(200);
        let (repeats, more) = rest.split_at(200);
        for (first, repeat) in firsts.iter().zip(repeats) {
            let Some(SendOutcome::Stored(ts, 1)) = first else {
                panic!("{first:?}");
            };
            assert_eq!(repeat, &Some(SendOutcome::Repeat(*ts, 1)));
        }
        assert!(matches!(more[0], Some(SendOutcome::Stored(_, 1))));
        assert!(matches!(more[1], Some(SendOutcome::Stored(_, 1))));
        assert_eq!(more[2], Some(SendOutcome::QueueFull));
        let queue = |to: String| {
            let db = db.clone();
            async move {
                let q = db
                    .envelopes_after(&to, 0, i64::MAX, 10)
                    .await
                    .expect("read");
                q.into_iter().map(|e| e.message_id).collect::<Vec<_>>()
            }
        };
        assert_eq!(
            queue(accounts[0].clone()).await,
            [format!("n-{}", accounts[0])]
        );
        assert_eq!(
            queue(accounts[1].clone()).await,
            [accounts[1].clone(), format!("n-{}", accounts[1])],
            "account 0 acked account 1's envelope"
        );
        assert_eq!(
            queue(accounts[2].clone()).await,
            [
                format!("n-{}", accounts[2]),
                "more-0".into(),
                "more-1".into()
            ]
        );
        let receipts = db
            .envelopes_after(sender, 0, i64::MAX, 10)
            .await
            .expect("read");
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].from, accounts[3]);
    }

    /// Commits do not copy the write-ahead log back into the database file (that sync to disk
    /// would hold up every statement behind them); the gateway's checkpoint task does, beside
    /// them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_is_checkpointed_beside_the_commits_not_by_them() {
        let (db, dir) = db().await;
        let main_file = dir.path().join("gw.db");
        let size = || std::fs::metadata(&main_file).map(|m| m.len()).unwrap_or(0);
        let before = size();
        // About 6 MiB of envelopes: 1,500 pages of log, past SQLite's own threshold of 1,000.
        let (a, b) = ("+15550000001", "+15550000002");
        for batch in 0..30 {
            let envelopes = (0..50)
                .map(|i| pb::Envelope {
                    ciphertext: vec![batch as u8; 4096],
                    ..envelope(a, b, &format!("{batch}-{i}"))
                })
                .collect();
            db.store_send(a, &format!("m{batch}"), envelopes, 10_000, true)
                .await
                .expect("store");
        }
        assert!(
            size() < before + 1024 * 1024,
            "a commit checkpointed the log: the file grew from {before} to {} bytes",
            size()
        );
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let db = db.clone();
            async move {
                db.checkpoint_log(std::time::Duration::from_millis(20), shutdown)
                    .await
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while size() < before + 6 * 1024 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "the log was not checkpointed: the file has {} bytes",
                size()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The pages copied are synced by the task, not left for a commit's checkpoint to sync.
        while db.log_syncs.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file was not synced after the checkpoint"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.send(true).expect("stop");
        task.await.expect("the checkpoint task ends on shutdown");
    }

    /// A write that another connection's lock holds up waits for it (under the busy timeout)
    /// instead of failing: `store_envelope` reads the queue's length before it writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waits_for_another_connections_lock() {
        use sqlx::Connection;
        let (db, dir) = db().await;
        let uri = format!("sqlite://{}", dir.path().join("gw.db").display());
        let mut other = sqlx::SqliteConnection::connect(&uri)
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("lock");
        let write = tokio::spawn({
            let db = db.clone();
            async move {
                db.store_envelope(&envelope("+15550000001", "+15550000002", "r1"), 10)
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!write.is_finished(), "the write did not wait for the lock");
        sqlx::query("COMMIT")
            .execute(&mut other)
            .await
            .expect("unlock");
        let stored = write
            .await
            .expect("task")
            .expect("the write waited and went on");
        assert!(stored);
    }

    /// After a commit that fails for want of room, the next writes go on once there is room.
    #[tokio::test]
    async fn writes_go_on_after_a_full_disk() {
        let (db, _dir) = db().await;
        let big = |i: usize| pb::Envelope {
            ciphertext: vec![i as u8; 64 * 1024],
            ..envelope("+15550000001", "+15550000002", &format!("m{i}"))
        };
        // The pool has one connection, so the page limit applies to every later statement.
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut *db.conn().await.expect("conn"))
            .await
            .expect("page count");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {}",
            pages + 40
        )))
        .execute(&mut *db.conn().await.expect("conn"))
        .await
        .expect("limit");
        let mut refused = false;
        for i in 0..20 {
            if db.store_envelope(&big(i), 1000).await.is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the page limit never refused a write");
        sqlx::query("PRAGMA max_page_count = 1000000")
            .execute(&mut *db.conn().await.expect("conn"))
            .await
            .expect("room again");
        for i in 100..105 {
            assert!(
                db.store_envelope(&big(i), 1000)
                    .await
                    .expect("a write after the full disk")
            );
        }
        db.ack("+15550000002", &[1, 2, 3]).await.expect("ack");
    }

    /// What the group commit hands over ([`GatewayDb::on_stored`]).
    type Handed = Arc<std::sync::Mutex<Vec<(String, Option<i64>, Vec<pb::Envelope>)>>>;

    fn record_handed(db: &GatewayDb) -> Handed {
        let handed = Handed::default();
        let h = handed.clone();
        db.on_stored(move |stored| {
            let mut h = h.lock().expect("lock");
            for s in stored {
                h.push((s.recipient.to_owned(), s.after, s.envelopes()));
            }
        });
        handed
    }

    /// The envelopes a committed batch hands over are, field for field, those a delivery read
    /// gives for the same ids, whatever their kind (a message that carries a receipt too, a
    /// receipt, a fan-out across batches); and each recipient's batches follow on from one
    /// another, through group updates stored apart.
    #[tokio::test]
    async fn handed_envelopes_are_those_a_read_gives_and_follow_on() {
        let (db, _dir) = db().await;
        let handed = record_handed(&db);
        let (a, b, c) = ("+15550000001", "+15550000002", "+15550000003");
        let receipt = pb::Envelope {
            kind: pb::Kind::Receipt as i32,
            receipt: Some(pb::Receipt {
                message_ids: vec!["m0".into()],
                ..Default::default()
            }),
            ..envelope(b, a, "")
        };
        let odd = pb::Envelope {
            timestamp: 1234,
            group: "g".into(),
            receipt: receipt.receipt.clone(),
            ..envelope(a, b, "odd")
        };
        let group = pb::Group {
            id: "g1".into(),
            name: "n".into(),
            members: vec![a.into(), b.into(), c.into()],
            revision: 1,
            ..Default::default()
        };
        let update = |to: &str| pb::Envelope {
            kind: pb::Kind::GroupUpdate as i32,
            group_update: Some(group.clone()),
            ..envelope(a, to, "")
        };
        for round in 0..3 {
            // One batch of many writes: held back behind the writer until all are in line.
            let writer = db.writes.writer.lock().await;
            let mut sends = Vec::new();
            for i in 0..5 {
                let id = format!("m{round}.{i}");
                let to = vec![envelope(a, b, &id), envelope(a, c, &id)];
                sends.push(db.store_send(a, &id, to, 1000, true));
            }
            let odd_id = format!("odd{round}");
            sends.push(db.store_send(a, &odd_id, vec![odd.clone()], 1000, false));
            drop(writer);
            for s in sends {
                s.await.expect("send");
            }
            assert!(db.store_envelope(&receipt, 1000).await.expect("receipt"));
            db.save_group(&group, &[update(a), update(b), update(c)], 1000)
                .await
                .expect("group");
        }
        let handed = handed.lock().expect("lock").clone();
        for account in [a, b, c] {
            let read = db
                .envelopes_after(account, 0, i64::MAX, 1000)
                .await
                .expect("read");
            let read: HashMap<u64, &pb::Envelope> = read.iter().map(|e| (e.id, e)).collect();
            let mine: Vec<_> = handed.iter().filter(|(to, ..)| to == account).collect();
            assert!(!mine.is_empty(), "nothing handed to {account}");
            for (_, after, envelopes) in &mine {
                let first = envelopes.first().expect("a batch of none").id;
                // What came before these in the queue: the read's envelope just below them.
                let before = read
                    .keys()
                    .filter(|&&id| id < first)
                    .max()
                    .map(|&id| id as i64);
                assert!(
                    after.is_none() || *after == before,
                    "{account}: handed after {after:?}, but the queue had {before:?} before {first}"
                );
                for e in envelopes {
                    assert_eq!(
                        Some(e),
                        read.get(&e.id).copied(),
                        "{account}: envelope {}",
                        e.id
                    );
                }
            }
            // Only the first batch since start follows on from nothing known.
            assert!(mine[1..].iter().all(|(_, after, _)| after.is_some()));
        }
    }

    /// A failed write leaves where each queue ends unknown, so the next batch follows on from
    /// nothing (its recipient's delivery reads).
    #[tokio::test]
    async fn after_a_failed_write_batches_follow_on_from_nothing_known() {
        let (db, _dir) = db().await;
        let handed = record_handed(&db);
        let (a, b) = ("+15550000001", "+15550000002");
        for i in 0..2 {
            assert!(
                db.store_envelope(&envelope(a, b, &format!("m{i}")), 1000)
                    .await
                    .expect("store")
            );
        }
        sqlx::query("CREATE TRIGGER refuse BEFORE INSERT ON envelope BEGIN SELECT RAISE(ABORT, 'refused'); END")
            .execute(&mut *db.conn().await.expect("conn"))
            .await
            .expect("trigger");
        assert!(
            db.store_envelope(&envelope(a, b, "m2"), 1000)
                .await
                .is_err()
        );
        sqlx::query("DROP TRIGGER refuse")
            .execute(&mut *db.conn().await.expect("conn"))
            .await
            .expect("drop");
        assert!(
            db.store_envelope(&envelope(a, b, "m3"), 1000)
                .await
                .expect("store")
        );
        let afters: Vec<Option<i64>> = handed.lock().expect("lock").iter().map(|h| h.1).collect();
        assert_eq!(afters, [None, Some(1), None]);
    }

    /// What a login, a key count, a bundle's identity, a profile, a group or a blob's size
    /// reads needs only what was committed before it: it goes to a reader connection, past a
    /// writer that is busy with a group commit (or a checkpoint, or a full disk's retries), and
    /// it reads what the writer committed.
    #[tokio::test]
    async fn reads_go_past_a_busy_writer() {
        let (db, _dir) = db().await;
        let (a, b) = ("+15550000001", "+15550000002");
        for account in [a, b] {
            db.set_secret(account, &[7; 32]).await.expect("account");
        }
        let key = |id| pb::SignedKey {
            id,
            public_key: vec![5; 33],
            signature: vec![6; 64],
        };
        let up = pb::UploadKeys {
            identity_key: vec![5; 33],
            registration_id: 42,
            signed_prekey: Some(key(1)),
            kyber_last_resort: Some(key(2)),
            one_time_prekeys: (10..13)
                .map(|id| pb::PreKey {
                    id,
                    public_key: vec![5; 33],
                })
                .collect(),
            kyber_prekeys: vec![key(20)],
        };
        db.upload_keys(a, &up).await.expect("keys");
        db.set_profile(a, "Ann", "").await.expect("profile");
        for i in 0..2 {
            assert!(
                db.store_envelope(&envelope(b, a, &format!("m{i}")), 1000)
                    .await
                    .expect("store")
            );
        }
        let group = pb::Group {
            id: "g1".into(),
            name: "n".into(),
            members: vec![a.into(), b.into()],
            revision: 3,
            changed_by: a.into(),
            ..Default::default()
        };
        db.save_group(&group, &[], 1000).await.expect("group");
        db.save_blob("blob1", 9, &[1; 32]).await.expect("blob");

        let writer = db.conn().await.expect("writer");
        let reads = async {
            assert_eq!(
                db.account_secret_hash(a).await.expect("hash"),
                Some(vec![7; 32])
            );
            assert_eq!(
                db.account_secret_hash("+15550000009").await.expect("hash"),
                None
            );
            assert_eq!(
                db.login_counts(a).await.expect("counts"),
                LoginCounts {
                    queued: 2,
                    upto: 2,
                    one_time_prekeys: 3,
                    kyber_prekeys: 1
                }
            );
            assert_eq!(db.key_counts(a).await.expect("counts"), (3, 1));
            assert_eq!(
                db.identity(a).await.expect("identity"),
                Some((vec![5; 33], 42))
            );
            let (one_time, kyber) = db.one_time_key_ids(a).await.expect("ids");
            assert_eq!(
                (
                    one_time.into_iter().collect::<Vec<_>>(),
                    kyber.into_iter().collect::<Vec<_>>()
                ),
                (vec![10, 11, 12], vec![20])
            );
            assert_eq!(db.has_base_keys(a).await.expect("base"), (true, true));
            assert_eq!(db.contacts(a).await.expect("contacts"), [b]);
            assert_eq!(
                db.profile(a).await.expect("profile").expect("some").name,
                "Ann"
            );
            assert_eq!(db.group("g1").await.expect("group"), Some(group.clone()));
            assert_eq!(db.group("g2").await.expect("group"), None);
            assert_eq!(db.blob_size("blob1").await.expect("blob"), Some(9));
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), reads)
            .await
            .expect("the reads waited for the writer");
        drop(writer);
    }

    /// Sends that come together are written together: each is stored once, a repeat (in the
    /// same batch or a later one) is answered as the first, and a full queue refuses only the
    /// sends that do not fit.
    #[tokio::test]
    async fn sends_written_together_each_count_once() {
        let (db, _dir) = db().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let db = db.clone();
            // Every message id twice, from 4 senders to one recipient each.
            let (from, id) = (format!("+1555000000{}", i / 2 % 4), format!("m{}", i / 2));
            tasks.spawn(async move {
                let e = envelope(&from, "+15550009999", &id);
                let out = db.store_send(&from, &id, vec![e], 1000, false).await;
                (from, id, out.expect("store"))
            });
        }
        let mut outcomes = std::collections::HashMap::<(String, String), Vec<SendOutcome>>::new();
        while let Some(r) = tasks.join_next().await {
            let (from, id, out) = r.expect("task");
            outcomes.entry((from, id)).or_default().push(out);
        }
        let mut stored = 0;
        for outs in outcomes.values() {
            let firsts: Vec<_> = outs
                .iter()
                .filter_map(|o| match o {
                    SendOutcome::Stored(ts, 1) => Some(*ts),
                    _ => None,
                })
                .collect();
            stored += firsts.len();
            for o in outs {
                match o {
                    SendOutcome::Stored(..) => {}
                    SendOutcome::Repeat(ts, 1) => assert_eq!(Some(ts), firsts.first()),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        let queued = db
            .envelopes_after("+15550009999", 0, i64::MAX, 1000)
            .await
            .expect("read");
        // 200 sends, 100 distinct: each stored once and repeated once.
        assert_eq!((outcomes.len(), stored, queued.len()), (100, 100, 100));
        assert!(outcomes.values().all(|o| o.len() == 2));

        // A queue with room for 3: of 10 sends at once, 3 are stored, and a fan-out to it and
        // to an empty queue stores only the latter's.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10 {
            let db = db.clone();
            tasks.spawn(async move {
                let id = format!("f{i}");
                let e = envelope("+15550000001", "+15550008888", &id);
                db.store_send("+15550000001", &id, vec![e], 3, false)
                    .await
                    .expect("store")
            });
        }
        let mut full = 0;
        while let Some(r) = tasks.join_next().await {
            if r.expect("task") == SendOutcome::QueueFull {
                full += 1;
            }
        }
        assert_eq!(full, 7);
        let fan = [
            envelope("+15550000001", "+15550008888", "g"),
            envelope("+15550000001", "+15550007777", "g"),
        ];
        let out = db
            .store_send("+15550000001", "g", fan.to_vec(), 3, true)
            .await
            .expect("store");
        assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        db.ack(
            "+15550009999",
            &queued.iter().map(|e| e.id).collect::<Vec<_>>(),
        )
        .await
        .expect("ack");
        assert!(
            db.envelopes_after("+15550009999", 0, i64::MAX, 1000)
                .await
                .expect("read")
                .is_empty()
        );
    }

    /// The queue limit reads the queue's length from `queue_size`, which the envelope table's
    /// triggers keep equal to the queue, whatever wrote it: sends, receipts, acks, expiry, and a
    /// transaction that failed midway. (It was a `COUNT(*)` over the queue per `Send`, work in
    /// proportion to a queue that any sender could fill.)
    #[tokio::test]
    async fn queue_sizes_follow_every_write_and_bound_the_queue() {
        let (db, _dir) = db().await;
        let sizes = || async {
            let kept: Vec<(String, i64)> = sqlx::query_as(
                "SELECT recipient, n FROM queue_size WHERE n <> 0 ORDER BY recipient",
            )
            .fetch_all(&mut *db.conn().await.expect("conn"))
            .await
            .expect("sizes");
            let counted: Vec<(String, i64)> = sqlx::query_as(
                "SELECT recipient, COUNT(*) FROM envelope GROUP BY recipient ORDER BY recipient",
            )
            .fetch_all(&mut *db.conn().await.expect("conn"))
            .await
            .expect("count");
            assert_eq!(kept, counted, "queue_size differs from the queues");
            kept
        };
        let (a, b, c) = ("+15550000001", "+15550000002", "+15550000003");
        for i in 0..5 {
            let id = format!("m{i}");
            let out = db
                .store_send(a, &id, vec![envelope(a, b, &id)], 5, false)
                .await
                .expect("store");
            assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        }
        // Full at 5: a sixth is refused, a fan-out skips the full queue only.
        let out = db
            .store_send(a, "m5", vec![envelope(a, b, "m5")], 5, false)
            .await
            .expect("store");
        assert_eq!(out, SendOutcome::QueueFull);
        let fan = vec![envelope(a, b, "g"), envelope(a, c, "g")];
        let out = db.store_send(a, "g", fan, 5, true).await.expect("store");
        assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        // A group update, under the same rule: the full queue gets none.
        let group = pb::Group {
            id: "grp".into(),
            members: vec![a.into(), b.into(), c.into()],
            changed_by: a.into(),
            revision: 1,
            ..Default::default()
        };
        let updates: Vec<pb::Envelope> = [b, c]
            .map(|to| pb::Envelope {
                kind: pb::Kind::GroupUpdate as i32,
                group: group.id.clone(),
                group_update: Some(group.clone()),
                ..envelope(a, to, "")
            })
            .into();
        db.save_group(&group, &updates, 5).await.expect("group");
        let saved = db.group("grp").await.expect("read").expect("saved");
        assert_eq!(saved.members.len(), 3);
        let receipt = pb::Envelope {
            kind: pb::Kind::Receipt as i32,
            ..envelope(b, a, "r")
        };
        assert!(db.store_envelope(&receipt, 5).await.expect("receipt"));
        assert_eq!(
            sizes().await,
            [(a.to_owned(), 1), (b.to_owned(), 5), (c.to_owned(), 2)]
        );
        // Acks free room, also acks of ids that are not there.
        let queued = db.envelopes_after(b, 0, i64::MAX, 100).await.expect("read");
        let mut ids: Vec<u64> = queued.iter().take(2).map(|e| e.id).collect();
        ids.push(9_999_999);
        db.ack(b, &ids).await.expect("ack");
        db.ack(c, &[queued[2].id])
            .await
            .expect("ack of another's envelope");
        assert_eq!(sizes().await[1], (b.to_owned(), 3));
        let out = db
            .store_send(a, "m6", vec![envelope(a, b, "m6")], 5, false)
            .await
            .expect("store");
        assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        // A transaction that fails after inserting leaves the sizes as they were.
        let mut conn = db.conn().await.expect("conn");
        let mut tx = conn.begin().await.expect("begin");
        GatewayDb::insert_envelopes(&mut tx, &[&envelope(a, c, "x")], now_ms(), &mut 0)
            .await
            .expect("insert");
        drop(tx);
        drop(conn);
        // Expiry empties the queues.
        db.expire(i64::MAX, 0, 0).await.expect("expire");
        assert!(sizes().await.is_empty());
        let out = db
            .store_send(a, "m7", vec![envelope(a, b, "m7")], 1, false)
            .await
            .expect("store");
        assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        assert_eq!(sizes().await, [(b.to_owned(), 1)]);
    }

    /// A writing task dropped midway (its runtime shut down while it waited for the writer)
    /// leaves the group commit free: its caller hears that the write was abandoned, and a
    /// later write starts a task again and is written.
    #[test]
    fn a_writer_dropped_midway_leaves_the_group_commit_free() {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime")
        };
        let (a, b) = ("+15550000001", "+15550009999");
        let first = runtime();
        let (db, _dir) = first.block_on(db());
        let held = first.block_on(db.writes.writer.lock());
        let abandoned = {
            let _in = first.enter();
            tokio::spawn(db.store_send(a, "m1", vec![envelope(a, b, "m1")], 100, false))
        };
        // The writing task started and waits for the writer.
        first.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        });
        assert!(db.lock_waiting().writing);
        drop(first);
        assert!(!db.lock_waiting().writing, "the writer is free again");
        drop(held);
        let second = runtime();
        second.block_on(async {
            let out = abandoned.await;
            assert!(
                !matches!(out, Ok(Ok(SendOutcome::Stored(..)))),
                "the dropped write is not answered as stored: {out:?}"
            );
            let sent = db.store_send(a, "m2", vec![envelope(a, b, "m2")], 100, false);
            let out = tokio::time::timeout(std::time::Duration::from_secs(10), sent)
                .await
                .expect("a later write is written")
                .expect("stored");
            assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        });
    }

    /// A sender that goes away while its batch is written (its connection closed) does not
    /// take the other senders' sends of that batch with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_abandoned_midway_fails_no_other() {
        let (db, _dir) = db().await;
        let send = |id: String| {
            let db = db.clone();
            tokio::spawn(async move {
                let e = envelope("+15550000001", "+15550009999", &id);
                db.store_send("+15550000001", &id, vec![e], 100_000, false)
                    .await
            })
        };
        let waiting = |n: usize| {
            let db = db.clone();
            async move {
                while db.lock_waiting().writes.len() < n {
                    tokio::time::sleep(std::time::Duration::from_micros(50)).await;
                }
            }
        };
        for round in 0..30u64 {
            // Both sends wait behind a writer, so they go in one batch; the first's caller is
            // dropped while that batch is being written.
            let writer = db.writes.writer.lock().await;
            let first = send(format!("a{round}"));
            waiting(1).await;
            let second = send(format!("b{round}"));
            waiting(2).await;
            drop(writer);
            tokio::time::sleep(std::time::Duration::from_micros(100 + 50 * (round % 10))).await;
            first.abort();
            let out = second
                .await
                .expect("task")
                .expect("the send that stayed is stored");
            assert!(matches!(out, SendOutcome::Stored(_, 1)), "{out:?}");
        }
    }
}
