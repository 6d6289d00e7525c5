//! End to end with a real Synapse: the bot joins DMs of permitted users, answers commands, and
//! refuses users without permission.

mod common;

use std::time::Duration;

use common::{BridgeSetup, Synapse};

fn notice_from<'a>(bot: &'a str, needle: &'a str) -> impl Fn(&serde_json::Value) -> bool + 'a {
    move |e| {
        e["sender"] == bot
            && e["content"]["msgtype"] == "m.notice"
            && e["content"]["body"].as_str().unwrap_or("").contains(needle)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_answers_permitted_users_and_refuses_others() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Synapse needs the registration first; the bridge needs Synapse's URL: write, start, rewrite.
    let setup = BridgeSetup::write(
        tmp.path(),
        8008,
        &[
            ("*", "relay"),
            ("localhost", "user"),
            ("@eve:localhost", "relay"),
        ],
    );
    let synapse =
        Synapse::start_for_bridge(&tmp.path().join("hs"), &setup.config, &setup.registration).await;
    let mut bridge = setup.start().await;
    let bot = "@interopbot:localhost";

    // A permitted user opens a DM: the bot joins and makes it the management room.
    let alice = synapse.user("alice").await;
    let room = alice.create_dm(bot).await;
    alice
        .wait_for(&room, "the welcome", notice_from(bot, "management room"))
        .await;

    alice.send_text(&room, "help").await;
    let help = alice
        .wait_for(&room, "help", notice_from(bot, "start-chat"))
        .await;
    assert!(
        help["content"]["formatted_body"]
            .as_str()
            .unwrap_or("")
            .contains("<code>ping</code>")
    );

    alice.send_text(&room, "frobnicate now").await;
    alice
        .wait_for(
            &room,
            "unknown command hint",
            notice_from(bot, "Unknown command `frobnicate`"),
        )
        .await;

    alice.send_text(&room, "ping").await;
    alice
        .wait_for(&room, "pong", notice_from(bot, "Pong"))
        .await;

    alice.send_text(&room, "whoami").await;
    alice
        .wait_for(&room, "whoami", notice_from(bot, "@alice:localhost"))
        .await;

    // A user without the commands level is refused with a message, and the bot leaves.
    let eve = synapse.user("eve").await;
    let eve_room = eve.create_dm(bot).await;
    eve.wait_for(&eve_room, "the refusal", notice_from(bot, "not allowed"))
        .await;
    let start = std::time::Instant::now();
    while eve.joined_members(&eve_room).await.iter().any(|m| m == bot) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "bot did not leave"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert!(bridge.is_running(), "bridge exited:\n{}", bridge.log_tail());
    let log = std::fs::read_to_string(&bridge.log).expect("log");
    assert!(
        !log.contains("frobnicate"),
        "message bodies must not reach the log"
    );
    bridge.stop();
    drop(synapse);
}
