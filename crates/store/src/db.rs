//! The store's connections: a pool on PostgreSQL, SQLite's one connection otherwise.
//!
//! SQLite has one writer, so the store keeps one connection to it. sqlx's pool would do that
//! with a pool of one, but a pool tests each connection given back to it with a round trip to
//! the connection (a ping, after every statement run on the pool), and the next statement waits
//! behind that round trip and the task that makes it: on SQLite's one connection that is half of
//! every statement's turn. [`Connections`] hands the connection out in turn instead (first come, first
//! served), and is an [`Executor`] like the pool, so a statement runs on `store.pool()` either way.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt, future::BoxFuture, stream::BoxStream};
use sqlx::{
    Any, AnyConnection, Connection, Database, Describe, Either, Error, Execute, Executor, SqlStr,
    pool::PoolConnection,
};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::AnyPool;

/// How long a statement waits for SQLite's connection before it fails (as the pool's acquire
/// timeout on PostgreSQL).
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// The store's connections (cheap to clone: clones share them).
#[derive(Clone, Debug)]
pub struct Connections(Inner);

#[derive(Clone, Debug)]
enum Inner {
    Pool(AnyPool),
    /// `None` once closed.
    Sole(Arc<Mutex<Option<AnyConnection>>>),
}

/// A connection taken from a [`Connections`]; given back when dropped.
pub enum Conn {
    Pooled(PoolConnection<Any>),
    Sole(OwnedMappedMutexGuard<Option<AnyConnection>, AnyConnection>),
}

impl std::ops::Deref for Conn {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            Conn::Pooled(c) => c,
            Conn::Sole(c) => c,
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Conn::Pooled(c) => c,
            Conn::Sole(c) => c,
        }
    }
}

impl Conn {
    /// Begins a transaction on this connection.
    pub async fn begin(&mut self) -> Result<sqlx::Transaction<'_, Any>, Error> {
        Connection::begin(&mut **self).await
    }
}

impl Connections {
    pub(crate) fn pool(pool: AnyPool) -> Self {
        Self(Inner::Pool(pool))
    }

    pub(crate) fn sole(conn: AnyConnection) -> Self {
        Self(Inner::Sole(Arc::new(Mutex::new(Some(conn)))))
    }

    /// A connection of one's own until the result is dropped: for a transaction
    /// (`conn.begin()`) or several statements in a row.
    pub async fn acquire(&self) -> Result<Conn, Error> {
        match &self.0 {
            Inner::Pool(pool) => Ok(Conn::Pooled(pool.acquire().await?)),
            Inner::Sole(conn) => {
                let guard = tokio::time::timeout(ACQUIRE_TIMEOUT, conn.clone().lock_owned())
                    .await
                    .map_err(|_| Error::PoolTimedOut)?;
                OwnedMutexGuard::try_map(guard, Option::as_mut)
                    .map(Conn::Sole)
                    .map_err(|_| Error::PoolClosed)
            }
        }
    }

    /// Closes the connections once the statements under way are done; later ones fail.
    pub async fn close(&self) {
        match &self.0 {
            Inner::Pool(pool) => pool.close().await,
            Inner::Sole(conn) => {
                if let Some(conn) = conn.lock().await.take() {
                    let _ = conn.close().await;
                }
            }
        }
    }
}

impl<'p> Executor<'p> for &'_ Connections {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<<Any as Database>::QueryResult, <Any as Database>::Row>, Error>>
    where
        E: 'q + Execute<'q, Any>,
    {
        match &self.0 {
            Inner::Pool(pool) => pool.fetch_many(query),
            Inner::Sole(_) => {
                let db = self.clone();
                // The results are gathered while the connection is held: a stream that handed
                // them out one by one would hold it until the caller had read the last.
                futures::stream::once(async move {
                    let mut conn = db.acquire().await?;
                    (&mut *conn).fetch_many(query).try_collect::<Vec<_>>().await
                })
                .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok)))
                .try_flatten()
                .boxed()
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<<Any as Database>::Row>, Error>>
    where
        E: 'q + Execute<'q, Any>,
    {
        let db = self.clone();
        Box::pin(async move {
            let mut conn = db.acquire().await?;
            (&mut *conn).fetch_optional(query).await
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [<Any as Database>::TypeInfo],
    ) -> BoxFuture<'e, Result<<Any as Database>::Statement, Error>>
    where
        'p: 'e,
    {
        let db = self.clone();
        Box::pin(async move {
            (&mut *db.acquire().await?)
                .prepare_with(sql, parameters)
                .await
        })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<Describe<Any>, Error>> {
        let db = self.clone();
        Box::pin(async move { (&mut *db.acquire().await?).describe(sql).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements whose callers gave up, while running or while waiting their turn, leave the
    /// connection usable and the statements after them in order; a closed store fails
    /// statements at once instead of leaving them waiting.
    #[tokio::test]
    async fn callers_that_give_up_leave_the_connection_usable_and_close_fails_fast() {
        let (store, _dir) = crate::testing::sqlite().await;
        let db = store.pool();
        sqlx::query("CREATE TABLE t (n INTEGER)")
            .execute(db)
            .await
            .expect("create");
        // Some of these are dropped while running, some while waiting for the connection.
        let gave_up: Vec<_> = (0..50)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    let write = sqlx::query("INSERT INTO t (n) VALUES ($1)")
                        .bind(i)
                        .execute(&db);
                    let _ = tokio::time::timeout(Duration::from_micros(50), write).await;
                })
            })
            .collect();
        for t in gave_up {
            t.await.expect("task");
        }
        // A connection held (a transaction under way) when its holder gives up.
        let held = db.acquire().await.expect("acquire");
        let waiting = tokio::spawn({
            let db = db.clone();
            async move { sqlx::query("SELECT 1").execute(&db).await }
        });
        drop(held);
        waiting
            .await
            .expect("task")
            .expect("runs once the holder let go");
        for i in 0..10 {
            sqlx::query("INSERT INTO t (n) VALUES ($1)")
                .bind(1000 + i)
                .execute(db)
                .await
                .expect("insert after the others gave up");
        }
        let last: Vec<i64> = sqlx::query_scalar("SELECT n FROM t WHERE n >= 1000 ORDER BY rowid")
            .fetch_all(db)
            .await
            .expect("read");
        assert_eq!(last, (1000..1010).collect::<Vec<i64>>());

        store.close().await;
        let after =
            tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(db))
                .await
                .expect("a statement on a closed store ends at once");
        assert!(matches!(after, Err(Error::PoolClosed)), "{after:?}");
    }
}
