//! Logins: credentials sealed in the vault, and starting an account's actor.

use super::*;

/// Stores the account's credentials for `owner` (after a successful `Verify`).
pub async fn save_credentials(
    vault: &Vault,
    db: &Arc<dyn VaultStore>,
    owner: &str,
    account: &str,
    secret: &[u8],
) -> Result<(), InteropError> {
    let raw = zeroize::Zeroizing::new(
        serde_json::to_vec(&Credentials {
            account: account.to_owned(),
            secret: secret.to_vec(),
        })
        .expect("serializes"),
    );
    let sealed = vault.seal_record(owner, META, "credentials", &raw).await?;
    db.put_record(owner, META, "credentials", &sealed)
        .await
        .map_err(mib_vault::VaultError::from)?;
    Ok(())
}

/// The account id stored for `owner`, if it has logged in before.
pub async fn stored_account(
    vault: &Vault,
    db: &Arc<dyn VaultStore>,
    owner: &str,
) -> Result<Option<String>, InteropError> {
    let Some(sealed) = db
        .record(owner, META, "credentials")
        .await
        .map_err(mib_vault::VaultError::from)?
    else {
        return Ok(None);
    };
    let raw = vault
        .open_record(owner, META, "credentials", &sealed)
        .await?;
    let c: Credentials = serde_json::from_slice(&raw)
        .map_err(|_| InteropError::Invalid("stored credentials are corrupt".into()))?;
    Ok(Some(c.account))
}

/// Starts the actor of `owner`'s account on `rt`; events go to `events`.
pub async fn spawn_account(
    rt: &SignalRuntime,
    owner: &str,
    gateway: GatewayAddr,
    vault: Vault,
    db: Arc<dyn VaultStore>,
    events: mpsc::UnboundedSender<Box<Event>>,
    options: AccountOptions,
) -> Result<AccountHandle, InteropError> {
    let sealed = db
        .record(owner, META, "credentials")
        .await
        .map_err(mib_vault::VaultError::from)?
        .ok_or_else(|| InteropError::Invalid("not logged in".into()))?;
    let raw = vault
        .open_record(owner, META, "credentials", &sealed)
        .await?;
    let creds: Credentials = serde_json::from_slice(&raw)
        .map_err(|_| InteropError::Invalid("stored credentials are corrupt".into()))?;
    let (tx, rx) = mpsc::channel(256);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (conn_tx, conn_rx) = watch::channel(None);
    let account = creds.account.clone();
    let owner = owner.to_owned();
    let doing = actor::SharedDoing::default();
    let actor_doing = doing.clone();
    // By the interop account: one owner may run several (the tests' and the bench's contacts
    // all have one owner), and each should get a shard of its own choosing.
    rt.spawn(&account, move || async move {
        let store = match SignalStore::open(&owner, vault, db).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the account's Signal state");
                return;
            }
        };
        // Which envelopes have a decrypted message waiting (from before a restart).
        let inbox = match store.extra_names(INBOX).await {
            Ok(names) => Some(names.iter().filter_map(|n| n.parse().ok()).collect()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the account's inbox");
                None
            }
        };
        let actor = Actor {
            creds,
            gateway,
            store,
            conn: None,
            published: conn_tx,
            events,
            groups: HashMap::new(),
            recent: std::collections::VecDeque::new(),
            inbox,
            last_replenish: None,
            store_backoff: FIRST_STORE_BACKOFF,
            x3dh_recheck: options.x3dh_recheck,
            doing: actor_doing,
        };
        actor.run(rx, ack_rx).await;
    });
    Ok(AccountHandle {
        account,
        cmd: tx,
        acks: ack_tx,
        conn: conn_rx,
        doing,
    })
}
