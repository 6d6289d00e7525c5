//! One interop account: an actor owning the account's Signal state and gateway connection.
//! It logs in (and reconnects with backoff), keeps prekeys topped up, encrypts outgoing content
//! (PQXDH sessions from fetched bundles, sender keys for groups), decrypts incoming envelopes, and
//! acks an envelope only after the consumer said it is handled. A decrypted message is sealed into
//! the vault together with the ratchet state that produced it, so a crash before the ack replays
//! it from the vault instead of losing it.
//!
//! The handle and the actor's state are here; the actor's work is split by subject: its loop and
//! commands (`actor`), pairwise sessions and prekeys (`sessions`), groups and sender keys
//! (`groups`), incoming envelopes and the inbox (`inbox`), logins (`login`) and blobs (`blobs`).

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
    conn::{Answer, GatewayAddr, GatewayConn, InteropError},
    keys::{self, BATCH, LOW_WATER},
    media,
    runtime::SignalRuntime,
};
use crate::signal_store::SignalStore;
use mib_vault::{Vault, VaultStore};
use mib_wire::{
    DEVICE_ID,
    content::{self, Content, DataMessage, content::Body as CBody},
    pb::{self, ErrorCode, Kind, stanza::Body},
};

mod actor;
mod blobs;
mod groups;
mod inbox;
mod login;
mod sessions;
mod x3dh;

use blobs::{get_blob, put_blob};
pub use login::{save_credentials, spawn_account, stored_account};

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
        /// Answered once the `Send` is on its way to the gateway, with its answer to wait for.
        reply: Reply<Answer>,
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

/// A command as it waits in the actor's queue.
struct Queued {
    /// When the caller asked: a command that waited long for its turn is logged as such (the
    /// actor was not stuck on it; others were ahead of it).
    since: tokio::time::Instant,
    command: Command,
}

impl Queued {
    fn new(command: Command) -> Box<Self> {
        Box::new(Self {
            since: tokio::time::Instant::now(),
            command,
        })
    }
}

impl Command {
    /// Whether the caller has stopped waiting for the answer (its [`COMMAND_TIMEOUT`] passed,
    /// or it was dropped). Such a command is not run: its caller already reported a transient
    /// failure and will ask again if it still wants it (a `Send` with the same `message_id`,
    /// which the gateway takes once), and running it late would only lengthen the queue for
    /// everyone behind it when the account is overloaded.
    fn caller_gone(&self) -> bool {
        match self {
            Command::Send { reply, .. } => reply.is_closed(),
            Command::SetProfile { reply, .. } | Command::ResetIdentity { reply } => {
                reply.is_closed()
            }
            Command::CreateGroup { reply, .. }
            | Command::UpdateGroup { reply, .. }
            | Command::GetGroup { reply, .. } => reply.is_closed(),
            Command::SessionInfo { reply, .. } => reply.is_closed(),
            Command::Stop => false,
        }
    }
}

/// How an account behaves, beyond where its gateway is.
#[derive(Clone, Debug)]
pub struct AccountOptions {
    /// How often a peer on classic X3DH has its bundle fetched again to see whether it can do
    /// PQXDH now (`account/x3dh.rs`).
    pub x3dh_recheck: Duration,
}

impl Default for AccountOptions {
    fn default() -> Self {
        Self {
            x3dh_recheck: x3dh::DEFAULT_RECHECK,
        }
    }
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
    /// Boxed: a channel allocates room for 32 items when it is made, and a command holds a
    /// whole message inline; every login has one.
    cmd: mpsc::Sender<Box<Queued>>,
    /// Acks travel apart from commands, unbounded: the consumer acks while the actor may be
    /// busy, and neither may block the other.
    acks: mpsc::UnboundedSender<u64>,
    /// The actor's current gateway connection: blob transfers and profile look-ups need no
    /// Signal state, so they run on the caller's task instead of stalling the actor.
    conn: watch::Receiver<Option<GatewayConn>>,
    /// What the actor is doing (logged when a command times out).
    doing: actor::SharedDoing,
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

/// Pushes taken together once one comes (see `Actor::envelopes`): half the delivery window, so
/// that the gateway has the other half to send while a run is committed.
const MAX_RUN: usize = DELIVERY_WINDOW as usize / 2;

macro_rules! ask {
    ($self:ident, $variant:ident { $($field:ident),* }) => {{
        let (reply, rx) = oneshot::channel();
        let asked = async {
            $self.cmd.send(Queued::new(Command::$variant { $($field,)* reply })).await.map_err(|_| InteropError::Disconnected)?;
            rx.await.map_err(|_| InteropError::Disconnected)?
        };
        tokio::time::timeout(COMMAND_TIMEOUT, asked).await.map_err(|_| {
            tracing::warn!(
                command = stringify!($variant),
                actor = %actor::Doing::describe(&$self.doing),
                queued = $crate::conn::queued(&$self.cmd),
                connected = $self.conn.borrow().as_ref().is_some_and(|c| !c.is_closed()),
                "the account did not finish a command in 180 s"
            );
            InteropError::CommandTimeout
        })?
    }};
}

impl AccountHandle {
    pub async fn send(
        &self,
        to: Target,
        message_id: String,
        data: DataMessage,
    ) -> Result<pb::Sent, InteropError> {
        // The actor encrypts, commits the session and writes the `Send`; the gateway's answer
        // is waited for here, so that the actor works on (other chats' messages, the envelopes
        // coming in) while the gateway stores this one.
        let answer = ask!(
            self,
            Send {
                to,
                message_id,
                data
            }
        )?;
        match answer.wait().await? {
            Body::Sent(s) => Ok(s),
            _ => Err(InteropError::Unexpected),
        }
    }
    /// Receipts and typing need no Signal state (they are not encrypted): they go on the
    /// connection without waiting for the actor, which may be busy with a chat's messages.
    pub async fn receipt(&self, to: String, receipt: pb::Receipt) -> Result<(), InteropError> {
        let body = Body::SendReceipt(pb::SendReceipt {
            to,
            receipt: Some(receipt),
        });
        self.connection().await?.request_ok(body).await
    }
    pub async fn typing(&self, to: Target, typing: bool) -> Result<(), InteropError> {
        let (to, group) = match to {
            Target::Account(a) => (a, String::new()),
            Target::Group(g) => (String::new(), g),
        };
        self.connection()
            .await?
            .request_ok(Body::SendTyping(pb::SendTyping { to, group, typing }))
            .await
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
    /// What the actor and its connection are doing: the step under way, the commands waiting
    /// for it, and what waits on the connection. For diagnosing an account that stopped moving.
    pub fn describe(&self) -> String {
        let conn = match self.conn.borrow().as_ref() {
            Some(c) if !c.is_closed() => c.describe(),
            Some(_) => "connection closed".to_owned(),
            None => "not connected".to_owned(),
        };
        format!(
            "{}, {} commands waiting, {}; {conn}",
            actor::Doing::describe(&self.doing),
            crate::conn::queued(&self.cmd),
            actor::Doing::flow(&self.doing),
        )
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
            let _ = self.cmd.send(Queued::new(Command::Stop)).await;
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
            doing: Default::default(),
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

struct Actor {
    creds: Credentials,
    gateway: GatewayAddr,
    store: SignalStore,
    conn: Option<(GatewayConn, mpsc::Receiver<Box<pb::Stanza>>)>,
    /// The connection as the handle sees it (for blob transfers and profile look-ups).
    published: watch::Sender<Option<GatewayConn>>,
    /// Never waits: the consumer calls back into this actor, so a full channel here could
    /// block both; the gateway's delivery window bounds what is in flight.
    /// Boxed, for the reason `AccountHandle::cmd` is.
    events: mpsc::UnboundedSender<Box<Event>>,
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
    /// [`AccountOptions::x3dh_recheck`].
    x3dh_recheck: Duration,
    /// The step under way, for the handle to log when a command times out.
    doing: actor::SharedDoing,
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

#[cfg(test)]
mod handle_tests {
    use super::*;

    /// A command the actor never finishes ends in its own error after [`COMMAND_TIMEOUT`], not
    /// in the gateway's "did not answer in time" (which sent the search for a stall to the
    /// gateway), and counts as transient.
    #[tokio::test(start_paused = true)]
    async fn a_command_the_actor_never_finishes_has_its_own_error() {
        let (handle, _keep_open, _acks) = AccountHandle::detached("+15550001000");
        let started = tokio::time::Instant::now();
        let e = handle
            .group("g1".into())
            .await
            .expect_err("no actor answers");
        assert!(matches!(e, InteropError::CommandTimeout), "{e:?}");
        assert!(e.is_transient());
        assert_eq!(started.elapsed(), COMMAND_TIMEOUT);
        assert!(!e.to_string().contains("gateway"), "{e}");
    }
}
