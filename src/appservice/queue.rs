//! The queue worker: takes sealed events out of the durable queue in arrival order, hands them to
//! the bridge core, and deletes each one once it has been handled. An event that fails with a
//! retryable error stays queued and is tried again with backoff; after `MAX_ATTEMPTS` it is dropped
//! with an error in the log (it never blocks the queue for good).

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, watch};

use super::{QUEUE_AD, QueueItem};
use crate::{
    bridge::MatrixEventHandler,
    matrix::crypto::{Crypto, CryptoChanges, CryptoError},
    metrics::Metrics,
    store::{StoredEvent, TxnStore},
    vault::SecretKey,
};

/// How long an encrypted event waits for its room key.
const KEY_WAIT: Duration = Duration::from_secs(30);

const BATCH: i64 = 100;
const MAX_ATTEMPTS: i64 = 8;

pub struct QueueWorker {
    pub store: Arc<dyn TxnStore>,
    pub key: SecretKey,
    pub notify: Arc<Notify>,
    pub handler: Arc<dyn MatrixEventHandler>,
    pub metrics: Metrics,
    /// The bot's crypto device, when encryption is allowed.
    pub crypto: Option<Arc<Crypto>>,
}

impl QueueWorker {
    /// Runs until `shutdown` turns true; the event in hand is finished first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.drain().await {
                Ok(true) => {
                    backoff = Duration::from_millis(200);
                    continue;
                }
                Ok(false) => backoff = Duration::from_millis(200),
                Err(()) => backoff = (backoff * 2).min(Duration::from_secs(30)),
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Handles one batch. `Ok(true)` when it did work, `Err` when something must be retried later.
    async fn drain(&self) -> Result<bool, ()> {
        let batch = match self.store.queued_events(BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the event queue");
                return Err(());
            }
        };
        if batch.is_empty() {
            return Ok(false);
        }
        // Events without a room (crypto changes) first, in order. Then one lane per room: each
        // room's events in order, different rooms concurrently, so a slow chat does not hold up
        // the others.
        let mut roomless = Vec::new();
        let mut lanes: Vec<(String, Vec<StoredEvent>)> = Vec::new();
        for ev in batch {
            match ev.room_id.clone() {
                None => roomless.push(ev),
                Some(room) => match lanes.iter_mut().find(|(r, _)| *r == room) {
                    Some((_, evs)) => evs.push(ev),
                    None => lanes.push((room, vec![ev])),
                },
            }
        }
        for ev in roomless {
            self.handle_one(ev).await?;
        }
        let results = futures::future::join_all(lanes.into_iter().map(|(_, evs)| async move {
            for ev in evs {
                // A failed event keeps its room's later events waiting, to keep their order.
                self.handle_one(ev).await?;
            }
            Ok::<(), ()>(())
        }))
        .await;
        if results.iter().any(Result::is_err) {
            return Err(());
        }
        Ok(true)
    }

    /// Handles one queued event; `Err` means it stays queued and is retried later.
    async fn handle_one(&self, ev: StoredEvent) -> Result<(), ()> {
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
            return self.remove(ev.seq).await;
        };
        let result = match item.kind.as_str() {
            "pdu" => self.pdu(item.event).await,
            "ephemeral" => self.handler.handle_ephemeral(&item.event).await,
            "crypto" => {
                if let (Some(crypto), Ok(changes)) = (
                    &self.crypto,
                    serde_json::from_value::<CryptoChanges>(item.event),
                ) && let Err(e) = crypto.receive(&changes).await
                {
                    tracing::warn!(error = %e, "cannot process crypto changes");
                }
                Ok(())
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.remove(ev.seq).await,
            Err(e) if e.is_retryable() && ev.attempts + 1 < MAX_ATTEMPTS => {
                tracing::warn!(seq = ev.seq, attempt = ev.attempts + 1, error = %e, "event handling failed, will retry");
                self.metrics.errors.inc();
                if let Err(e) = self.store.count_attempt(ev.seq).await {
                    tracing::error!(error = %e, "cannot count attempt");
                }
                Err(())
            }
            Err(e) => {
                tracing::error!(seq = ev.seq, error = %e, "giving up on an event");
                self.metrics.errors.inc();
                self.remove(ev.seq).await
            }
        }
    }

    /// A timeline event: encryption state is noted, encrypted events are decrypted first.
    async fn pdu(&self, ev: serde_json::Value) -> Result<(), crate::bridge::BridgeError> {
        let room = ev["room_id"].as_str().unwrap_or_default().to_owned();
        let sender = ev["sender"].as_str().unwrap_or_default().to_owned();
        match ev["type"].as_str().unwrap_or_default() {
            "m.room.encryption" if ev.get("state_key").is_some() => {
                if let Some(c) = &self.crypto {
                    c.mark_encrypted(&room).await;
                }
                self.handler.handle_matrix_event(&ev).await
            }
            "m.room.encrypted" => {
                let Some(crypto) = self.crypto.clone() else {
                    return self
                        .handler
                        .undecryptable(&room, &sender, "encryption is not enabled on this bridge")
                        .await;
                };
                match crypto.decrypt(&room, &ev).await {
                    Ok(plain) => self.handler.handle_matrix_event(&plain).await,
                    Err(CryptoError::MissingKey) => {
                        crypto.request_key(&room, &ev).await;
                        // Wait for the key without holding up the rest of the queue.
                        let handler = self.handler.clone();
                        tokio::spawn(async move {
                            let deadline = tokio::time::Instant::now() + KEY_WAIT;
                            loop {
                                tokio::select! {
                                    _ = crypto.keys_arrived.notified() => {}
                                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                                }
                                match crypto.decrypt(&room, &ev).await {
                                    Ok(plain) => {
                                        if let Err(e) = handler.handle_matrix_event(&plain).await {
                                            tracing::warn!(error = %e, "late-decrypted event failed");
                                        }
                                        return;
                                    }
                                    Err(CryptoError::MissingKey)
                                        if tokio::time::Instant::now() < deadline =>
                                    {
                                        continue;
                                    }
                                    Err(e) => {
                                        let _ = handler
                                            .undecryptable(&room, &sender, &e.to_string())
                                            .await;
                                        return;
                                    }
                                }
                            }
                        });
                        Ok(())
                    }
                    Err(e) => {
                        self.handler
                            .undecryptable(&room, &sender, &e.to_string())
                            .await
                    }
                }
            }
            _ => self.handler.handle_matrix_event(&ev).await,
        }
    }

    async fn remove(&self, seq: i64) -> Result<(), ()> {
        self.store
            .remove_event(seq)
            .await
            .map_err(|e| tracing::error!(error = %e, "cannot dequeue event"))
    }
}
