//! Matrix to the network: messages, edits, reactions, redactions and receipts in a portal go out
//! through its owner's login (or the relay), with a send status for each message.

use ruma::events::{
    AnyMessageLikeEvent, AnySyncEphemeralRoomEvent,
    poll::{
        unstable_end::{UnstablePollEndEvent, UnstablePollEndEventContent},
        unstable_response::{UnstablePollResponseEvent, UnstablePollResponseEventContent},
        unstable_start::{UnstablePollStartEvent, UnstablePollStartEventContent},
    },
    reaction::{ReactionEvent, ReactionEventContent},
    receipt::ReceiptType,
    room::{
        MediaSource,
        message::{
            FormattedBody, MessageFormat, MessageType, Relation, RoomMessageEvent,
            RoomMessageEventContent,
        },
        redaction::RoomRedactionEvent,
    },
    sticker::{StickerEvent, StickerEventContent},
};

use super::*;

/// Why a Matrix event did not become a network message.
#[derive(Debug)]
pub(super) enum Unsent {
    /// It cannot be bridged as it is; the reason is shown to the user.
    Refused(String),
    /// Something it needs is away for now (the gateway, the homeserver's media, the
    /// database): the event stays queued and is tried again.
    Retry(BridgeError),
}

impl Unsent {
    /// `e` met while `doing` something: tried again if that may help, else refused.
    fn failed(doing: &str, e: BridgeError) -> Self {
        if e.is_retryable() {
            Unsent::Retry(e)
        } else {
            Unsent::Refused(format!("{doing}: {e}"))
        }
    }
}

impl From<String> for Unsent {
    fn from(reason: String) -> Self {
        Unsent::Refused(reason)
    }
}

impl From<&str> for Unsent {
    fn from(reason: &str) -> Self {
        Unsent::Refused(reason.to_owned())
    }
}

impl From<BridgeError> for Unsent {
    fn from(e: BridgeError) -> Self {
        Unsent::failed("the bridge failed", e)
    }
}

impl From<crate::StoreError> for Unsent {
    fn from(e: crate::StoreError) -> Self {
        BridgeError::from(e).into()
    }
}

impl Bridge {
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

    /// Receipts and typing from Matrix, for portal rooms.
    pub(crate) async fn on_ephemeral(
        &self,
        room: &str,
        ev: &AnySyncEphemeralRoomEvent,
    ) -> Result<(), BridgeError> {
        // Each user's receipts and typing go out through their own login: in a shared group
        // portal, each portal of the room takes its user's.
        for p in self.portals.portals_in_room(room).await? {
            if let Some(portal) = PortalRef::new(self, p) {
                portal.ephemeral(ev).await?;
            }
        }
        Ok(())
    }
}

impl PortalRef<'_> {
    /// Matrix → interop for one event in the portal's room.
    pub(crate) async fn matrix_event(&self, ev: &AnyMessageLikeEvent) -> Result<(), BridgeError> {
        let started = std::time::Instant::now();
        let sender = ev.sender().as_str();
        let (portal, room) = (&self.record, self.room.as_str());
        let event_id = ev.event_id().as_str();
        let is_message = matches!(
            ev,
            AnyMessageLikeEvent::RoomMessage(_)
                | AnyMessageLikeEvent::Sticker(_)
                | AnyMessageLikeEvent::UnstablePollStart(_)
        );
        if !matches!(
            ev,
            AnyMessageLikeEvent::RoomMessage(_)
                | AnyMessageLikeEvent::Reaction(_)
                | AnyMessageLikeEvent::RoomRedaction(_)
                | AnyMessageLikeEvent::Sticker(_)
                | AnyMessageLikeEvent::UnstablePollStart(_)
                | AnyMessageLikeEvent::UnstablePollResponse(_)
                | AnyMessageLikeEvent::UnstablePollEnd(_)
        ) {
            return Ok(());
        }
        // Whose login sends it: the portal's owner, or the relay for others.
        if self.bridge.settings.encryption_require && !self.bridge.matrix.is_encrypted(room).await {
            if is_message {
                self.not_bridged(event_id, Status::Unsupported, "This bridge only bridges encrypted rooms: turn on encryption in the room settings.").await?;
            }
            return Ok(());
        }
        // Relayed messages name their sender by the full Matrix ID: a display name or a
        // localpart could pass for someone else.
        let relayed = sender != portal.receiver;
        let login_of = if relayed {
            portal.relay.as_ref().map(|u| u.as_str()).filter(|_| {
                self.bridge.settings.bridge.relay.enabled
                    && self.bridge.permission_of(sender) >= PermissionLevel::Relay
            })
        } else {
            Some(sender)
        };
        let Some(acc) = login_of.and_then(|l| self.bridge.network.account(l)) else {
            // A login that exists but is not connected yet (start-up, reconnect): the event
            // waits in its room's lane instead of being refused.
            if let Some(l) = login_of
                && self.bridge.portals.login(l).await?.is_some()
            {
                return Err(BridgeError::NotReady(format!(
                    "the interop login of {l} is not connected yet"
                )));
            }
            if !relayed {
                self.not_bridged(event_id, Status::NoPermission, "Your message was not bridged: you are not logged in. Send `login` to the bridge bot.").await?;
            } else if is_message {
                self.not_bridged(event_id, Status::NoPermission, &format!("{sender}: your message was not bridged: this room has no relay and it is not your chat.")).await?;
            }
            return Ok(());
        };
        let relayed_name = relayed.then(|| sender.to_owned());
        let me = acc.account_id().to_owned();
        let target = self.target();
        let message_id = stable_id(&["out", room, event_id]);
        let mut unmap_after: Option<String> = None;
        let converted = match ev {
            // A reaction carries no text to name its sender by: from a relayed user it would
            // show as the relay's own (mautrix bridges drop them too).
            AnyMessageLikeEvent::Reaction(_) if relayed_name.is_some() => return Ok(()),
            AnyMessageLikeEvent::Reaction(ReactionEvent::Original(r)) => Ok(self
                .reaction_to_network(event_id, &me, sender, &r.content)
                .await?),
            AnyMessageLikeEvent::RoomRedaction(RoomRedactionEvent::Original(r)) => {
                let redacts = r.redacts.as_ref().or(r.content.redacts.as_ref());
                match redacts {
                    Some(redacts) => self
                        .redaction_to_network(event_id, &me, sender, redacts.as_str())
                        .await?
                        .map(|(m, redacted)| {
                            // The mapping goes once the deletion was sent (below): a send that
                            // fails transiently is retried and must still find it.
                            unmap_after = Some(redacted);
                            m
                        }),
                    None => None,
                }
                .map_or(Ok(None), |m| Ok(Some(m)))
            }
            AnyMessageLikeEvent::RoomMessage(RoomMessageEvent::Original(m)) => {
                self.matrix_to_data(&acc, sender, &m.content, relayed_name.as_deref())
                    .await
            }
            AnyMessageLikeEvent::UnstablePollStart(UnstablePollStartEvent::Original(p)) => {
                match &p.content {
                    UnstablePollStartEventContent::New(c) => {
                        // Kept before it goes out: votes name answers by these ids.
                        let ids: Vec<String> =
                            c.poll_start.answers.iter().map(|a| a.id.clone()).collect();
                        self.bridge
                            .set_poll_answer_ids(room, event_id, &ids)
                            .await?;
                        Ok(Some(poll_to_data(&p.content, relayed_name.as_deref())))
                    }
                    UnstablePollStartEventContent::Replacement(_) => {
                        Err("a poll cannot be changed on the network once it is sent.".into())
                    }
                    _ => Ok(None),
                }
            }
            // A vote, like a reaction, carries nothing to name a relayed user by.
            AnyMessageLikeEvent::UnstablePollResponse(_) if relayed_name.is_some() => {
                return Ok(());
            }
            AnyMessageLikeEvent::UnstablePollResponse(UnstablePollResponseEvent::Original(r)) => {
                Ok(self.vote_to_network(&r.content).await?)
            }
            AnyMessageLikeEvent::UnstablePollEnd(UnstablePollEndEvent::Original(e)) => {
                self.poll_end_to_network(&acc, sender, &e.content).await
            }
            AnyMessageLikeEvent::Sticker(StickerEvent::Original(st)) => {
                self.sticker_to_data(&acc, &st.content, relayed_name.as_deref())
                    .await
            }
            // Redacted before the bridge saw it: nothing to send.
            _ => Ok(None),
        };
        let mut data = match converted {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(Unsent::Retry(e)) => return Err(e),
            Err(Unsent::Refused(reason)) => {
                let text = format!("Your message was not bridged: {reason}");
                self.not_bridged(event_id, Status::Unsupported, &text)
                    .await?;
                return Ok(());
            }
        };
        let is_plain_message = matches!(
            data.body,
            Some(D::Text(_) | D::Media(_) | D::Location(_) | D::Poll(_))
        );
        // Everything sent into a chat with a timer carries it: the contact's client deletes
        // the message then, as the bridge redacts it here.
        let timer = self.bridge.portals.disappear_timer(room).await?;
        data.expire_timer = timer;
        let sent = acc.send(target, message_id.clone(), data).await;
        if let Err(e) = &sent
            && e.is_transient()
        {
            return Err(e.clone().into());
        }
        if let Some(redacted) = unmap_after {
            self.bridge.portals.unmap_event(room, &redacted).await?;
        }
        if let Err(e) = sent {
            let text = format!("Your message was not bridged: {e}");
            self.not_bridged(event_id, Status::NetworkError, &text)
                .await?;
            return Ok(());
        }
        if is_plain_message {
            self.map(event_id, &message_id, &me, sender, "").await?;
            self.disappear_later(event_id, crate::now_ms(), timer)
                .await?;
        }
        self.bridged(event_id).await;
        self.bridge
            .metrics
            .message_bridged("matrix_to_interop", started);
        Ok(())
    }

    /// A reaction from Matrix: mapped (so its redaction can take it back), then sent as a
    /// reaction to the message it targets; `None` when that message is not bridged.
    async fn reaction_to_network(
        &self,
        event_id: &str,
        me: &str,
        sender: &str,
        content: &ReactionEventContent,
    ) -> Result<Option<Message>, BridgeError> {
        let room = self.room.as_str();
        let target_ev = content.relates_to.event_id.as_str();
        let emoji = content.relates_to.key.clone();
        let Some(t) = self.bridge.portals.by_event(room, target_ev).await? else {
            return Ok(None);
        };
        self.bridge
            .portals
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
            expire_timer: 0,
        }))
    }

    /// A redaction from Matrix, by the author of what it redacts: a removed reaction or a
    /// deleted message, with the redacted event (its mapping goes once the deletion is sent).
    /// `None` when there is nothing to send.
    async fn redaction_to_network(
        &self,
        event_id: &str,
        me: &str,
        sender: &str,
        redacts: &str,
    ) -> Result<Option<(Message, String)>, BridgeError> {
        let (portal, room) = (&self.record, self.room.as_str());
        let Some(t) = self.bridge.portals.by_event(room, redacts).await? else {
            return Ok(None);
        };
        if !is_author(&t, sender, me, portal, self.bridge.matrix.bot_mxid()) {
            if t.part.is_empty() {
                let text = format!(
                    "{sender}: the deletion was not bridged: only a message's author can delete it on the network."
                );
                self.not_bridged(event_id, Status::NoPermission, &text)
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
                expire_timer: 0,
            }
        } else if t.part.is_empty() {
            Message {
                body: Some(D::Delete(Delete {
                    target: t.message_id,
                })),
                reply_to: None,
                expire_timer: 0,
            }
        } else {
            return Ok(None);
        };
        Ok(Some((m, redacts.to_owned())))
    }

    /// A Matrix event reached the network: the bot's read receipt on it
    /// (`bridge.delivery_receipts`) and a success status (`bridge.message_status_events`).
    pub(super) async fn bridged(&self, event_id: &str) {
        let room = self.room.as_str();
        let bot = self.bridge.matrix.bot_mxid().to_owned();
        if self.bridge.settings.bridge.delivery_receipts
            && let Err(e) = self.bridge.matrix.read_receipt(room, &bot, event_id).await
        {
            tracing::debug!(error = %e, "delivery receipt not sent");
        }
        if self.bridge.settings.bridge.message_status_events
            && let Err(e) = self.bridge.send_status(room, event_id, None).await
        {
            tracing::debug!(error = %e, "message status not sent");
        }
    }

    /// Converts Matrix message content.
    pub(super) async fn matrix_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        sender: &str,
        content: &RoomMessageEventContent,
        relayed_name: Option<&str>,
    ) -> Result<Option<Message>, Unsent> {
        let in_reply_to = match &content.relates_to {
            Some(Relation::Replacement(r)) => {
                return self
                    .edit_to_data(
                        acc,
                        sender,
                        r.event_id.as_str(),
                        &r.new_content.msgtype,
                        relayed_name,
                    )
                    .await;
            }
            Some(Relation::Reply(r)) => Some(&r.in_reply_to.event_id),
            Some(Relation::Thread(t)) => t.in_reply_to.as_ref().map(|r| &r.event_id),
            _ => None,
        };
        let reply_to = match in_reply_to {
            Some(e) => self.quote_of(e.as_str()).await?,
            None => None,
        };
        let msgtype = &content.msgtype;
        let body = match msgtype {
            MessageType::Text(_) | MessageType::Notice(_) => {
                D::Text(matrix_text(msgtype, relayed_name))
            }
            MessageType::Emote(_) => {
                let mut t = matrix_text(msgtype, relayed_name);
                t.body = format!("* {}", t.body);
                for f in &mut t.formats {
                    f.start = f.start.saturating_add(2);
                }
                D::Text(t)
            }
            MessageType::Location(l) => {
                let (latitude, longitude) = msgconv::parse_geo_uri(&l.geo_uri)
                    .ok_or("the location has no valid geo: URI")?;
                D::Location(Location {
                    latitude,
                    longitude,
                    name: match relayed_name {
                        Some(who) => format!("{who}: {}", l.body),
                        None => l.body.clone(),
                    },
                    address: String::new(),
                })
            }
            other => match MatrixMedia::of(other) {
                Some(media) => D::Media(self.media_to_data(acc, &media, relayed_name).await?),
                None => {
                    return Err(Unsent::Refused(format!(
                        "messages of type {} cannot be bridged",
                        other.msgtype()
                    )));
                }
            },
        };
        Ok(Some(Message {
            body: Some(body),
            reply_to,
            expire_timer: 0,
        }))
    }

    /// The bridged message behind the poll start `event_id` (`None` if it is not bridged).
    async fn bridged_poll(&self, event_id: &str) -> Result<Option<MappedMessage>, BridgeError> {
        Ok(self
            .bridge
            .portals
            .by_event(self.room.as_str(), event_id)
            .await?
            .filter(|p| p.part.is_empty()))
    }

    /// A Matrix poll response as a network vote on the poll it answers (`None` when that poll
    /// is not bridged): answers by the ids the poll's start gave them, as option indexes.
    async fn vote_to_network(
        &self,
        c: &UnstablePollResponseEventContent,
    ) -> Result<Option<Message>, BridgeError> {
        let room = self.room.as_str();
        let Some(poll) = self.bridged_poll(c.relates_to.event_id.as_str()).await? else {
            return Ok(None);
        };
        let ids = self.bridge.poll_answer_ids(room, &poll.event_id).await?;
        let mut selections: Vec<u32> = Vec::new();
        for answer in c.poll_response.answers.iter().take(MAX_POLL_OPTIONS) {
            let index = match &ids {
                Some(ids) => ids.iter().position(|id| id == answer),
                None => answer.parse().ok().filter(|i| *i < MAX_POLL_OPTIONS),
            };
            if let Some(i) = index.and_then(|i| u32::try_from(i).ok())
                && !selections.contains(&i)
            {
                selections.push(i);
            }
        }
        Ok(Some(Message {
            body: Some(D::PollVote(PollVote {
                target: poll.message_id,
                target_author: poll.sender,
                selections,
            })),
            reply_to: None,
            expire_timer: 0,
        }))
    }

    /// A Matrix poll's end as the network's, by the poll's author only (`Ok(None)` when the
    /// poll is not bridged).
    async fn poll_end_to_network(
        &self,
        acc: &Arc<dyn NetAccount>,
        sender: &str,
        c: &UnstablePollEndEventContent,
    ) -> Result<Option<Message>, Unsent> {
        let Some(poll) = self.bridged_poll(c.relates_to.event_id.as_str()).await? else {
            return Ok(None);
        };
        if !is_author(
            &poll,
            sender,
            acc.account_id(),
            &self.record,
            self.bridge.matrix.bot_mxid(),
        ) {
            return Err(
                "only a poll's author can end it on the network; it stays open there.".into(),
            );
        }
        Ok(Some(Message {
            body: Some(D::PollEnd(PollEnd {
                target: poll.message_id,
            })),
            reply_to: None,
            expire_timer: 0,
        }))
    }

    /// The network's quote of the bridged message behind Matrix event `event_id` (`None` if the
    /// bridge never bridged it).
    async fn quote_of(&self, event_id: &str) -> Result<Option<Quote>, BridgeError> {
        Ok(self
            .bridge
            .portals
            .by_event(self.room.as_str(), event_id)
            .await?
            .map(|m| Quote {
                message_id: m.message_id,
                author: m.sender,
            }))
    }

    /// A Matrix sticker (`m.sticker`) as a network attachment of type sticker, with its image;
    /// its body (the sticker's description) is not a caption. A reply's quote goes with it.
    async fn sticker_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        c: &StickerEventContent,
        relayed_name: Option<&str>,
    ) -> Result<Option<Message>, Unsent> {
        let px = |v: Option<ruma::UInt>| {
            v.map_or(0, |v| u32::try_from(u64::from(v)).unwrap_or(u32::MAX))
        };
        let source = MediaSource::from(c.source.clone());
        let media = MatrixMedia {
            kind: MediaKind::Sticker,
            body: &c.body,
            formatted: None,
            filename: None,
            source: &source,
            mimetype: c.info.mimetype.as_deref(),
            size: c.info.size.map(u64::from),
            width: px(c.info.width),
            height: px(c.info.height),
            duration_ms: 0,
        };
        let reply_to = match &c.relates_to {
            Some(Relation::Reply(r)) => self.quote_of(r.in_reply_to.event_id.as_str()).await?,
            _ => None,
        };
        Ok(Some(Message {
            body: Some(D::Media(
                self.media_to_data(acc, &media, relayed_name).await?,
            )),
            reply_to,
            expire_timer: 0,
        }))
    }

    /// A Matrix edit (`m.replace` of `target`) as a network edit; only the author's messages
    /// are edited, and an edit of a message the bridge never bridged is not sent (`None`).
    async fn edit_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        sender: &str,
        target: &str,
        new: &MessageType,
        relayed_name: Option<&str>,
    ) -> Result<Option<Message>, Unsent> {
        let (portal, room) = (&self.record, self.room.as_str());
        let Some(t) = self.bridge.portals.by_event(room, target).await? else {
            return Ok(None);
        };
        if !t.part.is_empty()
            || !is_author(
                &t,
                sender,
                acc.account_id(),
                portal,
                self.bridge.matrix.bot_mxid(),
            )
        {
            return Err(
                "only a message's author can edit it on the network; the edit stays on Matrix only."
                    .into(),
            );
        }
        Ok(Some(Message {
            body: Some(D::Edit(Edit {
                target: t.message_id,
                text: Some(matrix_text(new, relayed_name)),
            })),
            reply_to: None,
            expire_timer: 0,
        }))
    }

    /// A Matrix attachment: downloaded (within the size limit), uploaded to the network.
    async fn media_to_data(
        &self,
        acc: &Arc<dyn NetAccount>,
        m: &MatrixMedia<'_>,
        relayed_name: Option<&str>,
    ) -> Result<Media, Unsent> {
        let max = self.bridge.settings.bridge.max_media_size;
        if m.size.is_some_and(|n| n > max) {
            return Err(Unsent::Refused(format!(
                "the attachment is larger than this bridge's limit of {}.",
                human_size(max)
            )));
        }
        let (data, ct) = self
            .bridge
            .matrix
            .download_content(m.source)
            .await
            .map_err(|e| Unsent::failed("cannot download the attachment", e))?;
        let mimetype = m
            .mimetype
            .map(str::to_owned)
            .or(ct)
            .unwrap_or_else(|| "application/octet-stream".into());
        let filename = m.filename.unwrap_or(m.body).to_owned();
        let has_caption = m.filename.is_some() && m.body != filename;
        let caption = match relayed_name {
            // Relayed media always say whose they are.
            Some(who) if !has_caption => Some(Text {
                body: format!("{who} sent a file"),
                formats: vec![],
            }),
            _ => has_caption.then(|| text_of(m.body, m.formatted, relayed_name)),
        };
        let size = data.len() as u64;
        let up = acc
            .upload(data)
            .await
            .map_err(|e| Unsent::failed("cannot upload the attachment", e.into()))?;
        Ok(Media {
            kind: m.kind,
            blob: up.blob,
            key: up.key,
            sha256: up.sha256,
            size,
            mimetype,
            filename,
            caption,
            width: m.width,
            height: m.height,
            duration_ms: m.duration_ms,
            thumbnail: Vec::new(),
            waveform: Vec::new(),
        })
    }

    /// Receipts and typing from Matrix in the portal's room: the owner's go to the network.
    pub(crate) async fn ephemeral(
        &self,
        ev: &AnySyncEphemeralRoomEvent,
    ) -> Result<(), BridgeError> {
        let (portal, room) = (&self.record, self.room.as_str());
        let Some(acc) = self.bridge.network.account(portal.receiver.as_str()) else {
            return Ok(());
        };
        let target = self.target();
        let group = (portal.kind == PortalKind::Group).then_some(portal.chat_id.as_str());
        match ev {
            AnySyncEphemeralRoomEvent::Receipt(r) => {
                for (event_id, kinds) in r.content.iter() {
                    let by_owner = kinds
                        .get(&ReceiptType::Read)
                        .is_some_and(|users| users.keys().any(|u| u.as_str() == portal.receiver));
                    if !by_owner {
                        continue;
                    }
                    if let Some(m) = self
                        .bridge
                        .portals
                        .by_event(room, event_id.as_str())
                        .await?
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
            AnySyncEphemeralRoomEvent::Typing(t) => {
                let typing = t
                    .content
                    .user_ids
                    .iter()
                    .any(|u| u.as_str() == portal.receiver);
                let key = format!("{room} {}", portal.receiver);
                let mut state = self.bridge.typing_state.lock().await;
                if state.get(&key).copied().unwrap_or(false) != typing {
                    state.insert(key, typing);
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

/// A Matrix poll (MSC3381) as the network's: its question (naming a relayed sender), its
/// answers' texts in order, and how many a voter may pick.
fn poll_to_data(c: &UnstablePollStartEventContent, relayed_name: Option<&str>) -> Message {
    let block = c.poll_start();
    let question = match relayed_name {
        Some(who) => format!("{who}: {}", block.question.text),
        None => block.question.text.clone(),
    };
    Message {
        body: Some(D::Poll(Poll {
            question,
            options: block.answers.iter().map(|a| a.text.clone()).collect(),
            max_selections: u32::try_from(u64::from(block.max_selections)).unwrap_or(u32::MAX),
        })),
        reply_to: None,
        expire_timer: 0,
    }
}

/// The parts of a Matrix attachment (`m.image`, `m.video`, `m.audio`, `m.file`) the network
/// needs.
struct MatrixMedia<'a> {
    kind: MediaKind,
    body: &'a str,
    formatted: Option<&'a FormattedBody>,
    filename: Option<&'a str>,
    source: &'a MediaSource,
    mimetype: Option<&'a str>,
    size: Option<u64>,
    width: u32,
    height: u32,
    duration_ms: u32,
}

/// The fields every attachment type has (`$c` is its content), with no dimensions or duration.
macro_rules! media_common {
    ($c:expr, $kind:expr) => {{
        let info = $c.info.as_deref();
        MatrixMedia {
            kind: $kind,
            body: &$c.body,
            formatted: $c.formatted.as_ref(),
            filename: $c.filename.as_deref(),
            source: &$c.source,
            mimetype: info.and_then(|i| i.mimetype.as_deref()),
            size: info.and_then(|i| i.size).map(u64::from),
            width: 0,
            height: 0,
            duration_ms: 0,
        }
    }};
}

impl<'a> MatrixMedia<'a> {
    fn of(msgtype: &'a MessageType) -> Option<Self> {
        let px = |v: Option<ruma::UInt>| {
            v.map_or(0, |v| u32::try_from(u64::from(v)).unwrap_or(u32::MAX))
        };
        let ms = |d: Option<std::time::Duration>| {
            d.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
        };
        Some(match msgtype {
            MessageType::Image(c) => {
                let info = c.info.as_deref();
                Self {
                    width: px(info.and_then(|i| i.width)),
                    height: px(info.and_then(|i| i.height)),
                    ..media_common!(c, MediaKind::Image)
                }
            }
            MessageType::Video(c) => {
                let info = c.info.as_deref();
                Self {
                    width: px(info.and_then(|i| i.width)),
                    height: px(info.and_then(|i| i.height)),
                    duration_ms: ms(info.and_then(|i| i.duration)),
                    ..media_common!(c, MediaKind::Video)
                }
            }
            MessageType::Audio(c) => {
                let kind = if c.voice.is_some() {
                    MediaKind::Voice
                } else {
                    MediaKind::Audio
                };
                Self {
                    duration_ms: ms(c.info.as_deref().and_then(|i| i.duration)),
                    ..media_common!(c, kind)
                }
            }
            MessageType::File(c) => media_common!(c, MediaKind::File),
            _ => return None,
        })
    }
}

/// The text of a Matrix message (its HTML when it has some, without the reply fallback), after
/// "name: " when it is relayed for someone.
fn matrix_text(msgtype: &MessageType, relayed_name: Option<&str>) -> Text {
    let formatted = match msgtype {
        MessageType::Text(c) => c.formatted.as_ref(),
        MessageType::Notice(c) => c.formatted.as_ref(),
        MessageType::Emote(c) => c.formatted.as_ref(),
        other => MatrixMedia::of(other).and_then(|m| m.formatted),
    };
    text_of(msgtype.body(), formatted, relayed_name)
}

/// A Matrix message's `body` and `formatted_body` as the network's text.
fn text_of(body: &str, formatted: Option<&FormattedBody>, relayed_name: Option<&str>) -> Text {
    let mut t = match formatted.filter(|f| f.format == MessageFormat::Html) {
        Some(f) => msgconv::html_to_text(&f.body),
        None => Text {
            body: msgconv::strip_reply_fallback(body).to_owned(),
            formats: vec![],
        },
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
