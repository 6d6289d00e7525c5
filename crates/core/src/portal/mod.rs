//! Portals: one Matrix room per interop chat of a login (a group's room shared by the logins
//! in it, `shared`), ghosts for contacts, and messages in both directions through the message
//! map (replies, edits, reactions, deletions, receipts).
//!
//! Here: ghosts and creating a portal's room. The two directions are `incoming` (network to
//! Matrix) and `outgoing` (Matrix to network).

use std::{collections::BTreeMap, sync::Arc};

use ruma::{
    OwnedEventId,
    events::room::message::{
        FormattedBody, MessageType, RoomMessageEventContent, TextMessageEventContent,
    },
};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{
    Bridge, BridgeError,
    model::{
        Body as D, Delete, Edit, Location, MAX_POLL_OPTIONS, Media, MediaKind, Message, Poll,
        PollEnd, PollVote, Quote, Reaction, Text,
    },
    msgconv,
    network::{GroupInfo, NetAccount, NetError, NetEvent, NetTarget},
    types::{BridgeInfo, MappedMessage, NewRoom, Portal, PortalKind, PowerLevels},
};
use crate::settings::PermissionLevel;

impl From<NetError> for BridgeError {
    fn from(e: NetError) -> Self {
        if e.is_transient() {
            BridgeError::NotReady(e.to_string())
        } else {
            BridgeError::Network(e.to_string())
        }
    }
}

mod chatinfo;
pub(crate) mod disappear;
mod incoming;
mod outgoing;
mod shared;

/// The number of per-chat creation locks kept before the unused ones are dropped.
const MAX_IDLE_PORTAL_LOCKS: usize = 1024;

/// The power level of a group portal's users (each user with a login, in a shared one): above
/// the ghosts' 50, so they can kick a contact's ghost.
const GROUP_OWNER_LEVEL: i64 = 75;

/// The longest poll question or option bridged, in characters (longer ones are cut short).
const MAX_POLL_TEXT: usize = 500;

impl Bridge {
    fn poll_answers_key(room: &str, event_id: &str) -> String {
        format!("poll_answers:{room}:{event_id}")
    }

    /// The answer ids of a poll started on Matrix (event `event_id`), in the order of the
    /// network's options; `None` for a poll from the network, whose answer ids are the indexes.
    pub(crate) async fn poll_answer_ids(
        &self,
        room: &str,
        event_id: &str,
    ) -> Result<Option<Vec<String>>, BridgeError> {
        let Some(raw) = self
            .kv
            .kv_get(&Self::poll_answers_key(room, event_id))
            .await?
        else {
            return Ok(None);
        };
        serde_json::from_str(&raw).map(Some).map_err(|e| {
            crate::store::StoreError::failed(format!("stored poll answers are corrupt: {e}")).into()
        })
    }

    /// Keeps the answer ids of a poll started on Matrix, for the votes that come later.
    pub(crate) async fn set_poll_answer_ids(
        &self,
        room: &str,
        event_id: &str,
        ids: &[String],
    ) -> Result<(), BridgeError> {
        let raw = serde_json::to_string(ids).expect("strings serialize");
        Ok(self
            .kv
            .kv_set(&Self::poll_answers_key(room, event_id), &raw)
            .await?)
    }
}

/// One portal at work: its stored record, its room, and the bridge it belongs to (bridgev2's
/// `Portal`). What happens in a portal is a method of this: a Matrix event in its room
/// ([`PortalRef::matrix_event`], [`PortalRef::matrix_state`], [`PortalRef::ephemeral`]), a
/// message or a group change from the network ([`PortalRef::network_message`],
/// [`PortalRef::group_update`]).
///
/// A portal's events are handled one at a time in order: Matrix events in its room's lane of
/// the durable queue, network events in its login's event pump. Nothing is kept here between
/// events: the store is the source of truth.
pub(crate) struct PortalRef<'a> {
    pub(crate) bridge: &'a Bridge,
    pub(crate) record: Portal,
    /// The portal's room (every portal at work has one).
    pub(crate) room: String,
}

impl<'a> PortalRef<'a> {
    /// `None` for a portal whose room is not created yet.
    pub(crate) fn new(bridge: &'a Bridge, record: Portal) -> Option<Self> {
        let room = record.room_id.as_ref()?.to_string();
        Some(Self {
            bridge,
            record,
            room,
        })
    }

    /// Where the portal sends: the contact (a DM) or the group.
    pub(crate) fn target(&self) -> NetTarget {
        match self.record.kind {
            PortalKind::Dm => NetTarget::Contact(self.record.chat_id.clone()),
            PortalKind::Group => NetTarget::Group(self.record.chat_id.clone()),
        }
    }

    /// A notice from the bot in the portal.
    pub(crate) async fn notice(&self, text: &str) -> Result<(), BridgeError> {
        self.bridge.notice(&self.room, text).await
    }

    /// A Matrix event of the portal that was not bridged (see [`Bridge::not_bridged`]).
    async fn not_bridged(
        &self,
        event_id: &str,
        why: Status,
        text: &str,
    ) -> Result<(), BridgeError> {
        self.bridge
            .not_bridged(&self.room, event_id, why, text)
            .await
    }
}

/// A Matrix identifier the bridge was given (a user's, a room's), checked.
fn matrix_id<T>(raw: &str) -> Result<T, BridgeError>
where
    T: for<'s> TryFrom<&'s str, Error = ruma::IdParseError>,
{
    T::try_from(raw)
        .map_err(|e| BridgeError::MatrixRefused(format!("{raw:?} is not a valid id: {e}")))
}

/// A stable id for what we send, so a retried send is deduplicated downstream.
pub(crate) fn stable_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

fn reaction_part(author: &str, emoji: &str) -> String {
    format!("reaction:{author}:{emoji}")
}

impl Bridge {
    /// The portal of `chat` for `receiver`, with its room created when missing.
    pub(crate) async fn ensure_portal(
        &self,
        receiver: &str,
        acc: &Arc<dyn NetAccount>,
        chat: &NetTarget,
        group: Option<&GroupInfo>,
    ) -> Result<PortalRef<'_>, BridgeError> {
        let (chat_id, kind) = match chat {
            NetTarget::Contact(a) => (a.clone(), PortalKind::Dm),
            NetTarget::Group(g) => (g.clone(), PortalKind::Group),
        };
        // Fast path without any lock: the portal exists.
        if let Some(p) = self.portals.portal(receiver, &chat_id).await?
            && let Some(p) = PortalRef::new(self, p)
        {
            return Ok(p);
        }
        // One creator per chat; other chats are not held up. A group's portal may be shared by
        // several logins: one creator per group, whoever's login it is.
        let shared = kind == PortalKind::Group && self.settings.bridge.shared_group_portals;
        let lock = self
            .portal_lock(if shared { "" } else { receiver }, &chat_id)
            .await;
        let _guard = lock.lock().await;
        if let Some(p) = self.portals.portal(receiver, &chat_id).await?
            && let Some(p) = PortalRef::new(self, p)
        {
            return Ok(p);
        }
        if shared && let Some(p) = self.join_shared_group(receiver, &chat_id).await? {
            return Ok(p);
        }
        let bot = self.matrix.bot_mxid().to_owned();
        let me = acc.account_id().to_owned();
        // A group first seen through a message: ask the network what it is.
        let fetched = match (chat, group) {
            (NetTarget::Group(id), None) => lookup_group(acc, id).await?,
            _ => None,
        };
        let group = group.or(fetched.as_ref());
        let (name, members) = match (chat, group) {
            (NetTarget::Contact(a), _) => (String::new(), vec![a.clone()]),
            (NetTarget::Group(_), Some(g)) => (g.name.clone(), g.members.clone()),
            (NetTarget::Group(_), None) => (String::new(), vec![]),
        };
        let mut ghosts = Vec::new();
        for m in members.iter().filter(|m| **m != me) {
            ghosts.push(self.ghost(m, Some(acc)).await?);
        }
        let mut room = portal_room(&bot, receiver, &chat_id, kind, &name, &ghosts);
        let avatar_blob = group.map(|g| g.avatar_blob.clone()).unwrap_or_default();
        let avatar_mxc = match self.avatar_to_matrix(acc, &avatar_blob).await {
            Ok(mxc) => mxc,
            Err(e) => {
                tracing::warn!(error = %e, "cannot copy a group's avatar");
                String::new()
            }
        };
        room.avatar_mxc = (!avatar_mxc.is_empty()).then(|| avatar_mxc.clone());
        let encrypted = self.settings.encryption_default || self.settings.encryption_require;
        room.encrypted = encrypted;
        let room_id = self.matrix.create_room(room).await?;
        if encrypted {
            self.matrix.mark_encrypted(&room_id).await;
        }
        for g in &ghosts {
            self.matrix.join(&room_id, g).await?;
        }
        let portal = Portal {
            receiver: matrix_id(receiver)?,
            chat_id,
            kind,
            room_id: Some(matrix_id(&room_id)?),
            name,
            relay: None,
            avatar_blob: if avatar_mxc.is_empty() {
                String::new()
            } else {
                avatar_blob
            },
            avatar_mxc,
        };
        self.portals.save_portal(&portal).await?;
        tracing::info!(room_id, kind = ?kind, "portal created");
        self.add_to_space(receiver, &room_id).await;
        Ok(PortalRef {
            bridge: self,
            record: portal,
            room: room_id,
        })
    }

    /// The lock held while the portal of (`receiver`, `chat_id`) is created.
    async fn portal_lock(&self, receiver: &str, chat_id: &str) -> crate::ChatLock {
        let mut locks = self.portal_locks.lock().await;
        // Locks nobody holds (only the map has them) go, so the map stays small.
        if locks.len() >= MAX_IDLE_PORTAL_LOCKS {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks
            .entry((receiver.to_owned(), chat_id.to_owned()))
            .or_default()
            .clone()
    }

    pub(crate) async fn notice(&self, room: &str, text: &str) -> Result<(), BridgeError> {
        self.reply(room, text, &msgconv::escape(text)).await
    }

    /// A Matrix event that was not bridged: a notice (`bridge.message_error_notices`) and a
    /// failure status (`bridge.message_status_events`).
    pub(super) async fn not_bridged(
        &self,
        room: &str,
        event_id: &str,
        why: Status,
        text: &str,
    ) -> Result<(), BridgeError> {
        self.metrics
            .not_bridged
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: why.reason().to_owned(),
            })
            .inc();
        if self.settings.bridge.message_status_events {
            self.send_status(room, event_id, Some((why, text))).await?;
        }
        if self.settings.bridge.message_error_notices {
            self.notice(room, text).await?;
        }
        Ok(())
    }
}

/// Why a Matrix event was not bridged, in message-status terms.
#[derive(Clone, Copy)]
pub(crate) enum Status {
    /// The sender may not send here (no login, no relay).
    NoPermission,
    /// The content cannot be bridged.
    Unsupported,
    /// The network refused it.
    NetworkError,
    /// The bridge gave up on it (a permanent error, or its retries ran out).
    Failed,
}

impl Status {
    /// Failures that sending again will not fix are `FAIL`; a network refusal may pass later.
    fn status(self) -> &'static str {
        match self {
            Status::NetworkError => "RETRIABLE",
            _ => "FAIL",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::NoPermission => "m_no_permission",
            Status::Unsupported => "m_unsupported",
            Status::NetworkError => "m_foreign_network_error",
            Status::Failed => "m_generic_error",
        }
    }
}

/// What a group is, asked of the network; `None` when it will not say (no longer a member, say):
/// the portal then starts without the member list.
async fn lookup_group(
    acc: &Arc<dyn NetAccount>,
    id: &str,
) -> Result<Option<GroupInfo>, BridgeError> {
    match acc.group(id).await {
        Ok(g) => Ok(Some(g)),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot look up a group");
            Ok(None)
        }
    }
}

/// A portal's room: invites, bridge state and power levels. The power levels put the bot above
/// everyone, the owner at 75 in groups (so it can kick ghosts), ghosts at 50: redacting other
/// people's events, kicking, banning and the state that shapes the room need more than a ghost
/// has, so no contact can act on others' events through its ghost, even if the bridge were
/// tricked into trying.
fn portal_room(
    bot: &str,
    receiver: &str,
    chat_id: &str,
    kind: PortalKind,
    name: &str,
    ghosts: &[String],
) -> NewRoom {
    let shown = if name.is_empty() { chat_id } else { name };
    let mut users = BTreeMap::from([(bot.to_owned(), 100)]);
    for g in ghosts {
        users.insert(g.clone(), 50);
    }
    // The owner outranks the ghosts in a group, so it can remove a contact from the group by
    // kicking its ghost.
    let owner_level = if kind == PortalKind::Group {
        GROUP_OWNER_LEVEL
    } else {
        50
    };
    users.insert(receiver.to_owned(), owner_level);
    let mut invite = vec![receiver.to_owned()];
    invite.extend(ghosts.iter().cloned());
    // Only the bot changes what the room is and who may do what.
    let events = [
        "m.room.power_levels",
        "m.room.history_visibility",
        "m.room.tombstone",
        "m.room.server_acl",
        "m.room.join_rules",
        "m.bridge",
        "uk.half-shot.bridge",
    ]
    .map(|ty| (ty.to_owned(), 100))
    .into();
    NewRoom {
        name: (kind == PortalKind::Group && !name.is_empty()).then(|| name.to_owned()),
        is_direct: kind == PortalKind::Dm,
        invite,
        bridge: BridgeInfo {
            bot: bot.to_owned(),
            protocol: ("interop".into(), "Interop".into()),
            channel: (chat_id.to_owned(), shown.to_owned()),
        },
        power_levels: PowerLevels {
            users,
            redact: 75,
            kick: 75,
            ban: 75,
            events,
        },
        avatar_mxc: None,
        encrypted: false,
        space: false,
    }
}

/// Whether the Matrix user `sender` wrote the mapped message (or reaction) `t`, so may edit or
/// delete it on the network (`me`: the account the edit would go out through). The owner also
/// wrote what their own account sent from another device (shown by the bot). Rows from before
/// authors were recorded count as the owner's when they went out through the owner's own login
/// in a room without a relay (where they could be anyone's).
fn is_author(t: &MappedMessage, sender: &str, me: &str, portal: &Portal, bot: &str) -> bool {
    let owners_own = sender == portal.receiver && t.sender == me;
    if t.matrix_sender.is_empty() {
        owners_own && portal.relay.is_none()
    } else {
        t.matrix_sender == sender || (t.matrix_sender == bot && owners_own)
    }
}

/// A text's Matrix `body` (bounded) and its HTML, when it has formatting.
fn text_parts(t: &Text) -> (String, Option<FormattedBody>) {
    let cut;
    let t = match msgconv::bounded_body(&t.body) {
        std::borrow::Cow::Borrowed(_) => t,
        std::borrow::Cow::Owned(body) => {
            cut = Text {
                body,
                formats: t.formats.clone(),
            };
            &cut
        }
    };
    (
        t.body.clone(),
        msgconv::text_to_html(t).map(FormattedBody::html),
    )
}

/// A text as an `m.text` message.
fn text_message(t: &Text) -> MessageType {
    let (body, formatted) = text_parts(t);
    let mut c = TextMessageEventContent::plain(body);
    c.formatted = formatted;
    MessageType::Text(c)
}

/// A message event's content.
fn message(msgtype: MessageType) -> RoomMessageEventContent {
    RoomMessageEventContent::new(msgtype)
}

/// An event id the bridge stored, for a relation to it.
fn event_id(id: &str) -> Result<OwnedEventId, BridgeError> {
    OwnedEventId::try_from(id)
        .map_err(|e| BridgeError::Matrix(format!("a stored event id is not valid ({id}): {e}")))
}

/// `12.3 MiB`, for notices.
pub(crate) fn human_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    } else if bytes >= 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

fn default_filename(m: &Media, mime: &str) -> String {
    let ext = mime
        .split('/')
        .nth(1)
        .unwrap_or("bin")
        .split(';')
        .next()
        .unwrap_or("bin");
    let base = match m.kind {
        MediaKind::Image | MediaKind::Sticker => "image",
        MediaKind::Video => "video",
        MediaKind::Audio => "audio",
        MediaKind::Voice => "voice",
        _ => "file",
    };
    format!("{base}.{ext}")
}
