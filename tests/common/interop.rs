//! Interop harness: an in-process gateway on a free port, and accounts of ours on it.

use std::{sync::Arc, time::Duration};

use matrix_interop_bridge::wire::content::{DataMessage, Text, data_message::Body as D};
use matrix_interop_bridge::{
    bridge::store::StoreError,
    interop::{
        AccountHandle, AccountOptions, Event, GatewayAddr, GatewayConn, SignalRuntime, account,
    },
    store::{SqlStore, testing},
    vault::{SecretKey, Vault, VaultStore},
    wire::noise::StaticKey,
};
use mib_gateway::{CodeDelivery, Gateway, GatewayConfig};
use tokio::sync::mpsc;

pub const CODE: &str = "123456";

pub struct TestGateway {
    pub key: StaticKey,
    pub addr: GatewayAddr,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The running gateway (its counters).
    #[allow(dead_code)] // some test binaries' only
    pub gateway: Gateway,
    stop: tokio::sync::watch::Sender<bool>,
}

impl TestGateway {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        Self::start_in(dir, StaticKey::generate(), 0).await
    }

    /// Starts a gateway with settings changed by `f` (limits a test wants to reach quickly).
    pub async fn start_with(f: impl FnOnce(&mut GatewayConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        Self::start_configured(dir, StaticKey::generate(), 0, f).await
    }

    /// Starts (or restarts) a gateway with its state in `dir`.
    pub async fn start_in(dir: tempfile::TempDir, key: StaticKey, port: u16) -> Self {
        Self::start_configured(dir, key, port, |_| {}).await
    }

    async fn start_configured(
        dir: tempfile::TempDir,
        key: StaticKey,
        port: u16,
        f: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let mut cfg = GatewayConfig::new(
            key.clone(),
            format!("sqlite://{}", dir.path().join("gateway.db").display()),
            dir.path().join("blobs"),
        );
        cfg.codes = CodeDelivery::DevFixed(CODE.into());
        cfg.max_blob_bytes = 2 * 1024 * 1024;
        f(&mut cfg);
        let gw = Gateway::open(cfg).await.expect("gateway");
        let listener = mib_gateway::listen(("127.0.0.1", port))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(gw.clone().serve(listener, rx));
        Self {
            gateway: gw,
            key: key.clone(),
            addr: GatewayAddr {
                address: format!("127.0.0.1:{port}"),
                public_key: key.public.clone(),
            },
            port,
            dir,
            stop,
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Starts a stopped gateway again on the same port with the same key and state.
    pub async fn restart(old: TestGateway, port: u16) -> Self {
        Self::restart_with(old, port, |_| {}).await
    }

    /// [`TestGateway::restart`] with settings changed by `f`, as [`TestGateway::start_with`].
    #[allow(dead_code)] // the bench's, not every test binary's
    pub async fn restart_with(
        old: TestGateway,
        port: u16,
        f: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let key = old.key.clone();
        Self::start_configured(old.dir, key, port, f).await
    }
}

/// A bridge-side account with its own vault on SQLite.
pub struct Ours {
    pub handle: AccountHandle,
    pub events: mpsc::UnboundedReceiver<Box<Event>>,
    pub account: String,
    pub store: SqlStore,
    pub master: SecretKey,
    /// The vault the running actor uses (shared cache of data keys).
    pub vault: Vault,
    /// What the account was started with (and is started with again by `respawn`).
    pub options: AccountOptions,
    pub _dir: tempfile::TempDir,
}

/// The vault of `ours` again, as after a restart.
pub async fn reopen_vault(ours: &Ours) -> Vault {
    let db: Arc<dyn VaultStore> = Arc::new(ours.store.clone());
    Vault::open(ours.master.clone(), db)
        .await
        .expect("reopen vault")
}

/// A bare connection logged in as a new account (to send what our client never would), with
/// its pushes and the account.
#[allow(dead_code)] // some test binaries' only
pub async fn raw_login(
    gw: &GatewayAddr,
) -> (
    GatewayConn,
    mpsc::Receiver<Box<matrix_interop_bridge::wire::pb::Stanza>>,
    String,
) {
    let (conn, pushes) = GatewayConn::connect(gw).await.expect("connect");
    let account = random_account();
    conn.request_code(&account).await.expect("register");
    let secret = conn.verify(&account, CODE).await.expect("verify");
    conn.login(&account, &secret, 0).await.expect("login");
    (conn, pushes, account)
}

/// Sends `data` from `from` to `to`, waiting as long as the gateway asks whenever it
/// rate-limits the sender.
#[allow(dead_code)] // some test binaries' only
pub async fn send_paced(from: &AccountHandle, to: &str, message_id: String, data: DataMessage) {
    use matrix_interop_bridge::{
        interop::{InteropError, Target},
        wire::pb::ErrorCode,
    };
    loop {
        match from
            .send(
                Target::Account(to.to_owned()),
                message_id.clone(),
                data.clone(),
            )
            .await
        {
            Ok(_) => return,
            Err(InteropError::Gateway {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) => tokio::time::sleep(Duration::from_millis(retry_after_ms)).await,
            Err(e) => panic!("send: {e}"),
        }
    }
}

pub fn random_account() -> String {
    format!("+1555{:07}", rand::random::<u32>() % 10_000_000)
}

pub async fn register_ours(rt: &SignalRuntime, gw: &GatewayAddr, account: &str) -> Ours {
    register_ours_with(rt, gw, account, AccountOptions::default()).await
}

pub async fn register_ours_with(
    rt: &SignalRuntime,
    gw: &GatewayAddr,
    account: &str,
    options: AccountOptions,
) -> Ours {
    let (store, dir) = testing::sqlite().await;
    let db: Arc<dyn VaultStore> = Arc::new(store.clone());
    let master = SecretKey::random();
    let vault = Vault::open(master.clone(), db.clone())
        .await
        .expect("vault");
    let (conn, _pushes) = GatewayConn::connect(gw).await.expect("connect");
    conn.request_code(account).await.expect("register");
    let secret = conn.verify(account, CODE).await.expect("verify");
    account::save_credentials(&vault, &db, "@owner:test", account, &secret)
        .await
        .expect("creds");
    let (tx, events) = mpsc::unbounded_channel();
    let handle = account::spawn_account(
        rt,
        "@owner:test",
        gw.clone(),
        vault.clone(),
        db,
        tx,
        options.clone(),
    )
    .await
    .expect("spawn");
    let mut ours = Ours {
        handle,
        events,
        account: account.to_owned(),
        store,
        master,
        vault,
        options,
        _dir: dir,
    };
    ours.wait(|e| matches!(e, Event::Connected { .. })).await;
    ours
}

impl Ours {
    /// Starts the account again from its vault and database (after `handle.stop()`), as the
    /// bridge does after a restart; its events go to a new channel.
    pub async fn respawn(&mut self, rt: &SignalRuntime, gw: &GatewayAddr) {
        let db: Arc<dyn VaultStore> = Arc::new(self.store.clone());
        self.respawn_over(rt, gw, db).await;
    }

    /// Waits for an event matching `pred`, acking every event on the way.
    pub async fn wait(&mut self, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("timed out waiting for an interop event")
                .expect("event channel closed");
            if let Some(id) = ev.envelope_id() {
                self.handle.ack(id).await;
            }
            if pred(&ev) {
                return *ev;
            }
        }
    }
}

/// A plain text message.
pub fn text(s: &str) -> DataMessage {
    DataMessage {
        body: Some(D::Text(Text {
            body: s.into(),
            formats: vec![],
        })),
        reply_to: None,
        expire_timer: 0,
    }
}

/// The text of a message event, if it is one.
pub fn body_of(e: &Event) -> Option<String> {
    match e {
        Event::Message {
            data:
                DataMessage {
                    body: Some(D::Text(t)),
                    ..
                },
            ..
        } => Some(t.body.clone()),
        _ => None,
    }
}

/// A vault store that counts the transactions that write decrypted messages into the inbox
/// (and how many messages they hold), and fails the next such write when told to, as a full
/// disk would.
#[allow(dead_code)] // some test binaries' only
pub struct InboxWrites {
    inner: SqlStore,
    pub transactions: std::sync::atomic::AtomicUsize,
    pub messages: std::sync::atomic::AtomicUsize,
    pub fail_next: std::sync::atomic::AtomicBool,
}

#[allow(dead_code)] // some test binaries' only
impl InboxWrites {
    pub fn new(inner: SqlStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            transactions: Default::default(),
            messages: Default::default(),
            fail_next: Default::default(),
        })
    }
}

#[async_trait::async_trait]
impl VaultStore for InboxWrites {
    async fn wrapped_key(&self, owner: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.wrapped_key(owner).await
    }
    async fn put_wrapped_key(
        &self,
        owner: &str,
        wrapped: &[u8],
        id: &str,
    ) -> Result<(), StoreError> {
        self.inner.put_wrapped_key(owner, wrapped, id).await
    }
    async fn any_master_key_id(&self) -> Result<Option<String>, StoreError> {
        self.inner.any_master_key_id().await
    }
    async fn all_wrapped_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.all_wrapped_keys().await
    }
    async fn replace_wrapped_keys(
        &self,
        keys: &[(String, Vec<u8>)],
        id: &str,
    ) -> Result<(), StoreError> {
        self.inner.replace_wrapped_keys(keys, id).await
    }
    async fn destroy_owner(&self, owner: &str) -> Result<(), StoreError> {
        self.inner.destroy_owner(owner).await
    }
    async fn record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.record(owner, kind, name).await
    }
    async fn put_record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
        sealed: &[u8],
    ) -> Result<(), StoreError> {
        self.inner.put_record(owner, kind, name, sealed).await
    }
    async fn delete_record(&self, owner: &str, kind: &str, name: &str) -> Result<(), StoreError> {
        self.inner.delete_record(owner, kind, name).await
    }
    async fn write_records(
        &self,
        owner: &str,
        writes: &[(String, String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let inbox = writes
            .iter()
            .filter(|(kind, _, v)| kind == "inbox" && v.is_some())
            .count();
        if inbox > 0 {
            if self.fail_next.swap(false, SeqCst) {
                return Err(StoreError::unavailable("disk full (test)"));
            }
            self.transactions.fetch_add(1, SeqCst);
            self.messages.fetch_add(inbox, SeqCst);
        }
        self.inner.write_records(owner, writes).await
    }
    async fn record_names(&self, owner: &str, kind: &str) -> Result<Vec<String>, StoreError> {
        self.inner.record_names(owner, kind).await
    }
}

impl Ours {
    /// As [`Ours::respawn`], over `db` (this account's store, or a wrapper of it).
    pub async fn respawn_over(
        &mut self,
        rt: &SignalRuntime,
        gw: &GatewayAddr,
        db: Arc<dyn VaultStore>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.events = rx;
        let vault = Vault::open(self.master.clone(), db.clone())
            .await
            .expect("reopen vault");
        self.vault = vault.clone();
        self.handle = account::spawn_account(
            rt,
            "@owner:test",
            gw.clone(),
            vault,
            db,
            tx,
            self.options.clone(),
        )
        .await
        .expect("respawn");
    }
}
