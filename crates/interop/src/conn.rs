//! One connection to the gateway: the Noise transport, request/answer matching by id, pushes on
//! a bounded channel, and a keepalive ping. Free of Signal state, so it is `Send`.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::{Mutex, mpsc, oneshot},
};

use mib_wire::{
    noise::{self, StaticKey, TransportError},
    pb::{self, ErrorCode, stanza::Body},
};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const PING_EVERY: Duration = Duration::from_secs(30);
/// Silence after which the gateway is taken as gone (docs §4.5).
const DEAD_AFTER: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    #[error("cannot reach the gateway at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("gateway connection lost")]
    Disconnected,
    #[error("the gateway did not answer in time")]
    Timeout,
    /// The account's actor did not finish a command in time (busy, or not running at all): not
    /// the gateway's doing.
    #[error("the account did not finish the command in time")]
    CommandTimeout,
    #[error("gateway refused: {code:?}: {message}")]
    Gateway {
        code: ErrorCode,
        message: String,
        retry_after_ms: u64,
    },
    #[error("unexpected answer from the gateway")]
    Unexpected,
    #[error("{0}")]
    Crypto(String),
    #[error("vault: {0}")]
    Vault(#[from] mib_vault::VaultError),
    #[error("{0}")]
    Invalid(String),
    /// A blob over the caller's size limit (not downloaded).
    #[error("the file is larger than the limit of {0} bytes")]
    TooLarge(u64),
}

impl InteropError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            InteropError::Gateway { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Worth retrying later (the same request may succeed).
    pub fn is_transient(&self) -> bool {
        // The vault's database away (a lost connection, a restart, a full disk): the Signal
        // state could not be read or committed, and the same request succeeds once it is back.
        if let InteropError::Vault(mib_vault::VaultError::Store(e)) = self {
            return e.is_unavailable();
        }
        matches!(
            self,
            InteropError::Connect { .. }
                | InteropError::Disconnected
                | InteropError::Timeout
                | InteropError::CommandTimeout
        ) || matches!(
            self.code(),
            Some(ErrorCode::RateLimited | ErrorCode::Internal | ErrorCode::QueueFull)
        )
    }
}

/// The requests waiting for their answers; `None` once the connection's reader ended (a request
/// made after that fails at once instead of waiting out its timeout).
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<pb::Stanza>>>>>;

/// A live connection. Dropping every clone closes it.
#[derive(Clone)]
pub struct GatewayConn {
    /// Boxed, as the pushes are: a channel allocates room for 32 items up front, and a bridge
    /// keeps one connection per login.
    out: mpsc::Sender<Box<pb::Stanza>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    /// The pushes not yet taken by the account (for [`Self::describe`]).
    pushes: mpsc::WeakSender<Box<pb::Stanza>>,
}

/// The answer to come to a request sent with [`GatewayConn::submit`].
#[must_use = "a request's answer says whether the gateway did it"]
pub struct Answer {
    id: u64,
    kind: &'static str,
    rx: oneshot::Receiver<pb::Stanza>,
    pending: Pending,
}

impl Answer {
    /// Waits for the answer (at most `REQUEST_TIMEOUT`); an `Error` answer becomes `Err`.
    pub async fn wait(self) -> Result<Body, InteropError> {
        let Self {
            id,
            kind,
            rx,
            pending,
        } = self;
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(st)) => st,
            Ok(Err(_)) => return Err(InteropError::Disconnected),
            Err(_) => {
                if let Some(p) = pending.lock().await.as_mut() {
                    p.remove(&id);
                }
                tracing::warn!(request = kind, id, "the gateway did not answer in time");
                return Err(InteropError::Timeout);
            }
        };
        match answer.body {
            Some(Body::Error(e)) => Err(InteropError::Gateway {
                code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::ErrorUnspecified),
                message: e.message,
                retry_after_ms: e.retry_after_ms,
            }),
            Some(b) => Ok(b),
            None => Err(InteropError::Unexpected),
        }
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Where the gateway is and which key it must have.
#[derive(Clone, Debug)]
pub struct GatewayAddr {
    pub address: String,
    pub public_key: Vec<u8>,
}

impl GatewayConn {
    /// Connects and returns the connection and its pushes.
    pub async fn connect(
        addr: &GatewayAddr,
    ) -> Result<(Self, mpsc::Receiver<Box<pb::Stanza>>), InteropError> {
        let err = |reason: String| InteropError::Connect {
            addr: addr.address.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr.address))
            .await
            .map_err(|_| err("connection timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (mut reader, writer) = tokio::time::timeout(
            Duration::from_secs(10),
            noise::connect(tcp, &StaticKey::generate(), &addr.public_key),
        )
        .await
        .map_err(|_| err("handshake timed out".into()))?
        .map_err(|e| match e {
            TransportError::KeyMismatch => {
                err("the gateway's key does not match interop.gateway_public_key".into())
            }
            other => err(other.to_string()),
        })?;
        let (out_tx, out_rx) = mpsc::channel::<Box<pb::Stanza>>(256);
        let (push_tx, push_rx) = mpsc::channel::<Box<pb::Stanza>>(1024);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let pushes = push_tx.downgrade();
        tokio::spawn(writer.pump(out_rx));
        let p = pending.clone();
        tokio::spawn(async move {
            loop {
                let st = match tokio::time::timeout(DEAD_AFTER, reader.read_stanza()).await {
                    Ok(Ok(st)) => st,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "gateway connection closed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("gateway silent for 90 s, reconnecting");
                        break;
                    }
                };
                let waiting = match p.lock().await.as_mut() {
                    Some(p) if st.id != 0 => p.remove(&st.id),
                    _ => None,
                };
                if let Some(tx) = waiting {
                    let _ = tx.send(st);
                    continue;
                }
                if push_tx.send(Box::new(st)).await.is_err() {
                    break;
                }
            }
            // Every request still waiting fails now, and any made from now on.
            p.lock().await.take();
        });
        let conn = Self {
            out: out_tx,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            pushes,
        };
        let keepalive = conn.clone();
        let weak = Arc::downgrade(&conn.next_id);
        tokio::spawn(async move {
            let mut nonce = 0u64;
            loop {
                tokio::time::sleep(PING_EVERY).await;
                if weak.strong_count() <= 1 || keepalive.out.is_closed() {
                    return;
                }
                nonce += 1;
                if keepalive
                    .request(Body::Ping(pb::Ping { nonce }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok((conn, push_rx))
    }

    pub fn is_closed(&self) -> bool {
        self.out.is_closed()
    }

    /// What waits on this connection: stanzas to write, pushes the account has not taken,
    /// requests without their answer. For diagnosing a connection that stopped moving.
    pub fn describe(&self) -> String {
        let pushes = self
            .pushes
            .upgrade()
            .map_or_else(|| "reader ended".to_owned(), |tx| queued(&tx).to_string());
        let requests = self.pending.try_lock().map_or_else(
            |_| "?".to_owned(),
            |p| p.as_ref().map_or(0, HashMap::len).to_string(),
        );
        format!(
            "{} stanzas to write, {pushes} pushes not taken, {requests} requests unanswered",
            queued(&self.out)
        )
    }

    /// Sends a request and waits for its answer; an `Error` answer becomes `Err`.
    pub async fn request(&self, body: Body) -> Result<Body, InteropError> {
        self.submit(body).await?.wait().await
    }

    /// A request whose answer is a plain `Ok`.
    pub async fn request_ok(&self, body: Body) -> Result<(), InteropError> {
        match self.request(body).await? {
            Body::Ok(_) => Ok(()),
            _ => Err(InteropError::Unexpected),
        }
    }

    /// Sends a request and returns once it is on its way, with the answer to wait for: a caller
    /// can go on with other work (and other requests) while the gateway handles this one. The
    /// gateway answers a connection's requests in the order it read them (docs §4.1).
    pub async fn submit(&self, body: Body) -> Result<Answer, InteropError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kind = body.name();
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().await.as_mut() {
            Some(p) => p.insert(id, tx),
            None => return Err(InteropError::Disconnected),
        };
        if self
            .out
            .send(Box::new(pb::Stanza {
                id,
                body: Some(body),
            }))
            .await
            .is_err()
        {
            if let Some(p) = self.pending.lock().await.as_mut() {
                p.remove(&id);
            }
            return Err(InteropError::Disconnected);
        }
        Ok(Answer {
            id,
            kind,
            rx,
            pending: self.pending.clone(),
        })
    }

    /// Sends without waiting (an id-0 `Ack`).
    pub async fn send_unanswered(&self, body: Body) -> Result<(), InteropError> {
        self.out
            .send(Box::new(pb::Stanza {
                id: 0,
                body: Some(body),
            }))
            .await
            .map_err(|_| InteropError::Disconnected)
    }

    /// Register, then verify: returns the account secret.
    pub async fn request_code(&self, account: &str) -> Result<(), InteropError> {
        self.request_ok(Body::Register(pb::Register {
            account: account.to_owned(),
        }))
        .await
    }

    pub async fn verify(&self, account: &str, code: &str) -> Result<Vec<u8>, InteropError> {
        match self
            .request(Body::Verify(pb::Verify {
                account: account.to_owned(),
                code: code.to_owned(),
            }))
            .await?
        {
            Body::Registered(r) => Ok(r.secret),
            _ => Err(InteropError::Unexpected),
        }
    }

    /// Logs in; `window` > 0 asks the gateway to keep at most that many envelopes pushed and
    /// not acked (docs §7), 0 for no limit.
    pub async fn login(
        &self,
        account: &str,
        secret: &[u8],
        window: u32,
    ) -> Result<pb::LoggedIn, InteropError> {
        match self
            .request(Body::Login(pb::Login {
                account: account.to_owned(),
                secret: secret.to_vec(),
                window,
            }))
            .await?
        {
            Body::LoggedIn(l) => Ok(l),
            _ => Err(InteropError::Unexpected),
        }
    }
}

/// How many items wait in a bounded channel (for the diagnostics of a queue that stopped).
pub(crate) fn queued<T>(tx: &mpsc::Sender<T>) -> usize {
    tx.max_capacity() - tx.capacity()
}
