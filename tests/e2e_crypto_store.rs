//! The crypto state of the bridge's Matrix devices in the bridge's database: an installation
//! that kept it in a local directory moves it in on start and its devices keep working with the
//! clients that already talk to them; on PostgreSQL the bridge keeps no local state at all.
//! Real Synapse, a matrix-nio client, the gateway and a contact on the official libsignal.

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path};

use common::{
    e2ee::{BOT, ENCRYPTION, encrypted_login, nio, start_chat, wait},
    env::BridgeEnv,
    node::NodeContact,
    pg::{drop_pg_schema, use_fresh_pg_schema},
    portal::ghost_of,
};
use serde_json::{Value, json};

/// The devices of `user` as the client sees them: device id → curve25519 key.
fn devices(c: &mut NodeContact, user: &str) -> Vec<(String, String)> {
    let keys = c.call(json!({"cmd": "keys_query", "user_id": user}));
    let mut out: Vec<(String, String)> = keys["devices"]
        .as_object()
        .expect("devices")
        .iter()
        .map(|(id, d)| {
            let curve = d["keys"]
                .as_object()
                .and_then(|k| k.iter().find(|(n, _)| n.starts_with("curve25519:")))
                .and_then(|(_, v)| v.as_str())
                .unwrap_or_default()
                .to_owned();
            (id.clone(), curve)
        })
        .collect();
    out.sort();
    out
}

/// A message each way in an encrypted portal, both decrypted.
fn both_ways(
    alice: &mut NodeContact,
    node: &mut NodeContact,
    room: &str,
    account: &str,
    tag: &str,
) {
    let ghost = ghost_of(&node.account);
    let to_matrix = format!("contact says {tag}");
    node.call(json!({"cmd": "send", "to": account, "content": to_matrix}));
    let ev: Value = wait(alice, room, &ghost, &to_matrix);
    assert_eq!(ev["decrypted"], true, "{ev}");
    let to_contact = format!("alice says {tag}");
    alice.call(json!({"cmd": "send_text", "room_id": room, "body": to_contact}));
    node.event("text from Matrix", |v| {
        v["event"] == "message" && v["content"]["text"]["body"] == to_contact.as_str()
    });
}

fn set_store(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    assert!(text.contains(from), "{text}");
    std::fs::write(config, text.replace(from, to)).expect("write config");
}

/// An installation of an earlier version (the crypto state in `<database>.crypto/`, selected
/// here with `encryption.store: directory`) starts with the database store: the bot's and the
/// ghost's devices are copied in, keep their ids and keys, and go on decrypting and encrypting
/// with the client's existing sessions. The directory is left in place for a rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_store_moves_into_the_database_and_its_devices_keep_working() {
    let mut env = BridgeEnv::start(&format!("{ENCRYPTION}    store: directory\n")).await;
    let mut alice = nio(&env, "alice", "ALICEPHONE");
    let (mgmt, account, _) = encrypted_login(&mut alice);
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&mut alice, &mgmt, &node.account);
    both_ways(&mut alice, &mut node, &room, &account, "before the move");
    let (bot_before, ghost_before) = (devices(&mut alice, BOT), devices(&mut alice, &ghost));
    assert_eq!(bot_before.len(), 1, "{bot_before:?}");
    assert_eq!(ghost_before.len(), 1, "{ghost_before:?}");
    let dir = env.setup.dir.join("bridge.db.crypto");
    assert!(dir.join("matrix-sdk-crypto.sqlite3").exists());

    env.bridge.stop();
    set_store(
        &env.setup.config,
        "    store: directory\n",
        "    store: database\n",
    );
    env.bridge = env.setup.start().await;
    both_ways(&mut alice, &mut node, &room, &account, "after the move");
    assert_eq!(
        devices(&mut alice, BOT),
        bot_before,
        "the bot keeps its device"
    );
    assert_eq!(
        devices(&mut alice, &ghost),
        ghost_before,
        "the ghost keeps its device"
    );
    let log = std::fs::read_to_string(env.setup.dir.join("bridge.log")).expect("log");
    assert_eq!(
        log.matches("crypto store copied into the database").count(),
        2,
        "the bot's and the ghost's stores were copied"
    );
    assert!(dir.exists(), "the directory is left for a rollback");

    // A restart reads the database, copying nothing again.
    env.bridge.stop();
    env.bridge = env.setup.start().await;
    both_ways(&mut alice, &mut node, &room, &account, "after a restart");
    let log = std::fs::read_to_string(env.setup.dir.join("bridge.log")).expect("log");
    assert_eq!(
        log.matches("crypto store copied into the database").count(),
        0
    );
}

fn read_only_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o555)).expect("chmod");
    d
}

fn is_empty(d: &Path) -> bool {
    std::fs::read_dir(d).expect("read dir").next().is_none()
}

/// On PostgreSQL the bridge needs no local state: it runs in a read-only working directory, is
/// killed, and starts again in another one, with its devices and their sessions intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_bridge_keeps_no_local_state() {
    let first = read_only_dir();
    let mut schema = None;
    let mut env = BridgeEnv::start_with(ENCRYPTION, Some(first.path()), |setup| {
        let config = setup.config.clone();
        let schema = &mut schema;
        async move { *schema = Some(use_fresh_pg_schema(&config).await) }
    })
    .await;
    let mut alice = nio(&env, "alice", "ALICEPHONE");
    let (mgmt, account, _) = encrypted_login(&mut alice);
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&mut alice, &mgmt, &node.account);
    both_ways(
        &mut alice,
        &mut node,
        &room,
        &account,
        "on the first machine",
    );
    let (bot_before, ghost_before) = (devices(&mut alice, BOT), devices(&mut alice, &ghost));

    env.bridge.kill();
    let second = read_only_dir();
    env.bridge = env.setup.start_in(Some(second.path())).await;
    both_ways(
        &mut alice,
        &mut node,
        &room,
        &account,
        "on the second machine",
    );
    assert_eq!(devices(&mut alice, BOT), bot_before);
    assert_eq!(devices(&mut alice, &ghost), ghost_before);
    assert!(is_empty(first.path()) && is_empty(second.path()));
    let log = std::fs::read_to_string(env.setup.dir.join("bridge.log")).expect("log");
    assert!(!log.contains("crypto store copied"), "nothing to copy");
    env.bridge.kill();
    drop_pg_schema(&schema.expect("schema")).await;
}
