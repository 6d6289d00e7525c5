//! Group commit. Under load many callers write at once (each login's actor its Signal state and
//! inbox after every message, each chat's lane the message map). A write that finds the
//! database idle is written at once, by its caller. Writes that come while one is being written
//! wait; when it is done, all of them are written together, in one transaction with multi-row
//! statements, and each caller is answered: tens of writes then cost about the round trips of
//! one. A caller's write stays atomic (it is in one transaction) and it continues only once the
//! write is durable, as before; a failed transaction fails every write in it.

use std::sync::Arc;

use futures::future::BoxFuture;
use mib_core::store::StoreError as CoreError;

use crate::{Connections, StoreError};

/// Writes several callers' parts in one transaction.
pub(crate) type Apply<P> =
    for<'a> fn(&'a Connections, &'a [P]) -> BoxFuture<'a, Result<(), StoreError>>;

/// One waiting caller's part and where its answer goes.
pub(crate) struct Job<P> {
    part: P,
    done: tokio::sync::oneshot::Sender<Result<(), CoreError>>,
}

pub(crate) struct Commits<P> {
    /// A write is under way.
    pub(crate) busy: bool,
    /// Writes that came meanwhile.
    pub(crate) waiting: Vec<Job<P>>,
}

/// The group commit of one kind of write (see the module).
pub(crate) struct GroupWriter<P> {
    commits: Arc<std::sync::Mutex<Commits<P>>>,
    apply: Apply<P>,
}

impl<P> Clone for GroupWriter<P> {
    fn clone(&self) -> Self {
        Self {
            commits: self.commits.clone(),
            apply: self.apply,
        }
    }
}

impl<P> std::fmt::Debug for GroupWriter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupWriter")
    }
}

impl<P: Send + Sync + 'static> GroupWriter<P> {
    pub(crate) fn new(apply: Apply<P>) -> Self {
        Self {
            commits: Arc::new(std::sync::Mutex::new(Commits {
                busy: false,
                waiting: Vec::new(),
            })),
            apply,
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Commits<P>> {
        self.commits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `part`, with others that wait for their turn if the database is busy; returns
    /// once it is durable.
    pub(crate) async fn write(&self, pool: &Connections, part: P) -> Result<(), CoreError> {
        let answer = {
            let mut commits = self.lock();
            if commits.busy {
                let (done, answer) = tokio::sync::oneshot::channel();
                commits.waiting.push(Job { part, done });
                Err(answer)
            } else {
                commits.busy = true;
                Ok(part)
            }
        };
        match answer {
            Err(answer) => answer
                .await
                .unwrap_or_else(|_| Err(CoreError::unavailable("the store's writer stopped"))),
            Ok(part) => {
                // Whatever happens to this call (an error, or its future dropped), the writes
                // that came meanwhile are handed on.
                let _hand_on = HandOn { writer: self, pool };
                Ok((self.apply)(pool, std::slice::from_ref(&part)).await?)
            }
        }
    }

    /// Writes the waiting parts, batch after batch, until none is left.
    async fn drain(self, pool: Connections, mut batch: Vec<Job<P>>) {
        let mut guard = DrainGuard(Some(self.clone()));
        loop {
            let (parts, dones): (Vec<P>, Vec<_>) =
                batch.drain(..).map(|j| (j.part, j.done)).unzip();
            let result = (self.apply)(&pool, &parts).await.map_err(CoreError::from);
            for done in dones {
                let _ = done.send(result.clone());
            }
            let mut commits = self.lock();
            if commits.waiting.is_empty() {
                commits.busy = false;
                guard.0 = None;
                return;
            }
            batch = std::mem::take(&mut commits.waiting);
        }
    }
}

/// Hands the writes that came while its caller wrote to a task that writes them (or lets the
/// next caller write at once when none came).
pub(crate) struct HandOn<'a, P: Send + Sync + 'static> {
    pub(crate) writer: &'a GroupWriter<P>,
    pub(crate) pool: &'a Connections,
}

impl<P: Send + Sync + 'static> Drop for HandOn<'_, P> {
    fn drop(&mut self) {
        let mut commits = self.writer.lock();
        if commits.waiting.is_empty() {
            commits.busy = false;
            return;
        }
        let batch = std::mem::take(&mut commits.waiting);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                drop(commits);
                rt.spawn(self.writer.clone().drain(self.pool.clone(), batch));
            }
            // No runtime to write them in: they fail (their callers hear it) and the writer
            // is free again.
            Err(_) => commits.busy = false,
        }
    }
}

/// Frees the writer if a drain ends without finishing (its runtime shutting down): its
/// waiting callers hear that it stopped, and later writes are written again.
struct DrainGuard<P>(Option<GroupWriter<P>>);

impl<P> Drop for DrainGuard<P> {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take() {
            let mut commits = writer.commits.lock().unwrap_or_else(|p| p.into_inner());
            commits.waiting.clear();
            commits.busy = false;
        }
    }
}
