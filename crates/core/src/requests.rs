//! Message requests: a stranger's first message, or being added to a group by one, opens no room
//! and registers no ghosts. The messages are held (sealed in the user's vault) and the user
//! accepts or declines from the bot, as the gatekeepers' interop offers present them.
//!
//! Someone is no stranger to a login when the login has a portal with them (a DM, or the
//! group's own portal), when the message comes from the login's own account, or, for a group,
//! when the member who wrote or added is a contact the login has a DM portal with.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::model::Message;
use super::{
    Bridge, BridgeError,
    network::{NetAccount, NetTarget},
};

/// Messages held per request; later ones are counted and dropped.
pub const MAX_HELD: u32 = 100;
/// Bytes of messages held per request (media are held by reference, so this is text).
pub const MAX_HELD_BYTES: u64 = 1024 * 1024;
/// Open requests per login; messages from further strangers are dropped.
pub const MAX_REQUESTS: usize = 50;
/// Open requests one stranger may cause per login (one DM and a few groups), so that one
/// account cannot fill the login's requests and crowd out everyone else.
pub const MAX_REQUESTS_PER_SENDER: usize = 3;

/// A chat waiting for the user's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRequest {
    /// The contact's account, or the group id.
    pub chat_id: String,
    pub group: bool,
    /// Who wrote first (or added the user to the group).
    pub from: String,
    /// Their profile name when it was known.
    pub name: String,
    /// Messages held, and messages dropped once `MAX_HELD` were held.
    pub held: u32,
    pub dropped: u32,
    /// The user declined: later messages are dropped until they open the chat themselves.
    pub declined: bool,
    /// The user accepted (or had a portal for this chat before): no longer a request.
    #[serde(default)]
    pub accepted: bool,
    /// Bytes of the messages held.
    #[serde(default)]
    pub held_bytes: u64,
}

impl MessageRequest {
    /// Waiting for the user's answer.
    pub fn is_open(&self) -> bool {
        !self.declined && !self.accepted
    }
}

/// One held message, as the network delivered it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldMessage {
    pub from: String,
    pub message_id: String,
    pub timestamp: u64,
    /// The message in the network's encoding ([`Network::encode_message`](super::network::Network::encode_message)).
    pub data: Vec<u8>,
}

/// Where requests and their held messages live: sealed with the user's data key, so they are
/// never plaintext at rest and are shredded with the rest of the user's data on logout.
#[async_trait]
pub trait RequestStore: Send + Sync {
    async fn request(
        &self,
        receiver: &str,
        chat_id: &str,
    ) -> Result<Option<MessageRequest>, BridgeError>;
    async fn save_request(&self, receiver: &str, r: &MessageRequest) -> Result<(), BridgeError>;
    async fn requests(&self, receiver: &str) -> Result<Vec<MessageRequest>, BridgeError>;
    async fn hold(
        &self,
        receiver: &str,
        chat_id: &str,
        seq: u32,
        m: &HeldMessage,
    ) -> Result<(), BridgeError>;
    /// The held messages of a chat, in the order they arrived.
    async fn held(&self, receiver: &str, chat_id: &str) -> Result<Vec<HeldMessage>, BridgeError>;
    /// Drops the held messages of a chat, and its request too unless `keep_request`.
    async fn forget(
        &self,
        receiver: &str,
        chat_id: &str,
        keep_request: bool,
    ) -> Result<(), BridgeError>;
}

/// What to do with a network event of a chat without a portal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Bridge it (creating the portal).
    Open,
    /// Held, or dropped (declined, or over a limit): the event is done.
    Closed,
}

impl Bridge {
    fn request_lock_key(receiver: &str, chat_id: &str) -> (String, String) {
        (receiver.to_owned(), format!("request:{chat_id}"))
    }

    async fn request_lock(&self, receiver: &str, chat_id: &str) -> super::ChatLock {
        self.portal_locks
            .lock()
            .await
            .entry(Self::request_lock_key(receiver, chat_id))
            .or_default()
            .clone()
    }

    /// Decides whether an event in `chat` from `from` may open a portal for `receiver`;
    /// otherwise the message (if any) is held as part of a message request.
    pub(crate) async fn request_gate(
        &self,
        receiver: &str,
        acc: &Arc<dyn NetAccount>,
        chat: &NetTarget,
        from: &str,
        message: Option<(&str, u64, &Message)>,
    ) -> Result<Gate, BridgeError> {
        if !self.settings.bridge.message_requests || from == acc.account_id() {
            return Ok(Gate::Open);
        }
        let (chat_id, group) = match chat {
            NetTarget::Contact(c) => (c.as_str(), false),
            NetTarget::Group(g) => (g.as_str(), true),
        };
        let has_room = |p: Option<super::types::Portal>| p.is_some_and(|p| p.room_id.is_some());
        if has_room(self.portals.portal(receiver, chat_id).await?) {
            return Ok(Gate::Open);
        }
        let lock = self.request_lock(receiver, chat_id).await;
        let _guard = lock.lock().await;
        // Accepted meanwhile?
        if has_room(self.portals.portal(receiver, chat_id).await?) {
            return Ok(Gate::Open);
        }
        let known = self.requests.request(receiver, chat_id).await?;
        match &known {
            Some(r) if r.accepted => return Ok(Gate::Open),
            // A refusal holds, even if a contact of the user is in the group too.
            Some(r) if r.declined => {
                self.metrics.refused("message_request_declined");
                return Ok(Gate::Closed);
            }
            _ => {}
        }
        // A group from a contact the user already talks to is no stranger's.
        if group && has_room(self.portals.portal(receiver, from).await?) {
            return Ok(Gate::Open);
        }
        let mut req = match known {
            Some(r) => r,
            None => {
                let all = self.requests.requests(receiver).await?;
                let open: Vec<&MessageRequest> = all.iter().filter(|r| r.is_open()).collect();
                let by_sender = open.iter().filter(|r| r.from == from).count();
                if open.len() >= MAX_REQUESTS || by_sender >= MAX_REQUESTS_PER_SENDER {
                    tracing::info!(user = %receiver, "over the message-request limits; dropping a stranger's message");
                    self.metrics.refused("message_requests_full");
                    return Ok(Gate::Closed);
                }
                let name = match acc.profile(from).await {
                    Ok(Some(p)) => p.name,
                    _ => String::new(),
                };
                let req = MessageRequest {
                    chat_id: chat_id.to_owned(),
                    group,
                    from: from.to_owned(),
                    name,
                    held: 0,
                    dropped: 0,
                    declined: false,
                    accepted: false,
                    held_bytes: 0,
                };
                self.requests.save_request(receiver, &req).await?;
                self.announce_request(receiver, &req).await;
                req
            }
        };
        if let Some((message_id, timestamp, data)) = message {
            let data = self.network.encode_message(data);
            let bytes = data.len() as u64;
            if req.held >= MAX_HELD || req.held_bytes + bytes > MAX_HELD_BYTES {
                req.dropped += 1;
            } else {
                req.held_bytes += bytes;
                let held = HeldMessage {
                    from: from.to_owned(),
                    message_id: message_id.to_owned(),
                    timestamp,
                    data,
                };
                self.requests
                    .hold(receiver, chat_id, req.held, &held)
                    .await?;
                req.held += 1;
            }
            self.requests.save_request(receiver, &req).await?;
        }
        Ok(Gate::Closed)
    }

    /// Tells the user about a new request in their management room.
    async fn announce_request(&self, receiver: &str, req: &MessageRequest) {
        let Ok(Some(room)) = self.users.management_room(receiver).await else {
            return;
        };
        let who = if req.name.is_empty() {
            req.from.clone()
        } else {
            format!("{} ({})", req.name, req.from)
        };
        let what = if req.group {
            format!("{who} added you to a group ({})", req.chat_id)
        } else {
            format!("{who} wants to chat with you")
        };
        let text = format!(
            "Message request: {what}. Nothing is bridged until you answer: send `accept {id}` to open the chat, or `decline {id}`.",
            id = req.chat_id
        );
        if let Err(e) = self.notice(&room, &text).await {
            tracing::debug!(error = %e, "cannot announce a message request");
        }
    }

    /// Opens the portal of a request and bridges its held messages; `None` when there is no
    /// request for `chat_id`.
    pub(crate) async fn accept_request(
        &self,
        receiver: &str,
        acc: &Arc<dyn NetAccount>,
        chat_id: &str,
    ) -> Result<Option<(String, usize)>, BridgeError> {
        let lock = self.request_lock(receiver, chat_id).await;
        let _guard = lock.lock().await;
        let Some(mut req) = self
            .requests
            .request(receiver, chat_id)
            .await?
            .filter(|r| !r.accepted)
        else {
            return Ok(None);
        };
        let target = if req.group {
            NetTarget::Group(chat_id.to_owned())
        } else {
            NetTarget::Contact(chat_id.to_owned())
        };
        let portal = self.ensure_portal(receiver, acc, &target, None).await?;
        let held = self.requests.held(receiver, chat_id).await?;
        let n = held.len();
        for m in held {
            let data = match self.network.decode_message(&m.data) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping an unreadable held message");
                    continue;
                }
            };
            // Already bridged ones (a retried accept) are skipped by the message map.
            portal
                .network_message(acc, &m.from, &m.message_id, m.timestamp, &data)
                .await?;
        }
        self.requests.forget(receiver, chat_id, true).await?;
        req.accepted = true;
        req.declined = false;
        req.held = 0;
        req.dropped = 0;
        req.held_bytes = 0;
        self.requests.save_request(receiver, &req).await?;
        Ok(Some((portal.room, n)))
    }

    /// A chat that had a portal stays known after the portal ends.
    pub(crate) async fn remember_known_chat(
        &self,
        portal: &super::types::Portal,
    ) -> Result<(), BridgeError> {
        if !self.settings.bridge.message_requests {
            return Ok(());
        }
        let req = MessageRequest {
            chat_id: portal.chat_id.clone(),
            group: portal.kind == super::types::PortalKind::Group,
            from: String::new(),
            name: String::new(),
            held: 0,
            dropped: 0,
            declined: false,
            accepted: true,
            held_bytes: 0,
        };
        self.requests
            .save_request(portal.receiver.as_str(), &req)
            .await
    }

    /// Drops a request's held messages and remembers the refusal.
    pub(crate) async fn decline_request(
        &self,
        receiver: &str,
        chat_id: &str,
    ) -> Result<bool, BridgeError> {
        let lock = self.request_lock(receiver, chat_id).await;
        let _guard = lock.lock().await;
        let Some(mut req) = self
            .requests
            .request(receiver, chat_id)
            .await?
            .filter(MessageRequest::is_open)
        else {
            return Ok(false);
        };
        self.requests.forget(receiver, chat_id, true).await?;
        req.declined = true;
        req.held = 0;
        req.held_bytes = 0;
        self.requests.save_request(receiver, &req).await?;
        Ok(true)
    }
}
