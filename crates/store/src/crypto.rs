//! matrix-sdk-crypto's `CryptoStore` over the bridge's own database (SQLite or PostgreSQL): the
//! Olm accounts, Olm and Megolm sessions, device lists and cross-signing identities of the
//! bridge's Matrix devices, the bot's and each ghost's, in one table keyed by the device.
//!
//! Every value is sealed with the bridge's vault data key, bound to its device, kind and name
//! (a row copied elsewhere does not open). Lookups that the machine makes by something other
//! than the primary key (an Olm session by its peer's key, Megolm sessions by room, devices by
//! user, key requests by what they ask for) use the `idx` column, which holds that value in
//! clear: identifiers and public keys only, never key material or message content.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use matrix_sdk_common::cross_process_lock::{
    CrossProcessLockGeneration,
    memory_store_helper::{Lease, try_take_leased_lock},
};
use matrix_sdk_crypto::{
    Account, DeviceData, GossipRequest, SecretInfo, UserIdentityData,
    olm::{
        InboundGroupSession, OlmMessageHash, OutboundGroupSession, PickledAccount,
        PickledCrossSigningIdentity, PickledInboundGroupSession, PickledOutboundGroupSession,
        PickledSession, PrivateCrossSigningIdentity, SenderDataType, Session,
    },
    store::{
        CryptoStore, CryptoStoreError,
        types::{
            BackupDecryptionKey, BackupKeys, Changes, DehydratedDeviceKey, PendingChanges,
            RoomKeyCounts, RoomKeyWithheldEntry, RoomPendingKeyBundleDetails, RoomSettings,
            StoredRoomKeyBundleData, TrackedUser,
        },
    },
    vodozemac::Curve25519PublicKey,
};
use ruma::{
    DeviceId, OwnedDeviceId, OwnedUserId, RoomId, TransactionId, UserId,
    events::secret::request::SecretName,
};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::Row as _;
use zeroize::Zeroizing;

use super::SqlStore;
use mib_vault::SecretKey;

type Result<T, E = CryptoStoreError> = std::result::Result<T, E>;

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> CryptoStoreError {
    CryptoStoreError::Backend(Box::new(e))
}

/// The kinds of items (the `kind` column).
mod kind {
    pub const ACCOUNT: &str = "account";
    pub const IDENTITY: &str = "identity";
    pub const SESSION: &str = "olm_session";
    pub const INBOUND: &str = "inbound_group_session";
    pub const OUTBOUND: &str = "outbound_group_session";
    pub const DEVICE: &str = "device";
    pub const USER_IDENTITY: &str = "user_identity";
    pub const TRACKED: &str = "tracked_user";
    pub const MESSAGE_HASH: &str = "olm_hash";
    pub const KEY_REQUEST: &str = "key_request";
    pub const SECRET: &str = "secret_inbox";
    pub const ROOM_SETTINGS: &str = "room_settings";
    pub const WITHHELD: &str = "withheld";
    pub const BUNDLE: &str = "room_key_bundle";
    pub const PENDING_BUNDLE: &str = "pending_key_bundle";
    pub const DOWNLOADED: &str = "backup_downloaded";
    pub const CUSTOM: &str = "custom";
    pub const BACKUP: &str = "backup";
    pub const DEHYDRATED: &str = "dehydrated_pickle_key";
    pub const NEXT_BATCH: &str = "next_batch";
}

/// One row to write; `value: None` deletes it.
struct Write {
    kind: &'static str,
    name: String,
    idx: String,
    backup: String,
    value: Option<Vec<u8>>,
}

impl Write {
    fn put(kind: &'static str, name: impl Into<String>, value: Vec<u8>) -> Self {
        Self {
            kind,
            name: name.into(),
            idx: String::new(),
            backup: String::new(),
            value: Some(value),
        }
    }

    fn json(kind: &'static str, name: impl Into<String>, value: &impl Serialize) -> Result<Self> {
        Ok(Self::put(kind, name, serde_json::to_vec(value)?))
    }

    fn delete(kind: &'static str, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
            idx: String::new(),
            backup: String::new(),
            value: None,
        }
    }

    fn idx(mut self, idx: impl Into<String>) -> Self {
        self.idx = idx.into();
        self
    }

    fn backup(mut self, version: Option<&str>) -> Self {
        self.backup = version.unwrap_or_default().to_owned();
        self
    }
}

/// A row as read back: its backup version and opened value.
struct Row {
    backup: String,
    value: Zeroizing<Vec<u8>>,
}

/// The crypto store of one Matrix device of the bridge.
pub struct DbCryptoStore {
    db: SqlStore,
    key: SecretKey,
    /// `<user id> <device id>`: the `device` column of every row of this store.
    device: String,
    user_id: OwnedUserId,
    device_id: OwnedDeviceId,
    leases: Arc<RwLock<HashMap<String, Lease>>>,
    /// Device lists and identities read on every message (key sharing checks each recipient):
    /// kept in memory once read, written through by `save_changes`, with the rows the source of
    /// truth. One process holds a device, so nothing else changes them underneath.
    devices: tokio::sync::RwLock<HashMap<OwnedUserId, HashMap<OwnedDeviceId, DeviceData>>>,
    identities: tokio::sync::RwLock<HashMap<OwnedUserId, Option<UserIdentityData>>>,
}

impl std::fmt::Debug for DbCryptoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbCryptoStore")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

fn pair(a: &str, b: &str) -> String {
    format!("{a}|{b}")
}

impl DbCryptoStore {
    /// The writes of the keys and sessions in `changes`: the identity, backup and dehydration
    /// keys, Olm and Megolm sessions, message hashes and key requests.
    async fn key_writes(&self, changes: &Changes) -> Result<Vec<Write>> {
        let mut w = Vec::new();
        if let Some(identity) = &changes.private_identity {
            w.push(Write::json(kind::IDENTITY, "", &identity.pickle().await)?);
        }
        if let Some(version) = &changes.backup_version {
            w.push(Write::put(
                kind::BACKUP,
                "version",
                version.as_bytes().to_vec(),
            ));
        }
        if let Some(key) = &changes.backup_decryption_key {
            w.push(Write::put(
                kind::BACKUP,
                "decryption_key",
                key.to_base64().as_bytes().to_vec(),
            ));
        }
        if let Some(key) = &changes.dehydrated_device_pickle_key {
            w.push(Write::put(
                kind::DEHYDRATED,
                "",
                key.to_base64().as_bytes().to_vec(),
            ));
        }
        for s in &changes.sessions {
            let pickle = s.pickle().await;
            w.push(
                Write::json(kind::SESSION, s.session_id(), &pickle)?
                    .idx(s.sender_key().to_base64()),
            );
        }
        for h in &changes.message_hashes {
            w.push(Write::put(
                kind::MESSAGE_HASH,
                pair(&h.sender_key, &h.hash),
                vec![1],
            ));
        }
        for s in &changes.inbound_group_sessions {
            // Keep the backup version a session was marked with.
            let name = pair(s.room_id().as_str(), s.session_id());
            let backup: Option<String> = sqlx::query_scalar(
                "SELECT backup FROM crypto_item WHERE device = $1 AND kind = $2 AND name = $3",
            )
            .bind(&self.device)
            .bind(kind::INBOUND)
            .bind(&name)
            .fetch_optional(self.db.pool())
            .await
            .map_err(backend)?;
            let backup = backup.filter(|b| !b.is_empty() && s.backed_up());
            w.push(self.inbound_write(s, backup.as_deref()).await?);
        }
        for s in &changes.outbound_group_sessions {
            w.push(Write::json(
                kind::OUTBOUND,
                s.room_id().as_str(),
                &s.pickle().await,
            )?);
        }
        for r in &changes.key_requests {
            w.push(Write::json(kind::KEY_REQUEST, r.request_id.as_str(), r)?.idx(r.info.as_key()));
        }
        Ok(w)
    }

    /// Brings what is cached up to date after `changes` were written.
    async fn refresh_caches(&self, changes: &Changes) {
        // A user whose devices were never read is loaded from the rows when first asked for.
        let devices = &changes.devices;
        if !(devices.new.is_empty() && devices.changed.is_empty() && devices.deleted.is_empty()) {
            let mut cache = self.devices.write().await;
            for d in devices.new.iter().chain(&devices.changed) {
                if let Some(known) = cache.get_mut(d.user_id()) {
                    known.insert(d.device_id().to_owned(), d.clone());
                }
            }
            for d in &devices.deleted {
                if let Some(known) = cache.get_mut(d.user_id()) {
                    known.remove(d.device_id());
                }
            }
        }
        let identities = &changes.identities;
        if !(identities.new.is_empty() && identities.changed.is_empty()) {
            let mut cache = self.identities.write().await;
            for i in identities.new.iter().chain(&identities.changed) {
                cache.insert(i.user_id().to_owned(), Some(i.clone()));
            }
        }
    }

    /// The store of `device` of `user`, sealed with `key`.
    pub fn new(db: SqlStore, key: SecretKey, user: &UserId, device: &DeviceId) -> Self {
        Self {
            db,
            key,
            device: format!("{user} {device}"),
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            leases: Arc::default(),
            devices: Default::default(),
            identities: Default::default(),
        }
    }

    /// Whether anything is stored for this device (an account was ever saved).
    pub async fn has_account(&self) -> Result<bool> {
        Ok(self.get(kind::ACCOUNT, "").await?.is_some())
    }

    fn ad(&self, kind: &str, name: &str) -> Vec<u8> {
        format!("crypto\0{}\0{kind}\0{name}", self.device).into_bytes()
    }

    fn open(&self, kind: &str, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.key
            .open(&self.ad(kind, name), sealed)
            .map_err(|_| CryptoStoreError::UnpicklingError)
    }

    async fn get(&self, kind: &str, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT sealed FROM crypto_item WHERE device = $1 AND kind = $2 AND name = $3",
        )
        .bind(&self.device)
        .bind(kind)
        .bind(name)
        .fetch_optional(self.db.pool())
        .await
        .map_err(backend)?;
        sealed.map(|s| self.open(kind, name, &s)).transpose()
    }

    async fn get_json<T: DeserializeOwned>(&self, kind: &str, name: &str) -> Result<Option<T>> {
        match self.get(kind, name).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every row of a kind, or those whose `idx` is `idx`.
    async fn list(&self, kind: &str, idx: Option<&str>) -> Result<Vec<Row>> {
        let rows = match idx {
            Some(idx) => {
                sqlx::query(
                    "SELECT name, backup, sealed FROM crypto_item \
                 WHERE device = $1 AND kind = $2 AND idx = $3 ORDER BY name",
                )
                .bind(&self.device)
                .bind(kind)
                .bind(idx)
                .fetch_all(self.db.pool())
                .await
            }
            None => {
                sqlx::query(
                    "SELECT name, backup, sealed FROM crypto_item \
                 WHERE device = $1 AND kind = $2 ORDER BY name",
                )
                .bind(&self.device)
                .bind(kind)
                .fetch_all(self.db.pool())
                .await
            }
        }
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let name: String = r.try_get("name").map_err(backend)?;
                let backup: String = r.try_get("backup").map_err(backend)?;
                let sealed: Vec<u8> = r.try_get("sealed").map_err(backend)?;
                let value = self.open(kind, &name, &sealed)?;
                Ok(Row { backup, value })
            })
            .collect()
    }

    async fn list_json<T: DeserializeOwned>(
        &self,
        kind: &str,
        idx: Option<&str>,
    ) -> Result<Vec<T>> {
        self.list(kind, idx)
            .await?
            .iter()
            .map(|r| Ok(serde_json::from_slice(&r.value)?))
            .collect()
    }

    /// Writes rows in one transaction (a single row, the common case of a message's ratchet
    /// step, is one statement, atomic on its own, without BEGIN and COMMIT).
    async fn write(&self, mut writes: Vec<Write>) -> Result<()> {
        match writes.len() {
            0 => Ok(()),
            1 => {
                let mut conn = self.db.pool().acquire().await.map_err(backend)?;
                match writes.pop() {
                    Some(w) => self.write_one(&mut conn, w).await,
                    None => Ok(()),
                }
            }
            _ => {
                let mut conn = self.db.pool().acquire().await.map_err(backend)?;
                let mut tx = conn.begin().await.map_err(backend)?;
                for w in writes {
                    self.write_one(&mut tx, w).await?;
                }
                tx.commit().await.map_err(backend)
            }
        }
    }

    async fn write_one(&self, conn: &mut sqlx::AnyConnection, w: Write) -> Result<()> {
        match w.value {
            Some(v) => {
                let sealed = self.key.seal(&self.ad(w.kind, &w.name), &v);
                sqlx::query(
                    "INSERT INTO crypto_item (device, kind, name, idx, backup, sealed) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (device, kind, name) DO UPDATE SET \
                     idx = excluded.idx, backup = excluded.backup, sealed = excluded.sealed",
                )
                .bind(&self.device)
                .bind(w.kind)
                .bind(&w.name)
                .bind(&w.idx)
                .bind(&w.backup)
                .bind(sealed)
                .execute(conn)
                .await
                .map_err(backend)?;
            }
            None => {
                sqlx::query(
                    "DELETE FROM crypto_item WHERE device = $1 AND kind = $2 AND name = $3",
                )
                .bind(&self.device)
                .bind(w.kind)
                .bind(&w.name)
                .execute(conn)
                .await
                .map_err(backend)?;
            }
        }
        Ok(())
    }

    async fn inbound_write(
        &self,
        s: &InboundGroupSession,
        backed_up_to: Option<&str>,
    ) -> Result<Write> {
        let pickle = s.pickle().await;
        Ok(Write::json(
            kind::INBOUND,
            pair(s.room_id().as_str(), s.session_id()),
            &pickle,
        )?
        .idx(s.room_id().as_str())
        .backup(backed_up_to))
    }

    fn inbound(row: &Row) -> Result<InboundGroupSession> {
        let pickle: PickledInboundGroupSession = serde_json::from_slice(&row.value)?;
        Ok(InboundGroupSession::from_pickle(pickle)?)
    }

    async fn inbound_rows(&self, room: Option<&RoomId>) -> Result<Vec<Row>> {
        self.list(kind::INBOUND, room.map(RoomId::as_str)).await
    }
}

/// The writes of the rest of `changes`: identities, devices, withheld sessions, room settings,
/// secrets, the sync token and room key bundles.
fn state_writes(changes: &Changes, w: &mut Vec<Write>) -> Result<()> {
    let identities = &changes.identities;
    for i in identities.new.iter().chain(&identities.changed) {
        w.push(Write::json(kind::USER_IDENTITY, i.user_id().as_str(), i)?);
    }
    let devices = &changes.devices;
    for d in devices.new.iter().chain(&devices.changed) {
        w.push(
            Write::json(
                kind::DEVICE,
                pair(d.user_id().as_str(), d.device_id().as_str()),
                d,
            )?
            .idx(d.user_id().as_str()),
        );
    }
    for d in &devices.deleted {
        w.push(Write::delete(
            kind::DEVICE,
            pair(d.user_id().as_str(), d.device_id().as_str()),
        ));
    }
    for (room, sessions) in &changes.withheld_session_info {
        for (session, entry) in sessions {
            w.push(
                Write::json(kind::WITHHELD, pair(room.as_str(), session), entry)?
                    .idx(room.as_str()),
            );
        }
    }
    for (room, settings) in &changes.room_settings {
        w.push(Write::json(kind::ROOM_SETTINGS, room.as_str(), settings)?);
    }
    for s in &changes.secrets {
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(s.secret.as_bytes()));
        w.push(
            Write::put(
                kind::SECRET,
                pair(s.secret_name.as_str(), &digest),
                s.secret.as_bytes().to_vec(),
            )
            .idx(s.secret_name.as_str()),
        );
    }
    if let Some(token) = &changes.next_batch_token {
        w.push(Write::put(kind::NEXT_BATCH, "", token.as_bytes().to_vec()));
    }
    for b in &changes.received_room_key_bundles {
        w.push(Write::json(
            kind::BUNDLE,
            pair(b.bundle_data.room_id.as_str(), b.sender_user.as_str()),
            b,
        )?);
    }
    for room in &changes.room_key_backups_fully_downloaded {
        w.push(Write::put(kind::DOWNLOADED, room.as_str(), vec![1]));
    }
    for (room, details) in &changes.rooms_pending_key_bundle {
        w.push(match details {
            Some(d) => Write::json(kind::PENDING_BUNDLE, room.as_str(), d)?,
            None => Write::delete(kind::PENDING_BUNDLE, room.as_str()),
        });
    }
    Ok(())
}

#[async_trait::async_trait]
impl CryptoStore for DbCryptoStore {
    type Error = CryptoStoreError;

    async fn load_account(&self) -> Result<Option<Account>> {
        match self.get_json::<PickledAccount>(kind::ACCOUNT, "").await? {
            Some(p) => Ok(Some(Account::from_pickle(p)?)),
            None => Ok(None),
        }
    }

    async fn load_identity(&self) -> Result<Option<PrivateCrossSigningIdentity>> {
        match self
            .get_json::<PickledCrossSigningIdentity>(kind::IDENTITY, "")
            .await?
        {
            Some(p) => Ok(Some(
                PrivateCrossSigningIdentity::from_pickle(p)
                    .map_err(|_| CryptoStoreError::UnpicklingError)?,
            )),
            None => Ok(None),
        }
    }

    async fn save_pending_changes(&self, changes: PendingChanges) -> Result<()> {
        let mut w = Vec::new();
        if let Some(account) = changes.account {
            w.push(Write::json(kind::ACCOUNT, "", &account.pickle())?);
        }
        self.write(w).await
    }

    async fn save_changes(&self, changes: Changes) -> Result<()> {
        let mut w = self.key_writes(&changes).await?;
        state_writes(&changes, &mut w)?;
        self.write(w).await?;
        self.refresh_caches(&changes).await;
        Ok(())
    }

    async fn save_inbound_group_sessions(
        &self,
        sessions: Vec<InboundGroupSession>,
        backed_up_to_version: Option<&str>,
    ) -> Result<()> {
        let mut w = Vec::with_capacity(sessions.len());
        for s in &sessions {
            w.push(self.inbound_write(s, backed_up_to_version).await?);
        }
        self.write(w).await
    }

    async fn get_sessions(&self, sender_key: &str) -> Result<Option<Vec<Session>>> {
        let rows = self.list(kind::SESSION, Some(sender_key)).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let own = self.get_own_device().await?.as_device_keys().clone();
        rows.iter()
            .map(|r| {
                let pickle: PickledSession = serde_json::from_slice(&r.value)?;
                Session::from_pickle(own.clone(), pickle)
                    .map_err(|_| CryptoStoreError::UnpicklingError)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    async fn get_inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSession>> {
        match self
            .get_json::<PickledInboundGroupSession>(
                kind::INBOUND,
                &pair(room_id.as_str(), session_id),
            )
            .await?
        {
            Some(p) => Ok(Some(InboundGroupSession::from_pickle(p)?)),
            None => Ok(None),
        }
    }

    async fn get_withheld_info(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<RoomKeyWithheldEntry>> {
        self.get_json(kind::WITHHELD, &pair(room_id.as_str(), session_id))
            .await
    }

    async fn get_withheld_sessions_by_room_id(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<RoomKeyWithheldEntry>> {
        self.list_json(kind::WITHHELD, Some(room_id.as_str())).await
    }

    async fn get_inbound_group_sessions(&self) -> Result<Vec<InboundGroupSession>> {
        self.inbound_rows(None)
            .await?
            .iter()
            .map(Self::inbound)
            .collect()
    }

    async fn inbound_group_session_counts(
        &self,
        backup_version: Option<&str>,
    ) -> Result<RoomKeyCounts> {
        // Counted in SQL: nothing needs opening.
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             COALESCE(SUM(CASE WHEN backup = $3 THEN 1 ELSE 0 END), 0) AS backed_up \
             FROM crypto_item WHERE device = $1 AND kind = $2",
        )
        .bind(&self.device)
        .bind(kind::INBOUND)
        .bind(backup_version.unwrap_or_default())
        .fetch_one(self.db.pool())
        .await
        .map_err(backend)?;
        let total: i64 = row.try_get("total").map_err(backend)?;
        let backed_up: i64 = row.try_get("backed_up").map_err(backend)?;
        let backed_up = if backup_version.is_some() {
            backed_up
        } else {
            0
        };
        Ok(RoomKeyCounts {
            total: total as usize,
            backed_up: backed_up as usize,
        })
    }

    async fn get_inbound_group_sessions_by_room_id(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inbound_rows(Some(room_id))
            .await?
            .iter()
            .map(Self::inbound)
            .collect()
    }

    async fn get_inbound_group_sessions_for_device_batch(
        &self,
        curve_key: Curve25519PublicKey,
        sender_data_type: SenderDataType,
        after_session_id: Option<String>,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        let mut sessions: Vec<InboundGroupSession> = self
            .get_inbound_group_sessions()
            .await?
            .into_iter()
            .filter(|s| s.sender_key() == curve_key && s.sender_data.to_type() == sender_data_type)
            .collect();
        sessions.sort_by(|a, b| a.session_id().cmp(b.session_id()));
        Ok(sessions
            .into_iter()
            .filter(|s| {
                after_session_id
                    .as_deref()
                    .is_none_or(|after| s.session_id() > after)
            })
            .take(limit)
            .collect())
    }

    async fn inbound_group_sessions_for_backup(
        &self,
        backup_version: &str,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inbound_rows(None)
            .await?
            .iter()
            .filter(|r| r.backup != backup_version)
            .take(limit)
            .map(Self::inbound)
            .collect()
    }

    async fn mark_inbound_group_sessions_as_backed_up(
        &self,
        backup_version: &str,
        room_and_session_ids: &[(&RoomId, &str)],
    ) -> Result<()> {
        let mut w = Vec::new();
        for (room, session) in room_and_session_ids {
            if let Some(s) = self.get_inbound_group_session(room, session).await? {
                s.mark_as_backed_up();
                w.push(self.inbound_write(&s, Some(backup_version)).await?);
            }
        }
        self.write(w).await
    }

    async fn reset_backup_state(&self) -> Result<()> {
        // The backup version each session went to is kept: a session counts as backed up only
        // for that version, so nothing needs resetting.
        Ok(())
    }

    async fn load_backup_keys(&self) -> Result<BackupKeys> {
        let version = self
            .get(kind::BACKUP, "version")
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let key = match self.get(kind::BACKUP, "decryption_key").await? {
            Some(v) => Some(
                BackupDecryptionKey::from_base64(&String::from_utf8_lossy(&v))
                    .map_err(|_| CryptoStoreError::UnpicklingError)?,
            ),
            None => None,
        };
        Ok(BackupKeys {
            backup_version: version,
            decryption_key: key,
        })
    }

    async fn load_dehydrated_device_pickle_key(&self) -> Result<Option<DehydratedDeviceKey>> {
        match self.get(kind::DEHYDRATED, "").await? {
            Some(v) => Ok(Some(
                matrix_sdk_crypto::vodozemac::base64_decode(String::from_utf8_lossy(&v).as_ref())
                    .ok()
                    .and_then(|b| DehydratedDeviceKey::from_slice(&b).ok())
                    .ok_or(CryptoStoreError::UnpicklingError)?,
            )),
            None => Ok(None),
        }
    }

    async fn delete_dehydrated_device_pickle_key(&self) -> Result<()> {
        self.write(vec![Write::delete(kind::DEHYDRATED, "")]).await
    }

    async fn get_outbound_group_session(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<OutboundGroupSession>> {
        let Some(pickle) = self
            .get_json::<PickledOutboundGroupSession>(kind::OUTBOUND, room_id.as_str())
            .await?
        else {
            return Ok(None);
        };
        let account = self
            .load_account()
            .await?
            .ok_or(CryptoStoreError::AccountUnset)?;
        Ok(Some(OutboundGroupSession::from_pickle(
            self.device_id.clone(),
            account.static_data().identity_keys.clone(),
            pickle,
        )?))
    }

    async fn load_tracked_users(&self) -> Result<Vec<TrackedUser>> {
        self.list_json(kind::TRACKED, None).await
    }

    async fn save_tracked_users(&self, users: &[(&UserId, bool)]) -> Result<()> {
        let w = users
            .iter()
            .map(|(user, dirty)| {
                Write::json(
                    kind::TRACKED,
                    user.as_str(),
                    &TrackedUser {
                        user_id: (*user).to_owned(),
                        dirty: *dirty,
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(w).await
    }

    async fn get_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Option<DeviceData>> {
        Ok(self.get_user_devices(user_id).await?.remove(device_id))
    }

    async fn get_user_devices(
        &self,
        user_id: &UserId,
    ) -> Result<HashMap<OwnedDeviceId, DeviceData>> {
        if let Some(known) = self.devices.read().await.get(user_id) {
            return Ok(known.clone());
        }
        let mut cache = self.devices.write().await;
        if let Some(known) = cache.get(user_id) {
            return Ok(known.clone());
        }
        let loaded: HashMap<OwnedDeviceId, DeviceData> = self
            .list_json::<DeviceData>(kind::DEVICE, Some(user_id.as_str()))
            .await?
            .into_iter()
            .map(|d| (d.device_id().to_owned(), d))
            .collect();
        cache.insert(user_id.to_owned(), loaded.clone());
        Ok(loaded)
    }

    async fn get_own_device(&self) -> Result<DeviceData> {
        if let Some(d) = self.get_device(&self.user_id, &self.device_id).await? {
            return Ok(d);
        }
        let account = self
            .load_account()
            .await?
            .ok_or(CryptoStoreError::AccountUnset)?;
        Ok(DeviceData::from_account(&account))
    }

    async fn get_user_identity(&self, user_id: &UserId) -> Result<Option<UserIdentityData>> {
        if let Some(known) = self.identities.read().await.get(user_id) {
            return Ok(known.clone());
        }
        let loaded: Option<UserIdentityData> =
            self.get_json(kind::USER_IDENTITY, user_id.as_str()).await?;
        // A newer identity saved meanwhile stays.
        let mut cache = self.identities.write().await;
        Ok(cache.entry(user_id.to_owned()).or_insert(loaded).clone())
    }

    async fn is_message_known(&self, message_hash: &OlmMessageHash) -> Result<bool> {
        Ok(self
            .get(
                kind::MESSAGE_HASH,
                &pair(&message_hash.sender_key, &message_hash.hash),
            )
            .await?
            .is_some())
    }

    async fn get_outgoing_secret_requests(
        &self,
        request_id: &TransactionId,
    ) -> Result<Option<GossipRequest>> {
        self.get_json(kind::KEY_REQUEST, request_id.as_str()).await
    }

    async fn get_secret_request_by_info(
        &self,
        secret_info: &SecretInfo,
    ) -> Result<Option<GossipRequest>> {
        Ok(self
            .list_json::<GossipRequest>(kind::KEY_REQUEST, Some(&secret_info.as_key()))
            .await?
            .into_iter()
            .next())
    }

    async fn get_unsent_secret_requests(&self) -> Result<Vec<GossipRequest>> {
        Ok(self
            .list_json::<GossipRequest>(kind::KEY_REQUEST, None)
            .await?
            .into_iter()
            .filter(|r| !r.sent_out)
            .collect())
    }

    async fn delete_outgoing_secret_requests(&self, request_id: &TransactionId) -> Result<()> {
        self.write(vec![Write::delete(kind::KEY_REQUEST, request_id.as_str())])
            .await
    }

    async fn get_secrets_from_inbox(
        &self,
        secret_name: &SecretName,
    ) -> Result<Vec<Zeroizing<String>>> {
        Ok(self
            .list(kind::SECRET, Some(secret_name.as_str()))
            .await?
            .iter()
            .map(|r| Zeroizing::new(String::from_utf8_lossy(&r.value).into_owned()))
            .collect())
    }

    async fn delete_secrets_from_inbox(&self, secret_name: &SecretName) -> Result<()> {
        sqlx::query("DELETE FROM crypto_item WHERE device = $1 AND kind = $2 AND idx = $3")
            .bind(&self.device)
            .bind(kind::SECRET)
            .bind(secret_name.as_str())
            .execute(self.db.pool())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn get_room_settings(&self, room_id: &RoomId) -> Result<Option<RoomSettings>> {
        self.get_json(kind::ROOM_SETTINGS, room_id.as_str()).await
    }

    async fn get_received_room_key_bundle_data(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<StoredRoomKeyBundleData>> {
        self.get_json(kind::BUNDLE, &pair(room_id.as_str(), user_id.as_str()))
            .await
    }

    async fn get_pending_key_bundle_details_for_room(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<RoomPendingKeyBundleDetails>> {
        self.get_json(kind::PENDING_BUNDLE, room_id.as_str()).await
    }

    async fn get_all_rooms_pending_key_bundles(&self) -> Result<Vec<RoomPendingKeyBundleDetails>> {
        self.list_json(kind::PENDING_BUNDLE, None).await
    }

    async fn has_downloaded_all_room_keys(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self
            .get(kind::DOWNLOADED, room_id.as_str())
            .await?
            .is_some())
    }

    async fn get_custom_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get(kind::CUSTOM, key).await?.map(|v| v.to_vec()))
    }

    async fn set_custom_value(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.write(vec![Write::put(kind::CUSTOM, key, value)]).await
    }

    async fn remove_custom_value(&self, key: &str) -> Result<()> {
        self.write(vec![Write::delete(kind::CUSTOM, key)]).await
    }

    async fn try_take_leased_lock(
        &self,
        lease_duration_ms: u32,
        key: &str,
        holder: &str,
    ) -> Result<Option<CrossProcessLockGeneration>> {
        // One process holds each device (the bridge does not share a device between workers).
        let mut leases = self.leases.write().unwrap_or_else(|p| p.into_inner());
        Ok(try_take_leased_lock(
            &mut leases,
            lease_duration_ms,
            key,
            holder,
        ))
    }

    async fn next_batch_token(&self) -> Result<Option<String>> {
        Ok(self
            .get(kind::NEXT_BATCH, "")
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    async fn reopen(&self) -> Result<()> {
        Ok(())
    }

    async fn get_size(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use matrix_sdk_crypto::{
        DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
        TrustRequirement,
        types::requests::{AnyOutgoingRequest, ToDeviceRequest},
    };
    use ruma::{
        OneTimeKeyAlgorithm, OwnedRoomId, UInt,
        api::client::{
            keys::{claim_keys, get_keys, upload_keys},
            sync::sync_events::DeviceLists,
            to_device::send_event_to_device,
        },
        serde::Raw,
    };
    use serde_json::{Value, json};

    use super::*;

    on_both_databases!(owned
        two_devices_talk_and_keep_their_keys_across_restarts,
        rows_are_sealed_and_bound_to_their_place,
        lookups_by_user_request_and_secret_name,
    );

    fn user(s: &str) -> OwnedUserId {
        OwnedUserId::try_from(s).expect("user id")
    }

    async fn machine(db: &SqlStore, key: &SecretKey, u: &str, d: &str) -> OlmMachine {
        let (u, d) = (user(u), OwnedDeviceId::from(d));
        let store = DbCryptoStore::new(db.clone(), key.clone(), &u, &d);
        OlmMachine::with_store(&u, &d, store, None)
            .await
            .expect("machine")
    }

    /// Answers the machine's key upload; returns its device keys and one one-time key.
    async fn upload(
        m: &OlmMachine,
    ) -> (
        Raw<ruma::encryption::DeviceKeys>,
        (ruma::OwnedOneTimeKeyId, Raw<ruma::encryption::OneTimeKey>),
    ) {
        let mut out = None;
        for r in m.outgoing_requests().await.expect("requests") {
            if let AnyOutgoingRequest::KeysUpload(up) = r.request() {
                let otk = up
                    .one_time_keys
                    .iter()
                    .next()
                    .map(|(k, v)| (k.clone(), v.clone()));
                out = Some((
                    up.device_keys.clone().expect("device keys"),
                    otk.expect("otk"),
                ));
                let counts =
                    BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, UInt::from(50u32))]);
                m.mark_request_as_sent(r.request_id(), &upload_keys::v3::Response::new(counts))
                    .await
                    .expect("mark upload");
            }
        }
        out.expect("a key upload")
    }

    /// The to-device events a share produces, as the recipient receives them.
    fn delivered(
        from: &UserId,
        reqs: &[std::sync::Arc<ToDeviceRequest>],
    ) -> Vec<Raw<ruma::events::AnyToDeviceEvent>> {
        reqs.iter()
            .flat_map(|td| {
                td.messages.values().flat_map(|by_device| by_device.values()).map(|content| {
                    let content: Value = content.deserialize_as().expect("content");
                    Raw::new(&json!({"sender": from, "type": td.event_type.to_string(), "content": content}))
                        .expect("raw")
                        .cast_unchecked()
                })
            })
            .collect()
    }

    async fn receive(m: &OlmMachine, events: Vec<Raw<ruma::events::AnyToDeviceEvent>>) {
        let lists = DeviceLists::new();
        let counts = BTreeMap::new();
        m.receive_sync_changes(
            EncryptionSyncChanges {
                to_device_events: events,
                changed_devices: &lists,
                one_time_keys_counts: &counts,
                unused_fallback_keys: None,
                next_batch_token: None,
            },
            &settings(),
        )
        .await
        .expect("receive");
    }

    fn settings() -> DecryptionSettings {
        DecryptionSettings {
            sender_device_trust_requirement: TrustRequirement::Untrusted,
        }
    }

    async fn encrypt(m: &OlmMachine, room: &OwnedRoomId, body: &str) -> (Value, String) {
        let content = Raw::new(&json!({"msgtype": "m.text", "body": body}))
            .expect("raw")
            .cast_unchecked();
        let enc = m
            .encrypt_room_event_raw(room, "m.room.message", &content)
            .await
            .expect("encrypt");
        let c: Value = enc.content.deserialize_as().expect("content");
        let session = c["session_id"].as_str().expect("session").to_owned();
        (
            json!({"type": "m.room.encrypted", "sender": m.user_id(), "event_id": format!("${body}"),
                "origin_server_ts": 1, "room_id": room, "content": c}),
            session,
        )
    }

    async fn decrypt(m: &OlmMachine, room: &OwnedRoomId, ev: &Value) -> String {
        let raw = Raw::new(ev).expect("raw").cast_unchecked();
        let d = m
            .decrypt_room_event(&raw, room, &settings())
            .await
            .expect("decrypt");
        let v: Value = d.event.deserialize_as().expect("event");
        v["content"]["body"].as_str().expect("body").to_owned()
    }

    /// Two machines on one database, as the bot and a ghost share it: an Olm session and a Megolm
    /// session between them, then both restarted from the database with everything kept.
    async fn two_devices_talk_and_keep_their_keys_across_restarts(db: SqlStore) {
        let key = SecretKey::random();
        let room: OwnedRoomId = "!room:x".try_into().expect("room");
        let alice = machine(&db, &key, "@alice:x", "ALICE").await;
        let bob = machine(&db, &key, "@bob:x", "BOB").await;
        let (alice_keys, alice_otk) = upload(&alice).await;
        upload(&bob).await;

        // Bob learns Alice's device and claims a one-time key of hers.
        bob.update_tracked_users([alice.user_id()])
            .await
            .expect("track");
        for r in bob.outgoing_requests().await.expect("requests") {
            if let AnyOutgoingRequest::KeysQuery(_) = r.request() {
                let mut resp = get_keys::v3::Response::new();
                resp.device_keys = BTreeMap::from([(
                    alice.user_id().to_owned(),
                    BTreeMap::from([(alice.device_id().to_owned(), alice_keys.clone())]),
                )]);
                bob.mark_request_as_sent(r.request_id(), &resp)
                    .await
                    .expect("query");
            }
        }
        let (txn, _) = bob
            .get_missing_sessions([alice.user_id()].into_iter())
            .await
            .expect("missing")
            .expect("a claim");
        let claim = claim_keys::v3::Response::new(BTreeMap::from([(
            alice.user_id().to_owned(),
            BTreeMap::from([(alice.device_id().to_owned(), BTreeMap::from([alice_otk]))]),
        )]));
        bob.mark_request_as_sent(&txn, &claim).await.expect("claim");

        // A room key over Olm, then a Megolm message.
        let shares = bob
            .share_room_key(
                &room,
                [alice.user_id()].into_iter(),
                EncryptionSettings::default(),
            )
            .await
            .expect("share");
        for td in &shares {
            bob.mark_request_as_sent(&td.txn_id, &send_event_to_device::v3::Response::new())
                .await
                .expect("mark");
        }
        receive(&alice, delivered(bob.user_id(), &shares)).await;
        let (first, session) = encrypt(&bob, &room, "first").await;
        assert_eq!(decrypt(&alice, &room, &first).await, "first");

        // Both restart from the database.
        let (alice_id, bob_id) = (alice.identity_keys(), bob.identity_keys());
        drop((alice, bob));
        let alice = machine(&db, &key, "@alice:x", "ALICE").await;
        let bob = machine(&db, &key, "@bob:x", "BOB").await;
        assert_eq!(alice.identity_keys().curve25519, alice_id.curve25519);
        assert_eq!(bob.identity_keys().ed25519, bob_id.ed25519);
        let (second, same) = encrypt(&bob, &room, "second").await;
        assert_eq!(same, session, "the outbound Megolm session is kept");
        assert_eq!(decrypt(&alice, &room, &second).await, "second");

        // The Olm session is kept too: Bob's next room key goes over the same session (Alice
        // still has one session with Bob's device, not two).
        bob.discard_room_key(&room).await.expect("discard");
        let shares = bob
            .share_room_key(
                &room,
                [alice.user_id()].into_iter(),
                EncryptionSettings::default(),
            )
            .await
            .expect("share again");
        receive(&alice, delivered(bob.user_id(), &shares)).await;
        let (third, new_session) = encrypt(&bob, &room, "third").await;
        assert_ne!(new_session, session);
        assert_eq!(decrypt(&alice, &room, &third).await, "third");
        let alice_store =
            DbCryptoStore::new(db.clone(), key.clone(), &user("@alice:x"), "ALICE".into());
        let with_bob = alice_store
            .get_sessions(&bob_id.curve25519.to_base64())
            .await
            .expect("sessions")
            .expect("one");
        assert_eq!(with_bob.len(), 1, "one Olm session between them");

        // The inbound Megolm sessions, by room and for backups.
        let store = alice_store;
        assert_eq!(
            store
                .get_inbound_group_sessions_by_room_id(&room)
                .await
                .expect("by room")
                .len(),
            2
        );
        let counts = store
            .inbound_group_session_counts(Some("1"))
            .await
            .expect("counts");
        assert_eq!((counts.total, counts.backed_up), (2, 0));
        store
            .mark_inbound_group_sessions_as_backed_up("1", &[(&room, session.as_str())])
            .await
            .expect("mark");
        let counts = store
            .inbound_group_session_counts(Some("1"))
            .await
            .expect("counts");
        assert_eq!((counts.total, counts.backed_up), (2, 1));
        assert_eq!(
            store
                .inbound_group_sessions_for_backup("1", 10)
                .await
                .expect("backup")
                .len(),
            1
        );
        assert_eq!(
            store
                .inbound_group_sessions_for_backup("2", 10)
                .await
                .expect("backup")
                .len(),
            2
        );
    }

    /// No key material or identifier in clear in a sealed value, and a value moved to another
    /// row (another device, kind or name) does not open.
    async fn rows_are_sealed_and_bound_to_their_place(db: SqlStore) {
        use sqlx::Row as _;
        let key = SecretKey::random();
        let m = machine(&db, &key, "@alice:x", "ALICE").await;
        let curve = m.identity_keys().curve25519.to_base64();
        let rows = sqlx::query("SELECT device, kind, name, sealed FROM crypto_item")
            .fetch_all(db.pool())
            .await
            .expect("rows");
        assert!(!rows.is_empty());
        for r in &rows {
            let sealed: Vec<u8> = r.try_get("sealed").expect("sealed");
            let text = String::from_utf8_lossy(&sealed);
            assert!(
                !text.contains(&curve) && !text.contains("@alice:x") && !text.contains("pickle")
            );
        }
        let account: Vec<u8> =
            sqlx::query_scalar("SELECT sealed FROM crypto_item WHERE device = $1 AND kind = $2")
                .bind("@alice:x ALICE")
                .bind(kind::ACCOUNT)
                .fetch_one(db.pool())
                .await
                .expect("account row");
        sqlx::query("INSERT INTO crypto_item (device, kind, name, sealed) VALUES ($1, $2, '', $3)")
            .bind("@mallory:x MALLORY")
            .bind(kind::ACCOUNT)
            .bind(&account)
            .execute(db.pool())
            .await
            .expect("copy");
        let mallory = DbCryptoStore::new(
            db.clone(),
            key.clone(),
            &user("@mallory:x"),
            "MALLORY".into(),
        );
        assert!(
            mallory.load_account().await.is_err(),
            "a copied row does not open"
        );
        let other_key = DbCryptoStore::new(
            db.clone(),
            SecretKey::random(),
            &user("@alice:x"),
            "ALICE".into(),
        );
        assert!(
            other_key.load_account().await.is_err(),
            "nor with another key"
        );
    }

    async fn lookups_by_user_request_and_secret_name(db: SqlStore) {
        let key = SecretKey::random();
        let m = machine(&db, &key, "@alice:x", "ALICE").await;
        let store = DbCryptoStore::new(db.clone(), key.clone(), &user("@alice:x"), "ALICE".into());
        let own = store.get_own_device().await.expect("own device");
        assert_eq!(own.device_id(), m.device_id());
        assert_eq!(
            store
                .get_user_devices(m.user_id())
                .await
                .expect("devices")
                .len(),
            1
        );
        assert!(
            store
                .get_user_devices(&user("@bob:x"))
                .await
                .expect("none")
                .is_empty()
        );

        store
            .save_tracked_users(&[(&user("@bob:x"), true), (&user("@carol:x"), false)])
            .await
            .expect("track");
        store
            .save_tracked_users(&[(&user("@bob:x"), false)])
            .await
            .expect("clean");
        let mut tracked = store.load_tracked_users().await.expect("tracked");
        tracked.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        assert_eq!(tracked.len(), 2);
        assert!(tracked.iter().all(|t| !t.dirty));

        let secret = SecretName::from("m.cross_signing.master");
        let changes = Changes {
            secrets: vec![matrix_sdk_crypto::store::types::SecretsInboxItem {
                secret_name: secret.clone(),
                secret: Zeroizing::new("s3cret".to_owned()),
            }],
            ..Default::default()
        };
        store.save_changes(changes).await.expect("save");
        assert_eq!(
            store.get_secrets_from_inbox(&secret).await.expect("inbox")[0].as_str(),
            "s3cret"
        );
        store
            .delete_secrets_from_inbox(&secret)
            .await
            .expect("delete");
        assert!(
            store
                .get_secrets_from_inbox(&secret)
                .await
                .expect("inbox")
                .is_empty()
        );

        store
            .set_custom_value("k", b"v".to_vec())
            .await
            .expect("set");
        assert_eq!(
            store.get_custom_value("k").await.expect("get"),
            Some(b"v".to_vec())
        );
        store.remove_custom_value("k").await.expect("remove");
        assert_eq!(store.get_custom_value("k").await.expect("get"), None);
        assert!(store.next_batch_token().await.expect("token").is_none());
    }
}
