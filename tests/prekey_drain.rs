//! Someone who fetches bundle after bundle of an account (never starting a session) drains its
//! one-time prekeys at the gateway, which pushes `PREKEYS_LOW` on each fetch. The account
//! replenishes at most once per coalescing window and keeps at most `MAX_KEPT` one-time keys
//! of each kind in its vault, and a real contact's message still arrives. The gateway's own
//! fetch limit (per fetcher and target) is lifted here: the bridge must hold even against a
//! gateway that does not limit, or an attacker with many accounts.

mod common;

use std::time::Duration;

use common::interop::{TestGateway, body_of, random_account, register_ours, text};
use matrix_interop_bridge::{
    interop::{GatewayConn, SignalRuntime, Target, keys},
    vault::VaultStore,
    wire::pb::{self, stanza::Body},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_prekeys_keeps_the_vault_bounded() {
    let gw = TestGateway::start_with(|c| c.limits.bundle_fetches_per_target = 1_000_000).await;
    let rt = SignalRuntime::start(1);
    let victim = random_account();
    let mut ours = register_ours(&rt, &gw.addr, &victim).await;

    let (conn, _pushes) = GatewayConn::connect(&gw.addr).await.expect("connect");
    let attacker = random_account();
    conn.request_code(&attacker).await.expect("register");
    let secret = conn
        .verify(&attacker, common::interop::CODE)
        .await
        .expect("verify");
    conn.login(&attacker, &secret, 0).await.expect("login");
    let mut fetched = 0;
    for _ in 0..1_500 {
        if conn
            .request(Body::FetchBundle(pb::FetchBundle {
                account: victim.clone(),
            }))
            .await
            .is_ok()
        {
            fetched += 1;
        }
    }
    // Give the account time to act on the pushes it got.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = |kind: &'static str| {
        let store = ours.store.clone();
        async move {
            store
                .record_names("@owner:test", kind)
                .await
                .expect("names")
                .len()
        }
    };
    let prekeys = count("prekey").await;
    let kyber = count("kyber_prekey").await;
    assert!(
        prekeys <= keys::MAX_KEPT as usize && kyber <= keys::MAX_KEPT as usize + 1,
        "after {fetched} fetches the vault holds {prekeys} prekeys and {kyber} Kyber prekeys"
    );

    // A real contact still reaches the account.
    let mut friend = register_ours(&rt, &gw.addr, &random_account()).await;
    friend
        .handle
        .send(
            Target::Account(victim.clone()),
            "hi".into(),
            text("still there?"),
        )
        .await
        .expect("send");
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("still there?"));
    let _ = friend.events.try_recv();
}
