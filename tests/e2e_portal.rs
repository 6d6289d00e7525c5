//! End to end: a real Synapse, the bridge binary, the reference gateway, and a contact on the
//! official libsignal. Each row of "messages both ways" is checked in both directions.

mod common;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{
    MatrixUser,
    env::BridgeEnv,
    interop::random_account,
    portal::{BOT, accept, by, from_bot, ghost_of, linked_room, login, start_chat},
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_messages_both_ways() {
    let env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&alice, &mgmt, &node.account).await;
    alice.send_text(&mgmt, "whoami").await;
    alice
        .wait_for(
            &mgmt,
            "whoami with login",
            from_bot(&format!("logged in as {my_account}")),
        )
        .await;

    every_row_both_ways(&alice, &mut node, &my_account, &room, &ghost, &Chat::Dm).await;

    // The bridge counts what it bridged, per direction, with the time it took.
    let cfg = std::fs::read_to_string(&env.setup.config).expect("config");
    let listen = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen: "))
        .expect("metrics listen");
    let text = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    // One login, running and connected.
    for gauge in ["mib_logins 1", "mib_logins_connected 1"] {
        assert!(text.lines().any(|l| l == gauge), "no `{gauge}` in\n{text}");
    }
    for direction in ["matrix_to_interop", "interop_to_matrix"] {
        let count: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "mib_messages_bridged_total{{direction=\"{direction}\"}} "
                ))
            })
            .unwrap_or_else(|| panic!("no {direction} count in\n{text}"))
            .parse()
            .expect("number");
        assert!(count >= 5.0, "{direction}: {count}");
        assert!(text.contains(&format!(
            "mib_message_seconds_count{{direction=\"{direction}\"}}"
        )));
    }

    let log = std::fs::read_to_string(&env.bridge.log).expect("log");
    assert!(
        !log.contains("hello bold") && !log.contains("hi alice"),
        "message bodies must not reach the log"
    );
}

/// Where the contact writes: to our account, or into a group we are both in.
enum Chat {
    Dm,
    Group(String),
}

impl Chat {
    fn send(&self, to: &str, content: Value) -> Value {
        match self {
            Chat::Dm => json!({"cmd": "send", "to": to, "content": content}),
            Chat::Group(g) => json!({"cmd": "send_group", "group": g, "content": content}),
        }
    }

    fn with_group(&self, mut cmd: Value) -> Value {
        if let Chat::Group(g) = self {
            cmd["group"] = json!(g);
        }
        cmd
    }

    fn typing(&self, to: &str) -> Value {
        match self {
            Chat::Dm => json!({"cmd": "typing", "to": to, "typing": true}),
            Chat::Group(g) => json!({"cmd": "typing", "group": g, "typing": true}),
        }
    }
}

/// Every row of "messages both ways" in one portal: text with formatting, replies, edits,
/// reactions (and removing one), deletions, read receipts, typing, media (image, voice, file),
/// location and contact cards.
async fn every_row_both_ways(
    alice: &MatrixUser,
    node: &mut common::node::NodeContact,
    my_account: &str,
    room: &str,
    ghost: &str,
    chat: &Chat,
) {
    let room = room.to_owned();
    let ghost = ghost.to_owned();
    // Text with formatting, Matrix → interop.
    let e1 = alice
        .send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "hello bold", "format": "org.matrix.custom.html", "formatted_body": "hello <b>bold</b>"}))
        .await;
    let m1 = node.event("formatted text", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "hello bold"
    });
    assert_eq!(m1["content"]["text"]["formats"][0]["style"], "BOLD", "{m1}");
    if let Chat::Group(g) = chat {
        assert_eq!(m1["kind"], "GROUP");
        assert_eq!(m1["group"], json!(g));
    }
    let m1_id = m1["message_id"].as_str().expect("id").to_owned();

    // Text with formatting and a reply, interop → Matrix.
    let sent = node.call(chat.send(
        my_account,
        json!({
        "text": {"body": "hi alice", "formats": [{"style": "ITALIC", "start": 3, "length": 5}]},
        "reply_to": {"message_id": m1_id, "author": my_account}}),
    ));
    let r = alice
        .wait_for(
            &room,
            "reply from ghost",
            by(&ghost, |e| e["content"]["body"] == "hi alice"),
        )
        .await;
    assert_eq!(r["content"]["formatted_body"], "hi <em>alice</em>");
    assert_eq!(
        r["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        json!(e1)
    );
    let r_id = r["event_id"].as_str().expect("id").to_owned();
    let n1_id = sent["message_id"].as_str().expect("id").to_owned();
    // The bridge reports delivery once the message is on Matrix.
    let d = node.event("delivery receipt", |v| {
        v["event"] == "receipt" && v["type"] == "DELIVERED"
    });
    assert_eq!(d["message_ids"][0], json!(n1_id), "{d}");

    // Reply Matrix → interop.
    alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "a reply", "m.relates_to": {"m.in_reply_to": {"event_id": r_id}}})).await;
    let m = node.event("reply", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "a reply"
    });
    assert_eq!(m["content"]["reply_to"]["message_id"], json!(n1_id), "{m}");

    // Edits both ways.
    alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "* hello edited", "m.new_content": {"msgtype": "m.text", "body": "hello edited"}, "m.relates_to": {"rel_type": "m.replace", "event_id": e1}})).await;
    let m = node.event("edit", |v| {
        v["event"] == "message" && v["content"]["edit"].is_object()
    });
    assert_eq!(m["content"]["edit"]["target"], json!(m1_id));
    assert_eq!(m["content"]["edit"]["text"]["body"], "hello edited");
    node.call(chat.send(
        my_account,
        json!({"edit": {"target": n1_id, "text": {"body": "hi alice (edited)"}}}),
    ));
    let ed = alice
        .wait_for(
            &room,
            "edit from ghost",
            by(&ghost, |e| {
                e["content"]["m.relates_to"]["rel_type"] == "m.replace"
            }),
        )
        .await;
    assert_eq!(ed["content"]["m.relates_to"]["event_id"], json!(r_id));
    assert_eq!(ed["content"]["m.new_content"]["body"], "hi alice (edited)");

    // Reactions both ways, and removing one.
    let react = alice
        .send(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": r_id, "key": "👍"}}),
        )
        .await;
    let m = node.event("reaction", |v| {
        v["event"] == "message" && v["content"]["reaction"].is_object()
    });
    assert_eq!(m["content"]["reaction"]["emoji"], "👍");
    assert_eq!(m["content"]["reaction"]["target"], json!(n1_id));
    alice.redact(&room, &react).await;
    let m = node.event("reaction removed", |v| {
        v["event"] == "message" && v["content"]["reaction"]["remove"] == true
    });
    assert_eq!(m["content"]["reaction"]["emoji"], "👍");
    node.call(chat.send(
        my_account,
        json!({"reaction": {"target": m1_id, "emoji": "❤️", "target_author": my_account}}),
    ));
    let re = alice
        .wait_for(
            &room,
            "reaction from ghost",
            by(&ghost, |e| e["type"] == "m.reaction"),
        )
        .await;
    assert_eq!(re["content"]["m.relates_to"]["event_id"], json!(e1));
    assert_eq!(re["content"]["m.relates_to"]["key"], "❤️");

    // Deletions both ways.
    let doomed = alice.send_text(&room, "to be deleted").await;
    let m = node.event("doomed", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "to be deleted"
    });
    let doomed_id = m["message_id"].as_str().expect("id").to_owned();
    alice.redact(&room, &doomed).await;
    let m = node.event("delete", |v| {
        v["event"] == "message" && v["content"]["delete"].is_object()
    });
    assert_eq!(m["content"]["delete"]["target"], json!(doomed_id));
    let s = node.call(chat.send(my_account, json!("oops")));
    let oops = alice
        .wait_for(
            &room,
            "oops",
            by(&ghost, |e| e["content"]["body"] == "oops"),
        )
        .await;
    node.call(chat.send(my_account, json!({"delete": {"target": s["message_id"]}})));
    let oops_id = oops["event_id"].as_str().expect("id").to_owned();
    alice
        .wait_for(&room, "redaction of oops", |e| {
            e["event_id"] == json!(oops_id)
                && e["content"].as_object().is_some_and(|c| c.is_empty())
        })
        .await;

    // Read receipts both ways (delivery receipts are not shown on Matrix).
    alice.read_receipt(&room, &r_id).await;
    let m = node.event("read receipt", |v| {
        v["event"] == "receipt" && v["type"] == "READ"
    });
    assert_eq!(m["message_ids"][0], json!(n1_id));
    if let Chat::Group(g) = chat {
        assert_eq!(m["group"], json!(g), "{m}");
    }
    node.call(chat.with_group(
        json!({"cmd": "receipt", "to": my_account, "type": "READ", "message_ids": [m1_id]}),
    ));
    wait_ephemeral(alice, &room, "ghost read receipt", |e| {
        e["type"] == "m.receipt" && e["content"][&e1]["m.read"].get(&ghost).is_some()
    })
    .await;

    // Typing both ways.
    alice.typing(&room, true).await;
    node.event("typing", |v| v["event"] == "typing" && v["typing"] == true);
    node.call(chat.typing(my_account));
    wait_ephemeral(alice, &room, "ghost typing", |e| {
        e["type"] == "m.typing"
            && e["content"]["user_ids"]
                .as_array()
                .is_some_and(|u| u.contains(&json!(ghost)))
    })
    .await;

    // Media both ways: an image with its metadata, a voice message, a file.
    let png: Vec<u8> = (0..5000u32).map(|i| (i % 256) as u8).collect();
    let mxc = alice.upload(png.clone(), "image/png").await;
    alice.send(&room, "m.room.message", json!({"msgtype": "m.image", "body": "picture.png", "url": mxc, "info": {"mimetype": "image/png", "size": png.len(), "w": 40, "h": 30}})).await;
    let m = node.event("image", |v| {
        v["event"] == "message" && v["content"]["media"].is_object()
    });
    assert_eq!(m["content"]["media"]["type"], "IMAGE");
    assert_eq!(m["content"]["media"]["width"], 40);
    assert_eq!(m["content"]["media"]["mimetype"], "image/png");
    let d = node.call(json!({"cmd": "download_media", "media": m["content"]["media"]}));
    assert_eq!(
        B64.decode(d["bytes_b64"].as_str().expect("b64"))
            .expect("b64"),
        png
    );

    // Stickers both ways: `m.sticker` and an attachment of type STICKER, with the image.
    let webp: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mxc = alice.upload(webp.clone(), "image/webp").await;
    alice.send(&room, "m.sticker", json!({"body": "a waving cat", "url": mxc, "info": {"mimetype": "image/webp", "size": webp.len(), "w": 128, "h": 128}})).await;
    let m = node.event("sticker", |v| {
        v["event"] == "message" && v["content"]["media"]["type"] == "STICKER"
    });
    assert_eq!(m["content"]["media"]["width"], 128);
    assert_eq!(m["content"]["media"]["mimetype"], "image/webp");
    let d = node.call(json!({"cmd": "download_media", "media": m["content"]["media"]}));
    assert_eq!(
        B64.decode(d["bytes_b64"].as_str().expect("b64"))
            .expect("b64"),
        webp
    );
    let sticker: Vec<u8> = webp.iter().rev().copied().collect();
    let up = node.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&sticker), "mimetype": "image/webp", "type": "STICKER", "width": 96, "height": 96}));
    node.call(chat.send(my_account, json!({"media": up["media"]})));
    let st = alice
        .wait_for(
            &room,
            "sticker from the contact",
            by(&ghost, |e| e["type"] == "m.sticker"),
        )
        .await;
    assert_eq!(st["content"]["info"]["w"], 96, "{st}");
    assert_eq!(st["content"]["info"]["mimetype"], "image/webp");
    assert_eq!(
        alice
            .download(st["content"]["url"].as_str().expect("url"))
            .await,
        sticker
    );

    // Polls both ways (MSC3381's events on Matrix): the poll, votes by option, its end.
    let poll = alice
        .send(
            &room,
            "org.matrix.msc3381.poll.start",
            json!({"org.matrix.msc3381.poll.start": {
                "question": {"org.matrix.msc1767.text": "Cinema tonight?"},
                "kind": "org.matrix.msc3381.poll.disclosed", "max_selections": 1,
                "answers": [{"id": "ans-yes", "org.matrix.msc1767.text": "yes"},
                            {"id": "ans-no", "org.matrix.msc1767.text": "no"}]},
                "org.matrix.msc1767.text": "Cinema tonight?\n1. yes\n2. no"}),
        )
        .await;
    let m = node.event("poll", |v| {
        v["event"] == "message" && v["content"]["poll"].is_object()
    });
    assert_eq!(m["content"]["poll"]["question"], "Cinema tonight?");
    assert_eq!(m["content"]["poll"]["options"], json!(["yes", "no"]));
    let poll_id = m["message_id"].clone();
    node.call(chat.send(
        my_account,
        json!({"poll_vote": {"target": poll_id, "target_author": my_account, "selections": [1]}}),
    ));
    let vote = alice
        .wait_for(
            &room,
            "the contact's vote",
            by(&ghost, |e| e["type"] == "org.matrix.msc3381.poll.response"),
        )
        .await;
    assert_eq!(
        vote["content"]["org.matrix.msc3381.poll.response"]["answers"],
        json!(["ans-no"])
    );
    assert_eq!(vote["content"]["m.relates_to"]["event_id"], json!(poll));
    alice
        .send(
            &room,
            "org.matrix.msc3381.poll.response",
            json!({"m.relates_to": {"rel_type": "m.reference", "event_id": poll},
                "org.matrix.msc3381.poll.response": {"answers": ["ans-yes"]}}),
        )
        .await;
    let v = node.event("vote", |v| {
        v["event"] == "message" && v["content"]["poll_vote"].is_object()
    });
    assert_eq!(v["content"]["poll_vote"]["target"], poll_id);
    assert_eq!(v["content"]["poll_vote"]["selections"], json!([0]));
    let theirs = node.call(chat.send(
        my_account,
        json!({"poll": {"question": "Lunch?", "options": ["pizza", "soup", "salad"], "max_selections": 2}}),
    ));
    let p = alice
        .wait_for(
            &room,
            "the contact's poll",
            by(&ghost, |e| e["type"] == "org.matrix.msc3381.poll.start"),
        )
        .await;
    let block = &p["content"]["org.matrix.msc3381.poll.start"];
    assert_eq!(block["question"]["org.matrix.msc1767.text"], "Lunch?");
    assert_eq!(block["max_selections"], 2);
    assert_eq!(block["answers"][2]["org.matrix.msc1767.text"], "salad");
    let their_poll = p["event_id"].as_str().expect("id").to_owned();
    let soup = block["answers"][1]["id"].clone();
    alice
        .send(
            &room,
            "org.matrix.msc3381.poll.response",
            json!({"m.relates_to": {"rel_type": "m.reference", "event_id": their_poll},
                "org.matrix.msc3381.poll.response": {"answers": [soup]}}),
        )
        .await;
    let v = node.event("vote on the contact's poll", |v| {
        v["event"] == "message" && v["content"]["poll_vote"]["target"] == theirs["message_id"]
    });
    assert_eq!(v["content"]["poll_vote"]["selections"], json!([1]));
    node.call(chat.send(
        my_account,
        json!({"poll_end": {"target": theirs["message_id"]}}),
    ));
    let end = alice
        .wait_for(
            &room,
            "the contact's poll ends",
            by(&ghost, |e| e["type"] == "org.matrix.msc3381.poll.end"),
        )
        .await;
    assert_eq!(
        end["content"]["m.relates_to"]["event_id"],
        json!(their_poll)
    );

    let ogg = b"OggS voice bytes".to_vec();
    let up = node.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&ogg), "mimetype": "audio/ogg", "type": "VOICE", "duration_ms": 3000}));
    node.call(chat.send(my_account, json!({"media": up["media"]})));
    let v = alice
        .wait_for(
            &room,
            "voice",
            by(&ghost, |e| e["content"]["msgtype"] == "m.audio"),
        )
        .await;
    assert!(
        v["content"].get("org.matrix.msc3245.voice").is_some(),
        "{v}"
    );
    assert_eq!(v["content"]["info"]["duration"], 3000);
    assert_eq!(
        alice
            .download(v["content"]["url"].as_str().expect("url"))
            .await,
        ogg
    );

    let pdf = b"%PDF-1.4 tiny".to_vec();
    let up = node.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&pdf), "mimetype": "application/pdf", "type": "FILE", "filename": "doc.pdf", "caption": {"body": "the doc"}}));
    node.call(chat.send(my_account, json!({"media": up["media"]})));
    let f = alice
        .wait_for(
            &room,
            "file",
            by(&ghost, |e| e["content"]["msgtype"] == "m.file"),
        )
        .await;
    assert_eq!(f["content"]["filename"], "doc.pdf");
    assert_eq!(f["content"]["body"], "the doc");

    // Location and contact card.
    node.call(chat.send(
        my_account,
        json!({"location": {"latitude": 52.5, "longitude": 13.4, "name": "Berlin"}}),
    ));
    let l = alice
        .wait_for(
            &room,
            "location",
            by(&ghost, |e| e["content"]["msgtype"] == "m.location"),
        )
        .await;
    assert_eq!(l["content"]["geo_uri"], "geo:52.5,13.4");
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.location", "body": "Home", "geo_uri": "geo:48.1,11.5"}),
        )
        .await;
    let m = node.event("location", |v| {
        v["event"] == "message" && v["content"]["location"].is_object()
    });
    assert_eq!(m["content"]["location"]["latitude"], 48.1);
    node.call(chat.send(
        my_account,
        json!({"contact": {"display_name": "Carol", "phone_numbers": ["+15550009999"]}}),
    ));
    alice
        .wait_for(
            &room,
            "contact",
            by(&ghost, |e| {
                e["content"]["body"]
                    .as_str()
                    .is_some_and(|b| b.contains("Carol") && b.contains("+15550009999"))
            }),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_both_ways() {
    let env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let g = node.call(json!({"cmd": "create_group", "name": "Every row", "members": [my_account]}));
    let gid = g["group"]["id"].as_str().expect("id").to_owned();
    accept(&alice, &mgmt, &gid).await;
    let room = alice.wait_invite(&[&mgmt]).await;
    alice.join(&room).await;
    every_row_both_ways(
        &alice,
        &mut node,
        &my_account,
        &room,
        &ghost,
        &Chat::Group(gid),
    )
    .await;
}

/// A contact's ghost that is not in the portal (it left, or a message raced its join after
/// the group gained it) is joined when the contact writes, rather than the message being
/// given up: the contact is in the chat on the network, which is what counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ghost_missing_from_its_portal_is_joined_when_its_contact_writes() {
    let env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let g = node.call(json!({"cmd": "create_group", "name": "Away", "members": [my_account]}));
    let gid = g["group"]["id"].as_str().expect("id").to_owned();
    accept(&alice, &mgmt, &gid).await;
    let group_room = alice.wait_invite(&[&mgmt]).await;
    alice.join(&group_room).await;
    let dm_room = start_chat(&alice, &mgmt, &node.account).await;
    for (room, chat, what) in [
        (&group_room, Chat::Group(gid.clone()), "group"),
        (&dm_room, Chat::Dm, "dm"),
    ] {
        let room_path = format!(
            "/_matrix/client/v3/rooms/{}",
            room.replace('!', "%21").replace(':', "%3A")
        );
        let (s, b) = env
            .as_appservice(
                reqwest::Method::POST,
                &format!("{room_path}/leave"),
                &ghost,
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200, "leave: {b}");
        let text = format!("still here ({what})");
        node.call(chat.send(&my_account, json!(text)));
        alice
            .wait_for(room, &text, |e| {
                e["sender"] == json!(ghost) && e["content"]["body"] == json!(text)
            })
            .await;
        let (_, members) = alice
            .call(
                reqwest::Method::GET,
                &format!("{room_path}/joined_members"),
                None,
            )
            .await;
        assert!(
            members["joined"].get(&ghost).is_some(),
            "{ghost} is back in {room}: {members}"
        );
    }
}

async fn wait_ephemeral(user: &MatrixUser, room: &str, what: &str, pred: impl Fn(&Value) -> bool) {
    let start = std::time::Instant::now();
    loop {
        if user.ephemeral(room).await.iter().any(&pred) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {:?}",
            user.ephemeral(room).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_both_ways() {
    let env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut n1 = env.node();
    let mut n2 = env.node();
    let g1 = ghost_of(&n1.account);

    // A group made on the interop side appears as a room with ghost members.
    let g = n1.call(
        json!({"cmd": "create_group", "name": "Hiking", "members": [my_account, n2.account]}),
    );
    let gid = g["group"]["id"].as_str().expect("id").to_owned();
    accept(&alice, &mgmt, &gid).await;
    let room = alice.wait_invite(&[&mgmt]).await;
    alice.join(&room).await;
    n1.call(json!({"cmd": "send_group", "group": gid, "content": "welcome to the group"}));
    alice
        .wait_for(
            &room,
            "group message",
            by(&g1, |e| e["content"]["body"] == "welcome to the group"),
        )
        .await;
    alice.send_text(&room, "thanks all").await;
    let m = n1.event("group message from alice", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "thanks all"
    });
    assert_eq!(m["kind"], "GROUP");
    assert_eq!(m["group"], json!(gid));
    n2.event("group message from alice", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "thanks all"
    });

    // Name changes and leaves come through.
    n1.call(json!({"cmd": "update_group", "group": gid, "name": "Hiking club"}));
    alice
        .wait_for(&room, "rename", |e| {
            e["type"] == "m.room.name" && e["content"]["name"] == "Hiking club"
        })
        .await;
    n2.call(json!({"cmd": "update_group", "group": gid, "remove": [n2.account]}));
    let g2 = ghost_of(&n2.account);
    let start = std::time::Instant::now();
    while alice.joined_members(&room).await.contains(&g2) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ghost did not leave"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A group created from Matrix.
    alice
        .send_text(&mgmt, &format!("create-group Book club {}", n1.account))
        .await;
    let ev = alice
        .wait_for(&mgmt, "group created", from_bot("Group created"))
        .await;
    let room2 = linked_room(&ev);
    alice.join(&room2).await;
    let upd = n1.event("group update", |v| {
        v["event"] == "group_update" && v["group"]["name"] == "Book club"
    });
    alice.send_text(&room2, "first book?").await;
    let m = n1.event("message in new group", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "first book?"
    });
    assert_eq!(m["group"], upd["group"]["id"]);
}

/// A state event set by `user` in `room`.
async fn set_state(user: &MatrixUser, room: &str, event_type: &str, content: Value) {
    let path = format!(
        "/_matrix/client/v3/rooms/{}/state/{event_type}/",
        common::urlencode(room)
    );
    let (s, b) = user.call(reqwest::Method::PUT, &path, Some(content)).await;
    assert_eq!(s, 200, "{event_type}: {b}");
}

/// A membership action (`invite`, `kick`, `leave`) of `user` in `room`.
async fn membership(user: &MatrixUser, room: &str, action: &str, target: Option<&str>) {
    let path = format!(
        "/_matrix/client/v3/rooms/{}/{action}",
        common::urlencode(room)
    );
    let body = target.map_or(json!({}), |t| json!({"user_id": t}));
    let (s, b) = user.call(reqwest::Method::POST, &path, Some(body)).await;
    assert_eq!(s, 200, "{action}: {b}");
}

fn image(magic: &[u8], n: u32) -> Vec<u8> {
    let mut v = magic.to_vec();
    v.extend((0..n).map(|i| (i * 7 % 251) as u8));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_avatars_and_group_changes_both_ways() {
    let env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut n1 = env.node();
    let mut n2 = env.node();
    let mut n3 = env.node();
    let (g1, g2, g3) = (
        ghost_of(&n1.account),
        ghost_of(&n2.account),
        ghost_of(&n3.account),
    );

    // The contact's profile (name and avatar) is on its ghost.
    let face = image(b"\x89PNG\r\n\x1a\n", 3000);
    let blob = n1.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&face), "raw": true}));
    n1.call(json!({"cmd": "set_profile", "name": "Nora One", "avatar_blob": blob["blob"]}));

    // A group with an avatar made on the interop side: the portal carries it.
    let cover = image(b"\xff\xd8\xff\xe0", 4000);
    let cover_blob =
        n1.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&cover), "raw": true}));
    let g = n1.call(
        json!({"cmd": "create_group", "name": "Avatars", "members": [my_account, n2.account]}),
    );
    let gid = g["group"]["id"].as_str().expect("id").to_owned();
    accept(&alice, &mgmt, &gid).await;
    let room = alice.wait_invite(&[&mgmt]).await;
    alice.join(&room).await;
    n1.call(json!({"cmd": "update_group", "group": gid, "avatar_blob": cover_blob["blob"]}));
    let ev = alice
        .wait_for(&room, "group avatar", |e| {
            e["type"] == "m.room.avatar" && e["content"]["url"].is_string()
        })
        .await;
    assert_eq!(ev["sender"], json!(g1), "the change shows as the contact's");
    let url = ev["content"]["url"].as_str().expect("url");
    assert_eq!(alice.download(url).await, cover);
    let (s, profile) = alice
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/profile/{}", common::urlencode(&g1)),
            None,
        )
        .await;
    assert_eq!(s, 200, "{profile}");
    assert_eq!(profile["displayname"], "Nora One");
    let avatar = profile["avatar_url"].as_str().expect("ghost avatar");
    assert_eq!(alice.download(avatar).await, face);

    // Matrix → interop: name, avatar, invite and kick by the portal's owner.
    set_state(
        &alice,
        &room,
        "m.room.name",
        json!({"name": "Renamed on Matrix"}),
    )
    .await;
    n1.event("rename from Matrix", |v| {
        v["event"] == "group_update" && v["group"]["name"] == "Renamed on Matrix"
    });
    let picture = image(b"\x89PNG\r\n\x1a\n", 2500);
    let mxc = alice.upload(picture.clone(), "image/png").await;
    set_state(&alice, &room, "m.room.avatar", json!({"url": mxc})).await;
    let upd = n1.event("avatar from Matrix", |v| {
        v["event"] == "group_update" && v["group"]["avatar_blob"] != cover_blob["blob"]
    });
    let got =
        n1.call(json!({"cmd": "download_media", "blob": upd["group"]["avatar_blob"], "raw": true}));
    assert_eq!(
        B64.decode(got["bytes_b64"].as_str().expect("bytes"))
            .expect("b64"),
        picture
    );
    // Inviting the ghost of an account the network does not know is refused with a notice.
    membership(&alice, &room, "invite", Some(&ghost_of(&random_account()))).await;
    alice
        .wait_for(
            &room,
            "refused invite",
            from_bot("Your change was not bridged"),
        )
        .await;
    membership(&alice, &room, "invite", Some(&g3)).await;
    let added = n3.event("added from Matrix", |v| v["event"] == "group_update");
    assert!(
        added["group"]["members"]
            .as_array()
            .expect("members")
            .contains(&json!(n3.account))
    );
    n3.call(json!({"cmd": "send_group", "group": gid, "content": "glad to be here"}));
    alice
        .wait_for(
            &room,
            "new member writes",
            by(&g3, |e| e["content"]["body"] == "glad to be here"),
        )
        .await;
    membership(&alice, &room, "kick", Some(&g2)).await;
    n1.event("kick from Matrix", |v| {
        v["event"] == "group_update"
            && !v["group"]["members"]
                .as_array()
                .is_some_and(|m| m.contains(&json!(n2.account)))
    });
    n2.event("removed", |v| v["event"] == "group_update");

    // The owner leaves: the portal ends (the group stays); the next message opens a new one.
    membership(&alice, &room, "leave", None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    n1.call(json!({"cmd": "send_group", "group": gid, "content": "are you still there?"}));
    let room2 = alice.wait_invite(&[&mgmt, &room]).await;
    assert_ne!(room2, room);
    alice.join(&room2).await;
    alice
        .wait_for(
            &room2,
            "message in the new portal",
            by(&g1, |e| e["content"]["body"] == "are you still there?"),
        )
        .await;

    // Profiles are pushed by nobody: `sync` picks up a new name at once.
    n1.call(json!({"cmd": "set_profile", "name": "Nora Renamed", "avatar_blob": blob["blob"]}));
    alice.send_text(&mgmt, "sync").await;
    alice
        .wait_for(
            &mgmt,
            "sync",
            from_bot("Synced 0 contact(s) and 1 group(s)"),
        )
        .await;
    let (_, profile) = alice
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/profile/{}", common::urlencode(&g1)),
            None,
        )
        .await;
    assert_eq!(profile["displayname"], "Nora Renamed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_and_duplicates_nothing() {
    let mut env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&alice, &mgmt, &node.account).await;
    node.call(json!({"cmd": "send", "to": my_account, "content": "before restart"}));
    alice
        .wait_for(
            &room,
            "before",
            by(&ghost, |e| e["content"]["body"] == "before restart"),
        )
        .await;

    // The bridge goes down mid-conversation; the contact keeps writing.
    env.bridge.stop();
    for i in 0..3 {
        node.call(json!({"cmd": "send", "to": my_account, "content": format!("while down {i}")}));
    }
    // Alice writes too: the homeserver queues it for the bridge.
    alice
        .send_text(&room, "sent while the bridge was down")
        .await;
    env.bridge = env.setup.start().await;
    for i in 0..3 {
        alice
            .wait_for(
                &room,
                "queued message",
                by(&ghost, move |e| {
                    e["content"]["body"] == json!(format!("while down {i}"))
                }),
            )
            .await;
    }
    node.event("message sent during downtime", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "sent while the bridge was down"
    });
    alice.send_text(&room, "after restart").await;
    node.event("after", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "after restart"
    });
    node.call(json!({"cmd": "send", "to": my_account, "content": "last"}));
    alice
        .wait_for(
            &room,
            "last",
            by(&ghost, |e| e["content"]["body"] == "last"),
        )
        .await;
    // Nothing twice.
    let msgs = alice.messages(&room).await;
    for i in 0..3 {
        let n = msgs
            .iter()
            .filter(|e| e["content"]["body"] == json!(format!("while down {i}")))
            .count();
        assert_eq!(n, 1, "message {i} bridged {n} times");
    }
    assert_eq!(
        msgs.iter()
            .filter(|e| e["content"]["body"] == "before restart")
            .count(),
        1
    );
    let dup = node
        .backlog
        .iter()
        .filter(|v| v["content"]["text"]["body"] == "sent while the bridge was down")
        .count();
    assert_eq!(
        dup, 0,
        "the contact got the downtime message more than once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_mode_bridges_users_without_a_login() {
    let mut env = BridgeEnv::start("").await;
    // Relay mode on, for every user with a login (not only admins); message statuses and the
    // bot's delivery receipts on.
    env.bridge.stop();
    let cfg = std::fs::read_to_string(&env.setup.config).expect("config");
    let cfg = cfg.replacen(
        "bridge:\n",
        "bridge:\n    relay:\n        enabled: true\n        admin_only: false\n    \
         delivery_receipts: true\n    message_status_events: true\n",
        1,
    );
    std::fs::write(&env.setup.config, cfg).expect("config");
    env.bridge = env.setup.start().await;

    let alice = env.synapse.user("alice").await;
    let bob = env.synapse.user("bob").await;
    let (mgmt, _) = login(&alice).await;
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&alice, &mgmt, &node.account).await;

    // Without a relay, bob's message is refused with a notice.
    membership(&alice, &room, "invite", Some(&bob.user_id)).await;
    bob.join(&room).await;
    let refused = bob.send_text(&room, "unrelayed").await;
    alice
        .wait_for(&room, "refusal", from_bot("this room has no relay"))
        .await;
    let status = alice
        .wait_for(&room, "failure status", |e| {
            e["type"] == "com.beeper.message_send_status"
                && e["content"]["m.relates_to"]["event_id"] == json!(refused)
        })
        .await;
    assert_eq!(status["content"]["status"], "FAIL", "{status}");
    assert_eq!(status["content"]["reason"], "m_no_permission");

    alice.send_text(&room, "!interop set-relay").await;
    alice
        .wait_for(&room, "relay set", from_bot("go out through your login"))
        .await;
    let relayed = bob.send_text(&room, "hello from bob").await;
    let m = node.event("relayed text", |v| {
        v["event"] == "message"
            && v["content"]["text"]["body"]
                .as_str()
                .is_some_and(|b| b.ends_with("hello from bob"))
    });
    // Named by the full Matrix ID, which no other user can take.
    assert_eq!(
        m["content"]["text"]["body"],
        format!("{}: hello from bob", bob.user_id),
        "{m}"
    );
    let status = bob
        .wait_for(&room, "success status", |e| {
            e["type"] == "com.beeper.message_send_status"
                && e["content"]["m.relates_to"]["event_id"] == json!(relayed)
        })
        .await;
    assert_eq!(status["content"]["status"], "SUCCESS", "{status}");
    wait_ephemeral(&bob, &room, "the bot's delivery receipt", |e| {
        e["type"] == "m.receipt" && e["content"][&relayed]["m.read"].get(BOT).is_some()
    })
    .await;
    node.call(json!({"cmd": "send", "to": m["from"], "content": "hi bob"}));
    bob.wait_for(
        &room,
        "the contact's answer",
        by(&ghost, |e| e["content"]["body"] == "hi bob"),
    )
    .await;

    // The owner leaving does not end a portal that relays for people still in it.
    membership(&alice, &room, "leave", None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    bob.send_text(&room, "still here").await;
    node.event("relayed after the owner left", |v| {
        v["event"] == "message"
            && v["content"]["text"]["body"] == format!("{}: still here", bob.user_id)
    });
    assert!(bob.joined_members(&room).await.contains(&ghost));
}

/// The Matrix event `event_id` of `room` has been redacted (its content is gone).
async fn wait_redacted(user: &MatrixUser, room: &str, event_id: &str) {
    user.wait_for(room, "a redaction", |e| {
        e["event_id"] == json!(event_id) && e["content"].as_object().is_some_and(|c| c.is_empty())
    })
    .await;
}

/// Disappearing messages against Synapse and an official-libsignal contact: the portal's owner
/// sets the timer with the bot, the contact hears of it and the room shows it as state;
/// messages both ways carry it and are redacted on Matrix once it has run out, across a
/// restart of the bridge; the contact turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disappearing_messages_both_ways() {
    let mut env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&alice, &mgmt, &node.account).await;

    alice
        .send_text(&room, "!interop disappearing-timer 5s")
        .await;
    alice
        .wait_for(
            &room,
            "the timer is set",
            from_bot("set disappearing messages to 5 seconds"),
        )
        .await;
    let t = node.event("the timer", |v| {
        v["event"] == "message" && v["content"]["timer"].is_object()
    });
    assert_eq!(t["content"]["timer"]["seconds"], 5);
    let (s, state) = alice
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/rooms/{room}/state/com.beeper.disappearing_timer/"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{state}");
    assert_eq!(state, json!({"type": "after_send", "timer": 5000}));

    let mine = alice.send_text(&room, "self-destructing").await;
    let m = node.event("a text under the timer", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "self-destructing"
    });
    assert_eq!(m["content"]["expire_timer"], 5, "{m}");
    node.call(json!({"cmd": "send", "to": my_account,
        "content": {"text": {"body": "poof"}, "expire_timer": 5}}));
    let theirs = alice
        .wait_for(
            &room,
            "the contact's text",
            by(&ghost, |e| e["content"]["body"] == "poof"),
        )
        .await;
    let theirs = theirs["event_id"].as_str().expect("id").to_owned();

    // The bridge restarts before they are due: the schedule is kept.
    env.bridge.stop();
    env.bridge = env.setup.start().await;
    wait_redacted(&alice, &room, &mine).await;
    wait_redacted(&alice, &room, &theirs).await;

    node.call(json!({"cmd": "send", "to": my_account, "content": {"timer": {"seconds": 0}}}));
    alice
        .wait_for(
            &room,
            "the timer is off",
            from_bot("turned disappearing messages off"),
        )
        .await;
    alice.send_text(&room, "this one stays").await;
    let m = node.event("a text without the timer", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "this one stays"
    });
    assert_eq!(m["content"]["expire_timer"], 0);
}

/// Two Matrix users of this homeserver in one interop group (mautrix-whatsapp's users see such a
/// group's messages twice, mautrix/whatsapp#893): one room with both in it, each contact's message
/// once, each user's message out through their own login and once to the contacts; both logins
/// catching up on a backlog together after a bridge restart still show each message once; when
/// one user logs out the room goes on for the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_two_users_is_one_room_with_each_message_once() {
    let mut env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let bob = env.synapse.user("bob").await;
    let (mgmt_a, acc_a) = login(&alice).await;
    let (mgmt_b, acc_b) = login(&bob).await;
    let mut n1 = env.node();
    let g1 = ghost_of(&n1.account);
    let g = n1.call(json!({"cmd": "create_group", "name": "Shared", "members": [acc_a, acc_b]}));
    let gid = g["group"]["id"].as_str().expect("id").to_owned();
    accept(&alice, &mgmt_a, &gid).await;
    let room = alice.wait_invite(&[&mgmt_a]).await;
    alice.join(&room).await;
    accept(&bob, &mgmt_b, &gid).await;
    let room_b = bob.wait_invite(&[&mgmt_b]).await;
    assert_eq!(room_b, room, "bob is invited to alice's room for the group");
    bob.join(&room).await;
    // The room's users are there themselves: no ghost stands for their accounts.
    let members = alice.joined_members(&room).await;
    assert!(members.contains(&g1), "{members:?}");
    for own in [ghost_of(&acc_a), ghost_of(&acc_b)] {
        assert!(!members.contains(&own), "{own} in {members:?}");
    }

    let count = |msgs: &[serde_json::Value], body: &str| {
        msgs.iter().filter(|e| e["content"]["body"] == body).count()
    };
    n1.call(json!({"cmd": "send_group", "group": gid, "content": "hello both"}));
    bob.wait_for(
        &room,
        "contact's message",
        by(&g1, |e| e["content"]["body"] == "hello both"),
    )
    .await;

    // Each user writes through their own login; the contact gets each once, and neither
    // user's message comes back into the room from the other's login.
    alice.send_text(&room, "alice here").await;
    bob.send_text(&room, "bob here").await;
    for (body, from) in [("alice here", &acc_a), ("bob here", &acc_b)] {
        let m = n1.event("a user's message", |v| {
            v["event"] == "message" && v["content"]["text"]["body"] == body
        });
        assert_eq!(&m["from"], from, "{m}");
    }

    // Bob has the level alice has: his rename goes to the group through his login.
    set_state(
        &bob,
        &room,
        "m.room.name",
        json!({"name": "Renamed by bob"}),
    )
    .await;
    let upd = n1.event("bob's rename", |v| {
        v["event"] == "group_update" && v["group"]["name"] == "Renamed by bob"
    });
    assert_eq!(upd["changed_by"], acc_b.as_str(), "{upd}");

    // The bridge goes down; the contact writes; both logins catch up at once after it starts.
    env.bridge.stop();
    for i in 0..5 {
        n1.call(json!({"cmd": "send_group", "group": gid, "content": format!("backlog {i}")}));
    }
    env.bridge = env.setup.start().await;
    for i in 0..5 {
        alice
            .wait_for(
                &room,
                "backlog",
                by(&g1, move |e| {
                    e["content"]["body"] == json!(format!("backlog {i}"))
                }),
            )
            .await;
    }
    n1.call(json!({"cmd": "send_group", "group": gid, "content": "after the backlog"}));
    alice
        .wait_for(
            &room,
            "after",
            by(&g1, |e| e["content"]["body"] == "after the backlog"),
        )
        .await;
    let msgs = alice.messages(&room).await;
    for body in ["hello both", "alice here", "bob here", "after the backlog"] {
        assert_eq!(count(&msgs, body), 1, "{body}: {msgs:#?}");
    }
    for i in 0..5 {
        assert_eq!(count(&msgs, &format!("backlog {i}")), 1, "backlog {i}");
    }
    assert!(
        n1.backlog
            .iter()
            .filter(|v| v["content"]["text"]["body"] == "alice here")
            .count()
            == 0,
        "the contact got alice's message twice"
    );

    // Alice logs out: the room goes on for bob, both ways.
    alice.send_text(&mgmt_a, "logout").await;
    alice
        .wait_for(&mgmt_a, "logged out", from_bot("Logged out"))
        .await;
    // The room is no longer alice's to read: the bot removed her.
    assert!(
        !bob.joined_members(&room).await.contains(&alice.user_id),
        "alice is still in the shared room after logging out"
    );
    n1.call(json!({"cmd": "send_group", "group": gid, "content": "still here?"}));
    bob.wait_for(
        &room,
        "after alice left",
        by(&g1, |e| e["content"]["body"] == "still here?"),
    )
    .await;
    bob.send_text(&room, "yes, bob is").await;
    n1.event("bob after alice's logout", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "yes, bob is"
    });
    assert_eq!(count(&bob.messages(&room).await, "still here?"), 1);
}
