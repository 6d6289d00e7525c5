//! Threads that own Signal protocol state. libsignal's store traits are `?Send` with `&mut self`
//! writes, so each account's state lives in one task on a `LocalSet`; a few shard threads host all
//! accounts. Each shard thread runs a current-thread runtime of its own (with its own I/O and
//! timers), the way a `LocalSet` is meant to be run on a thread of its own.
//!
//! The shards used to borrow the main runtime through `Handle::block_on`. Under load, a shard
//! thread then went to sleep now and then while its accounts had work waiting (pushes, commands,
//! acks) and nothing woke it again: every account of that shard stopped at once, with the thread
//! parked in `block_on` (the bench's stall report and thread stacks showed it, in one run of
//! the 1,000-chat bench in four to seven). With a runtime of its own, 14 runs in a row were
//! clean.

use std::{future::Future, pin::Pin};

use tokio::{sync::mpsc, task::LocalSet};

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A pool of `LocalSet` threads.
#[derive(Clone)]
pub struct SignalRuntime {
    shards: Vec<mpsc::UnboundedSender<Job>>,
}

impl SignalRuntime {
    /// Starts `threads` shard threads, each with a current-thread runtime of its own. A shard
    /// ends (its accounts' tasks dropped) once every clone of this `SignalRuntime` is gone.
    pub fn start(threads: usize) -> Self {
        let shards = (0..threads.max(1))
            .map(|i| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(format!("signal-{i}-blocking"))
                    .build()
                    .expect("building a shard's runtime");
                std::thread::Builder::new()
                    .name(format!("signal-{i}"))
                    .spawn(move || {
                        let local = LocalSet::new();
                        local.block_on(&rt, async move {
                            while let Some(job) = rx.recv().await {
                                tokio::task::spawn_local(job());
                            }
                        });
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

    /// Accounts' tasks on the shards, each fed by a task of the main runtime and answering
    /// through another, as an account's pushes, commands and gateway answers come and go: every
    /// message is handled, and no shard stops with work waiting (a shard whose thread slept
    /// while its tasks were woken stalled the bench's contacts). Stress, not timing: it fails
    /// only when nothing moves for 20 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shards_keep_running_tasks_woken_from_other_threads() {
        use std::sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        };
        const TASKS: usize = 64;
        const MESSAGES: u64 = 3_000;
        let rt = SignalRuntime::start(2);
        let done = Arc::new(AtomicU64::new(0));
        for t in 0..TASKS {
            let (tx, mut rx) = mpsc::channel::<u64>(8);
            let done = done.clone();
            rt.spawn(&format!("task {t}"), move || async move {
                while let Some(m) = rx.recv().await {
                    // An answer from the main runtime, as a gateway request's.
                    let (answer, answered) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move {
                        let _ = answer.send(m);
                    });
                    assert_eq!(answered.await.ok(), Some(m));
                    if m % 7 == 0 {
                        tokio::time::sleep(std::time::Duration::from_micros(50)).await;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
            tokio::spawn(async move {
                for m in 0..MESSAGES {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
        let total = TASKS as u64 * MESSAGES;
        let (mut last, mut since) = (0, std::time::Instant::now());
        loop {
            let now = done.load(Ordering::Relaxed);
            if now == total {
                break;
            }
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            }
            assert!(
                since.elapsed() < std::time::Duration::from_secs(20),
                "{now} of {total} messages handled, then nothing for 20 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

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
