//! The reference interop gateway (binary `interop-gateway`): accounts with verification codes, the
//! key directory, store-and-forward envelopes with acks, receipts, typing, presence, profiles,
//! groups and media blobs, exactly as docs/interop-protocol.md describes.
//!
//! It shares only the wire definitions (the `mib-wire` crate) with the bridge's client, and keeps
//! its own storage (SQLite, `migrations/` of this crate): it must never depend on a crate of the
//! bridge, on Matrix or on HTTP (checked by `tests/architecture.rs`), so that it stays a second,
//! independent implementation of the protocol document.
//!
//! Every connection is one task reading requests in order and one writer task; delivery to a
//! logged-in account is pulled from the database in envelope order, so nothing is lost or reordered
//! across reconnects. A malformed or hostile frame closes that connection only.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc, watch},
};
use zeroize::Zeroizing;

use mib_wire::{
    self as wire,
    noise::{self, StaticKey, TransportError},
    pb::{self, ErrorCode, stanza::Body},
};

mod blobs;
mod db;
mod handlers;

pub use db::GatewayDb;

/// A request whose handling takes this long is logged as slow (its kind and the time, nothing of
/// its contents): clients give up on an answer after 60 s.
const SLOW_REQUEST: Duration = Duration::from_secs(5);

/// Logs a request that took [`SLOW_REQUEST`] or more (its kind and the time only).
fn note_if_slow(kind: &'static str, started: Instant, conn: u64) {
    let took = started.elapsed();
    if took >= SLOW_REQUEST {
        tracing::warn!(request = kind, ?took, conn, "slow request");
    }
}

/// How verification codes reach the owner of an account (docs §6.1).
#[derive(Clone)]
pub enum CodeDelivery {
    /// Development: every code is this fixed code; nothing is sent.
    DevFixed(String),
    /// Development: random codes are written to the log.
    DevLog,
    /// Production: each (account, code) is handed to this channel, whose receiver sends it out of
    /// band (the binary runs a command with it). Codes never reach the log.
    Channel(mpsc::Sender<(String, Zeroizing<String>)>),
}

impl CodeDelivery {
    /// Development modes put codes where anyone with log access (or the source) can read them.
    pub fn is_dev(&self) -> bool {
        !matches!(self, CodeDelivery::Channel(_))
    }
}

impl std::fmt::Debug for CodeDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CodeDelivery::DevFixed(_) => "DevFixed(<redacted>)",
            CodeDelivery::DevLog => "DevLog",
            CodeDelivery::Channel(_) => "Channel",
        })
    }
}

/// Abuse limits; docs/interop-protocol.md §19 "Limits" lists each with its default and error.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long a verification code is valid.
    pub code_ttl: Duration,
    /// Wrong verification codes an account may try before its verification is locked.
    pub verify_budget: u32,
    /// Window in which wrong tries are counted (it starts at the first wrong try).
    pub verify_window: Duration,
    /// First lock-out; every further lock-out of the same account doubles it.
    pub verify_lockout: Duration,
    /// Longest lock-out.
    pub verify_lockout_max: Duration,
    /// `Register` requests from connections that are not logged in, per source IP and
    /// `registration_window` (token bucket: this burst, refilled over the window).
    pub registrations_per_source: u32,
    pub registration_window: Duration,
    /// Envelopes waiting for one recipient.
    pub queue_max: u32,
    /// Unacked envelopes older than this are deleted.
    pub envelope_ttl: Duration,
    /// Blobs older than this are deleted.
    pub blob_ttl: Duration,
    /// Members of one group.
    pub group_max_members: u32,
    /// Envelope ids in one `Ack`.
    pub ack_max_ids: u32,
    /// The largest delivery window a login may ask for (`Login.window`, §7).
    pub max_window: u32,
    /// Message ids in one receipt.
    pub receipt_max_ids: u32,
    /// Stanzas waiting to be written to one connection.
    pub out_queue: usize,
    /// How long a full outgoing queue may stay full before the connection is closed.
    pub slow_reader_timeout: Duration,
    /// `FetchBundle` of one target account by one fetching account, per `bundle_window` (token
    /// bucket).
    pub bundle_fetches_per_target: u32,
    pub bundle_window: Duration,
    /// Time from TCP accept to the end of the Noise handshake.
    pub handshake_timeout: Duration,
    /// Noise handshakes worked on at once; further accepted connections wait their turn (within
    /// their `handshake_timeout`), so that after a restart the first clients are served in a
    /// few milliseconds rather than all of them together at the end.
    pub concurrent_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        Self {
            code_ttl: Duration::from_secs(10 * 60),
            verify_budget: 5,
            verify_window: HOUR,
            verify_lockout: Duration::from_secs(5 * 60),
            verify_lockout_max: DAY,
            registrations_per_source: 20,
            registration_window: HOUR,
            queue_max: 10_000,
            envelope_ttl: 30 * DAY,
            blob_ttl: 30 * DAY,
            group_max_members: 1024,
            ack_max_ids: 1000,
            max_window: 10_000,
            receipt_max_ids: 1000,
            out_queue: 256,
            slow_reader_timeout: Duration::from_secs(30),
            bundle_fetches_per_target: 100,
            bundle_window: HOUR,
            handshake_timeout: Duration::from_secs(10),
            concurrent_handshakes: 64,
        }
    }
}

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub key: StaticKey,
    pub database_uri: String,
    pub blob_dir: PathBuf,
    pub codes: CodeDelivery,
    pub max_blob_bytes: u64,
    pub rate_capacity: f64,
    pub rate_per_sec: f64,
    pub idle_timeout: Duration,
    pub limits: Limits,
}

impl GatewayConfig {
    /// Settings with the documented defaults, in development mode with codes written to the log.
    pub fn new(key: StaticKey, database_uri: String, blob_dir: PathBuf) -> Self {
        Self {
            key,
            database_uri,
            blob_dir,
            codes: CodeDelivery::DevLog,
            max_blob_bytes: 100 * 1024 * 1024,
            rate_capacity: 500.0,
            rate_per_sec: 100.0,
            idle_timeout: Duration::from_secs(120),
            limits: Limits::default(),
        }
    }

    /// Development modes must not be reachable from other hosts: refuses a non-loopback address.
    pub fn check_listen_addr(&self, addr: std::net::SocketAddr) -> Result<(), GatewayError> {
        if self.codes.is_dev() && !addr.ip().is_loopback() {
            return Err(GatewayError::DevModeNotLoopback(addr));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "development mode (fixed or logged verification codes) listens only on loopback, not on {0}"
    )]
    DevModeNotLoopback(std::net::SocketAddr),
}

/// An error answer to a request.
#[derive(Debug)]
pub(crate) struct Reject {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: u64,
}

pub(crate) fn reject(code: ErrorCode, message: impl Into<String>) -> Reject {
    Reject {
        code,
        message: message.into(),
        retry_after_ms: 0,
    }
}

impl From<sqlx::Error> for Reject {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        reject(ErrorCode::Internal, "internal error")
    }
}

impl From<std::io::Error> for Reject {
    fn from(e: std::io::Error) -> Self {
        tracing::error!(error = %e, "i/o error");
        reject(ErrorCode::Internal, "internal error")
    }
}

pub(crate) fn error_stanza(id: u64, r: &Reject) -> pb::Stanza {
    pb::Stanza {
        id,
        body: Some(Body::Error(pb::Error {
            code: r.code as i32,
            message: r.message.clone(),
            retry_after_ms: r.retry_after_ms,
        })),
    }
}

/// A logged-in connection, as other connections see it.
#[derive(Clone)]
pub(crate) struct Online {
    pub conn_id: u64,
    pub out: mpsc::Sender<Box<pb::Stanza>>,
    /// What the delivery loop is handed or told when envelopes are stored for the account.
    pub inbox: Arc<Inbox>,
    /// Closes the connection (re-registration, a newer login).
    pub kill: watch::Sender<bool>,
    /// The login's delivery window, if it asked for one.
    pub window: Option<Arc<Window>>,
    /// Where the delivery loop is (see [`Gateway::connections`]).
    pub delivery: Arc<DeliveryStage>,
}

/// Where a login's delivery loop is, for [`Gateway::connections`]: a delivery that stopped
/// moving shows whether it waits for acks, for the client to read, or for a new envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stage {
    Starting,
    Reading,
    /// Waiting for acks: the window is full.
    Window,
    /// Waiting for the client to read: the outgoing queue is full.
    Queue,
    /// Waiting for a new envelope to be stored.
    Wake,
}

impl Stage {
    fn describe(self) -> &'static str {
        match self {
            Stage::Starting => "not started",
            Stage::Reading => "reading envelopes",
            Stage::Window => "waiting for acks (window full)",
            Stage::Queue => "waiting for the client to read (outgoing queue full)",
            Stage::Wake => "waiting for a new envelope",
        }
    }
}

/// A [`Stage`] that the delivery loop sets and [`Gateway::connections`] reads.
#[derive(Default)]
pub(crate) struct DeliveryStage(std::sync::atomic::AtomicU8);

impl DeliveryStage {
    pub fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Stage {
        match self.0.load(Ordering::Relaxed) {
            0 => Stage::Starting,
            1 => Stage::Reading,
            2 => Stage::Window,
            3 => Stage::Queue,
            _ => Stage::Wake,
        }
    }
}

/// A logged-in connection's delivery, as [`Gateway::connections`] reports it.
#[derive(Clone, Debug)]
pub struct ConnectionState {
    pub account: String,
    /// Envelopes pushed and not acked, and the window's size (0: no window).
    pub in_flight: usize,
    pub window: usize,
    /// Envelopes pushed on this connection so far.
    pub pushed: u64,
    /// Stanzas waiting in the connection's outgoing queue.
    pub out_queued: usize,
    pub delivery: &'static str,
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} pushed, {} of {} in flight, {} queued out, delivery {}",
            self.account, self.pushed, self.in_flight, self.window, self.out_queued, self.delivery
        )
    }
}

pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    pub db: GatewayDb,
    /// The logged-in connections by account. A lock held only for a look-up or an insertion,
    /// never across an `await`: each message's wake takes it, so a lock that parks its waiters
    /// would hand every one of them to another thread.
    online: std::sync::Mutex<HashMap<String, Online>>,
    /// Accounts whose presence is `online` (docs §10.3); the rest are offline.
    present: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Unauthenticated `Register`s per source address.
    pub registrations: RateMap<std::net::IpAddr>,
    /// `FetchBundle`s per target account.
    pub bundle_fetches: RateMap<String>,
    pub next_conn: AtomicU64,
    /// Permits for Noise handshakes in progress (`Limits::concurrent_handshakes`).
    pub handshakes: tokio::sync::Semaphore,
}

impl Shared {
    /// The logged-in connections (see the field).
    pub fn online(&self) -> std::sync::MutexGuard<'_, HashMap<String, Online>> {
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The accounts whose presence is `online`.
    pub fn present(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.present.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has the delivery loop of each recipient that is online read its queue: envelopes were
    /// stored for it apart from the group commit.
    pub fn read_again<A: AsRef<str>>(&self, accounts: impl IntoIterator<Item = A>) {
        let online = self.online();
        for a in accounts {
            if let Some(o) = online.get(a.as_ref()) {
                o.inbox.read();
            }
        }
    }

    /// Hands each online recipient's delivery loop what a committed batch stored for it. The
    /// envelopes are made outside the lock of the connections, and only for those online.
    fn hand_over(&self, stored: &[db::Stored<'_>]) {
        let inboxes: Vec<(Arc<Inbox>, &db::Stored<'_>)> = {
            let online = self.online();
            stored
                .iter()
                .filter_map(|s| Some((online.get(s.recipient)?.inbox.clone(), s)))
                .collect()
        };
        for (inbox, s) in inboxes {
            inbox.hand(s.after, s.envelopes());
        }
    }

    /// Sends a push to each of `accounts` that is online, under one look-up of the connections;
    /// the stanza is made only for those. A connection whose outgoing queue is full does not
    /// read: it is closed rather than buffered for (docs §19).
    pub fn push<A: AsRef<str>>(&self, accounts: impl IntoIterator<Item = A>, body: &Body) {
        let online = self.online();
        for a in accounts {
            let Some(o) = online.get(a.as_ref()) else {
                continue;
            };
            let stanza = Box::new(pb::Stanza {
                id: 0,
                body: Some(body.clone()),
            });
            if let Err(mpsc::error::TrySendError::Full(_)) = o.out.try_send(stanza) {
                tracing::info!("closing a connection that does not read");
                let _ = o.kill.send(true);
            }
        }
    }
}

/// The gateway server.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub async fn open(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        std::fs::create_dir_all(cfg.blob_dir.join("tmp"))?;
        let db = GatewayDb::open(&cfg.database_uri).await?;
        let cfg_limits = cfg.limits.clone();
        let mut db = db;
        db.envelope_ttl_ms = cfg_limits.envelope_ttl.as_millis() as i64;
        db.blob_ttl_ms = cfg_limits.blob_ttl.as_millis() as i64;
        let shared = Arc::new(Shared {
            cfg,
            db,
            online: Default::default(),
            present: Default::default(),
            registrations: RateMap::new(
                cfg_limits.registrations_per_source,
                cfg_limits.registration_window,
            ),
            bundle_fetches: RateMap::new(
                cfg_limits.bundle_fetches_per_target,
                cfg_limits.bundle_window,
            ),
            next_conn: AtomicU64::new(1),
            handshakes: tokio::sync::Semaphore::new(cfg_limits.concurrent_handshakes.max(1)),
        });
        // The group commit's writer hands the recipients' delivery loops their envelopes once
        // they are committed (a delivery loop reads only what it cannot trust it was handed).
        let woken = Arc::downgrade(&shared);
        shared.db.on_stored(move |stored| {
            if let Some(shared) = woken.upgrade() {
                shared.hand_over(stored);
            }
        });
        Ok(Self { shared })
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.shared.cfg.key.public.clone()
    }

    /// Reads of envelopes for delivery so far.
    pub fn delivery_reads(&self) -> u64 {
        self.shared.db.delivery_reads()
    }

    /// Every logged-in connection's delivery: what was pushed and not acked, what waits to be
    /// written, and what its delivery loop waits for. For diagnosing a delivery that stopped.
    pub async fn connections(&self) -> Vec<ConnectionState> {
        let online = self.shared.online();
        let mut states: Vec<ConnectionState> = online
            .iter()
            .map(|(account, o)| ConnectionState {
                account: account.clone(),
                in_flight: o.window.as_ref().map_or(0, |w| w.in_flight()),
                window: o.window.as_ref().map_or(0, |w| w.size),
                pushed: o
                    .window
                    .as_ref()
                    .map_or(0, |w| w.admitted.load(Ordering::Relaxed)),
                out_queued: o.out.max_capacity() - o.out.capacity(),
                delivery: o.delivery.get().describe(),
            })
            .collect();
        states.sort_by(|a, b| a.account.cmp(&b.account));
        states
    }

    /// Accepts connections until `shutdown` turns true. In development mode a listener on a
    /// non-loopback address is refused (nothing is served).
    pub async fn serve(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        match listener.local_addr() {
            Ok(addr) => {
                if let Err(e) = self.shared.cfg.check_listen_addr(addr) {
                    tracing::error!(error = %e, "refusing to serve");
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "listener has no address");
                return;
            }
        }
        tokio::spawn(sweep(self.shared.clone(), shutdown.clone()));
        tokio::spawn({
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            async move { shared.db.checkpoint_log(CHECKPOINT_EVERY, shutdown).await }
        });
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let shared = self.shared.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            if let Err(e) = connection(shared, stream, peer, shutdown).await {
                                tracing::debug!(%peer, error = %e, "connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
            }
        }
    }
}

/// Connections the kernel may hold for the gateway before it accepts them. After a restart every
/// client comes back within seconds; with tokio's default of 1,024, the attempts beyond it are
/// dropped and their TCP retries only after 1, 3 or 7 s. The kernel caps it at
/// `net.core.somaxconn` (4,096 by default on current Linux).
pub const LISTEN_BACKLOG: u32 = 8192;

/// Listens on `addr` with [`LISTEN_BACKLOG`].
pub async fn listen(addr: impl tokio::net::ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing")))
}

/// How often the database's write-ahead log is copied back into its file: often, so that a
/// commit's own checkpoint finds little unsynced (as the bridge's store does).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Deletes expired envelopes, blobs and idempotency records now and then (docs §19).
async fn sweep(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let l = &shared.cfg.limits;
    let every = (l.envelope_ttl.min(l.blob_ttl) / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
            }
        }
        let now = db::now_ms();
        let blobs = match shared
            .db
            .expire(
                now - l.envelope_ttl.as_millis() as i64,
                now - l.blob_ttl.as_millis() as i64,
                now - 48 * 3600 * 1000,
            )
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep failed");
                continue;
            }
        };
        for id in blobs {
            let _ = tokio::fs::remove_file(shared.cfg.blob_dir.join(&id)).await;
        }
        shared.registrations.prune();
        shared.bundle_fetches.prune();
    }
}

/// Token buckets by key (source address, target account), behind one lock so that taking a
/// token is atomic across connections.
pub(crate) struct RateMap<K> {
    cap: f64,
    rate: f64,
    buckets: std::sync::Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> RateMap<K> {
    fn new(per_window: u32, window: Duration) -> Self {
        let cap = f64::from(per_window.max(1));
        Self {
            cap,
            rate: cap / window.as_secs_f64().max(0.001),
            buckets: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`, or says in how many milliseconds one is available.
    pub fn take(&self, key: &K) -> Result<(), u64> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| Bucket::new(self.cap, self.rate))
            .take()
    }

    /// Forgets buckets that are full again (they behave like new ones).
    fn prune(&self) {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, b| {
            b.refill();
            b.tokens < b.cap
        });
    }
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    cap: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(cap: f64, rate: f64) -> Self {
        Self {
            tokens: cap,
            cap,
            rate,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.cap);
        self.at = now;
    }

    fn take(&mut self) -> Result<(), u64> {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / self.rate) * 1000.0).ceil().max(1.0) as u64)
        }
    }
}

/// Per-connection state the handlers use.
pub(crate) struct Conn {
    pub id: u64,
    pub peer: std::net::IpAddr,
    pub account: Option<String>,
    pub out: mpsc::Sender<Box<pb::Stanza>>,
    pub inbox: Arc<Inbox>,
    pub kill_tx: watch::Sender<bool>,
    pub uploads: HashMap<String, blobs::Upload>,
    pub delivery: Option<tokio::task::JoinHandle<()>>,
    /// Set by `Login`: deliver envelopes up to this id, then `QueueDrained`.
    pub pending_delivery: Option<i64>,
    /// The login's delivery window, when it asked for one (`Login.window`, docs §7).
    pub window: Option<Arc<Window>>,
    /// Where the login's delivery loop is.
    pub delivery_stage: Arc<DeliveryStage>,
}

impl Conn {
    /// This logged-in connection as other connections and its delivery loop see it.
    pub fn online(&self) -> Online {
        Online {
            conn_id: self.id,
            out: self.out.clone(),
            inbox: self.inbox.clone(),
            kill: self.kill_tx.clone(),
            window: self.window.clone(),
            delivery: self.delivery_stage.clone(),
        }
    }
}

/// What a login's delivery loop is handed by the group commit, between its reads: each
/// committed batch's envelopes for the account with where they follow on
/// ([`db::Stored::after`]), or word that it must read its queue (envelopes stored apart, or
/// more handed than it may hold). The loop pushes what it was handed without reading when it
/// follows on from the last envelope it pushed, and reads otherwise (see `deliver`).
#[derive(Default)]
pub(crate) struct Inbox {
    wake: Notify,
    handed: std::sync::Mutex<Handed>,
}

#[derive(Default)]
pub(crate) struct Handed {
    batches: std::collections::VecDeque<HandedBatch>,
    /// Envelopes in `batches`.
    envelopes: usize,
    /// Their encoded size.
    bytes: usize,
    /// Read the queue: something was stored that is not in `batches`.
    read: bool,
}

/// One committed batch's envelopes for the account (see [`Inbox`]).
pub(crate) struct HandedBatch {
    after: Option<i64>,
    envelopes: Vec<pb::Envelope>,
}

/// Envelopes an inbox holds at most, and their encoded bytes; past either, what it holds is
/// dropped and the loop reads its queue (they are all stored). The bytes bound a login whose
/// loop waits (a window a client does not ack, a slow reader) to what one large envelope takes,
/// rather than its queue's worth of them in memory.
const INBOX_ENVELOPES: usize = 256;
const INBOX_BYTES: usize = 1 << 20;

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Handed> {
        self.handed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands over envelopes just committed, which follow on from `after`.
    pub fn hand(&self, after: Option<i64>, envelopes: Vec<pb::Envelope>) {
        {
            let bytes: usize = envelopes.iter().map(prost::Message::encoded_len).sum();
            let mut h = self.lock();
            if h.read
                || h.envelopes + envelopes.len() > INBOX_ENVELOPES
                || h.bytes + bytes > INBOX_BYTES
            {
                *h = Handed {
                    read: true,
                    ..Default::default()
                };
            } else {
                h.envelopes += envelopes.len();
                h.bytes += bytes;
                h.batches.push_back(HandedBatch { after, envelopes });
            }
        }
        self.wake.notify_one();
    }

    /// Has the loop read its queue.
    pub fn read(&self) {
        self.lock().read = true;
        self.wake.notify_one();
    }

    /// Waits until something is handed or the loop must read (a wake that came while the loop
    /// was busy is kept), then the envelopes that follow on from `last`, in order, or `None`
    /// when the loop must read its queue to find them.
    pub async fn next(&self, last: i64) -> Option<Vec<pb::Envelope>> {
        self.wake.notified().await;
        let h = std::mem::take(&mut *self.lock());
        if h.read {
            return None;
        }
        handed_after(last, h.batches)
    }
}

/// The envelopes of `batches` past `last`, when they follow on from it without a gap: each
/// batch after the last envelope pushed, or taking up inside a batch already partly pushed;
/// a batch wholly pushed (read before it was handed) is skipped. `None` at the first gap.
fn handed_after(
    mut last: i64,
    batches: impl IntoIterator<Item = HandedBatch>,
) -> Option<Vec<pb::Envelope>> {
    let mut out = Vec::new();
    for b in batches {
        let continues = b.after == Some(last) || b.envelopes.iter().any(|e| e.id as i64 == last);
        let new = b.envelopes.into_iter().filter(|e| e.id as i64 > last);
        let before = out.len();
        out.extend(new);
        if out.len() == before {
            continue;
        }
        if !continues {
            return None;
        }
        last = out.last().map_or(last, |e| e.id as i64);
    }
    Some(out)
}

/// Flow control of one login's delivery (docs §7): at most `size` envelopes pushed on this
/// connection and not yet acked. Delivery waits for acks before pushing more.
pub(crate) struct Window {
    size: usize,
    in_flight: std::sync::Mutex<std::collections::HashSet<u64>>,
    freed: Notify,
    /// Envelopes admitted so far (for [`Gateway::connections`]).
    admitted: AtomicU64,
}

impl Window {
    pub fn new(size: u32) -> Self {
        Self {
            size: size.max(1) as usize,
            in_flight: Default::default(),
            freed: Notify::new(),
            admitted: AtomicU64::new(0),
        }
    }

    /// Waits until the window has room, then counts `id` as in flight.
    pub async fn admit(&self, id: u64) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if f.len() < self.size {
                    f.insert(id);
                    self.admitted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            freed.await;
        }
    }

    /// Envelopes pushed and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Acked envelopes leave the window (ids that were not in flight change nothing).
    pub fn acked(&self, ids: &[u64]) {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let before = f.len();
        for id in ids {
            f.remove(id);
        }
        if f.len() < before {
            self.freed.notify_waiters();
        }
    }
}

/// Queues a stanza for a connection's writer. A client that does not read lets the queue fill;
/// when it stays full for `stall`, the connection is closed instead of buffering more.
pub(crate) async fn enqueue(
    out: &mpsc::Sender<Box<pb::Stanza>>,
    kill: &watch::Sender<bool>,
    stall: Duration,
    stanza: pb::Stanza,
) -> Result<(), TransportError> {
    match out.send_timeout(Box::new(stanza), stall).await {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            tracing::info!("closing a connection that does not read");
            let _ = kill.send(true);
            Err(TransportError::Protocol("client does not read"))
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(TransportError::Closed),
    }
}

/// `Send`s of one connection in the group commit at once, at most; the next waits for the
/// oldest to be answered.
const PIPELINED_SENDS: usize = 64;

/// What the connection's answerer does next, in request order.
enum Pending {
    /// Answer this `Send` (request id, answer, when the request was read) once it is stored.
    Answer(u64, handlers::SendAnswer, Instant),
    /// Everything before this is answered.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Answers a connection's `Send`s in the order they came, each once it is stored. A connection
/// thus has up to [`PIPELINED_SENDS`] in the group commit together (docs §4.1: a client may
/// pipeline requests), where waiting for each commit before reading the next request let one
/// connection store one `Send` per commit. Stops when the connection stops taking answers.
async fn answer_in_order(
    mut pending: mpsc::Receiver<Pending>,
    out: mpsc::Sender<Box<pb::Stanza>>,
    kill: watch::Sender<bool>,
    stall: Duration,
    conn_id: u64,
) {
    while let Some(p) = pending.recv().await {
        match p {
            Pending::Answer(id, answer, started) => {
                let reply = match answer.await {
                    Ok(body) => pb::Stanza {
                        id,
                        body: Some(body),
                    },
                    Err(r) => error_stanza(id, &r),
                };
                note_if_slow("Send", started, conn_id);
                if enqueue(&out, &kill, stall, reply).await.is_err() {
                    return;
                }
            }
            Pending::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Waits until every `Send` passed to the answerer is answered, so that what the connection
/// answers next comes after them.
async fn answered(
    pending: &mpsc::Sender<Pending>,
    outstanding: &mut bool,
) -> Result<(), TransportError> {
    if !std::mem::take(outstanding) {
        return Ok(());
    }
    let (done, wait) = tokio::sync::oneshot::channel();
    pending
        .send(Pending::Barrier(done))
        .await
        .map_err(|_| TransportError::Closed)?;
    wait.await.map_err(|_| TransportError::Closed)
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransportError> {
    let limits = &shared.cfg.limits;
    // The wait for a permit counts against the handshake's time (docs §2).
    let handshake = async {
        let _permit = shared
            .handshakes
            .acquire()
            .await
            .map_err(|_| TransportError::Protocol("gateway closing"))?;
        noise::accept(stream, &shared.cfg.key).await
    };
    let (mut reader, writer, _client_key) =
        tokio::time::timeout(limits.handshake_timeout, handshake)
            .await
            .map_err(|_| TransportError::Protocol("handshake timed out"))??;
    // Boxed: a channel allocates room for 32 items when it is made, about 22 KB per connection
    // for stanzas held inline.
    let (out_tx, out_rx) = mpsc::channel::<Box<pb::Stanza>>(limits.out_queue.max(1));
    let writer_task = tokio::spawn(writer.pump(out_rx));
    let (kill_tx, mut kill_rx) = watch::channel(false);
    let mut conn = Conn {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        peer: peer.ip(),
        account: None,
        out: out_tx.clone(),
        inbox: Default::default(),
        kill_tx: kill_tx.clone(),
        uploads: HashMap::new(),
        delivery: None,
        pending_delivery: None,
        window: None,
        delivery_stage: Default::default(),
    };
    let stall = limits.slow_reader_timeout;
    let send = |st: pb::Stanza| enqueue(&out_tx, &kill_tx, stall, st);
    let (pending, pending_rx) = mpsc::channel(PIPELINED_SENDS);
    let answerer = tokio::spawn(answer_in_order(
        pending_rx,
        out_tx.clone(),
        kill_tx.clone(),
        stall,
        conn.id,
    ));
    // Whether `Send`s went to the answerer since it was last waited for.
    let mut outstanding = false;
    let mut bucket = Bucket::new(shared.cfg.rate_capacity, shared.cfg.rate_per_sec);
    let result = loop {
        let next = tokio::select! {
            r = tokio::time::timeout(shared.cfg.idle_timeout, reader.read_stanza()) => r,
            _ = kill_rx.changed() => break Ok(()),
            _ = shutdown.changed() => break Ok(()),
        };
        let stanza = match next {
            Err(_) => break Err(TransportError::Protocol("idle timeout")),
            Ok(Err(TransportError::TooLarge(n))) => {
                let _ = send(error_stanza(
                    0,
                    &reject(
                        ErrorCode::TooLarge,
                        format!("record of {n} bytes exceeds 1 MiB"),
                    ),
                ))
                .await;
                break Err(TransportError::TooLarge(n));
            }
            Ok(Err(TransportError::Decode(e))) => {
                let _ = send(error_stanza(
                    0,
                    &reject(ErrorCode::BadRequest, "malformed stanza"),
                ))
                .await;
                break Err(TransportError::Decode(e));
            }
            Ok(Err(e)) => break Err(e),
            Ok(Ok(s)) => s,
        };
        let id = stanza.id;
        let is_ack = matches!(stanza.body, Some(Body::Ack(_)));
        let Some(body) = stanza
            .body
            .filter(handlers::is_request)
            .filter(|_| id != 0 || is_ack)
        else {
            let _ = send(error_stanza(
                id,
                &reject(ErrorCode::BadRequest, "malformed stanza"),
            ))
            .await;
            break Err(TransportError::Protocol("malformed stanza"));
        };
        if let Err(retry) = bucket.take() {
            let r = Reject {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                retry_after_ms: retry,
            };
            if let Err(e) = answered(&pending, &mut outstanding).await {
                break Err(e);
            }
            if let Err(e) = send(error_stanza(id, &r)).await {
                break Err(e);
            }
            continue;
        }
        let kind = body.name();
        let started = Instant::now();
        let body = match body {
            Body::Send(s) => {
                // Into the group commit now, answered by the answerer once stored; the next
                // request is read meanwhile.
                let answer = handlers::queue_send(&shared, conn.account.as_deref(), s)
                    .await
                    .unwrap_or_else(|r| Box::pin(async move { Err(r) }));
                if pending
                    .send(Pending::Answer(id, answer, started))
                    .await
                    .is_err()
                {
                    break Err(TransportError::Closed);
                }
                outstanding = true;
                continue;
            }
            other => other,
        };
        // Every other request is handled after the `Send`s before it are answered.
        if let Err(e) = answered(&pending, &mut outstanding).await {
            break Err(e);
        }
        let answer = handlers::handle(&shared, &mut conn, body).await;
        note_if_slow(kind, started, conn.id);
        let reply = match answer {
            Ok(Some(body)) => Some(pb::Stanza {
                id,
                body: Some(body),
            }),
            Ok(None) => None,
            Err(r) => Some(error_stanza(id, &r)),
        };
        if let Some(reply) = reply {
            // An id-0 Ack gets no answer, only errors.
            if id == 0 && matches!(reply.body, Some(Body::Ok(_))) {
                continue;
            }
            let fatal = id == 0 && is_ack;
            if let Err(e) = send(reply).await {
                break Err(e);
            }
            if fatal {
                // An error pushed for an id-0 Ack other than RATE_LIMITED ends the connection.
                break Err(TransportError::Protocol("bad id-0 ack"));
            }
        }
        if let Some(after) = handlers::after_answer(&shared, &mut conn).await {
            conn.delivery = Some(after);
        }
    };
    // The `Send`s in the commit are stored whatever becomes of the connection; their answers
    // go out while it still takes them.
    drop(pending);
    go_offline(&shared, &mut conn).await;
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), answerer).await;
    drop(conn);
    // A writer stuck on a peer that does not read is not waited for.
    let mut writer_task = writer_task;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
    result
}

/// A connection ends: its delivery stops, its account goes offline (unless a newer connection
/// of the account took over), and its unfinished uploads are discarded.
async fn go_offline(shared: &Shared, conn: &mut Conn) {
    if let Some(d) = conn.delivery.take() {
        d.abort();
    }
    if let Some(account) = conn.account.take() {
        let gone = {
            let mut online = shared.online();
            let ours = online.get(&account).is_some_and(|o| o.conn_id == conn.id);
            ours && online.remove(&account).is_some()
        };
        if gone {
            handlers::set_presence(shared, &account, false).await;
        }
    }
    for (_, up) in conn.uploads.drain() {
        up.discard().await;
    }
}

/// Checks that an account string is valid, for handlers.
pub(crate) fn check_account(a: &str) -> Result<(), Reject> {
    if wire::is_valid_account(a) {
        Ok(())
    } else {
        Err(reject(
            ErrorCode::BadRequest,
            format!("malformed account `{a}`"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(after: Option<i64>, ids: &[u64]) -> HandedBatch {
        HandedBatch {
            after,
            envelopes: ids
                .iter()
                .map(|&id| pb::Envelope {
                    id,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn ids(out: Option<Vec<pb::Envelope>>) -> Option<Vec<u64>> {
        out.map(|v| v.into_iter().map(|e| e.id).collect())
    }

    /// Handed batches are pushed only where they follow on from the last envelope pushed.
    #[test]
    fn handed_batches_follow_on_or_send_the_loop_to_read() {
        // A chain from the last envelope pushed, across batches.
        let chain = [batch(Some(4), &[6, 7]), batch(Some(7), &[9])];
        assert_eq!(ids(handed_after(4, chain)), Some(vec![6, 7, 9]));
        // A batch the loop already read is skipped; the next follows on from it.
        let read = [batch(Some(2), &[3, 4]), batch(Some(4), &[5])];
        assert_eq!(ids(handed_after(4, read)), Some(vec![5]));
        // Taking up inside a batch a read got part of.
        assert_eq!(
            ids(handed_after(4, [batch(Some(2), &[3, 4, 5])])),
            Some(vec![5])
        );
        // A gap: something stored between what was pushed and what is handed.
        assert_eq!(ids(handed_after(4, [batch(Some(5), &[6])])), None);
        assert_eq!(
            ids(handed_after(
                4,
                [batch(Some(4), &[5]), batch(Some(6), &[7])]
            )),
            None
        );
        // Nothing known to follow on from.
        assert_eq!(ids(handed_after(4, [batch(None, &[5])])), None);
        assert_eq!(ids(handed_after(0, [batch(None, &[1])])), None);
        // Nothing handed (a wake that came while the loop was busy): nothing to push.
        assert_eq!(ids(handed_after(4, [])), Some(vec![]));
    }

    /// An inbox that would hold more than its bounds drops what it holds and has the loop read.
    #[tokio::test]
    async fn an_inbox_past_its_bound_has_the_loop_read() {
        let inbox = Inbox::default();
        inbox.hand(Some(0), vec![pb::Envelope::default(); INBOX_ENVELOPES]);
        assert_eq!(inbox.lock().envelopes, INBOX_ENVELOPES);
        inbox.hand(Some(1), vec![pb::Envelope::default()]);
        assert!(inbox.lock().batches.is_empty());
        assert_eq!(inbox.next(0).await.map(|v| v.len()), None);
        // Read: from then on it holds again.
        inbox.hand(
            Some(0),
            vec![pb::Envelope {
                id: 1,
                ..Default::default()
            }],
        );
        assert_eq!(inbox.next(0).await.map(|v| v.len()), Some(1));
        // Past its bytes: one envelope larger than they allow is read, not held.
        let large = pb::Envelope {
            id: 2,
            ciphertext: vec![0; INBOX_BYTES],
            ..Default::default()
        };
        inbox.hand(Some(1), vec![large]);
        assert!(inbox.lock().batches.is_empty());
        assert_eq!(inbox.next(1).await.map(|v| v.len()), None);
    }
}
