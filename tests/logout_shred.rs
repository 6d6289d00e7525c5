//! Logout shreds for good: the account's actor has ended before its data key is destroyed, and
//! a write that comes late anyway fails instead of sealing under a new key nobody would shred.

mod common;

use std::time::Duration;

use common::interop::{TestGateway, body_of, random_account, register_ours, text};
use matrix_interop_bridge::{
    interop::{SignalRuntime, Target, signal_store::SignalStore},
    vault::{VaultError, VaultStore},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_leaves_no_key_and_no_late_write() {
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let mut ours = register_ours(&rt, &gw.addr, &random_account()).await;
    let friend = register_ours(&rt, &gw.addr, &random_account()).await;
    for i in 0..5 {
        friend
            .handle
            .send(
                Target::Account(ours.account.clone()),
                format!("m{i}"),
                text("hello"),
            )
            .await
            .expect("send");
    }
    // Five messages decrypted and waiting in the inbox; their acks (each a vault write) are
    // handed to the actor right before the logout, as the core does when it finishes them.
    let mut ids = Vec::new();
    while ids.len() < 5 {
        let ev = tokio::time::timeout(Duration::from_secs(30), ours.events.recv())
            .await
            .expect("event in time")
            .expect("event");
        if body_of(&ev).is_some()
            && let Some(id) = ev.envelope_id()
        {
            ids.push(id);
        }
    }
    // A store opened while the login was alive, as a slow actor would hold it.
    let db: std::sync::Arc<dyn VaultStore> = std::sync::Arc::new(ours.store.clone());
    let mut straggler = SignalStore::open("@owner:test", ours.vault.clone(), db)
        .await
        .expect("open");
    for id in ids {
        ours.handle.ack(id).await;
    }
    ours.handle.stop().await;
    ours.vault.destroy("@owner:test").await.expect("destroy");
    assert!(
        ours.store
            .wrapped_key("@owner:test")
            .await
            .expect("read")
            .is_none(),
        "a data key exists again after the logout"
    );
    assert!(
        ours.store
            .record_names("@owner:test", "session")
            .await
            .expect("names")
            .is_empty()
    );
    // Its late write fails instead of sealing under a new key.
    let late = straggler
        .commit(vec![("meta", "late".into(), Some(b"x".to_vec()))])
        .await;
    assert!(matches!(late, Err(VaultError::NoDataKey)), "{late:?}");
    assert!(
        ours.store
            .wrapped_key("@owner:test")
            .await
            .expect("read")
            .is_none()
    );
}
