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
    ghost_re: regex::Regex,
}

impl MatrixSide {
    pub fn new(client: HomeserverClient, bot: String, ghost_regex: &str) -> Result<Self, regex::Error> {
        Ok(Self { client, bot, ghost_re: regex::Regex::new(&format!("^{ghost_regex}$"))? })
    }

    pub fn arc(self) -> Arc<Self> {
        Arc::new(self)
    }
}

fn user(id: &str) -> Result<OwnedUserId, BridgeError> {
    id.try_into().map_err(|e| BridgeError::Matrix(format!("invalid user id {id}: {e}")))
}

fn room(id: &str) -> Result<OwnedRoomId, BridgeError> {
    id.try_into().map_err(|e| BridgeError::Matrix(format!("invalid room id {id}: {e}")))
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

    async fn send_notice(&self, room_id: &str, as_user: &str, body: &str, html: &str) -> Result<String, BridgeError> {
        let content = json!({
            "msgtype": "m.notice",
            "body": body,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        });
        let txn = uuid::Uuid::new_v4().to_string();
        Ok(self.client.send_message(&room(room_id)?, &user(as_user)?, "m.room.message", &content, &txn).await?)
    }

    async fn joined_members(&self, room_id: &str, as_user: &str) -> Result<Vec<String>, BridgeError> {
        let members = self.client.joined_members(&room(room_id)?, &user(as_user)?).await?;
        Ok(members.into_iter().map(|m| m.to_string()).collect())
    }
}
