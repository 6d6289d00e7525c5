//! The key vault: envelope encryption of everything secret the bridge stores.
//!
//! A master key (from a file or an environment variable, never from the database) wraps one random
//! data key per owner (a Matrix user, or the bridge itself for its event queue). Data keys seal
//! records with XChaCha20-Poly1305, binding each record to its identity through the associated
//! data, so a record copied to another row or owner fails to open. Destroying an owner's data key
//! makes all of its records unreadable (crypto-shredding); rotating the master key re-wraps the
//! data keys and leaves the records untouched.
//!
//! Its own crate, so that the store and both sides can seal with it while none of them depends
//! on another: it must never link a bridge side, the store, SQL, HTTP, Matrix or Signal
//! (`tests/architecture.rs` checks it). Where records live is the [`VaultStore`] trait's.

use std::{collections::HashMap, fmt, path::Path, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub mod store;

pub use store::VaultStore;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("no vault master key: set vault.master_key_file or the environment variable {0}")]
    NoMasterKey(String),
    #[error("the vault master key is unusable: {0}")]
    BadMasterKey(String),
    #[error(
        "the vault master key does not match the one the data keys were wrapped with (key id {stored}, configured {configured})"
    )]
    WrongMasterKey { stored: String, configured: String },
    #[error("a sealed record failed to open (tampered, moved or wrong key)")]
    Open,
    #[error("no data key for this owner (logged out, or never logged in)")]
    NoDataKey,
    #[error(transparent)]
    Store(#[from] mib_core::store::StoreError),
}

/// A 256-bit symmetric key, zeroized on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        Self(k)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// A short public fingerprint, to tell keys apart without revealing them.
    pub fn id(&self) -> String {
        let digest = Sha256::new_with_prefix(b"mib/key-id/v1")
            .chain_update(self.0)
            .finalize();
        hex::encode(&digest[..8])
    }

    /// Seals `plaintext`, bound to `ad`. Layout: version(1) || nonce(24) || ciphertext+tag.
    pub fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: ad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens what [`seal`](Self::seal) produced with the same `ad`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return Err(VaultError::Open);
        }
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        cipher
            .decrypt(
                XNonce::from_slice(&sealed[1..1 + NONCE_LEN]),
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: ad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Open)
    }
}

/// Loads the master key: the file wins; otherwise the environment variable. Both hold either
/// 32 raw bytes or their base64 text.
pub fn load_master_key(file: &str, env_var: &str) -> Result<SecretKey, VaultError> {
    let raw: Zeroizing<Vec<u8>> = if !file.is_empty() {
        Zeroizing::new(
            std::fs::read(file)
                .map_err(|e| VaultError::BadMasterKey(format!("cannot read {file}: {e}")))?,
        )
    } else if let Ok(v) = std::env::var(env_var) {
        Zeroizing::new(v.into_bytes())
    } else {
        return Err(VaultError::NoMasterKey(env_var.to_owned()));
    };
    parse_master_key(&raw)
}

fn parse_master_key(raw: &[u8]) -> Result<SecretKey, VaultError> {
    if raw.len() == 32 {
        return SecretKey::from_bytes(raw)
            .ok_or_else(|| VaultError::BadMasterKey("wrong length".into()));
    }
    let text = std::str::from_utf8(raw)
        .map_err(|_| VaultError::BadMasterKey("neither 32 bytes nor base64".into()))?;
    let bytes = Zeroizing::new(
        B64.decode(text.trim())
            .map_err(|_| VaultError::BadMasterKey("neither 32 bytes nor base64".into()))?,
    );
    SecretKey::from_bytes(&bytes)
        .ok_or_else(|| VaultError::BadMasterKey(format!("must be 32 bytes, found {}", bytes.len())))
}

/// Writes a fresh master key file (base64, mode 0600) and returns it.
pub fn create_master_key_file(path: &Path) -> std::io::Result<SecretKey> {
    let key = SecretKey::random();
    let text = Zeroizing::new(B64.encode(key.0));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(key)
}

fn wrap_ad(owner: &str) -> Vec<u8> {
    format!("mib/data-key/v1\0{owner}").into_bytes()
}

/// The associated data that binds a sealed record to its owner, kind and name.
pub fn record_ad(owner: &str, kind: &str, name: &str) -> Vec<u8> {
    format!("mib/record/v1\0{owner}\0{kind}\0{name}").into_bytes()
}

/// The vault: master key plus a cache of unwrapped data keys.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<VaultInner>,
}

struct VaultInner {
    master: SecretKey,
    store: Arc<dyn VaultStore>,
    cache: Mutex<HashMap<String, SecretKey>>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("master_key_id", &self.inner.master.id())
            .finish_non_exhaustive()
    }
}

/// The owner name of the bridge's own data key (event queue and other bridge-wide secrets).
pub const BRIDGE_OWNER: &str = "@@bridge";

impl Vault {
    /// Opens the vault, checking that the configured master key is the one the data keys use.
    pub async fn open(master: SecretKey, store: Arc<dyn VaultStore>) -> Result<Self, VaultError> {
        if let Some(stored) = store.any_master_key_id().await?
            && stored != master.id()
        {
            return Err(VaultError::WrongMasterKey {
                stored,
                configured: master.id(),
            });
        }
        Ok(Self {
            inner: Arc::new(VaultInner {
                master,
                store,
                cache: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The owner's data key, created on first use.
    pub async fn data_key(&self, owner: &str) -> Result<SecretKey, VaultError> {
        let mut cache = self.inner.cache.lock().await;
        if let Some(k) = cache.get(owner) {
            return Ok(k.clone());
        }
        let key = match self.inner.store.wrapped_key(owner).await? {
            Some(wrapped) => {
                let raw = self.inner.master.open(&wrap_ad(owner), &wrapped)?;
                SecretKey::from_bytes(&raw).ok_or(VaultError::Open)?
            }
            None => {
                let key = SecretKey::random();
                let wrapped = self.inner.master.seal(&wrap_ad(owner), &key.0);
                self.inner
                    .store
                    .put_wrapped_key(owner, &wrapped, &self.inner.master.id())
                    .await?;
                // Another worker may have made the owner's key at the same moment: the one
                // stored first is everyone's.
                let stored = self
                    .inner
                    .store
                    .wrapped_key(owner)
                    .await?
                    .ok_or(VaultError::NoDataKey)?;
                if stored == wrapped {
                    key
                } else {
                    let raw = self.inner.master.open(&wrap_ad(owner), &stored)?;
                    SecretKey::from_bytes(&raw).ok_or(VaultError::Open)?
                }
            }
        };
        cache.insert(owner.to_owned(), key.clone());
        Ok(key)
    }

    /// The owner's data key if one exists (never creates one).
    pub async fn existing_data_key(&self, owner: &str) -> Result<SecretKey, VaultError> {
        // Looked up and unwrapped under the cache lock, which `destroy` takes too: a logout
        // between the look-up and the use cannot bring a key back.
        let mut cache = self.inner.cache.lock().await;
        if let Some(k) = cache.get(owner) {
            return Ok(k.clone());
        }
        let wrapped = self
            .inner
            .store
            .wrapped_key(owner)
            .await?
            .ok_or(VaultError::NoDataKey)?;
        let raw = self.inner.master.open(&wrap_ad(owner), &wrapped)?;
        let key = SecretKey::from_bytes(&raw).ok_or(VaultError::Open)?;
        cache.insert(owner.to_owned(), key.clone());
        Ok(key)
    }

    /// Seals a record of `owner`, bound to its kind and name.
    pub async fn seal_record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        Ok(self
            .data_key(owner)
            .await?
            .seal(&record_ad(owner, kind, name), plaintext))
    }

    pub async fn open_record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.existing_data_key(owner)
            .await?
            .open(&record_ad(owner, kind, name), sealed)
    }

    /// Crypto-shredding: the owner's data key and every record it sealed are gone for good.
    pub async fn destroy(&self, owner: &str) -> Result<(), VaultError> {
        // The cache lock is held until the rows are gone, so no look-up sees a key in between.
        let mut cache = self.inner.cache.lock().await;
        cache.remove(owner);
        self.inner.store.destroy_owner(owner).await?;
        Ok(())
    }

    /// Re-wraps every data key under `new_master`, in one database transaction.
    pub async fn rotate_master_key(&self, new_master: &SecretKey) -> Result<usize, VaultError> {
        let wrapped = self.inner.store.all_wrapped_keys().await?;
        let mut rewrapped = Vec::with_capacity(wrapped.len());
        for (owner, w) in wrapped {
            let raw = self.inner.master.open(&wrap_ad(&owner), &w)?;
            rewrapped.push((owner.clone(), new_master.seal(&wrap_ad(&owner), &raw)));
        }
        let n = rewrapped.len();
        self.inner
            .store
            .replace_wrapped_keys(&rewrapped, &new_master.id())
            .await?;
        Ok(n)
    }

    pub fn master_key_id(&self) -> String {
        self.inner.master.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let k = SecretKey::random();
        let sealed = k.seal(b"ad-1", b"secret record");
        assert_eq!(
            &k.open(b"ad-1", &sealed).expect("opens")[..],
            b"secret record"
        );
        assert!(
            k.open(b"ad-2", &sealed).is_err(),
            "moved record must not open"
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(k.open(b"ad-1", &tampered).is_err());
        assert!(SecretKey::random().open(b"ad-1", &sealed).is_err());
        assert!(k.open(b"ad-1", &sealed[..10]).is_err());
    }

    #[test]
    fn master_key_formats() {
        let raw = [7u8; 32];
        assert_eq!(parse_master_key(&raw).expect("raw").0, raw);
        let b64 = B64.encode(raw);
        assert_eq!(
            parse_master_key(format!("{b64}\n").as_bytes())
                .expect("b64")
                .0,
            raw
        );
        assert!(parse_master_key(b"short").is_err());
        assert!(matches!(
            load_master_key("", "MIB_TEST_SURELY_UNSET_VAR"),
            Err(VaultError::NoMasterKey(_))
        ));
    }

    #[test]
    fn debug_hides_key() {
        let k = SecretKey::from_bytes(&[0xAB; 32]).expect("32 bytes");
        assert!(!format!("{k:?}").contains("171"));
        assert!(!format!("{k:?}").to_lowercase().contains("abab"));
    }
}
