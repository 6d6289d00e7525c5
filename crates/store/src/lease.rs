//! The workers' leases (`lease` table): see `mib_core::cluster` for what they are for. Each
//! operation is one statement, so that two workers racing for a lease cannot both win it.

use async_trait::async_trait;
use mib_core::store::{Lease, LeaseStore, StoreError as CoreError};
use sqlx::Row as _;

use super::{Db, SqlStore};

fn lease_of(r: &sqlx::any::AnyRow) -> Result<Lease, sqlx::Error> {
    Ok(Lease {
        holder: r.try_get("holder")?,
        expires_at: r.try_get("expires_at")?,
        generation: r.try_get("generation")?,
    })
}

#[async_trait]
impl LeaseStore for SqlStore {
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<Option<i64>, CoreError> {
        // The conflict branch only runs when the WHERE holds; otherwise nothing is returned.
        let generation: Option<i64> = sqlx::query_scalar(
            "INSERT INTO lease (name, holder, expires_at, generation) VALUES ($1, $2, $3, 0) \
             ON CONFLICT (name) DO UPDATE SET \
             generation = lease.generation + CASE WHEN lease.holder = excluded.holder THEN 0 ELSE 1 END, \
             holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE lease.holder = excluded.holder OR lease.expires_at <= $4 \
             RETURNING generation",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .fetch_optional(self.pool())
        .await
        .db()?;
        Ok(generation)
    }

    async fn renew_leases(
        &self,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<Vec<String>, CoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "UPDATE lease SET expires_at = $1 WHERE holder = $2 AND expires_at > $3 RETURNING name",
        )
        .bind(until)
        .bind(holder)
        .bind(now)
        .fetch_all(self.pool())
        .await
        .db()?;
        Ok(names)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), CoreError> {
        sqlx::query("UPDATE lease SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await
            .db()?;
        Ok(())
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, CoreError> {
        let row = sqlx::query("SELECT holder, expires_at, generation FROM lease WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .db()?;
        Ok(row.as_ref().map(lease_of).transpose().db()?)
    }

    async fn live_lease_count(&self, prefix: &str, now: i64) -> Result<usize, CoreError> {
        // A prefix range rather than LIKE: no escaping, and it uses the primary key.
        let end = format!("{prefix}\u{10ffff}");
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM lease WHERE name >= $1 AND name < $2 AND expires_at > $3",
        )
        .bind(prefix)
        .bind(end)
        .bind(now)
        .fetch_one(self.pool())
        .await
        .db()?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn unheld_logins(&self, now: i64) -> Result<Vec<String>, CoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT login.mxid FROM login LEFT JOIN lease ON lease.name = 'login:' || login.mxid \
             WHERE lease.name IS NULL OR lease.expires_at <= $1 ORDER BY login.mxid",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await
        .db()?;
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use mib_core::store::{LeaseStore, PortalStore};

    use crate::SqlStore;

    on_both_databases!(
        a_lease_has_one_holder_until_it_expires,
        renewal_keeps_only_live_leases,
        logins_nobody_holds
    );

    async fn a_lease_has_one_holder_until_it_expires(s: &SqlStore) {
        assert_eq!(s.take_lease("bot", "w1", 1_000, 0).await.unwrap(), Some(0));
        // Another worker cannot take it while it lives; its holder renews it.
        assert_eq!(s.take_lease("bot", "w2", 1_500, 500).await.unwrap(), None);
        assert_eq!(
            s.take_lease("bot", "w1", 2_000, 900).await.unwrap(),
            Some(0)
        );
        assert_eq!(s.take_lease("bot", "w2", 2_500, 1_999).await.unwrap(), None);
        // Expired: the next taker gets it, and the generation says it changed hands.
        assert_eq!(
            s.take_lease("bot", "w2", 3_000, 2_000).await.unwrap(),
            Some(1)
        );
        let l = s.lease("bot").await.unwrap().unwrap();
        assert_eq!(
            (l.holder.as_str(), l.expires_at, l.generation),
            ("w2", 3_000, 1)
        );
        // Released: free at once, and only by its holder.
        s.release_lease("bot", "w1").await.unwrap();
        assert_eq!(s.take_lease("bot", "w3", 4_000, 2_100).await.unwrap(), None);
        s.release_lease("bot", "w2").await.unwrap();
        assert_eq!(
            s.take_lease("bot", "w3", 4_000, 2_100).await.unwrap(),
            Some(2)
        );
    }

    async fn renewal_keeps_only_live_leases(s: &SqlStore) {
        s.take_lease("login:@a:x", "w1", 1_000, 0).await.unwrap();
        s.take_lease("login:@b:x", "w1", 3_000, 0).await.unwrap();
        s.take_lease("login:@c:x", "w2", 3_000, 0).await.unwrap();
        s.take_lease("worker:w1", "w1", 3_000, 0).await.unwrap();
        // @a's lease ran out before the renewal: it is not the worker's any more.
        let mut kept = s.renew_leases("w1", 5_000, 1_000).await.unwrap();
        kept.sort();
        assert_eq!(kept, ["login:@b:x", "worker:w1"]);
        assert_eq!(s.live_lease_count("login:", 1_000).await.unwrap(), 2);
        // At 3,000 only @b's, renewed until 5,000, is left.
        assert_eq!(s.live_lease_count("login:", 3_000).await.unwrap(), 1);
        assert_eq!(s.live_lease_count("worker:", 1_000).await.unwrap(), 1);
        assert_eq!(
            s.lease("login:@c:x").await.unwrap().map(|l| l.holder),
            Some("w2".to_owned())
        );
    }

    async fn logins_nobody_holds(s: &SqlStore) {
        for u in ["@a:x", "@b:x", "@c:x"] {
            s.set_login(u, "+1").await.unwrap();
        }
        s.take_lease("login:@a:x", "w1", 1_000, 0).await.unwrap();
        s.take_lease("login:@b:x", "w2", 5_000, 0).await.unwrap();
        assert_eq!(s.unheld_logins(500).await.unwrap(), ["@c:x"]);
        assert_eq!(s.unheld_logins(1_000).await.unwrap(), ["@a:x", "@c:x"]);
    }
}
