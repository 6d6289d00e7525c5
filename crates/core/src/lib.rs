//! The bridge core: decides what happens for each Matrix event and each interop event, and talks
//! to both sides and to the store only through its own traits (`MatrixConnector`, `Network`,
//! `store::PortalStore` and the rest). Modelled on mautrix-go bridgev2: one core, a Matrix
//! connector and a network connector.
//!
//! Matrix events arrive typed (ruma's event types, parsed by the Matrix side); the core links
//! ruma's identifiers and events only. It must never depend on either side, the store, the wire
//! protocol or the gateway, nor on an HTTP, SQL, Signal or protobuf crate
//! (`tests/architecture.rs` checks it).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use ruma::events::{
    AnyMessageLikeEvent, AnyStateEvent, AnySyncEphemeralRoomEvent, AnyTimelineEvent,
    room::{
        member::{MembershipState, RoomMemberEvent},
        message::{MessageType, Relation, RoomMessageEvent},
    },
};
use serde_json::Value;
use tokio::sync::Mutex;

use settings::{BridgeConfig, PermissionLevel};
use store::{PortalStore, StoreError, UserStore};

pub mod cluster;
pub mod commands;
pub mod contacts;
mod delivery;
mod ghost;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod metrics;
pub mod model;
pub mod msgconv;
pub mod network;
mod portal;
pub mod provisioning;
pub mod requests;
pub mod settings;
mod space;
pub mod store;
#[cfg(test)]
pub(crate) mod tests;
pub mod types;

pub use commands::CommandOutcome;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The homeserver could not be reached or failed (network error, 5xx): try again.
    #[error("Matrix side: {0}")]
    Matrix(String),
    /// The homeserver refused the request (a 4xx other than 429) or the request cannot be
    /// built: the same request would be refused again.
    #[error("the homeserver refused: {0}")]
    MatrixRefused(String),
    /// The homeserver rate-limited the bridge (429 / `M_LIMIT_EXCEEDED`).
    #[error("rate-limited by the homeserver: {message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The network refused; retrying will not help.
    #[error("interop network: {0}")]
    Network(String),
    #[error("key vault: {0}")]
    Vault(String),
    /// Something the event needs is coming but not there yet (a login that is still
    /// connecting, a gateway that is down): wait and try again, longer than for other errors.
    #[error("not ready yet: {0}")]
    NotReady(String),
    /// An encrypted event whose room key has not arrived (yet).
    #[error("the room key has not arrived")]
    MissingRoomKey,
    /// An edit, reaction or deletion that arrived before the message it is about (out-of-order
    /// delivery, a restart): it is set aside and tried again when later messages have arrived.
    #[error("the message {0} it refers to has not arrived yet")]
    TargetNotYet(String),
}

/// What to do with an event whose handling failed: every error says which one applies, and
/// the one retry layer (the queue's room lanes, the interop event pump) acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryClass {
    /// Try again with backoff, a bounded number of times.
    Transient,
    /// Try again not before this long (a rate limit's `retry_after_ms`).
    After(Duration),
    /// Waits for something that comes by itself (a login connecting, a room key): try again,
    /// for longer than transient errors.
    Waiting,
    /// Set aside (not holding up later events) until the message it refers to has arrived,
    /// for a bounded time.
    UntilTarget,
    /// Trying again cannot help: report it and move on.
    Permanent,
}

impl BridgeError {
    pub fn retry_class(&self) -> RetryClass {
        match self {
            BridgeError::Store(e) if e.is_unavailable() => RetryClass::Waiting,
            BridgeError::Matrix(_) | BridgeError::Store(_) | BridgeError::Vault(_) => {
                RetryClass::Transient
            }
            BridgeError::RateLimited { retry_after, .. } => match retry_after {
                Some(d) => RetryClass::After(*d),
                None => RetryClass::Transient,
            },
            BridgeError::NotReady(_) | BridgeError::MissingRoomKey => RetryClass::Waiting,
            BridgeError::TargetNotYet(_) => RetryClass::UntilTarget,
            BridgeError::MatrixRefused(_) | BridgeError::Network(_) => RetryClass::Permanent,
        }
    }

    /// Whether handling the event again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry_class() != RetryClass::Permanent
    }

    /// Whether the event waits for something that comes by itself (a login connecting): its
    /// room's lane keeps trying for longer before giving up.
    pub fn is_waiting(&self) -> bool {
        self.retry_class() == RetryClass::Waiting
    }
}

/// What the core needs from the Matrix side.
#[async_trait]
pub trait MatrixConnector: Send + Sync {
    /// The bot's user id.
    fn bot_mxid(&self) -> &str;
    /// Whether `mxid` is one of our ghosts.
    fn is_ghost(&self, mxid: &str) -> bool;
    async fn join(&self, room_id: &str, as_user: &str) -> Result<(), BridgeError>;
    async fn leave(&self, room_id: &str, as_user: &str) -> Result<(), BridgeError>;
    /// Sends an `m.notice` with a plain body and an HTML body; returns the event id. The same
    /// `txn_id` from the same user is applied once.
    async fn send_notice(
        &self,
        room_id: &str,
        as_user: &str,
        body: &str,
        html: &str,
        txn_id: &str,
    ) -> Result<String, BridgeError>;
    async fn joined_members(
        &self,
        room_id: &str,
        as_user: &str,
    ) -> Result<Vec<String>, BridgeError>;
    /// Registers a ghost (idempotent) and sets its display name; returns its user id.
    async fn ensure_ghost(&self, localpart: &str, displayname: &str)
    -> Result<String, BridgeError>;
    /// Sets a user's avatar (an mxc URI; empty removes it).
    async fn set_avatar(&self, user: &str, mxc: &str) -> Result<(), BridgeError>;
    /// Creates a portal's room as the bot; returns the room id.
    async fn create_room(&self, room: types::NewRoom) -> Result<String, BridgeError>;
    async fn invite(&self, room_id: &str, by: &str, invitee: &str) -> Result<(), BridgeError>;
    /// Removes `target` from the room, as `by`.
    async fn kick(
        &self,
        room_id: &str,
        by: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), BridgeError>;
    /// Sends a message-like event (a message, an edit, a reaction); the same `txn_id` from the
    /// same user is applied once. `ts` (ms since the epoch) is the time it was sent on the
    /// network (timestamp massaging).
    async fn send_message(
        &self,
        room_id: &str,
        as_user: &str,
        content: ruma::events::AnyMessageLikeEventContent,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError>;
    /// Sends an event of a type ruma does not model (`com.beeper.message_send_status`), as
    /// [`MatrixConnector::send_message`] does.
    async fn send_event(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        content: Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError>;
    async fn send_state(
        &self,
        room_id: &str,
        as_user: &str,
        content: ruma::events::AnyStateEventContent,
        state_key: &str,
    ) -> Result<String, BridgeError>;
    /// Sets state of a type ruma does not model (`com.beeper.disappearing_timer`).
    async fn send_state_json(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String, BridgeError>;
    /// The content of one state event of the room, as `as_user` sees it (`None`: there is none).
    async fn state_json(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>, BridgeError>;
    async fn redact(&self, room_id: &str, as_user: &str, event_id: &str)
    -> Result<(), BridgeError>;
    async fn read_receipt(
        &self,
        room_id: &str,
        as_user: &str,
        event_id: &str,
    ) -> Result<(), BridgeError>;
    async fn typing(&self, room_id: &str, as_user: &str, typing: bool) -> Result<(), BridgeError>;
    async fn upload(
        &self,
        as_user: &str,
        data: Vec<u8>,
        mimetype: &str,
        filename: Option<&str>,
    ) -> Result<String, BridgeError>;
    /// Downloads media by mxc URI (authenticated media); returns the bytes and content type.
    async fn download(&self, mxc: &str) -> Result<(Vec<u8>, Option<String>), BridgeError>;
    /// Uploads media for a room: where the content finds it (a plain `url`, or an encrypted
    /// `file` in encrypted rooms).
    async fn upload_for_room(
        &self,
        room_id: &str,
        as_user: &str,
        data: Vec<u8>,
        mimetype: &str,
        filename: &str,
    ) -> Result<ruma::events::room::MediaSource, BridgeError>;
    /// Downloads the media of a message (`url`, or `file` with decryption and hash check).
    async fn download_content(
        &self,
        source: &ruma::events::room::MediaSource,
    ) -> Result<(Vec<u8>, Option<String>), BridgeError>;
    /// Whether the room is end-to-end encrypted.
    async fn is_encrypted(&self, room_id: &str) -> bool;
    /// The room was created with encryption on.
    async fn mark_encrypted(&self, room_id: &str);
    /// Forgets the bridge's outgoing room key of a room (its portal ended).
    async fn discard_room_key(&self, _room_id: &str) {}
}

/// Receives Matrix events in order from the durable queue, typed (the Matrix side parses them;
/// one that does not parse goes to [`MatrixEventHandler::malformed`]).
#[async_trait]
pub trait MatrixEventHandler: Send + Sync {
    async fn handle_matrix_event(&self, event: &AnyTimelineEvent) -> Result<(), BridgeError>;
    /// Typing notifications and receipts in `room_id`.
    async fn handle_ephemeral(
        &self,
        _room_id: &str,
        _event: &AnySyncEphemeralRoomEvent,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    /// An encrypted event the bridge cannot read.
    async fn undecryptable(
        &self,
        _room_id: &str,
        _sender: &str,
        _reason: &str,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    /// A room event of `event_type` that is not valid Matrix (a message without a body, say):
    /// its sender is told in the room when it was a message in a portal.
    async fn malformed(
        &self,
        _room_id: &str,
        _sender: &str,
        _event_type: &str,
        _reason: &str,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    /// An event the bridge gave up on (a permanent error, or its retries ran out): its sender
    /// is told in the room.
    async fn not_handled(
        &self,
        _event: &AnyTimelineEvent,
        _error: &BridgeError,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
}

/// Matrix event types whose failure is told to their sender.
const MESSAGE_TYPES: &[&str] = &[
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.reaction",
    "org.matrix.msc3381.poll.start",
    "org.matrix.msc3381.poll.response",
    "org.matrix.msc3381.poll.end",
];

/// Static facts the core needs.
#[derive(Clone, Debug)]
pub struct BridgeSettings {
    pub bridge: BridgeConfig,
    pub homeserver_domain: String,
    pub username_template: String,
    /// Create portals with encryption on.
    pub encryption_default: bool,
    /// Refuse to bridge unencrypted rooms.
    pub encryption_require: bool,
}

tokio::task_local! {
    /// The event being handled on this task (a queued Matrix event, an interop envelope).
    static HANDLING: EventScope;
}

struct EventScope {
    key: String,
    notices: std::sync::atomic::AtomicU32,
}

/// Runs `f` as the handling of the event named `key`: the notices it sends get transaction ids
/// derived from `key` and their order, so handling the same event again after a failure or a
/// crash sends each notice once (the homeserver drops a repeated transaction id).
pub async fn handling_event<F: std::future::Future>(key: String, f: F) -> F::Output {
    HANDLING
        .scope(
            EventScope {
                key,
                notices: Default::default(),
            },
            f,
        )
        .await
}

/// The transaction id of the next notice into `room`: derived inside [`handling_event`],
/// random outside it.
pub(crate) fn notice_txn(room: &str) -> String {
    HANDLING
        .try_with(|s| {
            let n = s.notices.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            portal::stable_id(&["notice", &s.key, room, &n.to_string()])
        })
        .unwrap_or_else(|_| uuid::Uuid::new_v4().to_string())
}

/// Held while one chat's portal room is created.
pub(crate) type ChatLock = Arc<Mutex<()>>;

pub struct Bridge {
    pub(crate) matrix: Arc<dyn MatrixConnector>,
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) portals: Arc<dyn PortalStore>,
    pub(crate) network: Arc<dyn network::Network>,
    /// Message requests and their held messages.
    pub(crate) requests: Arc<dyn requests::RequestStore>,
    /// Small facts by key (the answer ids of polls started on Matrix).
    pub(crate) kv: Arc<dyn store::KvStore>,
    pub(crate) settings: BridgeSettings,
    /// When each contact's profile was last fetched.
    pub(crate) ghosts_seen: Mutex<HashMap<String, Instant>>,
    /// One lock per (receiver, chat) while its portal room is created.
    pub(crate) portal_locks: Mutex<HashMap<(String, String), ChatLock>>,
    pub(crate) typing_state: Mutex<HashMap<String, bool>>,
    /// Rooms the bot leaves once it has answered there (after `delete-portal`).
    pub(crate) leave_after: Mutex<HashSet<String>>,
    /// Network look-ups made for the homeserver's user queries.
    pub(crate) user_lookups: Mutex<ghost::LookupLimit>,
    pub(crate) metrics: metrics::Metrics,
    /// With several workers on one database: this worker's leases.
    pub(crate) cluster: std::sync::OnceLock<Arc<cluster::Cluster>>,
    /// Delivery receipts on their way to the network, one per chat at a time.
    pub(crate) delivery_receipts: delivery::DeliveryReceipts,
}

/// The stores the core keeps its state in (one database behind them all, as a rule).
pub struct Stores {
    pub users: Arc<dyn UserStore>,
    pub portals: Arc<dyn PortalStore>,
    pub requests: Arc<dyn requests::RequestStore>,
    pub kv: Arc<dyn store::KvStore>,
}

impl Bridge {
    pub fn new(
        matrix: Arc<dyn MatrixConnector>,
        stores: Stores,
        network: Arc<dyn network::Network>,
        settings: BridgeSettings,
        metrics: metrics::Metrics,
    ) -> Self {
        let Stores {
            users,
            portals,
            requests,
            kv,
        } = stores;
        Self {
            matrix,
            users,
            portals,
            network,
            requests,
            kv,
            settings,
            ghosts_seen: Mutex::new(HashMap::new()),
            portal_locks: Mutex::new(HashMap::new()),
            typing_state: Mutex::new(HashMap::new()),
            leave_after: Mutex::new(HashSet::new()),
            user_lookups: Mutex::new(ghost::LookupLimit::new()),
            metrics,
            cluster: std::sync::OnceLock::new(),
            delivery_receipts: delivery::DeliveryReceipts::default(),
        }
    }

    /// Makes this bridge one worker of several: logins run where their lease is (see
    /// [`cluster`]).
    pub fn join_cluster(&self, cluster: Arc<cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Before a new login starts here: with several workers, takes its lease; refuses when
    /// another worker runs the user's login.
    pub(crate) async fn claim_login(&self, mxid: &str) -> Result<(), BridgeError> {
        let Some(c) = self.cluster.get() else {
            return Ok(());
        };
        if c.claim_login(mxid).await? {
            Ok(())
        } else {
            Err(BridgeError::NotReady(
                "your login is running in another worker of the bridge; try again in a few seconds"
                    .into(),
            ))
        }
    }

    /// After a logout: with several workers, lets the login's lease go.
    pub(crate) async fn release_login(&self, mxid: &str) {
        if let Some(c) = self.cluster.get() {
            c.release_login(mxid).await;
        }
    }

    /// Connects every stored login (at start-up); failures are reported and retried by the account.
    pub async fn reconnect_logins(&self) -> Result<usize, BridgeError> {
        let logins = self.portals.all_logins().await?;
        for (mxid, _account) in &logins {
            if let Err(e) = self.network.reconnect(mxid).await {
                tracing::warn!(user = %mxid, error = %e, "cannot reconnect a login");
            }
        }
        Ok(logins.len())
    }

    pub fn permission_of(&self, mxid: &str) -> PermissionLevel {
        self.settings.bridge.permission_of(mxid)
    }

    async fn on_bot_invite(
        &self,
        room_id: &str,
        inviter: &str,
        is_direct: bool,
    ) -> Result<(), BridgeError> {
        let bot = self.matrix.bot_mxid().to_owned();
        let level = self.permission_of(inviter);
        self.matrix.join(room_id, &bot).await?;
        if level < PermissionLevel::Commands {
            tracing::info!(
                room_id,
                inviter,
                ?level,
                "refusing invite from a user without permission"
            );
            let msg =
                "You are not allowed to use this bridge. Ask the homeserver admin for access.";
            self.reply(room_id, msg, msg).await?;
            self.matrix.leave(room_id, &bot).await?;
            return Ok(());
        }
        let members = self.matrix.joined_members(room_id, &bot).await?;
        let only_us = members.iter().all(|m| m == &bot || m == inviter);
        if is_direct || only_us {
            self.users.set_management_room(inviter, room_id).await?;
            tracing::info!(room_id, user = inviter, "management room set");
            let body = "Hello, I am the interop bridge bot. This room is now your management room: \
                        send commands here without a prefix. Send `help` to see what you can do.";
            let html = "Hello, I am the interop bridge bot. This room is now your management room: \
                        send commands here without a prefix. Send <code>help</code> to see what you can do.";
            self.reply(room_id, body, html).await?;
        } else {
            let prefix = &self.settings.bridge.command_prefix;
            let body = format!(
                "Hello! Commands in this room start with `{prefix}`, e.g. `{prefix} help`."
            );
            let html = format!(
                "Hello! Commands in this room start with <code>{prefix}</code>, e.g. <code>{prefix} help</code>."
            );
            self.reply(room_id, &body, &html).await?;
        }
        Ok(())
    }

    /// A notice from the bot with a plain and an HTML body.
    pub(crate) async fn reply(
        &self,
        room_id: &str,
        body: &str,
        html: &str,
    ) -> Result<(), BridgeError> {
        let bot = self.matrix.bot_mxid().to_owned();
        self.matrix
            .send_notice(room_id, &bot, body, html, &notice_txn(room_id))
            .await
            .map(|_| ())
    }

    async fn on_text(&self, room_id: &str, sender: &str, body: &str) -> Result<(), BridgeError> {
        let prefix = &self.settings.bridge.command_prefix;
        let in_management = self.users.management_room(sender).await?.as_deref() == Some(room_id);
        if in_management
            && !body.starts_with(prefix.as_str())
            && let Some(outcome) = self.continue_pending(room_id, sender, body.trim()).await
        {
            self.reply(room_id, &outcome.body, &outcome.html).await?;
            return Ok(());
        }
        let command = if let Some(rest) = body.strip_prefix(prefix.as_str()) {
            if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
                return Ok(());
            }
            Some(rest.trim())
        } else if in_management {
            Some(body.trim())
        } else {
            None
        };
        match command {
            Some(cmd) => {
                let outcome = self.run_command(room_id, sender, cmd).await;
                let bot = self.matrix.bot_mxid().to_owned();
                self.reply(room_id, &outcome.body, &outcome.html).await?;
                if self.leave_after.lock().await.remove(room_id) {
                    self.matrix.leave(room_id, &bot).await?;
                }
                Ok(())
            }
            // Not a command: portal messages are bridged by the portal loop (not in this room).
            None => Ok(()),
        }
    }
}

#[async_trait]
impl MatrixEventHandler for Bridge {
    #[tracing::instrument(skip_all, fields(event_type, room_id))]
    async fn handle_matrix_event(&self, ev: &AnyTimelineEvent) -> Result<(), BridgeError> {
        let room_id = ev.room_id().as_str();
        let sender = ev.sender().as_str();
        tracing::Span::current()
            .record("event_type", ev.event_type().to_string())
            .record("room_id", room_id);
        let bot = self.matrix.bot_mxid();
        let message = match ev {
            AnyTimelineEvent::State(state) => {
                if let AnyStateEvent::RoomMember(RoomMemberEvent::Original(m)) = state
                    && m.state_key == bot
                    && m.content.membership == MembershipState::Invite
                {
                    let is_direct = m.content.is_direct.unwrap_or(false);
                    return self.on_bot_invite(room_id, sender, is_direct).await;
                }
                if !matches!(
                    state,
                    AnyStateEvent::RoomMember(_)
                        | AnyStateEvent::RoomName(_)
                        | AnyStateEvent::RoomAvatar(_)
                ) {
                    return Ok(());
                }
                let portal = match state {
                    AnyStateEvent::RoomMember(m) => {
                        self.portal_for_member(room_id, sender, m.state_key().as_str())
                            .await?
                    }
                    _ => self.portal_in(room_id, sender).await?,
                };
                return match portal {
                    Some(portal) => portal.matrix_state(state).await,
                    None => Ok(()),
                };
            }
            AnyTimelineEvent::MessageLike(m) => m,
        };
        if !matches!(
            message,
            AnyMessageLikeEvent::RoomMessage(_)
                | AnyMessageLikeEvent::Reaction(_)
                | AnyMessageLikeEvent::RoomRedaction(_)
                | AnyMessageLikeEvent::Sticker(_)
                | AnyMessageLikeEvent::UnstablePollStart(_)
                | AnyMessageLikeEvent::UnstablePollResponse(_)
                | AnyMessageLikeEvent::UnstablePollEnd(_)
        ) || sender == bot
            || self.matrix.is_ghost(sender)
        {
            return Ok(());
        }
        let command = command_text(message);
        if let Some(portal) = self.portal_in(room_id, sender).await? {
            // Commands work in portals too; everything else is bridged.
            let prefix = &self.settings.bridge.command_prefix;
            if let Some((body, _)) = command
                && body.starts_with(prefix.as_str())
            {
                return self.on_text(room_id, sender, body).await;
            }
            return portal.matrix_event(message).await;
        }
        match command {
            Some((body, false)) => self.on_text(room_id, sender, body).await,
            _ => Ok(()),
        }
    }

    async fn handle_ephemeral(
        &self,
        room_id: &str,
        ev: &AnySyncEphemeralRoomEvent,
    ) -> Result<(), BridgeError> {
        self.on_ephemeral(room_id, ev).await
    }

    async fn undecryptable(
        &self,
        room_id: &str,
        sender: &str,
        reason: &str,
    ) -> Result<(), BridgeError> {
        if sender == self.matrix.bot_mxid() || self.matrix.is_ghost(sender) {
            return Ok(());
        }
        tracing::warn!(room_id, %reason, "undecryptable event");
        let text = format!(
            "{sender}: the bridge could not decrypt your message ({reason}). The usual causes: your client does not \
             send room keys to unverified devices (verify the bridge's device, or allow unverified devices), or \
             it did not know the bridge's device yet. Please send the message again."
        );
        self.notice(room_id, &text).await
    }

    async fn malformed(
        &self,
        room_id: &str,
        sender: &str,
        event_type: &str,
        reason: &str,
    ) -> Result<(), BridgeError> {
        if !MESSAGE_TYPES.contains(&event_type)
            || sender == self.matrix.bot_mxid()
            || self.matrix.is_ghost(sender)
            || self.portals.portal_by_room(room_id).await?.is_none()
        {
            return Ok(());
        }
        let text =
            format!("{sender}: your message was not bridged: it is not valid Matrix ({reason})");
        self.notice(room_id, &text).await
    }

    async fn not_handled(
        &self,
        ev: &AnyTimelineEvent,
        error: &BridgeError,
    ) -> Result<(), BridgeError> {
        let sender = ev.sender().as_str();
        let room = ev.room_id().as_str();
        let is_message = matches!(ev, AnyTimelineEvent::MessageLike(_))
            && MESSAGE_TYPES.contains(&ev.event_type().to_string().as_str());
        if !is_message
            || sender == self.matrix.bot_mxid()
            || self.matrix.is_ghost(sender)
            || self.portals.portal_by_room(room).await?.is_none()
        {
            return Ok(());
        }
        let text = format!("{sender}: your message was not bridged: {error}");
        self.not_bridged(room, ev.event_id().as_str(), portal::Status::Failed, &text)
            .await
    }
}

/// The body of a plain-text message, and whether it is an edit: what a command is read from.
fn command_text(ev: &AnyMessageLikeEvent) -> Option<(&str, bool)> {
    let AnyMessageLikeEvent::RoomMessage(RoomMessageEvent::Original(m)) = ev else {
        return None;
    };
    let MessageType::Text(t) = &m.content.msgtype else {
        return None;
    };
    let edit = matches!(m.content.relates_to, Some(Relation::Replacement(_)));
    Some((t.body.as_str(), edit))
}

#[async_trait]
impl network::NetEventSink for Bridge {
    async fn handle_network_event(
        &self,
        mxid: &str,
        event: &network::NetEvent,
    ) -> Result<(), BridgeError> {
        self.on_network_event(mxid, event).await
    }

    async fn network_event_failed(
        &self,
        mxid: &str,
        event: &network::NetEvent,
        error: &BridgeError,
    ) {
        let network::NetEvent::Message { from, group, .. } = event else {
            return;
        };
        let chat = group.as_deref().unwrap_or(from);
        let room = match self.portals.portal(mxid, chat).await {
            Ok(Some(p)) => p.room_id.map(String::from),
            _ => None,
        };
        let Some(room) = room else { return };
        self.metrics
            .not_bridged
            .get_or_create(&metrics::ReasonLabels {
                reason: "interop_failed".to_owned(),
            })
            .inc();
        let text = format!("A message from {from} could not be bridged: {error}");
        if let Err(e) = self.notice(&room, &text).await {
            tracing::warn!(error = %e, "cannot report a message that was not bridged");
        }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
