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

    /// Runs a `!Send` future on the shard chosen by `key` (the same key, the same shard).
    pub fn spawn<F, Fut>(&self, key: &str, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let shard = shard_of(key, self.shards.len());
        let job: Job = Box::new(move || Box::pin(make()));
        let _ = self.shards[shard].send(job);
    }
}

/// The shard of `key` among `shards`: SipHash with fixed keys, so keys that differ in any way
/// spread evenly. (The hash it replaces, `h * 31 + byte`, kept with two shards only the parity
/// of the bytes' sum.)
fn shard_of(key: &str, shards: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(key) % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accounts numbered one after the other spread over the shards about evenly.
    #[test]
    fn numbered_accounts_spread_over_the_shards() {
        for shards in [2, 3, 4] {
            let mut per = vec![0usize; shards];
            for i in 0..1000 {
                per[shard_of(&format!("+1555200{i:04}"), shards)] += 1;
            }
            let even = 1000 / shards;
            assert!(
                per.iter().all(|&n| n > even * 8 / 10 && n < even * 12 / 10),
                "{shards} shards: {per:?}"
            );
        }
    }
}
