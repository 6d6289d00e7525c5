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
    gauge,
    interop::{CODE, random_account},
    portal::ghost_of,
    urlencode,
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

const SECRET: &str = "provisioning-secret-for-the-tests";

/// A login started through the provisioning API on one worker is finished on another, as a
/// balancer may send the two requests anywhere: the login in progress is kept in the database.
/// The worker that verified it runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_started_on_one_worker_is_finished_on_another() {
    let env = WorkersEnv::start(
        &format!(
            "provisioning:\n    enabled: true\n    prefix: /_matrix/provision\n    shared_secret: {SECRET}\n"
        ),
        2,
    )
    .await;
    let alice = env.synapse.user("alice").await;
    let http = reqwest::Client::new();
    let post = |port: u16, path: &str, body: Value| {
        let req = http
            .post(format!(
                "http://127.0.0.1:{port}/_matrix/provision/v1/{path}?user_id={}",
                urlencode(&alice.user_id)
            ))
            .bearer_auth(SECRET)
            .json(&body);
        async move {
            let resp = req.send().await.expect("provisioning request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (w0, w1) = (&env.workers.live[0], &env.workers.live[1]);
    let account = random_account();
    let (s, b) = post(w0.port, "login/start", json!({"identifier": account})).await;
    assert_eq!(s, 200, "start on {}: {b}", w0.id);
    let (s, b) = post(w1.port, "login/verify", json!({"code": CODE})).await;
    assert_eq!(s, 200, "verify on {}: {b}", w1.id);
    assert_eq!(b["login"]["identifier"], account.as_str(), "{b}");
    let start = std::time::Instant::now();
    while gauge(w1.metrics, "mib_logins_connected").await != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the login did not connect in {}",
            w1.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gauge(w0.metrics, "mib_logins").await, Some(0));

    // Requests that need the running login, sent to the worker that does not run it, are
    // answered by the one that does.
    let node = env.node();
    let (s, b) = post(w0.port, "chats", json!({"contact": node.account})).await;
    assert_eq!(s, 200, "open a chat through {}: {b}", w0.id);
    assert_eq!(b["chat"]["chat_id"], node.account.as_str(), "{b}");
    let room = b["chat"]["room_id"].as_str().expect("room").to_owned();
    let (s, b) = {
        let resp = http
            .get(format!(
                "http://127.0.0.1:{}/_matrix/provision/v1/search?user_id={}&query={}",
                w0.port,
                urlencode(&alice.user_id),
                urlencode(&node.account)
            ))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("search");
        (
            resp.status().as_u16(),
            resp.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    assert_eq!(s, 200, "search through {}: {b}", w0.id);
    assert!(
        b["results"]
            .as_array()
            .is_some_and(|r| r.iter().any(|c| c["room_id"] == room.as_str())),
        "{b}"
    );
    // A wrong secret is refused before anything is forwarded.
    let resp = http
        .post(format!(
            "http://127.0.0.1:{}/_matrix/provision/v1/chats?user_id={}",
            w0.port,
            urlencode(&alice.user_id)
        ))
        .bearer_auth("wrong")
        .json(&json!({"contact": node.account}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 403);
    env.finish().await;
}
