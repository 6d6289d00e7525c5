//! Contacts' messages in encrypted portals, read by a client that excludes insecure devices
//! (MSC4153): matrix-js-sdk with `OnlySignedDevicesIsolationMode`, against a real Synapse, the
//! bridge, the gateway and contacts on the official libsignal.
//!
//! Each ghost encrypts with a device of its own, cross-signed by the ghost's own identity, so
//! the client decrypts text, reactions, edits and images with no red shield and no "mismatched
//! sender". With `encryption.ghost_devices: false` (the bot's device encrypts for ghosts, as
//! before) the same client shows the contact's message with a red shield: the last test shows it.

mod common;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{
    e2ee::{BOT, ENCRYPTION, encrypted_login, js, start_chat, wait, wait_for},
    env::BridgeEnv,
    node::NodeContact,
    portal::ghost_of,
};
use serde_json::{Value, json};

/// Decrypted, and trusted as any cross-signed device of a user one has not verified is: no
/// red shield, nothing about the sending device.
fn assert_trusted(ev: &Value) {
    assert_eq!(ev["decrypted"], true, "decrypted: {ev}");
    assert_ne!(ev["undecryptable"], true, "{ev}");
    assert_ne!(ev["shield"]["colour"], "RED", "no red shield: {ev}");
    let reason = ev["shield"]["reason"].as_str().unwrap_or_default();
    for bad in [
        "MISMATCHED_SENDER",
        "MISMATCHED_SENDER_KEY",
        "UNSIGNED_DEVICE",
        "UNKNOWN_DEVICE",
        "AUTHENTICITY_NOT_GUARANTEED",
    ] {
        assert_ne!(reason, bad, "shield reason: {ev}");
    }
}

/// Logs in through an encrypted DM with the bot (the bot's own device is trusted too).
fn login(user: &mut NodeContact) -> (String, String) {
    let (mgmt, account, welcome) = encrypted_login(user);
    assert_trusted(&welcome);
    (mgmt, account)
}

/// The contact sends an image with `send`; it arrives from `ghost`, trusted, and its bytes
/// download and decrypt.
fn image_arrives(
    alice: &mut NodeContact,
    room: &str,
    ghost: &str,
    contact: &mut NodeContact,
    send: impl FnOnce(&mut NodeContact, Value),
) {
    let png: Vec<u8> = (0..1500u32).map(|i| (i * 13 % 256) as u8).collect();
    let up = contact.call(json!({"cmd": "upload_media", "bytes_b64": B64.encode(&png), "mimetype": "image/png", "type": "IMAGE"}));
    send(contact, json!({"media": up["media"]}));
    let img = wait_for(
        alice,
        json!({"room_id": room, "sender": ghost, "msgtype": "m.image"}),
    );
    assert_trusted(&img);
    let got = alice.call(json!({"cmd": "download", "content": img["content"]}));
    assert_eq!(
        B64.decode(got["bytes_b64"].as_str().expect("b64"))
            .expect("b64"),
        png
    );
}

/// The ghost's devices as the client sees them: exactly one, signed by the ghost's own
/// self-signing key. Returns its device id.
fn one_cross_signed_device(c: &mut NodeContact, ghost: &str) -> String {
    let keys = c.call(json!({"cmd": "keys_query", "user_id": ghost}));
    let devices = keys["devices"].as_object().expect("devices");
    assert_eq!(devices.len(), 1, "one device per ghost: {keys}");
    let (id, d) = devices.iter().next().expect("device");
    assert_eq!(d["cross_signed"], true, "cross-signed by the ghost: {keys}");
    id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghost_messages_decrypt_in_a_client_that_excludes_insecure_devices() {
    let mut env = BridgeEnv::start(ENCRYPTION).await;
    let mut alice = js(&env.synapse, "alice", "ALICEWEB", "exclude_insecure");
    let (mgmt, account) = login(&mut alice);

    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&mut alice, &mgmt, &node.account);
    assert_eq!(
        alice.call(json!({"cmd": "members", "room_id": room}))["encrypted"],
        true
    );

    // Text from the contact: encrypted by the ghost's own device.
    let sent = node.call(json!({"cmd": "send", "to": account, "content": "from my own device"}));
    let msg_id = sent["message_id"].as_str().expect("message id").to_owned();
    let text = wait(&mut alice, &room, &ghost, "from my own device");
    assert_trusted(&text);
    let device = one_cross_signed_device(&mut alice, &ghost);
    assert!(
        device.starts_with("MIBG"),
        "the ghost's own device: {device}"
    );

    // A reaction and an edit of it.
    node.call(json!({"cmd": "send", "to": account,
                     "content": {"reaction": {"target": msg_id, "emoji": "👍", "target_author": node.account}}}));
    let reaction = wait_for(
        &mut alice,
        json!({"room_id": room, "sender": ghost, "type": "m.reaction"}),
    );
    assert_trusted(&reaction);
    assert_eq!(
        reaction["content"]["m.relates_to"]["event_id"], text["event_id"],
        "{reaction}"
    );
    node.call(json!({"cmd": "send", "to": account,
                     "content": {"edit": {"target": msg_id, "text": {"body": "edited on my own device"}}}}));
    let edit = wait(&mut alice, &room, &ghost, "edited on my own device");
    assert_trusted(&edit);
    assert_eq!(edit["content"]["m.relates_to"]["rel_type"], "m.replace");

    // An image (encrypted attachment, then the event with the ghost's device).
    image_arrives(&mut alice, &room, &ghost, &mut node, |n, content| {
        n.call(json!({"cmd": "send", "to": account, "content": content}));
    });

    // Matrix → interop is unchanged: the client shares its room key with the bot's cross-signed
    // device only (it excludes insecure devices), and the bot decrypts.
    alice.call(json!({"cmd": "send_text", "room_id": room, "body": "to the contact"}));
    node.event("text from Matrix", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == "to the contact"
    });

    // After a restart the ghost's device is loaded from its store: the same device, trusted.
    env.bridge.stop();
    env.bridge = env.setup.start().await;
    node.call(json!({"cmd": "send", "to": account, "content": "after a restart"}));
    let after = wait(&mut alice, &room, &ghost, "after a restart");
    assert_trusted(&after);
    assert_eq!(one_cross_signed_device(&mut alice, &ghost), device);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_member_has_a_trusted_device_of_its_own() {
    let env = BridgeEnv::start(ENCRYPTION).await;
    let mut alice = js(&env.synapse, "alice", "ALICEWEB", "exclude_insecure");
    let (mgmt, account) = login(&mut alice);
    let mut n1 = env.node();
    let mut n2 = env.node();
    let (g1, g2) = (ghost_of(&n1.account), ghost_of(&n2.account));

    let g = n1.call(
        json!({"cmd": "create_group", "name": "Trusted club", "members": [account, n2.account]}),
    );
    let gid = g["group"]["id"].as_str().expect("id").to_owned();
    wait(&mut alice, &mgmt, BOT, &format!("accept {gid}"));
    alice.call(json!({"cmd": "send_text", "room_id": mgmt, "body": format!("accept {gid}")}));
    let inv = alice.call(json!({"cmd": "wait_invite", "join": true, "timeout": 45}));
    let room = inv["room_id"].as_str().expect("room").to_owned();

    let sent = n1.call(json!({"cmd": "send_group", "group": gid, "content": "first member"}));
    let first = wait(&mut alice, &room, &g1, "first member");
    assert_trusted(&first);
    n2.call(json!({"cmd": "send_group", "group": gid, "content": "second member"}));
    assert_trusted(&wait(&mut alice, &room, &g2, "second member"));
    let (d1, d2) = (
        one_cross_signed_device(&mut alice, &g1),
        one_cross_signed_device(&mut alice, &g2),
    );
    assert_ne!(d1, d2);

    // The second member reacts to the first one's message; the first edits it.
    let msg_id = sent["message_id"].as_str().expect("message id").to_owned();
    n2.call(json!({"cmd": "send_group", "group": gid,
                   "content": {"reaction": {"target": msg_id, "emoji": "🎉", "target_author": n1.account}}}));
    let reaction = wait_for(
        &mut alice,
        json!({"room_id": room, "sender": g2, "type": "m.reaction"}),
    );
    assert_trusted(&reaction);
    n1.call(json!({"cmd": "send_group", "group": gid,
                   "content": {"edit": {"target": msg_id, "text": {"body": "first member, edited"}}}}));
    assert_trusted(&wait(&mut alice, &room, &g1, "first member, edited"));

    // An image from a member.
    image_arrives(&mut alice, &room, &g2, &mut n2, |n, content| {
        n.call(json!({"cmd": "send_group", "group": gid, "content": content}));
    });

    // Matrix → the group still works.
    alice.call(json!({"cmd": "send_text", "room_id": room, "body": "hello trusted club"}));
    for n in [&mut n1, &mut n2] {
        n.event("group text from Matrix", |v| {
            v["event"] == "message" && v["content"]["text"]["body"] == "hello trusted club"
        });
    }
}

/// The control: with ghost devices off, the bot's device encrypts for the ghost, and the same
/// client shows the message with a red shield, "unknown device" (this is what every ghost
/// message looked like before; the tests above would fail here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ghost_devices_off_the_same_client_shows_a_red_shield() {
    let env = BridgeEnv::start(&format!("{ENCRYPTION}    ghost_devices: false\n")).await;
    let mut alice = js(&env.synapse, "alice", "ALICEWEB", "exclude_insecure");
    let (mgmt, account) = login(&mut alice);
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&mut alice, &mgmt, &node.account);
    node.call(json!({"cmd": "send", "to": account, "content": "through the bot's device"}));
    // matrix-js-sdk 37 decrypts it with a red shield (the sending device is not one of the
    // ghost's); matrix-rust-sdk with `CrossSignedOrLegacy` refuses to decrypt it.
    let ev = wait(&mut alice, &room, &ghost, "through the bot's device");
    assert_eq!(ev["shield"]["colour"], "RED", "{ev}");
    assert_eq!(ev["shield"]["reason"], "UNKNOWN_DEVICE", "{ev}");
    let keys = alice.call(json!({"cmd": "keys_query", "user_id": ghost}));
    assert!(
        keys["devices"].as_object().is_none_or(|d| d.is_empty()),
        "no ghost device: {keys}"
    );
}

/// MSC4350 (opt-in): instead of a device of its own, the ghost publishes a device without keys
/// that names the bot's device as its impersonator, signed by the bot's device; the bot's device
/// encrypts the ghost's messages. No client implements MSC4350 yet, so matrix-js-sdk still shows
/// them with a red shield; the test checks what is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_msc4350_the_ghost_names_the_bot_as_its_impersonator() {
    use matrix_sdk_crypto::vodozemac::{Ed25519PublicKey, Ed25519Signature};

    let env = BridgeEnv::start(&format!("{ENCRYPTION}    msc4350: true\n")).await;
    let mut alice = js(&env.synapse, "alice", "ALICEWEB", "all_devices");
    let (mgmt, account) = login(&mut alice);
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&mut alice, &mgmt, &node.account);
    node.call(json!({"cmd": "send", "to": account, "content": "through the impersonator"}));
    let ev = wait(&mut alice, &room, &ghost, "through the impersonator");
    assert_eq!(ev["decrypted"], true, "{ev}");

    let bot = alice.call(json!({"cmd": "keys_query", "user_id": BOT}));
    let (bot_device, bot_keys) = bot["devices"]
        .as_object()
        .and_then(|d| d.iter().next())
        .expect("the bot's device");
    let keys = alice.call(json!({"cmd": "keys_query", "user_id": ghost}));
    let devices = keys["devices"].as_object().expect("devices");
    assert_eq!(devices.len(), 1, "{keys}");
    let (device, d) = devices.iter().next().expect("device");
    assert!(device.starts_with("MIBI"), "{device}");
    assert_eq!(d["algorithms"], json!([]), "no keys of its own: {d}");
    assert_eq!(d["keys"], json!({}), "{d}");
    let imp = &d["fi.mau.msc4350.impersonator"];
    assert_eq!(imp["user_id"], BOT, "{d}");
    assert_eq!(imp["device_id"], json!(bot_device), "{d}");
    assert_eq!(imp["keys"], bot_keys["keys"], "the bot's device keys: {d}");
    assert!(imp.get("signatures").is_none());

    // Signed by the bot's device over the canonical JSON of the device keys.
    let signed = json!({"user_id": d["user_id"], "device_id": d["device_id"], "algorithms": d["algorithms"],
                        "keys": d["keys"], "fi.mau.msc4350.impersonator": imp});
    let canonical = ruma::canonical_json::to_canonical_value(&signed)
        .expect("canonical")
        .to_string();
    let key_id = format!("ed25519:{bot_device}");
    let public = Ed25519PublicKey::from_base64(imp["keys"][&key_id].as_str().expect("key"))
        .expect("public key");
    let sig = Ed25519Signature::from_base64(
        d["signatures"][BOT][&key_id]
            .as_str()
            .expect("the bot's signature"),
    )
    .expect("signature");
    public
        .verify(canonical.as_bytes(), &sig)
        .expect("the bot's signature verifies");
}
