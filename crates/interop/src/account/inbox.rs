//! Incoming envelopes: decryption, the sealed inbox that keeps a decrypted message until its ack,
//! and the events handed to the consumer.

use super::*;

/// A data message decrypted in a run, waiting for the run's commit.
struct Staged {
    env: pb::Envelope,
    group: Option<String>,
    data: DataMessage,
}

impl Actor {
    /// Envelopes that came together (up to [`MAX_RUN`]), in order. The data messages among them
    /// are decrypted one after the other over the buffered Signal state, then sealed into the
    /// inbox with all their ratchet steps in one commit, and only then handed on: one
    /// transaction, and one sealing of each session touched, for the run instead of one per
    /// message. Nothing is acked or handed on before it is committed, so a crash before the
    /// commit only brings the whole run again.
    ///
    /// Anything else (a receipt, a group update, a message replayed from the inbox) first
    /// commits and hands on what is staged, then is handled as [`Self::envelope`] does. A
    /// decryption that gives no data message (a sender key, a duplicate, an undecryptable
    /// envelope) may leave a step that must be undone alone; with something staged, the run's
    /// steps are undone together, and the staged envelopes and that one are done again one at
    /// a time, as [`Self::envelope`] does, before the run goes on.
    pub(super) async fn envelopes(&mut self, run: Vec<pb::Envelope>) {
        let mut queue: std::collections::VecDeque<pb::Envelope> = run.into();
        let mut staged: Vec<Staged> = Vec::new();
        // How many of the next envelopes are done one at a time (after an undo).
        let mut alone = 0usize;
        while let Some(env) = queue.pop_front() {
            let kind = Kind::try_from(env.kind).unwrap_or(Kind::Unspecified);
            let decrypts = matches!(kind, Kind::Prekey | Kind::Message | Kind::Group)
                && !self.recent.contains(&env.id)
                && self
                    .inbox
                    .as_ref()
                    .is_some_and(|inbox| !inbox.contains(&env.id));
            if alone > 0 || !decrypts {
                alone = alone.saturating_sub(1);
                if !self.flush(&mut staged).await {
                    return;
                }
                self.envelope(env).await;
            } else {
                match self.decrypt(&env, kind).await {
                    Ok(Some(Content {
                        body: Some(CBody::Data(data)),
                        ..
                    })) => {
                        let group = (kind == Kind::Group).then(|| env.group.clone());
                        staged.push(Staged { env, group, data });
                        continue;
                    }
                    Err(Undecryptable::StoreUnavailable(reason)) => {
                        self.redeliver_later(&reason).await;
                        return;
                    }
                    _ => {
                        self.store.rollback();
                        if staged.is_empty() {
                            // Nothing else was undone: this one alone, as it always is.
                            self.envelope(env).await;
                        } else {
                            alone = staged.len() + 1;
                            queue.push_front(env);
                            for s in staged.drain(..).rev() {
                                queue.push_front(s.env);
                            }
                        }
                    }
                }
            }
            if self.conn.is_none() {
                // Given up for now (`redeliver_later`): the rest comes again after a login.
                return;
            }
        }
        self.flush(&mut staged).await;
    }

    /// Seals the staged messages into the inbox with the buffered Signal state in one commit,
    /// then hands them on in order; `false` when the commit failed (see `redeliver_later`).
    async fn flush(&mut self, staged: &mut Vec<Staged>) -> bool {
        if staged.is_empty() {
            return true;
        }
        let mut entries = Vec::with_capacity(staged.len());
        for s in staged.iter() {
            let entry = InboxEntry {
                from: s.env.from.clone(),
                group: s.group.clone(),
                message_id: s.env.message_id.clone(),
                timestamp: s.env.timestamp,
                data: s.data.encode_to_vec(),
            };
            let sealed = serde_json::to_vec(&entry).expect("serializes");
            entries.push((INBOX, s.env.id.to_string(), Some(sealed)));
            // Noted before the write: a commit that fails after all (a lost connection during
            // COMMIT) must still be looked up on redelivery.
            if let Some(inbox) = self.inbox.as_mut() {
                inbox.insert(s.env.id);
            }
        }
        if let Err(e) = self.store.commit(entries).await {
            staged.clear();
            self.redeliver_later(&format!("cannot store decrypted messages: {e}"))
                .await;
            return false;
        }
        self.store_backoff = FIRST_STORE_BACKOFF;
        self.report_identity_changes().await;
        for s in staged.drain(..) {
            self.emit(Event::Message {
                envelope_id: s.env.id,
                from: s.env.from,
                group: s.group,
                message_id: s.env.message_id,
                timestamp: s.env.timestamp,
                data: s.data,
            })
            .await;
        }
        true
    }

    pub(super) async fn envelope(&mut self, env: pb::Envelope) {
        let id = env.id;
        if self.recent.contains(&id) {
            // Acked before but redelivered (the ack was lost with the connection).
            self.send_acks(vec![id]);
            return;
        }
        if self.replay_from_inbox(id).await {
            return;
        }
        let kind = Kind::try_from(env.kind).unwrap_or(Kind::Unspecified);
        match kind {
            Kind::Receipt => {
                let receipt = env.receipt.unwrap_or_default();
                self.emit(Event::Receipt {
                    envelope_id: id,
                    from: env.from,
                    receipt,
                })
                .await;
            }
            Kind::GroupUpdate => {
                if let Some(g) = env.group_update {
                    self.group_changed(&g).await;
                    self.emit(Event::GroupUpdate {
                        envelope_id: id,
                        from: env.from,
                        group: g,
                    })
                    .await;
                } else {
                    self.ack(&[id]).await;
                }
            }
            Kind::Prekey | Kind::Message | Kind::Group => {
                let group = (kind == Kind::Group).then(|| env.group.clone());
                match self.decrypt(&env, kind).await {
                    Ok(Some(content)) => match content.body {
                        Some(CBody::Data(data)) => {
                            self.data_message(env, group, data).await;
                        }
                        Some(CBody::SenderKeyDistribution(skd)) => {
                            self.sender_key(env, skd).await;
                        }
                        None => self.ack(&[id]).await,
                    },
                    Ok(None) => self.ack(&[id]).await,
                    Err(Undecryptable::StoreUnavailable(reason)) => {
                        self.redeliver_later(&reason).await;
                    }
                    Err(Undecryptable::Invalid(reason)) => {
                        self.store.rollback();
                        tracing::warn!(envelope = id, %reason, "cannot decrypt envelope");
                        self.emit(Event::Undecryptable {
                            envelope_id: id,
                            from: env.from,
                            group,
                            reason,
                        })
                        .await;
                    }
                }
            }
            Kind::Unspecified => self.ack(&[id]).await,
        }
    }

    /// A message decrypted before a crash is replayed from the vault; whether there was one.
    async fn replay_from_inbox(&mut self, id: u64) -> bool {
        let waiting = self.inbox.as_ref().is_none_or(|inbox| inbox.contains(&id));
        if waiting
            && let Ok(Some(raw)) = self.store.read_extra(INBOX, &id.to_string()).await
            && let Ok(entry) = serde_json::from_slice::<InboxEntry>(&raw)
            && let Ok(data) = DataMessage::decode(&entry.data[..])
        {
            self.emit(Event::Message {
                envelope_id: id,
                from: entry.from,
                group: entry.group,
                message_id: entry.message_id,
                timestamp: entry.timestamp,
                data,
            })
            .await;
            return true;
        }
        false
    }
    /// A decrypted message: sealed into the inbox with the ratchet step that produced it, then
    /// handed to the consumer (acked when it says so). A run of one.
    async fn data_message(&mut self, env: pb::Envelope, group: Option<String>, data: DataMessage) {
        self.flush(&mut vec![Staged { env, group, data }]).await;
    }

    /// A sender key for a group, taken only from a member of that group.
    async fn sender_key(&mut self, env: pb::Envelope, skd: content::SenderKeyDistribution) {
        let id = env.id;
        // A sender key only from a member of the group it names.
        match self.is_member(&skd.group, &env.from).await {
            Ok(true) => {}
            Ok(false) => {
                // The pairwise session's step is kept; the key is not.
                tracing::warn!(group = %skd.group, "dropping a sender key from someone outside the group");
                if let Err(e) = self.store.commit(vec![]).await {
                    self.redeliver_later(&format!("cannot store a session: {e}"))
                        .await;
                    return;
                }
                self.ack(&[id]).await;
                return;
            }
            Err(e) => {
                // The gateway cannot say now: left unacked (and the
                // session step undone), so it comes again rather than
                // losing a member's sender key.
                self.redeliver_later(&format!("cannot check a sender key's group: {e}"))
                    .await;
                return;
            }
        }
        let r = match SenderKeyDistributionMessage::try_from(&skd.distribution_message[..]) {
            Ok(m) => {
                process_sender_key_distribution_message(
                    &addr(&env.from),
                    &m,
                    &mut self.store.sender_keys,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "bad sender key distribution");
            self.store.rollback();
        }
        if let Err(e) = self.store.commit(vec![]).await {
            self.redeliver_later(&format!("cannot store a sender key: {e}"))
                .await;
            return;
        }
        self.report_identity_changes().await;
        self.ack(&[id]).await;
    }

    /// `Ok(None)` for a duplicate that needs no event.
    pub(super) async fn decrypt(
        &mut self,
        env: &pb::Envelope,
        kind: Kind,
    ) -> Result<Option<Content>, Undecryptable> {
        let from = addr(&env.from);
        let plaintext = match kind {
            Kind::Group => group_decrypt(&env.ciphertext, &mut self.store.sender_keys, &from).await,
            // Session version 3: classic X3DH, which the official crate no longer speaks.
            _ if x3dh::session_version(&env.ciphertext) == Some(3) => {
                return match self.x3dh_decrypt(&env.from, kind, &env.ciphertext).await? {
                    Some(p) => decode_content(p),
                    None => Ok(None),
                };
            }
            _ => {
                let msg = if kind == Kind::Prekey {
                    PreKeySignalMessage::try_from(&env.ciphertext[..])
                        .map(CiphertextMessage::PreKeySignalMessage)
                } else {
                    SignalMessage::try_from(&env.ciphertext[..])
                        .map(CiphertextMessage::SignalMessage)
                }
                .map_err(|e| Undecryptable::Invalid(e.to_string()))?;
                let st = &mut self.store;
                message_decrypt(
                    &msg,
                    &from,
                    &mut st.sessions,
                    &mut st.identity,
                    &mut st.prekeys,
                    &st.signed,
                    &mut st.kyber,
                    &mut rand::rng(),
                )
                .await
            }
        };
        match plaintext {
            Ok(p) => decode_content(p),
            Err(SignalProtocolError::DuplicatedMessage(..)) => Ok(None),
            // The vault's database, not the message, failed (interop/signal_store.rs).
            Err(SignalProtocolError::InvalidState("vault store", e)) => {
                Err(Undecryptable::StoreUnavailable(format!("vault store: {e}")))
            }
            Err(e) => Err(Undecryptable::Invalid(e.to_string())),
        }
    }
}

fn decode_content(plaintext: Vec<u8>) -> Result<Option<Content>, Undecryptable> {
    let p = zeroize::Zeroizing::new(plaintext);
    Content::decode(&p[..])
        .map(Some)
        .map_err(|e| Undecryptable::Invalid(format!("undecodable content: {e}")))
}
