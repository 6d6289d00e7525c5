//! Our interop client against contacts on the official libsignal (npm
//! `@signalapp/libsignal-client`), through the reference gateway.

mod common;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{
    interop::{
        CODE, TestGateway, body_of, random_account, register_ours, register_ours_with, text,
    },
    node::NodeContact,
};
use matrix_interop_bridge::{
    interop::{AccountOptions, Event, SignalRuntime, Target, account},
    wire::content::{DataMessage, data_message::Body as D},
};
use serde_json::json;

fn node_text(v: &serde_json::Value) -> Option<&str> {
    (v["event"] == "message")
        .then(|| v["content"]["text"]["body"].as_str())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_libsignal_contact_both_directions() {
    let gw = TestGateway::start().await;
    let key = B64.encode(&gw.addr.public_key);
    let rt = SignalRuntime::start(1);

    // The contact starts the session from our bundle (PQXDH, with SPQR).
    let mut ours = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut node = NodeContact::spawn();
    node.setup(gw.port, &key, &random_account(), CODE);
    let sent =
        node.call(json!({"cmd": "send", "to": ours.account, "content": "hi from libsignal"}));
    assert_eq!(sent["kind"], "PREKEY");
    assert_eq!(sent["pqxdh"], true, "{sent}");
    assert_eq!(sent["spqr"], true, "{sent}");
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("hi from libsignal"));
    // Several ratchet steps, alternating.
    for i in 0..4 {
        ours.handle
            .send(
                Target::Account(node.account.clone()),
                format!("r{i}"),
                text(&format!("ours {i}")),
            )
            .await
            .expect("send");
        let ev = node.event("our reply", |v| node_text(v) == Some(&format!("ours {i}")));
        assert_eq!(ev["spqr"], true, "SPQR in use: {ev}");
        node.call(json!({"cmd": "send", "to": ours.account, "content": format!("theirs {i}")}));
        let got = ours.wait(|e| body_of(e).is_some()).await;
        assert_eq!(body_of(&got), Some(format!("theirs {i}")));
    }

    // We start the session from the contact's bundle.
    let mut node2 = NodeContact::spawn();
    node2.setup(gw.port, &key, &random_account(), CODE);
    ours.handle
        .send(
            Target::Account(node2.account.clone()),
            "first".into(),
            text("we start"),
        )
        .await
        .expect("send");
    let ev = node2.event("our first message", |v| node_text(v) == Some("we start"));
    assert_eq!(ev["kind"], "PREKEY");
    assert_eq!(ev["spqr"], true, "{ev}");
    node2.call(json!({"cmd": "send", "to": ours.account, "content": "got it"}));
    assert_eq!(
        body_of(&ours.wait(|e| body_of(e).is_some()).await).as_deref(),
        Some("got it")
    );

    // Delayed delivery: several messages in a row without answers, read in order.
    for i in 0..5 {
        node2.call(json!({"cmd": "send", "to": ours.account, "content": format!("burst {i}")}));
    }
    for i in 0..5 {
        assert_eq!(
            body_of(&ours.wait(|e| body_of(e).is_some()).await),
            Some(format!("burst {i}"))
        );
    }

    // A group made by the contact: sender keys both ways.
    let g = node.call(
        json!({"cmd": "create_group", "name": "mixed", "members": [ours.account, node2.account]}),
    );
    let gid = g["group"]["id"].as_str().expect("group id").to_owned();
    ours.wait(|e| matches!(e, Event::GroupUpdate { .. })).await;
    node.call(json!({"cmd": "send_group", "group": gid, "content": "hello group"}));
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert!(
        matches!(&got, Event::Message { group: Some(g), .. } if *g == gid),
        "{got:?}"
    );
    assert_eq!(body_of(&got).as_deref(), Some("hello group"));
    ours.handle
        .send(
            Target::Group(gid.clone()),
            "gm1".into(),
            text("ours to group"),
        )
        .await
        .expect("group send");
    let ev = node.event("group message from us", |v| {
        node_text(v) == Some("ours to group")
    });
    assert_eq!(ev["kind"], "GROUP");
    node2.event("group message from us", |v| {
        node_text(v) == Some("ours to group")
    });

    // Media from the contact is downloaded and checked by us.
    let png = vec![0x89u8, b'P', b'N', b'G', 1, 2, 3, 4, 5];
    let up = node.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&png), "mimetype": "image/png", "type": "IMAGE"}));
    node.call(json!({"cmd": "send", "to": ours.account, "content": {"media": up["media"]}}));
    let got = ours
        .wait(|e| {
            matches!(
                e,
                Event::Message {
                    data: DataMessage {
                        body: Some(D::Media(_)),
                        ..
                    },
                    ..
                }
            )
        })
        .await;
    let Event::Message {
        data: DataMessage {
            body: Some(D::Media(m)),
            ..
        },
        ..
    } = got
    else {
        unreachable!()
    };
    let bytes = ours
        .handle
        .download(m.blob, m.key, m.sha256, 100 << 20)
        .await
        .expect("download");
    assert_eq!(bytes, png);

    // Identity change: the contact resets its identity and starts over; we notice.
    node2.call(json!({"cmd": "reset_identity"}));
    node2.call(json!({"cmd": "send", "to": ours.account, "content": "new identity here"}));
    ours.wait(|e| matches!(e, Event::IdentityChanged { peer } if *peer == node2.account))
        .await;
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("new identity here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_arrive_after_reconnect_and_restart() {
    let gw = TestGateway::start().await;
    let key = B64.encode(&gw.addr.public_key);
    let rt = SignalRuntime::start(1);
    let mut ours = register_ours(&rt, &gw.addr, &random_account()).await;
    let mut node = NodeContact::spawn();
    node.setup(gw.port, &key, &random_account(), CODE);
    node.call(json!({"cmd": "send", "to": ours.account, "content": "before"}));
    ours.wait(|e| body_of(e).is_some()).await;

    // Our side goes away (bridge restart): messages queue at the gateway.
    ours.handle.stop().await;
    for i in 0..3 {
        node.call(json!({"cmd": "send", "to": ours.account, "content": format!("queued {i}")}));
    }
    // The account comes back from the vault (same keys and sessions) and gets them in order.
    let db: std::sync::Arc<dyn matrix_interop_bridge::vault::VaultStore> =
        std::sync::Arc::new(ours.store.clone());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    ours.events = rx;
    let vault = common::interop::reopen_vault(&ours).await;
    ours.handle = account::spawn_account(
        &rt,
        "@owner:test",
        gw.addr.clone(),
        vault,
        db,
        tx,
        Default::default(),
    )
    .await
    .expect("respawn");
    for i in 0..3 {
        assert_eq!(
            body_of(&ours.wait(|e| body_of(e).is_some()).await),
            Some(format!("queued {i}"))
        );
    }

    // The contact holds its acks, drops the connection, and gets the same envelopes again.
    node.call(json!({"cmd": "hold_acks", "on": true}));
    ours.handle
        .send(
            Target::Account(node.account.clone()),
            "h1".into(),
            text("held"),
        )
        .await
        .expect("send");
    node.event("held message", |v| node_text(v) == Some("held"));
    node.call(json!({"cmd": "disconnect"}));
    node.call(json!({"cmd": "connect", "host": "127.0.0.1", "port": gw.port, "server_key": key}));
    node.call(json!({"cmd": "login"}));
    let again = node.event("redelivery", |v| {
        v["event"] == "message" && v["redelivered"] == true
    });
    assert_eq!(node_text(&again), Some("held"));
}

/// A contact on official libsignal 0.72.1 that publishes no Kyber prekey (an X3DH-era client):
/// we start a classic X3DH session from its bundle and chat both ways, in a group too and
/// across a restart; once it publishes Kyber prekeys, the next check of its keys moves us to
/// PQXDH. A contact on the current libsignal in the same run stays on PQXDH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x3dh_era_contact_is_reached_and_moved_to_pqxdh_once_it_can() {
    let gw = TestGateway::start().await;
    let key = B64.encode(&gw.addr.public_key);
    let rt = SignalRuntime::start(1);
    let recheck = std::time::Duration::from_secs(2);
    let mut ours = register_ours_with(
        &rt,
        &gw.addr,
        &random_account(),
        AccountOptions {
            x3dh_recheck: recheck,
        },
    )
    .await;
    let mut old = NodeContact::spawn_x3dh();
    old.call(json!({"cmd": "set_kyber", "enabled": false}));
    old.setup(gw.port, &key, &random_account(), CODE);
    assert_eq!(
        old.call(json!({"cmd": "status"}))["libsignal_version"],
        "0.72.1"
    );
    let mut new = NodeContact::spawn();
    new.setup(gw.port, &key, &random_account(), CODE);

    // We start: classic X3DH (session version 3, no Kyber ciphertext).
    ours.handle
        .send(
            Target::Account(old.account.clone()),
            "x1".into(),
            text("hello X3DH"),
        )
        .await
        .expect("send over X3DH");
    let ev = old.event("our first message", |v| node_text(v) == Some("hello X3DH"));
    assert_eq!(ev["kind"], "PREKEY", "{ev}");
    assert_eq!(ev["message_version"], 3, "{ev}");
    assert_eq!(ev["pqxdh"], false, "{ev}");
    let info = ours
        .handle
        .session_info(old.account.clone())
        .await
        .expect("info");
    assert!(
        info.exists && info.version == 3 && !info.post_quantum,
        "{info:?}"
    );
    for i in 0..3 {
        old.call(json!({"cmd": "send", "to": ours.account, "content": format!("old {i}")}));
        let got = ours.wait(|e| body_of(e).is_some()).await;
        assert_eq!(body_of(&got), Some(format!("old {i}")));
        ours.handle
            .send(
                Target::Account(old.account.clone()),
                format!("o{i}"),
                text(&format!("ours {i}")),
            )
            .await
            .expect("send");
        let ev = old.event("our reply", |v| node_text(v) == Some(&format!("ours {i}")));
        assert_eq!(ev["message_version"], 3, "{ev}");
    }

    // An X3DH-era contact that starts the session itself (it leaves our Kyber prekey unused):
    // its first message is a version-3 prekey message, opened with our prekeys from the vault.
    let mut starter = NodeContact::spawn_x3dh();
    starter.call(json!({"cmd": "set_kyber", "enabled": false}));
    starter.setup(gw.port, &key, &random_account(), CODE);
    let sent =
        starter.call(json!({"cmd": "send", "to": ours.account, "content": "X3DH from them"}));
    assert_eq!(sent["kind"], "PREKEY", "{sent}");
    assert_eq!(sent["message_version"], 3, "{sent}");
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("X3DH from them"));
    ours.handle
        .send(
            Target::Account(starter.account.clone()),
            "s1".into(),
            text("answered"),
        )
        .await
        .expect("answer over their X3DH session");
    let ev = starter.event("our answer", |v| node_text(v) == Some("answered"));
    assert_eq!(ev["message_version"], 3, "{ev}");

    // The classic session is kept in the vault: after a restart it goes on.
    ours.handle.stop().await;
    old.call(json!({"cmd": "send", "to": ours.account, "content": "while you were away"}));
    ours.respawn(&rt, &gw.addr).await;
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("while you were away"));
    ours.handle
        .send(
            Target::Account(old.account.clone()),
            "back".into(),
            text("back again"),
        )
        .await
        .expect("send after restart");
    old.event("after restart", |v| node_text(v) == Some("back again"));

    // A group with both contacts: our sender key reaches the X3DH one over its classic session.
    let g = new.call(
        json!({"cmd": "create_group", "name": "eras", "members": [ours.account, old.account]}),
    );
    let gid = g["group"]["id"].as_str().expect("group id").to_owned();
    ours.wait(|e| matches!(e, Event::GroupUpdate { .. })).await;
    ours.handle
        .send(
            Target::Group(gid.clone()),
            "g1".into(),
            text("to both eras"),
        )
        .await
        .expect("group send");
    old.event("group message", |v| node_text(v) == Some("to both eras"));
    new.event("group message", |v| node_text(v) == Some("to both eras"));
    old.call(json!({"cmd": "send_group", "group": gid, "content": "from the old one"}));
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("from the old one"));
    let info = ours
        .handle
        .session_info(new.account.clone())
        .await
        .expect("info");
    assert!(
        info.exists && info.version == 4,
        "the current contact is on PQXDH: {info:?}"
    );

    // The contact upgrades: it publishes Kyber prekeys. At the next check of its keys we move.
    old.call(json!({"cmd": "set_kyber", "enabled": true}));
    tokio::time::sleep(recheck + std::time::Duration::from_millis(200)).await;
    ours.handle
        .send(
            Target::Account(old.account.clone()),
            "u1".into(),
            text("now post-quantum"),
        )
        .await
        .expect("send after the upgrade");
    let ev = old.event("the first PQXDH message", |v| {
        node_text(v) == Some("now post-quantum")
    });
    assert_eq!(ev["kind"], "PREKEY", "{ev}");
    assert_eq!(ev["pqxdh"], true, "{ev}");
    let info = ours
        .handle
        .session_info(old.account.clone())
        .await
        .expect("info");
    assert!(info.exists && info.version == 4, "{info:?}");
    old.call(json!({"cmd": "send", "to": ours.account, "content": "on PQXDH too"}));
    let got = ours.wait(|e| body_of(e).is_some()).await;
    assert_eq!(body_of(&got).as_deref(), Some("on PQXDH too"));
}
