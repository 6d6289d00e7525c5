//! Our interop client against the reference gateway, both in process: registration, PQXDH
//! sessions both ways, groups with sender keys, media, acks and redelivery, bad input.

mod common;

use common::interop::{TestGateway, body_of, random_account, register_ours, send_paced, text};
use matrix_interop_bridge::{
    interop::{Event, GatewayConn, SignalRuntime, Target},
    wire::pb::{self, ErrorCode, stanza::Body},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_both_ways_groups_and_media() {
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let mut a = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut b = register_ours(&rt, &gw.addr, &random_account()).await;

    // A starts the session (PQXDH from B's bundle); several ratchet steps in both directions.
    for i in 0..3 {
        a.handle
            .send(
                Target::Account(b.account.clone()),
                format!("a{i}"),
                text(&format!("hello {i}")),
            )
            .await
            .expect("send a->b");
        let got = b.wait(|e| body_of(e).is_some()).await;
        assert_eq!(
            body_of(&got).as_deref(),
            Some(format!("hello {i}").as_str())
        );
        b.handle
            .send(
                Target::Account(a.account.clone()),
                format!("b{i}"),
                text(&format!("reply {i}")),
            )
            .await
            .expect("send b->a");
        let got = a.wait(|e| body_of(e).is_some()).await;
        assert_eq!(
            body_of(&got).as_deref(),
            Some(format!("reply {i}").as_str())
        );
    }
    let info = a
        .handle
        .session_info(b.account.clone())
        .await
        .expect("info");
    assert!(info.exists);
    assert!(
        info.version >= 4,
        "PQXDH sessions are version 4, got {}",
        info.version
    );

    // A group: sender keys are distributed pairwise, then group messages flow both ways.
    let group = a
        .handle
        .create_group("friends".into(), vec![b.account.clone()])
        .await
        .expect("group");
    b.wait(|e| matches!(e, Event::GroupUpdate { .. })).await;
    a.handle
        .send(
            Target::Group(group.id.clone()),
            "g1".into(),
            text("to the group"),
        )
        .await
        .expect("group send");
    let got = b.wait(|e| body_of(e).is_some()).await;
    assert!(matches!(&got, Event::Message { group: Some(g), .. } if *g == group.id));
    b.handle
        .send(
            Target::Group(group.id.clone()),
            "g2".into(),
            text("group reply"),
        )
        .await
        .expect("group send b");
    let got = a.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("group reply"));

    // Media: encrypted, uploaded, downloaded and checked.
    let picture: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let (blob, sealed) = a.handle.upload(picture.clone()).await.expect("upload");
    let back = b
        .handle
        .download(blob, sealed.key.to_vec(), sealed.sha256.clone(), 100 << 20)
        .await
        .expect("download");
    assert_eq!(back, picture);

    // Receipts and typing reach the other side.
    b.handle
        .receipt(
            a.account.clone(),
            pb::Receipt {
                r#type: pb::ReceiptType::Read as i32,
                message_ids: vec!["b0".into()],
                group: String::new(),
            },
        )
        .await
        .expect("receipt");
    a.wait(|e| matches!(e, Event::Receipt { .. })).await;
    b.handle
        .typing(Target::Account(a.account.clone()), true)
        .await
        .expect("typing");
    a.wait(|e| matches!(e, Event::Typing { typing: true, .. }))
        .await;

    // Sending is idempotent per message id: a retry is not delivered twice.
    a.handle
        .send(
            Target::Account(b.account.clone()),
            "dup".into(),
            text("once"),
        )
        .await
        .expect("send");
    let first = a
        .handle
        .send(
            Target::Account(b.account.clone()),
            "dup".into(),
            text("once"),
        )
        .await
        .expect("resend");
    assert_eq!(first.recipients, 1);
    b.wait(|e| body_of(e).as_deref() == Some("once")).await;
    b.handle
        .send(
            Target::Account(a.account.clone()),
            "marker".into(),
            text("marker"),
        )
        .await
        .expect("marker");
    a.wait(|e| body_of(e).as_deref() == Some("marker")).await;
    a.handle
        .send(
            Target::Account(b.account.clone()),
            "after".into(),
            text("after"),
        )
        .await
        .expect("send");
    let next = b.wait(|e| body_of(e).is_some()).await;
    assert_eq!(
        body_of(&next).as_deref(),
        Some("after"),
        "the duplicate must not be delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rejects_bad_input_clearly() {
    let gw = TestGateway::start().await;
    let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    // Before login only account requests work.
    let e = conn
        .request(Body::KeyCounts(pb::KeyCounts {}))
        .await
        .expect_err("needs login");
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    let e = conn.request_code("12345").await.expect_err("bad account");
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    let account = random_account();
    conn.request_code(&account).await.expect("register");
    let e = conn
        .verify(&account, "000000")
        .await
        .expect_err("wrong code");
    assert_eq!(e.code(), Some(ErrorCode::BadCode));
    let secret = conn
        .verify(&account, common::interop::CODE)
        .await
        .expect("verify");
    let e = conn
        .login(&account, b"wrong", 0)
        .await
        .expect_err("wrong secret");
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    conn.login(&account, &secret, 0).await.expect("login");
    // A bundle with a bad signature is refused.
    let ik = libsignal_protocol::IdentityKeyPair::generate(&mut rand::rng());
    let spk = libsignal_protocol::KeyPair::generate(&mut rand::rng());
    let up = pb::UploadKeys {
        identity_key: ik.identity_key().serialize().to_vec(),
        registration_id: 7,
        signed_prekey: Some(pb::SignedKey {
            id: 1,
            public_key: spk.public_key.serialize().to_vec(),
            signature: vec![0u8; 64],
        }),
        kyber_last_resort: None,
        one_time_prekeys: vec![],
        kyber_prekeys: vec![],
    };
    let e = conn
        .request(Body::UploadKeys(up))
        .await
        .expect_err("bad signature");
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    // Oversized media is refused with TOO_LARGE.
    let mut offset = 0;
    let mut last_err = None;
    for _ in 0..6 {
        let put = pb::BlobPut {
            upload: "u1".into(),
            offset,
            data: vec![1u8; 512 * 1024],
            last: false,
            sha256: vec![],
        };
        match conn.request(Body::BlobPut(put)).await {
            Ok(_) => offset += 512 * 1024,
            Err(e) => {
                last_err = Some(e);
                break;
            }
        }
    }
    assert_eq!(last_err.and_then(|e| e.code()), Some(ErrorCode::TooLarge));
    // Unknown recipients are refused, and the connection still works.
    let send = pb::Send {
        to: "+19990000000".into(),
        kind: pb::Kind::Message as i32,
        ciphertext: vec![1],
        message_id: "m".into(),
        ..Default::default()
    };
    let e = conn
        .request(Body::Send(send))
        .await
        .expect_err("unknown recipient");
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert!(matches!(
        conn.request(Body::Ping(pb::Ping { nonce: 3 })).await,
        Ok(Body::Pong(pb::Pong { nonce: 3 }))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_loses_no_envelope_and_db_holds_no_secrets() {
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let a = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut b = register_ours(&rt, &gw.addr, &random_account()).await;
    a.handle
        .send(
            Target::Account(b.account.clone()),
            "x0".into(),
            text("distinctive-plaintext-31337"),
        )
        .await
        .expect("send");
    b.wait(|e| body_of(e).is_some()).await;

    // B is offline while A sends; then the gateway restarts with its state.
    b.handle.stop().await;
    for i in 0..2 {
        a.handle
            .send(
                Target::Account(b.account.clone()),
                format!("q{i}"),
                text(&format!("queued {i}")),
            )
            .await
            .expect("send");
    }
    gw.stop();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let port = gw.port;
    let addr = gw.addr.clone();
    let gw2 = TestGateway::restart(gw, port).await;
    assert_eq!(gw2.addr.address, addr.address);

    b.respawn(&rt, &addr).await;
    for i in 0..2 {
        assert_eq!(
            body_of(&b.wait(|e| body_of(e).is_some()).await),
            Some(format!("queued {i}"))
        );
    }
    // A reconnects by itself and keeps talking.
    a.handle
        .send(
            Target::Account(b.account.clone()),
            "after".into(),
            text("after restart"),
        )
        .await
        .ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if a.handle
            .send(
                Target::Account(b.account.clone()),
                "after".into(),
                text("after restart"),
            )
            .await
            .is_ok()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "A did not reconnect");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(
        body_of(&b.wait(|e| body_of(e).is_some()).await).as_deref(),
        Some("after restart")
    );

    // Neither the message text nor B's private identity key is anywhere in B's database files.
    b.handle.stop().await;
    let vault = common::interop::reopen_vault(&b).await;
    let db: std::sync::Arc<dyn matrix_interop_bridge::vault::VaultStore> =
        std::sync::Arc::new(b.store.clone());
    let signal =
        matrix_interop_bridge::interop::signal_store::SignalStore::open("@owner:test", vault, db)
            .await
            .expect("open");
    let private = signal.identity_key_pair().private_key().serialize();
    b.store.close().await;
    let mut files = 0;
    for entry in std::fs::read_dir(b._dir.path()).expect("dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        files += 1;
        for needle in [
            &b"distinctive-plaintext-31337"[..],
            b"queued 0",
            &private[..],
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "secret found in the database files"
            );
        }
    }
    assert!(files >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_not_acked_before_a_restart_is_replayed_from_the_inbox() {
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let a = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut b = register_ours(&rt, &gw.addr, &random_account()).await;
    a.handle
        .send(
            Target::Account(b.account.clone()),
            "m1".into(),
            text("kept for later"),
        )
        .await
        .expect("send");
    // B decrypts it but stops before acking (the bridge crashed before the Matrix side had it).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout_at(deadline, b.events.recv())
            .await
            .expect("timed out")
            .expect("events");
        if body_of(&ev).is_some() {
            break;
        }
        if let Some(id) = ev.envelope_id() {
            b.handle.ack(id).await;
        }
    }
    b.handle.stop().await;
    // The gateway redelivers; the ratchet has moved on, so only the vault's inbox can answer.
    b.respawn(&rt, &gw.addr).await;
    let again = b
        .wait(|e| body_of(e).is_some() || matches!(e, Event::Undecryptable { .. }))
        .await;
    assert_eq!(
        body_of(&again).as_deref(),
        Some("kept for later"),
        "{again:?}"
    );
    a.handle
        .send(
            Target::Account(b.account.clone()),
            "m2".into(),
            text("and the next one"),
        )
        .await
        .expect("send");
    let next = b.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&next).as_deref(), Some("and the next one"));
}

/// A login that comes back to a long queue works through it while whoever handles its events
/// calls back into the account for each one (as the bridge does for media, profiles and
/// groups): the gateway pushes only a window of envelopes ahead of the acks and the account
/// never waits on its consumer, so neither can block the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_drains_while_the_consumer_calls_back_into_the_account() {
    const BACKLOG: usize = 1500;
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let a = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut b = register_ours(&rt, &gw.addr, &random_account()).await;
    b.handle.stop().await;
    for i in 0..BACKLOG {
        let (id, body) = (format!("m{i}"), text(&format!("queued {i}")));
        send_paced(&a.handle, &b.account, id, body).await;
    }
    b.respawn(&rt, &gw.addr).await;
    // The consumer is slow at first (a homeserver taking its time): the account gets far ahead
    // of it, as far as it is allowed to, before the first call back into it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut next = 0;
    while next < BACKLOG {
        let ev = tokio::time::timeout_at(deadline, b.events.recv())
            .await
            .unwrap_or_else(|_| panic!("stuck after {next} of {BACKLOG} messages"))
            .expect("events");
        if let Some(body) = body_of(&ev) {
            assert_eq!(body, format!("queued {next}"), "out of order");
            next += 1;
            // A call back into the account's actor before the ack.
            b.handle
                .session_info(a.account.clone())
                .await
                .expect("session info while draining");
        }
        if let Some(id) = ev.envelope_id() {
            b.handle.ack(id).await;
        }
    }
}

/// An account does not wait on the gateway's answer to a `Send` before its next command: while
/// the gateway's database is locked (another writer holds it) and the `Send` waits to be stored,
/// the same account answers other commands. Once the lock goes, the held message is stored and
/// the next one follows it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_works_on_while_the_gateway_stores_its_send() {
    use sqlx::Connection;
    use std::time::Duration;
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let a = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut b = register_ours(&rt, &gw.addr, &random_account()).await;
    let b_account = b.account.clone();
    let to_b = || Target::Account(b_account.clone());
    a.handle
        .send(to_b(), "m0".into(), text("first"))
        .await
        .expect("send");
    let got = b.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("first"));

    let uri = format!("sqlite://{}", gw.dir.path().join("gateway.db").display());
    let mut other = sqlx::SqliteConnection::connect(&uri)
        .await
        .expect("connect");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("lock the gateway's database");
    let held = tokio::spawn({
        let handle = a.handle.clone();
        let to = to_b();
        async move { handle.send(to, "m1".into(), text("held")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the send did not wait for the lock");
    let info = tokio::time::timeout(
        Duration::from_secs(3),
        a.handle.session_info(b_account.clone()),
    )
    .await
    .expect("the account answers while its send waits for the gateway")
    .expect("session info");
    assert!(info.exists);
    sqlx::query("COMMIT")
        .execute(&mut other)
        .await
        .expect("unlock");
    held.await
        .expect("task")
        .expect("the held send is stored once the lock goes");
    a.handle
        .send(to_b(), "m2".into(), text("next"))
        .await
        .expect("send");
    for want in ["held", "next"] {
        let got = b.wait(|e| body_of(e).is_some()).await;
        assert_eq!(body_of(&got).as_deref(), Some(want));
    }
}

/// A request made on a connection whose gateway went away fails at once: it does not wait out
/// the 60 s answer timeout because its stanza still fit in the writer's channel after the reader
/// had ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_the_connection_ended_fails_at_once() {
    use std::time::Duration;
    let gw = TestGateway::start().await;
    let (conn, mut pushes) = GatewayConn::connect(&gw.addr).await.expect("connect");
    gw.stop();
    // The pushes end when the connection's reader does.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while pushes.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the reader did not see the gateway go");
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        conn.request(Body::Ping(pb::Ping { nonce: 1 })),
    )
    .await
    .expect("the request fails at once, not after its timeout");
    assert!(
        matches!(
            answer,
            Err(matrix_interop_bridge::interop::InteropError::Disconnected)
        ),
        "{answer:?}"
    );
}

/// A backlog is decrypted in runs: the messages of a run are sealed into the inbox with their
/// ratchet steps in one transaction, not one each. An undecryptable envelope in the middle of
/// a run costs the messages beside it nothing, and a run whose commit fails (a full disk)
/// comes again whole: every message is handed on once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_committed_in_runs_and_a_bad_envelope_or_failed_commit_loses_nothing() {
    use common::interop::InboxWrites;
    use std::sync::atomic::Ordering::SeqCst;
    const BACKLOG: usize = 300;
    let gw = TestGateway::start().await;
    let rt = SignalRuntime::start(1);
    let a = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut b = register_ours(&rt, &gw.addr, &random_account()).await;
    // A third account that sends B garbage halfway through.
    let (mallory, _pushes, m) = common::interop::raw_login(&gw.addr).await;
    b.handle.stop().await;
    for i in 0..BACKLOG {
        if i == BACKLOG / 2 {
            let garbage = pb::Send {
                to: b.account.clone(),
                kind: pb::Kind::Message as i32,
                ciphertext: vec![0x33; 80],
                message_id: "garbage".into(),
                ..Default::default()
            };
            mallory.request(Body::Send(garbage)).await.expect("send");
        }
        let (id, body) = (format!("m{i}"), text(&format!("queued {i}")));
        send_paced(&a.handle, &b.account, id, body).await;
    }
    let writes = InboxWrites::new(b.store.clone());
    // The first run's commit fails: the account logs in again and gets it all again.
    writes.fail_next.store(true, SeqCst);
    b.respawn_over(&rt, &gw.addr, writes.clone()).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let (mut next, mut undecryptable) = (0, 0);
    while next < BACKLOG {
        let ev = tokio::time::timeout_at(deadline, b.events.recv())
            .await
            .unwrap_or_else(|_| panic!("stuck after {next} of {BACKLOG} messages"))
            .expect("events");
        if let Some(body) = body_of(&ev) {
            assert_eq!(
                body,
                format!("queued {next}"),
                "lost, doubled or out of order"
            );
            next += 1;
        }
        if let Event::Undecryptable { from, .. } = &*ev {
            assert_eq!(from, &m);
            assert_eq!(next, BACKLOG / 2, "reported in its place");
            undecryptable += 1;
        }
        if let Some(id) = ev.envelope_id() {
            b.handle.ack(id).await;
        }
    }
    assert_eq!(undecryptable, 1);
    assert!(!writes.fail_next.load(SeqCst), "the failure was met");
    let (transactions, messages) = (
        writes.transactions.load(SeqCst),
        writes.messages.load(SeqCst),
    );
    assert_eq!(messages, BACKLOG, "each message sealed once");
    assert!(
        transactions <= BACKLOG / 2,
        "{transactions} inbox transactions for {BACKLOG} messages"
    );
}
