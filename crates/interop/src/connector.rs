//! The network connector: the bridge core's [`Network`] over our interop client. Each login's
//! events are handed to the core in order per chat, and acked once the core handled them.

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
use mib_core::{
    metrics::LoginGauges,
    model::Message,
    network::{
        GroupChange, GroupInfo, NetAccount, NetError, NetEvent, NetEventSink, NetProfile,
        NetTarget, Network, UploadedMedia,
    },
};
use mib_vault::{Vault, VaultStore};
use mib_wire::pb::{self, ErrorCode};

use super::convert;

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
        None => NetError::Other(e.to_string()),
    }
}

pub struct InteropNetwork {
    rt: SignalRuntime,
    gateway: GatewayAddr,
    options: account::AccountOptions,
    vault: Vault,
    db: Arc<dyn VaultStore>,
    accounts: Mutex<HashMap<String, Arc<InteropAccount>>>,
    sink: OnceLock<Weak<dyn NetEventSink>>,
    gauges: LoginGauges,
}

impl InteropNetwork {
    pub fn new(
        rt: SignalRuntime,
        gateway: GatewayAddr,
        options: account::AccountOptions,
        vault: Vault,
        db: Arc<dyn VaultStore>,
        gauges: LoginGauges,
    ) -> Arc<Self> {
        Arc::new(Self {
            rt,
            gateway,
            options,
            vault,
            db,
            accounts: Mutex::new(HashMap::new()),
            sink: OnceLock::new(),
            gauges,
        })
    }

    /// Where events go; set once, after the core exists.
    pub fn set_sink(&self, sink: Weak<dyn NetEventSink>) {
        let _ = self.sink.set(sink);
    }

    async fn start(&self, mxid: &str) -> Result<Arc<dyn NetAccount>, NetError> {
        let old = self.accounts.lock().expect("lock").remove(mxid);
        if let Some(old) = old {
            old.stop(&self.gauges).await;
        }
        // Unbounded: the actor never waits for the pump (which calls back into it); the
        // gateway's delivery window bounds how many envelopes are in flight.
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = account::spawn_account(
            &self.rt,
            mxid,
            self.gateway.clone(),
            self.vault.clone(),
            self.db.clone(),
            tx,
            self.options.clone(),
        )
        .await
        .map_err(net_err)?;
        let acc = Arc::new(InteropAccount {
            handle,
            connected: Arc::new(AtomicBool::new(false)),
            stopped: AtomicBool::new(false),
        });
        self.accounts
            .lock()
            .expect("lock")
            .insert(mxid.to_owned(), acc.clone());
        self.gauges.started();
        let sink = self.sink.get().cloned();
        tokio::spawn(pump(
            mxid.to_owned(),
            acc.clone(),
            rx,
            sink,
            self.gauges.clone(),
        ));
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

/// Attempts at an event that fails transiently (the homeserver answering 5xx) before it is
/// reported in its room and acked. Waiting errors (the homeserver unreachable, a rate limit)
/// have no such limit: the envelopes stay with the gateway meanwhile.
const MAX_TRANSIENT_ATTEMPTS: u32 = 10;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long an edit, reaction or deletion waits for the message it refers to.
const EARLY_WINDOW: Duration = Duration::from_secs(600);
/// How many such events wait per login, over all its chats (unacked, within the gateway's
/// delivery window).
const MAX_EARLY: usize = 32;

/// What became of an event.
enum Delivery {
    /// Handled, or given up on and reported: ack it.
    Done,
    /// It refers to a message that has not arrived yet: set it aside.
    Early(mib_core::BridgeError),
    /// The login stopped meanwhile: leave it to the next start (not acked).
    Stopped,
}

/// How long a chat's lane stays after its last event.
const LANE_IDLE: Duration = Duration::from_secs(60);
/// Lanes per login past which an event that is not in the delivery window (typing) for a chat
/// without a lane is dropped: the window bounds the rest.
const MAX_LANES: usize = 256;

/// Which of a login's chats an event belongs to (its lane); `None` for what concerns the whole
/// login (connection changes, a logout, a contact's new identity), which waits until every
/// chat's earlier events are handled.
fn lane_of(ev: &NetEvent) -> Option<String> {
    let chat = |from: &str, group: &Option<String>| match group {
        Some(g) => format!("g:{g}"),
        None => format!("c:{from}"),
    };
    match ev {
        NetEvent::Message { from, group, .. }
        | NetEvent::Receipt { from, group, .. }
        | NetEvent::Typing { from, group, .. }
        | NetEvent::Undecryptable { from, group, .. } => Some(chat(from, group)),
        NetEvent::GroupUpdate { group, .. } => Some(format!("g:{}", group.id)),
        NetEvent::IdentityChanged { .. }
        | NetEvent::Connected
        | NetEvent::Disconnected { .. }
        | NetEvent::LoggedOut { .. } => None,
    }
}

/// One chat's lane of a login's event pump.
struct Lane {
    tx: mpsc::UnboundedSender<NetEvent>,
    /// Events queued, in hand or set aside: a lane is closed only when it has none.
    busy: Arc<std::sync::atomic::AtomicUsize>,
    last: tokio::time::Instant,
}

/// What the lanes of one login share.
struct Lanes {
    mxid: String,
    acc: Arc<InteropAccount>,
    sink: Weak<dyn NetEventSink>,
    /// Events queued or in hand over all lanes (set-aside ones not counted): login-wide
    /// events wait for 0.
    in_hand: tokio::sync::watch::Sender<usize>,
    /// Events set aside over all lanes, bounded by [`MAX_EARLY`].
    early: std::sync::atomic::AtomicUsize,
    /// A lane found the login stopped.
    stopped: AtomicBool,
}

/// Hands one login's events to the core and acks each once it was handled (or given up on and
/// reported). Each chat has its lane, so a chat whose events wait (a slow or failing homeserver
/// request, a relation whose message has not come) does not hold up the login's other chats;
/// within a chat, events are handled in order. An event that fails waits, holding up its
/// chat's later events, so nothing of the chat is acked past it; an edit, reaction or deletion
/// whose message has not arrived is set aside (unacked) and tried again after later messages,
/// for [`EARLY_WINDOW`].
async fn pump(
    mxid: String,
    acc: Arc<InteropAccount>,
    mut rx: mpsc::UnboundedReceiver<Box<Event>>,
    sink: Option<Weak<dyn NetEventSink>>,
    gauges: LoginGauges,
) {
    let Some(sink) = sink else { return };
    let shared = Arc::new(Lanes {
        mxid,
        acc,
        sink,
        in_hand: tokio::sync::watch::Sender::new(0),
        early: Default::default(),
        stopped: AtomicBool::new(false),
    });
    let mut lanes: HashMap<String, Lane> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = match tokio::time::timeout(LANE_IDLE / 2, rx.recv()).await {
            Ok(None) => break,
            Ok(Some(ev)) => convert(*ev),
            Err(_) => None,
        };
        while tasks.try_join_next().is_some() {}
        if shared.stopped.load(Ordering::Relaxed) || shared.sink.strong_count() == 0 {
            return;
        }
        // A lane with nothing to do for a while is closed (its task ends).
        lanes.retain(|_, l| l.busy.load(Ordering::Acquire) > 0 || l.last.elapsed() < LANE_IDLE);
        let Some(ev) = next else { continue };
        let Some(key) = lane_of(&ev) else {
            let now = match &ev {
                NetEvent::Connected => Some(true),
                NetEvent::Disconnected { .. } | NetEvent::LoggedOut { .. } => Some(false),
                _ => None,
            };
            if let Some(now) = now {
                shared.acc.set_connected(now, &gauges);
            }
            // After every chat's earlier events (a logout is the last thing handled).
            let mut idle = shared.in_hand.subscribe();
            let _ = idle.wait_for(|n| *n == 0).await;
            let Some(sink) = shared.sink.upgrade() else {
                return;
            };
            if let Delivery::Stopped = deliver(&shared.mxid, &shared.acc, &*sink, &ev).await {
                return;
            }
            continue;
        };
        if !lanes.contains_key(&key) {
            if lanes.len() >= MAX_LANES && ev.envelope_id().is_none() {
                tracing::debug!("too many chats at work; an interop typing notice is dropped");
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            tasks.spawn(run_lane(shared.clone(), rx, busy.clone()));
            let last = tokio::time::Instant::now();
            lanes.insert(key.clone(), Lane { tx, busy, last });
        }
        let Some(l) = lanes.get_mut(&key) else {
            continue;
        };
        l.busy.fetch_add(1, Ordering::AcqRel);
        l.last = tokio::time::Instant::now();
        shared.in_hand.send_modify(|n| *n += 1);
        if l.tx.send(ev).is_err() {
            // Its task ended: the login stopped.
            return;
        }
    }
    // The login's events ended: each lane finishes what it has.
    drop(lanes);
    while tasks.join_next().await.is_some() {}
}

/// One chat's events, in order (see [`pump`]).
async fn run_lane(
    shared: Arc<Lanes>,
    mut rx: mpsc::UnboundedReceiver<NetEvent>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (mxid, acc) = (shared.mxid.as_str(), &*shared.acc);
    let done = |n: usize| {
        busy.fetch_sub(n, Ordering::AcqRel);
    };
    let mut early: std::collections::VecDeque<(
        tokio::time::Instant,
        NetEvent,
        mib_core::BridgeError,
    )> = Default::default();
    loop {
        let next = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(None) => return,
            Ok(Some(ev)) => Some(ev),
            Err(_) => None,
        };
        let Some(sink) = shared.sink.upgrade() else {
            return;
        };
        // Relations whose message never came are reported and acked.
        while early
            .front()
            .is_some_and(|(since, ..)| since.elapsed() >= EARLY_WINDOW)
            || (!early.is_empty() && shared.early.load(Ordering::Acquire) > MAX_EARLY)
        {
            let Some((_, ev, e)) = early.pop_front() else {
                break;
            };
            shared.early.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "giving up on an interop event");
            sink.network_event_failed(mxid, &ev, &e).await;
            ack(acc, &ev).await;
            done(1);
        }
        let Some(ev) = next else { continue };
        let stopped = 'ev: {
            match deliver(mxid, acc, &*sink, &ev).await {
                Delivery::Stopped => break 'ev true,
                // The gateway delivers what is set aside again after a reconnect: kept once.
                Delivery::Early(e) => {
                    if early
                        .iter()
                        .any(|(_, held, _)| held.envelope_id() == ev.envelope_id())
                    {
                        done(1);
                    } else {
                        shared.early.fetch_add(1, Ordering::AcqRel);
                        early.push_back((tokio::time::Instant::now(), ev, e));
                    }
                }
                Delivery::Done => {
                    ack(acc, &ev).await;
                    done(1);
                    // A new message may be what set-aside relations wait for.
                    if matches!(ev, NetEvent::Message { .. }) && !early.is_empty() {
                        for (since, ev, _) in std::mem::take(&mut early) {
                            match deliver(mxid, acc, &*sink, &ev).await {
                                Delivery::Stopped => break 'ev true,
                                Delivery::Early(e) => early.push_back((since, ev, e)),
                                Delivery::Done => {
                                    shared.early.fetch_sub(1, Ordering::AcqRel);
                                    ack(acc, &ev).await;
                                    done(1);
                                }
                            }
                        }
                    }
                }
            }
            false
        };
        shared.in_hand.send_modify(|n| *n -= 1);
        if stopped {
            shared.stopped.store(true, Ordering::Relaxed);
            return;
        }
    }
}

async fn ack(acc: &InteropAccount, ev: &NetEvent) {
    if let Some(id) = ev.envelope_id() {
        acc.handle.ack(id).await;
    }
}

/// Hands one event to the core until it is handled or given up on, as its error's retry class
/// says: the one retry layer for interop events.
async fn deliver(
    mxid: &str,
    acc: &InteropAccount,
    sink: &dyn NetEventSink,
    ev: &NetEvent,
) -> Delivery {
    use mib_core::RetryClass;
    let Some(envelope) = ev.envelope_id() else {
        // Typing, presence, connection changes: one attempt, nothing to redeliver.
        if let Err(e) = sink.handle_network_event(mxid, ev).await {
            tracing::debug!(error = %e, "interop event not bridged");
        }
        return Delivery::Done;
    };
    let key = format!("interop:{mxid}:{envelope}");
    let mut backoff = FIRST_BACKOFF;
    let mut transient = 0;
    loop {
        let result =
            mib_core::handling_event(key.clone(), sink.handle_network_event(mxid, ev)).await;
        let Err(e) = result else {
            return Delivery::Done;
        };
        let wait = match e.retry_class() {
            RetryClass::UntilTarget => return Delivery::Early(e),
            RetryClass::Permanent => None,
            RetryClass::Transient => {
                transient += 1;
                (transient < MAX_TRANSIENT_ATTEMPTS).then_some(backoff)
            }
            RetryClass::Waiting => Some(backoff),
            RetryClass::After(d) => Some(d.min(Duration::from_secs(120))),
        };
        let Some(wait) = wait else {
            tracing::error!(envelope, error = %e, "giving up on an interop event");
            mib_core::handling_event(key.clone(), sink.network_event_failed(mxid, ev, &e)).await;
            return Delivery::Done;
        };
        tracing::warn!(envelope, ?wait, error = %e, "bridging an interop event failed, will retry");
        tokio::time::sleep(wait).await;
        if acc.handle.is_stopped() {
            return Delivery::Stopped;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
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
            data: convert::to_model(data),
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
        if !mib_wire::is_valid_account(account) {
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
            acc.stop(&self.gauges).await;
        }
        self.vault
            .destroy(mxid)
            .await
            .map_err(|e| NetError::Other(e.to_string()))
    }

    async fn stop(&self, mxid: &str) {
        let acc = self.accounts.lock().expect("lock").remove(mxid);
        if let Some(acc) = acc {
            acc.stop(&self.gauges).await;
        }
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

    fn is_valid_account(&self, id: &str) -> bool {
        mib_wire::is_valid_account(id)
    }

    fn encode_message(&self, message: &Message) -> Vec<u8> {
        convert::encode(message)
    }

    fn decode_message(&self, bytes: &[u8]) -> Result<Message, NetError> {
        convert::decode(bytes).map_err(|e| NetError::Other(format!("undecodable message: {e}")))
    }
}

pub struct InteropAccount {
    handle: AccountHandle,
    connected: Arc<AtomicBool>,
    stopped: AtomicBool,
}

impl InteropAccount {
    /// Records the login's connection; the gauge moves only when it changes, and only while the
    /// login runs (`stop` clears it for good).
    fn set_connected(&self, now: bool, gauges: &LoginGauges) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let was = self.connected.swap(now, Ordering::AcqRel);
        gauges.connection(was, now);
    }

    async fn stop(&self, gauges: &LoginGauges) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            gauges.stopped(self.connected.swap(false, Ordering::AcqRel));
        }
        self.handle.stop().await;
    }
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

    async fn send(&self, to: NetTarget, message_id: String, data: Message) -> Result<(), NetError> {
        self.handle
            .send(target(to), message_id, convert::to_wire(&data))
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

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Mutex as StdMutex};

    use super::*;
    use mib_core::{BridgeError, model::Body};
    use mib_wire::content::{DataMessage, Edit, Text, data_message::Body as D};

    /// A send whose Signal state could not be committed because the vault's database was away
    /// (PostgreSQL restarting) is tried again, not reported as not bridged: it was classed as
    /// permanent, and a message sent during an outage was lost (the chaos test's
    /// `postgres_outage_mid_stream`). A store that refuses the one request stays permanent.
    #[test]
    fn a_vault_whose_database_is_away_is_transient() {
        use mib_core::store::StoreError;
        let vault = |e| InteropError::Vault(mib_vault::VaultError::Store(e));
        let away = vault(StoreError::unavailable("connection reset by peer"));
        assert!(away.is_transient());
        assert!(matches!(net_err(away), NetError::Unavailable(_)));
        let refused = vault(StoreError::failed("constraint violated"));
        assert!(!refused.is_transient());
        assert!(!net_err(refused).is_transient());
        assert!(!InteropError::Vault(mib_vault::VaultError::Open).is_transient());
    }

    /// Handles messages in order; an edit whose target it has not seen is early, the message
    /// "flaky" fails twice with a 5xx, the message "refused" is refused for good.
    #[derive(Default)]
    struct Sink {
        seen: StdMutex<HashSet<String>>,
        handled: StdMutex<Vec<u64>>,
        reported: StdMutex<Vec<u64>>,
        flaky_failures: StdMutex<u32>,
        /// The message "slow" waits for this.
        gate: tokio::sync::Mutex<()>,
    }

    #[async_trait]
    impl NetEventSink for Sink {
        async fn handle_network_event(&self, _: &str, ev: &NetEvent) -> Result<(), BridgeError> {
            if let NetEvent::LoggedOut { .. } = ev {
                self.handled.lock().unwrap().push(LOGGED_OUT);
            }
            let NetEvent::Message {
                envelope_id,
                message_id,
                data,
                ..
            } = ev
            else {
                return Ok(());
            };
            if let Some(Body::Edit(e)) = &data.body
                && !self.seen.lock().unwrap().contains(&e.target)
            {
                return Err(BridgeError::TargetNotYet(e.target.clone()));
            }
            if message_id == "flaky" {
                let mut n = self.flaky_failures.lock().unwrap();
                if *n < 2 {
                    *n += 1;
                    return Err(BridgeError::Matrix("502 Bad Gateway".into()));
                }
            }
            if message_id == "slow" {
                let _open = self.gate.lock().await;
            }
            if message_id == "refused" {
                return Err(BridgeError::MatrixRefused("413 M_TOO_LARGE".into()));
            }
            self.seen.lock().unwrap().insert(message_id.clone());
            self.handled.lock().unwrap().push(*envelope_id);
            Ok(())
        }

        async fn network_event_failed(&self, _: &str, ev: &NetEvent, _: &BridgeError) {
            if let Some(id) = ev.envelope_id() {
                self.reported.lock().unwrap().push(id);
            }
        }
    }

    /// What [`Sink`] notes for a logout.
    const LOGGED_OUT: u64 = u64::MAX;

    fn message(envelope_id: u64, message_id: &str, body: D) -> Event {
        message_from("+15550001111", envelope_id, message_id, body)
    }

    fn message_from(from: &str, envelope_id: u64, message_id: &str, body: D) -> Event {
        Event::Message {
            envelope_id,
            from: from.into(),
            group: None,
            message_id: message_id.into(),
            timestamp: 1,
            data: DataMessage {
                body: Some(body),
                reply_to: None,
                expire_timer: 0,
            },
        }
    }

    fn text(s: &str) -> D {
        D::Text(Text {
            body: s.into(),
            formats: vec![],
        })
    }

    fn edit_of(envelope_id: u64, target: &str) -> Event {
        message(
            envelope_id,
            "edit",
            D::Edit(Edit {
                target: target.into(),
                text: None,
            }),
        )
    }

    /// A pump running over a detached account.
    struct Running {
        /// Feeds the pump; dropping it ends the pump once it is idle.
        tx: mpsc::UnboundedSender<Box<Event>>,
        task: tokio::task::JoinHandle<()>,
        sink: Arc<Sink>,
        acks: mpsc::UnboundedReceiver<u64>,
        _keep: Box<dyn std::any::Any + Send>,
    }

    fn start_pump() -> Running {
        let (handle, keep, acks) = AccountHandle::detached("+15550002222");
        let acc = Arc::new(InteropAccount {
            handle,
            connected: Arc::new(AtomicBool::new(true)),
            stopped: AtomicBool::new(false),
        });
        let sink = Arc::new(Sink::default());
        let dyn_sink: Arc<dyn NetEventSink> = sink.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            pump(
                "@a:x".into(),
                acc,
                rx,
                Some(Arc::downgrade(&dyn_sink)),
                LoginGauges::default(),
            )
            .await;
        });
        Running {
            tx,
            task,
            sink,
            acks,
            _keep: keep,
        }
    }

    /// Pumps `events` to the end; returns the sink and the acks in order.
    async fn pump_all(events: Vec<Event>) -> (Arc<Sink>, Vec<u64>) {
        let mut p = start_pump();
        for ev in events {
            p.tx.send(Box::new(ev)).unwrap();
        }
        drop(p.tx);
        p.task.await.unwrap();
        let mut acked = Vec::new();
        while let Ok(id) = p.acks.try_recv() {
            acked.push(id);
        }
        (p.sink, acked)
    }

    #[tokio::test]
    async fn nothing_is_acked_past_a_failing_event_and_early_edits_wait_for_their_message() {
        let (sink, acked) = pump_all(vec![
            edit_of(1, "m3"),
            message(2, "flaky", text("two")),
            message(3, "m3", text("three")),
            message(4, "refused", text("four")),
            message(5, "m5", text("five")),
        ])
        .await;
        // The flaky one was retried before anything after it; the early edit was applied
        // once its message came; the refused one was reported and acked, not redelivered.
        assert_eq!(*sink.handled.lock().unwrap(), [2, 3, 1, 5]);
        assert_eq!(*sink.reported.lock().unwrap(), [4]);
        assert_eq!(acked, [2, 3, 1, 4, 5]);
    }

    /// A chat whose event waits (here for a slow homeserver) does not hold up the login's
    /// other chats; each chat keeps its order. With one queue per login, every chat of a busy
    /// login waited for each homeserver round trip of the others.
    #[tokio::test]
    async fn a_waiting_chat_does_not_hold_up_the_others() {
        let p = start_pump();
        let gate = p.sink.gate.lock().await;
        for ev in [
            message_from("+15550001111", 1, "slow", text("one")),
            message_from("+15550001111", 2, "a2", text("two")),
            message_from("+15550003333", 3, "b1", text("three")),
            message_from("+15550003333", 4, "b2", text("four")),
        ] {
            p.tx.send(Box::new(ev)).unwrap();
        }
        let other_chat = async {
            while p.sink.handled.lock().unwrap().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), other_chat)
            .await
            .expect("the other chat's messages were held up by the slow one");
        assert_eq!(*p.sink.handled.lock().unwrap(), [3, 4]);
        drop(gate);
        drop(p.tx);
        p.task.await.unwrap();
        assert_eq!(*p.sink.handled.lock().unwrap(), [3, 4, 1, 2]);
    }

    /// An event for the whole login (here a logout) waits until every chat has handled the
    /// events that came before it, even one that waits.
    #[tokio::test]
    async fn a_logout_waits_for_every_chats_earlier_events() {
        let p = start_pump();
        let gate = p.sink.gate.lock().await;
        p.tx.send(Box::new(message_from(
            "+15550001111",
            1,
            "slow",
            text("one"),
        )))
        .unwrap();
        p.tx.send(Box::new(message_from("+15550003333", 2, "b1", text("two"))))
            .unwrap();
        p.tx.send(Box::new(Event::LoggedOut {
            account: "+15550002222".into(),
            reason: "gone".into(),
        }))
        .unwrap();
        p.tx.send(Box::new(message_from(
            "+15550003333",
            3,
            "b2",
            text("three"),
        )))
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*p.sink.handled.lock().unwrap(), [2]);
        drop(gate);
        drop(p.tx);
        p.task.await.unwrap();
        assert_eq!(*p.sink.handled.lock().unwrap(), [2, 1, LOGGED_OUT, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_edit_whose_message_never_comes_is_reported_and_acked_after_the_window() {
        let mut p = start_pump();
        p.tx.send(Box::new(edit_of(7, "never"))).unwrap();
        // Within the window it waits, unacked.
        tokio::time::sleep(EARLY_WINDOW / 2).await;
        assert!(p.acks.try_recv().is_err());
        assert!(p.sink.reported.lock().unwrap().is_empty());
        // After it, it is reported and acked (the clock is paused: this takes no real time).
        tokio::time::sleep(EARLY_WINDOW).await;
        drop(p.tx);
        p.task.await.unwrap();
        assert_eq!(*p.sink.reported.lock().unwrap(), [7]);
        assert_eq!(p.acks.try_recv().ok(), Some(7));
    }

    #[tokio::test]
    async fn a_set_aside_relation_delivered_again_is_kept_once() {
        // Set aside, then delivered again (a reconnect), then its message comes.
        let (sink, acked) = pump_all(vec![
            edit_of(1, "m2"),
            edit_of(1, "m2"),
            message(2, "m2", text("two")),
        ])
        .await;
        assert_eq!(*sink.handled.lock().unwrap(), [2, 1]);
        assert_eq!(acked, [2, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_login_gauges_follow_connections_and_stops() {
        let gauges = LoginGauges::default();
        let (handle, _keep, _acks) = AccountHandle::detached("+15550002222");
        let acc = InteropAccount {
            handle,
            connected: Arc::new(AtomicBool::new(false)),
            stopped: AtomicBool::new(false),
        };
        gauges.started();
        // A login that retries reports each failed attempt; a connection is counted once.
        for now in [false, true, true, false, false, true] {
            acc.set_connected(now, &gauges);
        }
        assert_eq!((gauges.running.get(), gauges.connected.get()), (1, 1));
        acc.stop(&gauges).await;
        // An event the pump still had, and a second stop, change nothing.
        acc.set_connected(true, &gauges);
        acc.stop(&gauges).await;
        assert_eq!((gauges.running.get(), gauges.connected.get()), (0, 0));
    }
}
