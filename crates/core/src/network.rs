//! What the core needs from the interop network (the network connector), and what it hears back.

use std::sync::Arc;

use async_trait::async_trait;

use super::model::Message;

#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// The gateway cannot be reached; try again later.
    #[error("the interop network cannot be reached: {0}")]
    Unavailable(String),
    #[error("the verification code is wrong")]
    BadCode,
    #[error("the verification code expired")]
    CodeExpired,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not logged in")]
    NotLoggedIn,
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

impl NetError {
    pub fn is_transient(&self) -> bool {
        matches!(self, NetError::Unavailable(_))
    }
}

/// A chat on the interop side.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NetTarget {
    Contact(String),
    Group(String),
}

/// A group as the network describes it.
#[derive(Clone, Debug, Default)]
pub struct GroupInfo {
    pub id: String,
    pub name: String,
    pub members: Vec<String>,
    pub changed_by: String,
    /// The group's avatar: an unencrypted blob id, empty for none.
    pub avatar_blob: String,
}

/// A change to a group; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct GroupChange {
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub name: Option<String>,
    /// A blob id from [`NetAccount::upload_avatar`], or empty to remove the avatar.
    pub avatar_blob: Option<String>,
}

/// A contact's public profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetProfile {
    pub name: String,
    /// An unencrypted blob id, empty for none.
    pub avatar_blob: String,
}

/// Media uploaded to the network, ready to put into a `Media` content.
#[derive(Clone, Debug)]
pub struct UploadedMedia {
    pub blob: String,
    pub key: Vec<u8>,
    pub sha256: Vec<u8>,
}

/// The interop network, for logins.
#[async_trait]
pub trait Network: Send + Sync {
    /// Asks the network to send a verification code for `account`.
    async fn request_code(&self, account: &str) -> Result<(), NetError>;
    /// Checks the code, stores the credentials for `mxid` and connects the account.
    async fn verify_and_connect(
        &self,
        mxid: &str,
        account: &str,
        code: &str,
    ) -> Result<Arc<dyn NetAccount>, NetError>;
    /// Connects a stored login (at start-up).
    async fn reconnect(&self, mxid: &str) -> Result<Arc<dyn NetAccount>, NetError>;
    /// Disconnects and destroys everything the bridge holds for the login.
    async fn logout(&self, mxid: &str) -> Result<(), NetError>;
    /// Stops the running login and keeps what is stored (another worker takes it over).
    async fn stop(&self, _mxid: &str) {}
    /// The connected account of `mxid`.
    fn account(&self, mxid: &str) -> Option<Arc<dyn NetAccount>>;
    /// Some connected login, for look-ups that belong to no user in particular.
    fn any_account(&self) -> Option<Arc<dyn NetAccount>>;
    /// Whether the network is reachable (for `/ready`).
    async fn reachable(&self) -> bool;
    /// Whether `id` is an account identifier of this network (a contact, or a login).
    fn is_valid_account(&self, id: &str) -> bool;
    /// A message in the network's own encoding, for keeping it (held messages of a message
    /// request) in the form the network delivered it.
    fn encode_message(&self, message: &Message) -> Vec<u8>;
    /// The reverse of [`encode_message`](Self::encode_message); an error for bytes that do not
    /// decode.
    fn decode_message(&self, bytes: &[u8]) -> Result<Message, NetError>;
}

/// One logged-in interop account.
#[async_trait]
pub trait NetAccount: Send + Sync {
    fn account_id(&self) -> &str;
    fn is_connected(&self) -> bool;
    async fn send(&self, to: NetTarget, message_id: String, data: Message) -> Result<(), NetError>;
    /// A receipt to the author `to` of messages in a DM, or in `group`.
    async fn receipt(
        &self,
        to: &str,
        group: Option<&str>,
        read: bool,
        message_ids: Vec<String>,
    ) -> Result<(), NetError>;
    async fn typing(&self, to: NetTarget, typing: bool) -> Result<(), NetError>;
    async fn upload(&self, data: Vec<u8>) -> Result<UploadedMedia, NetError>;
    /// Downloads and decrypts a media blob of at most `max` bytes (refused with
    /// [`NetError::Refused`] when larger, without reading it all).
    async fn download(
        &self,
        blob: &str,
        key: &[u8],
        sha256: &[u8],
        max: u64,
    ) -> Result<Vec<u8>, NetError>;
    async fn create_group(&self, name: &str, members: Vec<String>) -> Result<GroupInfo, NetError>;
    async fn update_group(&self, group: &str, change: GroupChange) -> Result<GroupInfo, NetError>;
    /// A group as it is now (the account must be a member).
    async fn group(&self, group: &str) -> Result<GroupInfo, NetError>;
    /// A contact's profile (`None` if the network does not know the account).
    async fn profile(&self, account: &str) -> Result<Option<NetProfile>, NetError>;
    /// Uploads a public image (a profile or group avatar); returns its blob id.
    async fn upload_avatar(&self, image: Vec<u8>) -> Result<String, NetError>;
    /// Downloads a public image named by a profile or group.
    async fn download_avatar(&self, blob: &str) -> Result<Vec<u8>, NetError>;
    /// The event with this envelope id is handled.
    async fn ack(&self, envelope_id: u64);
}

/// Receives network events; implemented by the bridge core.
#[async_trait]
pub trait NetEventSink: Send + Sync {
    async fn handle_network_event(
        &self,
        mxid: &str,
        event: &NetEvent,
    ) -> Result<(), super::BridgeError>;
    /// An event the bridge gave up on (a permanent error, its retries ran out, or the message
    /// it refers to never came): the user is told in the chat's room.
    async fn network_event_failed(
        &self,
        _mxid: &str,
        _event: &NetEvent,
        _error: &super::BridgeError,
    ) {
    }
}

/// Something that happened on the network for the login of `mxid`.
#[derive(Debug)]
// Messages dominate and are moved once through a channel; boxing them buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum NetEvent {
    Message {
        envelope_id: u64,
        from: String,
        group: Option<String>,
        message_id: String,
        timestamp: u64,
        data: Message,
    },
    Receipt {
        envelope_id: u64,
        from: String,
        group: Option<String>,
        read: bool,
        message_ids: Vec<String>,
    },
    GroupUpdate {
        envelope_id: u64,
        from: String,
        group: GroupInfo,
    },
    Typing {
        from: String,
        group: Option<String>,
        typing: bool,
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
    Connected,
    Disconnected {
        reason: String,
    },
    LoggedOut {
        reason: String,
    },
}

impl NetEvent {
    pub fn envelope_id(&self) -> Option<u64> {
        match self {
            NetEvent::Message { envelope_id, .. }
            | NetEvent::Receipt { envelope_id, .. }
            | NetEvent::GroupUpdate { envelope_id, .. }
            | NetEvent::Undecryptable { envelope_id, .. } => Some(*envelope_id),
            _ => None,
        }
    }
}
