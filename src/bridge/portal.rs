//! Portals: one Matrix room per interop chat of a login, ghosts for contacts, and messages in
//! both directions through the message map (replies, edits, reactions, deletions, receipts).

use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    Bridge, BridgeError,
    model::{Body as D, Delete, Edit, Location, Media, MediaKind, Message, Quote, Reaction, Text},
    msgconv,
    network::{GroupInfo, NetAccount, NetError, NetEvent, NetTarget},
};
use crate::{
    config::PermissionLevel,
    store::portal::{MappedMessage, Portal, PortalKind},
};

impl From<NetError> for BridgeError {
    fn from(e: NetError) -> Self {
        if e.is_transient() {
            BridgeError::NotReady(e.to_string())
        } else {
            BridgeError::Network(e.to_string())
        }
    }
}

/// A stable id for what we send, so a retried send is deduplicated downstream.
/// The number of per-chat creation locks kept before the unused ones are dropped.
const MAX_IDLE_PORTAL_LOCKS: usize = 1024;

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
    pub(crate) fn ghost_localpart(&self, account: &str) -> String {
        self.settings
            .username_template
            .replace("{id}", account.trim_start_matches('+'))
    }

    pub(crate) fn ghost_mxid(&self, account: &str) -> String {
        format!(
            "@{}:{}",
            self.ghost_localpart(account),
            self.settings.homeserver_domain
        )
    }

    /// The interop account a ghost stands for.
    pub(crate) fn account_of_ghost(&self, mxid: &str) -> Option<String> {
        let (prefix, suffix) = self.settings.username_template.split_once("{id}")?;
        let local = mxid
            .strip_prefix('@')?
            .strip_suffix(&format!(":{}", self.settings.homeserver_domain))?;
        let digits = local.strip_prefix(prefix)?.strip_suffix(suffix)?;
        let account = format!("+{digits}");
        self.network.is_valid_account(&account).then_some(account)
    }

    /// The portal of `chat` for `receiver`, with its room created when missing.
    pub(crate) async fn ensure_portal(
        &self,
        receiver: &str,
        acc: &Arc<dyn NetAccount>,
        chat: &NetTarget,
        group: Option<&GroupInfo>,
    ) -> Result<Portal, BridgeError> {
        let (chat_id, kind) = match chat {
            NetTarget::Contact(a) => (a.clone(), PortalKind::Dm),
            NetTarget::Group(g) => (g.clone(), PortalKind::Group),
        };
        // Fast path without any lock: the portal exists.
        if let Some(p) = self.portals.portal(receiver, &chat_id).await?
            && p.room_id.is_some()
        {
            return Ok(p);
        }
        // One creator per chat; other chats are not held up.
        let lock = {
            let mut locks = self.portal_locks.lock().await;
            // Locks nobody holds (only the map has them) go, so the map stays small.
            if locks.len() >= MAX_IDLE_PORTAL_LOCKS {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks
                .entry((receiver.to_owned(), chat_id.clone()))
                .or_default()
                .clone()
        };
        let _guard = lock.lock().await;
        if let Some(p) = self.portals.portal(receiver, &chat_id).await?
            && p.room_id.is_some()
        {
            return Ok(p);
        }
        let bot = self.matrix.bot_mxid().to_owned();
        let me = acc.account_id().to_owned();
        // A group first seen through a message: ask the network what it is.
        let fetched;
        let group = match (chat, group) {
            (NetTarget::Group(id), None) => match acc.group(id).await {
                Ok(g) => {
                    fetched = g;
                    Some(&fetched)
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                // E.g. no longer a member: the portal starts without the member list.
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look up a group");
                    None
                }
            },
            (_, g) => g,
        };
        let (name, members) = match (chat, group) {
            (NetTarget::Contact(a), _) => (String::new(), vec![a.clone()]),
            (NetTarget::Group(_), Some(g)) => (g.name.clone(), g.members.clone()),
            (NetTarget::Group(_), None) => (String::new(), vec![]),
        };
        let mut ghosts = Vec::new();
        for m in members.iter().filter(|m| **m != me) {
            ghosts.push(self.ghost(m, Some(acc)).await?);
        }
        let bridge_info = json!({
            "bridgebot": bot,
            "creator": bot,
            "protocol": {"id": "interop", "displayname": "Interop"},
            "channel": {"id": chat_id, "displayname": if name.is_empty() { chat_id.clone() } else { name.clone() }},
        });
        let state_key = format!("net.interop://interop/{chat_id}");
        let mut users = serde_json::Map::new();
        users.insert(bot.clone(), json!(100));
        for g in &ghosts {
            users.insert(g.clone(), json!(50));
        }
        // The owner outranks the ghosts in a group, so it can remove a contact from the group by
        // kicking its ghost.
        let owner_level = if kind == PortalKind::Group { 75 } else { 50 };
        users.insert(receiver.to_owned(), json!(owner_level));
        let mut invite = vec![receiver.to_owned()];
        invite.extend(ghosts.iter().cloned());
        let mut body = json!({
            "preset": "private_chat",
            "is_direct": kind == PortalKind::Dm,
            "invite": invite,
            "initial_state": [
                {"type": "m.bridge", "state_key": state_key, "content": bridge_info},
                {"type": "uk.half-shot.bridge", "state_key": state_key, "content": bridge_info},
            ],
            "power_level_content_override": portal_power_levels(users),
        });
        if kind == PortalKind::Group && !name.is_empty() {
            body["name"] = json!(name);
        }
        let avatar_blob = group.map(|g| g.avatar_blob.clone()).unwrap_or_default();
        let avatar_mxc = match self.avatar_to_matrix(acc, &avatar_blob).await {
            Ok(mxc) => mxc,
            Err(e) => {
                tracing::warn!(error = %e, "cannot copy a group's avatar");
                String::new()
            }
        };
        if !avatar_mxc.is_empty()
            && let Some(state) = body["initial_state"].as_array_mut()
        {
            state.push(
                json!({"type": "m.room.avatar", "state_key": "", "content": {"url": avatar_mxc}}),
            );
        }
        let encrypted = self.settings.encryption_default || self.settings.encryption_require;
        if encrypted && let Some(state) = body["initial_state"].as_array_mut() {
            state.push(json!({"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}));
        }
        let room_id = self.matrix.create_room(body).await?;
        if encrypted {
            self.matrix.mark_encrypted(&room_id).await;
        }
        for g in &ghosts {
            self.matrix.join(&room_id, g).await?;
        }
        let portal = Portal {
            receiver: receiver.to_owned(),
            chat_id,
            kind,
            room_id: Some(room_id),
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
        tracing::info!(room_id = portal.room_id.as_deref(), kind = ?kind, "portal created");
        Ok(portal)
    }

    /// Handles one event of the login of `mxid`.
    pub async fn on_network_event(&self, mxid: &str, ev: &NetEvent) -> Result<(), BridgeError> {
        let Some(acc) = self.network.account(mxid) else {
            return Ok(());
        };
        match ev {
            NetEvent::Message {
                from,
                group,
                message_id,
                data,
                timestamp,
                ..
            } => {
                let chat = match group {
                    Some(g) => NetTarget::Group(g.clone()),
                    None => NetTarget::Contact(from.clone()),
                };
                let gate = self
                    .request_gate(
                        mxid,
                        &acc,
                        &chat,
                        from,
                        Some((message_id.as_str(), *timestamp, data)),
                    )
                    .await?;
                if gate == super::requests::Gate::Closed {
                    return Ok(());
                }
                let started = std::time::Instant::now();
                let portal = self.ensure_portal(mxid, &acc, &chat, None).await?;
                self.bridge_incoming(&portal, &acc, from, message_id, *timestamp, data)
                    .await?;
                self.metrics.message_bridged("interop_to_matrix", started);
                // Delivered: the message reached the user's Matrix side (as a phone would say
                // once it has the message). Sent in the background, so it costs the loop nothing.
                let plain = matches!(
                    data.body,
                    Some(D::Text(_) | D::Media(_) | D::Location(_) | D::Contact(_))
                );
                if plain && from != acc.account_id() {
                    let (acc, from, group, id) =
                        (acc.clone(), from.clone(), group.clone(), message_id.clone());
                    tokio::spawn(async move {
                        if let Err(e) = acc.receipt(&from, group.as_deref(), false, vec![id]).await
                        {
                            tracing::debug!(error = %e, "delivery receipt not sent");
                        }
                    });
                }
                Ok(())
            }
            NetEvent::Receipt {
                from,
                group,
                read,
                message_ids,
                ..
            } => {
                if !read {
                    return Ok(());
                }
                let chat_id = group.clone().unwrap_or_else(|| from.clone());
                let Some(portal) = self.portals.portal(mxid, &chat_id).await? else {
                    return Ok(());
                };
                let Some(room) = portal.room_id.as_deref() else {
                    return Ok(());
                };
                let ghost = self.ghost(from, Some(&acc)).await?;
                let mut last = None;
                for id in message_ids {
                    if let Some(m) = self.portals.by_message(room, id, "").await? {
                        last = Some(m.event_id);
                    }
                }
                if let Some(event_id) = last {
                    self.matrix.read_receipt(room, &ghost, &event_id).await?;
                }
                Ok(())
            }
            NetEvent::Typing {
                from,
                group,
                typing,
            } => {
                let chat_id = group.clone().unwrap_or_else(|| from.clone());
                if let Some(Portal {
                    room_id: Some(room),
                    ..
                }) = self.portals.portal(mxid, &chat_id).await?
                {
                    let ghost = self.ghost(from, Some(&acc)).await?;
                    self.matrix.typing(&room, &ghost, *typing).await?;
                }
                Ok(())
            }
            NetEvent::GroupUpdate { group, from, .. } => {
                self.on_group_update(mxid, &acc, group, from).await
            }
            NetEvent::IdentityChanged { peer } => {
                if let Some(Portal {
                    room_id: Some(room),
                    ..
                }) = self.portals.portal(mxid, peer).await?
                {
                    let text = format!(
                        "The safety number with {peer} changed: their device or app was reinstalled, or someone \
                         else may be using their account. Verify it with them if this is unexpected."
                    );
                    self.notice(&room, &text).await?;
                }
                Ok(())
            }
            NetEvent::Undecryptable {
                from,
                group,
                reason,
                ..
            } => {
                let chat_id = group.clone().unwrap_or_else(|| from.clone());
                if let Some(Portal {
                    room_id: Some(room),
                    ..
                }) = self.portals.portal(mxid, &chat_id).await?
                {
                    self.notice(
                        &room,
                        &format!("A message from {from} could not be decrypted ({reason})."),
                    )
                    .await?;
                }
                Ok(())
            }
            NetEvent::LoggedOut { reason } => {
                if let Some(room) = self.users.management_room(mxid).await? {
                    self.notice(
                        &room,
                        &format!(
                            "Your interop login ended: {reason}. Send `login` to log in again."
                        ),
                    )
                    .await?;
                }
                Ok(())
            }
            NetEvent::Connected | NetEvent::Disconnected { .. } => Ok(()),
        }
    }

    pub(crate) async fn notice(&self, room: &str, text: &str) -> Result<(), BridgeError> {
        self.reply(room, text, &msgconv::escape(text)).await
    }

    /// interop → Matrix for one data message.
    pub(crate) async fn bridge_incoming(
        &self,
        portal: &Portal,
        acc: &Arc<dyn NetAccount>,
        from: &str,
        message_id: &str,
        timestamp: u64,
        data: &Message,
    ) -> Result<(), BridgeError> {
        let room = portal
            .room_id
            .clone()
            .ok_or_else(|| BridgeError::Matrix("portal without room".into()))?;
        // The sender's time, so that a backlog does not show up as "now"; never in the future.
        let ts = (timestamp > 0).then(|| timestamp.min(crate::store::now_ms() as u64));
        if self
            .portals
            .by_message(&room, message_id, "")
            .await?
            .is_some()
        {
            return Ok(()); // redelivered, already bridged
        }
        let me = acc.account_id();
        let sender = if from == me {
            self.matrix.bot_mxid().to_owned()
        } else {
            self.ghost(from, Some(acc)).await?
        };
        let txn = stable_id(&["in", &room, from, message_id]);
        let reply_to = match &data.reply_to {
            Some(q) => self.portals.by_message(&room, &q.message_id, "").await?,
            None => None,
        };
        let mut content = match &data.body {
            Some(D::Text(t)) => text_content(t, "m.text"),
            Some(D::Edit(e)) => {
                let Some(target) = self.portals.by_message(&room, &e.target, "").await? else {
                    return Err(BridgeError::TargetNotYet(e.target.clone()));
                };
                if target.sender != from {
                    tracing::info!(%room, "dropping an edit of a message its sender did not write");
                    self.metrics.refused("interop_edit_not_author");
                    return Ok(());
                }
                let t = e.text.clone().unwrap_or_default();
                let new = text_content(&t, "m.text");
                // The fallback for clients without edits is short: the event must hold the new
                // content too, within the homeserver's 64 KiB.
                let mut c = text_content(
                    &Text {
                        body: format!("* {}", msgconv::preview(&t.body, 500)),
                        formats: vec![],
                    },
                    "m.text",
                );
                c["m.new_content"] = new;
                c["m.relates_to"] = json!({"rel_type": "m.replace", "event_id": target.event_id});
                let ev = self
                    .matrix
                    .send_event(&room, &sender, "m.room.message", c, &txn, ts)
                    .await?;
                return self
                    .map(&room, &ev, message_id, from, &sender, "edit")
                    .await;
            }
            Some(D::Delete(d)) => {
                let Some(target) = self.portals.by_message(&room, &d.target, "").await? else {
                    return Err(BridgeError::TargetNotYet(d.target.clone()));
                };
                if target.sender != from {
                    tracing::info!(%room, "dropping a deletion of a message its sender did not write");
                    self.metrics.refused("interop_delete_not_author");
                    return Ok(());
                }
                // The mapping goes once the redaction went out (a failed one is tried again).
                self.matrix.redact(&room, &sender, &target.event_id).await?;
                self.portals.unmap_event(&room, &target.event_id).await?;
                return self
                    .map(&room, "", message_id, from, &sender, "delete")
                    .await;
            }
            Some(D::Reaction(r)) => {
                let part = reaction_part(from, &r.emoji);
                if r.remove {
                    if let Some(m) = self.portals.by_message(&room, &r.target, &part).await? {
                        self.matrix.redact(&room, &sender, &m.event_id).await?;
                        self.portals.unmap_event(&room, &m.event_id).await?;
                    }
                    return Ok(());
                }
                let Some(target) = self.portals.by_message(&room, &r.target, "").await? else {
                    return Err(BridgeError::TargetNotYet(r.target.clone()));
                };
                if self
                    .portals
                    .by_message(&room, &r.target, &part)
                    .await?
                    .is_some()
                {
                    return Ok(());
                }
                let c = json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": target.event_id, "key": r.emoji}});
                let ev = self
                    .matrix
                    .send_event(&room, &sender, "m.reaction", c, &txn, ts)
                    .await?;
                return self.map(&room, &ev, &r.target, from, &sender, &part).await;
            }
            Some(D::Media(m)) => self.media_to_matrix(&room, acc, &sender, m).await?,
            Some(D::Location(l)) => json!({
                "msgtype": "m.location",
                "body": msgconv::bounded_body(&msgconv::location_text(l)),
                "geo_uri": format!("geo:{},{}", l.latitude, l.longitude),
            }),
            Some(D::Contact(c)) => {
                json!({"msgtype": "m.text", "body": msgconv::bounded_body(&msgconv::contact_text(c))})
            }
            None => {
                json!({"msgtype": "m.notice", "body": "(an empty or unsupported message was received)"})
            }
        };
        if let Some(target) = reply_to {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": target.event_id}});
        }
        let ev = self
            .matrix
            .send_event(&room, &sender, "m.room.message", content, &txn, ts)
            .await?;
        self.map(&room, &ev, message_id, from, &sender, "").await
    }

    async fn map(
        &self,
        room: &str,
        event_id: &str,
        message_id: &str,
        sender: &str,
        matrix_sender: &str,
        part: &str,
    ) -> Result<(), BridgeError> {
        let event_id = if event_id.is_empty() {
            format!("$none-{message_id}-{part}")
        } else {
            event_id.to_owned()
        };
        self.portals
            .map_message(&MappedMessage {
                room_id: room.to_owned(),
                event_id,
                message_id: message_id.to_owned(),
                sender: sender.to_owned(),
                part: part.to_owned(),
                matrix_sender: matrix_sender.to_owned(),
            })
            .await?;
        Ok(())
    }

    async fn media_to_matrix(
        &self,
        room: &str,
        acc: &Arc<dyn NetAccount>,
        sender: &str,
        m: &Media,
    ) -> Result<Value, BridgeError> {
        let max = self.settings.bridge.max_media_size;
        if m.size > max {
            self.metrics.refused("media_too_large");
            return Ok(json!({"msgtype": "m.notice", "body": format!(
                "A file of {} was not bridged: it is larger than this bridge's limit of {}.",
                human_size(m.size), human_size(max)
            )}));
        }
        let data = match acc.download(&m.blob, &m.key, &m.sha256, max).await {
            Ok(d) if m.size == 0 || d.len() as u64 == m.size => d,
            Err(e) if e.is_transient() => return Err(e.into()),
            // Over the limit after all, not the size its sender declared, or not what its hash
            // says: the sender's doing, so the room hears of it and nothing is retried.
            other => {
                self.metrics.refused("media_refused");
                let why = match other {
                    Ok(_) => "it is not the size its sender declared".to_owned(),
                    Err(e) => e.to_string(),
                };
                return Ok(
                    json!({"msgtype": "m.notice", "body": format!("A file was not bridged: {why}.")}),
                );
            }
        };
        let size = data.len();
        let mime = if m.mimetype.is_empty() {
            "application/octet-stream".to_owned()
        } else {
            m.mimetype.clone()
        };
        let filename = if m.filename.is_empty() {
            default_filename(m, &mime)
        } else {
            msgconv::preview(&m.filename, 255).into_owned()
        };
        let media_fields = self
            .matrix
            .upload_for_room(room, sender, data, &mime, &filename)
            .await?;
        let kind = m.kind;
        let msgtype = match kind {
            MediaKind::Image | MediaKind::Sticker => "m.image",
            MediaKind::Video => "m.video",
            MediaKind::Audio | MediaKind::Voice => "m.audio",
            _ => "m.file",
        };
        let mut info = json!({"mimetype": mime, "size": size});
        if m.width > 0 && m.height > 0 {
            info["w"] = json!(m.width);
            info["h"] = json!(m.height);
        }
        if m.duration_ms > 0 {
            info["duration"] = json!(m.duration_ms);
        }
        if !m.thumbnail.is_empty() {
            let thumb = self
                .matrix
                .upload_for_room(
                    room,
                    sender,
                    m.thumbnail.clone(),
                    "image/jpeg",
                    "thumbnail.jpg",
                )
                .await?;
            if let Some(url) = thumb.get("url") {
                info["thumbnail_url"] = url.clone();
            }
            if let Some(file) = thumb.get("file") {
                info["thumbnail_file"] = file.clone();
            }
            info["thumbnail_info"] = json!({"mimetype": "image/jpeg", "size": m.thumbnail.len()});
        }
        let caption = m.caption.as_ref().filter(|c| !c.body.is_empty());
        let mut content = json!({"msgtype": msgtype, "info": info, "filename": filename});
        if let (Some(c), Some(fields)) = (content.as_object_mut(), media_fields.as_object()) {
            for (k, v) in fields {
                c.insert(k.clone(), v.clone());
            }
        }
        match caption {
            // Bounded like any text.
            Some(c) => {
                let text = text_content(c, msgtype);
                for k in ["body", "format", "formatted_body"] {
                    if let Some(v) = text.get(k) {
                        content[k] = v.clone();
                    }
                }
            }
            None => content["body"] = json!(filename),
        }
        if kind == MediaKind::Voice {
            content["org.matrix.msc3245.voice"] = json!({});
            content["org.matrix.msc1767.audio"] = json!({"duration": m.duration_ms, "waveform": m.waveform.iter().take(1024).collect::<Vec<_>>()});
        }
        Ok(content)
    }

    /// Matrix → interop for one event in a portal room.
    pub(crate) async fn on_portal_event(
        &self,
        portal: Portal,
        ev: &Value,
    ) -> Result<(), BridgeError> {
        let started = std::time::Instant::now();
        let sender = ev["sender"].as_str().unwrap_or_default();
        let room = portal.room_id.clone().unwrap_or_default();
        let event_id = ev["event_id"].as_str().unwrap_or_default();
        let ty = ev["type"].as_str().unwrap_or_default();
        if !matches!(
            ty,
            "m.room.message" | "m.reaction" | "m.room.redaction" | "m.sticker"
        ) {
            return Ok(());
        }
        // Whose login sends it: the portal's owner, or the relay for others.
        if self.settings.encryption_require && !self.matrix.is_encrypted(&room).await {
            if ty == "m.room.message" {
                self.not_bridged(&room, event_id, Status::Unsupported, "This bridge only bridges encrypted rooms: turn on encryption in the room settings.").await?;
            }
            return Ok(());
        }
        // Relayed messages name their sender by the full Matrix ID: a display name or a
        // localpart could pass for someone else.
        let relayed = sender != portal.receiver;
        let login_of = if relayed {
            portal.relay.as_deref().filter(|_| {
                self.settings.bridge.relay.enabled
                    && self.permission_of(sender) >= PermissionLevel::Relay
            })
        } else {
            Some(sender)
        };
        let Some(acc) = login_of.and_then(|l| self.network.account(l)) else {
            // A login that exists but is not connected yet (start-up, reconnect): the event
            // waits in its room's lane instead of being refused.
            if let Some(l) = login_of
                && self.portals.login(l).await?.is_some()
            {
                return Err(BridgeError::NotReady(format!(
                    "the interop login of {l} is not connected yet"
                )));
            }
            if !relayed {
                self.not_bridged(&room, event_id, Status::NoPermission, "Your message was not bridged: you are not logged in. Send `login` to the bridge bot.").await?;
            } else if ty == "m.room.message" {
                self.not_bridged(&room, event_id, Status::NoPermission, &format!("{sender}: your message was not bridged: this room has no relay and it is not your chat.")).await?;
            }
            return Ok(());
        };
        let relayed_name = relayed.then(|| sender.to_owned());
        let me = acc.account_id().to_owned();
        let target = match portal.kind {
            PortalKind::Dm => NetTarget::Contact(portal.chat_id.clone()),
            PortalKind::Group => NetTarget::Group(portal.chat_id.clone()),
        };
        let message_id = stable_id(&["out", &room, event_id]);
        let content = &ev["content"];
        let mut unmap_after: Option<String> = None;
        let data = match ty {
            // A reaction carries no text to name its sender by: from a relayed user it would
            // show as the relay's own (mautrix bridges drop them too).
            "m.reaction" if relayed_name.is_some() => return Ok(()),
            "m.reaction" => {
                let rel = &content["m.relates_to"];
                let target_ev = rel["event_id"].as_str().unwrap_or_default();
                let emoji = rel["key"].as_str().unwrap_or_default().to_owned();
                let Some(t) = self.portals.by_event(&room, target_ev).await? else {
                    return Ok(());
                };
                self.portals
                    .map_message(&MappedMessage {
                        room_id: room.clone(),
                        event_id: event_id.to_owned(),
                        message_id: t.message_id.clone(),
                        sender: me.clone(),
                        part: reaction_part(&me, &emoji),
                        matrix_sender: sender.to_owned(),
                    })
                    .await?;
                Message {
                    body: Some(D::Reaction(Reaction {
                        target: t.message_id,
                        emoji,
                        remove: false,
                        target_author: t.sender,
                    })),
                    reply_to: None,
                }
            }
            "m.room.redaction" => {
                let redacts = ev["redacts"]
                    .as_str()
                    .or_else(|| content["redacts"].as_str())
                    .unwrap_or_default();
                let Some(t) = self.portals.by_event(&room, redacts).await? else {
                    return Ok(());
                };
                if !is_author(&t, sender, &me, &portal, self.matrix.bot_mxid()) {
                    if t.part.is_empty() {
                        let text = format!(
                            "{sender}: the deletion was not bridged: only a message's author can delete it on the network."
                        );
                        self.not_bridged(&room, event_id, Status::NoPermission, &text)
                            .await?;
                    }
                    return Ok(());
                }
                // The mapping goes once the deletion was sent (below): a send that fails
                // transiently is retried and must still find it.
                unmap_after = Some(redacts.to_owned());
                if let Some(emoji) = t.part.strip_prefix(&format!("reaction:{me}:")) {
                    Message {
                        body: Some(D::Reaction(Reaction {
                            target: t.message_id,
                            emoji: emoji.to_owned(),
                            remove: true,
                            target_author: String::new(),
                        })),
                        reply_to: None,
                    }
                } else if t.part.is_empty() {
                    Message {
                        body: Some(D::Delete(Delete {
                            target: t.message_id,
                        })),
                        reply_to: None,
                    }
                } else {
                    return Ok(());
                }
            }
            _ => match self
                .matrix_to_data(&acc, &portal, sender, content, relayed_name.as_deref())
                .await
            {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(()),
                Err(reason) => {
                    let text = format!("Your message was not bridged: {reason}");
                    self.not_bridged(&room, event_id, Status::Unsupported, &text)
                        .await?;
                    return Ok(());
                }
            },
        };
        let is_plain_message = matches!(data.body, Some(D::Text(_) | D::Media(_) | D::Location(_)));
        let sent = acc.send(target, message_id.clone(), data).await;
        if let Err(e) = &sent
            && e.is_transient()
        {
            return Err(e.clone().into());
        }
        if let Some(redacted) = unmap_after {
            self.portals.unmap_event(&room, &redacted).await?;
        }
        if let Err(e) = sent {
            let text = format!("Your message was not bridged: {e}");
            self.not_bridged(&room, event_id, Status::NetworkError, &text)
                .await?;
            return Ok(());
        }
        if is_plain_message {
            self.map(&room, event_id, &message_id, &me, sender, "")
                .await?;
        }
        self.bridged(&room, event_id).await;
        self.metrics.message_bridged("matrix_to_interop", started);
        Ok(())
    }

    /// A Matrix event reached the network: the bot's read receipt on it
    /// (`bridge.delivery_receipts`) and a success status (`bridge.message_status_events`).
    async fn bridged(&self, room: &str, event_id: &str) {
        let bot = self.matrix.bot_mxid().to_owned();
        if self.settings.bridge.delivery_receipts
            && let Err(e) = self.matrix.read_receipt(room, &bot, event_id).await
        {
            tracing::debug!(error = %e, "delivery receipt not sent");
        }
        if self.settings.bridge.message_status_events
            && let Err(e) = self.send_status(room, event_id, None).await
        {
            tracing::debug!(error = %e, "message status not sent");
        }
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

    /// A `com.beeper.message_send_status` event about `event_id` (as mautrix bridges send them).
    async fn send_status(
        &self,
        room: &str,
        event_id: &str,
        failure: Option<(Status, &str)>,
    ) -> Result<(), BridgeError> {
        let mut content = json!({
            "network": "interop",
            "m.relates_to": {"rel_type": "m.reference", "event_id": event_id},
            "status": "SUCCESS",
        });
        if let Some((why, text)) = failure {
            content["status"] = json!(why.status());
            content["reason"] = json!(why.reason());
            content["message"] = json!(text);
        }
        let bot = self.matrix.bot_mxid().to_owned();
        let txn = stable_id(&["status", room, event_id]);
        self.matrix
            .send_event(
                room,
                &bot,
                "com.beeper.message_send_status",
                content,
                &txn,
                None,
            )
            .await
            .map(|_| ())
    }

    /// Converts Matrix message content; `Err` is a reason to show the user.
    async fn matrix_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        portal: &Portal,
        sender: &str,
        content: &Value,
        relayed_name: Option<&str>,
    ) -> Result<Option<Message>, String> {
        let room = portal.room_id.as_deref().unwrap_or_default();
        let msgtype = content["msgtype"].as_str().unwrap_or_default();
        let rel = &content["m.relates_to"];
        let reply_to = match rel["m.in_reply_to"]["event_id"].as_str() {
            Some(e) => self
                .portals
                .by_event(room, e)
                .await
                .map_err(|e| e.to_string())?
                .map(|m| Quote {
                    message_id: m.message_id,
                    author: m.sender,
                }),
            None => None,
        };
        let text_of = |c: &Value| -> Text {
            let mut t = if c["format"] == "org.matrix.custom.html" {
                msgconv::html_to_text(c["formatted_body"].as_str().unwrap_or_default())
            } else {
                Text {
                    body: msgconv::strip_reply_fallback(c["body"].as_str().unwrap_or_default())
                        .to_owned(),
                    formats: vec![],
                }
            };
            if let Some(name) = relayed_name {
                let prefix = format!("{name}: ");
                let shift = prefix.chars().count() as u32;
                for f in &mut t.formats {
                    f.start = f.start.saturating_add(shift);
                }
                t.body = format!("{prefix}{}", t.body);
            }
            t
        };
        if rel["rel_type"] == "m.replace" {
            let target = rel["event_id"].as_str().unwrap_or_default();
            let Some(t) = self
                .portals
                .by_event(room, target)
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(None);
            };
            if !t.part.is_empty()
                || !is_author(&t, sender, acc.account_id(), portal, self.matrix.bot_mxid())
            {
                return Err(
                    "only a message's author can edit it on the network; the edit stays on Matrix only."
                        .into(),
                );
            }
            let new = if content["m.new_content"].is_object() {
                &content["m.new_content"]
            } else {
                content
            };
            return Ok(Some(Message {
                body: Some(D::Edit(Edit {
                    target: t.message_id,
                    text: Some(text_of(new)),
                })),
                reply_to: None,
            }));
        }
        let body = match msgtype {
            "m.text" | "m.notice" => D::Text(text_of(content)),
            "m.emote" => {
                let mut t = text_of(content);
                t.body = format!("* {}", t.body);
                for f in &mut t.formats {
                    f.start = f.start.saturating_add(2);
                }
                D::Text(t)
            }
            "m.location" => {
                let (latitude, longitude) =
                    msgconv::parse_geo_uri(content["geo_uri"].as_str().unwrap_or_default())
                        .ok_or("the location has no valid geo: URI")?;
                let name = content["body"].as_str().unwrap_or_default();
                D::Location(Location {
                    latitude,
                    longitude,
                    name: match relayed_name {
                        Some(who) => format!("{who}: {name}"),
                        None => name.to_owned(),
                    },
                    address: String::new(),
                })
            }
            "m.image" | "m.video" | "m.audio" | "m.file" => {
                let max = self.settings.bridge.max_media_size;
                if content["info"]["size"].as_u64().is_some_and(|n| n > max) {
                    return Err(format!(
                        "the attachment is larger than this bridge's limit of {}.",
                        human_size(max)
                    ));
                }
                let (data, ct) = self
                    .matrix
                    .download_content(content)
                    .await
                    .map_err(|e| format!("cannot download the attachment: {e}"))?;
                let info = &content["info"];
                let mimetype = info["mimetype"]
                    .as_str()
                    .map(str::to_owned)
                    .or(ct)
                    .unwrap_or_else(|| "application/octet-stream".into());
                let body = content["body"].as_str().unwrap_or_default();
                let filename = content["filename"].as_str().unwrap_or(body).to_owned();
                let caption = match relayed_name {
                    // Relayed media always say whose they are.
                    Some(who) if !(content["filename"].is_string() && body != filename) => {
                        Some(Text {
                            body: format!("{who} sent a file"),
                            formats: vec![],
                        })
                    }
                    _ => (content["filename"].is_string() && body != filename)
                        .then(|| text_of(content)),
                };
                let kind = match msgtype {
                    "m.image" => MediaKind::Image,
                    "m.video" => MediaKind::Video,
                    "m.audio" if content.get("org.matrix.msc3245.voice").is_some() => {
                        MediaKind::Voice
                    }
                    "m.audio" => MediaKind::Audio,
                    _ => MediaKind::File,
                };
                let size = data.len() as u64;
                let up = acc
                    .upload(data)
                    .await
                    .map_err(|e| format!("cannot upload the attachment: {e}"))?;
                D::Media(Media {
                    kind,
                    blob: up.blob,
                    key: up.key,
                    sha256: up.sha256,
                    size,
                    mimetype,
                    filename,
                    caption,
                    width: info["w"].as_u64().unwrap_or(0) as u32,
                    height: info["h"].as_u64().unwrap_or(0) as u32,
                    duration_ms: info["duration"].as_u64().unwrap_or(0) as u32,
                    thumbnail: Vec::new(),
                    waveform: Vec::new(),
                })
            }
            other => return Err(format!("messages of type {other} cannot be bridged")),
        };
        Ok(Some(Message {
            body: Some(body),
            reply_to,
        }))
    }

    /// Receipts and typing from Matrix, for portal rooms.
    pub(crate) async fn on_ephemeral(&self, ev: &Value) -> Result<(), BridgeError> {
        let room = ev["room_id"].as_str().unwrap_or_default();
        if room.is_empty() {
            return Ok(());
        }
        let Some(portal) = self.portals.portal_by_room(room).await? else {
            return Ok(());
        };
        let Some(acc) = self.network.account(&portal.receiver) else {
            return Ok(());
        };
        let target = match portal.kind {
            PortalKind::Dm => NetTarget::Contact(portal.chat_id.clone()),
            PortalKind::Group => NetTarget::Group(portal.chat_id.clone()),
        };
        let group = (portal.kind == PortalKind::Group).then_some(portal.chat_id.as_str());
        match ev["type"].as_str().unwrap_or_default() {
            "m.receipt" => {
                let Some(map) = ev["content"].as_object() else {
                    return Ok(());
                };
                for (event_id, kinds) in map {
                    if kinds["m.read"].get(&portal.receiver).is_none() {
                        continue;
                    }
                    if let Some(m) = self.portals.by_event(room, event_id).await?
                        && m.sender != acc.account_id()
                        && m.part.is_empty()
                        && let Err(e) = acc
                            .receipt(&m.sender, group, true, vec![m.message_id])
                            .await
                    {
                        tracing::debug!(error = %e, "read receipt not bridged");
                    }
                }
            }
            "m.typing" => {
                let typing = ev["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|u| u == &json!(portal.receiver)));
                let mut state = self.typing_state.lock().await;
                if state.get(room).copied().unwrap_or(false) != typing {
                    state.insert(room.to_owned(), typing);
                    drop(state);
                    if let Err(e) = acc.typing(target, typing).await {
                        tracing::debug!(error = %e, "typing not bridged");
                    }
                }
            }
            _ => {}
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

/// A portal's power levels: the bot above everyone, the owner at 75 in groups (so it can kick
/// ghosts), ghosts at 50. Redacting other people's events, kicking, banning and the state that
/// shapes the room need more than a ghost has, so no contact can act on others' events through
/// its ghost, even if the bridge were tricked into trying.
fn portal_power_levels(users: serde_json::Map<String, Value>) -> Value {
    json!({
        "users": users,
        "redact": 75,
        "kick": 75,
        "ban": 75,
        "events": {
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.join_rules": 100,
            "m.bridge": 100,
            "uk.half-shot.bridge": 100,
        },
    })
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

fn text_content(t: &Text, msgtype: &str) -> Value {
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
    let mut c = json!({"msgtype": msgtype, "body": t.body});
    if let Some(html) = msgconv::text_to_html(t) {
        c["format"] = json!("org.matrix.custom.html");
        c["formatted_body"] = json!(html);
    }
    c
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
