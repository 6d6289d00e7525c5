//! Matrix to the network: messages, edits, reactions, redactions and receipts in a portal go out
//! through its owner's login (or the relay), with a send status for each message.

use super::*;

impl Bridge {
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
                match self
                    .reaction_to_network(&room, event_id, &me, sender, content)
                    .await?
                {
                    Some(m) => m,
                    None => return Ok(()),
                }
            }
            "m.room.redaction" => match self
                .redaction_to_network(&portal, event_id, &me, sender, ev)
                .await?
            {
                Some((m, redacted)) => {
                    // The mapping goes once the deletion was sent (below): a send that fails
                    // transiently is retried and must still find it.
                    unmap_after = Some(redacted);
                    m
                }
                None => return Ok(()),
            },
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

    /// A reaction from Matrix: mapped (so its redaction can take it back), then sent as a
    /// reaction to the message it targets; `None` when that message is not bridged.
    async fn reaction_to_network(
        &self,
        room: &str,
        event_id: &str,
        me: &str,
        sender: &str,
        content: &Value,
    ) -> Result<Option<Message>, BridgeError> {
        let rel = &content["m.relates_to"];
        let target_ev = rel["event_id"].as_str().unwrap_or_default();
        let emoji = rel["key"].as_str().unwrap_or_default().to_owned();
        let Some(t) = self.portals.by_event(room, target_ev).await? else {
            return Ok(None);
        };
        self.portals
            .map_message(&MappedMessage {
                room_id: room.to_owned(),
                event_id: event_id.to_owned(),
                message_id: t.message_id.clone(),
                sender: me.to_owned(),
                part: reaction_part(me, &emoji),
                matrix_sender: sender.to_owned(),
            })
            .await?;
        Ok(Some(Message {
            body: Some(D::Reaction(Reaction {
                target: t.message_id,
                emoji,
                remove: false,
                target_author: t.sender,
            })),
            reply_to: None,
        }))
    }

    /// A redaction from Matrix, by the author of what it redacts: a removed reaction or a
    /// deleted message, with the redacted event (its mapping goes once the deletion is sent).
    /// `None` when there is nothing to send.
    async fn redaction_to_network(
        &self,
        portal: &Portal,
        event_id: &str,
        me: &str,
        sender: &str,
        ev: &Value,
    ) -> Result<Option<(Message, String)>, BridgeError> {
        let room = portal.room_id.as_deref().unwrap_or_default();
        let content = &ev["content"];
        let redacts = ev["redacts"]
            .as_str()
            .or_else(|| content["redacts"].as_str())
            .unwrap_or_default();
        let Some(t) = self.portals.by_event(room, redacts).await? else {
            return Ok(None);
        };
        if !is_author(&t, sender, me, portal, self.matrix.bot_mxid()) {
            if t.part.is_empty() {
                let text = format!(
                    "{sender}: the deletion was not bridged: only a message's author can delete it on the network."
                );
                self.not_bridged(room, event_id, Status::NoPermission, &text)
                    .await?;
            }
            return Ok(None);
        }
        let m = if let Some(emoji) = t.part.strip_prefix(&format!("reaction:{me}:")) {
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
            return Ok(None);
        };
        Ok(Some((m, redacts.to_owned())))
    }

    /// A Matrix event reached the network: the bot's read receipt on it
    /// (`bridge.delivery_receipts`) and a success status (`bridge.message_status_events`).
    pub(super) async fn bridged(&self, room: &str, event_id: &str) {
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

    /// A `com.beeper.message_send_status` event about `event_id` (as mautrix bridges send them).
    pub(super) async fn send_status(
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
    pub(super) async fn matrix_to_data(
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
        if rel["rel_type"] == "m.replace" {
            return self
                .edit_to_data(acc, portal, sender, content, relayed_name)
                .await;
        }
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
        let body = match msgtype {
            "m.text" | "m.notice" => D::Text(matrix_text(content, relayed_name)),
            "m.emote" => {
                let mut t = matrix_text(content, relayed_name);
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
                D::Media(self.media_to_data(acc, content, relayed_name).await?)
            }
            other => return Err(format!("messages of type {other} cannot be bridged")),
        };
        Ok(Some(Message {
            body: Some(body),
            reply_to,
        }))
    }

    /// A Matrix edit (`m.replace`) as a network edit; only the author's messages are edited, and
    /// an edit of a message the bridge never bridged is not sent (`None`).
    async fn edit_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        portal: &Portal,
        sender: &str,
        content: &Value,
        relayed_name: Option<&str>,
    ) -> Result<Option<Message>, String> {
        let room = portal.room_id.as_deref().unwrap_or_default();
        let target = content["m.relates_to"]["event_id"]
            .as_str()
            .unwrap_or_default();
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
        Ok(Some(Message {
            body: Some(D::Edit(Edit {
                target: t.message_id,
                text: Some(matrix_text(new, relayed_name)),
            })),
            reply_to: None,
        }))
    }

    /// A Matrix attachment: downloaded (within the size limit), uploaded to the network.
    async fn media_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        content: &Value,
        relayed_name: Option<&str>,
    ) -> Result<Media, String> {
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
        let has_caption = content["filename"].is_string() && body != filename;
        let caption = match relayed_name {
            // Relayed media always say whose they are.
            Some(who) if !has_caption => Some(Text {
                body: format!("{who} sent a file"),
                formats: vec![],
            }),
            _ => has_caption.then(|| matrix_text(content, relayed_name)),
        };
        let kind = match content["msgtype"].as_str().unwrap_or_default() {
            "m.image" => MediaKind::Image,
            "m.video" => MediaKind::Video,
            "m.audio" if content.get("org.matrix.msc3245.voice").is_some() => MediaKind::Voice,
            "m.audio" => MediaKind::Audio,
            _ => MediaKind::File,
        };
        let size = data.len() as u64;
        let up = acc
            .upload(data)
            .await
            .map_err(|e| format!("cannot upload the attachment: {e}"))?;
        Ok(Media {
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

/// The text of a Matrix message's content (its HTML when it has some, without the reply
/// fallback), after "name: " when it is relayed for someone.
fn matrix_text(c: &Value, relayed_name: Option<&str>) -> Text {
    let mut t = if c["format"] == "org.matrix.custom.html" {
        msgconv::html_to_text(c["formatted_body"].as_str().unwrap_or_default())
    } else {
        Text {
            body: msgconv::strip_reply_fallback(c["body"].as_str().unwrap_or_default()).to_owned(),
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
}
