//! Prekey generation and upload sets (docs/interop-protocol.md §8): one signed EC prekey, one
//! Kyber1024 last-resort prekey, and batches of one-time EC and Kyber prekeys. Private halves go
//! into the vault in the same commit as the id counters.

use libsignal_protocol::{
    GenericSignedPreKey, KeyPair, KyberPreKeyRecord, PreKeyRecord, SignedPreKeyRecord, Timestamp,
    kem,
};

use super::signal_store::{SignalStore, kind as vault_kind};
use mib_vault::VaultError;
use mib_wire::pb;

/// Id of the Kyber last-resort prekey; one-time Kyber prekeys use ids below it.
pub const LAST_RESORT_KYBER_ID: u32 = 0x00FF_FFFF;
/// Replenish when the gateway holds fewer one-time keys than this.
pub const LOW_WATER: u32 = 10;
/// Batch size of one-time keys.
pub const BATCH: u32 = 50;
/// One-time prekeys of each kind kept in the vault: each upload deletes the keys that fall this
/// far behind the newest, so someone who drains the gateway of keys (fetching bundles they
/// never use) cannot make the vault grow without bound. A peer that fetched a key and writes
/// only after this many newer keys were handed out cannot start a session with it.
pub const MAX_KEPT: u32 = 10 * BATCH;
/// One-time prekey ids run over 1..=ID_SPACE and wrap around (24-bit, as Signal clients use
/// them, and below the last-resort Kyber id).
const ID_SPACE: u32 = LAST_RESORT_KYBER_ID - 1;

/// The id `n` places after `id` in the wrapping id space.
fn id_after(id: u32, n: u32) -> u32 {
    let zero_based = (u64::from(id.clamp(1, ID_SPACE)) - 1 + u64::from(n)) % u64::from(ID_SPACE);
    zero_based as u32 + 1
}

const META: &str = "meta";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("signal: {0}")]
    Signal(#[from] libsignal_protocol::SignalProtocolError),
    #[error("signature: {0}")]
    Curve(String),
}

async fn next_id(store: &mut SignalStore, counter: &str) -> Result<u32, KeyError> {
    let cur = store
        .read_extra(META, counter)
        .await?
        .and_then(|b| <[u8; 4]>::try_from(&b[..]).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(1);
    Ok(cur)
}

fn now() -> Timestamp {
    Timestamp::from_epoch_millis(mib_core::now_ms())
}

/// Builds an upload with `one_time` EC and `kyber` one-time prekeys, and a fresh signed prekey and
/// last-resort key when `base` is set. Private halves are committed to the vault before returning.
pub async fn make_upload(
    store: &mut SignalStore,
    base: bool,
    one_time: u32,
    kyber: u32,
) -> Result<pb::UploadKeys, KeyError> {
    use libsignal_protocol::{KyberPreKeyStore, PreKeyStore, SignedPreKeyStore};
    let ikp = store.identity_key_pair();
    let mut rng = rand::rng();
    let mut up = pb::UploadKeys {
        identity_key: ikp.identity_key().serialize().to_vec(),
        registration_id: store.registration_id(),
        ..Default::default()
    };
    let mut counters = Vec::new();
    let mut extra: Vec<(&'static str, String, Option<Vec<u8>>)> = Vec::new();
    if base {
        let id = next_id(store, "signed_id").await?;
        let kp = KeyPair::generate(&mut rng);
        let sig = ikp
            .private_key()
            .calculate_signature(&kp.public_key.serialize(), &mut rng)
            .map_err(|e| KeyError::Curve(e.to_string()))?;
        let rec = SignedPreKeyRecord::new(id.into(), now(), &kp, &sig);
        store.signed.save_signed_pre_key(id.into(), &rec).await?;
        up.signed_prekey = Some(pb::SignedKey {
            id,
            public_key: kp.public_key.serialize().to_vec(),
            signature: sig.to_vec(),
        });
        counters.push(("signed_id", id + 1));
        // The previous signed prekey stays for messages already under way; older ones go.
        if id > 2 {
            extra.push((vault_kind::SIGNED_PREKEY, (id - 2).to_string(), None));
        }
        let lr = KyberPreKeyRecord::generate(
            kem::KeyType::Kyber1024,
            LAST_RESORT_KYBER_ID.into(),
            ikp.private_key(),
        )?;
        store
            .kyber
            .save_kyber_pre_key(LAST_RESORT_KYBER_ID.into(), &lr)
            .await?;
        up.kyber_last_resort = Some(pb::SignedKey {
            id: LAST_RESORT_KYBER_ID,
            public_key: lr.public_key()?.serialize().to_vec(),
            signature: lr.signature()?.to_vec(),
        });
    }
    let first = next_id(store, "prekey_id").await?;
    for i in 0..one_time {
        let id = id_after(first, i);
        // The key that falls out of the window as this one comes in.
        extra.push((
            vault_kind::PREKEY,
            id_after(id, ID_SPACE - MAX_KEPT).to_string(),
            None,
        ));
        let kp = KeyPair::generate(&mut rng);
        store
            .prekeys
            .save_pre_key(id.into(), &PreKeyRecord::new(id.into(), &kp))
            .await?;
        up.one_time_prekeys.push(pb::PreKey {
            id,
            public_key: kp.public_key.serialize().to_vec(),
        });
    }
    counters.push(("prekey_id", id_after(first, one_time)));
    let first = next_id(store, "kyber_id").await?;
    for i in 0..kyber {
        let id = id_after(first, i);
        extra.push((
            vault_kind::KYBER_PREKEY,
            id_after(id, ID_SPACE - MAX_KEPT).to_string(),
            None,
        ));
        let rec =
            KyberPreKeyRecord::generate(kem::KeyType::Kyber1024, id.into(), ikp.private_key())?;
        store.kyber.save_kyber_pre_key(id.into(), &rec).await?;
        up.kyber_prekeys.push(pb::SignedKey {
            id,
            public_key: rec.public_key()?.serialize().to_vec(),
            signature: rec.signature()?.to_vec(),
        });
    }
    counters.push(("kyber_id", id_after(first, kyber)));
    extra.extend(
        counters
            .into_iter()
            .map(|(k, v)| (META, k.to_owned(), Some(v.to_be_bytes().to_vec()))),
    );
    store.commit(extra).await?;
    Ok(up)
}
