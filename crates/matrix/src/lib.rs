//! The bridge's Matrix side: the appservice API the homeserver pushes to ([`appservice`]: axum,
//! transactions into a durable queue, the catch-up after an outage, the provisioning API), the
//! homeserver client ([`client`]), Megolm for the bot and the ghosts ([`crypto`],
//! matrix-sdk-crypto), and the [`MatrixConnector`] the core uses to act as the bot or a ghost.
//!
//! It talks to the core through the core's traits and types only. It must never depend on the
//! interop side, the store, the wire protocol or the gateway, nor on an SQL or Signal crate
//! (`tests/architecture.rs` checks it): the stores it needs come in as the core's traits and, for
//! the crypto store in the database, as matrix-sdk-crypto's `CryptoStore` ([`crypto::OpenStore`]).

use std::sync::Arc;

use async_trait::async_trait;
use ruma::{
    OwnedRoomId, OwnedUserId,
    events::{
        AnyMessageLikeEventContent, AnyStateEventContent, MessageLikeEventContent,
        StateEventContent, room::MediaSource,
    },
};
use serde_json::{Value, json};

use mib_core::{BridgeError, MatrixConnector, types::NewRoom};

pub mod appservice;
pub mod client;
pub mod crypto;
pub mod settings;
pub mod timeline;

pub use client::{HomeserverClient, MatrixError};
use crypto::Crypto;

/// The homeserver's answer decides the retry class: an unreachable homeserver is waited for,
/// 5xx and answers that do not parse are transient, a rate limit waits for its `retry_after_ms`, any other 4xx (and a
/// request that cannot be built, or an answer over the bridge's limit) is permanent.
impl From<MatrixError> for BridgeError {
    fn from(e: MatrixError) -> Self {
        match &e {
            MatrixError::Api {
                status,
                errcode,
                retry_after,
                ..
            } if *status == 429 || errcode == "M_LIMIT_EXCEEDED" => BridgeError::RateLimited {
                message: e.to_string(),
                retry_after: *retry_after,
            },
            MatrixError::Api { status, .. } if (400..500).contains(status) => {
                BridgeError::MatrixRefused(e.to_string())
            }
            MatrixError::Build(_) | MatrixError::TooLarge(_) => {
                BridgeError::MatrixRefused(e.to_string())
            }
            // Unreachable comes back by itself (a restart, an outage): wait for it, longer
            // than for a homeserver that answers with errors.
            MatrixError::Network(_) => BridgeError::NotReady(e.to_string()),
            MatrixError::Api { .. } | MatrixError::Response(_) => {
                BridgeError::Matrix(e.to_string())
            }
        }
    }
}

/// Encryption that failed: a crypto store that cannot be reached is waited for like the
/// homeserver; the homeserver's own answers keep their class; the rest is transient.
impl From<crypto::CryptoError> for BridgeError {
    fn from(e: crypto::CryptoError) -> Self {
        match e {
            crypto::CryptoError::Store(_) => BridgeError::NotReady(e.to_string()),
            crypto::CryptoError::Matrix(m) => m.into(),
            e => BridgeError::Matrix(e.to_string()),
        }
    }
}

/// The Matrix connector over a [`HomeserverClient`].
pub struct MatrixSide {
    pub client: HomeserverClient,
    bot: String,
    domain: String,
    ghost_re: regex::Regex,
    max_media_bytes: usize,
    privileged_creators: tokio::sync::OnceCell<bool>,
    crypto: std::sync::OnceLock<Arc<Crypto>>,
    /// Sends that failed without saying whether they took effect: (room, sender, txn id).
    unsure: std::sync::Mutex<std::collections::VecDeque<(String, String, String)>>,
}

/// A content field holding the transaction id the bridge sent an event with: after a send
/// whose outcome is unknown (the homeserver went away mid-request) the event can be found and
/// is not sent twice, also when the homeserver forgot the transaction id (Synapse keeps those
/// of users without a device only in memory, so a restart forgets them). Outside the
/// ciphertext in encrypted rooms; it is a hash and tells nothing.
pub const TXN_FIELD: &str = "org.matrix_interop_bridge.txn_id";

/// How many unsure sends are remembered.
const MAX_UNSURE: usize = 1024;

impl MatrixSide {
    /// Whether the homeserver's default room version gives creators unlimited power (v12+).
    async fn creators_are_privileged(&self) -> bool {
        *self
            .privileged_creators
            .get_or_init(|| async {
                match self.client.default_room_version().await {
                    Ok(v) => v.parse::<u32>().map_or(true, |n| n >= 12),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the homeserver's room versions; assuming v12 or later");
                        true
                    }
                }
            })
            .await
    }

    pub fn new(
        client: HomeserverClient,
        bot: String,
        domain: String,
        ghost_regex: &str,
    ) -> Result<Self, regex::Error> {
        Ok(Self {
            client,
            bot,
            domain,
            ghost_re: regex::Regex::new(&format!("^{ghost_regex}$"))?,
            max_media_bytes: 100 * 1024 * 1024,
            privileged_creators: tokio::sync::OnceCell::new(),
            crypto: std::sync::OnceLock::new(),
            unsure: Default::default(),
        })
    }

    /// The largest media download read from the homeserver (`bridge.max_media_size`).
    pub fn with_max_media(mut self, bytes: u64) -> Self {
        self.max_media_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        self
    }

    pub fn arc(self) -> Arc<Self> {
        Arc::new(self)
    }
}

fn user(id: &str) -> Result<OwnedUserId, BridgeError> {
    id.try_into()
        .map_err(|e| BridgeError::MatrixRefused(format!("invalid user id {id}: {e}")))
}

fn room(id: &str) -> Result<OwnedRoomId, BridgeError> {
    id.try_into()
        .map_err(|e| BridgeError::MatrixRefused(format!("invalid room id {id}: {e}")))
}

#[async_trait]
impl MatrixConnector for MatrixSide {
    fn bot_mxid(&self) -> &str {
        &self.bot
    }

    fn is_ghost(&self, mxid: &str) -> bool {
        self.ghost_re.is_match(mxid)
    }

    async fn join(&self, room_id: &str, as_user: &str) -> Result<(), BridgeError> {
        Ok(self.client.join(&room(room_id)?, &user(as_user)?).await?)
    }

    async fn leave(&self, room_id: &str, as_user: &str) -> Result<(), BridgeError> {
        Ok(self.client.leave(&room(room_id)?, &user(as_user)?).await?)
    }

    async fn send_notice(
        &self,
        room_id: &str,
        as_user: &str,
        body: &str,
        html: &str,
        txn_id: &str,
    ) -> Result<String, BridgeError> {
        let content = json!({
            "msgtype": "m.notice",
            "body": body,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        });
        self.send_maybe_encrypted(room_id, as_user, "m.room.message", content, txn_id, None)
            .await
    }

    async fn joined_members(
        &self,
        room_id: &str,
        as_user: &str,
    ) -> Result<Vec<String>, BridgeError> {
        let members = self
            .client
            .joined_members(&room(room_id)?, &user(as_user)?)
            .await?;
        Ok(members.into_iter().map(|m| m.to_string()).collect())
    }

    async fn ensure_ghost(
        &self,
        localpart: &str,
        displayname: &str,
    ) -> Result<String, BridgeError> {
        self.client.register_user(localpart).await?;
        let mxid = format!("@{localpart}:{}", self.domain);
        self.client
            .set_displayname(&user(&mxid)?, displayname)
            .await?;
        Ok(mxid)
    }

    async fn set_avatar(&self, as_user: &str, mxc: &str) -> Result<(), BridgeError> {
        self.client
            .set_avatar(&user(as_user)?, ruma::OwnedMxcUri::from(mxc))
            .await?;
        Ok(())
    }

    async fn create_room(&self, room: NewRoom) -> Result<String, BridgeError> {
        // From room version 12 on, creators have unlimited power and must not be listed in the
        // power levels (MSC4289); older versions need the bot listed, or it loses its level.
        let privileged_creator = self.creators_are_privileged().await.then_some(&self.bot);
        Ok(self
            .client
            .create_room(
                &user(&self.bot)?,
                create_room_body(&room, privileged_creator.map(String::as_str)),
            )
            .await?
            .to_string())
    }

    async fn kick(
        &self,
        room_id: &str,
        by: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), BridgeError> {
        Ok(self
            .client
            .kick(&room(room_id)?, &user(by)?, &user(target)?, reason)
            .await?)
    }

    async fn invite(&self, room_id: &str, by: &str, invitee: &str) -> Result<(), BridgeError> {
        match self
            .client
            .invite(&room(room_id)?, &user(by)?, &user(invitee)?)
            .await
        {
            Ok(()) => Ok(()),
            // Already in the room (or invited): nothing to do.
            Err(e) if e.errcode() == Some("M_FORBIDDEN") && e.to_string().contains("already") => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn send_message(
        &self,
        room_id: &str,
        as_user: &str,
        content: AnyMessageLikeEventContent,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError> {
        let event_type = MessageLikeEventContent::event_type(&content).to_string();
        let json = serde_json::to_value(&content)
            .map_err(|e| BridgeError::Matrix(format!("cannot serialize {event_type}: {e}")))?;
        self.send_maybe_encrypted(room_id, as_user, &event_type, json, txn_id, ts)
            .await
    }

    async fn send_event(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        content: serde_json::Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError> {
        self.send_maybe_encrypted(room_id, as_user, event_type, content, txn_id, ts)
            .await
    }

    async fn send_state(
        &self,
        room_id: &str,
        as_user: &str,
        content: AnyStateEventContent,
        state_key: &str,
    ) -> Result<String, BridgeError> {
        let (event_type, content) = state_json(&content)?;
        self.send_state_json(room_id, as_user, &event_type, state_key, content)
            .await
    }

    async fn send_state_json(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String, BridgeError> {
        Ok(self
            .client
            .send_state(
                &room(room_id)?,
                &user(as_user)?,
                event_type,
                state_key,
                &content,
            )
            .await?)
    }

    async fn state_json(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>, BridgeError> {
        match self
            .client
            .room_state(&room(room_id)?, &user(as_user)?, event_type, state_key)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn redact(
        &self,
        room_id: &str,
        as_user: &str,
        event_id: &str,
    ) -> Result<(), BridgeError> {
        let (room_id, as_user) = (room(room_id)?, user(as_user)?);
        match self.client.redact(&room_id, &as_user, event_id, None).await {
            Err(e) if self.rejoin_ghost(&room_id, &as_user, &e).await => Ok(self
                .client
                .redact(&room_id, &as_user, event_id, None)
                .await?),
            r => Ok(r?),
        }
    }

    async fn read_receipt(
        &self,
        room_id: &str,
        as_user: &str,
        event_id: &str,
    ) -> Result<(), BridgeError> {
        Ok(self
            .client
            .read_receipt(&room(room_id)?, &user(as_user)?, event_id)
            .await?)
    }

    async fn typing(&self, room_id: &str, as_user: &str, typing: bool) -> Result<(), BridgeError> {
        Ok(self
            .client
            .typing(&room(room_id)?, &user(as_user)?, typing)
            .await?)
    }

    async fn upload(
        &self,
        as_user: &str,
        data: Vec<u8>,
        mimetype: &str,
        filename: Option<&str>,
    ) -> Result<String, BridgeError> {
        Ok(self
            .client
            .upload(&user(as_user)?, data, mimetype, filename)
            .await?
            .to_string())
    }

    async fn download(&self, mxc: &str) -> Result<(Vec<u8>, Option<String>), BridgeError> {
        Ok(self.client.download(mxc, self.max_media_bytes).await?)
    }

    async fn upload_for_room(
        &self,
        room_id: &str,
        as_user: &str,
        data: Vec<u8>,
        mimetype: &str,
        filename: &str,
    ) -> Result<MediaSource, BridgeError> {
        if self.is_encrypted(room_id).await {
            let (ciphertext, file) = Crypto::encrypt_attachment(&data)
                .map_err(|e| BridgeError::Matrix(e.to_string()))?;
            let mxc = self
                .client
                .upload(
                    &user(as_user)?,
                    ciphertext,
                    "application/octet-stream",
                    None,
                )
                .await?;
            let file = serde_json::from_value(crypto::file_with_url(file, mxc.as_str()))
                .map_err(|e| BridgeError::Matrix(format!("an encrypted file's keys: {e}")))?;
            Ok(MediaSource::Encrypted(Box::new(file)))
        } else {
            let mxc = self
                .client
                .upload(&user(as_user)?, data, mimetype, Some(filename))
                .await?;
            Ok(MediaSource::Plain(mxc))
        }
    }

    async fn download_content(
        &self,
        source: &MediaSource,
    ) -> Result<(Vec<u8>, Option<String>), BridgeError> {
        match source {
            MediaSource::Encrypted(file) => {
                let (ciphertext, _) = self
                    .client
                    .download(file.url.as_str(), self.max_media_bytes)
                    .await?;
                let file = serde_json::to_value(file)
                    .map_err(|e| BridgeError::MatrixRefused(e.to_string()))?;
                let plain = Crypto::decrypt_attachment(&ciphertext, &file)
                    .map_err(|e| BridgeError::MatrixRefused(e.to_string()))?;
                Ok((plain, None))
            }
            MediaSource::Plain(url) => Ok(self
                .client
                .download(url.as_str(), self.max_media_bytes)
                .await?),
        }
    }

    async fn is_encrypted(&self, room_id: &str) -> bool {
        match self.crypto.get() {
            Some(c) => c.is_encrypted(room_id).await,
            None => false,
        }
    }

    async fn mark_encrypted(&self, room_id: &str) {
        if let Some(c) = self.crypto.get() {
            c.mark_encrypted(room_id).await;
        }
    }

    async fn discard_room_key(&self, room_id: &str) {
        if let Some(c) = self.crypto.get() {
            c.discard_room_key(room_id).await;
        }
    }
}

/// A state event's type and content as sent: an absent field is left out, not null (ruma writes
/// a removed avatar as `url: null`).
fn state_json(content: &AnyStateEventContent) -> Result<(String, serde_json::Value), BridgeError> {
    let event_type = StateEventContent::event_type(content).to_string();
    let mut json = serde_json::to_value(content)
        .map_err(|e| BridgeError::Matrix(format!("cannot serialize {event_type}: {e}")))?;
    if let Some(fields) = json.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
    }
    Ok((event_type, json))
}

/// The `createRoom` body (the spec's shape) of a portal's room; `privileged_creator` is left
/// out of the power levels.
fn create_room_body(room: &NewRoom, privileged_creator: Option<&str>) -> serde_json::Value {
    let b = &room.bridge;
    let bridge_info = json!({
        "bridgebot": b.bot,
        "creator": b.bot,
        "protocol": {"id": b.protocol.0, "displayname": b.protocol.1},
        "channel": {"id": b.channel.0, "displayname": b.channel.1},
    });
    let state_key = format!("net.{0}://{0}/{1}", b.protocol.0, b.channel.0);
    let mut initial_state = vec![
        json!({"type": "m.bridge", "state_key": state_key, "content": bridge_info}),
        json!({"type": "uk.half-shot.bridge", "state_key": state_key, "content": bridge_info}),
    ];
    if let Some(mxc) = &room.avatar_mxc {
        initial_state
            .push(json!({"type": "m.room.avatar", "state_key": "", "content": {"url": mxc}}));
    }
    if room.encrypted {
        initial_state.push(json!({"type": "m.room.encryption", "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"}}));
    }
    let pl = &room.power_levels;
    let users: serde_json::Map<String, serde_json::Value> = pl
        .users
        .iter()
        .filter(|(u, _)| Some(u.as_str()) != privileged_creator)
        .map(|(u, level)| (u.clone(), json!(level)))
        .collect();
    let mut body = json!({
        "preset": "private_chat",
        "is_direct": room.is_direct,
        "invite": room.invite,
        "initial_state": initial_state,
        "power_level_content_override": {
            "users": users,
            "redact": pl.redact,
            "kick": pl.kick,
            "ban": pl.ban,
            "events": pl.events,
        },
    });
    if let Some(name) = &room.name {
        body["name"] = json!(name);
    }
    if room.space {
        body["creation_content"] = json!({"type": "m.space"});
    }
    body
}

impl MatrixSide {
    /// Sends a message event, encrypted with the sender's device when the room is encrypted.
    async fn send_maybe_encrypted(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        content: serde_json::Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError> {
        let key = (room_id.to_owned(), as_user.to_owned(), txn_id.to_owned());
        let (room_id_parsed, user_parsed) = (room(room_id)?, user(as_user)?);
        if self.was_unsure(&key) {
            // The last try may have reached the homeserver: look before sending again.
            if let Some(id) = self
                .client
                .find_sent(&room_id_parsed, &user_parsed, TXN_FIELD, txn_id)
                .await?
            {
                self.forget_unsure(&key);
                return Ok(id);
            }
        }
        let (event_type, mut content) = match self.crypto.get() {
            Some(c) if c.is_encrypted(room_id).await => {
                let enc = c.encrypt(room_id, as_user, event_type, &content).await?;
                ("m.room.encrypted", enc)
            }
            _ => (event_type, content),
        };
        if let Some(obj) = content.as_object_mut() {
            obj.insert(TXN_FIELD.to_owned(), txn_id.into());
        }
        let mut rejoined = false;
        let sent = loop {
            let sent = self
                .client
                .send_message(
                    &room_id_parsed,
                    &user_parsed,
                    event_type,
                    &content,
                    txn_id,
                    ts,
                )
                .await;
            match &sent {
                Err(e)
                    if !rejoined && self.rejoin_ghost(&room_id_parsed, &user_parsed, e).await =>
                {
                    rejoined = true;
                }
                _ => break sent,
            }
        };
        match sent {
            Ok(id) => {
                self.forget_unsure(&key);
                Ok(id)
            }
            Err(e) => {
                if e.outcome_unknown() {
                    self.remember_unsure(key);
                }
                Err(e.into())
            }
        }
    }

    /// After `e` refused an action of `as_user` in `room_id`: when `as_user` is a ghost that
    /// is not in the room (it left, was never joined after a crash, or the action raced its
    /// join), the bot invites it and it joins. Returns whether the action is worth one more try.
    ///
    /// The core only acts as a ghost in the portal of a chat the contact is in on the network,
    /// so a ghost missing from its portal is a gap to repair, not a decision to respect.
    async fn rejoin_ghost(
        &self,
        room_id: &ruma::RoomId,
        as_user: &ruma::UserId,
        e: &MatrixError,
    ) -> bool {
        let not_in_room =
            matches!(e, MatrixError::Api { status: 403, errcode, .. } if errcode == "M_FORBIDDEN");
        if !not_in_room || !self.is_ghost(as_user.as_str()) {
            return false;
        }
        // The connector's invite, which takes "already in the room" as done: then the join is
        // what is missing, or the refusal was for another reason and the retry says so.
        if let Err(e) =
            MatrixConnector::invite(self, room_id.as_str(), &self.bot, as_user.as_str()).await
        {
            tracing::debug!(error = %e, "cannot invite a ghost back into its portal");
            return false;
        }
        match self.client.join(room_id, as_user).await {
            Ok(()) => {
                tracing::info!(%room_id, ghost = %as_user, "a ghost refused in its portal was (re)joined to it");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "a ghost cannot join its portal");
                false
            }
        }
    }

    fn was_unsure(&self, key: &(String, String, String)) -> bool {
        self.unsure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    fn remember_unsure(&self, key: (String, String, String)) {
        let mut unsure = self.unsure.lock().unwrap_or_else(|p| p.into_inner());
        if !unsure.contains(&key) {
            unsure.push_back(key);
        }
        while unsure.len() > MAX_UNSURE {
            unsure.pop_front();
        }
    }

    fn forget_unsure(&self, key: &(String, String, String)) {
        self.unsure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| k != key);
    }

    /// Turns on encryption for everything sent from now on.
    pub fn set_crypto(&self, crypto: Arc<Crypto>) {
        let _ = self.crypto.set(crypto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homeserver_answers_carry_their_retry_class() {
        use mib_core::RetryClass;
        let api = |status, errcode: &str, retry_after| MatrixError::Api {
            status,
            errcode: errcode.into(),
            message: String::new(),
            retry_after,
        };
        let class = |e: MatrixError| BridgeError::from(e).retry_class();
        assert_eq!(class(api(413, "M_TOO_LARGE", None)), RetryClass::Permanent);
        assert_eq!(class(api(403, "M_FORBIDDEN", None)), RetryClass::Permanent);
        assert_eq!(
            class(api(
                429,
                "M_LIMIT_EXCEEDED",
                Some(std::time::Duration::from_millis(1500))
            )),
            RetryClass::After(std::time::Duration::from_millis(1500))
        );
        assert_eq!(class(api(502, "M_UNKNOWN", None)), RetryClass::Transient);
        assert_eq!(
            class(MatrixError::Network("refused".into())),
            RetryClass::Waiting
        );
    }

    #[test]
    fn portal_rooms_carry_bridge_state_and_power_levels() {
        use mib_core::types::{BridgeInfo, PowerLevels};
        let room = NewRoom {
            name: Some("Friends".into()),
            is_direct: false,
            invite: vec!["@alice:x".into(), "@interop_1:x".into()],
            bridge: BridgeInfo {
                bot: "@bot:x".into(),
                protocol: ("interop".into(), "Interop".into()),
                channel: ("g1".into(), "Friends".into()),
            },
            power_levels: PowerLevels {
                users: [("@bot:x".into(), 100), ("@alice:x".into(), 75)].into(),
                redact: 75,
                kick: 75,
                ban: 75,
                events: [("m.bridge".into(), 100)].into(),
            },
            avatar_mxc: Some("mxc://x/a".into()),
            encrypted: true,
            space: false,
        };
        let body = create_room_body(&room, None);
        assert_eq!(body["name"], "Friends");
        assert_eq!(body["preset"], "private_chat");
        assert_eq!(body["is_direct"], false);
        let state = body["initial_state"].as_array().unwrap();
        let of = |ty: &str| state.iter().find(|s| s["type"] == ty).cloned().unwrap();
        assert_eq!(of("m.bridge")["state_key"], "net.interop://interop/g1");
        assert_eq!(
            of("m.bridge")["content"]["channel"]["displayname"],
            "Friends"
        );
        assert_eq!(
            of("m.bridge")["content"],
            of("uk.half-shot.bridge")["content"]
        );
        assert_eq!(of("m.room.avatar")["content"]["url"], "mxc://x/a");
        assert_eq!(
            of("m.room.encryption")["content"]["algorithm"],
            "m.megolm.v1.aes-sha2"
        );
        let pl = &body["power_level_content_override"];
        assert_eq!(pl["users"]["@bot:x"], 100);
        assert_eq!(pl["events"]["m.bridge"], 100);
        assert_eq!(pl["redact"], 75);
        // Where creators have unlimited power (room version 12), the bot is not listed.
        let body = create_room_body(&room, Some("@bot:x"));
        assert!(
            body["power_level_content_override"]["users"]
                .get("@bot:x")
                .is_none()
        );
        assert_eq!(
            body["power_level_content_override"]["users"]["@alice:x"],
            75
        );
        // Typed state leaves absent fields out.
        let removed = ruma::events::room::avatar::RoomAvatarEventContent::new();
        let (ty, json) = state_json(&removed.into()).unwrap();
        assert_eq!((ty.as_str(), json), ("m.room.avatar", json!({})));
        // A space says so in its creation content, and the request keeps it.
        assert_eq!(body.get("creation_content"), None);
        let space = NewRoom {
            space: true,
            ..room
        };
        let body = create_room_body(&space, None);
        assert_eq!(body["creation_content"], json!({"type": "m.space"}));
        let req = client::create_request(body).unwrap();
        let kept = req
            .creation_content
            .expect("creation content")
            .json()
            .get()
            .to_owned();
        assert_eq!(kept, r#"{"type":"m.space"}"#);
    }
}
