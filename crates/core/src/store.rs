//! What the core needs from storage: the store traits it calls, and the one thing it needs to know
//! of a failure, whether it comes back by itself. The store implements them; no SQL type shows
//! here.

use async_trait::async_trait;

use super::types::{DmContact, GhostProfile, MappedMessage, Portal};

/// A store operation failed.
#[derive(Clone, Debug, thiserror::Error)]
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
    /// The portals whose room is `room_id`, the oldest first: one, or for a shared group
    /// portal one per login in it (all of the same chat).
    async fn portals_in_room(&self, room_id: &str) -> Result<Vec<Portal>, StoreError>;
    /// The first portal of `room_id` (its creator's, for a shared group portal).
    async fn portal_by_room(&self, room_id: &str) -> Result<Option<Portal>, StoreError> {
        Ok(self.portals_in_room(room_id).await?.into_iter().next())
    }
    /// The oldest group portal of the group `chat_id` that has a room, whoever's it is (the room
    /// another login of the group joins).
    async fn group_portal(&self, chat_id: &str) -> Result<Option<Portal>, StoreError>;
    async fn save_portal(&self, p: &Portal) -> Result<(), StoreError>;
    /// Updates only the name and avatar of the portal (of every portal sharing its room), and
    /// only while it still has the same room (a portal closed meanwhile stays closed).
    async fn update_portal_look(&self, p: &Portal) -> Result<(), StoreError>;
    /// Forgets the portal; its room's message map goes with the room's last portal.
    async fn delete_portal(&self, receiver: &str, chat_id: &str) -> Result<(), StoreError>;
    /// Takes the network message (`room_id`, `sender`, `message_id`) for the login of `owner`
    /// to bridge: `true` when `owner` has it now (it was free, already `owner`'s, or taken
    /// before `stale_before_ms` by a login that never finished). In a shared group portal each
    /// login receives every message; this is what makes one of them bridge it.
    async fn claim_message(
        &self,
        room_id: &str,
        sender: &str,
        message_id: &str,
        owner: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Forgets claims taken before `before_ms`.
    async fn prune_claims(&self, before_ms: i64) -> Result<(), StoreError>;
    async fn portals_of(&self, receiver: &str) -> Result<Vec<Portal>, StoreError>;
    /// The direct chats of `receiver` with their ghosts' names, in one read.
    async fn dm_contacts(&self, receiver: &str) -> Result<Vec<DmContact>, StoreError>;

    async fn ghost_profile(&self, account: &str) -> Result<Option<GhostProfile>, StoreError>;
    /// Accounts of ghosts whose display name contains `name` (case-insensitive, at least for
    /// ASCII), at most `limit`, by account.
    async fn ghosts_named(&self, name: &str, limit: u32) -> Result<Vec<String>, StoreError>;
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

    /// The disappearing-message timer of the portal in `room_id`, in seconds (0: off).
    async fn disappear_timer(&self, room_id: &str) -> Result<u32, StoreError>;
    async fn set_disappear_timer(&self, room_id: &str, seconds: u32) -> Result<(), StoreError>;
    /// Has the Matrix event redacted at `due_ms` (ms since the epoch); a second call for the
    /// same event keeps the earlier time.
    async fn disappear_at(
        &self,
        room_id: &str,
        event_id: &str,
        due_ms: i64,
    ) -> Result<(), StoreError>;
    /// Up to `limit` events due at `now_ms`, the earliest first, as (room, event).
    async fn due_to_disappear(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError>;
    /// The event is gone (or can never be redacted): it leaves the schedule.
    async fn disappeared(&self, room_id: &str, event_id: &str) -> Result<(), StoreError>;
}

#[async_trait]
pub trait UserStore: Send + Sync {
    async fn management_room(&self, mxid: &str) -> Result<Option<String>, StoreError>;
    async fn set_management_room(&self, mxid: &str, room_id: &str) -> Result<(), StoreError>;
    /// The user whose management room this is, if any.
    async fn management_room_owner(&self, room_id: &str) -> Result<Option<String>, StoreError>;
    /// The user's personal space (the room holding the portals of the login).
    async fn space_room(&self, mxid: &str) -> Result<Option<String>, StoreError>;
    async fn set_space_room(&self, mxid: &str, room_id: Option<&str>) -> Result<(), StoreError>;
    /// The multi-step command waiting for the user's next message (as the core encodes it).
    async fn pending_command(&self, mxid: &str) -> Result<Option<String>, StoreError>;
    /// Sets or (with `None`) clears it.
    async fn set_pending_command(
        &self,
        mxid: &str,
        command: Option<&str>,
    ) -> Result<(), StoreError>;
}

/// An inbound Matrix event waiting in the durable queue, sealed by the vault.
#[derive(Clone, Debug)]
pub struct QueuedEvent {
    pub room_id: Option<String>,
    /// The event's id, for room events: an id already queued is not queued again.
    pub event_id: Option<String>,
    pub sealed: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub seq: i64,
    pub room_id: Option<String>,
    pub sealed: Vec<u8>,
    pub attempts: i64,
}

/// What happened to an appservice transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    Applied,
    Duplicate,
}

#[async_trait]
pub trait TxnStore: Send + Sync {
    /// Records the transaction and queues its events in one database transaction. A transaction
    /// with the same id and the same body hash is a retry and changes nothing; an event whose id
    /// was queued before (by another transaction or by [`TxnStore::queue_missed`]) is skipped.
    async fn apply_transaction(
        &self,
        txn_id: &str,
        body_hash: &[u8],
        events: &[QueuedEvent],
    ) -> Result<TxnOutcome, StoreError>;
    /// The oldest queued events, in arrival order, at most `limit`.
    async fn queued_events(&self, limit: i64) -> Result<Vec<StoredEvent>, StoreError> {
        self.queued_events_after(0, limit).await
    }
    /// The oldest queued events after sequence number `after`, at most `limit`.
    async fn queued_events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// Queues events the homeserver never sent (found by the catch-up after an outage), those
    /// whose ids were not queued before; returns how many were new.
    async fn queue_missed(&self, events: &[QueuedEvent]) -> Result<usize, StoreError>;
    /// Takes handled events out of the queue, in one statement.
    async fn remove_events(&self, seqs: &[i64]) -> Result<(), StoreError>;
    async fn count_attempt(&self, seq: i64) -> Result<(), StoreError>;
    /// Forgets transaction ids and queued event ids older than `max_age_ms` (the events
    /// themselves are long applied).
    async fn prune_transactions(&self, max_age_ms: i64) -> Result<u64, StoreError>;
    /// Which of these transaction ids were recorded (by any worker sharing the database).
    async fn recorded_transactions(&self, txn_ids: &[String]) -> Result<Vec<String>, StoreError>;
    /// Wakes `wake` whenever any process sharing the database queues events, for as long as
    /// someone else holds `wake`. Returns whether the database can tell (PostgreSQL's
    /// LISTEN/NOTIFY); when it cannot, the caller looks at the queue on its own.
    fn watch_queue(&self, _wake: std::sync::Arc<tokio::sync::Notify>) -> bool {
        false
    }
}

#[async_trait]
pub trait KvStore: Send + Sync {
    async fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError>;
    async fn kv_set(&self, key: &str, value: &str) -> Result<(), StoreError>;
}

/// A lease as stored: who holds it and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at: i64,
    /// How many times the lease changed hands.
    pub generation: i64,
}

/// Leases of the workers sharing one database (see [`crate::cluster`]). Times are the workers'
/// clocks in milliseconds since the Unix epoch.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes or renews the lease `name` for `holder` until `until`: it succeeds when nobody
    /// holds it, `holder` holds it already, or its holder let it expire (`expires_at <= now`).
    /// Returns the lease's generation (raised by one whenever the holder changes), `None` when
    /// another holder has it.
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<Option<i64>, StoreError>;
    /// Renews every lease `holder` still holds (not expired at `now`) until `until`, in one
    /// statement; returns their names.
    async fn renew_leases(
        &self,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Lets the lease go at once, if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError>;
    /// How many leases whose names start with `prefix` are live (not expired at `now`).
    async fn live_lease_count(&self, prefix: &str, now: i64) -> Result<usize, StoreError>;
    /// Logins (their Matrix ids) whose `login:` lease nobody holds at `now`.
    async fn unheld_logins(&self, now: i64) -> Result<Vec<String>, StoreError>;
}
