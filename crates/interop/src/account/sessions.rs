//! Pairwise Signal sessions: prekeys kept topped up, sessions from fetched bundles (PQXDH, or
//! classic X3DH in `x3dh` for peers without Kyber prekeys), and encrypting outgoing content for
//! a contact or every member of a group.

use super::*;

impl Actor {
    /// First upload, rotation of the signed prekey, and replenishing one-time keys.
    pub(super) async fn maintain_keys(
        &mut self,
        one_time: u32,
        kyber: u32,
    ) -> Result<(), InteropError> {
        let signed_at = self
            .store
            .read_extra(META, "signed_at")
            .await?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(i64::from_be_bytes);
        let now = mib_core::now_ms() as i64;
        let base = signed_at.is_none_or(|t| now - t > SIGNED_PREKEY_MAX_AGE_MS);
        let need_ot = if one_time < LOW_WATER { BATCH } else { 0 };
        let need_ky = if kyber < LOW_WATER { BATCH } else { 0 };
        if !base && need_ot == 0 && need_ky == 0 {
            return Ok(());
        }
        let up = keys::make_upload(&mut self.store, base, need_ot, need_ky)
            .await
            .map_err(|e| InteropError::Crypto(e.to_string()))?;
        match self.conn()?.request(Body::UploadKeys(up)).await? {
            Body::KeyCountsResult(_) => {}
            _ => return Err(InteropError::Unexpected),
        }
        if base {
            self.store
                .commit(vec![(
                    META,
                    "signed_at".into(),
                    Some(now.to_be_bytes().to_vec()),
                )])
                .await?;
        }
        Ok(())
    }

    /// The peer's bundle from the key directory (takes one of its one-time prekeys).
    pub(super) async fn fetch_bundle(&mut self, peer: &str) -> Result<pb::Bundle, InteropError> {
        match self
            .conn()?
            .request(Body::FetchBundle(pb::FetchBundle {
                account: peer.to_owned(),
            }))
            .await?
        {
            Body::Bundle(b) => Ok(b),
            _ => Err(InteropError::Unexpected),
        }
    }

    /// Starts a PQXDH session from a bundle with a Kyber prekey (buffered; the caller commits).
    pub(super) async fn start_pqxdh(
        &mut self,
        peer: &str,
        bundle: pb::Bundle,
    ) -> Result<(), InteropError> {
        let signed = bundle
            .signed_prekey
            .ok_or_else(|| InteropError::Crypto("bundle without signed prekey".into()))?;
        let kyber = bundle
            .kyber_prekey
            .ok_or_else(|| InteropError::Crypto("bundle without Kyber prekey".into()))?;
        let pre_key = match bundle.one_time_prekey {
            Some(k) => Some((
                k.id.into(),
                PublicKey::deserialize(&k.public_key)
                    .map_err(|e| InteropError::Crypto(e.to_string()))?,
            )),
            None => None,
        };
        let b = PreKeyBundle::new(
            bundle.registration_id,
            DeviceId::new(bundle.device_id.clamp(1, 127) as u8)
                .map_err(|e| InteropError::Crypto(e.to_string()))?,
            pre_key,
            signed.id.into(),
            PublicKey::deserialize(&signed.public_key)
                .map_err(|e| InteropError::Crypto(e.to_string()))?,
            signed.signature,
            kyber.id.into(),
            kem::PublicKey::deserialize(&kyber.public_key).map_err(crypto)?,
            kyber.signature,
            IdentityKey::decode(&bundle.identity_key).map_err(crypto)?,
        )
        .map_err(crypto)?;
        let st = &mut self.store;
        let r = process_prekey_bundle(
            &addr(peer),
            &mut st.sessions,
            &mut st.identity,
            &b,
            std::time::SystemTime::now(),
            &mut rand::rng(),
        )
        .await;
        r.map_err(crypto)?;
        Ok(())
    }

    pub(super) async fn encrypt_for(
        &mut self,
        peer: &str,
        plaintext: &[u8],
    ) -> Result<(Kind, Vec<u8>), InteropError> {
        let r = match self.session_for(peer).await {
            Ok(x3dh::Protocol::X3dh) => self.x3dh_encrypt(peer, plaintext).await,
            Ok(x3dh::Protocol::Pqxdh) => {
                let st = &mut self.store;
                message_encrypt(
                    plaintext,
                    &addr(peer),
                    &mut st.sessions,
                    &mut st.identity,
                    std::time::SystemTime::now(),
                    &mut rand::rng(),
                )
                .await
                .map_err(crypto)
                .map(|msg| {
                    let kind = match msg {
                        CiphertextMessage::PreKeySignalMessage(_) => Kind::Prekey,
                        _ => Kind::Message,
                    };
                    (kind, msg.serialize().to_vec())
                })
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(out) => {
                self.store.commit(vec![]).await?;
                Ok(out)
            }
            Err(e) => {
                self.store.rollback();
                Err(e)
            }
        }
    }

    pub(super) async fn send_data(
        &mut self,
        to: &Target,
        message_id: &str,
        data: DataMessage,
    ) -> Result<Answer, InteropError> {
        let plaintext = zeroize::Zeroizing::new(
            Content {
                body: Some(CBody::Data(data)),
            }
            .encode_to_vec(),
        );
        let timestamp = mib_core::now_ms();
        let send = match to {
            Target::Account(peer) => {
                let (kind, ciphertext) = self.encrypt_for(peer, &plaintext).await?;
                pb::Send {
                    to: peer.clone(),
                    group: String::new(),
                    kind: kind as i32,
                    ciphertext,
                    message_id: message_id.to_owned(),
                    timestamp,
                }
            }
            Target::Group(group) => {
                let dist = self.ensure_sender_key(group).await?;
                let me = addr(&self.creds.account);
                let r = group_encrypt(
                    &mut self.store.sender_keys,
                    &me,
                    dist,
                    &plaintext,
                    &mut rand::rng(),
                )
                .await;
                let msg = r.map_err(|e| {
                    self.store.rollback();
                    crypto(e)
                })?;
                self.store.commit(vec![]).await?;
                pb::Send {
                    to: String::new(),
                    group: group.clone(),
                    kind: Kind::Group as i32,
                    ciphertext: msg.serialized().to_vec(),
                    message_id: message_id.to_owned(),
                    timestamp,
                }
            }
        };
        // Not waited for here: the actor goes on with its next command while the gateway
        // stores this one; the caller waits for the answer.
        self.conn()?.submit(Body::Send(send)).await
    }

    pub(super) async fn report_identity_changes(&mut self) {
        for peer in self.store.take_identity_changes() {
            self.emit(Event::IdentityChanged { peer }).await;
        }
    }
}
