//! The network to Matrix: events of a login (messages, receipts, group changes, typing, identity
//! changes) become events in the chat's portal, sent as the contact's ghost.

use std::time::Duration;

use ruma::{
    UInt,
    events::{
        AnyMessageLikeEventContent,
        poll::{
            unstable_end::UnstablePollEndEventContent,
            unstable_response::UnstablePollResponseEventContent,
            unstable_start::{
                NewUnstablePollStartEventContent, UnstablePollAnswer, UnstablePollAnswers,
                UnstablePollStartContentBlock, UnstablePollStartEventContent,
            },
        },
        reaction::ReactionEventContent,
        relation::{Annotation, InReplyTo, Replacement, Reply},
        room::{
            ImageInfo, ThumbnailInfo,
            message::{
                AudioInfo, AudioMessageEventContent, FileInfo, FileMessageEventContent,
                ImageMessageEventContent, LocationMessageEventContent, NoticeMessageEventContent,
                Relation, RoomMessageEventContentWithoutRelation, UnstableAmplitude,
                UnstableAudioDetailsContentBlock, UnstableVoiceContentBlock, VideoInfo,
                VideoMessageEventContent,
            },
        },
        sticker::StickerEventContent,
    },
};

use super::*;

impl Bridge {
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
                self.on_message(
                    mxid,
                    &acc,
                    from,
                    group.as_deref(),
                    message_id,
                    *timestamp,
                    data,
                )
                .await
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
                self.on_read(mxid, &acc, from, group.as_deref(), message_ids)
                    .await
            }
            NetEvent::Typing {
                from,
                group,
                typing,
            } => {
                let chat_id = group.as_deref().unwrap_or(from);
                if let Some(room) = self.portal_room(mxid, chat_id).await? {
                    let ghost = self.ghost(from, Some(&acc)).await?;
                    self.matrix.typing(&room, &ghost, *typing).await?;
                }
                Ok(())
            }
            NetEvent::GroupUpdate { group, from, .. } => {
                self.on_group_update(mxid, &acc, group, from).await
            }
            NetEvent::IdentityChanged { peer } => {
                if let Some(room) = self.portal_room(mxid, peer).await? {
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
                let chat_id = group.as_deref().unwrap_or(from);
                if let Some(room) = self.portal_room(mxid, chat_id).await? {
                    let text = format!("A message from {from} could not be decrypted ({reason}).");
                    self.notice(&room, &text).await?;
                }
                Ok(())
            }
            NetEvent::LoggedOut { reason } => {
                if let Some(room) = self.users.management_room(mxid).await? {
                    let text = format!(
                        "Your interop login ended: {reason}. Send `login` to log in again."
                    );
                    self.notice(&room, &text).await?;
                }
                Ok(())
            }
            NetEvent::Connected | NetEvent::Disconnected { .. } => Ok(()),
        }
    }

    /// The room of the portal of `mxid` for `chat_id`, if it has one.
    async fn portal_room(&self, mxid: &str, chat_id: &str) -> Result<Option<String>, BridgeError> {
        Ok(self
            .portals
            .portal(mxid, chat_id)
            .await?
            .and_then(|p| p.room_id)
            .map(String::from))
    }

    /// A data message from `from` (in `group`, or their 1:1 chat): through the message request
    /// gate, into its portal (created if needed), then a delivery receipt back.
    #[allow(clippy::too_many_arguments)]
    async fn on_message(
        &self,
        mxid: &str,
        acc: &Arc<dyn NetAccount>,
        from: &str,
        group: Option<&str>,
        message_id: &str,
        timestamp: u64,
        data: &Message,
    ) -> Result<(), BridgeError> {
        let chat = match group {
            Some(g) => NetTarget::Group(g.to_owned()),
            None => NetTarget::Contact(from.to_owned()),
        };
        let gate = self
            .request_gate(mxid, acc, &chat, from, Some((message_id, timestamp, data)))
            .await?;
        if gate == crate::requests::Gate::Closed {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let portal = self.ensure_portal(mxid, acc, &chat, None).await?;
        portal
            .network_message(acc, from, message_id, timestamp, data)
            .await?;
        self.metrics.message_bridged("interop_to_matrix", started);
        // Delivered: the message reached the user's Matrix side. Sent in the background, so it
        // costs the loop nothing (delivery.rs).
        let plain = matches!(
            data.body,
            Some(D::Text(_) | D::Media(_) | D::Location(_) | D::Contact(_))
        );
        if plain && from != acc.account_id() {
            self.delivery_receipts
                .delivered(acc, from, group, message_id);
        }
        Ok(())
    }

    /// `from` read `message_ids`: the ghost's read receipt moves to the last of them that is
    /// bridged.
    async fn on_read(
        &self,
        mxid: &str,
        acc: &Arc<dyn NetAccount>,
        from: &str,
        group: Option<&str>,
        message_ids: &[String],
    ) -> Result<(), BridgeError> {
        let chat_id = group.unwrap_or(from);
        let Some(room) = self.portal_room(mxid, chat_id).await? else {
            return Ok(());
        };
        let ghost = self.ghost(from, Some(acc)).await?;
        let mut last = None;
        for id in message_ids {
            if let Some(m) = self.portals.by_message(&room, id, "").await? {
                last = Some(m.event_id);
            }
        }
        if let Some(event_id) = last {
            self.matrix.read_receipt(&room, &ghost, &event_id).await?;
        }
        Ok(())
    }
}

/// A network message on its way into a portal: who sent it, its id, the Matrix user it is
/// sent as (the contact's ghost, or the bot for the login's own messages from another
/// device), its transaction id and its time.
struct FromNetwork<'a> {
    from: &'a str,
    message_id: &'a str,
    sender: &'a str,
    txn: &'a str,
    ts: Option<u64>,
}

impl PortalRef<'_> {
    /// interop → Matrix for one data message in the portal.
    pub(crate) async fn network_message(
        &self,
        acc: &Arc<dyn NetAccount>,
        from: &str,
        message_id: &str,
        timestamp: u64,
        data: &Message,
    ) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        // The sender's time, so that a backlog does not show up as "now"; never in the future.
        let ts = (timestamp > 0).then(|| timestamp.min(crate::now_ms()));
        if self
            .bridge
            .portals
            .by_message(room, message_id, "")
            .await?
            .is_some()
        {
            return Ok(()); // redelivered, already bridged
        }
        // In a shared group portal, another login may bridge it (shared.rs).
        let me = acc.account_id();
        if self.leave_to_others(me, from, message_id).await? {
            return Ok(());
        }
        let sender = if from == me {
            self.bridge.matrix.bot_mxid().to_owned()
        } else {
            self.bridge.ghost(from, Some(acc)).await?
        };
        let txn = stable_id(&["in", room, from, message_id]);
        let from_net = FromNetwork {
            from,
            message_id,
            sender: &sender,
            txn: &txn,
            ts,
        };
        let reply_to = match &data.reply_to {
            Some(q) => {
                self.bridge
                    .portals
                    .by_message(room, &q.message_id, "")
                    .await?
            }
            None => None,
        };
        let msgtype = match &data.body {
            Some(D::Text(t)) => text_message(t),
            Some(D::Edit(e)) => return self.edit(&from_net, e).await,
            Some(D::Delete(d)) => return self.delete(&from_net, d).await,
            Some(D::Reaction(r)) => return self.reaction(&from_net, r).await,
            Some(D::PollVote(v)) => return self.poll_vote(&from_net, v).await,
            Some(D::PollEnd(e)) => return self.poll_end(&from_net, e).await,
            Some(D::Timer(t)) => {
                let seconds = t.seconds.min(disappear::MAX_TIMER_S);
                self.set_timer(seconds).await?;
                self.notice(&disappear::timer_text(from, seconds)).await?;
                return self.map("", message_id, from, &sender, "timer").await;
            }
            Some(D::Poll(p)) => match poll_start(p) {
                Ok(start) => {
                    let ev = self
                        .bridge
                        .matrix
                        .send_message(
                            room,
                            &sender,
                            UnstablePollStartEventContent::New(start).into(),
                            &txn,
                            ts,
                        )
                        .await?;
                    self.disappear_later(&ev, ts.unwrap_or_else(crate::now_ms), data.expire_timer)
                        .await?;
                    return self.map(&ev, message_id, from, &sender, "").await;
                }
                Err(why) => {
                    self.bridge.metrics.refused("interop_poll_invalid");
                    MessageType::Notice(NoticeMessageEventContent::plain(format!(
                        "A poll was not bridged: {why}."
                    )))
                }
            },
            Some(D::Media(m)) => self.media_to_matrix(acc, &sender, m).await?,
            Some(D::Location(l)) => MessageType::Location(LocationMessageEventContent::new(
                msgconv::bounded_body(&msgconv::location_text(l)).into_owned(),
                format!("geo:{},{}", l.latitude, l.longitude),
            )),
            Some(D::Contact(c)) => MessageType::Text(TextMessageEventContent::plain(
                msgconv::bounded_body(&msgconv::contact_text(c)).into_owned(),
            )),
            None => MessageType::Notice(NoticeMessageEventContent::plain(
                "(an empty or unsupported message was received)",
            )),
        };
        let in_reply_to = match reply_to {
            Some(target) => Some(InReplyTo::new(event_id(&target.event_id)?)),
            None => None,
        };
        let content = match (msgtype, &data.body) {
            // A sticker is its own event type on Matrix (clients show it without a bubble).
            (MessageType::Image(image), Some(D::Media(m))) if m.kind == MediaKind::Sticker => {
                let info = image.info.map_or_else(ImageInfo::new, |i| *i);
                let mut sticker =
                    StickerEventContent::with_source(image.body, info, image.source.into());
                sticker.relates_to = in_reply_to.map(|r| Relation::Reply(Reply::new(r)));
                AnyMessageLikeEventContent::Sticker(sticker)
            }
            (msgtype, _) => {
                let mut content = message(msgtype);
                content.relates_to = in_reply_to.map(|r| Relation::Reply(Reply::new(r)));
                AnyMessageLikeEventContent::RoomMessage(content)
            }
        };
        let ev = self
            .bridge
            .matrix
            .send_message(room, &sender, content, &txn, ts)
            .await?;
        // It disappears that long after it was sent (a backlog's may go at once). Scheduled
        // before it is mapped: a message found in the map counts as bridged and is not
        // handled again, so a schedule written after the map could be lost to a failure
        // between the two.
        self.disappear_later(&ev, ts.unwrap_or_else(crate::now_ms), data.expire_timer)
            .await?;
        self.map(&ev, message_id, from, &sender, "").await
    }

    /// The bridged message `target` that an edit or a deletion from the network is about, when
    /// its sender wrote it (`None`: it is dropped and counted as refused with `refused`). Not
    /// there yet: the event is set aside until it arrives.
    async fn own_target(
        &self,
        inc: &FromNetwork<'_>,
        target: &str,
        refused: &str,
    ) -> Result<Option<MappedMessage>, BridgeError> {
        let room = self.room.as_str();
        let Some(t) = self.bridge.portals.by_message(room, target, "").await? else {
            return Err(BridgeError::TargetNotYet(target.to_owned()));
        };
        if t.sender != inc.from {
            tracing::info!(%room, what = refused, "dropping a change to a message its sender did not write");
            self.bridge.metrics.refused(refused);
            return Ok(None);
        }
        Ok(Some(t))
    }

    /// An edit from the network, by the author of the message it edits.
    async fn edit(&self, inc: &FromNetwork<'_>, e: &Edit) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        let Some(target) = self
            .own_target(inc, &e.target, "interop_edit_not_author")
            .await?
        else {
            return Ok(());
        };
        let t = e.text.clone().unwrap_or_default();
        // The fallback for clients without edits is short: the event must hold the new
        // content too, within the homeserver's 64 KiB.
        let mut c = message(text_message(&Text {
            body: format!("* {}", msgconv::preview(&t.body, 500)),
            formats: vec![],
        }));
        c.relates_to = Some(Relation::Replacement(Replacement::new(
            event_id(&target.event_id)?,
            RoomMessageEventContentWithoutRelation::new(text_message(&t)),
        )));
        let ev = self
            .bridge
            .matrix
            .send_message(room, inc.sender, c.into(), inc.txn, inc.ts)
            .await?;
        self.map(&ev, inc.message_id, inc.from, inc.sender, "edit")
            .await
    }

    /// A deletion from the network, by the author of the message it deletes: a redaction.
    async fn delete(&self, inc: &FromNetwork<'_>, d: &Delete) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        let Some(target) = self
            .own_target(inc, &d.target, "interop_delete_not_author")
            .await?
        else {
            return Ok(());
        };
        // The mapping goes once the redaction went out (a failed one is tried again).
        self.bridge
            .matrix
            .redact(room, inc.sender, &target.event_id)
            .await?;
        self.bridge
            .portals
            .unmap_event(room, &target.event_id)
            .await?;
        self.map("", inc.message_id, inc.from, inc.sender, "delete")
            .await
    }

    /// A reaction from the network, or its removal.
    async fn reaction(&self, inc: &FromNetwork<'_>, r: &Reaction) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        let part = reaction_part(inc.from, &r.emoji);
        if r.remove {
            if let Some(m) = self
                .bridge
                .portals
                .by_message(room, &r.target, &part)
                .await?
            {
                self.bridge
                    .matrix
                    .redact(room, inc.sender, &m.event_id)
                    .await?;
                self.bridge.portals.unmap_event(room, &m.event_id).await?;
            }
            return Ok(());
        }
        let Some(target) = self.bridge.portals.by_message(room, &r.target, "").await? else {
            return Err(BridgeError::TargetNotYet(r.target.clone()));
        };
        if self
            .bridge
            .portals
            .by_message(room, &r.target, &part)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let c = ReactionEventContent::new(Annotation::new(
            event_id(&target.event_id)?,
            r.emoji.clone(),
        ));
        let ev = self
            .bridge
            .matrix
            .send_message(room, inc.sender, c.into(), inc.txn, inc.ts)
            .await?;
        self.map(&ev, &r.target, inc.from, inc.sender, &part).await
    }

    /// A vote from the network on a poll of this chat: a poll response from the voter's ghost
    /// (the latest one counts on Matrix, as on the network). Options are the poll's answers by
    /// index; indexes the poll does not have are dropped.
    async fn poll_vote(&self, inc: &FromNetwork<'_>, v: &PollVote) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        let Some(poll) = self.bridge.portals.by_message(room, &v.target, "").await? else {
            return Err(BridgeError::TargetNotYet(v.target.clone()));
        };
        let ids = self.bridge.poll_answer_ids(room, &poll.event_id).await?;
        let mut answers: Vec<String> = Vec::new();
        for i in v.selections.iter().take(MAX_POLL_OPTIONS) {
            let id = match &ids {
                Some(ids) => ids.get(*i as usize).cloned(),
                None => ((*i as usize) < MAX_POLL_OPTIONS).then(|| i.to_string()),
            };
            if let Some(id) = id
                && !answers.contains(&id)
            {
                answers.push(id);
            }
        }
        let c = UnstablePollResponseEventContent::new(answers, event_id(&poll.event_id)?);
        let ev = self
            .bridge
            .matrix
            .send_message(room, inc.sender, c.into(), inc.txn, inc.ts)
            .await?;
        self.map(&ev, inc.message_id, inc.from, inc.sender, "poll-vote")
            .await
    }

    /// The end of a poll, from the network, by its author.
    async fn poll_end(&self, inc: &FromNetwork<'_>, e: &PollEnd) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        let Some(poll) = self
            .own_target(inc, &e.target, "interop_poll_end_not_author")
            .await?
        else {
            return Ok(());
        };
        let c = UnstablePollEndEventContent::new("The poll has ended.", event_id(&poll.event_id)?);
        let ev = self
            .bridge
            .matrix
            .send_message(room, inc.sender, c.into(), inc.txn, inc.ts)
            .await?;
        self.map(&ev, inc.message_id, inc.from, inc.sender, "poll-end")
            .await
    }

    /// Maps the portal's Matrix event `event_id` to the network's `message_id` (`part` tells
    /// what of the message it is: "" the message, an edit, a deletion, a reaction).
    pub(super) async fn map(
        &self,
        event_id: &str,
        message_id: &str,
        sender: &str,
        matrix_sender: &str,
        part: &str,
    ) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        let event_id = if event_id.is_empty() {
            format!("$none-{message_id}-{part}")
        } else {
            event_id.to_owned()
        };
        self.bridge
            .portals
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

    pub(super) async fn media_to_matrix(
        &self,
        acc: &Arc<dyn NetAccount>,
        sender: &str,
        m: &Media,
    ) -> Result<MessageType, BridgeError> {
        let room = self.room.as_str();
        let max = self.bridge.settings.bridge.max_media_size;
        let notice = |text: String| MessageType::Notice(NoticeMessageEventContent::plain(text));
        if m.size > max {
            self.bridge.metrics.refused("media_too_large");
            return Ok(notice(format!(
                "A file of {} was not bridged: it is larger than this bridge's limit of {}.",
                human_size(m.size),
                human_size(max)
            )));
        }
        let data = match acc.download(&m.blob, &m.key, &m.sha256, max).await {
            Ok(d) if m.size == 0 || d.len() as u64 == m.size => d,
            Err(e) if e.is_transient() => return Err(e.into()),
            // Over the limit after all, not the size its sender declared, or not what its hash
            // says: the sender's doing, so the room hears of it and nothing is retried.
            other => {
                self.bridge.metrics.refused("media_refused");
                let why = match other {
                    Ok(_) => "it is not the size its sender declared".to_owned(),
                    Err(e) => e.to_string(),
                };
                return Ok(notice(format!("A file was not bridged: {why}.")));
            }
        };
        let size = UInt::new(data.len() as u64);
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
        let source = self
            .bridge
            .matrix
            .upload_for_room(room, sender, data, &mime, &filename)
            .await?;
        let thumbnail = if m.thumbnail.is_empty() {
            None
        } else {
            let thumb = self
                .bridge
                .matrix
                .upload_for_room(
                    room,
                    sender,
                    m.thumbnail.clone(),
                    "image/jpeg",
                    "thumbnail.jpg",
                )
                .await?;
            let mut info = ThumbnailInfo::new();
            info.mimetype = Some("image/jpeg".into());
            info.size = UInt::new(m.thumbnail.len() as u64);
            Some((thumb, Box::new(info)))
        };
        // The caption is bounded like any text; without one, the body is the file name.
        let (body, formatted) = match m.caption.as_ref().filter(|c| !c.body.is_empty()) {
            Some(c) => text_parts(c),
            None => (filename.clone(), None),
        };
        let px = |n: u32| (m.width > 0 && m.height > 0).then(|| UInt::from(n));
        let duration = (m.duration_ms > 0).then(|| Duration::from_millis(m.duration_ms.into()));
        let (thumbnail_source, thumbnail_info) = thumbnail.unzip();
        Ok(match m.kind {
            MediaKind::Image | MediaKind::Sticker => {
                let mut info = ImageInfo::new();
                (info.mimetype, info.size) = (Some(mime), size);
                (info.width, info.height) = (px(m.width), px(m.height));
                (info.thumbnail_source, info.thumbnail_info) = (thumbnail_source, thumbnail_info);
                let mut c = ImageMessageEventContent::new(body, source);
                (c.formatted, c.filename, c.info) =
                    (formatted, Some(filename), Some(Box::new(info)));
                MessageType::Image(c)
            }
            MediaKind::Video => {
                let mut info = VideoInfo::new();
                (info.mimetype, info.size, info.duration) = (Some(mime), size, duration);
                (info.width, info.height) = (px(m.width), px(m.height));
                (info.thumbnail_source, info.thumbnail_info) = (thumbnail_source, thumbnail_info);
                let mut c = VideoMessageEventContent::new(body, source);
                (c.formatted, c.filename, c.info) =
                    (formatted, Some(filename), Some(Box::new(info)));
                MessageType::Video(c)
            }
            kind @ (MediaKind::Audio | MediaKind::Voice) => {
                let mut info = AudioInfo::new();
                (info.mimetype, info.size, info.duration) = (Some(mime), size, duration);
                let mut c = AudioMessageEventContent::new(body, source);
                (c.formatted, c.filename, c.info) =
                    (formatted, Some(filename), Some(Box::new(info)));
                if kind == MediaKind::Voice {
                    let waveform = m
                        .waveform
                        .iter()
                        .take(1024)
                        .map(|v| UnstableAmplitude::new(u16::try_from(*v).unwrap_or(u16::MAX)))
                        .collect();
                    c.voice = Some(UnstableVoiceContentBlock::new());
                    c.audio = Some(UnstableAudioDetailsContentBlock::new(
                        Duration::from_millis(m.duration_ms.into()),
                        waveform,
                    ));
                }
                MessageType::Audio(c)
            }
            _ => {
                let mut info = FileInfo::new();
                (info.mimetype, info.size) = (Some(mime), size);
                (info.thumbnail_source, info.thumbnail_info) = (thumbnail_source, thumbnail_info);
                let mut c = FileMessageEventContent::new(body, source);
                (c.formatted, c.filename, c.info) =
                    (formatted, Some(filename), Some(Box::new(info)));
                MessageType::File(c)
            }
        })
    }
}

/// A network poll as a Matrix poll (MSC3381, unstable types, as clients send them today): the
/// answers' ids are the options' indexes, so a vote maps back without a look-up; a text
/// fallback lists the options for clients without polls. Refused (with the reason) when it has
/// no options or more than Matrix allows.
fn poll_start(p: &Poll) -> Result<NewUnstablePollStartEventContent, String> {
    let n = p.options.len();
    if n == 0 || n > MAX_POLL_OPTIONS {
        return Err(format!(
            "it has {n} options, and Matrix polls have 1 to {MAX_POLL_OPTIONS}"
        ));
    }
    let question = msgconv::preview(&p.question, MAX_POLL_TEXT).into_owned();
    let options: Vec<String> = p
        .options
        .iter()
        .map(|o| msgconv::preview(o, MAX_POLL_TEXT).into_owned())
        .collect();
    let answers: Vec<UnstablePollAnswer> = options
        .iter()
        .enumerate()
        .map(|(i, o)| UnstablePollAnswer::new(i.to_string(), o.clone()))
        .collect();
    let answers = UnstablePollAnswers::try_from(answers).map_err(|e| e.to_string())?;
    let mut block = UnstablePollStartContentBlock::new(question.clone(), answers);
    block.max_selections = UInt::from(p.max_selections.clamp(1, n as u32));
    let mut fallback = question;
    for (i, o) in options.iter().enumerate() {
        fallback.push_str(&format!("\n{}. {o}", i + 1));
    }
    Ok(NewUnstablePollStartEventContent::plain_text(
        fallback, block,
    ))
}
