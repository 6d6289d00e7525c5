//! The SQL side of the vault: wrapped data keys and sealed records.

use async_trait::async_trait;
use sqlx::Row;

use super::{Db, Marks, SqlStore, StoreError, group::GroupWriter};
use mib_core::store::StoreError as CoreError;
use mib_vault::VaultStore;

#[async_trait]
impl VaultStore for SqlStore {
    async fn wrapped_key(&self, owner: &str) -> Result<Option<Vec<u8>>, CoreError> {
        Ok(
            sqlx::query_scalar("SELECT wrapped FROM vault_key WHERE owner = $1")
                .bind(owner)
                .fetch_optional(self.pool())
                .await
                .db()?,
        )
    }

    async fn put_wrapped_key(
        &self,
        owner: &str,
        wrapped: &[u8],
        master_key_id: &str,
    ) -> Result<(), CoreError> {
        sqlx::query(
            "INSERT INTO vault_key (owner, wrapped, master_key_id) VALUES ($1, $2, $3) \
             ON CONFLICT (owner) DO NOTHING",
        )
        .bind(owner)
        .bind(wrapped)
        .bind(master_key_id)
        .execute(self.pool())
        .await
        .db()?;
        Ok(())
    }

    async fn any_master_key_id(&self) -> Result<Option<String>, CoreError> {
        Ok(
            sqlx::query_scalar("SELECT master_key_id FROM vault_key LIMIT 1")
                .fetch_optional(self.pool())
                .await
                .db()?,
        )
    }

    async fn all_wrapped_keys(&self) -> Result<Vec<(String, Vec<u8>)>, CoreError> {
        let rows = sqlx::query("SELECT owner, wrapped FROM vault_key ORDER BY owner")
            .fetch_all(self.pool())
            .await
            .db()?;
        rows.iter()
            .map(|r| Ok((r.try_get("owner").db()?, r.try_get("wrapped").db()?)))
            .collect()
    }

    async fn replace_wrapped_keys(
        &self,
        keys: &[(String, Vec<u8>)],
        master_key_id: &str,
    ) -> Result<(), CoreError> {
        let mut conn = self.pool().acquire().await.db()?;
        let mut tx = conn.begin().await.db()?;
        for (owner, wrapped) in keys {
            sqlx::query("UPDATE vault_key SET wrapped = $1, master_key_id = $2 WHERE owner = $3")
                .bind(&wrapped[..])
                .bind(master_key_id)
                .bind(owner.as_str())
                .execute(&mut *tx)
                .await
                .db()?;
        }
        tx.commit().await.db()?;
        Ok(())
    }

    async fn destroy_owner(&self, owner: &str) -> Result<(), CoreError> {
        let mut conn = self.pool().acquire().await.db()?;
        let mut tx = conn.begin().await.db()?;
        sqlx::query("DELETE FROM vault_key WHERE owner = $1")
            .bind(owner)
            .execute(&mut *tx)
            .await
            .db()?;
        sqlx::query("DELETE FROM vault_record WHERE owner = $1")
            .bind(owner)
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        // The checkpoint below takes the connection again (SQLite's only one).
        drop(conn);
        // SQLite keeps the deleted pages (the wrapped key among them) in its write-ahead log
        // until a checkpoint: write them back, overwritten (`secure_delete`), and empty the log.
        if self.kind() == crate::settings::DatabaseType::Sqlite
            && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(self.pool())
                .await
        {
            tracing::warn!(error = %e, "cannot checkpoint the database after a shred");
        }
        Ok(())
    }

    async fn record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, CoreError> {
        Ok(sqlx::query_scalar(
            "SELECT sealed FROM vault_record WHERE owner = $1 AND kind = $2 AND name = $3",
        )
        .bind(owner)
        .bind(kind)
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .db()?)
    }

    async fn put_record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
        sealed: &[u8],
    ) -> Result<(), CoreError> {
        let mut conn = self.pool().acquire().await.db()?;
        Ok(write_record(&mut conn, owner, kind, name, Some(sealed)).await?)
    }

    async fn delete_record(&self, owner: &str, kind: &str, name: &str) -> Result<(), CoreError> {
        sqlx::query("DELETE FROM vault_record WHERE owner = $1 AND kind = $2 AND name = $3")
            .bind(owner)
            .bind(kind)
            .bind(name)
            .execute(self.pool())
            .await
            .db()?;
        Ok(())
    }

    async fn write_records(
        &self,
        owner: &str,
        writes: &[(String, String, Option<Vec<u8>>)],
    ) -> Result<(), CoreError> {
        self.vault_writer
            .write(self.pool(), (owner.to_owned(), writes.to_vec()))
            .await
    }

    async fn record_names(&self, owner: &str, kind: &str) -> Result<Vec<String>, CoreError> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM vault_record WHERE owner = $1 AND kind = $2 ORDER BY name",
        )
        .bind(owner)
        .bind(kind)
        .fetch_all(self.pool())
        .await
        .db()?)
    }
}

/// One write of a commit: a record's kind and name, and its sealed value (`None` deletes it).
type RecordWrite = (String, String, Option<Vec<u8>>);

/// Rows per statement (four values each: well under either database's limit on parameters).
const ROWS_PER_STATEMENT: usize = 256;

/// One caller's vault commit: an owner's writes, all applied or none.
pub(crate) type VaultCommit = (String, Vec<RecordWrite>);

/// The vault's group commit (see `group`).
pub(crate) fn group_writer() -> GroupWriter<VaultCommit> {
    GroupWriter::new(|pool, parts| {
        Box::pin(async move {
            let parts: Vec<(&str, &[RecordWrite])> = parts
                .iter()
                .map(|(owner, writes)| (owner.as_str(), &writes[..]))
                .collect();
            apply(pool, &parts).await
        })
    })
}

/// Applies the writes of several callers in one transaction (one statement needs none). Of
/// several writes to one record, the last one counts.
async fn apply(
    pool: &crate::Connections,
    parts: &[(&str, &[RecordWrite])],
) -> Result<(), StoreError> {
    let mut last: std::collections::HashMap<(&str, &str, &str), Option<&[u8]>> =
        std::collections::HashMap::new();
    for (owner, writes) in parts {
        for (kind, name, sealed) in writes.iter() {
            last.insert((owner, kind.as_str(), name.as_str()), sealed.as_deref());
        }
    }
    if last.is_empty() {
        return Ok(());
    }
    if last.len() == 1 {
        let ((owner, kind, name), sealed) = last.into_iter().next().expect("one write");
        let mut conn = pool.acquire().await.db()?;
        return write_record(&mut conn, owner, kind, name, sealed).await;
    }
    let (puts, deletes): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, s)| s.is_some());
    let mut conn = pool.acquire().await.db()?;
    let mut tx = conn.begin().await.db()?;
    for chunk in puts.chunks(ROWS_PER_STATEMENT) {
        #[allow(non_snake_case)] // named as the SQL check expects a row list
        let RECORD_ROWS = Marks::of(&tx).rows(chunk.len(), 4);
        let sql = format!(
            "INSERT INTO vault_record (owner, kind, name, sealed) VALUES {RECORD_ROWS} \
             ON CONFLICT (owner, kind, name) DO UPDATE SET sealed = excluded.sealed"
        );
        // Only placeholders are spliced in; the values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((owner, kind, name), sealed) in chunk {
            q = q.bind(*owner).bind(*kind).bind(*name).bind(*sealed);
        }
        q.execute(&mut *tx).await.db()?;
    }
    for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
        #[allow(non_snake_case)] // named as the SQL check expects a row list
        let KEY_ROWS = Marks::of(&tx).rows(chunk.len(), 3);
        let sql =
            format!("DELETE FROM vault_record WHERE (owner, kind, name) IN (VALUES {KEY_ROWS})");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((owner, kind, name), _) in chunk {
            q = q.bind(*owner).bind(*kind).bind(*name);
        }
        q.execute(&mut *tx).await.db()?;
    }
    tx.commit().await.db()?;
    Ok(())
}

/// Writes (or, with `None`, deletes) one sealed record.
async fn write_record(
    conn: &mut sqlx::AnyConnection,
    owner: &str,
    kind: &str,
    name: &str,
    sealed: Option<&[u8]>,
) -> Result<(), StoreError> {
    match sealed {
        Some(sealed) => {
            sqlx::query(
                "INSERT INTO vault_record (owner, kind, name, sealed) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (owner, kind, name) DO UPDATE SET sealed = excluded.sealed",
            )
            .bind(owner)
            .bind(kind)
            .bind(name)
            .bind(sealed)
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM vault_record WHERE owner = $1 AND kind = $2 AND name = $3")
                .bind(owner)
                .bind(kind)
                .bind(name)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mib_vault::{SecretKey, Vault, VaultError, VaultStore};

    use crate::{SqlStore, testing};

    on_both_databases!(owned
        two_workers_making_one_owners_key_at_once_share_it,
        commits_of_many_logins_at_once_each_land_whole,
        records_roundtrip_and_shred,
        rotation_rewraps_without_touching_records,
        swapped_records_fail
    );

    /// Two workers on one database make the same owner's data key at the same moment (both
    /// found none): neither fails, and both use the one stored first, so what one seals the
    /// other opens. (The second insert failed on the primary key, and a worker starting up
    /// beside another exited with "duplicate key value violates unique constraint".)
    async fn two_workers_making_one_owners_key_at_once_share_it(s: SqlStore) {
        let store: Arc<dyn VaultStore> = Arc::new(s);
        let master = SecretKey::random();
        let one = Vault::open(master.clone(), store.clone())
            .await
            .expect("vault");
        let two = Vault::open(master, store).await.expect("vault");
        for i in 0..20 {
            let owner = format!("@race{i}:x");
            let (a, b) = tokio::join!(one.data_key(&owner), two.data_key(&owner));
            a.expect("first worker's key");
            b.expect("second worker's key");
            let sealed = one
                .seal_record(&owner, "session", "+1555", b"shared")
                .await
                .expect("seal");
            assert_eq!(
                &two.open_record(&owner, "session", "+1555", &sealed)
                    .await
                    .expect("the other worker opens it")[..],
                b"shared"
            );
        }
    }

    /// Many logins commit at the same moment (the group writer takes them together): each
    /// commit lands whole, the last write to a record counts, and a delete in the same batch
    /// as an earlier write of that record leaves it deleted.
    async fn commits_of_many_logins_at_once_each_land_whole(s: SqlStore) {
        let store: Arc<dyn VaultStore> = Arc::new(s);
        let w = |k: &str, n: &str, v: Option<&[u8]>| {
            (k.to_owned(), n.to_owned(), v.map(<[u8]>::to_vec))
        };
        let mut commits = tokio::task::JoinSet::new();
        for i in 0..300 {
            let store = store.clone();
            let owner = format!("@u{i}:x");
            let writes = vec![
                w("session", "+1555", Some(b"first")),
                w("inbox", "7", Some(b"entry")),
                w("session", "+1555", Some(format!("state {i}").as_bytes())),
                w("inbox", "6", None),
                w("inbox", "7", None),
            ];
            commits.spawn(async move { store.write_records(&owner, &writes).await });
        }
        for r in commits.join_all().await {
            r.expect("commit");
        }
        for i in 0..300 {
            let owner = format!("@u{i}:x");
            let session = store.record(&owner, "session", "+1555").await.expect("get");
            assert_eq!(session.as_deref(), Some(format!("state {i}").as_bytes()));
            assert!(
                store
                    .record(&owner, "inbox", "7")
                    .await
                    .expect("get")
                    .is_none()
            );
        }
        // A later commit deletes what an earlier one wrote.
        store
            .write_records(
                "@u0:x",
                &[w("session", "+1555", None), w("inbox", "8", Some(b"e"))],
            )
            .await
            .expect("commit");
        assert!(
            store
                .record("@u0:x", "session", "+1555")
                .await
                .expect("get")
                .is_none()
        );
        assert_eq!(
            store.record_names("@u0:x", "inbox").await.expect("names"),
            ["8"]
        );
    }

    /// A shredded owner's wrapped data key is gone from the SQLite files themselves, the
    /// write-ahead log included, as soon as the shred returns (not only from the table).
    #[tokio::test]
    async fn a_shred_leaves_no_wrapped_key_in_the_files() {
        let (s, dir) = testing::sqlite().await;
        let store: Arc<dyn VaultStore> = Arc::new(s.clone());
        let vault = Vault::open(SecretKey::random(), store.clone())
            .await
            .expect("vault");
        vault
            .seal_record("@a:x", "session", "+1555", b"ratchet state")
            .await
            .expect("seal");
        let wrapped: Vec<u8> = sqlx::query_scalar("SELECT wrapped FROM vault_key WHERE owner = $1")
            .bind("@a:x")
            .fetch_one(s.pool())
            .await
            .expect("wrapped key");
        vault.destroy("@a:x").await.expect("destroy");
        for name in ["test.db", "test.db-wal"] {
            let bytes = std::fs::read(dir.path().join(name)).unwrap_or_default();
            assert!(
                !bytes.windows(wrapped.len()).any(|w| w == &wrapped[..]),
                "the wrapped key is still in {name}"
            );
        }
    }

    /// The caller writing a commit goes away (its future dropped) while others wait: they are
    /// still written, and the writer is free again afterwards.
    #[tokio::test]
    async fn commits_waiting_on_a_caller_that_went_away_are_written() {
        let (s, _dir) = testing::sqlite().await;
        let writer = super::group_writer();
        writer.lock().busy = true;
        let waiting = {
            let (writer, pool) = (writer.clone(), s.pool().clone());
            tokio::spawn(async move {
                let w = [("session".to_owned(), "+1".to_owned(), Some(b"v".to_vec()))];
                writer.write(&pool, ("@b:x".to_owned(), w.to_vec())).await
            })
        };
        while writer.lock().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        // What a dropped caller leaves behind.
        drop(crate::group::HandOn {
            writer: &writer,
            pool: s.pool(),
        });
        waiting.await.expect("task").expect("written");
        assert_eq!(
            s.record("@b:x", "session", "+1")
                .await
                .expect("get")
                .as_deref(),
            Some(&b"v"[..])
        );
        assert!(!writer.lock().busy);
        let w = [("session".to_owned(), "+2".to_owned(), None)];
        writer
            .write(s.pool(), ("@b:x".to_owned(), w.to_vec()))
            .await
            .expect("written at once");
    }

    async fn records_roundtrip_and_shred(s: SqlStore) {
        let store: Arc<dyn VaultStore> = Arc::new(s.clone());
        let vault = Vault::open(SecretKey::random(), store.clone())
            .await
            .expect("vault");
        let sealed = vault
            .seal_record("@a:x", "session", "+1555", b"ratchet state")
            .await
            .expect("seal");
        store
            .put_record("@a:x", "session", "+1555", &sealed)
            .await
            .expect("put");
        let got = store
            .record("@a:x", "session", "+1555")
            .await
            .expect("get")
            .expect("present");
        assert_eq!(
            &vault
                .open_record("@a:x", "session", "+1555", &got)
                .await
                .expect("open")[..],
            b"ratchet state"
        );
        assert_eq!(
            store.record_names("@a:x", "session").await.expect("names"),
            vec!["+1555".to_owned()]
        );
        vault.destroy("@a:x").await.expect("destroy");
        assert!(
            store
                .record("@a:x", "session", "+1555")
                .await
                .expect("get")
                .is_none()
        );
        assert!(matches!(
            vault.open_record("@a:x", "session", "+1555", &got).await,
            Err(VaultError::NoDataKey)
        ));
    }

    async fn rotation_rewraps_without_touching_records(s: SqlStore) {
        let store: Arc<dyn VaultStore> = Arc::new(s.clone());
        let old = SecretKey::random();
        let vault = Vault::open(old.clone(), store.clone())
            .await
            .expect("vault");
        let sealed = vault
            .seal_record("@a:x", "k", "n", b"payload")
            .await
            .expect("seal");
        let new = SecretKey::random();
        assert_eq!(vault.rotate_master_key(&new).await.expect("rotate"), 1);
        assert!(matches!(
            Vault::open(old, store.clone()).await,
            Err(VaultError::WrongMasterKey { .. })
        ));
        let reopened = Vault::open(new, store).await.expect("new master opens");
        assert_eq!(
            &reopened
                .open_record("@a:x", "k", "n", &sealed)
                .await
                .expect("open")[..],
            b"payload"
        );
    }

    async fn swapped_records_fail(s: SqlStore) {
        let store: Arc<dyn VaultStore> = Arc::new(s);
        let vault = Vault::open(SecretKey::random(), store)
            .await
            .expect("vault");
        let a = vault
            .seal_record("@a:x", "session", "+1", b"A")
            .await
            .expect("seal");
        assert!(
            vault
                .open_record("@a:x", "session", "+2", &a)
                .await
                .is_err()
        );
        vault
            .seal_record("@b:x", "session", "+1", b"B")
            .await
            .expect("seal");
        assert!(
            vault
                .open_record("@b:x", "session", "+1", &a)
                .await
                .is_err()
        );
    }
}
