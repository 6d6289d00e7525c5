//! Message requests and their held messages, sealed with the receiving user's data key (so a
//! logout shreds them with everything else of the user's).

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Serialize, de::DeserializeOwned};

use mib_core::{
    BridgeError,
    requests::{HeldMessage, MessageRequest, RequestStore},
};
use mib_vault::{Vault, VaultError, VaultStore, record_ad};

const REQUEST: &str = "request";
const HELD: &str = "held";

/// [`RequestStore`] over the vault's sealed records.
pub struct SealedRequests {
    vault: Vault,
    db: Arc<dyn VaultStore>,
}

impl SealedRequests {
    pub fn new(vault: Vault, db: Arc<dyn VaultStore>) -> Self {
        Self { vault, db }
    }

    async fn put<T: Serialize>(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
        value: &T,
    ) -> Result<(), BridgeError> {
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(value).map_err(|e| BridgeError::Vault(e.to_string()))?,
        );
        // Never creates a data key: a user who logged out meanwhile gets nothing stored.
        let key = self
            .vault
            .existing_data_key(owner)
            .await
            .map_err(vault_err)?;
        let sealed = key.seal(&record_ad(owner, kind, name), &plain);
        self.db
            .put_record(owner, kind, name, &sealed)
            .await
            .map_err(BridgeError::from)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        owner: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<T>, BridgeError> {
        let Some(sealed) = self.db.record(owner, kind, name).await? else {
            return Ok(None);
        };
        let plain = self
            .vault
            .open_record(owner, kind, name, &sealed)
            .await
            .map_err(vault_err)?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|e| BridgeError::Vault(e.to_string()))
    }

    async fn held_names(&self, owner: &str, chat_id: &str) -> Result<Vec<String>, BridgeError> {
        // `{chat_id}/{seq}`: the chat is everything before the last `/`, compared exactly (a
        // group id may itself hold a `/`).
        let mut names: Vec<String> = self
            .db
            .record_names(owner, HELD)
            .await?
            .into_iter()
            .filter(|n| n.rsplit_once('/').is_some_and(|(chat, _)| chat == chat_id))
            .collect();
        names.sort();
        Ok(names)
    }
}

fn vault_err(e: VaultError) -> BridgeError {
    match e {
        VaultError::Store(s) => BridgeError::from(s),
        e => BridgeError::Vault(e.to_string()),
    }
}

#[async_trait]
impl RequestStore for SealedRequests {
    async fn request(
        &self,
        receiver: &str,
        chat_id: &str,
    ) -> Result<Option<MessageRequest>, BridgeError> {
        self.get(receiver, REQUEST, chat_id).await
    }

    async fn save_request(&self, receiver: &str, r: &MessageRequest) -> Result<(), BridgeError> {
        self.put(receiver, REQUEST, &r.chat_id, r).await
    }

    async fn requests(&self, receiver: &str) -> Result<Vec<MessageRequest>, BridgeError> {
        let mut out = Vec::new();
        for name in self.db.record_names(receiver, REQUEST).await? {
            // One unreadable record must not stop every later stranger's message.
            match self.get(receiver, REQUEST, &name).await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable message request"),
            }
        }
        Ok(out)
    }

    async fn hold(
        &self,
        receiver: &str,
        chat_id: &str,
        seq: u32,
        m: &HeldMessage,
    ) -> Result<(), BridgeError> {
        self.put(receiver, HELD, &format!("{chat_id}/{seq:08}"), m)
            .await
    }

    async fn held(&self, receiver: &str, chat_id: &str) -> Result<Vec<HeldMessage>, BridgeError> {
        let mut out = Vec::new();
        for name in self.held_names(receiver, chat_id).await? {
            if let Some(m) = self.get(receiver, HELD, &name).await? {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn forget(
        &self,
        receiver: &str,
        chat_id: &str,
        keep_request: bool,
    ) -> Result<(), BridgeError> {
        let mut writes: Vec<(String, String, Option<Vec<u8>>)> = self
            .held_names(receiver, chat_id)
            .await?
            .into_iter()
            .map(|n| (HELD.to_owned(), n, None))
            .collect();
        if !keep_request {
            writes.push((REQUEST.to_owned(), chat_id.to_owned(), None));
        }
        self.db
            .write_records(receiver, &writes)
            .await
            .map_err(BridgeError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use mib_vault::SecretKey;

    fn held(n: u32) -> HeldMessage {
        HeldMessage {
            from: "+15550002000".into(),
            message_id: format!("m{n}"),
            timestamp: u64::from(n),
            data: format!("secret offer {n}").into_bytes(),
        }
    }

    /// Requests and held messages come back as kept, held ones in order, and are never
    /// plaintext in the database (nor its write-ahead log).
    #[tokio::test]
    async fn held_messages_are_sealed_at_rest_and_come_back_in_order() {
        let (store, dir) = testing::sqlite().await;
        let db = Arc::new(store);
        let vault = Vault::open(SecretKey::random(), db.clone()).await.unwrap();
        vault.data_key("@alice:x").await.unwrap();
        let requests = SealedRequests::new(vault, db);
        let request = MessageRequest {
            chat_id: "+15550002000".into(),
            group: false,
            from: "+15550002000".into(),
            name: "secret name".into(),
            held: 11,
            dropped: 0,
            declined: false,
            accepted: false,
            held_bytes: 0,
        };
        requests.save_request("@alice:x", &request).await.unwrap();
        for n in [0, 1, 2, 10] {
            requests
                .hold("@alice:x", "+15550002000", n, &held(n))
                .await
                .unwrap();
        }
        // Another chat whose id begins like this one's is another chat.
        requests
            .hold("@alice:x", "+1555000200", 0, &held(99))
            .await
            .unwrap();
        let back = requests.held("@alice:x", "+15550002000").await.unwrap();
        assert_eq!(
            back.iter()
                .map(|m| m.message_id.as_str())
                .collect::<Vec<_>>(),
            ["m0", "m1", "m2", "m10"]
        );
        assert_eq!(
            requests.requests("@alice:x").await.unwrap(),
            vec![request.clone()]
        );
        for file in ["test.db", "test.db-wal"] {
            let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
            assert!(!bytes.windows(12).any(|w| w == b"secret offer"), "{file}");
            assert!(!bytes.windows(11).any(|w| w == b"secret name"), "{file}");
        }
        requests
            .forget("@alice:x", "+15550002000", true)
            .await
            .unwrap();
        assert!(
            requests
                .held("@alice:x", "+15550002000")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            requests
                .held("@alice:x", "+1555000200")
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            requests
                .request("@alice:x", "+15550002000")
                .await
                .unwrap()
                .is_some()
        );
        requests
            .forget("@alice:x", "+15550002000", false)
            .await
            .unwrap();
        assert!(
            requests
                .request("@alice:x", "+15550002000")
                .await
                .unwrap()
                .is_none()
        );
    }
}
