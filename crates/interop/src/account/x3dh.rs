//! Classic X3DH sessions, for peers whose bundles carry no Kyber prekey: X3DH-era clients
//! (docs/interop-protocol.md §14.1). The official crate makes and accepts PQXDH sessions only;
//! these are made and run by `wacore-libsignal`, which speaks the same wire format at session
//! version 3.
//!
//! Its stores must be `Send`, and ours belong to the actor (not `Send`). So each operation loads
//! the few records it touches (our identity, the peer's identity and session, a used prekey) into
//! small stores of its own, runs, and hands what changed back to the vault store, whose commit
//! writes it together with everything else of that step (for a decryption: with the inbox record).
//!
//! The choice is kept per peer in the vault, as the sessions themselves. A peer with a PQXDH
//! session is spoken to over it, whatever else there is; one with only a classic session over
//! X3DH. Bundles are fetched only for a peer without a session, so once a peer has a PQXDH
//! session nothing the network serves later takes it back to X3DH. A classic peer's bundle is
//! fetched again once per `x3dh_recheck`; when it has a Kyber prekey by then, a PQXDH session
//! replaces the classic one for sending (and a peer that starts a PQXDH session itself moves
//! over the same way).

use async_trait::async_trait;
use wacore_libsignal::protocol::{self as wa, GenericSignedPreKey as _};

use super::*;

/// Vault record kinds kept beside the Signal ones (names: the peer's address, `account.1`).
pub(crate) mod kind {
    /// A classic session (wacore's serialization).
    pub const X3DH_SESSION: &str = "x3dh_session";
    /// When the classic peer's bundle was last looked at for Kyber prekeys (ms, big-endian).
    pub const X3DH_CHECKED: &str = "x3dh_checked";
}

/// How often a classic peer's bundle is fetched again to see whether it can do PQXDH now (each
/// fetch takes one of its one-time prekeys), unless the configuration says otherwise.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(24 * 3600);

/// The session version a `PREKEY` or `MESSAGE` ciphertext shows: the high four bits of its first
/// byte, 3 for X3DH and 4 for PQXDH.
pub(super) fn session_version(ciphertext: &[u8]) -> Option<u8> {
    ciphertext.first().map(|b| b >> 4)
}

/// Which kind of session a message to a peer goes out on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    Pqxdh,
    X3dh,
}

fn name_of(peer: &str) -> String {
    format!("{peer}.{DEVICE_ID}")
}

fn wa_addr(peer: &str) -> wa::ProtocolAddress {
    wa::ProtocolAddress::new(peer, DEVICE_ID.into())
}

fn wa_err(e: impl std::fmt::Display) -> InteropError {
    InteropError::Crypto(format!("X3DH: {e}"))
}

fn vault_err(e: SignalProtocolError) -> InteropError {
    InteropError::Crypto(e.to_string())
}

/// The one peer's session, as wacore's session store.
struct OneSession {
    peer: wa::ProtocolAddress,
    record: Option<wa::SessionRecord>,
    changed: bool,
}

#[async_trait]
impl wa::SessionStore for OneSession {
    async fn load_session(
        &self,
        a: &wa::ProtocolAddress,
    ) -> wa::error::Result<Option<wa::SessionRecord>> {
        Ok(if *a == self.peer {
            self.record.clone()
        } else {
            None
        })
    }

    async fn has_session(&self, a: &wa::ProtocolAddress) -> wa::error::Result<bool> {
        Ok(*a == self.peer && self.record.is_some())
    }

    async fn store_session(
        &mut self,
        a: &wa::ProtocolAddress,
        record: wa::SessionRecord,
    ) -> wa::error::Result<()> {
        if *a != self.peer {
            return Err(wa::SignalProtocolError::InvalidArgument(
                "a session of another peer".into(),
            ));
        }
        self.record = Some(record);
        self.changed = true;
        Ok(())
    }
}

/// Our identity and the one peer's, as wacore's identity store. Every identity is trusted, as
/// on the PQXDH side (trust on first use; a change is reported to the user in the portal).
struct OneIdentity {
    pair: wa::IdentityKeyPair,
    registration_id: u32,
    peer: wa::ProtocolAddress,
    known: Option<wa::IdentityKey>,
    saved: Option<wa::IdentityKey>,
}

#[async_trait]
impl wa::IdentityKeyStore for OneIdentity {
    async fn get_identity_key_pair(&self) -> wa::error::Result<wa::IdentityKeyPair> {
        Ok(self.pair.clone())
    }

    async fn get_local_registration_id(&self) -> wa::error::Result<u32> {
        Ok(self.registration_id)
    }

    async fn save_identity(
        &mut self,
        a: &wa::ProtocolAddress,
        identity: &wa::IdentityKey,
    ) -> wa::error::Result<wa::IdentityChange> {
        if *a != self.peer {
            return Err(wa::SignalProtocolError::InvalidArgument(
                "an identity of another peer".into(),
            ));
        }
        let changed = self.known.is_some_and(|k| k != *identity);
        self.known = Some(*identity);
        self.saved = Some(*identity);
        Ok(wa::IdentityChange::from_changed(changed))
    }

    async fn is_trusted_identity(
        &self,
        _: &wa::ProtocolAddress,
        _: &wa::IdentityKey,
        _: wa::Direction,
    ) -> wa::error::Result<bool> {
        Ok(true)
    }

    async fn get_identity(
        &self,
        a: &wa::ProtocolAddress,
    ) -> wa::error::Result<Option<wa::IdentityKey>> {
        Ok(if *a == self.peer { self.known } else { None })
    }
}

/// The prekeys a peer's first classic message names, read from the vault beforehand.
#[derive(Default)]
struct UsedPreKeys {
    one_time: Option<(wa::PreKeyId, wa::PreKeyRecord)>,
    signed: Option<(wa::SignedPreKeyId, wa::SignedPreKeyRecord)>,
}

#[async_trait]
impl wa::PreKeyStore for UsedPreKeys {
    async fn get_pre_key(&self, id: wa::PreKeyId) -> wa::error::Result<wa::PreKeyRecord> {
        match &self.one_time {
            Some((have, record)) if *have == id => Ok(record.clone()),
            _ => Err(wa::SignalProtocolError::InvalidPreKeyId),
        }
    }

    async fn save_pre_key(
        &mut self,
        _: wa::PreKeyId,
        _: &wa::PreKeyRecord,
    ) -> wa::error::Result<()> {
        Err(wa::SignalProtocolError::InvalidArgument(
            "prekeys are made by the PQXDH side".into(),
        ))
    }

    async fn remove_pre_key(&mut self, _: wa::PreKeyId) -> wa::error::Result<()> {
        // Removed from the vault by the caller, from `consumed_prekey_id`.
        Ok(())
    }
}

#[async_trait]
impl wa::SignedPreKeyStore for UsedPreKeys {
    async fn get_signed_pre_key(
        &self,
        id: wa::SignedPreKeyId,
    ) -> wa::error::Result<wa::SignedPreKeyRecord> {
        match &self.signed {
            Some((have, record)) if *have == id => Ok(record.clone()),
            _ => Err(wa::SignalProtocolError::InvalidSignedPreKeyId),
        }
    }

    async fn save_signed_pre_key(
        &mut self,
        _: wa::SignedPreKeyId,
        _: &wa::SignedPreKeyRecord,
    ) -> wa::error::Result<()> {
        Err(wa::SignalProtocolError::InvalidArgument(
            "prekeys are made by the PQXDH side".into(),
        ))
    }
}

impl Actor {
    /// Which session a message to `peer` goes out on, starting one from a fetched bundle when
    /// there is none (PQXDH when the bundle has a Kyber prekey, X3DH otherwise).
    pub(super) async fn session_for(&mut self, peer: &str) -> Result<Protocol, InteropError> {
        use libsignal_protocol::SessionStore;
        if self
            .store
            .sessions
            .load_session(&addr(peer))
            .await
            .map_err(crypto)?
            .is_some()
        {
            return Ok(Protocol::Pqxdh);
        }
        let name = name_of(peer);
        if self.classic_session(peer).await?.is_some() {
            let checked = self
                .store
                .buffered(kind::X3DH_CHECKED, &name)
                .await
                .map_err(vault_err)?
                .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0);
            let now = mib_core::now_ms() as i64;
            if now - checked < self.x3dh_recheck.as_millis() as i64 {
                return Ok(Protocol::X3dh);
            }
            let bundle = self.fetch_bundle(peer).await?;
            self.store
                .buffer(kind::X3DH_CHECKED, name, Some(now.to_be_bytes().to_vec()));
            if bundle.kyber_prekey.is_none() {
                return Ok(Protocol::X3dh);
            }
            tracing::info!("a peer on X3DH publishes Kyber prekeys now: moving to PQXDH");
            self.start_pqxdh(peer, bundle).await?;
            return Ok(Protocol::Pqxdh);
        }
        let bundle = self.fetch_bundle(peer).await?;
        if bundle.kyber_prekey.is_some() {
            self.start_pqxdh(peer, bundle).await?;
            Ok(Protocol::Pqxdh)
        } else {
            self.start_x3dh(peer, &bundle).await?;
            Ok(Protocol::X3dh)
        }
    }

    /// The peer's classic session, if there is one.
    pub(super) async fn classic_session(
        &self,
        peer: &str,
    ) -> Result<Option<wa::SessionRecord>, InteropError> {
        self.store
            .buffered(kind::X3DH_SESSION, &name_of(peer))
            .await
            .map_err(vault_err)?
            .map(|raw| wa::SessionRecord::deserialize(&raw).map_err(wa_err))
            .transpose()
    }

    async fn one_identity(&self, peer: &str) -> Result<OneIdentity, InteropError> {
        use libsignal_protocol::IdentityKeyStore;
        let pair = wa::IdentityKeyPair::try_from(&self.store.identity_key_pair().serialize()[..])
            .map_err(wa_err)?;
        let known = self
            .store
            .identity
            .get_identity(&addr(peer))
            .await
            .map_err(crypto)?
            .map(|k| wa::IdentityKey::decode(&k.serialize()))
            .transpose()
            .map_err(wa_err)?;
        Ok(OneIdentity {
            pair,
            registration_id: self.store.registration_id(),
            peer: wa_addr(peer),
            known,
            saved: None,
        })
    }

    /// Hands what a classic operation changed back to the vault store (buffered): the session,
    /// and the peer's identity through the PQXDH side's store, which reports a change.
    async fn keep(
        &mut self,
        peer: &str,
        session: OneSession,
        identity: OneIdentity,
    ) -> Result<(), InteropError> {
        use libsignal_protocol::IdentityKeyStore;
        if let Some(k) = identity.saved {
            let k = IdentityKey::decode(&k.serialize()).map_err(crypto)?;
            self.store
                .identity
                .save_identity(&addr(peer), &k)
                .await
                .map_err(crypto)?;
        }
        if let (true, Some(record)) = (session.changed, session.record) {
            let raw = record.serialize().map_err(wa_err)?;
            self.store
                .buffer(kind::X3DH_SESSION, name_of(peer), Some(raw));
        }
        Ok(())
    }

    /// Starts a classic session from a bundle without a Kyber prekey (buffered).
    async fn start_x3dh(&mut self, peer: &str, bundle: &pb::Bundle) -> Result<(), InteropError> {
        let signed = bundle
            .signed_prekey
            .as_ref()
            .ok_or_else(|| InteropError::Crypto("bundle without signed prekey".into()))?;
        let key = |raw: &[u8]| wa::PublicKey::deserialize(raw).map_err(wa_err);
        let pre_key = match &bundle.one_time_prekey {
            Some(k) => Some((k.id.into(), key(&k.public_key)?)),
            None => None,
        };
        let b = wa::PreKeyBundle::new(
            bundle.registration_id,
            DEVICE_ID.into(),
            pre_key,
            signed.id.into(),
            key(&signed.public_key)?,
            signed.signature.clone(),
            wa::IdentityKey::decode(&bundle.identity_key).map_err(wa_err)?,
        )
        .map_err(wa_err)?;
        let mut session = OneSession {
            peer: wa_addr(peer),
            record: None,
            changed: false,
        };
        let mut identity = self.one_identity(peer).await?;
        wa::process_prekey_bundle(
            &wa_addr(peer),
            &mut session,
            &mut identity,
            &b,
            &mut rand_wacore::rng(),
            wa::UsePQRatchet::No,
        )
        .await
        .map_err(wa_err)?;
        tracing::info!("the contact publishes no Kyber prekey: classic X3DH session");
        self.store.buffer(
            kind::X3DH_CHECKED,
            name_of(peer),
            Some((mib_core::now_ms() as i64).to_be_bytes().to_vec()),
        );
        self.keep(peer, session, identity).await
    }

    /// Encrypts on the peer's classic session (buffered; the caller commits).
    pub(super) async fn x3dh_encrypt(
        &mut self,
        peer: &str,
        plaintext: &[u8],
    ) -> Result<(Kind, Vec<u8>), InteropError> {
        let mut session = OneSession {
            peer: wa_addr(peer),
            record: self.classic_session(peer).await?,
            changed: false,
        };
        let mut identity = self.one_identity(peer).await?;
        let msg = wa::message_encrypt(plaintext, &wa_addr(peer), &mut session, &mut identity)
            .await
            .map_err(wa_err)?;
        let kind = match msg {
            wa::CiphertextMessage::PreKeySignalMessage(_) => Kind::Prekey,
            _ => Kind::Message,
        };
        let out = msg.serialize().to_vec();
        self.keep(peer, session, identity).await?;
        Ok((kind, out))
    }

    /// Decrypts a version-3 `PREKEY` or `MESSAGE` envelope (buffered; the caller commits).
    /// `Ok(None)`: a duplicate.
    pub(super) async fn x3dh_decrypt(
        &mut self,
        from: &str,
        kind: Kind,
        ciphertext: &[u8],
    ) -> Result<Option<Vec<u8>>, Undecryptable> {
        let unavailable = |e: InteropError| Undecryptable::StoreUnavailable(e.to_string());
        let invalid = |e: wa::SignalProtocolError| Undecryptable::Invalid(format!("X3DH: {e}"));
        let mut used = UsedPreKeys::default();
        let msg = if kind == Kind::Prekey {
            let m = wa::PreKeySignalMessage::try_from(ciphertext).map_err(invalid)?;
            used.signed = self
                .vault_prekey(
                    crate::signal_store::kind::SIGNED_PREKEY,
                    u32::from(m.signed_pre_key_id()),
                )
                .await?
                .map(|raw| wa::SignedPreKeyRecord::deserialize(&raw).map_err(invalid))
                .transpose()?
                .map(|r| (m.signed_pre_key_id(), r));
            if let Some(id) = m.pre_key_id() {
                used.one_time = self
                    .vault_prekey(crate::signal_store::kind::PREKEY, u32::from(id))
                    .await?
                    .map(|raw| wa::PreKeyRecord::deserialize(&raw).map_err(invalid))
                    .transpose()?
                    .map(|r| (id, r));
            }
            wa::CiphertextMessage::PreKeySignalMessage(m)
        } else {
            wa::CiphertextMessage::SignalMessage(
                wa::SignalMessage::try_from(ciphertext).map_err(invalid)?,
            )
        };
        let mut session = OneSession {
            peer: wa_addr(from),
            record: self.classic_session(from).await.map_err(unavailable)?,
            changed: false,
        };
        let mut identity = self.one_identity(from).await.map_err(unavailable)?;
        let signed = UsedPreKeys {
            one_time: None,
            signed: used.signed.clone(),
        };
        let r = wa::message_decrypt(
            &msg,
            &wa_addr(from),
            &mut session,
            &mut identity,
            &mut used,
            &signed,
            &mut rand_wacore::rng(),
            wa::UsePQRatchet::No,
        )
        .await;
        let result = match r {
            Ok(r) => r,
            Err(wa::SignalProtocolError::DuplicatedMessage(..)) => return Ok(None),
            Err(e) => return Err(invalid(e)),
        };
        self.keep(from, session, identity)
            .await
            .map_err(unavailable)?;
        if let Some(id) = result.consumed_prekey_id {
            self.store.buffer(
                crate::signal_store::kind::PREKEY,
                u32::from(id).to_string(),
                None,
            );
        }
        Ok(Some(result.plaintext))
    }

    async fn vault_prekey(
        &self,
        k: &'static str,
        id: u32,
    ) -> Result<Option<Vec<u8>>, Undecryptable> {
        self.store
            .buffered(k, &id.to_string())
            .await
            .map_err(|e| Undecryptable::StoreUnavailable(e.to_string()))
    }
}
