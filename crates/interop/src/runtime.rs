//! Threads that own Signal protocol state. libsignal's store traits are `?Send` with `&mut self`
//! writes, so each account's state lives in one task on a `LocalSet`; a few shard threads host all
//! accounts, using the main runtime's I/O and timers through its handle.

use std::{future::Future, pin::Pin};

use tokio::{runtime::Handle, sync::mpsc, task::LocalSet};

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A pool of `LocalSet` threads.
#[derive(Clone)]
pub struct SignalRuntime {
    shards: Vec<mpsc::UnboundedSender<Job>>,
}

impl SignalRuntime {
    /// Starts `threads` shard threads on the current tokio runtime.
    pub fn start(threads: usize) -> Self {
        let handle = Handle::current();
        let shards = (0..threads.max(1))
            .map(|i| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
                let handle = handle.clone();
                std::thread::Builder::new()
                    .name(format!("signal-{i}"))
                    .spawn(move || {
                        let local = LocalSet::new();
                        handle.block_on(local.run_until(async move {
                            while let Some(job) = rx.recv().await {
                                tokio::task::spawn_local(job());
                            }
                        }));
                    })
                    .expect("spawning a thread");
                tx
            })
            .collect();
        Self { shards }
    }

    /// Runs a `!Send` future on the shard chosen by `key`.
    pub fn spawn<F, Fut>(&self, key: &str, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let shard = key
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % self.shards.len();
        let job: Job = Box::new(move || Box::pin(make()));
        let _ = self.shards[shard].send(job);
    }
}
