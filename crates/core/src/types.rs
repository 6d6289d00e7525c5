//! The core's records: portals, ghosts as last set, and the message map. The store keeps them; the
//! core owns their shape. Matrix identifiers in them are ruma's (checked when the record is
//! made or read back), so a room id cannot stand where a user id belongs.

use ruma::{OwnedRoomId, OwnedUserId};

/// A bridged chat of one login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    /// The Matrix user whose login sees this chat.
    pub receiver: OwnedUserId,
    /// The contact's account (`dm`) or the group id (`group`).
    pub chat_id: String,
    pub kind: PortalKind,
    pub room_id: Option<OwnedRoomId>,
    pub name: String,
    /// The Matrix user whose login relays for others in this room.
    pub relay: Option<OwnedUserId>,
    /// The group avatar's interop blob and its copy on Matrix (empty: none).
    pub avatar_blob: String,
    pub avatar_mxc: String,
}

/// What the bridge last set on a ghost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GhostProfile {
    pub displayname: String,
    /// The contact's avatar blob on the interop side and its copy on Matrix (empty: none).
    pub avatar_blob: String,
    pub avatar_mxc: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortalKind {
    Dm,
    Group,
}

impl PortalKind {
    /// The kind as stored and shown: `dm` or `group`.
    pub fn as_str(self) -> &'static str {
        match self {
            PortalKind::Dm => "dm",
            PortalKind::Group => "group",
        }
    }
}

/// A direct chat of a login and the name its contact's ghost shows, as the contact list reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmContact {
    /// The contact's account.
    pub account: String,
    pub room_id: Option<String>,
    /// The ghost's display name (empty: none set).
    pub displayname: String,
}

/// One row of the message map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedMessage {
    pub room_id: String,
    pub event_id: String,
    pub message_id: String,
    /// Interop account of the author.
    pub sender: String,
    /// "" for the message itself, "reaction:<account>:<emoji>" for reactions.
    pub part: String,
    /// The Matrix user who wrote it: a real user for messages bridged from Matrix, the ghost or
    /// the bot for messages from the network ("" in rows older than this column).
    pub matrix_sender: String,
}

/// A portal's room as the core asks the Matrix side to create it (as the bot, a private chat);
/// the Matrix side turns it into a `createRoom` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRoom {
    /// Set for groups; a direct chat is named by its members.
    pub name: Option<String>,
    pub is_direct: bool,
    pub invite: Vec<String>,
    /// What the room bridges, for its bridge state (MSC2346 `m.bridge`, and the older
    /// `uk.half-shot.bridge`).
    pub bridge: BridgeInfo,
    pub power_levels: PowerLevels,
    /// The group's avatar (an mxc URI).
    pub avatar_mxc: Option<String>,
    /// Created with encryption on (Megolm).
    pub encrypted: bool,
    /// A space (`m.space`) rather than a chat room.
    pub space: bool,
}

/// The bridge state of a portal room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeInfo {
    /// The bridge bot (creator and `bridgebot`).
    pub bot: String,
    /// The protocol's id and name.
    pub protocol: (String, String),
    /// The chat's id and shown name.
    pub channel: (String, String),
}

/// A room's power levels: per user, for moderation, and per state event type (everything not
/// named takes the homeserver's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerLevels {
    pub users: std::collections::BTreeMap<String, i64>,
    pub redact: i64,
    pub kick: i64,
    pub ban: i64,
    pub events: std::collections::BTreeMap<String, i64>,
}
