//! One interop account: an actor owning the account's Signal state and gateway connection.
//! It logs in (and reconnects with backoff), keeps prekeys topped up, encrypts outgoing content
//! (PQXDH sessions from fetched bundles, sender keys for groups), decrypts incoming envelopes, and
//! acks an envelope only after the consumer said it is handled. A decrypted message is sealed into
//! the vault together with the ratchet state that produced it, so a crash before the ack replays
//! it from the vault instead of losing it.

use std::{collections::HashMap, time::Duration};

use libsignal_protocol::{
    CiphertextMessage, DeviceId, IdentityKey, PreKeyBundle, PreKeySignalMessage, ProtocolAddress,
    PublicKey, SenderKeyDistributionMessage, SignalMessage, SignalProtocolError,
    create_sender_key_distribution_message, group_decrypt, group_encrypt, kem, message_decrypt,
    message_encrypt, process_prekey_bundle, process_sender_key_distribution_message,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    conn::{GatewayAddr, GatewayConn, InteropError},
    keys::{self, BATCH, LOW_WATER},
    media,
    runtime::SignalRuntime,
};
use crate::{
    vault::{Vault, VaultStore, signal::SignalStore},
    wire::{
        DEVICE_ID,
        content::{self, Content, DataMessage, content::Body as CBody},
        pb::{self, ErrorCode, Kind, stanza::Body},
    },
};

const META: &str = "meta";
const INBOX: &str = "inbox";
/// Rotate the signed prekey after this long.
const SIGNED_PREKEY_MAX_AGE_MS: i64 = 7 * 24 * 3600 * 1000;

/// Whom a message goes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Account(String),
    Group(String),
}

/// What the account tells its consumer. Events with an `envelope_id` must be acked with
/// [`AccountHandle::ack`] once handled.
#[derive(Debug)]
// Messages dominate and are moved once through a channel; boxing them buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Connected {
        account: String,
    },
    Disconnected {
        account: String,
        reason: String,
    },
    /// The gateway no longer accepts the credentials (re-registered elsewhere).
    LoggedOut {
        account: String,
        reason: String,
    },
    Message {
        envelope_id: u64,
        from: String,
        group: Option<String>,
        message_id: String,
        timestamp: u64,
        data: DataMessage,
    },
    Receipt {
        envelope_id: u64,
        from: String,
        receipt: pb::Receipt,
    },
    GroupUpdate {
        envelope_id: u64,
        from: String,
        group: pb::Group,
    },
    Typing {
        from: String,
        group: Option<String>,
        typing: bool,
    },
    Presence {
        account: String,
        online: bool,
    },
    IdentityChanged {
        peer: String,
    },
    Undecryptable {
        envelope_id: u64,
        from: String,
        group: Option<String>,
        reason: String,
    },
}

impl Event {
    pub fn envelope_id(&self) -> Option<u64> {
        match self {
            Event::Message { envelope_id, .. }
            | Event::Receipt { envelope_id, .. }
            | Event::GroupUpdate { envelope_id, .. }
            | Event::Undecryptable { envelope_id, .. } => Some(*envelope_id),
            _ => None,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, InteropError>>;

// Messages dominate and are moved once through a channel; boxing them buys nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    Send {
        to: Target,
        message_id: String,
        data: DataMessage,
        reply: Reply<pb::Sent>,
    },
    Receipt {
        to: String,
        receipt: pb::Receipt,
        reply: Reply<()>,
    },
    Typing {
        to: Target,
        typing: bool,
        reply: Reply<()>,
    },
    CreateGroup {
        name: String,
        members: Vec<String>,
        reply: Reply<pb::Group>,
    },
    UpdateGroup {
        update: pb::UpdateGroup,
        reply: Reply<pb::Group>,
    },
    GetGroup {
        group: String,
        reply: Reply<pb::Group>,
    },
    SetProfile {
        name: String,
        avatar_blob: String,
        reply: Reply<()>,
    },
    ResetIdentity {
        reply: Reply<()>,
    },
    SessionInfo {
        peer: String,
        reply: Reply<SessionInfo>,
    },
    Stop,
}

/// Facts about a session, for tests and diagnostics.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub exists: bool,
    pub version: u32,
    pub post_quantum: bool,
}

/// A cheap, `Send` handle to a running account.
#[derive(Clone)]
pub struct AccountHandle {
    pub account: String,
    cmd: mpsc::Sender<Command>,
    /// Acks travel apart from commands, unbounded: the consumer acks while the actor may be
    /// busy, and neither may block the other.
    acks: mpsc::UnboundedSender<u64>,
    /// The actor's current gateway connection: blob transfers and profile look-ups need no
    /// Signal state, so they run on the caller's task instead of stalling the actor.
    conn: watch::Receiver<Option<GatewayConn>>,
}

/// How long a command to the actor may take, end to end (a send may fetch a bundle, encrypt
/// and wait for the gateway; each gateway request has its own shorter timeout).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// How many envelopes the gateway may push before the bridge acks some (`Login.window`, docs
/// §7): bounds the decrypted events waiting between the actor and the core.
pub const DELIVERY_WINDOW: u32 = 128;

/// The pause before logging in again after the database failed an envelope, doubling up to
/// the maximum while it keeps failing.
const FIRST_STORE_BACKOFF: Duration = Duration::from_millis(250);
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(10);

/// Why an envelope could not be decrypted.
enum Undecryptable {
    /// The vault's database failed: the envelope is fine, try it again later.
    StoreUnavailable(String),
    /// The envelope itself (or its session) is bad.
    Invalid(String),
}

/// How long blob transfers and profile look-ups wait for a connection.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Envelope ids in one `Ack` (the protocol allows up to 1000, docs §7).
const MAX_ACK_BATCH: usize = 500;

macro_rules! ask {
    ($self:ident, $variant:ident { $($field:ident),* }) => {{
        let (reply, rx) = oneshot::channel();
        let asked = async {
            $self.cmd.send(Command::$variant { $($field,)* reply }).await.map_err(|_| InteropError::Disconnected)?;
            rx.await.map_err(|_| InteropError::Disconnected)?
        };
        tokio::time::timeout(COMMAND_TIMEOUT, asked).await.map_err(|_| InteropError::Timeout)?
    }};
}

impl AccountHandle {
    pub async fn send(
        &self,
        to: Target,
        message_id: String,
        data: DataMessage,
    ) -> Result<pb::Sent, InteropError> {
        ask!(
            self,
            Send {
                to,
                message_id,
                data
            }
        )
    }
    pub async fn receipt(&self, to: String, receipt: pb::Receipt) -> Result<(), InteropError> {
        ask!(self, Receipt { to, receipt })
    }
    pub async fn typing(&self, to: Target, typing: bool) -> Result<(), InteropError> {
        ask!(self, Typing { to, typing })
    }
    pub async fn create_group(
        &self,
        name: String,
        members: Vec<String>,
    ) -> Result<pb::Group, InteropError> {
        ask!(self, CreateGroup { name, members })
    }
    pub async fn update_group(&self, update: pb::UpdateGroup) -> Result<pb::Group, InteropError> {
        ask!(self, UpdateGroup { update })
    }
    pub async fn group(&self, group: String) -> Result<pb::Group, InteropError> {
        ask!(self, GetGroup { group })
    }
    /// The current gateway connection, for work that needs no Signal state; while the actor
    /// is (re)connecting, waits for it as a command to the actor would.
    async fn connection(&self) -> Result<GatewayConn, InteropError> {
        let mut conn = self.conn.clone();
        let ready = conn.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed()));
        match tokio::time::timeout(CONNECT_WAIT, ready).await {
            Ok(Ok(c)) => c.clone().ok_or(InteropError::Disconnected),
            // The actor ended.
            Ok(Err(_)) => Err(InteropError::Disconnected),
            Err(_) => Err(InteropError::Timeout),
        }
    }
    /// Encrypts and uploads media; returns the blob id and the keys for the `Media` content.
    pub async fn upload(&self, data: Vec<u8>) -> Result<(String, media::Sealed), InteropError> {
        let conn = self.connection().await?;
        let sealed = tokio::task::spawn_blocking(move || media::encrypt(&data))
            .await
            .map_err(|e| InteropError::Invalid(e.to_string()))?;
        let blob = put_blob(&conn, &sealed.blob, sealed.sha256.clone()).await?;
        Ok((blob, sealed))
    }
    pub async fn download(
        &self,
        blob: String,
        key: Vec<u8>,
        sha256: Vec<u8>,
        max: u64,
    ) -> Result<Vec<u8>, InteropError> {
        // The ciphertext carries an IV, up to a block of padding and a MAC on top.
        let data = get_blob(&self.connection().await?, &blob, max.saturating_add(64)).await?;
        tokio::task::spawn_blocking(move || {
            media::decrypt(&data, &key, &sha256)
                .map(|p| p.to_vec())
                .map_err(|e| InteropError::Crypto(e.to_string()))
        })
        .await
        .map_err(|e| InteropError::Invalid(e.to_string()))?
    }
    /// Uploads a blob as it is (profile and group avatars, which are public, §11).
    pub async fn upload_plain(&self, data: Vec<u8>) -> Result<String, InteropError> {
        let sha256 = <sha2::Sha256 as sha2::Digest>::digest(&data).to_vec();
        put_blob(&self.connection().await?, &data, sha256).await
    }
    /// Downloads an unencrypted blob of at most `max` bytes.
    pub async fn download_plain(&self, blob: String, max: u64) -> Result<Vec<u8>, InteropError> {
        get_blob(&self.connection().await?, &blob, max).await
    }
    pub async fn profile(&self, account: String) -> Result<pb::Profile, InteropError> {
        match self
            .connection()
            .await?
            .request(Body::GetProfile(pb::GetProfile { account }))
            .await?
        {
            Body::Profile(p) => Ok(p),
            _ => Err(InteropError::Unexpected),
        }
    }
    pub async fn set_profile(&self, name: String, avatar_blob: String) -> Result<(), InteropError> {
        ask!(self, SetProfile { name, avatar_blob })
    }
    pub async fn reset_identity(&self) -> Result<(), InteropError> {
        ask!(self, ResetIdentity {})
    }
    pub async fn session_info(&self, peer: String) -> Result<SessionInfo, InteropError> {
        ask!(self, SessionInfo { peer })
    }
    /// Whether the actor has ended (stopped, logged out).
    pub fn is_stopped(&self) -> bool {
        self.cmd.is_closed()
    }
    /// Tells the account that an event was handled; the gateway may forget the envelope.
    pub async fn ack(&self, envelope_id: u64) {
        let _ = self.acks.send(envelope_id);
    }
    /// Stops the actor and returns once it has ended (its last write done), so that a new actor
    /// for the same account never shares its Signal state and a logout can destroy the keys
    /// after it. Waits at most [`STOP_WAIT`]; an actor that has not ended by then can no longer
    /// write once its data key is destroyed (the vault does not create a new one for it).
    pub async fn stop(&self) {
        let stopped = async {
            let _ = self.cmd.send(Command::Stop).await;
            self.cmd.closed().await;
        };
        if tokio::time::timeout(STOP_WAIT, stopped).await.is_err() {
            tracing::warn!(account = %self.account, "the account's actor did not stop in time");
        }
    }
}

#[cfg(test)]
impl AccountHandle {
    /// A handle with no actor behind it, for tests of what consumes an account's events: the
    /// acks come out of the returned channel; the first value keeps the command channel open.
    pub(crate) fn detached(
        account: &str,
    ) -> (
        Self,
        Box<dyn std::any::Any + Send>,
        mpsc::UnboundedReceiver<u64>,
    ) {
        let (cmd, cmd_rx) = mpsc::channel(1);
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let (_, conn) = watch::channel(None);
        let handle = Self {
            account: account.to_owned(),
            cmd,
            acks,
            conn,
        };
        (handle, Box::new(cmd_rx), acks_rx)
    }
}

/// How long [`AccountHandle::stop`] waits for the actor to end.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// Credentials kept sealed in the vault.
#[derive(Serialize, Deserialize)]
struct Credentials {
    account: String,
    secret: Vec<u8>,
}

/// A decrypted message waiting for its ack, sealed in the vault.
#[derive(Serialize, Deserialize)]
struct InboxEntry {
    from: String,
    group: Option<String>,
    message_id: String,
    timestamp: u64,
    data: Vec<u8>,
}

/// Stores the account's credentials for `owner` (after a successful `Verify`).
pub async fn save_credentials(
    vault: &Vault,
    db: &Arc<dyn VaultStore>,
    owner: &str,
    account: &str,
    secret: &[u8],
) -> Result<(), InteropError> {
    let raw = zeroize::Zeroizing::new(
        serde_json::to_vec(&Credentials {
            account: account.to_owned(),
            secret: secret.to_vec(),
        })
        .expect("serializes"),
    );
    let sealed = vault.seal_record(owner, META, "credentials", &raw).await?;
    db.put_record(owner, META, "credentials", &sealed)
        .await
        .map_err(crate::vault::VaultError::from)?;
    Ok(())
}

/// The account id stored for `owner`, if it has logged in before.
pub async fn stored_account(
    vault: &Vault,
    db: &Arc<dyn VaultStore>,
    owner: &str,
) -> Result<Option<String>, InteropError> {
    let Some(sealed) = db
        .record(owner, META, "credentials")
        .await
        .map_err(crate::vault::VaultError::from)?
    else {
        return Ok(None);
    };
    let raw = vault
        .open_record(owner, META, "credentials", &sealed)
        .await?;
    let c: Credentials = serde_json::from_slice(&raw)
        .map_err(|_| InteropError::Invalid("stored credentials are corrupt".into()))?;
    Ok(Some(c.account))
}

/// Starts the actor of `owner`'s account on `rt`; events go to `events`.
pub async fn spawn_account(
    rt: &SignalRuntime,
    owner: &str,
    gateway: GatewayAddr,
    vault: Vault,
    db: Arc<dyn VaultStore>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<AccountHandle, InteropError> {
    let sealed = db
        .record(owner, META, "credentials")
        .await
        .map_err(crate::vault::VaultError::from)?
        .ok_or_else(|| InteropError::Invalid("not logged in".into()))?;
    let raw = vault
        .open_record(owner, META, "credentials", &sealed)
        .await?;
    let creds: Credentials = serde_json::from_slice(&raw)
        .map_err(|_| InteropError::Invalid("stored credentials are corrupt".into()))?;
    let (tx, rx) = mpsc::channel(256);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (conn_tx, conn_rx) = watch::channel(None);
    let account = creds.account.clone();
    let owner = owner.to_owned();
    rt.spawn(&owner.clone(), move || async move {
        let store = match SignalStore::open(&owner, vault, db).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the account's Signal state");
                return;
            }
        };
        // Which envelopes have a decrypted message waiting (from before a restart).
        let inbox = match store.extra_names(INBOX).await {
            Ok(names) => Some(names.iter().filter_map(|n| n.parse().ok()).collect()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the account's inbox");
                None
            }
        };
        let actor = Actor {
            creds,
            gateway,
            store,
            conn: None,
            published: conn_tx,
            events,
            groups: HashMap::new(),
            recent: std::collections::VecDeque::new(),
            inbox,
            last_replenish: None,
            store_backoff: FIRST_STORE_BACKOFF,
        };
        actor.run(rx, ack_rx).await;
    });
    Ok(AccountHandle {
        account,
        cmd: tx,
        acks: ack_tx,
        conn: conn_rx,
    })
}

struct Actor {
    creds: Credentials,
    gateway: GatewayAddr,
    store: SignalStore,
    conn: Option<(GatewayConn, mpsc::Receiver<pb::Stanza>)>,
    /// The connection as the handle sees it (for blob transfers and profile look-ups).
    published: watch::Sender<Option<GatewayConn>>,
    /// Never waits: the consumer calls back into this actor, so a full channel here could
    /// block both; the gateway's delivery window bounds what is in flight.
    events: mpsc::UnboundedSender<Event>,
    /// Group members as last seen.
    groups: HashMap<String, Vec<String>>,
    /// Recently handled envelope ids (redelivery after reconnect).
    recent: std::collections::VecDeque<u64>,
    /// Envelopes whose decrypted message waits in the vault's inbox until it is acked, so that
    /// other envelopes need no look-up there (`None`: unknown, always look).
    inbox: Option<std::collections::HashSet<u64>>,
    /// When one-time prekeys were last replenished because the gateway said they ran low.
    last_replenish: Option<std::time::Instant>,
    /// The pause before the next login after the database failed an envelope.
    store_backoff: Duration,
}

/// `PREKEYS_LOW` pushes within this time of a replenish are not acted on: someone fetching
/// bundle after bundle makes the gateway push one per fetch, and each would cost a batch of
/// new keys.
const REPLENISH_COALESCE: std::time::Duration = std::time::Duration::from_secs(30);

fn addr(account: &str) -> ProtocolAddress {
    ProtocolAddress::new(
        account.to_owned(),
        DeviceId::new(DEVICE_ID as u8).expect("device id 1 is valid"),
    )
}

fn crypto(e: SignalProtocolError) -> InteropError {
    InteropError::Crypto(e.to_string())
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut acks: mpsc::UnboundedReceiver<u64>,
    ) {
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.conn.is_none() {
                match self.connect().await {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        self.emit(Event::Connected {
                            account: self.creds.account.clone(),
                        })
                        .await;
                    }
                    Err(e) if e.code() == Some(ErrorCode::Unauthorized) => {
                        self.emit(Event::LoggedOut {
                            account: self.creds.account.clone(),
                            reason: e.to_string(),
                        })
                        .await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "interop connection failed");
                        self.emit(Event::Disconnected {
                            account: self.creds.account.clone(),
                            reason: e.to_string(),
                        })
                        .await;
                    }
                }
            }
            let connected = self.conn.is_some();
            tokio::select! {
                // Acks first: they free the gateway's queue and must not be lost at a stop.
                biased;
                Some(envelope_id) = acks.recv() => {
                    // Whatever else is ready goes in the same commit and the same `Ack`.
                    let mut batch = vec![envelope_id];
                    while batch.len() < MAX_ACK_BATCH
                        && let Ok(id) = acks.try_recv()
                    {
                        batch.push(id);
                    }
                    self.ack(&batch).await;
                }
                cmd = rx.recv() => match cmd {
                    None | Some(Command::Stop) => {
                        let mut batch = Vec::new();
                        while let Ok(envelope_id) = acks.try_recv() {
                            batch.push(envelope_id);
                        }
                        for chunk in batch.chunks(MAX_ACK_BATCH) {
                            self.ack(chunk).await;
                        }
                        return;
                    }
                    Some(cmd) => self.command(cmd).await,
                },
                push = async { match self.conn.as_mut() { Some((_, p)) => p.recv().await, None => std::future::pending().await } }, if connected => {
                    match push {
                        Some(st) => self.push(st).await,
                        None => {
                            self.conn = None;
                            self.published.send_replace(None);
                            self.emit(Event::Disconnected { account: self.creds.account.clone(), reason: "connection lost".into() }).await;
                        }
                    }
                }
                _ = tokio::time::sleep(backoff), if !connected => {
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<(), InteropError> {
        let (conn, pushes) = GatewayConn::connect(&self.gateway).await?;
        let logged = conn
            .login(&self.creds.account, &self.creds.secret, DELIVERY_WINDOW)
            .await?;
        self.published.send_replace(Some(conn.clone()));
        self.conn = Some((conn, pushes));
        self.maintain_keys(logged.one_time_prekeys, logged.kyber_prekeys)
            .await?;
        Ok(())
    }

    fn conn(&self) -> Result<&GatewayConn, InteropError> {
        self.conn
            .as_ref()
            .map(|(c, _)| c)
            .ok_or(InteropError::Disconnected)
    }

    /// First upload, rotation of the signed prekey, and replenishing one-time keys.
    async fn maintain_keys(&mut self, one_time: u32, kyber: u32) -> Result<(), InteropError> {
        let signed_at = self
            .store
            .read_extra(META, "signed_at")
            .await?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(i64::from_be_bytes);
        let now = crate::store::now_ms();
        let base = signed_at.is_none_or(|t| now - t > SIGNED_PREKEY_MAX_AGE_MS);
        let need_ot = if one_time < LOW_WATER { BATCH } else { 0 };
        let need_ky = if kyber < LOW_WATER { BATCH } else { 0 };
        if !base && need_ot == 0 && need_ky == 0 {
            return Ok(());
        }
        let up = keys::make_upload(&mut self.store, base, need_ot, need_ky)
            .await
            .map_err(|e| InteropError::Crypto(e.to_string()))?;
        match self.conn()?.request(Body::UploadKeys(up)).await? {
            Body::KeyCountsResult(_) => {}
            _ => return Err(InteropError::Unexpected),
        }
        if base {
            self.store
                .commit(vec![(
                    META,
                    "signed_at".into(),
                    Some(now.to_be_bytes().to_vec()),
                )])
                .await?;
        }
        Ok(())
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send {
                to,
                message_id,
                data,
                reply,
            } => {
                let r = self.send_data(&to, &message_id, data).await;
                let _ = reply.send(r);
            }
            Command::Receipt { to, receipt, reply } => {
                let r = self
                    .simple(Body::SendReceipt(pb::SendReceipt {
                        to,
                        receipt: Some(receipt),
                    }))
                    .await;
                let _ = reply.send(r);
            }
            Command::Typing { to, typing, reply } => {
                let (to, group) = match to {
                    Target::Account(a) => (a, String::new()),
                    Target::Group(g) => (String::new(), g),
                };
                let r = self
                    .simple(Body::SendTyping(pb::SendTyping { to, group, typing }))
                    .await;
                let _ = reply.send(r);
            }
            Command::CreateGroup {
                name,
                members,
                reply,
            } => {
                let r = self
                    .group_request(Body::CreateGroup(pb::CreateGroup { name, members }))
                    .await;
                let _ = reply.send(r);
            }
            Command::UpdateGroup { update, reply } => {
                let r = self.group_request(Body::UpdateGroup(update)).await;
                let _ = reply.send(r);
            }
            Command::GetGroup { group, reply } => {
                let r = self
                    .group_request(Body::GetGroup(pb::GetGroup { group }))
                    .await;
                let _ = reply.send(r);
            }
            Command::SetProfile {
                name,
                avatar_blob,
                reply,
            } => {
                let r = self
                    .simple(Body::SetProfile(pb::SetProfile { name, avatar_blob }))
                    .await;
                let _ = reply.send(r);
            }
            Command::ResetIdentity { reply } => {
                let r = async {
                    self.store.reset_identity().await?;
                    self.store
                        .commit(vec![(META, "signed_at".into(), None)])
                        .await?;
                    self.maintain_keys(0, 0).await
                }
                .await;
                let _ = reply.send(r);
            }
            Command::SessionInfo { peer, reply } => {
                use libsignal_protocol::SessionStore;
                let r = self
                    .store
                    .sessions
                    .load_session(&addr(&peer))
                    .await
                    .map_err(crypto)
                    .and_then(|s| match s {
                        None => Ok(SessionInfo {
                            exists: false,
                            version: 0,
                            post_quantum: false,
                        }),
                        Some(rec) => Ok(SessionInfo {
                            exists: true,
                            version: rec.session_version().map_err(crypto)?,
                            post_quantum: rec
                                .has_usable_sender_chain(
                                    std::time::SystemTime::now(),
                                    libsignal_protocol::SessionUsabilityRequirements::all(),
                                )
                                .unwrap_or(false),
                        }),
                    });
                let _ = reply.send(r);
            }
            Command::Stop => {}
        }
    }

    async fn simple(&self, body: Body) -> Result<(), InteropError> {
        match self.conn()?.request(body).await? {
            Body::Ok(_) => Ok(()),
            _ => Err(InteropError::Unexpected),
        }
    }

    /// Starts a session from a fetched bundle when there is none.
    async fn ensure_session(&mut self, peer: &str) -> Result<(), InteropError> {
        use libsignal_protocol::SessionStore;
        let address = addr(peer);
        if self
            .store
            .sessions
            .load_session(&address)
            .await
            .map_err(crypto)?
            .is_some()
        {
            return Ok(());
        }
        let bundle = match self
            .conn()?
            .request(Body::FetchBundle(pb::FetchBundle {
                account: peer.to_owned(),
            }))
            .await?
        {
            Body::Bundle(b) => b,
            _ => return Err(InteropError::Unexpected),
        };
        let signed = bundle
            .signed_prekey
            .ok_or_else(|| InteropError::Crypto("bundle without signed prekey".into()))?;
        let kyber = bundle
            .kyber_prekey
            .ok_or_else(|| InteropError::Crypto("bundle without Kyber prekey".into()))?;
        let pre_key = match bundle.one_time_prekey {
            Some(k) => Some((
                k.id.into(),
                PublicKey::deserialize(&k.public_key)
                    .map_err(|e| InteropError::Crypto(e.to_string()))?,
            )),
            None => None,
        };
        let b = PreKeyBundle::new(
            bundle.registration_id,
            DeviceId::new(bundle.device_id.clamp(1, 127) as u8)
                .map_err(|e| InteropError::Crypto(e.to_string()))?,
            pre_key,
            signed.id.into(),
            PublicKey::deserialize(&signed.public_key)
                .map_err(|e| InteropError::Crypto(e.to_string()))?,
            signed.signature,
            kyber.id.into(),
            kem::PublicKey::deserialize(&kyber.public_key).map_err(crypto)?,
            kyber.signature,
            IdentityKey::decode(&bundle.identity_key).map_err(crypto)?,
        )
        .map_err(crypto)?;
        let st = &mut self.store;
        let r = process_prekey_bundle(
            &address,
            &mut st.sessions,
            &mut st.identity,
            &b,
            std::time::SystemTime::now(),
            &mut rand::rng(),
        )
        .await;
        r.map_err(|e| {
            self.store.rollback();
            crypto(e)
        })?;
        Ok(())
    }

    async fn encrypt_for(
        &mut self,
        peer: &str,
        plaintext: &[u8],
    ) -> Result<(Kind, Vec<u8>), InteropError> {
        self.ensure_session(peer).await?;
        let address = addr(peer);
        let st = &mut self.store;
        let r = message_encrypt(
            plaintext,
            &address,
            &mut st.sessions,
            &mut st.identity,
            std::time::SystemTime::now(),
            &mut rand::rng(),
        )
        .await;
        let msg = r.map_err(|e| {
            self.store.rollback();
            crypto(e)
        })?;
        self.store.commit(vec![]).await?;
        let kind = match msg {
            CiphertextMessage::PreKeySignalMessage(_) => Kind::Prekey,
            _ => Kind::Message,
        };
        Ok((kind, msg.serialize().to_vec()))
    }

    async fn send_data(
        &mut self,
        to: &Target,
        message_id: &str,
        data: DataMessage,
    ) -> Result<pb::Sent, InteropError> {
        let plaintext = zeroize::Zeroizing::new(
            Content {
                body: Some(CBody::Data(data)),
            }
            .encode_to_vec(),
        );
        let timestamp = crate::store::now_ms() as u64;
        let send = match to {
            Target::Account(peer) => {
                let (kind, ciphertext) = self.encrypt_for(peer, &plaintext).await?;
                pb::Send {
                    to: peer.clone(),
                    group: String::new(),
                    kind: kind as i32,
                    ciphertext,
                    message_id: message_id.to_owned(),
                    timestamp,
                }
            }
            Target::Group(group) => {
                let dist = self.ensure_sender_key(group).await?;
                let me = addr(&self.creds.account);
                let r = group_encrypt(
                    &mut self.store.sender_keys,
                    &me,
                    dist,
                    &plaintext,
                    &mut rand::rng(),
                )
                .await;
                let msg = r.map_err(|e| {
                    self.store.rollback();
                    crypto(e)
                })?;
                self.store.commit(vec![]).await?;
                pb::Send {
                    to: String::new(),
                    group: group.clone(),
                    kind: Kind::Group as i32,
                    ciphertext: msg.serialized().to_vec(),
                    message_id: message_id.to_owned(),
                    timestamp,
                }
            }
        };
        match self.conn()?.request(Body::Send(send)).await? {
            Body::Sent(s) => Ok(s),
            _ => Err(InteropError::Unexpected),
        }
    }

    /// Whether `account` is a member of `group` (asking the gateway again when the members as
    /// last seen do not include it).
    async fn is_member(&mut self, group: &str, account: &str) -> Result<bool, InteropError> {
        if self
            .groups
            .get(group)
            .is_some_and(|m| m.iter().any(|a| a == account))
        {
            return Ok(true);
        }
        self.groups.remove(group);
        match self.group_members(group).await {
            Ok(m) => Ok(m.iter().any(|a| a == account)),
            // Not a member (or no such group): a definite no.
            Err(e) if !e.is_transient() => {
                tracing::debug!(error = %e, "cannot look up a group's members");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn group_members(&mut self, group: &str) -> Result<Vec<String>, InteropError> {
        if let Some(m) = self.groups.get(group) {
            return Ok(m.clone());
        }
        match self
            .conn()?
            .request(Body::GetGroup(pb::GetGroup {
                group: group.to_owned(),
            }))
            .await?
        {
            Body::Group(g) => {
                self.groups.insert(g.id.clone(), g.members.clone());
                Ok(g.members)
            }
            _ => Err(InteropError::Unexpected),
        }
    }

    /// The sender key distribution id for `group`, distributed to every other member.
    async fn ensure_sender_key(&mut self, group: &str) -> Result<uuid::Uuid, InteropError> {
        let dist_name = format!("dist/{group}");
        let dist = match self.store.read_extra(META, &dist_name).await? {
            Some(raw) => uuid::Uuid::from_slice(&raw)
                .map_err(|_| InteropError::Invalid("corrupt distribution id".into()))?,
            None => {
                let d = uuid::Uuid::new_v4();
                self.store
                    .commit(vec![
                        (META, dist_name.clone(), Some(d.as_bytes().to_vec())),
                        (META, format!("skdm/{group}"), None),
                    ])
                    .await?;
                d
            }
        };
        let sent_name = format!("skdm/{group}");
        let mut sent: Vec<String> = self
            .store
            .read_extra(META, &sent_name)
            .await?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default();
        let members = self.group_members(group).await?;
        let me = self.creds.account.clone();
        let missing: Vec<String> = members
            .into_iter()
            .filter(|m| *m != me && !sent.contains(m))
            .collect();
        if missing.is_empty() {
            return Ok(dist);
        }
        let skdm = create_sender_key_distribution_message(
            &addr(&me),
            dist,
            &mut self.store.sender_keys,
            &mut rand::rng(),
        )
        .await
        .map_err(crypto)?;
        self.store.commit(vec![]).await?;
        let content = Content {
            body: Some(CBody::SenderKeyDistribution(
                content::SenderKeyDistribution {
                    group: group.to_owned(),
                    distribution_message: skdm.serialized().to_vec(),
                },
            )),
        }
        .encode_to_vec();
        for m in missing {
            let (kind, ciphertext) = self.encrypt_for(&m, &content).await?;
            let send = pb::Send {
                to: m.clone(),
                group: String::new(),
                kind: kind as i32,
                ciphertext,
                message_id: uuid::Uuid::new_v4().to_string(),
                timestamp: crate::store::now_ms() as u64,
            };
            self.conn()?.request(Body::Send(send)).await?;
            sent.push(m);
        }
        self.store
            .commit(vec![(
                META,
                sent_name,
                Some(serde_json::to_vec(&sent).expect("serializes")),
            )])
            .await?;
        Ok(dist)
    }

    /// A member left or was removed: start a new sender key so they cannot read what follows.
    /// A request answered by a `Group` (create, update, get); the member list is kept up to date.
    async fn group_request(&mut self, body: Body) -> Result<pb::Group, InteropError> {
        match self.conn()?.request(body).await? {
            Body::Group(g) => {
                self.group_changed(&g).await;
                Ok(g)
            }
            _ => Err(InteropError::Unexpected),
        }
    }

    async fn group_changed(&mut self, g: &pb::Group) {
        let before = self
            .groups
            .insert(g.id.clone(), g.members.clone())
            .unwrap_or_default();
        let removed = before.iter().any(|m| !g.members.contains(m));
        if removed {
            let _ = self
                .store
                .commit(vec![
                    (META, format!("dist/{}", g.id), None),
                    (META, format!("skdm/{}", g.id), None),
                ])
                .await;
        }
    }

    /// Envelopes handled: their inbox entries (and any buffered Signal state) are committed in
    /// one transaction, then the gateway is told.
    async fn ack(&mut self, envelope_ids: &[u64]) {
        let clear: Vec<_> = envelope_ids
            .iter()
            .filter(|id| self.inbox.as_mut().is_none_or(|inbox| inbox.remove(id)))
            .map(|id| (INBOX, id.to_string(), None))
            .collect();
        if let Err(e) = self.store.commit(clear).await {
            // Not acked: they come again once the database is back (a message replayed from
            // the inbox is found in the message map and acked without a second effect).
            self.redeliver_later(&format!("cannot record acks: {e}"))
                .await;
            return;
        }
        for id in envelope_ids {
            self.recent.push_back(*id);
        }
        while self.recent.len() > 1024 {
            self.recent.pop_front();
        }
        self.send_acks(envelope_ids.to_vec());
    }

    /// Something an envelope needs from the database cannot be had now (a connection lost, a
    /// full disk). Acking later envelopes past it would break their order, and the gateway
    /// sends an unacked envelope again only after a new login (docs §7); so the buffered state
    /// is undone and the connection dropped: after a pause, the actor logs in again and gets
    /// this envelope and all later ones again, in order.
    async fn redeliver_later(&mut self, reason: &str) {
        self.store.rollback();
        tracing::warn!(%reason, pause = ?self.store_backoff, "cannot process an envelope now; it and later ones will be delivered again");
        self.conn = None;
        self.published.send_replace(None);
        self.emit(Event::Disconnected {
            account: self.creds.account.clone(),
            reason: reason.to_owned(),
        })
        .await;
        tokio::time::sleep(self.store_backoff).await;
        self.store_backoff = (self.store_backoff * 2).min(MAX_STORE_BACKOFF);
    }

    /// Sends an `Ack` as a request, so that one the gateway rate-limits is sent again when it
    /// says (with a delivery window, a lost ack would hold up delivery until the next login).
    /// Runs apart from the actor; an ack lost with the connection is made good at the next
    /// login, when the envelope comes again and is acked from `recent`.
    fn send_acks(&self, envelope_ids: Vec<u64>) {
        let Ok(conn) = self.conn().cloned() else {
            return;
        };
        tokio::spawn(async move {
            for _ in 0..8 {
                let ack = Body::Ack(pb::Ack {
                    envelope_ids: envelope_ids.clone(),
                });
                match conn.request(ack).await {
                    Ok(_) => return,
                    Err(InteropError::Gateway {
                        code: ErrorCode::RateLimited,
                        retry_after_ms,
                        ..
                    }) => {
                        tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(10, 10_000)))
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "ack not delivered; the envelopes come again");
                        return;
                    }
                }
            }
        });
    }

    async fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    async fn push(&mut self, st: pb::Stanza) {
        match st.body {
            Some(Body::Envelope(env)) => self.envelope(env).await,
            Some(Body::Typing(t)) => {
                self.emit(Event::Typing {
                    from: t.from,
                    group: (!t.group.is_empty()).then_some(t.group),
                    typing: t.typing,
                })
                .await
            }
            Some(Body::Presence(p)) => {
                self.emit(Event::Presence {
                    account: p.account,
                    online: p.online,
                })
                .await
            }
            Some(Body::PrekeysLow(_))
                if self
                    .last_replenish
                    .is_some_and(|t| t.elapsed() < REPLENISH_COALESCE) =>
            {
                tracing::debug!("prekeys low again soon after a replenish; coalesced");
            }
            Some(Body::PrekeysLow(low)) => {
                match self
                    .maintain_keys(low.one_time_prekeys, low.kyber_prekeys)
                    .await
                {
                    Ok(()) => self.last_replenish = Some(std::time::Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "cannot replenish prekeys"),
                }
            }
            Some(Body::Error(e)) => {
                tracing::warn!(code = e.code, message = %e.message, "gateway error push");
                if e.code == ErrorCode::Unauthorized as i32 {
                    self.conn = None;
                    self.published.send_replace(None);
                    self.emit(Event::LoggedOut {
                        account: self.creds.account.clone(),
                        reason: e.message,
                    })
                    .await;
                }
            }
            _ => {}
        }
    }

    async fn envelope(&mut self, env: pb::Envelope) {
        let id = env.id;
        if self.recent.contains(&id) {
            // Acked before but redelivered (the ack was lost with the connection).
            self.send_acks(vec![id]);
            return;
        }
        // A message decrypted before a crash is replayed from the vault.
        let waiting = self.inbox.as_ref().is_none_or(|inbox| inbox.contains(&id));
        if waiting
            && let Ok(Some(raw)) = self.store.read_extra(INBOX, &id.to_string()).await
            && let Ok(entry) = serde_json::from_slice::<InboxEntry>(&raw)
            && let Ok(data) = DataMessage::decode(&entry.data[..])
        {
            self.emit(Event::Message {
                envelope_id: id,
                from: entry.from,
                group: entry.group,
                message_id: entry.message_id,
                timestamp: entry.timestamp,
                data,
            })
            .await;
            return;
        }
        let kind = Kind::try_from(env.kind).unwrap_or(Kind::Unspecified);
        match kind {
            Kind::Receipt => {
                let receipt = env.receipt.unwrap_or_default();
                self.emit(Event::Receipt {
                    envelope_id: id,
                    from: env.from,
                    receipt,
                })
                .await;
            }
            Kind::GroupUpdate => {
                if let Some(g) = env.group_update {
                    self.group_changed(&g).await;
                    self.emit(Event::GroupUpdate {
                        envelope_id: id,
                        from: env.from,
                        group: g,
                    })
                    .await;
                } else {
                    self.ack(&[id]).await;
                }
            }
            Kind::Prekey | Kind::Message | Kind::Group => {
                let group = (kind == Kind::Group).then(|| env.group.clone());
                match self.decrypt(&env, kind).await {
                    Ok(Some(content)) => match content.body {
                        Some(CBody::Data(data)) => {
                            let entry = InboxEntry {
                                from: env.from.clone(),
                                group: group.clone(),
                                message_id: env.message_id.clone(),
                                timestamp: env.timestamp,
                                data: data.encode_to_vec(),
                            };
                            let sealed_entry = serde_json::to_vec(&entry).expect("serializes");
                            // Noted before the write: a commit that fails after all (a lost
                            // connection during COMMIT) must still be looked up on redelivery.
                            if let Some(inbox) = self.inbox.as_mut() {
                                inbox.insert(id);
                            }
                            if let Err(e) = self
                                .store
                                .commit(vec![(INBOX, id.to_string(), Some(sealed_entry))])
                                .await
                            {
                                self.redeliver_later(&format!(
                                    "cannot store a decrypted message: {e}"
                                ))
                                .await;
                                return;
                            }
                            self.store_backoff = FIRST_STORE_BACKOFF;
                            self.report_identity_changes().await;
                            self.emit(Event::Message {
                                envelope_id: id,
                                from: env.from,
                                group,
                                message_id: env.message_id,
                                timestamp: env.timestamp,
                                data,
                            })
                            .await;
                        }
                        Some(CBody::SenderKeyDistribution(skd)) => {
                            // A sender key only from a member of the group it names.
                            match self.is_member(&skd.group, &env.from).await {
                                Ok(true) => {}
                                Ok(false) => {
                                    // The pairwise session's step is kept; the key is not.
                                    tracing::warn!(group = %skd.group, "dropping a sender key from someone outside the group");
                                    if let Err(e) = self.store.commit(vec![]).await {
                                        self.redeliver_later(&format!(
                                            "cannot store a session: {e}"
                                        ))
                                        .await;
                                        return;
                                    }
                                    self.ack(&[id]).await;
                                    return;
                                }
                                Err(e) => {
                                    // The gateway cannot say now: left unacked (and the
                                    // session step undone), so it comes again rather than
                                    // losing a member's sender key.
                                    self.redeliver_later(&format!(
                                        "cannot check a sender key's group: {e}"
                                    ))
                                    .await;
                                    return;
                                }
                            }
                            let r = match SenderKeyDistributionMessage::try_from(
                                &skd.distribution_message[..],
                            ) {
                                Ok(m) => {
                                    process_sender_key_distribution_message(
                                        &addr(&env.from),
                                        &m,
                                        &mut self.store.sender_keys,
                                    )
                                    .await
                                }
                                Err(e) => Err(e),
                            };
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "bad sender key distribution");
                                self.store.rollback();
                            }
                            if let Err(e) = self.store.commit(vec![]).await {
                                self.redeliver_later(&format!("cannot store a sender key: {e}"))
                                    .await;
                                return;
                            }
                            self.report_identity_changes().await;
                            self.ack(&[id]).await;
                        }
                        None => self.ack(&[id]).await,
                    },
                    Ok(None) => self.ack(&[id]).await,
                    Err(Undecryptable::StoreUnavailable(reason)) => {
                        self.redeliver_later(&reason).await;
                    }
                    Err(Undecryptable::Invalid(reason)) => {
                        self.store.rollback();
                        tracing::warn!(envelope = id, %reason, "cannot decrypt envelope");
                        self.emit(Event::Undecryptable {
                            envelope_id: id,
                            from: env.from,
                            group,
                            reason,
                        })
                        .await;
                    }
                }
            }
            Kind::Unspecified => self.ack(&[id]).await,
        }
    }

    async fn report_identity_changes(&mut self) {
        for peer in self.store.take_identity_changes() {
            self.emit(Event::IdentityChanged { peer }).await;
        }
    }

    /// `Ok(None)` for a duplicate that needs no event.
    async fn decrypt(
        &mut self,
        env: &pb::Envelope,
        kind: Kind,
    ) -> Result<Option<Content>, Undecryptable> {
        let from = addr(&env.from);
        let plaintext = match kind {
            Kind::Group => group_decrypt(&env.ciphertext, &mut self.store.sender_keys, &from).await,
            _ => {
                let msg = if kind == Kind::Prekey {
                    PreKeySignalMessage::try_from(&env.ciphertext[..])
                        .map(CiphertextMessage::PreKeySignalMessage)
                } else {
                    SignalMessage::try_from(&env.ciphertext[..])
                        .map(CiphertextMessage::SignalMessage)
                }
                .map_err(|e| Undecryptable::Invalid(e.to_string()))?;
                let st = &mut self.store;
                message_decrypt(
                    &msg,
                    &from,
                    &mut st.sessions,
                    &mut st.identity,
                    &mut st.prekeys,
                    &st.signed,
                    &mut st.kyber,
                    &mut rand::rng(),
                )
                .await
            }
        };
        match plaintext {
            Ok(p) => {
                let p = zeroize::Zeroizing::new(p);
                Content::decode(&p[..])
                    .map(Some)
                    .map_err(|e| Undecryptable::Invalid(format!("undecodable content: {e}")))
            }
            Err(SignalProtocolError::DuplicatedMessage(..)) => Ok(None),
            // The vault's database, not the message, failed (vault/signal.rs).
            Err(SignalProtocolError::InvalidState("vault store", e)) => {
                Err(Undecryptable::StoreUnavailable(format!("vault store: {e}")))
            }
            Err(e) => Err(Undecryptable::Invalid(e.to_string())),
        }
    }
}

/// Uploads `bytes` in chunks (§13.2); `sha256` is the hash of `bytes`.
async fn put_blob(
    conn: &GatewayConn,
    bytes: &[u8],
    sha256: Vec<u8>,
) -> Result<String, InteropError> {
    let upload = uuid::Uuid::new_v4().to_string();
    let chunks: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(512 * 1024).collect()
    };
    let n = chunks.len();
    let mut offset = 0u64;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        let put = pb::BlobPut {
            upload: upload.clone(),
            offset,
            data: chunk.to_vec(),
            last,
            sha256: if last { sha256.clone() } else { Vec::new() },
        };
        offset += chunk.len() as u64;
        match conn.request(Body::BlobPut(put)).await? {
            Body::BlobStored(s) if last => return Ok(s.blob),
            Body::Ok(_) if !last => {}
            _ => return Err(InteropError::Unexpected),
        }
    }
    Err(InteropError::Unexpected)
}

/// Downloads a whole blob in chunks (§13.3), refusing one over `max` bytes.
async fn get_blob(conn: &GatewayConn, blob: &str, max: u64) -> Result<Vec<u8>, InteropError> {
    let mut data = Vec::new();
    let mut total = None;
    loop {
        let get = pb::BlobGet {
            blob: blob.to_owned(),
            offset: data.len() as u64,
            length: 512 * 1024,
        };
        match conn.request(Body::BlobGet(get)).await? {
            Body::BlobData(d) => {
                if d.total_size > max {
                    return Err(InteropError::TooLarge(max));
                }
                // The size must hold still, and no chunk may run past it.
                if *total.get_or_insert(d.total_size) != d.total_size
                    || (data.len() + d.data.len()) as u64 > d.total_size
                {
                    return Err(InteropError::Invalid(
                        "the blob's chunks do not match its announced size".into(),
                    ));
                }
                data.extend_from_slice(&d.data);
                if data.len() as u64 == d.total_size {
                    break;
                }
                if d.data.is_empty() {
                    return Err(InteropError::Invalid(
                        "the blob ended before its announced size".into(),
                    ));
                }
            }
            _ => return Err(InteropError::Unexpected),
        }
    }
    Ok(data)
}
