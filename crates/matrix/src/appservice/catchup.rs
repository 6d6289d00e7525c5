//! The catch-up after a homeserver outage: room events the homeserver stored but never sent.
//!
//! Synapse (seen with 1.163) hands an appservice's events to an in-memory queue and moves the
//! appservice's stream position past them before it stores them as a transaction. When it is
//! killed in between, those events are in rooms but never reach the bridge: a message a user
//! sent shortly before the crash is silently not bridged.
//!
//! So the bridge remembers when it last saw the homeserver well (checked every
//! [`CHECK_EVERY`], kept in the database every [`SAVE_MARK_EVERY`]). When the homeserver was
//! unreachable or failing since (a request of the bridge's saw it, or the health check), and at
//! every start, it reads back each room the bot is in to [`LOOKBACK`] before that moment and
//! queues the events it has not queued before. Every queued room event's id is remembered for a
//! week (`matrix_event_seen`), in the same database transaction that queues it, so that an event
//! is queued once whichever way it comes: a transaction, a retried one, or the catch-up. No
//! transaction is queued while a catch-up is pending: it waits for the one in progress (or runs
//! one), and is refused when the lost events are not all queued (the homeserver keeps it and
//! sends it again), so that a room's lost events come before its later ones. A catch-up that
//! keeps failing holds transactions back for at most [`MAX_HOLD`].
//!
//! The cost: one `/messages` request per room the bot is in, per outage (four at a time).
//! Not caught up: ephemeral events (receipts, typing: they are of the moment), to-device
//! messages (room keys are asked for again by the crypto layer), and invites of the bot.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{Mutex, Notify, watch};

use mib_core::store::{KvStore, TxnStore};
use mib_vault::SecretKey;

/// The clock as the store keeps it (milliseconds since the Unix epoch).
fn now_ms() -> i64 {
    mib_core::now_ms() as i64
}

/// How often the homeserver's health is checked.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often the moment the homeserver was last seen well is written down.
const SAVE_MARK_EVERY: Duration = Duration::from_secs(30);
/// How far before that moment the rooms are read back: events a homeserver held in memory
/// when it died, and clocks that differ a little.
const LOOKBACK: Duration = Duration::from_secs(60);
/// A mark older than this is not caught up from: the ids of events queued before it may have
/// been forgotten (they are kept for [`SEEN_RETENTION`]).
const MAX_MARK_AGE: Duration = Duration::from_secs(3 * 24 * 3600);
/// How long queued event ids (and transaction ids) are remembered.
pub const SEEN_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long a transaction waits for a catch-up before it is held back (answered with an error,
/// so that the homeserver sends it again later).
const TXN_WAIT: Duration = Duration::from_secs(10);
/// How long transactions are held back while catch-ups keep failing (from the first failure);
/// after that they go ahead (a room the bot cannot read back must not stall the bridge for
/// good).
pub const MAX_HOLD: Duration = Duration::from_secs(60);
/// Rooms read at the same time.
const CONCURRENCY: usize = 4;
const KV_MARK: &str = "catchup.healthy_ms";
/// Since when queued event ids are kept (the first start of a bridge that keeps them): the
/// catch-up never reads back before it, where events were queued without their ids and would
/// be queued again.
const KV_TRACKED_FROM: &str = "catchup.tracked_from_ms";

/// The homeserver's rooms, as the catch-up reads them.
#[async_trait::async_trait]
pub trait Timeline: Send + Sync {
    /// Whether the homeserver answers.
    async fn alive(&self) -> bool;
    /// The rooms the bot is in.
    async fn rooms(&self) -> Result<Vec<String>, String>;
    /// The events of `room` stamped at `since_ms` or later, oldest first, each with its
    /// `room_id`.
    async fn events_since(&self, room: &str, since_ms: i64) -> Result<Vec<Value>, String>;
    /// Whether a request saw the homeserver unreachable or failing since the last call.
    fn outage_seen(&self) -> bool;
}

/// A catch-up after an outage has not queued the lost events yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchingUp;

pub struct CatchUp {
    timeline: Arc<dyn Timeline>,
    store: Arc<dyn TxnStore>,
    kv: Arc<dyn KvStore>,
    key: SecretKey,
    notify: Arc<Notify>,
    /// Set at start and when an outage is seen; cleared by a catch-up that succeeded.
    pending: AtomicBool,
    /// Since when catch-ups have been failing (ms since the epoch; 0: none failed since the
    /// last one that succeeded).
    failing_since_ms: AtomicI64,
    /// When the homeserver was last seen well, before the outage being caught up (ms since the
    /// epoch; 0: never, nothing to catch up from).
    healthy_ms: AtomicI64,
    /// See [`KV_TRACKED_FROM`].
    tracked_from_ms: i64,
    saved_ms: AtomicI64,
    /// When the last catch-up began: a transaction does not start another within
    /// [`CHECK_EVERY`] of it (one that keeps failing is the health check's to retry).
    tried_ms: AtomicI64,
    running: Mutex<()>,
}

impl CatchUp {
    /// Starts with the mark kept in the database, and a catch-up pending (the homeserver may
    /// have lost events while the bridge was down).
    pub async fn new(
        timeline: Arc<dyn Timeline>,
        store: Arc<dyn TxnStore>,
        kv: Arc<dyn KvStore>,
        key: SecretKey,
        notify: Arc<Notify>,
    ) -> Self {
        let read = |key: &'static str| {
            let kv = kv.clone();
            async move {
                match kv.kv_get(key).await {
                    Ok(text) => text.and_then(|t| t.parse::<i64>().ok()),
                    Err(e) => {
                        tracing::warn!(error = %e, key, "cannot read a catch-up mark");
                        None
                    }
                }
            }
        };
        let mark = read(KV_MARK).await.unwrap_or(0);
        let tracked_from_ms = match read(KV_TRACKED_FROM).await {
            Some(t) => t,
            None => {
                let now = now_ms();
                if let Err(e) = kv.kv_set(KV_TRACKED_FROM, &now.to_string()).await {
                    tracing::warn!(error = %e, "cannot store the catch-up start");
                }
                now
            }
        };
        Self {
            timeline,
            store,
            kv,
            key,
            notify,
            pending: AtomicBool::new(true),
            failing_since_ms: AtomicI64::new(0),
            healthy_ms: AtomicI64::new(mark),
            tracked_from_ms,
            saved_ms: AtomicI64::new(0),
            tried_ms: AtomicI64::new(0),
            running: Mutex::new(()),
        }
    }

    /// Called by a transaction before its events are queued: when an outage was seen, the
    /// events it lost are queued first, so that a room keeps its order. The transaction waits
    /// for a catch-up in progress, or runs one (not again within [`CHECK_EVERY`] of one that
    /// failed). `Err` when the lost events are not all queued yet: the transaction is to be
    /// refused, and the homeserver sends it again later. After [`MAX_HOLD`] of failing
    /// catch-ups, transactions go ahead regardless.
    pub async fn before_transaction(&self) -> Result<(), CatchingUp> {
        if self.timeline.outage_seen() {
            self.set_pending();
            self.tried_ms.store(0, Ordering::SeqCst);
        }
        if !self.pending.load(Ordering::SeqCst) {
            return Ok(());
        }
        let attempt = async {
            let _running = self.running.lock().await;
            let tried_lately =
                now_ms() - self.tried_ms.load(Ordering::SeqCst) < CHECK_EVERY.as_millis() as i64;
            if self.pending.load(Ordering::SeqCst) && !tried_lately {
                self.catch_up_locked().await;
            }
        };
        if tokio::time::timeout(TXN_WAIT, attempt).await.is_err() {
            tracing::warn!("catch-up still running");
        }
        if !self.pending.load(Ordering::SeqCst) {
            return Ok(());
        }
        let failing_since = self.failing_since_ms.load(Ordering::SeqCst);
        let held_ms = now_ms() - failing_since;
        if failing_since != 0 && held_ms > MAX_HOLD.as_millis() as i64 {
            tracing::warn!(
                held_s = held_ms / 1000,
                "catch-up still failing; transactions go ahead without it"
            );
            return Ok(());
        }
        Err(CatchingUp)
    }

    fn set_pending(&self) {
        self.pending.store(true, Ordering::SeqCst);
    }

    /// A catch-up failed: the hold on transactions counts from the first failure.
    fn failed(&self) {
        let _ =
            self.failing_since_ms
                .compare_exchange(0, now_ms(), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The lost events are all queued.
    fn done(&self) {
        self.pending.store(false, Ordering::SeqCst);
        self.failing_since_ms.store(0, Ordering::SeqCst);
    }

    /// Watches the homeserver and catches up after outages, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_prune = tokio::time::Instant::now();
        loop {
            if self.timeline.outage_seen() || !self.timeline.alive().await {
                self.set_pending();
            } else if self.pending.load(Ordering::SeqCst) {
                self.catch_up().await;
            } else {
                self.seen_well().await;
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                let age = SEEN_RETENTION.as_millis() as i64;
                if let Err(e) = self.store.prune_transactions(age).await {
                    tracing::warn!(error = %e, "cannot prune old transaction and event ids");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The homeserver is well now: moves the mark (and writes it down now and then).
    async fn seen_well(&self) {
        let now = now_ms();
        self.healthy_ms.store(now, Ordering::SeqCst);
        if now - self.saved_ms.load(Ordering::SeqCst) < SAVE_MARK_EVERY.as_millis() as i64 {
            return;
        }
        match self.kv.kv_set(KV_MARK, &now.to_string()).await {
            Ok(()) => self.saved_ms.store(now, Ordering::SeqCst),
            Err(e) => tracing::warn!(error = %e, "cannot store the catch-up mark"),
        }
    }

    /// Queues the room events since the mark that were never queued.
    async fn catch_up(&self) {
        let _running = self.running.lock().await;
        self.catch_up_locked().await;
    }

    /// [`Self::catch_up`] with `running` held.
    async fn catch_up_locked(&self) {
        if !self.pending.load(Ordering::SeqCst) {
            return; // Done while this one waited.
        }
        self.tried_ms.store(now_ms(), Ordering::SeqCst);
        let mark = self.healthy_ms.load(Ordering::SeqCst);
        let age = now_ms() - mark;
        if mark == 0 || age > MAX_MARK_AGE.as_millis() as i64 {
            if mark != 0 {
                tracing::warn!(
                    mark_age_s = age / 1000,
                    "the catch-up mark is too old to catch up from"
                );
            }
            self.done();
            self.seen_well().await;
            return;
        }
        let since = (mark - LOOKBACK.as_millis() as i64).max(self.tracked_from_ms);
        let rooms = match self.timeline.rooms().await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::warn!(error = %e, "catch-up: cannot list the rooms; will try again");
                self.failed();
                return;
            }
        };
        let results: Vec<Result<usize, String>> = futures::stream::iter(rooms.clone())
            .map(|room| async move { self.catch_up_room(&room, since).await })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let queued: usize = results.iter().filter_map(|r| r.as_ref().ok()).sum();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if queued > 0 {
            self.notify.notify_one();
        }
        if let Some(first) = failed.first() {
            tracing::warn!(rooms = rooms.len(), failed = failed.len(), queued, error = %first, "catch-up incomplete; will try again");
            self.failed();
            return;
        }
        if queued > 0 {
            tracing::warn!(
                rooms = rooms.len(),
                queued,
                "catch-up: queued events the homeserver never sent"
            );
        } else {
            tracing::info!(
                rooms = rooms.len(),
                "catch-up: the homeserver lost no events"
            );
        }
        self.done();
        self.seen_well().await;
    }

    /// Queues one room's events since `since` that were never queued; returns how many.
    async fn catch_up_room(&self, room: &str, since: i64) -> Result<usize, String> {
        let events = self.timeline.events_since(room, since).await?;
        let sealed: Vec<_> = events
            .into_iter()
            .filter(|ev| ev["event_id"].is_string() && ev["room_id"].is_string())
            .map(|ev| super::seal(&self.key, "pdu", ev))
            .collect();
        self.store
            .queue_missed(&sealed)
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex as StdMutex};

    use serde_json::json;

    use super::*;
    use mib_core::store::{QueuedEvent, StoreError, StoredEvent, TxnOutcome};

    #[derive(Default)]
    struct FakeHs {
        down: AtomicBool,
        /// How long reading a room takes.
        read_ms: std::sync::atomic::AtomicU64,
        outage: AtomicBool,
        /// Per room: (timestamp, event id), oldest first.
        rooms: StdMutex<HashMap<String, Vec<(i64, String)>>>,
    }

    impl FakeHs {
        fn post(&self, room: &str, id: &str, ts: i64) {
            let mut rooms = self.rooms.lock().unwrap();
            rooms.entry(room.into()).or_default().push((ts, id.into()));
        }
    }

    #[async_trait::async_trait]
    impl Timeline for FakeHs {
        async fn alive(&self) -> bool {
            !self.down.load(Ordering::SeqCst)
        }
        async fn rooms(&self) -> Result<Vec<String>, String> {
            if self.down.load(Ordering::SeqCst) {
                return Err("down".into());
            }
            let mut rooms: Vec<String> = self.rooms.lock().unwrap().keys().cloned().collect();
            rooms.sort();
            Ok(rooms)
        }
        async fn events_since(&self, room: &str, since_ms: i64) -> Result<Vec<Value>, String> {
            let read_ms = self.read_ms.load(Ordering::SeqCst);
            if read_ms > 0 {
                tokio::time::sleep(Duration::from_millis(read_ms)).await;
            }
            if room == "!broken:x" {
                return Err("500".into());
            }
            let rooms = self.rooms.lock().unwrap();
            Ok(rooms[room]
                .iter()
                .filter(|(ts, _)| *ts >= since_ms)
                .map(|(_, id)| json!({"event_id": id, "room_id": room, "type": "m.room.message"}))
                .collect())
        }
        fn outage_seen(&self) -> bool {
            self.outage.swap(false, Ordering::SeqCst)
        }
    }

    #[derive(Default)]
    struct FakeStore {
        seen: StdMutex<std::collections::HashSet<String>>,
        queued: StdMutex<Vec<String>>,
        kv: StdMutex<HashMap<String, String>>,
    }

    #[async_trait::async_trait]
    impl TxnStore for FakeStore {
        async fn recorded_transactions(
            &self,
            _: &[String],
        ) -> Result<Vec<String>, mib_core::store::StoreError> {
            Ok(Vec::new())
        }

        async fn apply_transaction(
            &self,
            _: &str,
            _: &[u8],
            events: &[QueuedEvent],
        ) -> Result<TxnOutcome, StoreError> {
            self.queue_missed(events).await?;
            Ok(TxnOutcome::Applied)
        }
        async fn queued_events_after(
            &self,
            _: i64,
            _: i64,
        ) -> Result<Vec<StoredEvent>, StoreError> {
            Ok(vec![])
        }
        async fn queue_missed(&self, events: &[QueuedEvent]) -> Result<usize, StoreError> {
            let mut n = 0;
            for ev in events {
                let id = ev.event_id.clone().expect("id");
                if self.seen.lock().unwrap().insert(id.clone()) {
                    self.queued.lock().unwrap().push(id);
                    n += 1;
                }
            }
            Ok(n)
        }
        async fn remove_events(&self, _: &[i64]) -> Result<(), StoreError> {
            Ok(())
        }
        async fn count_attempt(&self, _: i64) -> Result<(), StoreError> {
            Ok(())
        }
        async fn prune_transactions(&self, _: i64) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    #[async_trait::async_trait]
    impl KvStore for FakeStore {
        async fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError> {
            Ok(self.kv.lock().unwrap().get(key).cloned())
        }
        async fn kv_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
            self.kv.lock().unwrap().insert(key.into(), value.into());
            Ok(())
        }
    }

    async fn start(hs: &Arc<FakeHs>, store: &Arc<FakeStore>) -> CatchUp {
        CatchUp::new(
            hs.clone(),
            store.clone(),
            store.clone(),
            SecretKey::random(),
            Arc::new(Notify::new()),
        )
        .await
    }

    async fn deliver(c: &CatchUp, store: &FakeStore, id: &str) {
        c.before_transaction().await.expect("not held");
        let ev = super::super::seal(&c.key, "pdu", json!({"event_id": id, "room_id": "!r:x"}));
        store.apply_transaction("t", b"h", &[ev]).await.unwrap();
    }

    #[tokio::test]
    async fn events_lost_in_an_outage_are_queued_once_and_before_the_next_transaction() {
        let hs = Arc::new(FakeHs::default());
        let store = Arc::new(FakeStore::default());
        // Stamped a little ahead, so that they are after the start whatever the clock does.
        let now = now_ms() + 1_000;
        hs.post("!r:x", "$long-ago", now - 3_600_000);
        let c = start(&hs, &store).await;
        // First start: nothing to catch up from; from now on there is.
        deliver(&c, &store, "$0").await;
        hs.post("!r:x", "$0", now);
        // $1 (and $2 in another room) were lost when the homeserver died.
        hs.post("!r:x", "$1", now);
        hs.post("!s:x", "$2", now);
        hs.outage.store(true, Ordering::SeqCst);
        deliver(&c, &store, "$3").await;
        hs.post("!r:x", "$3", now);
        assert_eq!(*store.queued.lock().unwrap(), ["$0", "$1", "$2", "$3"]);
        // Another outage: nothing comes twice.
        hs.outage.store(true, Ordering::SeqCst);
        deliver(&c, &store, "$4").await;
        assert_eq!(
            *store.queued.lock().unwrap(),
            ["$0", "$1", "$2", "$3", "$4"]
        );

        // A restart catches up from the mark kept in the database.
        hs.post("!r:x", "$5", now);
        let c = start(&hs, &store).await;
        deliver(&c, &store, "$6").await;
        assert_eq!(
            *store.queued.lock().unwrap(),
            ["$0", "$1", "$2", "$3", "$4", "$5", "$6"]
        );
    }

    /// Events from before the bridge kept queued event ids were queued without them: reading
    /// back never reaches them, however soon the next outage comes.
    #[tokio::test]
    async fn the_catch_up_never_reads_back_before_ids_were_kept() {
        let hs = Arc::new(FakeHs::default());
        let store = Arc::new(FakeStore::default());
        let now = now_ms();
        hs.post("!r:x", "$before-upgrade", now - 5_000);
        let c = start(&hs, &store).await;
        c.before_transaction().await.expect("first start"); // sets the mark
        hs.post("!r:x", "$lost", now_ms());
        hs.outage.store(true, Ordering::SeqCst);
        c.before_transaction().await.expect("caught up");
        assert_eq!(*store.queued.lock().unwrap(), ["$lost"]);
    }

    /// A transaction that comes while a catch-up is running (the one at start, or the health
    /// check's) waits for it: its events are queued after the lost ones.
    #[tokio::test]
    async fn a_transaction_waits_for_the_catch_up_in_progress() {
        let hs = Arc::new(FakeHs::default());
        let store = Arc::new(FakeStore::default());
        let c = Arc::new(start(&hs, &store).await);
        c.before_transaction().await.expect("first start"); // sets the mark
        hs.post("!r:x", "$lost", now_ms());
        c.pending.store(true, Ordering::SeqCst);
        hs.read_ms.store(300, Ordering::SeqCst);
        let running = tokio::spawn({
            let c = c.clone();
            async move { c.catch_up().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        deliver(&c, &store, "$next").await;
        running.await.expect("catch-up");
        assert_eq!(*store.queued.lock().unwrap(), ["$lost", "$next"]);
    }

    /// A catch-up that fails holds transactions back (the homeserver keeps them and sends them
    /// again) instead of queueing them ahead of the lost events; it keeps what it got, and
    /// after [`MAX_HOLD`] transactions go ahead so that one unreadable room cannot stall the
    /// bridge.
    #[tokio::test]
    async fn a_catch_up_that_fails_holds_transactions_back_for_a_while() {
        let hs = Arc::new(FakeHs::default());
        let store = Arc::new(FakeStore::default());
        let c = start(&hs, &store).await;
        c.before_transaction().await.expect("first start"); // sets the mark
        hs.post("!r:x", "$1", now_ms());
        hs.post("!broken:x", "$b", now_ms());
        hs.outage.store(true, Ordering::SeqCst);
        assert!(c.before_transaction().await.is_err(), "held back");
        assert!(c.pending.load(Ordering::SeqCst), "still pending");
        assert_eq!(*store.queued.lock().unwrap(), ["$1"]);
        // The homeserver sends it again at once: held back without another read.
        assert!(c.before_transaction().await.is_err(), "held back again");
        // Later, the room can be read: the transaction goes through after the catch-up.
        hs.rooms.lock().unwrap().remove("!broken:x");
        c.tried_ms.store(0, Ordering::SeqCst);
        c.before_transaction().await.expect("caught up");
        assert!(!c.pending.load(Ordering::SeqCst));
        assert_eq!(*store.queued.lock().unwrap(), ["$1"]);

        // A room that never reads: held back until MAX_HOLD, then let through.
        hs.post("!broken:x", "$b2", now_ms());
        hs.outage.store(true, Ordering::SeqCst);
        assert!(c.before_transaction().await.is_err(), "held back");
        // However long the outage was, the hold counts from the first failed catch-up.
        assert!(now_ms() - c.failing_since_ms.load(Ordering::SeqCst) < 5_000);
        c.failing_since_ms
            .store(now_ms() - MAX_HOLD.as_millis() as i64 - 1, Ordering::SeqCst);
        c.before_transaction()
            .await
            .expect("let through after MAX_HOLD");
    }
}
