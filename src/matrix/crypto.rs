//! End-to-bridge encryption: the bot's device takes part in Olm/Megolm through
//! matrix-sdk-crypto's `OlmMachine` (sans-I/O: we feed it what appservice transactions carry,
//! MSC2409/MSC3202, and send what it asks for). The device is created through MSC4190, and
//! cross-signed by the bot's own identity when `encryption.self_sign` is on.
//!
//! Everything the bridge or a ghost sends into an encrypted room is encrypted with the bot's
//! device (one writer per room for key sharing and encryption).

use std::{
    collections::{BTreeMap, HashMap},
    io::Read,
    path::Path,
    sync::Arc,
    time::Duration,
};

use matrix_sdk_crypto::{
    AttachmentDecryptor, AttachmentEncryptor, DecryptionSettings, EncryptionSettings,
    EncryptionSyncChanges, MediaEncryptionInfo, OlmMachine, TrustRequirement,
    types::{events::room::encrypted::EncryptedEvent, requests::AnyOutgoingRequest},
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, UInt,
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
const ENCRYPTABLE_TYPES: &[&str] = &["m.room.message", "m.reaction", "m.sticker"];

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

pub struct Crypto {
    olm: OlmMachine,
    hs: HomeserverClient,
    user: OwnedUserId,
    device: OwnedDeviceId,
    room_locks: Mutex<HashMap<OwnedRoomId, Arc<Mutex<()>>>>,
    encrypted: RwLock<HashMap<String, bool>>,
    flush_lock: Mutex<()>,
    /// Signalled when room keys arrive (events waiting for a key retry then).
    pub keys_arrived: Notify,
}

fn settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

impl Crypto {
    /// Creates (or reuses) the bot's device, opens the crypto store and uploads keys.
    pub async fn start(
        hs: HomeserverClient,
        bot: &str,
        device: &str,
        store_path: &Path,
        passphrase: &str,
        msc4190: bool,
        self_sign: bool,
    ) -> Result<Arc<Self>, CryptoError> {
        let user: OwnedUserId = bot.try_into().map_err(store_err)?;
        let device: OwnedDeviceId = device.into();
        if msc4190 {
            hs.create_device(&user, &device, "Interop bridge").await?;
        }
        std::fs::create_dir_all(store_path).map_err(store_err)?;
        let store = SqliteCryptoStore::open(store_path, Some(passphrase))
            .await
            .map_err(store_err)?;
        let olm = OlmMachine::with_store(&user, &device, store, None)
            .await
            .map_err(store_err)?;
        let me = Arc::new(Self {
            olm,
            hs,
            user,
            device,
            room_locks: Mutex::new(HashMap::new()),
            encrypted: RwLock::new(HashMap::new()),
            flush_lock: Mutex::new(()),
            keys_arrived: Notify::new(),
        });
        me.flush().await?;
        if self_sign {
            me.cross_sign().await?;
        }
        tracing::info!(device = %me.device, "encryption ready");
        Ok(me)
    }

    pub fn device_id(&self) -> &str {
        self.device.as_str()
    }

    /// Creates the bot's cross-signing identity once and signs the device with it.
    async fn cross_sign(&self) -> Result<(), CryptoError> {
        let status = self.olm.cross_signing_status().await;
        if status.has_master && status.has_self_signing {
            return Ok(());
        }
        let reqs = self
            .olm
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
        tracing::info!("bridge device cross-signed by the bot's identity");
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
                self.olm
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::KeysQuery(q) => {
                let mut r = get_keys::v3::Request::new();
                r.device_keys = q.device_keys.clone();
                let resp = self.hs.send(r, u, d).await?;
                self.olm
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::KeysClaim(c) => {
                let resp = self.hs.send(c.clone(), u, d).await?;
                self.olm
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
                self.olm
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            AnyOutgoingRequest::SignatureUpload(s) => {
                let r = upload_signatures::v3::Request::new(s.signed_keys.clone());
                let resp = self.hs.send(r, u, d).await?;
                self.olm
                    .mark_request_as_sent(id, &resp)
                    .await
                    .map_err(store_err)?;
            }
            other => tracing::debug!(?other, "outgoing crypto request not needed by the bridge"),
        }
        Ok(())
    }

    /// Sends everything the machine asks for.
    pub async fn flush(&self) -> Result<(), CryptoError> {
        let _guard = self.flush_lock.lock().await;
        for r in self.olm.outgoing_requests().await.map_err(store_err)? {
            self.send_outgoing(r.request_id(), r.request()).await?;
        }
        Ok(())
    }

    /// Feeds one transaction's to-device events, device-list changes and key counts.
    pub async fn receive(&self, changes: &CryptoChanges) -> Result<(), CryptoError> {
        let me = self.user.as_str();
        let dev = self.device.as_str();
        let to_device: Vec<Raw<AnyToDeviceEvent>> = changes
            .to_device
            .iter()
            .filter(|e| e["to_user_id"] == me && e["to_device_id"] == dev)
            .filter_map(|e| serde_json::value::to_raw_value(e).ok().map(Raw::from_json))
            .collect();
        tracing::debug!(
            received = changes.to_device.len(),
            for_us = to_device.len(),
            "to-device events in transaction"
        );
        let device_lists: DeviceLists =
            serde_json::from_value(changes.device_lists.clone()).unwrap_or_default();
        let otk: BTreeMap<OneTimeKeyAlgorithm, UInt> =
            serde_json::from_value(changes.otk_counts[me][dev].clone()).unwrap_or_default();
        let fallback: Option<Vec<OneTimeKeyAlgorithm>> =
            serde_json::from_value(changes.fallback_keys[me][dev].clone()).ok();
        let (_, room_keys) = self
            .olm
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: to_device,
                    changed_devices: &device_lists,
                    one_time_keys_counts: &otk,
                    unused_fallback_keys: fallback.as_deref(),
                    next_batch_token: None,
                },
                &settings(),
            )
            .await
            .map_err(store_err)?;
        if !room_keys.is_empty() {
            self.keys_arrived.notify_waiters();
        }
        self.flush().await
    }

    /// Decrypts an `m.room.encrypted` event into the event it carries.
    pub async fn decrypt(&self, room_id: &str, event: &Value) -> Result<Value, CryptoError> {
        let room: OwnedRoomId = room_id
            .try_into()
            .map_err(|e| CryptoError::Decrypt(format!("{e}")))?;
        let raw: Raw<EncryptedEvent> = Raw::from_json(
            serde_json::value::to_raw_value(event)
                .map_err(|e| CryptoError::Decrypt(e.to_string()))?,
        );
        match self.olm.decrypt_room_event(&raw, &room, &settings()).await {
            Ok(d) => {
                let inner: Value = d
                    .event
                    .deserialize_as()
                    .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
                sanitize_decrypted(event, &inner)
            }
            Err(matrix_sdk_crypto::MegolmError::MissingRoomKey(_)) => Err(CryptoError::MissingKey),
            Err(e) => Err(CryptoError::Decrypt(e.to_string())),
        }
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
        if let Ok((cancel, request)) = self.olm.request_room_key(&raw, &room).await {
            if let Some(c) = cancel {
                let _ = self.send_outgoing(c.request_id(), c.request()).await;
            }
            let _ = self
                .send_outgoing(request.request_id(), request.request())
                .await;
        }
    }

    fn room_lock_key(room: &RoomId) -> OwnedRoomId {
        room.to_owned()
    }

    /// Encrypts `content` for the room's current members; returns the `m.room.encrypted` content.
    pub async fn encrypt(
        &self,
        room_id: &str,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, CryptoError> {
        let room: OwnedRoomId = room_id
            .try_into()
            .map_err(|e| CryptoError::Encrypt(format!("{e}")))?;
        let lock = self
            .room_locks
            .lock()
            .await
            .entry(Self::room_lock_key(&room))
            .or_default()
            .clone();
        let _one_writer = lock.lock().await;
        let members = self.hs.joined_members(&room, &self.user).await?;
        // Plain references collected first: a borrowing iterator held across an await would
        // make this future non-Send.
        let refs: Vec<&ruma::UserId> = members.iter().map(|u| &**u).collect();
        self.olm
            .update_tracked_users(refs.clone())
            .await
            .map_err(store_err)?;
        self.flush().await?;
        if let Some((txn, claim)) = self
            .olm
            .get_missing_sessions(refs.clone().into_iter())
            .await
            .map_err(store_err)?
        {
            let claim: claim_keys::v3::Request = claim;
            let resp = self
                .hs
                .send(claim, Some(&self.user), Some(&self.device))
                .await?;
            self.olm
                .mark_request_as_sent(&txn, &resp)
                .await
                .map_err(store_err)?;
        }
        let shares = self
            .olm
            .share_room_key(
                &room,
                refs.clone().into_iter(),
                EncryptionSettings::default(),
            )
            .await
            .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
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
            self.olm
                .mark_request_as_sent(&td.txn_id, &resp)
                .await
                .map_err(store_err)?;
        }
        let raw = Raw::from_json(
            serde_json::value::to_raw_value(content)
                .map_err(|e| CryptoError::Encrypt(e.to_string()))?,
        );
        let enc = self
            .olm
            .encrypt_room_event_raw(&room, event_type, &raw)
            .await
            .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
        enc.content
            .deserialize_as()
            .map_err(|e| CryptoError::Encrypt(e.to_string()))
    }

    /// Whether a room is encrypted (cached; asks the homeserver the first time).
    /// Drops the bridge's outgoing room key of a room (a portal whose owner logged out): the
    /// next message there starts a new Megolm session that only the current members get.
    pub async fn discard_room_key(&self, room_id: &str) {
        let Ok(room) = OwnedRoomId::try_from(room_id) else {
            return;
        };
        if let Err(e) = self.olm.discard_room_key(&room).await {
            tracing::warn!(error = %e, "cannot discard a room key");
        }
    }

    pub async fn is_encrypted(&self, room_id: &str) -> bool {
        if let Some(v) = self.encrypted.read().await.get(room_id) {
            return *v;
        }
        let v = match OwnedRoomId::try_from(room_id) {
            Ok(room) => self
                .hs
                .room_state(&room, &self.user, "m.room.encryption", "")
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

    /// Keeps the one-time keys topped up even without traffic.
    pub async fn maintain(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "crypto maintenance failed");
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
