//! The SQL side of the vault: wrapped data keys and sealed records.

use async_trait::async_trait;
use sqlx::Row;

use super::{Db, SqlStore, StoreError};
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
        sqlx::query("INSERT INTO vault_key (owner, wrapped, master_key_id) VALUES ($1, $2, $3)")
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
        let mut tx = self.pool().begin().await.db()?;
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
        let mut tx = self.pool().begin().await.db()?;
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
        // One statement is atomic on its own: the common single write (a session after a
        // message) skips BEGIN and COMMIT, two round trips to the database.
        if let [(kind, name, sealed)] = writes {
            let mut conn = self.pool().acquire().await.db()?;
            return Ok(write_record(&mut conn, owner, kind, name, sealed.as_deref()).await?);
        }
        let mut tx = self.pool().begin().await.db()?;
        for (kind, name, sealed) in writes {
            write_record(&mut tx, owner, kind, name, sealed.as_deref()).await?;
        }
        tx.commit().await.db()?;
        Ok(())
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

    macro_rules! vault_suite {
        ($($name:ident),* $(,)?) => {
            mod sqlite_suite {
                $(#[tokio::test] async fn $name() { let (s, _d) = super::testing::sqlite().await; super::$name(s).await; })*
            }
            mod postgres_suite {
                $(#[tokio::test] async fn $name() { let s = super::testing::postgres().await; super::$name(s).await; })*
            }
        };
    }

    vault_suite!(
        records_roundtrip_and_shred,
        rotation_rewraps_without_touching_records,
        swapped_records_fail
    );

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
