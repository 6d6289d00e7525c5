//! The Signal protocol stores of one interop account, kept in the key vault: identity, prekeys,
//! sessions and sender keys are sealed records of the owner's data key.
//!
//! Writes are buffered and committed in one database transaction by [`SignalStore::commit`], so
//! that the ratchet state after a decryption and the decrypted result (sealed too) reach the disk
//! together. Identity, sessions and sender keys stay in memory once read (the database is read
//! once per record); prekeys are read from the vault when a peer uses one.

use std::{cell::RefCell, collections::HashMap, rc::Rc};

use async_trait::async_trait;
use libsignal_protocol::{
    Direction, GenericSignedPreKey, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore,
    KyberPreKeyId, KyberPreKeyRecord, KyberPreKeyStore, PreKeyId, PreKeyRecord, PreKeyStore,
    ProtocolAddress, PublicKey, SenderKeyRecord, SenderKeyStore, SessionRecord, SessionStore,
    SignalProtocolError, SignedPreKeyId, SignedPreKeyRecord, SignedPreKeyStore,
};
use std::sync::Arc;
use uuid::Uuid;

use mib_vault::{Vault, VaultError, VaultStore};

type SResult<T> = Result<T, SignalProtocolError>;
/// (record kind, record name)
type RecordKey = (&'static str, String);

fn store_err(e: impl std::fmt::Display) -> SignalProtocolError {
    SignalProtocolError::InvalidState("vault store", e.to_string())
}

/// Record kinds in the vault.
pub mod kind {
    pub const IDENTITY: &str = "identity";
    pub const PEER_IDENTITY: &str = "peer_identity";
    pub const PREKEY: &str = "prekey";
    pub const SIGNED_PREKEY: &str = "signed_prekey";
    pub const KYBER_PREKEY: &str = "kyber_prekey";
    pub const SESSION: &str = "session";
    pub const SENDER_KEY: &str = "sender_key";
}

/// One account's Signal state over the vault: one trait view per libsignal store, all sharing
/// the same buffered state (single-threaded: the account actor owns it).
pub struct SignalStore {
    inner: Rc<Inner>,
    pub identity: Identity,
    pub sessions: Sessions,
    pub prekeys: PreKeys,
    pub signed: SignedPreKeys,
    pub kyber: KyberPreKeys,
    pub sender_keys: SenderKeys,
}

struct Inner {
    owner: String,
    vault: Vault,
    db: Arc<dyn VaultStore>,
    state: RefCell<State>,
}

struct State {
    identity: IdentityKeyPair,
    registration_id: u32,
    /// Decoded records: `Some(bytes)` present, `None` known absent or deleted.
    cache: HashMap<RecordKey, Option<Vec<u8>>>,
    /// Writes not yet committed: (kind, name) → new value.
    pending: HashMap<RecordKey, Option<Vec<u8>>>,
    /// Addresses whose identity key changed since the last `take_identity_changes`.
    identity_changes: Vec<String>,
}

macro_rules! view {
    ($name:ident) => {
        #[derive(Clone)]
        pub struct $name(Rc<Inner>);
    };
}
view!(Identity);
view!(Sessions);
view!(PreKeys);
view!(SignedPreKeys);
view!(KyberPreKeys);
view!(SenderKeys);

/// Whether records of `kind` stay in memory once read or written. Identity, sessions and
/// sender keys do: every message needs them. Prekeys do not: they are read only when a peer
/// starts a session, and an idle login would otherwise hold its whole upload set, about 250 KB
/// (50 one-time Kyber1024 prekeys and the last-resort one, about 4.8 KB each).
fn kept_in_memory(kind: &str) -> bool {
    !matches!(
        kind,
        kind::PREKEY | kind::SIGNED_PREKEY | kind::KYBER_PREKEY
    )
}

impl Inner {
    async fn get(&self, k: &'static str, name: &str) -> SResult<Option<Vec<u8>>> {
        let key = (k, name.to_owned());
        {
            let st = self.state.borrow();
            if let Some(v) = st.pending.get(&key).or_else(|| st.cache.get(&key)) {
                return Ok(v.clone());
            }
        }
        let v = match self
            .db
            .record(&self.owner, k, name)
            .await
            .map_err(store_err)?
        {
            Some(sealed) => Some(
                self.vault
                    .open_record(&self.owner, k, name, &sealed)
                    .await
                    .map_err(store_err)?
                    .to_vec(),
            ),
            None => None,
        };
        if kept_in_memory(k) {
            self.state.borrow_mut().cache.insert(key, v.clone());
        }
        Ok(v)
    }

    fn set(&self, k: &'static str, name: String, v: Option<Vec<u8>>) {
        self.state.borrow_mut().pending.insert((k, name), v);
    }
}

async fn seal_identity(
    vault: &Vault,
    owner: &str,
    reg: u32,
    pair: &IdentityKeyPair,
) -> Result<Vec<u8>, VaultError> {
    let mut raw = zeroize::Zeroizing::new(reg.to_be_bytes().to_vec());
    raw.extend_from_slice(&pair.serialize());
    vault.seal_record(owner, kind::IDENTITY, "self", &raw).await
}

impl SignalStore {
    /// Opens the owner's store, creating a fresh identity on first use.
    pub async fn open(
        owner: &str,
        vault: Vault,
        db: Arc<dyn VaultStore>,
    ) -> Result<Self, VaultError> {
        let sealed = db.record(owner, kind::IDENTITY, "self").await?;
        let (identity, registration_id) = match sealed {
            Some(s) => {
                let raw = vault.open_record(owner, kind::IDENTITY, "self", &s).await?;
                if raw.len() < 4 {
                    return Err(VaultError::Open);
                }
                let reg = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
                let pair = IdentityKeyPair::try_from(&raw[4..]).map_err(|_| VaultError::Open)?;
                (pair, reg)
            }
            None => {
                let pair = IdentityKeyPair::generate(&mut rand::rng());
                let reg = rand::Rng::random_range(&mut rand::rng(), 1..16384u32);
                let sealed = seal_identity(&vault, owner, reg, &pair).await?;
                db.put_record(owner, kind::IDENTITY, "self", &sealed)
                    .await?;
                (pair, reg)
            }
        };
        let inner = Rc::new(Inner {
            owner: owner.to_owned(),
            vault,
            db,
            state: RefCell::new(State {
                identity,
                registration_id,
                cache: HashMap::new(),
                pending: HashMap::new(),
                identity_changes: Vec::new(),
            }),
        });
        Ok(Self {
            identity: Identity(inner.clone()),
            sessions: Sessions(inner.clone()),
            prekeys: PreKeys(inner.clone()),
            signed: SignedPreKeys(inner.clone()),
            kyber: KyberPreKeys(inner.clone()),
            sender_keys: SenderKeys(inner.clone()),
            inner,
        })
    }

    /// Replaces the identity key pair (a reset); prekeys must be uploaded anew by the caller.
    pub async fn reset_identity(&mut self) -> Result<(), VaultError> {
        let pair = IdentityKeyPair::generate(&mut rand::rng());
        let reg = self.registration_id();
        let sealed = seal_identity(&self.inner.vault, &self.inner.owner, reg, &pair).await?;
        self.inner
            .db
            .put_record(&self.inner.owner, kind::IDENTITY, "self", &sealed)
            .await?;
        self.inner.state.borrow_mut().identity = pair;
        Ok(())
    }

    pub fn identity_key_pair(&self) -> IdentityKeyPair {
        self.inner.state.borrow().identity
    }

    pub fn registration_id(&self) -> u32 {
        self.inner.state.borrow().registration_id
    }

    pub fn take_identity_changes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.inner.state.borrow_mut().identity_changes)
    }

    /// Writes every buffered change, and `extra` records of the same owner, in one database
    /// transaction (`None` deletes).
    pub async fn commit(
        &mut self,
        extra: Vec<(&'static str, String, Option<Vec<u8>>)>,
    ) -> Result<(), VaultError> {
        let pending: Vec<(RecordKey, Option<Vec<u8>>)> = self
            .inner
            .state
            .borrow()
            .pending
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if pending.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let owner = &self.inner.owner;
        // Never creates a data key: after a logout destroyed it, a late write fails instead of
        // sealing under a new key that nobody would shred.
        let key = self.inner.vault.existing_data_key(owner).await?;
        let mut writes = Vec::with_capacity(pending.len() + extra.len());
        for ((k, name), v) in &pending {
            let sealed = v
                .as_ref()
                .map(|plain| key.seal(&mib_vault::record_ad(owner, k, name), plain));
            writes.push((k.to_string(), name.clone(), sealed));
        }
        for (k, name, v) in extra {
            let sealed = v
                .as_ref()
                .map(|plain| key.seal(&mib_vault::record_ad(owner, k, &name), plain));
            self.inner
                .state
                .borrow_mut()
                .cache
                .remove(&(k, name.clone()));
            writes.push((k.to_string(), name, sealed));
        }
        self.inner.db.write_records(owner, &writes).await?;
        let mut st = self.inner.state.borrow_mut();
        for (k, v) in pending {
            st.pending.remove(&k);
            if kept_in_memory(k.0) {
                st.cache.insert(k, v);
            }
        }
        Ok(())
    }

    /// Bytes of decoded records held in memory (committed and buffered), for tests and
    /// measurements of what an idle login costs.
    pub fn memory_bytes(&self) -> usize {
        let st = self.inner.state.borrow();
        st.cache
            .iter()
            .chain(st.pending.iter())
            .map(|((_, name), v)| name.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// Drops buffered changes (after a failed operation).
    pub fn rollback(&mut self) {
        self.inner.state.borrow_mut().pending.clear();
    }

    /// The names of the records of kind `k` outside the Signal kinds.
    pub async fn extra_names(&self, k: &str) -> Result<Vec<String>, VaultError> {
        Ok(self.inner.db.record_names(&self.inner.owner, k).await?)
    }

    /// Reads a record outside the Signal kinds (e.g. an undelivered decrypted message).
    pub async fn read_extra(
        &self,
        k: &str,
        name: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, VaultError> {
        match self.inner.db.record(&self.inner.owner, k, name).await? {
            Some(sealed) => Ok(Some(
                self.inner
                    .vault
                    .open_record(&self.inner.owner, k, name, &sealed)
                    .await?,
            )),
            None => Ok(None),
        }
    }

    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Reads a record of the owner's through the buffer (what this operation wrote, then the
    /// cache, then the vault), for state kept beside the Signal kinds (classic X3DH sessions).
    pub(crate) async fn buffered(
        &self,
        k: &'static str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, SignalProtocolError> {
        self.inner.get(k, name).await
    }

    /// Buffers a write that [`Self::commit`] makes with the Signal state (`None` deletes).
    pub(crate) fn buffer(&self, k: &'static str, name: String, v: Option<Vec<u8>>) {
        self.inner.set(k, name, v);
    }
}

pub(crate) fn addr_name(a: &ProtocolAddress) -> String {
    format!("{}.{}", a.name(), u32::from(a.device_id()))
}

#[async_trait(?Send)]
impl IdentityKeyStore for Identity {
    async fn get_identity_key_pair(&self) -> SResult<IdentityKeyPair> {
        Ok(self.0.state.borrow().identity)
    }

    async fn get_local_registration_id(&self) -> SResult<u32> {
        Ok(self.0.state.borrow().registration_id)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SResult<IdentityChange> {
        let name = addr_name(address);
        let old = self.0.get(kind::PEER_IDENTITY, &name).await?;
        let new = identity.serialize().to_vec();
        let changed = old.as_ref().is_some_and(|o| *o != new);
        if old.as_ref() != Some(&new) {
            self.0.set(kind::PEER_IDENTITY, name, Some(new));
        }
        if changed {
            self.0
                .state
                .borrow_mut()
                .identity_changes
                .push(address.name().to_owned());
        }
        Ok(IdentityChange::from_changed(changed))
    }

    async fn is_trusted_identity(
        &self,
        _: &ProtocolAddress,
        _: &IdentityKey,
        _: Direction,
    ) -> SResult<bool> {
        // Trust on first use, and accept changes: the user is told about them in the portal.
        Ok(true)
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SResult<Option<IdentityKey>> {
        self.0
            .get(kind::PEER_IDENTITY, &addr_name(address))
            .await?
            .map(|r| IdentityKey::decode(&r))
            .transpose()
    }
}

#[async_trait(?Send)]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SResult<PreKeyRecord> {
        let raw = self
            .0
            .get(kind::PREKEY, &u32::from(id).to_string())
            .await?
            .ok_or(SignalProtocolError::InvalidPreKeyId)?;
        PreKeyRecord::deserialize(&raw)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SResult<()> {
        self.0.set(
            kind::PREKEY,
            u32::from(id).to_string(),
            Some(record.serialize()?),
        );
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> SResult<()> {
        self.0.set(kind::PREKEY, u32::from(id).to_string(), None);
        Ok(())
    }
}

#[async_trait(?Send)]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SResult<SignedPreKeyRecord> {
        let raw = self
            .0
            .get(kind::SIGNED_PREKEY, &u32::from(id).to_string())
            .await?
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)?;
        SignedPreKeyRecord::deserialize(&raw)
    }

    async fn save_signed_pre_key(
        &mut self,
        id: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> SResult<()> {
        self.0.set(
            kind::SIGNED_PREKEY,
            u32::from(id).to_string(),
            Some(record.serialize()?),
        );
        Ok(())
    }
}

#[async_trait(?Send)]
impl KyberPreKeyStore for KyberPreKeys {
    async fn get_kyber_pre_key(&self, id: KyberPreKeyId) -> SResult<KyberPreKeyRecord> {
        let raw = self
            .0
            .get(kind::KYBER_PREKEY, &u32::from(id).to_string())
            .await?
            .ok_or(SignalProtocolError::InvalidKyberPreKeyId)?;
        KyberPreKeyRecord::deserialize(&raw)
    }

    async fn save_kyber_pre_key(
        &mut self,
        id: KyberPreKeyId,
        record: &KyberPreKeyRecord,
    ) -> SResult<()> {
        self.0.set(
            kind::KYBER_PREKEY,
            u32::from(id).to_string(),
            Some(record.serialize()?),
        );
        Ok(())
    }

    async fn mark_kyber_pre_key_used(
        &mut self,
        id: KyberPreKeyId,
        _: SignedPreKeyId,
        _: &PublicKey,
    ) -> SResult<()> {
        // One-time Kyber prekeys have ids below the last-resort id; the last-resort one is kept.
        if u32::from(id) < super::keys::LAST_RESORT_KYBER_ID {
            self.0
                .set(kind::KYBER_PREKEY, u32::from(id).to_string(), None);
        }
        Ok(())
    }
}

#[async_trait(?Send)]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SResult<Option<SessionRecord>> {
        self.0
            .get(kind::SESSION, &addr_name(address))
            .await?
            .map(|r| SessionRecord::deserialize(&r))
            .transpose()
    }

    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: &SessionRecord,
    ) -> SResult<()> {
        self.0
            .set(kind::SESSION, addr_name(address), Some(record.serialize()?));
        Ok(())
    }
}

#[async_trait(?Send)]
impl SenderKeyStore for SenderKeys {
    async fn store_sender_key(
        &mut self,
        sender: &ProtocolAddress,
        id: Uuid,
        record: &SenderKeyRecord,
    ) -> SResult<()> {
        self.0.set(
            kind::SENDER_KEY,
            format!("{}/{id}", addr_name(sender)),
            Some(record.serialize()?),
        );
        Ok(())
    }

    async fn load_sender_key(
        &mut self,
        sender: &ProtocolAddress,
        id: Uuid,
    ) -> SResult<Option<SenderKeyRecord>> {
        let name = format!("{}/{id}", addr_name(sender));
        self.0
            .get(kind::SENDER_KEY, &name)
            .await?
            .map(|r| SenderKeyRecord::deserialize(&r))
            .transpose()
    }
}

/// Helpers for tests and benchmarks: a vault-backed store on a temporary SQLite file, a bundle
/// for it, and encrypt/decrypt with a commit, as the account actor does them. Only in test builds
/// (see `store::testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::sync::Arc;

    use libsignal_protocol::{
        CiphertextMessage, DeviceId, GenericSignedPreKey, IdentityKeyStore, KeyPair,
        KyberPreKeyRecord, KyberPreKeyStore, PreKeyBundle, PreKeyRecord, PreKeySignalMessage,
        PreKeyStore, ProtocolAddress, SignalMessage, SignedPreKeyRecord, SignedPreKeyStore,
        Timestamp, kem, message_decrypt, message_encrypt,
    };

    use super::SignalStore;
    use mib_vault::{SecretKey, Vault, VaultStore};

    pub fn addr(name: &str) -> ProtocolAddress {
        ProtocolAddress::new(name.to_owned(), DeviceId::new(1).expect("device 1"))
    }

    /// A store for `owner` over `db`, under a fresh master key.
    pub async fn store(owner: &str, db: Arc<dyn VaultStore>) -> SignalStore {
        let vault = Vault::open(SecretKey::random(), db.clone())
            .await
            .expect("vault");
        SignalStore::open(owner, vault, db).await.expect("store")
    }

    pub async fn bundle_of(s: &mut SignalStore) -> PreKeyBundle {
        let mut rng = rand::rng();
        let ikp = s.identity_key_pair();
        let pk = KeyPair::generate(&mut rng);
        let spk = KeyPair::generate(&mut rng);
        let sig = ikp
            .private_key()
            .calculate_signature(&spk.public_key.serialize(), &mut rng)
            .expect("sign");
        s.prekeys
            .save_pre_key(1u32.into(), &PreKeyRecord::new(1u32.into(), &pk))
            .await
            .expect("save");
        s.signed
            .save_signed_pre_key(
                2u32.into(),
                &SignedPreKeyRecord::new(2u32.into(), Timestamp::from_epoch_millis(0), &spk, &sig),
            )
            .await
            .expect("save");
        let k =
            KyberPreKeyRecord::generate(kem::KeyType::Kyber1024, 3u32.into(), ikp.private_key())
                .expect("kyber");
        s.kyber
            .save_kyber_pre_key(3u32.into(), &k)
            .await
            .expect("save");
        s.commit(vec![]).await.expect("commit");
        PreKeyBundle::new(
            s.identity.get_local_registration_id().await.expect("reg"),
            DeviceId::new(1).expect("device"),
            Some((1u32.into(), pk.public_key)),
            2u32.into(),
            spk.public_key,
            sig.to_vec(),
            3u32.into(),
            k.public_key().expect("pk"),
            k.signature().expect("sig"),
            *ikp.identity_key(),
        )
        .expect("bundle")
    }

    /// Starts `a`'s session to `b` (at address `b_addr`) from a fresh bundle of `b`'s, committed.
    pub async fn session_to(a: &mut SignalStore, b: &mut SignalStore, b_addr: &ProtocolAddress) {
        let bundle = bundle_of(b).await;
        libsignal_protocol::process_prekey_bundle(
            b_addr,
            &mut a.sessions,
            &mut a.identity,
            &bundle,
            std::time::SystemTime::now(),
            &mut rand::rng(),
        )
        .await
        .expect("bundle");
        a.commit(vec![]).await.expect("commit");
    }

    pub async fn decrypt(
        s: &mut SignalStore,
        from: &ProtocolAddress,
        c: &CiphertextMessage,
    ) -> Vec<u8> {
        let msg = match c {
            CiphertextMessage::PreKeySignalMessage(_) => CiphertextMessage::PreKeySignalMessage(
                PreKeySignalMessage::try_from(c.serialize()).expect("parse"),
            ),
            _ => CiphertextMessage::SignalMessage(
                SignalMessage::try_from(c.serialize()).expect("parse"),
            ),
        };
        let out = message_decrypt(
            &msg,
            from,
            &mut s.sessions,
            &mut s.identity,
            &mut s.prekeys,
            &s.signed,
            &mut s.kyber,
            &mut rand::rng(),
        )
        .await
        .expect("decrypt");
        s.commit(vec![]).await.expect("commit");
        out
    }

    pub async fn encrypt(
        s: &mut SignalStore,
        to: &ProtocolAddress,
        pt: &[u8],
    ) -> CiphertextMessage {
        let c = message_encrypt(
            pt,
            to,
            &mut s.sessions,
            &mut s.identity,
            std::time::SystemTime::now(),
            &mut rand::rng(),
        )
        .await
        .expect("encrypt");
        s.commit(vec![]).await.expect("commit");
        c
    }
}
