//! The homeserver's rooms as the catch-up after an outage reads them
//! ([`crate::appservice::catchup`]): the bot's joined rooms, and each room's recent timeline
//! through `/messages` (Synapse refuses `/sync` to appservice users).

use serde_json::Value;

use super::{HomeserverClient, MatrixError};
use crate::appservice::catchup::Timeline;

/// Room events read per page.
const PAGE: u32 = 100;
/// Pages read back through one room: at most 1,000 events a room.
const MAX_PAGES: usize = 10;

impl HomeserverClient {
    /// The rooms the bot is in.
    pub async fn bot_joined_rooms(&self) -> Result<Vec<String>, MatrixError> {
        let answer = self
            .get_json("/_matrix/client/v3/joined_rooms", &[])
            .await?;
        Ok(answer["joined_rooms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect())
    }

    /// The events of `room` the homeserver stamped at `since_ms` or later, oldest first, read
    /// back from the newest.
    pub async fn room_events_since(
        &self,
        room: &str,
        since_ms: i64,
    ) -> Result<Vec<Value>, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages",
            url::form_urlencoded::byte_serialize(room.as_bytes()).collect::<String>()
        );
        let limit = PAGE.to_string();
        let mut from: Option<String> = None;
        let mut newest_first = Vec::new();
        for _ in 0..MAX_PAGES {
            let mut query = vec![("dir", "b"), ("limit", limit.as_str())];
            if let Some(from) = &from {
                query.push(("from", from));
            }
            let page = self.get_json(&path, &query).await?;
            let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
            let mut reached = chunk.is_empty();
            for ev in chunk {
                if ev["origin_server_ts"]
                    .as_i64()
                    .is_some_and(|ts| ts < since_ms)
                {
                    reached = true;
                    break;
                }
                newest_first.push(ev);
            }
            match page["end"].as_str() {
                Some(end) if !reached => from = Some(end.to_owned()),
                _ => return Ok(with_room(newest_first, room)),
            }
        }
        tracing::warn!(
            room,
            "catch-up: more events than it reads in one room; the oldest are left"
        );
        Ok(with_room(newest_first, room))
    }
}

/// Oldest first, each with its `room_id`.
fn with_room(newest_first: Vec<Value>, room: &str) -> Vec<Value> {
    newest_first
        .into_iter()
        .rev()
        .filter_map(|mut ev| {
            ev.as_object_mut()?
                .insert("room_id".into(), Value::String(room.to_owned()));
            Some(ev)
        })
        .collect()
}

#[async_trait::async_trait]
impl Timeline for HomeserverClient {
    async fn alive(&self) -> bool {
        self.versions().await.is_ok()
    }

    async fn rooms(&self) -> Result<Vec<String>, String> {
        self.bot_joined_rooms().await.map_err(|e| e.to_string())
    }

    async fn events_since(&self, room: &str, since_ms: i64) -> Result<Vec<Value>, String> {
        self.room_events_since(room, since_ms)
            .await
            .map_err(|e| e.to_string())
    }

    fn outage_seen(&self) -> bool {
        self.take_outage()
    }
}
