//! The Matrix side, outbound: the homeserver client, and the [`MatrixConnector`] the bridge core
//! uses to act as the bot or a ghost.

use std::sync::Arc;

use async_trait::async_trait;
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::json;

use crate::bridge::{BridgeError, MatrixConnector};

pub mod client;

pub use client::{HomeserverClient, MatrixError};

impl From<MatrixError> for BridgeError {
    fn from(e: MatrixError) -> Self {
        BridgeError::Matrix(e.to_string())
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
}

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
        })
    }

    pub fn arc(self) -> Arc<Self> {
        Arc::new(self)
    }
}

fn user(id: &str) -> Result<OwnedUserId, BridgeError> {
    id.try_into()
        .map_err(|e| BridgeError::Matrix(format!("invalid user id {id}: {e}")))
}

fn room(id: &str) -> Result<OwnedRoomId, BridgeError> {
    id.try_into()
        .map_err(|e| BridgeError::Matrix(format!("invalid room id {id}: {e}")))
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
    ) -> Result<String, BridgeError> {
        let content = json!({
            "msgtype": "m.notice",
            "body": body,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        });
        let txn = uuid::Uuid::new_v4().to_string();
        Ok(self
            .client
            .send_message(
                &room(room_id)?,
                &user(as_user)?,
                "m.room.message",
                &content,
                &txn,
            )
            .await?)
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

    async fn create_room(&self, mut body: serde_json::Value) -> Result<String, BridgeError> {
        // From room version 12 on, creators have unlimited power and must not be listed in the
        // power levels (MSC4289); older versions need the bot listed, or it loses its level.
        if self.creators_are_privileged().await
            && let Some(users) = body["power_level_content_override"]["users"].as_object_mut()
        {
            users.remove(&self.bot);
        }
        Ok(self
            .client
            .create_room(&user(&self.bot)?, body)
            .await?
            .to_string())
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

    async fn send_event(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        content: serde_json::Value,
        txn_id: &str,
    ) -> Result<String, BridgeError> {
        Ok(self
            .client
            .send_message(
                &room(room_id)?,
                &user(as_user)?,
                event_type,
                &content,
                txn_id,
            )
            .await?)
    }

    async fn send_state(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        state_key: &str,
        content: serde_json::Value,
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

    async fn redact(
        &self,
        room_id: &str,
        as_user: &str,
        event_id: &str,
    ) -> Result<(), BridgeError> {
        Ok(self
            .client
            .redact(&room(room_id)?, &user(as_user)?, event_id, None)
            .await?)
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
}
