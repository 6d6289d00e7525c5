//! Several workers on one database (PostgreSQL): every worker takes appservice transactions
//! into the shared event queue, and leases in the database say which worker does what.
//!
//! - `worker:<id>`: each worker's heartbeat; the live ones share the logins.
//! - `login:<mxid>`: the worker running that interop login. It alone connects the login to the
//!   gateway, receives its messages and handles the Matrix events of its rooms (its portals and
//!   its management room), so that both directions of a chat are in one process.
//! - `bot`: the worker handling what no login owns: events without a room (crypto), rooms of
//!   users without a login (the bot's DMs before `login`), and unknown rooms.
//!
//! A worker renews all its leases every [`RENEW_EVERY`]; a lease not renewed for
//! [`LEASE_MS`] expires and another worker takes it at its next round, so a worker that dies
//! (kill -9) has its logins and rooms taken over within `LEASE_MS + RENEW_EVERY` (12 s). A
//! worker that cannot renew (its database connection is gone) stops its logins before its leases
//! can expire, so that a login never runs in two workers. Logins are spread evenly: a worker
//! takes unheld logins up to its share (all logins over the live workers, rounded up) and lets go
//! of those above its share plus one.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::{Notify, watch};

use crate::{
    network::Network,
    store::{LeaseStore, PortalStore, StoreError, UserStore},
};

/// How long a lease lives without renewal.
pub const LEASE_MS: i64 = 10_000;
/// How often a worker renews its leases and looks for logins nobody holds.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A worker that could not renew its leases stops its logins this long before they expire.
const SAFETY_MS: i64 = 3_000;

pub const BOT: &str = "bot";

fn login_lease(mxid: &str) -> String {
    format!("login:{mxid}")
}

fn now() -> i64 {
    crate::now_ms() as i64
}

/// Which worker handles a queued Matrix event (the queue worker asks before handling one).
#[async_trait]
pub trait EventRouter: Send + Sync {
    /// Whether this worker handles the events of `room` now (`None`: events without a room).
    async fn handles(&self, room: Option<&str>) -> bool;
    /// Raised each time this worker takes over leases, before [`EventRouter::handles`] answers
    /// with them: events it passed over may be its own now, so the queue reader reads the queue
    /// from its start again. A reader that sees the epoch change in the middle of a pass stops
    /// that pass at once (dispatching nothing more from it), so that a room's earlier events,
    /// passed over under the old leases, are not overtaken by its later ones.
    fn epoch(&self) -> u64;
    /// Woken when the epoch is raised.
    fn changed(&self) -> &Notify;
}

/// A worker's leases.
pub struct Cluster {
    store: Arc<dyn LeaseStore>,
    portals: Arc<dyn PortalStore>,
    users: Arc<dyn UserStore>,
    me: String,
    /// The leases this worker holds, by name.
    held: Mutex<HashSet<String>>,
    /// Others' leases looked up for routing, until the time each answer stays good.
    seen: Mutex<HashMap<String, (bool, i64)>>,
    /// Rooms and the user whose login owns them (`None`: nobody's).
    rooms: Mutex<HashMap<String, Option<String>>>,
    epoch: AtomicU64,
    changed: Notify,
    /// [`LEASE_MS`] (shorter in tests).
    lease_ms: i64,
}

impl Cluster {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        portals: Arc<dyn PortalStore>,
        users: Arc<dyn UserStore>,
        worker_id: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            portals,
            users,
            me: worker_id.to_owned(),
            held: Mutex::default(),
            seen: Mutex::default(),
            rooms: Mutex::default(),
            epoch: AtomicU64::new(0),
            changed: Notify::new(),
            lease_ms: LEASE_MS,
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.me
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn holds(&self, lease: &str) -> bool {
        self.held().contains(lease)
    }

    pub fn holds_login(&self, mxid: &str) -> bool {
        self.holds(&login_lease(mxid))
    }

    /// Takes `name` for this worker; true when it holds it now.
    async fn take(&self, name: &str) -> Result<bool, StoreError> {
        let t = now();
        let got = self
            .store
            .take_lease(name, &self.me, t + self.lease_ms, t)
            .await?
            .is_some();
        if got && !self.holds(name) {
            // The epoch moves before the routing does: a queue reader that routed an event
            // with the new lease sees the new epoch too, and starts over (see `EventRouter`).
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.held().insert(name.to_owned());
            self.changed.notify_waiters();
        }
        Ok(got)
    }

    /// The other live worker running the login of `mxid`, if one does.
    pub async fn login_worker(&self, mxid: &str) -> Result<Option<String>, StoreError> {
        let t = now();
        Ok(self
            .store
            .lease(&login_lease(mxid))
            .await?
            .filter(|l| l.holder != self.me && l.expires_at > t)
            .map(|l| l.holder))
    }

    /// Takes the login of `mxid` for this worker before it starts it (a new login); fails when
    /// another worker runs it.
    pub async fn claim_login(&self, mxid: &str) -> Result<bool, StoreError> {
        self.take(&login_lease(mxid)).await
    }

    /// Lets the login go (after a logout).
    pub async fn release_login(&self, mxid: &str) {
        let name = login_lease(mxid);
        self.held().remove(&name);
        if let Err(e) = self.store.release_lease(&name, &self.me).await {
            tracing::warn!(user = mxid, error = %e, "cannot release a login's lease; it expires by itself");
        }
    }

    /// Keeps the leases until shutdown: renews them, takes the bot's and the logins nobody runs
    /// (starting them), and stops logins it lost or let go. On shutdown it stops its logins and
    /// releases every lease, so that the other workers take over at once.
    pub async fn run(
        self: Arc<Self>,
        network: Arc<dyn Network>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut valid_until = 0i64;
        loop {
            match self.round(&*network).await {
                Ok(until) => valid_until = until,
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the worker's leases");
                    if now() >= valid_until - SAFETY_MS && !self.held().is_empty() {
                        tracing::warn!(
                            "leases about to expire unrenewed: stopping this worker's logins"
                        );
                        let names: Vec<String> = self.held().drain().collect();
                        self.stop_logins(&*network, names).await;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = shutdown.wait_for(|v| *v) => break,
            }
        }
        let names: Vec<String> = self.held().drain().collect();
        self.stop_logins(&*network, names.clone()).await;
        for name in names {
            let _ = self.store.release_lease(&name, &self.me).await;
        }
    }

    async fn stop_logins(&self, network: &dyn Network, names: Vec<String>) {
        for name in names {
            if let Some(mxid) = name.strip_prefix("login:") {
                network.stop(mxid).await;
            }
        }
    }

    /// One round; returns until when the leases are good.
    async fn round(&self, network: &dyn Network) -> Result<i64, StoreError> {
        let t = now();
        let until = t + self.lease_ms;
        let kept: HashSet<String> = self
            .store
            .renew_leases(&self.me, until, t)
            .await?
            .into_iter()
            .collect();
        let lost: Vec<String> = {
            let mut held = self.held();
            let lost = held.difference(&kept).cloned().collect();
            held.retain(|n| kept.contains(n));
            lost
        };
        if !lost.is_empty() {
            tracing::warn!(leases = lost.len(), "leases lost to other workers");
            self.stop_logins(network, lost).await;
        }
        self.take(&format!("worker:{}", self.me)).await?;
        if !self.holds(BOT) && self.take(BOT).await? {
            tracing::info!(worker = %self.me, "this worker handles the bot's rooms");
        }
        // The logins' share: counts from the database, this worker's own from what it holds
        // (just renewed), so a round reads no list of all logins.
        let workers = self.store.live_lease_count("worker:", t).await?.max(1);
        let running = self.store.live_lease_count("login:", t).await?;
        let unheld = self.store.unheld_logins(t).await?;
        let mut mine: Vec<String> = self
            .held()
            .iter()
            .filter_map(|n| n.strip_prefix("login:").map(str::to_owned))
            .collect();
        mine.sort();
        let share = (running + unheld.len()).div_ceil(workers);
        let mut started = 0;
        for mxid in unheld.iter().take(share.saturating_sub(mine.len())) {
            if self.claim_login(mxid).await? {
                started += 1;
                if let Err(e) = network.reconnect(mxid).await {
                    tracing::warn!(user = %mxid, error = %e, "cannot start a login taken over");
                }
            }
        }
        if started > 0 {
            tracing::info!(logins = started, worker = %self.me, "logins taken over");
        }
        if mine.len() > share + 1 {
            let extra = mine.len() - share;
            for mxid in mine.iter().rev().take(extra) {
                network.stop(mxid).await;
                self.release_login(mxid).await;
            }
            tracing::info!(logins = extra, worker = %self.me, "logins handed to other workers");
        }
        Ok(until)
    }

    /// The user whose login owns `room` (a portal's receiver, a management room's owner).
    async fn room_user(&self, room: &str) -> Result<Option<String>, StoreError> {
        if let Some(u) = self
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room)
        {
            return Ok(u.clone());
        }
        let user = match self.portals.portal_by_room(room).await? {
            Some(p) => Some(p.receiver.to_string()),
            None => self.users.management_room_owner(room).await?,
        };
        // Only owned rooms are remembered: an unknown room may become a portal.
        if user.is_some() {
            self.rooms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(room.to_owned(), user.clone());
        }
        Ok(user)
    }

    /// Whether another live worker holds `name` (asked of the database at most every
    /// `RENEW_EVERY` per lease).
    async fn held_elsewhere(&self, name: &str) -> Result<bool, StoreError> {
        let t = now();
        if let Some(&(held, good_until)) = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            && t < good_until
        {
            return Ok(held);
        }
        let lease = self.store.lease(name).await?;
        let held = lease
            .as_ref()
            .is_some_and(|l| l.holder != self.me && l.expires_at > t);
        let good_until = match &lease {
            Some(l) if held => l.expires_at.min(t + RENEW_EVERY.as_millis() as i64),
            _ => t + RENEW_EVERY.as_millis() as i64,
        };
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), (held, good_until));
        Ok(held)
    }

    async fn route(&self, room: Option<&str>) -> Result<bool, StoreError> {
        let Some(room) = room else {
            return Ok(self.holds(BOT));
        };
        if let Some(user) = self.room_user(room).await? {
            let name = login_lease(&user);
            if self.holds(&name) {
                return Ok(true);
            }
            if self.held_elsewhere(&name).await? {
                return Ok(false);
            }
            // A login nobody runs at this moment (its worker died): the worker that takes it
            // over takes its rooms too; until then the events wait.
            if self.portals.login(&user).await?.is_some() {
                return Ok(false);
            }
        }
        Ok(self.holds(BOT))
    }
}

#[async_trait]
impl EventRouter for Cluster {
    async fn handles(&self, room: Option<&str>) -> bool {
        match self.route(room).await {
            Ok(mine) => mine,
            Err(e) => {
                // Not now: the event stays queued, and the queue is read again from its start.
                tracing::warn!(error = %e, "cannot tell which worker handles an event");
                self.epoch.fetch_add(1, Ordering::SeqCst);
                false
            }
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn changed(&self) -> &Notify {
        &self.changed
    }
}

/// A lease held for the length of one piece of work (a device's crypto state used by one worker
/// at a time): taken with [`hold`], released when dropped. `keep` is dropped only once the
/// release is written, so that whatever it guards in this process (the next local user waits
/// on it) cannot start before the lease is free.
pub struct Hold<T: Send + 'static> {
    store: Arc<dyn LeaseStore>,
    name: String,
    holder: String,
    /// The lease's generation: it changed since this worker last held the lease exactly when
    /// another holder had it meanwhile.
    pub generation: i64,
    keep: Option<T>,
}

impl<T: Send + 'static> Hold<T> {
    pub fn kept(&mut self) -> &mut T {
        self.keep.as_mut().expect("kept until dropped")
    }
}

impl<T: Send + 'static> Drop for Hold<T> {
    fn drop(&mut self) {
        let (store, name, holder, keep) = (
            self.store.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
            self.keep.take(),
        );
        let release = async move {
            if let Err(e) = store.release_lease(&name, &holder).await {
                tracing::warn!(lease = %name, error = %e, "cannot release a lease; it expires by itself");
            }
            drop(keep);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(release);
            }
            Err(_) => {
                tracing::warn!(lease = %self.name, "no runtime to release a lease; it expires by itself")
            }
        }
    }
}

/// Takes the lease `name` for `holder` for at most `ms` milliseconds, waiting up to `patience`
/// while another holder has it. `keep` goes with the hold (see [`Hold`]).
pub async fn hold<T: Send + 'static>(
    store: &Arc<dyn LeaseStore>,
    name: &str,
    holder: &str,
    ms: i64,
    patience: Duration,
    keep: T,
) -> Result<Hold<T>, StoreError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut wait = Duration::from_millis(5);
    loop {
        let t = now();
        if let Some(generation) = store.take_lease(name, holder, t + ms, t).await? {
            return Ok(Hold {
                store: store.clone(),
                name: name.to_owned(),
                holder: holder.to_owned(),
                generation,
                keep: Some(keep),
            });
        }
        if tokio::time::Instant::now() + wait > deadline {
            return Err(StoreError::unavailable(format!(
                "{name} is held by another worker"
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::{
        memory::MemoryStore,
        model::Message,
        network::{NetAccount, NetError},
    };

    /// The logins each worker runs, as its network saw them started and stopped.
    #[derive(Default)]
    struct Net(StdMutex<HashSet<String>>);

    #[async_trait]
    impl Network for Net {
        async fn request_code(&self, _: &str) -> Result<(), NetError> {
            Ok(())
        }
        async fn verify_and_connect(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Arc<dyn NetAccount>, NetError> {
            Err(NetError::Other("not in this test".into()))
        }
        async fn reconnect(&self, mxid: &str) -> Result<Arc<dyn NetAccount>, NetError> {
            assert!(
                self.0.lock().unwrap().insert(mxid.to_owned()),
                "{mxid} started twice"
            );
            Err(NetError::Other("started (no account in this test)".into()))
        }
        async fn logout(&self, _: &str) -> Result<(), NetError> {
            Ok(())
        }
        async fn stop(&self, mxid: &str) {
            self.0.lock().unwrap().remove(mxid);
        }
        fn account(&self, _: &str) -> Option<Arc<dyn NetAccount>> {
            None
        }
        fn any_account(&self) -> Option<Arc<dyn NetAccount>> {
            None
        }
        async fn reachable(&self) -> bool {
            true
        }
        fn is_valid_account(&self, _: &str) -> bool {
            true
        }
        fn encode_message(&self, _: &Message) -> Vec<u8> {
            Vec::new()
        }
        fn decode_message(&self, _: &[u8]) -> Result<Message, NetError> {
            Err(NetError::Other("not in this test".into()))
        }
    }

    fn worker(store: &Arc<MemoryStore>, id: &str) -> (Arc<Cluster>, Arc<Net>) {
        let mut c = Cluster::new(store.clone(), store.clone(), store.clone(), id);
        Arc::get_mut(&mut c).expect("new").lease_ms = 300;
        (c, Arc::default())
    }

    fn running(n: &Net) -> usize {
        n.0.lock().unwrap().len()
    }

    /// Logins are shared out, handed over when a worker joins, taken over when one dies, and
    /// never run in two workers at once.
    #[tokio::test]
    async fn logins_are_shared_handed_over_and_taken_over() {
        let store = Arc::new(MemoryStore::default());
        for i in 0..6 {
            store.set_login(&format!("@u{i}:x"), "+1").await.unwrap();
        }
        let (a, net_a) = worker(&store, "a");
        a.round(&*net_a).await.unwrap();
        assert_eq!(running(&net_a), 6, "one worker runs them all");
        assert!(a.holds(BOT));

        // b joins: a lets go of the logins above its share plus one, b takes them.
        let (b, net_b) = worker(&store, "b");
        b.round(&*net_b).await.unwrap();
        assert_eq!(running(&net_b), 0, "nothing free yet");
        a.round(&*net_a).await.unwrap();
        b.round(&*net_b).await.unwrap();
        assert_eq!((running(&net_a), running(&net_b)), (3, 3));
        let both: HashSet<String> = net_a.0.lock().unwrap().clone();
        assert!(
            both.is_disjoint(&net_b.0.lock().unwrap()),
            "a login runs in one worker"
        );
        assert!(!b.holds(BOT), "the bot's rooms stay with a");

        // a dies (no more rounds): once its leases expire, b takes everything over.
        tokio::time::sleep(Duration::from_millis(350)).await;
        b.round(&*net_b).await.unwrap();
        assert_eq!(running(&net_b), 6);
        assert!(b.holds(BOT));
        // And routes a's rooms' events to itself: a management room of a's former login.
        store.set_management_room("@u0:x", "!mgmt:x").await.unwrap();
        assert!(b.handles(Some("!mgmt:x")).await);
        assert!(b.handles(None).await);
        // A room of a login nobody runs waits for the worker that takes the login; a room of a
        // user without a login is the bot's.
        store.set_login("@u9:x", "+1").await.unwrap();
        store
            .set_management_room("@u9:x", "!mgmt9:x")
            .await
            .unwrap();
        assert!(!b.handles(Some("!mgmt9:x")).await);
        store.delete_login("@u9:x").await.unwrap();
        assert!(b.handles(Some("!mgmt9:x")).await);
    }
}
