//! What the core needs from storage: the store traits it calls, and the one thing it needs to know
//! of a failure, whether it comes back by itself. The store implements them; no SQL type shows
//! here.

use async_trait::async_trait;

use super::types::{GhostProfile, MappedMessage, Portal};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    message: String,
    unavailable: bool,
}

impl StoreError {
    /// The database is away or out of room (a lost connection, a restart, a full disk): what
    /// failed waits and is tried again.
    pub fn unavailable(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            unavailable: true,
        }
    }

    /// The store refused or failed this one request.
    pub fn failed(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            unavailable: false,
        }
    }

    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }
}

#[async_trait]
pub trait PortalStore: Send + Sync {
    async fn set_login(&self, mxid: &str, account: &str) -> Result<(), StoreError>;
    async fn login(&self, mxid: &str) -> Result<Option<String>, StoreError>;
    async fn delete_login(&self, mxid: &str) -> Result<(), StoreError>;
    async fn all_logins(&self) -> Result<Vec<(String, String)>, StoreError>;

    async fn portal(&self, receiver: &str, chat_id: &str) -> Result<Option<Portal>, StoreError>;
    async fn portal_by_room(&self, room_id: &str) -> Result<Option<Portal>, StoreError>;
    async fn save_portal(&self, p: &Portal) -> Result<(), StoreError>;
    /// Updates only the name and avatar of the portal, and only while it still has the same room
    /// (a portal closed meanwhile stays closed).
    async fn update_portal_look(&self, p: &Portal) -> Result<(), StoreError>;
    async fn delete_portal(&self, receiver: &str, chat_id: &str) -> Result<(), StoreError>;
    async fn portals_of(&self, receiver: &str) -> Result<Vec<Portal>, StoreError>;

    async fn ghost_profile(&self, account: &str) -> Result<Option<GhostProfile>, StoreError>;
    async fn save_ghost(
        &self,
        account: &str,
        mxid: &str,
        profile: &GhostProfile,
    ) -> Result<(), StoreError>;

    async fn map_message(&self, m: &MappedMessage) -> Result<(), StoreError>;
    async fn by_message(
        &self,
        room_id: &str,
        message_id: &str,
        part: &str,
    ) -> Result<Option<MappedMessage>, StoreError>;
    async fn by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<MappedMessage>, StoreError>;
    async fn unmap_event(&self, room_id: &str, event_id: &str) -> Result<(), StoreError>;
}

#[async_trait]
pub trait UserStore: Send + Sync {
    async fn management_room(&self, mxid: &str) -> Result<Option<String>, StoreError>;
    async fn set_management_room(&self, mxid: &str, room_id: &str) -> Result<(), StoreError>;
    /// The user whose management room this is, if any.
    async fn management_room_owner(&self, room_id: &str) -> Result<Option<String>, StoreError>;
}
