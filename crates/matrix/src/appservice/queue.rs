//! The queue worker: takes sealed events out of the durable queue in arrival order, hands them to
//! the bridge core, and deletes each one once it has been handled (a task of its own deletes the
//! handled events in batches, off the rooms' lanes).
//!
//! One dispatcher reads the queue; events without a room (crypto changes) are handled by the
//! dispatcher itself, before any later event is handed on, and each room's events go to that
//! room's lane: a task that handles them one after the other. Rooms do not wait for each other,
//! and an event that fails with a retryable error is retried with backoff in its lane, holding up
//! only its room's later events; after `MAX_ATTEMPTS` it is dropped with an error in the log (it
//! never blocks a room for good). A lane ends when its room has been quiet for a while.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinSet,
};

use ruma::events::{AnySyncEphemeralRoomEvent, AnyTimelineEvent};

use super::{QUEUE_AD, QueueItem};
use crate::crypto::{Crypto, CryptoChanges, CryptoError};
use mib_core::{
    BridgeError, MatrixEventHandler, RetryClass,
    cluster::EventRouter,
    metrics::Metrics,
    store::{StoredEvent, TxnStore},
};
use mib_vault::SecretKey;

const BATCH: i64 = 100;
/// Attempts for an event that failed transiently (homeserver unreachable, 5xx): with the
/// backoff below, about a minute.
const MAX_ATTEMPTS: i64 = 8;
/// Attempts for an event that waits for something coming by itself (a login still connecting
/// after a restart, a gateway that is down): with the backoff capped at `MAX_BACKOFF`, about
/// 17 minutes.
const MAX_WAIT_ATTEMPTS: i64 = 40;
/// Attempts for an encrypted event whose room key has not arrived: it keeps its place in its
/// room's lane (later events of the room wait behind it) for about a minute and a half, woken
/// early when keys arrive.
const KEY_WAIT_ATTEMPTS: i64 = 10;
/// A lane with nothing to do for this long ends (a new event starts a new one).
const LANE_IDLE: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest rate-limit wait honoured as asked; longer ones are cut to this.
const MAX_RATE_WAIT: Duration = Duration::from_secs(120);

pub struct QueueWorker {
    pub store: Arc<dyn TxnStore>,
    pub key: SecretKey,
    pub notify: Arc<Notify>,
    pub handler: Arc<dyn MatrixEventHandler>,
    pub metrics: Metrics,
    /// The bot's crypto device, when encryption is allowed.
    pub crypto: Option<Arc<Crypto>>,
    /// With several workers on one database: which queued events are this worker's. Without
    /// it every event is.
    pub router: Option<Arc<dyn EventRouter>>,
}

/// How often a worker of several looks for events the others queued, when the database cannot
/// tell it (the listener is reconnecting, say).
const SHARED_QUEUE_POLL: Duration = Duration::from_millis(200);
/// The same when the database tells the workers of each other's queued events (PostgreSQL's
/// LISTEN/NOTIFY): a look now and then, in case a notification went missing.
const SHARED_QUEUE_LISTENING_POLL: Duration = Duration::from_secs(2);

/// Events handed to a lane (or being handled) and not yet out of the queue: reading the queue
/// again from its start (after a worker took over rooms) skips them.
type InFlight = Arc<Mutex<std::collections::HashSet<i64>>>;

fn in_flight(set: &InFlight) -> std::sync::MutexGuard<'_, std::collections::HashSet<i64>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

type Lanes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<StoredEvent>>>>;

/// What became of one attempt at an event.
enum Outcome {
    /// Handled, or given up on (and reported): it leaves the queue.
    Done,
    /// Try again after this long (`None`: the lane's backoff); `key` when it waits for a room
    /// key, so that arriving keys wake it early.
    Retry { after: Option<Duration>, key: bool },
}

/// Handled events taken out of the queue in one statement.
const MAX_REMOVALS: usize = 512;
/// How long the remover gathers handled events before it deletes them: under load a delete
/// then takes many events instead of one (lanes finish one event at a time); an event handled
/// but not yet deleted stays out of the dispatcher's way through the in-flight set.
const REMOVAL_GATHER: Duration = Duration::from_millis(5);

/// Takes handled events out of the queue, off the lanes' path: whatever the lanes finished
/// meanwhile goes in one statement, so a busy queue costs one delete per batch rather than one
/// per event. A delete that fails is tried again (until shutdown: an event handled but still
/// queued at a stop or a crash is handled again at the next start, and its effects are
/// idempotent: the message map and the stable transaction ids see to that).
async fn remove_handled(
    store: Arc<dyn TxnStore>,
    mut handled: mpsc::UnboundedReceiver<i64>,
    flying: InFlight,
    shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::new();
    while handled.recv_many(&mut batch, MAX_REMOVALS).await > 0 {
        if batch.len() < MAX_REMOVALS && !*shutdown.borrow() {
            tokio::time::sleep(REMOVAL_GATHER).await;
            while batch.len() < MAX_REMOVALS
                && let Ok(seq) = handled.try_recv()
            {
                batch.push(seq);
            }
        }
        let mut backoff = FIRST_BACKOFF;
        while let Err(e) = store.remove_events(&batch).await {
            if *shutdown.borrow() {
                tracing::warn!(error = %e, events = batch.len(), "cannot dequeue handled events at shutdown; they are handled again at the next start");
                break;
            }
            tracing::error!(error = %e, "cannot dequeue handled events");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        {
            let mut f = in_flight(&flying);
            for seq in &batch {
                f.remove(seq);
            }
        }
        batch.clear();
    }
}

impl QueueWorker {
    /// Runs until `shutdown` turns true; the events in hand are finished first, the rest stay
    /// queued for the next start.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let lanes: Lanes = Arc::default();
        let mut tasks = JoinSet::new();
        let (done, handled) = mpsc::unbounded_channel();
        let flying = InFlight::default();
        let remover = tokio::spawn(remove_handled(
            this.store.clone(),
            handled,
            flying.clone(),
            shutdown.clone(),
        ));
        // Events up to this sequence number have been handed out (or passed over as another
        // worker's).
        let mut dispatched = 0i64;
        let mut epoch = this.router.as_ref().map(|r| r.epoch());
        let mut backoff = FIRST_BACKOFF;
        let shared_poll = match &this.router {
            Some(_) if this.store.watch_queue(this.notify.clone()) => SHARED_QUEUE_LISTENING_POLL,
            _ => SHARED_QUEUE_POLL,
        };
        while !*shutdown.borrow() {
            if let Some(r) = &this.router
                && epoch != Some(r.epoch())
            {
                // Leases taken over: what was passed over may be this worker's now.
                epoch = Some(r.epoch());
                dispatched = 0;
            }
            let batch = match this.store.queued_events_after(dispatched, BATCH).await {
                Ok(b) => {
                    backoff = FIRST_BACKOFF;
                    b
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the event queue");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    Vec::new()
                }
            };
            if batch.is_empty() {
                let poll = match &this.router {
                    Some(_) => shared_poll.max(backoff - FIRST_BACKOFF),
                    None => backoff.max(Duration::from_secs(1)),
                };
                let router_changed = async {
                    match &this.router {
                        Some(r) => r.changed().notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = this.notify.notified() => {}
                    _ = router_changed => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            for ev in batch {
                if in_flight(&flying).contains(&ev.seq) {
                    dispatched = ev.seq;
                    continue;
                }
                if let Some(r) = &this.router {
                    let mine = r.handles(ev.room_id.as_deref()).await;
                    if epoch != Some(r.epoch()) {
                        // Leases changed during this pass: events passed over earlier in it
                        // may be this worker's now and must go first. Start over.
                        break;
                    }
                    if !mine {
                        dispatched = ev.seq;
                        continue;
                    }
                }
                dispatched = ev.seq;
                in_flight(&flying).insert(ev.seq);
                let Some(room) = ev.room_id.clone() else {
                    this.handle_until_done(ev, &done, &flying, &mut shutdown.clone())
                        .await;
                    continue;
                };
                let mut map = lanes.lock().unwrap_or_else(|p| p.into_inner());
                // A lane only goes away while holding the lock and with nothing queued; one
                // whose task died is replaced.
                let ev = match map.get(&room) {
                    Some(tx) => match tx.send(ev) {
                        Ok(()) => continue,
                        Err(mpsc::error::SendError(ev)) => ev,
                    },
                    None => ev,
                };
                let (tx, rx) = mpsc::unbounded_channel();
                tasks.spawn(this.clone().lane(
                    room.clone(),
                    rx,
                    lanes.clone(),
                    done.clone(),
                    flying.clone(),
                    shutdown.clone(),
                ));
                let _ = tx.send(ev);
                map.insert(room, tx);
            }
            while tasks.try_join_next().is_some() {}
        }
        // Lanes finish the event in hand and stop; what they had not started stays queued.
        lanes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        while tasks.join_next().await.is_some() {}
        // What was handled leaves the queue before the worker returns.
        drop(done);
        let _ = remover.await;
    }

    /// One room's events, in order.
    async fn lane(
        self: Arc<Self>,
        room: String,
        mut rx: mpsc::UnboundedReceiver<StoredEvent>,
        lanes: Lanes,
        done: mpsc::UnboundedSender<i64>,
        flying: InFlight,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let ev = match tokio::time::timeout(LANE_IDLE, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return,
                Err(_) => {
                    let mut map = lanes.lock().unwrap_or_else(|p| p.into_inner());
                    if rx.is_empty() {
                        map.remove(&room);
                        return;
                    }
                    continue;
                }
            };
            if *shutdown.borrow() {
                return;
            }
            self.handle_until_done(ev, &done, &flying, &mut shutdown)
                .await;
        }
    }

    /// Handles an event, retrying with backoff, until it is done (or the bridge shuts down);
    /// then hands its sequence number to `done` to be taken out of the queue.
    async fn handle_until_done(
        &self,
        mut ev: StoredEvent,
        done: &mpsc::UnboundedSender<i64>,
        flying: &InFlight,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            // A worker of several: the room may have gone to another worker meanwhile (this one
            // lost the login's lease); the event stays queued for it.
            if let Some(r) = &self.router
                && !r.handles(ev.room_id.as_deref()).await
            {
                in_flight(flying).remove(&ev.seq);
                return;
            }
            let Outcome::Retry { after, key } = self.handle_one(&ev).await else {
                break;
            };
            ev.attempts += 1;
            let keys = async {
                match (&self.crypto, key) {
                    (Some(c), true) => c.keys_arrived.notified().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(after.unwrap_or(backoff)) => {}
                _ = keys => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        // Handled: it leaves the queue.
        let _ = done.send(ev.seq);
    }

    /// One attempt at a queued event; a panic while handling it counts as giving up on it (it
    /// would only panic again).
    async fn handle_one(&self, ev: &StoredEvent) -> Outcome {
        use futures::FutureExt;
        match std::panic::AssertUnwindSafe(self.attempt(ev))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(seq = ev.seq, "handling an event panicked; dropping it");
                self.metrics.errors.inc();
                Outcome::Done
            }
        }
    }

    async fn attempt(&self, ev: &StoredEvent) -> Outcome {
        let item: Option<QueueItem> = self
            .key
            .open(QUEUE_AD, &ev.sealed)
            .ok()
            .and_then(|plain| serde_json::from_slice(&plain).ok());
        let Some(item) = item else {
            tracing::error!(
                seq = ev.seq,
                "dropping a queued event that cannot be opened"
            );
            return Outcome::Done;
        };
        // Notices sent while handling it get ids derived from the event: a retry after a
        // failure or a crash does not send them twice.
        let key = match item.event["event_id"].as_str() {
            Some(id) => format!("matrix:{id}"),
            None => format!("queue:{}", ev.seq),
        };
        mib_core::handling_event(key, self.attempt_item(ev, item)).await
    }

    async fn attempt_item(&self, ev: &StoredEvent, item: QueueItem) -> Outcome {
        let result = match item.kind.as_str() {
            "pdu" => self.pdu(&item.event, ev.attempts == 0).await,
            "ephemeral" => self.ephemeral(&item.event).await,
            "crypto" => {
                if let (Some(crypto), Ok(changes)) = (
                    &self.crypto,
                    serde_json::from_value::<CryptoChanges>(item.event.clone()),
                ) && let Err(e) = crypto.receive(&changes).await
                {
                    tracing::warn!(error = %e, "cannot process crypto changes");
                }
                Ok(())
            }
            _ => Ok(()),
        };
        let Err(e) = result else {
            return Outcome::Done;
        };
        let class = e.retry_class();
        let budget = match class {
            RetryClass::Permanent | RetryClass::UntilTarget => 0,
            RetryClass::Transient => MAX_ATTEMPTS,
            RetryClass::After(_) | RetryClass::Waiting => match e {
                BridgeError::MissingRoomKey => KEY_WAIT_ATTEMPTS,
                _ => MAX_WAIT_ATTEMPTS,
            },
        };
        self.metrics.errors.inc();
        if ev.attempts + 1 < budget {
            tracing::warn!(seq = ev.seq, attempt = ev.attempts + 1, error = %e, "event handling failed, will retry");
            if let Err(e) = self.store.count_attempt(ev.seq).await {
                tracing::error!(error = %e, "cannot count attempt");
            }
            return Outcome::Retry {
                after: match class {
                    RetryClass::After(d) => Some(d.min(MAX_RATE_WAIT)),
                    _ => None,
                },
                key: matches!(e, BridgeError::MissingRoomKey),
            };
        }
        // Given up: the sender hears of it in the room, not only the log.
        tracing::error!(seq = ev.seq, error = %e, "giving up on an event");
        let reported = match (&e, item.kind.as_str()) {
            (BridgeError::MissingRoomKey, _) => {
                let room = item.event["room_id"].as_str().unwrap_or_default();
                let sender = item.event["sender"].as_str().unwrap_or_default();
                self.handler
                    .undecryptable(room, sender, "its room key did not arrive")
                    .await
            }
            (_, "pdu") => match serde_json::from_value(item.event.clone()) {
                Ok(typed) => self.handler.not_handled(&typed, &e).await,
                Err(_) => Ok(()),
            },
            _ => Ok(()),
        };
        if let Err(e) = reported {
            tracing::warn!(error = %e, "cannot report a failed event");
        }
        Outcome::Done
    }

    /// Hands a room event to the core, typed; one that is not valid Matrix is reported.
    async fn room_event(&self, ev: &serde_json::Value) -> Result<(), BridgeError> {
        match serde_json::from_value::<AnyTimelineEvent>(ev.clone()) {
            Ok(typed) => self.handler.handle_matrix_event(&typed).await,
            Err(e) => {
                let field = |k: &str| ev[k].as_str().unwrap_or_default().to_owned();
                let ty: String = field("type").chars().take(100).collect();
                tracing::warn!(room_id = %field("room_id"), event_type = %ty, error = %e, "a room event that is not valid Matrix");
                self.metrics.refused("malformed_event");
                self.handler
                    .malformed(&field("room_id"), &field("sender"), &ty, &e.to_string())
                    .await
            }
        }
    }

    /// Receipts and typing, typed; other ephemeral events are not the core's.
    async fn ephemeral(&self, ev: &serde_json::Value) -> Result<(), BridgeError> {
        let Some(room) = ev["room_id"].as_str() else {
            return Ok(());
        };
        match serde_json::from_value::<AnySyncEphemeralRoomEvent>(ev.clone()) {
            Ok(typed) => self.handler.handle_ephemeral(room, &typed).await,
            Err(e) => {
                tracing::debug!(error = %e, "an ephemeral event that is not valid Matrix");
                Ok(())
            }
        }
    }

    /// A timeline event: encryption state is noted, encrypted events are decrypted first.
    async fn pdu(&self, ev: &serde_json::Value, first_attempt: bool) -> Result<(), BridgeError> {
        let room = ev["room_id"].as_str().unwrap_or_default().to_owned();
        let sender = ev["sender"].as_str().unwrap_or_default().to_owned();
        match ev["type"].as_str().unwrap_or_default() {
            "m.room.encryption" if ev.get("state_key").is_some() => {
                if let Some(c) = &self.crypto {
                    c.mark_encrypted(&room).await;
                }
                self.room_event(ev).await
            }
            "m.room.encrypted" => {
                let Some(crypto) = self.crypto.clone() else {
                    return self
                        .handler
                        .undecryptable(&room, &sender, "encryption is not enabled on this bridge")
                        .await;
                };
                match crypto.decrypt(&room, ev).await {
                    Ok(plain) => self.room_event(&plain).await,
                    Err(CryptoError::NotAllowed(ty)) => {
                        tracing::warn!(%room, %sender, event_type = %ty, "dropping an encrypted event of a type that may not be encrypted");
                        self.metrics.refused("encrypted_non_message");
                        Ok(())
                    }
                    Err(CryptoError::MissingKey) => {
                        // Asked for once; the event keeps its place in its room's lane while
                        // the key is on its way.
                        if first_attempt {
                            crypto.request_key(&room, ev).await;
                        }
                        Err(BridgeError::MissingRoomKey)
                    }
                    // The crypto store away (a database outage) or the device busy in another
                    // worker: the event waits, it is not undecryptable.
                    Err(e @ (CryptoError::Store(_) | CryptoError::Matrix(_))) => {
                        Err(BridgeError::NotReady(e.to_string()))
                    }
                    Err(e) => {
                        self.handler
                            .undecryptable(&room, &sender, &e.to_string())
                            .await
                    }
                }
            }
            _ => self.room_event(ev).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use async_trait::async_trait;
    use serde_json::json;

    use super::*;
    use mib_core::store::QueuedEvent;
    use mib_store::testing;

    /// Records handled events; every event of room `!stuck` fails (retryably) until released.
    #[derive(Default)]
    struct Recorder {
        handled: StdMutex<Vec<String>>,
        reported: StdMutex<Vec<String>>,
        release: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl MatrixEventHandler for Recorder {
        async fn handle_matrix_event(&self, ev: &AnyTimelineEvent) -> Result<(), BridgeError> {
            let room = ev.room_id().as_str();
            if room == "!stuck:x" && !self.release.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(BridgeError::Matrix("homeserver away".into()));
            }
            if room == "!refused:x" && ev.event_id() == "$r1" {
                return Err(BridgeError::MatrixRefused("413 M_TOO_LARGE".into()));
            }
            let id = ev.event_id().to_string();
            self.handled.lock().expect("lock").push(id);
            Ok(())
        }
        async fn malformed(
            &self,
            room: &str,
            sender: &str,
            ty: &str,
            _reason: &str,
        ) -> Result<(), BridgeError> {
            self.reported
                .lock()
                .expect("lock")
                .push(format!("malformed {ty} in {room} from {sender}"));
            Ok(())
        }
        async fn not_handled(
            &self,
            ev: &AnyTimelineEvent,
            e: &BridgeError,
        ) -> Result<(), BridgeError> {
            self.reported
                .lock()
                .expect("lock")
                .push(format!("{} {e}", ev.event_id()));
            Ok(())
        }
    }

    fn queued(key: &SecretKey, room: &str, id: &str) -> QueuedEvent {
        let item = QueueItem {
            kind: "pdu".into(),
            event: json!({"type": "m.room.message", "room_id": room, "event_id": id, "sender": "@u:x",
            "origin_server_ts": 1, "content": if room == "!malformed:x" {
                json!({"msgtype": "m.text"})
            } else {
                json!({"msgtype": "m.text", "body": "hi"})
            }}),
        };
        QueuedEvent {
            room_id: Some(room.into()),
            event_id: Some(id.into()),
            sealed: key.seal(QUEUE_AD, &serde_json::to_vec(&item).expect("json")),
        }
    }

    struct Running {
        store: Arc<dyn TxnStore>,
        recorder: Arc<Recorder>,
        stop: watch::Sender<bool>,
        running: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    /// A worker over a fresh queue holding `(room, event id)` messages in this order.
    async fn run_worker(events: &[(&str, &str)]) -> Running {
        run_routed_worker(events, None).await
    }

    async fn run_routed_worker(
        events: &[(&str, &str)],
        router: Option<Arc<dyn EventRouter>>,
    ) -> Running {
        let (store, dir) = testing::sqlite().await;
        let store: Arc<dyn TxnStore> = Arc::new(store);
        let key = SecretKey::random();
        let events: Vec<_> = events
            .iter()
            .map(|(room, id)| queued(&key, room, id))
            .collect();
        store
            .apply_transaction("t1", b"h", &events)
            .await
            .expect("queue");
        let recorder = Arc::new(Recorder::default());
        let worker = QueueWorker {
            store: store.clone(),
            key,
            notify: Arc::new(Notify::new()),
            handler: recorder.clone(),
            metrics: Metrics::new(),
            crypto: None,
            router,
        };
        let (stop, stop_rx) = watch::channel(false);
        let running = tokio::spawn(worker.run(stop_rx));
        Running {
            store,
            recorder,
            stop,
            running,
            _dir: dir,
        }
    }

    /// A worker of several that takes a room over while it reads the queue: its first answers
    /// say "not mine", then the lease arrives (the epoch moves first, as `Cluster` does).
    struct Takeover {
        asked: std::sync::atomic::AtomicUsize,
        epoch: std::sync::atomic::AtomicU64,
        changed: Notify,
    }

    #[async_trait]
    impl EventRouter for Takeover {
        async fn handles(&self, _room: Option<&str>) -> bool {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.asked.fetch_add(1, SeqCst);
            if n == 2 {
                self.epoch.fetch_add(1, SeqCst);
            }
            n >= 2
        }
        fn epoch(&self) -> u64 {
            self.epoch.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn changed(&self) -> &Notify {
            &self.changed
        }
    }

    /// Leases that change in the middle of a pass over the queue do not reorder a room: the
    /// events passed over before the change come before the ones after it.
    #[tokio::test]
    async fn a_room_taken_over_during_a_pass_keeps_its_order() {
        let router = Arc::new(Takeover {
            asked: Default::default(),
            epoch: Default::default(),
            changed: Notify::new(),
        });
        let ids = ["$1", "$2", "$3", "$4", "$5"];
        let events: Vec<(&str, &str)> = ids.iter().map(|id| ("!r:x", *id)).collect();
        let w = run_routed_worker(&events, Some(router)).await;
        for _ in 0..300 {
            if w.recorder.handled.lock().expect("lock").len() == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*w.recorder.handled.lock().expect("lock"), ids);
        let _ = w.stop.send(true);
    }

    /// An event that is not valid Matrix is reported once, not handled and not retried; the
    /// events after it go on.
    #[tokio::test]
    async fn an_event_that_does_not_parse_is_reported_and_skipped() {
        let w = run_worker(&[("!malformed:x", "$m1"), ("!ok:x", "$o1")]).await;
        for _ in 0..200 {
            if !w.recorder.handled.lock().expect("lock").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*w.recorder.handled.lock().expect("lock"), ["$o1"]);
        assert_eq!(
            *w.recorder.reported.lock().expect("lock"),
            ["malformed m.room.message in !malformed:x from @u:x"]
        );
        let _ = w.stop.send(true);
    }

    #[tokio::test]
    async fn a_failing_room_holds_up_only_itself_and_keeps_its_order() {
        let w = run_worker(&[
            ("!stuck:x", "$s1"),
            ("!ok:x", "$o1"),
            ("!stuck:x", "$s2"),
            ("!ok:x", "$o2"),
        ])
        .await;
        let wait_for = |n: usize| {
            let recorder = w.recorder.clone();
            async move {
                for _ in 0..200 {
                    if recorder.handled.lock().expect("lock").len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!(
                    "only {:?} were handled",
                    recorder.handled.lock().expect("lock")
                );
            }
        };
        // The other room goes on while the first one retries.
        wait_for(2).await;
        assert_eq!(*w.recorder.handled.lock().expect("lock"), ["$o1", "$o2"]);
        // Once the homeserver is back, the stuck room's events follow in their order.
        w.recorder
            .release
            .store(true, std::sync::atomic::Ordering::SeqCst);
        wait_for(4).await;
        assert_eq!(
            *w.recorder.handled.lock().expect("lock"),
            ["$o1", "$o2", "$s1", "$s2"]
        );
        // Handled events leave the queue.
        for _ in 0..100 {
            if w.store.queued_events(10).await.expect("queue").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(w.store.queued_events(10).await.expect("queue").is_empty());
        let _ = w.stop.send(true);
        w.running.await.expect("worker");
    }

    #[tokio::test]
    async fn a_permanent_failure_is_reported_once_and_does_not_hold_up_its_room() {
        let w = run_worker(&[("!refused:x", "$r1"), ("!refused:x", "$r2")]).await;
        for _ in 0..200 {
            if w.recorder.handled.lock().expect("lock").len() == 1
                && w.store.queued_events(10).await.expect("queue").is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Not retried (a 4xx would be refused again), told to the sender, and the room goes on.
        assert_eq!(
            *w.recorder.reported.lock().expect("lock"),
            ["$r1 the homeserver refused: 413 M_TOO_LARGE"]
        );
        assert_eq!(*w.recorder.handled.lock().expect("lock"), ["$r2"]);
        assert!(w.store.queued_events(10).await.expect("queue").is_empty());
        let _ = w.stop.send(true);
        w.running.await.expect("worker");
    }
}
