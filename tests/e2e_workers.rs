//! Several workers with encryption: two bridge workers share one PostgreSQL database (and so the
//! bot's and the ghosts' Matrix devices) behind a balancer, against a real Synapse, a
//! matrix-js-sdk client that excludes insecure devices, and a contact on the official libsignal.
//! The user logs in through an encrypted DM with the bot (the worker holding the bot's lease
//! decrypts it) and chats in an encrypted portal (the login's worker decrypts and encrypts);
//! then that worker is killed with SIGKILL, the other one takes the login over, and the chat
//! goes on both ways, decrypted and trusted, with the same devices.

mod common;

use std::time::Duration;

use common::{
    e2ee::{ENCRYPTION, encrypted_login, js, start_chat, wait},
    env::WorkersEnv,
    portal::ghost_of,
};
use serde_json::{Value, json};

fn assert_trusted(ev: &Value) {
    assert_eq!(ev["decrypted"], true, "decrypted: {ev}");
    assert_ne!(ev["shield"]["colour"], "RED", "no red shield: {ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_chats_survive_the_loss_of_a_worker() {
    let mut env = WorkersEnv::start(ENCRYPTION, 2).await;
    let mut alice = js(&env.synapse, "alice", "ALICEWEB", "exclude_insecure");
    let (mgmt, account, welcome) = encrypted_login(&mut alice);
    assert_trusted(&welcome);
    let mut node = env.node();
    let ghost = ghost_of(&node.account);
    let room = start_chat(&mut alice, &mgmt, &node.account);

    // Both ways before the loss.
    node.call(json!({"cmd": "send", "to": account, "content": "before-1"}));
    assert_trusted(&wait(&mut alice, &room, &ghost, "before-1"));
    alice.call(json!({"cmd": "send_text", "room_id": room, "body": "reply-1"}));
    node.event("reply-1", |v| v["content"]["text"]["body"] == "reply-1");

    let (pid, id) = env.workers.kill_login_worker().await;
    let (by, after) = env
        .workers
        .wait_login_taken_over(Duration::from_secs(60))
        .await;
    eprintln!(
        "worker {id} (pid {pid}) killed; the login ran again in worker {by} after {:.1}s",
        after.as_secs_f64()
    );

    // Both ways after it, through the other worker, with the same devices.
    node.call(json!({"cmd": "send", "to": account, "content": "after-2"}));
    assert_trusted(&wait(&mut alice, &room, &ghost, "after-2"));
    alice.call(json!({"cmd": "send_text", "room_id": room, "body": "reply-2"}));
    node.event("reply-2", |v| v["content"]["text"]["body"] == "reply-2");
    // Commands in the encrypted management room too: the surviving worker answers, and runs
    // the login.
    alice.call(json!({"cmd": "send_text", "room_id": mgmt, "body": "list-logins"}));
    assert_trusted(&wait(
        &mut alice,
        &mgmt,
        common::e2ee::BOT,
        &format!("{account} (connected)"),
    ));
    assert!(env.workers.all_running(), "the other worker runs");
    env.finish().await;
}
