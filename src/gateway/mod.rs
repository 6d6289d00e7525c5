//! The reference interop gateway (binary `interop-gateway`): accounts with verification codes, the
//! key directory, store-and-forward envelopes with acks, receipts, typing, presence, profiles,
//! groups and media blobs, exactly as docs/interop-protocol.md describes. It shares only the wire
//! definitions (`crate::wire`) with the bridge's client.
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
    sync::{Mutex, Notify, mpsc, watch},
};

use crate::wire::{
    self,
    noise::{self, StaticKey, TransportError},
    pb::{self, ErrorCode, stanza::Body},
};

mod blobs;
mod db;
mod handlers;

pub use db::GatewayDb;

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub key: StaticKey,
    pub database_uri: String,
    pub blob_dir: PathBuf,
    /// A fixed verification code (development); `None` writes random codes to the log.
    pub dev_code: Option<String>,
    pub max_blob_bytes: u64,
    pub rate_capacity: f64,
    pub rate_per_sec: f64,
    pub idle_timeout: Duration,
}

impl GatewayConfig {
    pub fn new(key: StaticKey, database_uri: String, blob_dir: PathBuf) -> Self {
        Self {
            key,
            database_uri,
            blob_dir,
            dev_code: None,
            max_blob_bytes: 100 * 1024 * 1024,
            rate_capacity: 500.0,
            rate_per_sec: 100.0,
            idle_timeout: Duration::from_secs(120),
        }
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
    pub out: mpsc::Sender<pb::Stanza>,
    /// Wakes the delivery loop when an envelope is stored for the account.
    pub wake: Arc<Notify>,
    /// Closes the connection (re-registration, a newer login).
    pub kill: watch::Sender<bool>,
}

pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    pub db: GatewayDb,
    pub online: Mutex<HashMap<String, Online>>,
    pub next_conn: AtomicU64,
    pub relayed: AtomicU64,
}

impl Shared {
    /// Wakes the delivery loop of each recipient that is online.
    pub async fn wake(&self, accounts: impl IntoIterator<Item = &String>) {
        let online = self.online.lock().await;
        for a in accounts {
            if let Some(o) = online.get(a) {
                o.wake.notify_one();
            }
        }
    }

    /// Sends a push to an account if it is online (dropped when its queue is full: pushes sent this
    /// way are ephemeral).
    pub async fn push(&self, account: &str, stanza: pb::Stanza) {
        if let Some(o) = self.online.lock().await.get(account) {
            let _ = o.out.try_send(stanza);
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
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                db,
                online: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                relayed: AtomicU64::new(0),
            }),
        })
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.shared.cfg.key.public.clone()
    }

    /// Envelopes stored so far by this process (for benchmarks).
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::Relaxed)
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let shared = self.shared.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            if let Err(e) = connection(shared, stream, shutdown).await {
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

/// Token bucket of one connection.
struct Bucket {
    tokens: f64,
    cap: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> Result<(), u64> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.cap);
        self.at = now;
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
    pub account: Option<String>,
    pub out: mpsc::Sender<pb::Stanza>,
    pub wake: Arc<Notify>,
    pub kill_tx: watch::Sender<bool>,
    pub uploads: HashMap<String, blobs::Upload>,
    pub delivery: Option<tokio::task::JoinHandle<()>>,
    /// Set by `Login`: deliver envelopes up to this id, then `QueueDrained`.
    pub pending_delivery: Option<i64>,
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransportError> {
    let (mut reader, writer, _client_key) = tokio::time::timeout(
        Duration::from_secs(10),
        noise::accept(stream, &shared.cfg.key),
    )
    .await
    .map_err(|_| TransportError::Protocol("handshake timed out"))??;
    let (out_tx, out_rx) = mpsc::channel::<pb::Stanza>(1024);
    let writer_task = tokio::spawn(writer.pump(out_rx));
    let (kill_tx, mut kill_rx) = watch::channel(false);
    let mut conn = Conn {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        account: None,
        out: out_tx.clone(),
        wake: Arc::new(Notify::new()),
        kill_tx,
        uploads: HashMap::new(),
        delivery: None,
        pending_delivery: None,
    };
    let mut bucket = Bucket {
        tokens: shared.cfg.rate_capacity,
        cap: shared.cfg.rate_capacity,
        rate: shared.cfg.rate_per_sec,
        at: Instant::now(),
    };
    let result = loop {
        let next = tokio::select! {
            r = tokio::time::timeout(shared.cfg.idle_timeout, reader.read_stanza()) => r,
            _ = kill_rx.changed() => break Ok(()),
            _ = shutdown.changed() => break Ok(()),
        };
        let stanza = match next {
            Err(_) => break Err(TransportError::Protocol("idle timeout")),
            Ok(Err(TransportError::TooLarge(n))) => {
                let _ = out_tx
                    .send(error_stanza(
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
                let _ = out_tx
                    .send(error_stanza(
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
            let _ = out_tx
                .send(error_stanza(
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
            let _ = out_tx.send(error_stanza(id, &r)).await;
            continue;
        }
        let answer = handlers::handle(&shared, &mut conn, body).await;
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
            if out_tx.send(reply).await.is_err() {
                break Err(TransportError::Closed);
            }
        }
        if let Some(after) = handlers::after_answer(&shared, &mut conn).await {
            conn.delivery = Some(after);
        }
    };
    // Going offline.
    if let Some(d) = conn.delivery.take() {
        d.abort();
    }
    if let Some(account) = conn.account.take() {
        let mut online = shared.online.lock().await;
        if online.get(&account).is_some_and(|o| o.conn_id == conn.id) {
            online.remove(&account);
            drop(online);
            handlers::announce_presence(&shared, &account, false).await;
        }
    }
    for (_, up) in conn.uploads.drain() {
        up.discard().await;
    }
    drop(out_tx);
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    result
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
