//! End-to-bridge encryption: the bot's device takes part in Olm/Megolm through
//! matrix-sdk-crypto's `OlmMachine` (sans-I/O: we feed it what appservice transactions carry,
//! MSC2409/MSC3202, and send what it asks for). The device is created through MSC4190, and
//! cross-signed by the bot's own identity when `encryption.self_sign` is on.
//!
//! What the bot sends into an encrypted room is encrypted with the bot's device. What a ghost
//! sends is encrypted with the ghost's own device ([`GhostDevices`]), created through MSC4190 on
//! its first encrypted message and cross-signed by the ghost's own identity, unless
//! `encryption.ghost_devices` is off. One writer per (device, room) for key sharing and
//! encryption.

use std::{
    collections::{BTreeMap, HashMap},
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use matrix_sdk_crypto::{
    AttachmentDecryptor, AttachmentEncryptor, DecryptionSettings, EncryptionSettings,
    EncryptionSyncChanges, MediaEncryptionInfo, MegolmError, OlmError, OlmMachine,
    TrustRequirement,
    types::{events::room::encrypted::EncryptedEvent, requests::AnyOutgoingRequest},
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::{
    DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, UInt,
    api::client::{
        keys::{claim_keys, get_keys, upload_signatures, upload_signing_keys},
        sync::sync_events::DeviceLists,
        to_device::send_event_to_device,
    },
    events::AnyToDeviceEvent,
    serde::Raw,
};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify, RwLock};

use super::client::{HomeserverClient, MatrixError};
use matrix_sdk_crypto::store::DynCryptoStore;
use mib_core::store::{KvStore, LeaseStore};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("crypto store: {0}")]
    Store(String),
    #[error("homeserver: {0}")]
    Matrix(#[from] MatrixError),
    #[error("the room key for this message has not arrived")]
    MissingKey,
    #[error("cannot decrypt: {0}")]
    Decrypt(String),
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error("encrypted attachment: {0}")]
    Attachment(String),
    /// The decrypted payload is of a type that must not come encrypted (state, membership,
    /// redactions): membership and power come only from the homeserver's own state.
    #[error("an encrypted `{0}` event is not accepted")]
    NotAllowed(String),
}

/// The event types the bridge accepts from inside a Megolm payload: messages and the relations
/// on them. State events (`m.room.member`, power levels, names) and redactions are never taken
/// from an encrypted payload.
const ENCRYPTABLE_TYPES: &[&str] = &[
    "m.room.message",
    "m.reaction",
    "m.sticker",
    "org.matrix.msc3381.poll.start",
    "org.matrix.msc3381.poll.response",
    "org.matrix.msc3381.poll.end",
];

/// Builds the event the core sees from a decrypted payload: only its `type` (one of
/// [`ENCRYPTABLE_TYPES`]) and its `content` are taken; the event id, room, sender, time and
/// `unsigned` come from the homeserver's outer event, and a `state_key`, `redacts` or anything
/// else in the payload is dropped.
pub fn sanitize_decrypted(outer: &Value, inner: &Value) -> Result<Value, CryptoError> {
    let ty = inner["type"].as_str().unwrap_or_default();
    if !ENCRYPTABLE_TYPES.contains(&ty) {
        return Err(CryptoError::NotAllowed(ty.chars().take(100).collect()));
    }
    let content = match &inner["content"] {
        Value::Object(c) => Value::Object(c.clone()),
        _ => return Err(CryptoError::Decrypt("the payload has no content".into())),
    };
    let mut ev = json!({"type": ty, "content": content});
    for k in [
        "event_id",
        "room_id",
        "sender",
        "origin_server_ts",
        "unsigned",
    ] {
        if let Some(v) = outer.get(k) {
            ev[k] = v.clone();
        }
    }
    Ok(ev)
}

fn store_err(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Store(e.to_string())
}

/// What one transaction carries for the crypto machine.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CryptoChanges {
    pub to_device: Vec<Value>,
    pub device_lists: Value,
    pub otk_counts: Value,
    pub fallback_keys: Value,
}

impl CryptoChanges {
    /// Reads the MSC2409/MSC3202 fields of a transaction body (stable and unstable names).
    pub fn from_transaction(body: &serde_json::Map<String, Value>) -> Option<Self> {
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| body.get(*n))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let to_device = get(&["to_device", "de.sorunome.msc2409.to_device"])
            .as_array()
            .cloned()
            .unwrap_or_default();
        let c = Self {
            to_device,
            device_lists: get(&["device_lists", "org.matrix.msc3202.device_lists"]),
            otk_counts: get(&[
                "device_one_time_keys_count",
                "org.matrix.msc3202.device_one_time_keys_count",
                "org.matrix.msc3202.device_one_time_key_counts",
            ]),
            fallback_keys: get(&[
                "device_unused_fallback_key_types",
                "org.matrix.msc3202.device_unused_fallback_key_types",
            ]),
        };
        let empty = c.to_device.is_empty()
            && c.device_lists.is_null()
            && c.otk_counts.is_null()
            && c.fallback_keys.is_null();
        (!empty).then_some(c)
    }
}

/// How the crypto side is set up (from the `encryption` section of the config).
#[derive(Clone)]
pub struct CryptoOptions {
    /// The bridge bot's user id and device id.
    pub bot: String,
    pub device: String,
    /// Where the devices' crypto state lives.
    pub store: StoreLocation,
    /// Create devices through MSC4190 (needed for ghost devices).
    pub msc4190: bool,
    /// Cross-sign the bot's device with the bot's own identity.
    pub self_sign: bool,
    /// Give each ghost that sends into an encrypted room a cross-signed device of its own.
    pub ghost_devices: bool,
    /// How many ghost devices stay loaded.
    pub ghost_device_cache: usize,
    /// MSC4350 instead of ghosts' own devices: each ghost gets a device without keys that names
    /// the bot's device as its impersonator, and the bot's device encrypts for it.
    pub msc4350: bool,
    /// Several workers on one database: each device is used by one worker at a time.
    pub workers: Option<Workers>,
}

/// The unstable name of MSC4350's `impersonator` field of device keys.
pub const MSC4350_IMPERSONATOR: &str = "fi.mau.msc4350.impersonator";

/// The device id of a ghost's MSC4350 device: derived from the ghost and the bot's device, so it
/// needs no storage and stays the same across restarts.
fn impersonatable_device_id(ghost: &ruma::UserId, bot_device: &DeviceId) -> OwnedDeviceId {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{ghost} {bot_device}").as_bytes());
    format!("MIBI{}", hex::encode_upper(&h[..5]))
        .as_str()
        .into()
}

/// Opens the crypto store of one device (user, device) of the bridge's in its database.
pub type OpenStore = Arc<dyn Fn(&ruma::UserId, &DeviceId) -> Arc<DynCryptoStore> + Send + Sync>;

/// Where the crypto stores of the bridge's devices are.
#[derive(Clone)]
pub enum StoreLocation {
    /// In the bridge's database: `open` gives a device's store (the store crate's, sealed at
    /// rest), `kv` keeps each ghost's device id. The local store directory of an earlier
    /// version, if `legacy` names one (with its passphrase), is copied in on first use and left
    /// untouched.
    Database {
        open: OpenStore,
        kv: Arc<dyn KvStore>,
        legacy: Option<(PathBuf, String)>,
    },
    /// matrix-sdk-crypto's SQLite stores in a local directory (the bot's at its root, each
    /// ghost's in `ghosts/<sha256 of the user id>/store`), encrypted with `passphrase`.
    Directory { root: PathBuf, passphrase: String },
}

/// A ghost device's record: its device id, and whether its setup finished.
struct GhostRecord {
    device: OwnedDeviceId,
    ready: bool,
}

fn ghost_folder(root: &Path, user: &ruma::UserId) -> PathBuf {
    use sha2::Digest;
    root.join("ghosts").join(hex::encode(
        &sha2::Sha256::digest(user.as_str().as_bytes())[..16],
    ))
}

impl StoreLocation {
    /// Opens the machine of `device` of `user`; `folder` is where its directory store is (or
    /// was, before the database).
    async fn machine(
        &self,
        user: &ruma::UserId,
        device: &DeviceId,
        folder: &Path,
    ) -> Result<OlmMachine, CryptoError> {
        match self {
            Self::Directory { passphrase, .. } => {
                std::fs::create_dir_all(folder).map_err(store_err)?;
                let store = SqliteCryptoStore::open(folder, Some(passphrase))
                    .await
                    .map_err(store_err)?;
                OlmMachine::with_store(user, device, store, None)
                    .await
                    .map_err(store_err)
            }
            Self::Database { open, legacy, .. } => {
                let store = open(user, device);
                if let Some((_, passphrase)) = legacy
                    && store.load_account().await.map_err(store_err)?.is_none()
                    && folder.join("matrix-sdk-crypto.sqlite3").exists()
                {
                    let old = SqliteCryptoStore::open(folder, Some(passphrase))
                        .await
                        .map_err(store_err)?;
                    let n = migrate_store(&old, &*store, user, device).await?;
                    tracing::info!(
                        %user, %device, from = %folder.display(), olm_sessions = n.sessions,
                        megolm_sessions = n.inbound, devices = n.devices,
                        "crypto store copied into the database (the directory is left as it was)"
                    );
                }
                OlmMachine::with_store(user, device, store, None)
                    .await
                    .map_err(store_err)
            }
        }
    }

    /// The directory the bot's store is (or was) in.
    fn root(&self) -> Option<&Path> {
        match self {
            Self::Directory { root, .. } => Some(root),
            Self::Database { legacy, .. } => legacy.as_ref().map(|(p, _)| p.as_path()),
        }
    }

    async fn ghost_record(&self, user: &ruma::UserId) -> Result<Option<GhostRecord>, CryptoError> {
        // A device an earlier version created in its directory keeps its id.
        let from_folder = |root: &Path| -> Result<Option<GhostRecord>, CryptoError> {
            let folder = ghost_folder(root, user);
            match std::fs::read_to_string(folder.join(DEVICE_ID)) {
                Ok(d) => Ok(Some(GhostRecord {
                    device: d.trim().into(),
                    ready: folder.join(READY).exists(),
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(store_err(e)),
            }
        };
        match self {
            Self::Directory { root, .. } => from_folder(root),
            Self::Database { kv, legacy, .. } => {
                let key = format!("ghost_device:{user}");
                match kv.kv_get(&key).await.map_err(store_err)? {
                    Some(v) => {
                        let (device, ready) = match v.split_once(' ') {
                            Some((d, r)) => (d, r == "ready"),
                            None => (v.as_str(), false),
                        };
                        Ok(Some(GhostRecord {
                            device: device.into(),
                            ready,
                        }))
                    }
                    None => match legacy {
                        Some((root, _)) => from_folder(root),
                        None => Ok(None),
                    },
                }
            }
        }
    }

    async fn set_ghost_record(
        &self,
        user: &ruma::UserId,
        r: &GhostRecord,
    ) -> Result<(), CryptoError> {
        match self {
            Self::Directory { root, .. } => {
                let folder = ghost_folder(root, user);
                std::fs::create_dir_all(&folder).map_err(store_err)?;
                write_atomically(&folder.join(DEVICE_ID), r.device.as_str())?;
                if r.ready {
                    write_atomically(&folder.join(READY), "")?;
                }
                Ok(())
            }
            Self::Database { kv, .. } => {
                let v = if r.ready {
                    format!("{} ready", r.device)
                } else {
                    r.device.to_string()
                };
                kv.kv_set(&format!("ghost_device:{user}"), &v)
                    .await
                    .map_err(store_err)
            }
        }
    }
}

/// How much a migration copied.
struct Migrated {
    sessions: usize,
    inbound: usize,
    devices: usize,
}

/// Copies a device's crypto state from a directory store into the database: its Olm account,
/// cross-signing identity, tracked users with their devices and identities, the Olm sessions
/// with those devices, and the inbound Megolm sessions. Outbound Megolm sessions are not copied
/// (the device starts new ones) and the directory is not changed.
async fn migrate_store(
    from: &SqliteCryptoStore,
    to: &DynCryptoStore,
    user: &ruma::UserId,
    device: &DeviceId,
) -> Result<Migrated, CryptoError> {
    use matrix_sdk_crypto::store::{
        CryptoStore,
        types::{Changes, DeviceChanges, IdentityChanges, PendingChanges},
    };
    let Some(account) = from.load_account().await.map_err(store_err)? else {
        return Ok(Migrated {
            sessions: 0,
            inbound: 0,
            devices: 0,
        });
    };
    if account.user_id() != user || account.device_id() != device {
        return Err(CryptoError::Store(format!(
            "the store directory holds {} {}, not {user} {device}",
            account.user_id(),
            account.device_id()
        )));
    }
    let identity = from.load_identity().await.map_err(store_err)?;
    let tracked = from.load_tracked_users().await.map_err(store_err)?;
    let mut users: Vec<OwnedUserId> = tracked.iter().map(|t| t.user_id.clone()).collect();
    if !users.iter().any(|u| u == user) {
        users.push(user.to_owned());
    }
    let (mut devices, mut identities) = (Vec::new(), Vec::new());
    for u in &users {
        devices.extend(
            from.get_user_devices(u)
                .await
                .map_err(store_err)?
                .into_values(),
        );
        if let Some(i) = from.get_user_identity(u).await.map_err(store_err)? {
            identities.push(i);
        }
    }
    let inbound = from.get_inbound_group_sessions().await.map_err(store_err)?;
    // Olm sessions are found by the peer device's key: the keys of the devices the store knows,
    // and those of the devices that sent room keys (their device list may not be known).
    let mut peers: Vec<String> = devices
        .iter()
        .filter_map(|d| d.curve25519_key())
        .chain(inbound.iter().map(|s| s.sender_key()))
        .map(|k| k.to_base64())
        .collect();
    peers.sort_unstable();
    peers.dedup();
    let mut sessions = Vec::new();
    for k in &peers {
        if let Some(s) = from.get_sessions(k).await.map_err(store_err)? {
            sessions.extend(s);
        }
    }
    let counts = Migrated {
        sessions: sessions.len(),
        inbound: inbound.len(),
        devices: devices.len(),
    };
    to.save_changes(Changes {
        private_identity: identity,
        sessions,
        inbound_group_sessions: inbound,
        identities: IdentityChanges {
            new: identities,
            ..Default::default()
        },
        devices: DeviceChanges {
            new: devices,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .map_err(store_err)?;
    let pairs: Vec<(&ruma::UserId, bool)> =
        tracked.iter().map(|t| (&*t.user_id, t.dirty)).collect();
    to.save_tracked_users(&pairs).await.map_err(store_err)?;
    // The account last: a migration cut short is done again from the start.
    to.save_pending_changes(PendingChanges {
        account: Some(account),
    })
    .await
    .map_err(store_err)?;
    Ok(counts)
}

/// One Matrix device the bridge runs: the bot's, or a ghost's. It owns an `OlmMachine` and
/// sends what the machine asks for in the name of its user and device (MSC3202 masquerading).
struct Device {
    /// The device's machine; replaced by a fresh one from the store when another worker used
    /// the device meanwhile.
    olm: std::sync::RwLock<OlmMachine>,
    /// With several workers: the lease that lets one worker at a time use the device.
    shared: Option<SharedDevice>,
    hs: HomeserverClient,
    user: OwnedUserId,
    device: OwnedDeviceId,
    room_locks: Mutex<HashMap<OwnedRoomId, Arc<Mutex<()>>>>,
    flush_lock: Mutex<()>,
}

pub struct Crypto {
    bot: Device,
    ghosts: Option<GhostDevices>,
    /// With MSC4350: the ghosts whose impersonatable device was published by this process.
    impersonated: Option<std::sync::Mutex<std::collections::HashSet<OwnedUserId>>>,
    encrypted: RwLock<HashMap<String, bool>>,
    /// Signalled when room keys arrive (events waiting for a key retry then).
    pub keys_arrived: Notify,
}

fn settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

/// What one transaction carries for one device.
struct DeviceChanges<'a> {
    to_device: Vec<Raw<AnyToDeviceEvent>>,
    device_lists: &'a DeviceLists,
    otk: BTreeMap<OneTimeKeyAlgorithm, UInt>,
    fallback: Option<Vec<OneTimeKeyAlgorithm>>,
}

impl<'a> DeviceChanges<'a> {
    fn for_device(
        changes: &CryptoChanges,
        device_lists: &'a DeviceLists,
        user: &str,
        device: &str,
    ) -> Self {
        let to_device = changes
            .to_device
            .iter()
            .filter(|e| e["to_user_id"] == user && e["to_device_id"] == device)
            .filter_map(|e| serde_json::value::to_raw_value(e).ok().map(Raw::from_json))
            .collect();
        Self {
            to_device,
            device_lists,
            otk: serde_json::from_value(changes.otk_counts[user][device].clone())
                .unwrap_or_default(),
            fallback: serde_json::from_value(changes.fallback_keys[user][device].clone()).ok(),
        }
    }

    fn is_empty(&self) -> bool {
        self.to_device.is_empty()
            && self.otk.is_empty()
            && self.fallback.is_none()
            && self.device_lists.changed.is_empty()
            && self.device_lists.left.is_empty()
    }
}

/// With several workers on one database: the leases, and this worker's id.
pub type Workers = (Arc<dyn LeaseStore>, String);

/// How long one use of a device may hold it (a slow homeserver is retried within this).
const DEVICE_LEASE_MS: i64 = 30_000;
/// How long a use of a device waits for another worker to finish with it.
const DEVICE_PATIENCE: Duration = Duration::from_secs(30);

/// A device used by several workers, one at a time.
struct SharedDevice {
    leases: Arc<dyn LeaseStore>,
    worker: String,
    lease: String,
    store: StoreLocation,
    folder: PathBuf,
    /// Held during a use in this process; the lease generation of this worker's last use.
    turn: Arc<Mutex<Option<i64>>>,
}

/// One use of a device (see [`Device::hold`]).
type DeviceHold = Option<mib_core::cluster::Hold<tokio::sync::OwnedMutexGuard<Option<i64>>>>;

impl Device {
    /// The current machine.
    fn olm(&self) -> OlmMachine {
        self.olm.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// With several workers: takes the device for this worker until the hold is dropped, and
    /// reloads the machine from the store when another worker used the device meanwhile (its
    /// caches would be stale). A no-op for a single bridge.
    async fn hold(&self) -> Result<DeviceHold, CryptoError> {
        let Some(sh) = &self.shared else {
            return Ok(None);
        };
        let turn = sh.turn.clone().lock_owned().await;
        let mut held = mib_core::cluster::hold(
            &sh.leases,
            &sh.lease,
            &sh.worker,
            DEVICE_LEASE_MS,
            DEVICE_PATIENCE,
            turn,
        )
        .await
        .map_err(store_err)?;
        let generation = held.generation;
        if **held.kept() != Some(generation) {
            let fresh = sh
                .store
                .machine(&self.user, &self.device, &sh.folder)
                .await?;
            *self.olm.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            **held.kept() = Some(generation);
        }
        Ok(Some(held))
    }

    /// Opens (or creates) the device's crypto store and machine.
    async fn open(
        hs: HomeserverClient,
        user: OwnedUserId,
        device: OwnedDeviceId,
        store: &StoreLocation,
        folder: &Path,
        shared: Option<Workers>,
    ) -> Result<Self, CryptoError> {
        let olm = store.machine(&user, &device, folder).await?;
        let shared = shared.map(|(leases, worker)| SharedDevice {
            leases,
            worker,
            lease: format!("device:{user}/{device}"),
            store: store.clone(),
            folder: folder.to_owned(),
            turn: Arc::new(Mutex::new(None)),
        });
        Ok(Self {
            olm: std::sync::RwLock::new(olm),
            shared,
            hs,
            user,
            device,
            room_locks: Mutex::new(HashMap::new()),
            flush_lock: Mutex::new(()),
        })
    }

    /// Creates the user's cross-signing identity (or re-uploads the existing one) and signs the
    /// device with it. The appservice asserts the user, so no interactive auth is needed
    /// (MSC4190).
    async fn cross_sign(&self) -> Result<(), CryptoError> {
        let _held = self.hold().await?;
        let reqs = self
            .olm()
            .bootstrap_cross_signing(false)
            .await
            .map_err(store_err)?;
        if let Some(up) = reqs.upload_keys_req {
            self.send_outgoing(up.request_id(), up.request()).await?;
        }
        let sk = reqs.upload_signing_keys_req;
        let mut req = upload_signing_keys::v3::Request::new();
        req.master_key = sk.master_key.map(|k| k.to_raw());
        req.self_signing_key = sk.self_signing_key.map(|k| k.to_raw());
        req.user_signing_key = sk.user_signing_key.map(|k| k.to_raw());
        self.hs
            .send(req, Some(&self.user), Some(&self.device))
            .await?;
        let sig = upload_signatures::v3::Request::new(reqs.upload_signatures_req.signed_keys);
        self.hs
            .send(sig, Some(&self.user), Some(&self.device))
            .await?;
        Ok(())
    }

    async fn send_outgoing(
        &self,
        id: &ruma::TransactionId,
        req: &AnyOutgoingRequest,
    ) -> Result<(), CryptoError> {
        let (u, d) = (Some(&*self.user), Some(&*self.device));
        match req {
            AnyOutgoingRequest::KeysUpload(r) => {
                let resp = self.hs.send(r.clone(), u, d).await?;
                self.olm()
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::KeysQuery(q) => {
                let mut r = get_keys::v3::Request::new();
                r.device_keys = q.device_keys.clone();
                let resp = self.hs.send(r, u, d).await?;
                self.olm()
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::KeysClaim(c) => {
                let resp = self.hs.send(c.clone(), u, d).await?;
                self.olm()
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::ToDeviceRequest(t) => {
                let r = send_event_to_device::v3::Request::new_raw(
                    t.event_type.clone(),
                    t.txn_id.clone(),
                    t.messages.clone(),
                );
                let resp = self.hs.send(r, u, d).await?;
                self.olm()
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::SignatureUpload(s) => {
                let r = upload_signatures::v3::Request::new(s.signed_keys.clone());
                let resp = self.hs.send(r, u, d).await?;
                self.olm()
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            other => tracing::debug!(?other, "outgoing crypto request not needed by the bridge"),
        }
        Ok(())
    }

    /// Sends everything the machine asks for.
    async fn flush(&self) -> Result<(), CryptoError> {
        let _held = self.hold().await?;
        self.flush_held().await
    }

    /// [`Device::flush`] within a use of the device.
    async fn flush_held(&self) -> Result<(), CryptoError> {
        let _guard = self.flush_lock.lock().await;
        for r in self.olm().outgoing_requests().await.map_err(store_err)? {
            self.send_outgoing(r.request_id(), r.request()).await?;
        }
        Ok(())
    }

    /// Feeds what a transaction carries for this device; true when room keys arrived.
    async fn receive(&self, changes: DeviceChanges<'_>) -> Result<bool, CryptoError> {
        let _held = self.hold().await?;
        let (_, room_keys) = self
            .olm()
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: changes.to_device,
                    changed_devices: changes.device_lists,
                    one_time_keys_counts: &changes.otk,
                    unused_fallback_keys: changes.fallback.as_deref(),
                    next_batch_token: None,
                },
                &settings(),
            )
            .await
            .map_err(store_err)?;
        self.flush_held().await?;
        Ok(!room_keys.is_empty())
    }

    /// Decrypts a room event. A crypto store that cannot be read (a database outage) is
    /// [`CryptoError::Store`], so that the event waits for it instead of being reported as
    /// undecryptable.
    async fn decrypt(&self, room: &RoomId, event: &Value) -> Result<Value, CryptoError> {
        let raw: Raw<EncryptedEvent> = Raw::from_json(
            serde_json::value::to_raw_value(event)
                .map_err(|e| CryptoError::Decrypt(e.to_string()))?,
        );
        let held = self.hold().await?;
        let decrypted = self.olm().decrypt_room_event(&raw, room, &settings()).await;
        drop(held);
        match decrypted {
            Ok(d) => {
                let inner: Value = d
                    .event
                    .deserialize_as()
                    .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
                sanitize_decrypted(event, &inner)
            }
            Err(MegolmError::MissingRoomKey(_)) => Err(CryptoError::MissingKey),
            Err(MegolmError::Store(e)) => Err(store_err(e)),
            Err(e) => Err(CryptoError::Decrypt(e.to_string())),
        }
    }

    /// Encrypts `content` for the room's current members; returns the `m.room.encrypted` content.
    async fn encrypt(
        &self,
        room: &OwnedRoomId,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, CryptoError> {
        let lock = self
            .room_locks
            .lock()
            .await
            .entry(room.clone())
            .or_default()
            .clone();
        let _one_writer = lock.lock().await;
        let _held = self.hold().await?;
        let members = self.hs.joined_members(room, &self.user).await?;
        // Plain references collected first: a borrowing iterator held across an await would
        // make this future non-Send.
        let refs: Vec<&ruma::UserId> = members.iter().map(|u| &**u).collect();
        self.olm()
            .update_tracked_users(refs.clone())
            .await
            .map_err(store_err)?;
        self.flush_held().await?;
        if let Some((txn, claim)) = self
            .olm()
            .get_missing_sessions(refs.clone().into_iter())
            .await
            .map_err(store_err)?
        {
            let claim: claim_keys::v3::Request = claim;
            let resp = self
                .hs
                .send(claim, Some(&self.user), Some(&self.device))
                .await?;
            self.olm()
                .mark_request_as_sent(&txn, &resp)
                .await
                .map_err(store_err)?;
        }
        let shares = self
            .olm()
            .share_room_key(
                room,
                refs.clone().into_iter(),
                EncryptionSettings::default(),
            )
            .await
            .map_err(|e| match e {
                OlmError::Store(e) => store_err(e),
                e => CryptoError::Encrypt(e.to_string()),
            })?;
        for td in shares {
            let r = send_event_to_device::v3::Request::new_raw(
                td.event_type.clone(),
                td.txn_id.clone(),
                td.messages.clone(),
            );
            let resp = self
                .hs
                .send(r, Some(&self.user), Some(&self.device))
                .await?;
            self.olm()
                .mark_request_as_sent(&td.txn_id, &resp)
                .await
                .map_err(store_err)?;
        }
        let raw = Raw::from_json(
            serde_json::value::to_raw_value(content)
                .map_err(|e| CryptoError::Encrypt(e.to_string()))?,
        );
        let enc = self
            .olm()
            .encrypt_room_event_raw(room, event_type, &raw)
            .await
            .map_err(|e| match e {
                MegolmError::Store(e) => store_err(e),
                e => CryptoError::Encrypt(e.to_string()),
            })?;
        enc.content
            .deserialize_as()
            .map_err(|e| CryptoError::Encrypt(e.to_string()))
    }

    async fn discard_room_key(&self, room: &RoomId) {
        let _held = match self.hold().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot discard a room key");
                return;
            }
        };
        if let Err(e) = self.olm().discard_room_key(room).await {
            tracing::warn!(error = %e, "cannot discard a room key");
        }
    }
}

/// The ghosts' own devices: one per ghost that ever sent into an encrypted room, each with its
/// own Olm account and cross-signing identity, so the sender of a ghost's event and the owner of
/// its Megolm session are the same user (no "mismatched sender" in clients, and clients that
/// exclude insecure devices decrypt it).
///
/// Each device's crypto store is a folder `ghosts/<sha256 of the user id>/` next to the bot's
/// store; `device_id` there names the device and `ready` is written once the device exists on
/// the homeserver with its keys and cross-signing identity uploaded. Loaded machines are kept in
/// a bounded cache; one that is in use is never evicted, so a ghost never has two machines.
struct GhostDevices {
    store: StoreLocation,
    hs: HomeserverClient,
    capacity: usize,
    cache: std::sync::Mutex<GhostCache<Device>>,
    /// Serialises loading and creating (one machine per ghost, ever).
    opening: Mutex<()>,
    /// Several workers: devices are shared, and one ghost's device is created by one worker.
    workers: Option<Workers>,
}

/// The loaded ghost devices, least recently used dropped first; one that is in use (held
/// outside the cache) is never dropped, so a ghost never has two machines on one store.
struct GhostCache<D> {
    devices: HashMap<OwnedUserId, (Arc<D>, u64)>,
    tick: u64,
}

impl<D> Default for GhostCache<D> {
    fn default() -> Self {
        Self {
            devices: HashMap::new(),
            tick: 0,
        }
    }
}

impl<D> GhostCache<D> {
    fn get(&mut self, user: &ruma::UserId) -> Option<Arc<D>> {
        self.tick += 1;
        let tick = self.tick;
        self.devices.get_mut(user).map(|(d, used)| {
            *used = tick;
            d.clone()
        })
    }

    /// Adds a device, then drops the least recently used idle ones above `capacity`.
    fn insert(&mut self, user: OwnedUserId, device: Arc<D>, capacity: usize) {
        self.tick += 1;
        self.devices.insert(user, (device, self.tick));
        while self.devices.len() > capacity {
            let idle = self
                .devices
                .iter()
                .filter(|(_, (d, _))| Arc::strong_count(d) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(u, _)| u.clone());
            match idle {
                Some(u) => {
                    self.devices.remove(&u);
                }
                None => break,
            }
        }
    }

    fn loaded(&self) -> Vec<Arc<D>> {
        self.devices.values().map(|(d, _)| d.clone()).collect()
    }
}

const READY: &str = "ready";
const DEVICE_ID: &str = "device_id";

impl GhostDevices {
    fn cached(&self) -> std::sync::MutexGuard<'_, GhostCache<Device>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ghost's device: from the cache, else from its store; created when `create` and the
    /// ghost has none yet. `None` when it has none and `create` is false.
    async fn get(
        &self,
        user: &ruma::UserId,
        create: bool,
    ) -> Result<Option<Arc<Device>>, CryptoError> {
        if let Some(d) = self.cached().get(user) {
            return Ok(Some(d));
        }
        let _one = self.opening.lock().await;
        if let Some(d) = self.cached().get(user) {
            return Ok(Some(d));
        }
        // Several workers: one at a time sets up a ghost's device (else two might create one
        // each).
        let _setup = match &self.workers {
            Some((leases, worker)) => Some(
                mib_core::cluster::hold(
                    leases,
                    &format!("ghost-setup:{user}"),
                    worker,
                    DEVICE_LEASE_MS,
                    DEVICE_PATIENCE,
                    (),
                )
                .await
                .map_err(store_err)?,
            ),
            None => None,
        };
        let mut record = match self.store.ghost_record(user).await? {
            Some(r) => r,
            None if create => {
                let r = GhostRecord {
                    device: new_device_id().as_str().into(),
                    ready: false,
                };
                self.store.set_ghost_record(user, &r).await?;
                r
            }
            None => return Ok(None),
        };
        let started = std::time::Instant::now();
        if !record.ready {
            // Each step is idempotent, so a crash half-way is finished here next time.
            self.hs
                .create_device(user, &record.device, "Interop bridge (contact)")
                .await?;
        }
        let folder = self
            .store
            .root()
            .map(|r| ghost_folder(r, user).join("store"))
            .unwrap_or_default();
        let device = Device::open(
            self.hs.clone(),
            user.to_owned(),
            record.device.clone(),
            &self.store,
            &folder,
            self.workers.clone(),
        )
        .await?;
        if record.ready {
            // Device-list changes that came while it was not loaded were not fed to it.
            let _held = device.hold().await?;
            device
                .olm()
                .mark_all_tracked_users_as_dirty()
                .await
                .map_err(store_err)?;
        } else {
            device.flush().await?;
            device.cross_sign().await?;
            tracing::info!(
                ghost = %user,
                device = %device.device,
                ms = started.elapsed().as_millis() as u64,
                "ghost device created and cross-signed"
            );
        }
        // Recorded as ready (again): this also moves a directory-era ghost into the database.
        record.ready = true;
        self.store.set_ghost_record(user, &record).await?;
        let device = Arc::new(device);
        self.cached()
            .insert(device.user.clone(), device.clone(), self.capacity);
        Ok(Some(device))
    }
}

fn new_device_id() -> String {
    let d: String = rand::Rng::sample_iter(rand::rng(), rand::distr::Alphanumeric)
        .take(10)
        .map(|c| char::from(c).to_ascii_uppercase())
        .collect();
    format!("MIBG{d}")
}

fn write_atomically(path: &Path, text: &str) -> Result<(), CryptoError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(store_err)?;
    std::fs::rename(&tmp, path).map_err(store_err)
}

impl Crypto {
    /// Creates (or reuses) the bot's device, opens the crypto store and uploads keys.
    pub async fn start(
        hs: HomeserverClient,
        opts: CryptoOptions,
    ) -> Result<Arc<Self>, CryptoError> {
        let user: OwnedUserId = opts.bot.as_str().try_into().map_err(store_err)?;
        let device: OwnedDeviceId = opts.device.as_str().into();
        if opts.msc4190 {
            hs.create_device(&user, &device, "Interop bridge").await?;
        }
        let root = opts.store.root().map(Path::to_path_buf).unwrap_or_default();
        let bot = Device::open(
            hs.clone(),
            user,
            device,
            &opts.store,
            &root,
            opts.workers.clone(),
        )
        .await?;
        bot.flush().await?;
        if opts.self_sign {
            let status = bot.olm().cross_signing_status().await;
            if !(status.has_master && status.has_self_signing) {
                bot.cross_sign().await?;
                tracing::info!("bridge device cross-signed by the bot's identity");
            }
        }
        let ghosts = if opts.msc4350 {
            None
        } else if opts.ghost_devices && !opts.msc4190 {
            tracing::warn!(
                "encryption.ghost_devices needs encryption.msc4190: ghosts' messages are encrypted by the bot's device"
            );
            None
        } else if opts.ghost_devices {
            Some(GhostDevices {
                store: opts.store.clone(),
                hs,
                capacity: opts.ghost_device_cache.max(1),
                cache: std::sync::Mutex::new(GhostCache::default()),
                opening: Mutex::new(()),
                workers: opts.workers.clone(),
            })
        } else {
            None
        };
        tracing::info!(device = %bot.device, ghost_devices = ghosts.is_some(), "encryption ready");
        Ok(Arc::new(Self {
            bot,
            ghosts,
            impersonated: opts.msc4350.then(Default::default),
            encrypted: RwLock::new(HashMap::new()),
            keys_arrived: Notify::new(),
        }))
    }

    pub fn device_id(&self) -> &str {
        self.bot.device.as_str()
    }

    /// Sends everything the bot's machine asks for.
    pub async fn flush(&self) -> Result<(), CryptoError> {
        self.bot.flush().await
    }

    /// Feeds one transaction's to-device events, device-list changes and key counts to the bot's
    /// device and to the ghosts' devices they are meant for.
    pub async fn receive(&self, changes: &CryptoChanges) -> Result<(), CryptoError> {
        let device_lists: DeviceLists =
            serde_json::from_value(changes.device_lists.clone()).unwrap_or_default();
        let (me, dev) = (self.bot.user.as_str(), self.bot.device.as_str());
        let for_bot = DeviceChanges::for_device(changes, &device_lists, me, dev);
        tracing::debug!(
            received = changes.to_device.len(),
            for_bot = for_bot.to_device.len(),
            "to-device events in transaction"
        );
        let mut room_keys = self.bot.receive(for_bot).await?;
        if let Some(ghosts) = &self.ghosts {
            // Ghosts named in this transaction: loaded if they have a device.
            let mut named: Vec<&str> = changes
                .to_device
                .iter()
                .filter_map(|e| e["to_user_id"].as_str())
                .chain(
                    changes
                        .otk_counts
                        .as_object()
                        .into_iter()
                        .flat_map(|m| m.keys().map(String::as_str)),
                )
                .filter(|u| *u != me)
                .collect();
            named.sort_unstable();
            named.dedup();
            for u in named {
                let Ok(user) = OwnedUserId::try_from(u) else {
                    continue;
                };
                if let Err(e) = ghosts.get(&user, false).await {
                    tracing::warn!(ghost = %user, error = %e, "cannot load a ghost's device");
                }
            }
            let loaded = ghosts.cached().loaded();
            for ghost in loaded {
                let c = DeviceChanges::for_device(
                    changes,
                    &device_lists,
                    ghost.user.as_str(),
                    ghost.device.as_str(),
                );
                if c.is_empty() {
                    continue;
                }
                match ghost.receive(c).await {
                    Ok(k) => room_keys |= k,
                    Err(e) => {
                        tracing::warn!(ghost = %ghost.user, error = %e, "a ghost's device could not take its to-device events")
                    }
                }
            }
        }
        if room_keys {
            self.keys_arrived.notify_waiters();
        }
        Ok(())
    }

    /// Decrypts an `m.room.encrypted` event into the event it carries (with the bot's device,
    /// which is in every portal).
    pub async fn decrypt(&self, room_id: &str, event: &Value) -> Result<Value, CryptoError> {
        let room: OwnedRoomId = room_id
            .try_into()
            .map_err(|e| CryptoError::Decrypt(format!("{e}")))?;
        self.bot.decrypt(&room, event).await
    }

    /// Asks the sender's other devices for a missing room key.
    pub async fn request_key(&self, room_id: &str, event: &Value) {
        let Ok(room) = OwnedRoomId::try_from(room_id) else {
            return;
        };
        let Ok(raw) = serde_json::value::to_raw_value(event).map(Raw::<EncryptedEvent>::from_json)
        else {
            return;
        };
        let Ok(_held) = self.bot.hold().await else {
            return;
        };
        if let Ok((cancel, request)) = self.bot.olm().request_room_key(&raw, &room).await {
            if let Some(c) = cancel {
                let _ = self.bot.send_outgoing(c.request_id(), c.request()).await;
            }
            let _ = self
                .bot
                .send_outgoing(request.request_id(), request.request())
                .await;
        }
    }

    /// Encrypts `content` for the room's current members, with the device of `sender` (a
    /// ghost's own device when ghost devices are on, else the bot's); returns the
    /// `m.room.encrypted` content.
    pub async fn encrypt(
        &self,
        room_id: &str,
        sender: &str,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, CryptoError> {
        let room: OwnedRoomId = room_id
            .try_into()
            .map_err(|e| CryptoError::Encrypt(format!("{e}")))?;
        let ghost = match (&self.ghosts, OwnedUserId::try_from(sender)) {
            (Some(ghosts), Ok(user)) if user != self.bot.user => ghosts.get(&user, true).await?,
            (None, Ok(user)) if user != self.bot.user && self.impersonated.is_some() => {
                self.publish_impersonatable(&user).await?;
                None
            }
            _ => None,
        };
        match ghost {
            Some(device) => device.encrypt(&room, event_type, content).await,
            None => self.bot.encrypt(&room, event_type, content).await,
        }
    }

    /// MSC4350: publishes the ghost's device that names the bot's device as its impersonator
    /// (once per ghost and process; both requests are idempotent).
    async fn publish_impersonatable(&self, ghost: &ruma::UserId) -> Result<(), CryptoError> {
        let Some(done) = &self.impersonated else {
            return Ok(());
        };
        if done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(ghost)
        {
            return Ok(());
        }
        let device = impersonatable_device_id(ghost, &self.bot.device);
        self.bot
            .hs
            .create_device(ghost, &device, "Interop bridge (through the bot)")
            .await?;
        let keys = self.impersonatable_keys(ghost, &device).await?;
        let mut req = ruma::api::client::keys::upload_keys::v3::Request::new();
        req.device_keys = Some(Raw::from_json(
            serde_json::value::to_raw_value(&keys).map_err(store_err)?,
        ));
        self.bot.hs.send(req, Some(ghost), Some(&device)).await?;
        done.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ghost.to_owned());
        tracing::info!(%ghost, %device, "MSC4350 device published for the ghost");
        Ok(())
    }

    /// The device keys of a ghost's MSC4350 device: no algorithms or keys of its own, the bot's
    /// device keys (without signatures) under [`MSC4350_IMPERSONATOR`], signed by the bot's
    /// device over the canonical JSON.
    async fn impersonatable_keys(
        &self,
        ghost: &ruma::UserId,
        device: &DeviceId,
    ) -> Result<Value, CryptoError> {
        let (bot, bot_device) = (&self.bot.user, &self.bot.device);
        let ids = self.bot.olm().identity_keys();
        let mut keys = json!({
            "user_id": ghost,
            "device_id": device,
            "algorithms": [],
            "keys": {},
            MSC4350_IMPERSONATOR: {
                "user_id": bot,
                "device_id": bot_device,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {
                    format!("curve25519:{bot_device}"): ids.curve25519.to_base64(),
                    format!("ed25519:{bot_device}"): ids.ed25519.to_base64(),
                },
            },
        });
        let canonical = ruma::canonical_json::to_canonical_value(&keys)
            .map_err(store_err)?
            .to_string();
        let all = self.bot.olm().sign(&canonical).await.map_err(store_err)?;
        let all = serde_json::to_value(&all).map_err(store_err)?;
        let key_id = format!("ed25519:{bot_device}");
        let sig = all[bot.as_str()][&key_id].clone();
        if !sig.is_string() {
            return Err(CryptoError::Store("no device signature".into()));
        }
        keys["signatures"] = json!({ bot.as_str(): { key_id: sig } });
        Ok(keys)
    }

    /// Drops the bridge's outgoing room keys of a room (a portal whose owner logged out): the
    /// next message there starts a new Megolm session that only the current members get. Ghost
    /// devices that are not loaded rotate on their own when they next send, because a member
    /// that had their session has left.
    pub async fn discard_room_key(&self, room_id: &str) {
        let Ok(room) = OwnedRoomId::try_from(room_id) else {
            return;
        };
        self.bot.discard_room_key(&room).await;
        if let Some(ghosts) = &self.ghosts {
            let loaded = ghosts.cached().loaded();
            for g in loaded {
                g.discard_room_key(&room).await;
            }
        }
    }

    /// Whether a room is encrypted (cached; asks the homeserver the first time).
    pub async fn is_encrypted(&self, room_id: &str) -> bool {
        if let Some(v) = self.encrypted.read().await.get(room_id) {
            return *v;
        }
        let v = match OwnedRoomId::try_from(room_id) {
            Ok(room) => self
                .bot
                .hs
                .room_state(&room, &self.bot.user, "m.room.encryption", "")
                .await
                .is_ok_and(|s| s["algorithm"].is_string()),
            Err(_) => false,
        };
        self.encrypted.write().await.insert(room_id.to_owned(), v);
        v
    }

    /// Records that a room turned encryption on (from its state event, or because we created it so).
    pub async fn mark_encrypted(&self, room_id: &str) {
        self.encrypted
            .write()
            .await
            .insert(room_id.to_owned(), true);
    }

    /// Encrypts an attachment; returns the ciphertext and the `file` object without its `url`.
    pub fn encrypt_attachment(data: &[u8]) -> Result<(Vec<u8>, Value), CryptoError> {
        let mut reader = data;
        let mut enc = AttachmentEncryptor::new(&mut reader);
        let mut out = Vec::with_capacity(data.len());
        enc.read_to_end(&mut out)
            .map_err(|e| CryptoError::Attachment(e.to_string()))?;
        let info = enc.finish();
        let file =
            serde_json::to_value(&info).map_err(|e| CryptoError::Attachment(e.to_string()))?;
        Ok((out, file))
    }

    /// Decrypts an attachment after checking its hash.
    pub fn decrypt_attachment(ciphertext: &[u8], file: &Value) -> Result<Vec<u8>, CryptoError> {
        let info: MediaEncryptionInfo = serde_json::from_value(file.clone())
            .map_err(|e| CryptoError::Attachment(e.to_string()))?;
        let mut reader = ciphertext;
        let mut dec = AttachmentDecryptor::new(&mut reader, info)
            .map_err(|e| CryptoError::Attachment(e.to_string()))?;
        let mut out = Vec::with_capacity(ciphertext.len());
        dec.read_to_end(&mut out).map_err(|e| {
            CryptoError::Attachment(format!("hash or decryption check failed: {e}"))
        })?;
        Ok(out)
    }

    /// Keeps the one-time keys topped up even without traffic (the bot's and the loaded
    /// ghosts' devices).
    pub async fn maintain(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "crypto maintenance failed");
            }
            if let Some(ghosts) = &self.ghosts {
                let loaded = ghosts.cached().loaded();
                for g in loaded {
                    if let Err(e) = g.flush().await {
                        tracing::warn!(ghost = %g.user, error = %e, "crypto maintenance failed");
                    }
                }
            }
        }
    }
}

/// Encrypted attachments are `{"url": ..., "key": ..., "iv": ..., "hashes": ..., "v": "v2"}`.
pub fn file_with_url(mut file: Value, mxc: &str) -> Value {
    file["url"] = json!(mxc);
    file
}

#[cfg(test)]
mod ghost_cache_tests {
    use super::*;

    fn user(n: u32) -> OwnedUserId {
        format!("@interop_{n}:x").try_into().unwrap()
    }

    /// Inserts as the bridge does: the caller holds the device while it is inserted.
    fn add(c: &mut GhostCache<u32>, n: u32, capacity: usize) -> Arc<u32> {
        let d = Arc::new(n);
        c.insert(user(n), d.clone(), capacity);
        d
    }

    #[test]
    fn the_least_recently_used_idle_device_goes_first() {
        let mut c = GhostCache::default();
        for n in 0..3 {
            add(&mut c, n, 3);
        }
        assert!(c.get(&user(0)).is_some()); // 1 is now the oldest
        add(&mut c, 3, 3);
        assert!(c.get(&user(1)).is_none());
        for n in [0, 2, 3] {
            assert!(c.get(&user(n)).is_some(), "{n}");
        }
    }

    /// Two machines on one ghost's store would reuse Megolm message indexes: a device that is
    /// in use stays cached even above the capacity.
    #[test]
    fn a_device_in_use_is_never_dropped() {
        let mut c = GhostCache::default();
        let held = add(&mut c, 0, 1);
        add(&mut c, 1, 1);
        assert_eq!(c.loaded().len(), 2, "nothing idle to drop yet");
        add(&mut c, 2, 1);
        assert!(c.get(&user(0)).is_some(), "the held device is kept");
        assert!(c.get(&user(1)).is_none(), "the idle one goes instead");
        drop(held);
        add(&mut c, 3, 1);
        assert_eq!(c.loaded().len(), 1);
        assert!(c.get(&user(3)).is_some());
    }
}

#[cfg(test)]
mod sanitize_tests {
    use serde_json::json;

    use super::*;

    fn outer() -> Value {
        json!({"type": "m.room.encrypted", "event_id": "$e", "room_id": "!r:x", "sender": "@mallory:x",
               "origin_server_ts": 1, "content": {"algorithm": "m.megolm.v1.aes-sha2"}})
    }

    /// Membership, power and redactions come only from the homeserver: an encrypted payload that
    /// claims to be the owner's leave, an invite of the bot or a redaction is not taken.
    #[test]
    fn decrypted_state_and_redactions_are_refused() {
        for inner in [
            json!({"type": "m.room.member", "state_key": "@alice:x", "content": {"membership": "leave"}}),
            json!({"type": "m.room.member", "state_key": "@interopbot:x", "content": {"membership": "invite"}}),
            json!({"type": "m.room.power_levels", "state_key": "", "content": {"users": {"@mallory:x": 100}}}),
            json!({"type": "m.room.redaction", "redacts": "$other", "content": {"redacts": "$other"}}),
            json!({"type": "m.room.name", "state_key": "", "content": {"name": "x"}}),
        ] {
            assert!(
                matches!(
                    sanitize_decrypted(&outer(), &inner),
                    Err(CryptoError::NotAllowed(_))
                ),
                "{inner}"
            );
        }
    }

    #[test]
    fn decrypted_messages_keep_only_type_and_content() {
        let inner = json!({"type": "m.room.message", "state_key": "", "redacts": "$x", "sender": "@alice:x",
                           "room_id": "!other:x", "content": {"msgtype": "m.text", "body": "hi"}});
        let ev = sanitize_decrypted(&outer(), &inner).unwrap();
        assert_eq!(ev["sender"], json!("@mallory:x"));
        assert_eq!(ev["room_id"], json!("!r:x"));
        assert_eq!(ev["event_id"], json!("$e"));
        assert!(ev.get("state_key").is_none());
        assert!(ev.get("redacts").is_none());
        assert_eq!(ev["content"]["body"], json!("hi"));
        let no_content = json!({"type": "m.reaction", "content": "nope"});
        assert!(sanitize_decrypted(&outer(), &no_content).is_err());
    }
}

#[cfg(test)]
mod shared_device_tests {
    use ruma::api::client::keys::upload_keys;

    use super::*;
    use mib_core::BridgeError;
    use mib_store::{SqlStore, crypto::DbCryptoStore, testing};
    use mib_vault::SecretKey;

    /// The bot's device as one worker opens it, over the shared database.
    async fn device(db: &SqlStore, key: &SecretKey, worker: &str) -> Device {
        device_of(db, key, Some(worker)).await
    }

    /// The bot's device over the database; `worker` when several workers share it.
    async fn device_of(db: &SqlStore, key: &SecretKey, worker: Option<&str>) -> Device {
        let (db2, key) = (db.clone(), key.clone());
        let open: OpenStore = Arc::new(move |user, device| {
            Arc::new(DbCryptoStore::new(db2.clone(), key.clone(), user, device))
        });
        let store = StoreLocation::Database {
            open,
            kv: Arc::new(db.clone()),
            legacy: None,
        };
        Device::open(
            HomeserverClient::new("http://127.0.0.1:9", "unused").expect("client"),
            "@bot:x".try_into().expect("user"),
            "SHARED".into(),
            &store,
            Path::new(""),
            worker.map(|w| (Arc::new(db.clone()) as _, w.to_owned())),
        )
        .await
        .expect("device")
    }

    /// The key upload the machine asks for, if any, marked as done as the homeserver would;
    /// returns whether it carried the device keys.
    async fn upload(d: &Device) -> Option<bool> {
        let olm = d.olm();
        for r in olm.outgoing_requests().await.expect("requests") {
            if let AnyOutgoingRequest::KeysUpload(up) = r.request() {
                let counts = up
                    .one_time_keys
                    .len()
                    .try_into()
                    .map(|n: UInt| BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, n)]))
                    .expect("count");
                olm.mark_request_as_sent(r.request_id(), &upload_keys::v3::Response::new(counts))
                    .await
                    .expect("mark sent");
                return Some(up.device_keys.is_some());
            }
        }
        None
    }

    /// Two workers open the same device. One publishes its keys; the other, using the device
    /// next, must see that (its machine is reloaded because the lease changed hands): a
    /// stale machine would publish the device keys again.
    #[tokio::test]
    async fn a_worker_sees_what_another_did_with_a_shared_device() {
        let (db, _dir) = testing::sqlite().await;
        let key = SecretKey::random();
        let a = device(&db, &key, "a").await;
        let b = device(&db, &key, "b").await;
        {
            // b uses the device first (its machine now has the account in memory), but its
            // upload does not go through.
            let _held = b.hold().await.expect("hold b");
            let requests = b.olm().outgoing_requests().await.expect("requests");
            assert!(!requests.is_empty());
        }
        {
            let _held = a.hold().await.expect("hold a");
            assert_eq!(upload(&a).await, Some(true), "a publishes the device keys");
        }
        let _held = b.hold().await.expect("hold b");
        assert_ne!(
            upload(&b).await,
            Some(true),
            "b publishes the device keys a published already"
        );
    }

    /// A database outage while an event is decrypted is a crypto-store error, which the
    /// queue waits out (`NotReady`); before, it was reported as an undecryptable event and the
    /// message was lost.
    #[tokio::test]
    async fn a_store_outage_during_decrypt_makes_the_event_wait() {
        let (db, _dir) = testing::sqlite().await;
        let bot = device_of(&db, &SecretKey::random(), None).await;
        let room: OwnedRoomId = "!portal:x".try_into().expect("room");
        let alice =
            OlmMachine::new(ruma::user_id!("@alice:x"), ruma::device_id!("ALICEDEVICE")).await;
        alice
            .share_room_key(&room, std::iter::empty(), EncryptionSettings::default())
            .await
            .expect("share");
        let keys = alice
            .store()
            .export_room_keys(|_| true)
            .await
            .expect("export");
        bot.olm()
            .store()
            .import_exported_room_keys(keys, |_, _| {})
            .await
            .expect("import");
        let event = |n: u32, enc: Value| {
            json!({
                "type": "m.room.encrypted", "room_id": room.as_str(), "sender": "@alice:x",
                "event_id": format!("${n}"), "origin_server_ts": 1, "content": enc,
            })
        };
        let mut sent = Vec::new();
        for n in 0..2 {
            let content = json!({"msgtype": "m.text", "body": format!("hello {n}")});
            let enc = alice
                .encrypt_room_event_raw(
                    &room,
                    "m.room.message",
                    &Raw::from_json(serde_json::value::to_raw_value(&content).expect("raw")),
                )
                .await
                .expect("encrypt");
            sent.push(event(n, enc.content.deserialize_as().expect("content")));
        }
        let plain = bot.decrypt(&room, &sent[0]).await.expect("decrypt");
        assert_eq!(plain["content"]["body"], "hello 0");

        db.close().await;
        let out = bot.decrypt(&room, &sent[1]).await;
        assert!(matches!(out, Err(CryptoError::Store(_))), "{out:?}");
        let waits = BridgeError::from(out.expect_err("an outage"));
        assert!(waits.is_waiting(), "{waits:?}");
    }
}
