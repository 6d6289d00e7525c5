//! What the vault needs from the database: wrapped data keys and sealed records.

use async_trait::async_trait;

use mib_core::store::StoreError;

#[async_trait]
pub trait VaultStore: Send + Sync {
    async fn wrapped_key(&self, owner: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores the owner's wrapped data key unless the owner has one already (made at the same
    /// moment by another worker on the same database): then the stored one stays.
    async fn put_wrapped_key(
        &self,
        owner: &str,
        wrapped: &[u8],
        master_key_id: &str,
    ) -> Result<(), StoreError>;
    /// The id of the master key any data key is wrapped with, if there is one.
    async fn any_master_key_id(&self) -> Result<Option<String>, StoreError>;
    async fn all_wrapped_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Replaces all wrapped keys at once (master key rotation).
    async fn replace_wrapped_keys(
        &self,
        keys: &[(String, Vec<u8>)],
        master_key_id: &str,
    ) -> Result<(), StoreError>;
    /// Deletes the owner's data key and all of its records.
    async fn destroy_owner(&self, owner: &str) -> Result<(), StoreError>;

    async fn record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    async fn put_record(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
        sealed: &[u8],
    ) -> Result<(), StoreError>;
    async fn delete_record(&self, owner: &str, kind: &str, name: &str) -> Result<(), StoreError>;
    /// Writes several records of one owner in one transaction (`None` deletes).
    async fn write_records(
        &self,
        owner: &str,
        writes: &[(String, String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError>;
    async fn record_names(&self, owner: &str, kind: &str) -> Result<Vec<String>, StoreError>;
}
