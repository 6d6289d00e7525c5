//! The network connector: the bridge core's [`Network`] over our interop client. Each login's
//! events are handed to the core one at a time, in order, and acked once the core handled them.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    AccountHandle, Event, GatewayAddr, GatewayConn, InteropError, SignalRuntime, Target,
    account::{self, save_credentials},
};
use crate::{
    bridge::network::{
        GroupChange, GroupInfo, NetAccount, NetError, NetEvent, NetEventSink, NetProfile,
        NetTarget, Network, UploadedMedia,
    },
    vault::{Vault, VaultStore},
    wire::{
        content::DataMessage,
        pb::{self, ErrorCode},
    },
};

fn net_err(e: InteropError) -> NetError {
    // Rate limits, full queues and the gateway's internal errors pass: retry them.
    if e.is_transient() {
        return NetError::Unavailable(e.to_string());
    }
    match e.code() {
        Some(ErrorCode::BadCode) => NetError::BadCode,
        Some(ErrorCode::CodeExpired) => NetError::CodeExpired,
        Some(ErrorCode::NotFound) => NetError::NotFound(e.to_string()),
        Some(_) => NetError::Refused(e.to_string()),
        None if e.is_transient() => NetError::Unavailable(e.to_string()),
        None => NetError::Other(e.to_string()),
    }
}

pub struct InteropNetwork {
    rt: SignalRuntime,
    gateway: GatewayAddr,
    vault: Vault,
    db: Arc<dyn VaultStore>,
    accounts: Mutex<HashMap<String, Arc<InteropAccount>>>,
    sink: OnceLock<Weak<dyn NetEventSink>>,
}

impl InteropNetwork {
    pub fn new(
        rt: SignalRuntime,
        gateway: GatewayAddr,
        vault: Vault,
        db: Arc<dyn VaultStore>,
    ) -> Arc<Self> {
        Arc::new(Self {
            rt,
            gateway,
            vault,
            db,
            accounts: Mutex::new(HashMap::new()),
            sink: OnceLock::new(),
        })
    }

    /// Where events go; set once, after the core exists.
    pub fn set_sink(&self, sink: Weak<dyn NetEventSink>) {
        let _ = self.sink.set(sink);
    }

    async fn start(&self, mxid: &str) -> Result<Arc<dyn NetAccount>, NetError> {
        let old = self.accounts.lock().expect("lock").remove(mxid);
        if let Some(old) = old {
            old.handle.stop().await;
        }
        let (tx, rx) = mpsc::channel(256);
        let handle = account::spawn_account(
            &self.rt,
            mxid,
            self.gateway.clone(),
            self.vault.clone(),
            self.db.clone(),
            tx,
        )
        .await
        .map_err(net_err)?;
        let acc = Arc::new(InteropAccount {
            handle,
            connected: Arc::new(AtomicBool::new(false)),
        });
        self.accounts
            .lock()
            .expect("lock")
            .insert(mxid.to_owned(), acc.clone());
        let sink = self.sink.get().cloned();
        tokio::spawn(pump(mxid.to_owned(), acc.clone(), rx, sink));
        Ok(acc)
    }
}

/// Avatars larger than this are not downloaded (they are shown as no avatar).
const MAX_AVATAR_BYTES: u64 = 10 * 1024 * 1024;

fn group_info(g: pb::Group) -> GroupInfo {
    GroupInfo {
        id: g.id,
        name: g.name,
        members: g.members,
        changed_by: g.changed_by,
        avatar_blob: g.avatar_blob,
    }
}

/// Hands one login's events to the core in order; acks each after it was handled.
async fn pump(
    mxid: String,
    acc: Arc<InteropAccount>,
    mut rx: mpsc::Receiver<Event>,
    sink: Option<Weak<dyn NetEventSink>>,
) {
    while let Some(ev) = rx.recv().await {
        let Some(ev) = convert(ev) else { continue };
        match &ev {
            NetEvent::Connected => acc.connected.store(true, Ordering::Relaxed),
            NetEvent::Disconnected { .. } | NetEvent::LoggedOut { .. } => {
                acc.connected.store(false, Ordering::Relaxed)
            }
            _ => {}
        }
        let Some(sink) = sink.as_ref().and_then(Weak::upgrade) else {
            return;
        };
        let mut delay = Duration::from_millis(200);
        let mut handled = false;
        for attempt in 1..=6 {
            match sink.handle_network_event(&mxid, &ev).await {
                Ok(()) => {
                    handled = true;
                    break;
                }
                Err(e) if e.is_retryable() && attempt < 6 => {
                    tracing::warn!(attempt, error = %e, "bridging an interop event failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, "giving up on an interop event");
                    break;
                }
            }
        }
        if let Some(id) = ev.envelope_id() {
            if handled {
                acc.handle.ack(id).await;
            } else {
                // Not acked: the gateway delivers it again after the next reconnect.
                tracing::warn!(
                    envelope = id,
                    "interop event left unacknowledged for redelivery"
                );
            }
        }
    }
}

fn convert(ev: Event) -> Option<NetEvent> {
    Some(match ev {
        Event::Connected { .. } => NetEvent::Connected,
        Event::Disconnected { reason, .. } => NetEvent::Disconnected { reason },
        Event::LoggedOut { reason, .. } => NetEvent::LoggedOut { reason },
        Event::Message {
            envelope_id,
            from,
            group,
            message_id,
            timestamp,
            data,
        } => NetEvent::Message {
            envelope_id,
            from,
            group,
            message_id,
            timestamp,
            data,
        },
        Event::Receipt {
            envelope_id,
            from,
            receipt,
        } => NetEvent::Receipt {
            envelope_id,
            from,
            group: (!receipt.group.is_empty()).then_some(receipt.group),
            read: receipt.r#type == pb::ReceiptType::Read as i32,
            message_ids: receipt.message_ids,
        },
        Event::GroupUpdate {
            envelope_id,
            from,
            group,
        } => NetEvent::GroupUpdate {
            envelope_id,
            from,
            group: group_info(group),
        },
        Event::Typing {
            from,
            group,
            typing,
        } => NetEvent::Typing {
            from,
            group,
            typing,
        },
        Event::IdentityChanged { peer } => NetEvent::IdentityChanged { peer },
        Event::Undecryptable {
            envelope_id,
            from,
            group,
            reason,
        } => NetEvent::Undecryptable {
            envelope_id,
            from,
            group,
            reason,
        },
        Event::Presence { .. } => return None,
    })
}

#[async_trait]
impl Network for InteropNetwork {
    async fn request_code(&self, account: &str) -> Result<(), NetError> {
        if !crate::wire::is_valid_account(account) {
            return Err(NetError::Refused(format!(
                "`{account}` is not an identifier: use + and 8 to 15 digits"
            )));
        }
        let (conn, _) = GatewayConn::connect(&self.gateway).await.map_err(net_err)?;
        conn.request_code(account).await.map_err(net_err)
    }

    async fn verify_and_connect(
        &self,
        mxid: &str,
        account: &str,
        code: &str,
    ) -> Result<Arc<dyn NetAccount>, NetError> {
        let (conn, _) = GatewayConn::connect(&self.gateway).await.map_err(net_err)?;
        let secret = conn.verify(account, code).await.map_err(net_err)?;
        save_credentials(&self.vault, &self.db, mxid, account, &secret)
            .await
            .map_err(net_err)?;
        self.start(mxid).await
    }

    async fn reconnect(&self, mxid: &str) -> Result<Arc<dyn NetAccount>, NetError> {
        self.start(mxid).await
    }

    async fn logout(&self, mxid: &str) -> Result<(), NetError> {
        let acc = self.accounts.lock().expect("lock").remove(mxid);
        if let Some(acc) = acc {
            acc.handle.stop().await;
        }
        self.vault
            .destroy(mxid)
            .await
            .map_err(|e| NetError::Other(e.to_string()))
    }

    fn account(&self, mxid: &str) -> Option<Arc<dyn NetAccount>> {
        self.accounts
            .lock()
            .expect("lock")
            .get(mxid)
            .map(|a| a.clone() as Arc<dyn NetAccount>)
    }

    fn any_account(&self) -> Option<Arc<dyn NetAccount>> {
        self.accounts
            .lock()
            .expect("lock")
            .values()
            .find(|a| a.is_connected())
            .map(|a| a.clone() as Arc<dyn NetAccount>)
    }

    async fn reachable(&self) -> bool {
        GatewayConn::connect(&self.gateway).await.is_ok()
    }
}

pub struct InteropAccount {
    handle: AccountHandle,
    connected: Arc<AtomicBool>,
}

fn target(t: NetTarget) -> Target {
    match t {
        NetTarget::Contact(a) => Target::Account(a),
        NetTarget::Group(g) => Target::Group(g),
    }
}

#[async_trait]
impl NetAccount for InteropAccount {
    fn account_id(&self) -> &str {
        &self.handle.account
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    async fn send(
        &self,
        to: NetTarget,
        message_id: String,
        data: DataMessage,
    ) -> Result<(), NetError> {
        self.handle
            .send(target(to), message_id, data)
            .await
            .map(|_| ())
            .map_err(net_err)
    }

    async fn receipt(
        &self,
        to: &str,
        group: Option<&str>,
        read: bool,
        message_ids: Vec<String>,
    ) -> Result<(), NetError> {
        let r#type = if read {
            pb::ReceiptType::Read
        } else {
            pb::ReceiptType::Delivered
        } as i32;
        self.handle
            .receipt(
                to.to_owned(),
                pb::Receipt {
                    r#type,
                    message_ids,
                    group: group.unwrap_or_default().to_owned(),
                },
            )
            .await
            .map_err(net_err)
    }

    async fn typing(&self, to: NetTarget, typing: bool) -> Result<(), NetError> {
        self.handle
            .typing(target(to), typing)
            .await
            .map_err(net_err)
    }

    async fn upload(&self, data: Vec<u8>) -> Result<UploadedMedia, NetError> {
        let (blob, sealed) = self.handle.upload(data).await.map_err(net_err)?;
        Ok(UploadedMedia {
            blob,
            key: sealed.key.to_vec(),
            sha256: sealed.sha256,
        })
    }

    async fn download(
        &self,
        blob: &str,
        key: &[u8],
        sha256: &[u8],
        max: u64,
    ) -> Result<Vec<u8>, NetError> {
        self.handle
            .download(blob.to_owned(), key.to_vec(), sha256.to_vec(), max)
            .await
            .map_err(net_err)
    }

    async fn create_group(&self, name: &str, members: Vec<String>) -> Result<GroupInfo, NetError> {
        let g = self
            .handle
            .create_group(name.to_owned(), members)
            .await
            .map_err(net_err)?;
        Ok(group_info(g))
    }

    async fn update_group(&self, group: &str, change: GroupChange) -> Result<GroupInfo, NetError> {
        let g = self
            .handle
            .update_group(pb::UpdateGroup {
                group: group.to_owned(),
                add: change.add,
                remove: change.remove,
                name: change.name,
                avatar_blob: change.avatar_blob,
            })
            .await
            .map_err(net_err)?;
        Ok(group_info(g))
    }

    async fn group(&self, group: &str) -> Result<GroupInfo, NetError> {
        let g = self.handle.group(group.to_owned()).await.map_err(net_err)?;
        Ok(group_info(g))
    }

    async fn profile(&self, account: &str) -> Result<Option<NetProfile>, NetError> {
        match self.handle.profile(account.to_owned()).await {
            Ok(p) => Ok(Some(NetProfile {
                name: p.name,
                avatar_blob: p.avatar_blob,
            })),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(net_err(e)),
        }
    }

    async fn upload_avatar(&self, image: Vec<u8>) -> Result<String, NetError> {
        self.handle.upload_plain(image).await.map_err(net_err)
    }

    async fn download_avatar(&self, blob: &str) -> Result<Vec<u8>, NetError> {
        self.handle
            .download_plain(blob.to_owned(), MAX_AVATAR_BYTES)
            .await
            .map_err(net_err)
    }

    async fn ack(&self, envelope_id: u64) {
        self.handle.ack(envelope_id).await;
    }
}
