//! Admin and portal-maintenance commands end to end, with a real Synapse and a contact on the
//! official libsignal: the login's personal space, `sync-portal`, `sudo`, and
//! `delete-all-portals` with its confirmation.

mod common;

use std::time::Duration;

use common::{
    env::BridgeEnv,
    portal::{BOT, from_bot, ghost_of, login, start_chat},
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_act_for_users_and_delete_every_portal_after_confirming() {
    let env = BridgeEnv::start("").await;
    let alice = env.synapse.user("alice").await;
    let admin = env.synapse.user("admin").await;
    let (alice_mgmt, _) = login(&alice).await;
    let mut node = env.node();
    let room = start_chat(&alice, &alice_mgmt, &node.account).await;
    let ghost = ghost_of(&node.account);

    // The login's personal space: alice is invited, and it holds the portal.
    let space = alice.wait_space_invite().await;
    alice.join(&space).await;
    let child = |room: &str| {
        let (alice, space, room) = (&alice, space.clone(), room.to_owned());
        async move {
            alice
                .call(
                    reqwest::Method::GET,
                    &format!("/_matrix/client/v3/rooms/{space}/state/m.space.child/{room}"),
                    None,
                )
                .await
        }
    };
    let (s, c) = child(&room).await;
    assert_eq!((s, c["via"].clone()), (200, json!(["localhost"])), "{c}");

    // sync-portal: the contact's new profile name reaches its ghost when the owner asks.
    node.call(json!({"cmd": "set_profile", "name": "Nora Renamed"}));
    alice.send_text(&room, "!interop sync-portal").await;
    alice
        .wait_for(&room, "refreshed", from_bot("Portal refreshed"))
        .await;
    let (s, p) = alice
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/profile/{}", common::urlencode(&ghost)),
            None,
        )
        .await;
    assert_eq!(
        (s, p["displayname"].as_str()),
        (200, Some("Nora Renamed")),
        "{p}"
    );

    // A user may not use admin commands.
    alice.send_text(&alice_mgmt, "delete-all-portals").await;
    alice
        .wait_for(&alice_mgmt, "refusal", from_bot("not allowed"))
        .await;

    // sudo: the admin sees alice's chats as alice would.
    let admin_mgmt = admin.create_dm(BOT).await;
    admin
        .wait_for(&admin_mgmt, "welcome", from_bot("management room"))
        .await;
    admin
        .send_text(&admin_mgmt, "sudo @alice:localhost list-chats")
        .await;
    admin
        .wait_for(
            &admin_mgmt,
            "sudo answer",
            from_bot("As @alice:localhost: - "),
        )
        .await;

    // delete-all-portals: asked, cancelled, asked again, confirmed; then the ghost and the
    // bot leave alice's portal, and it is gone from her chats.
    admin.send_text(&admin_mgmt, "delete-all-portals").await;
    admin
        .wait_for(&admin_mgmt, "the question", from_bot("all 1 portal(s)"))
        .await;
    admin.send_text(&admin_mgmt, "cancel").await;
    admin
        .wait_for(
            &admin_mgmt,
            "cancelled",
            from_bot("Cancelled `delete-all-portals`"),
        )
        .await;
    admin.send_text(&admin_mgmt, "delete-all-portals").await;
    admin.send_text(&admin_mgmt, "confirm").await;
    admin
        .wait_for(&admin_mgmt, "deleted", from_bot("Deleted 1 portal(s)."))
        .await;
    let start = std::time::Instant::now();
    loop {
        let members = alice.joined_members(&room).await;
        if !members.iter().any(|m| m == &ghost || m == BOT) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still in the deleted portal: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, c) = child(&room).await;
    assert_eq!(c["via"], json!([]), "the portal left the space: {c}");
    alice.send_text(&alice_mgmt, "list-chats").await;
    alice
        .wait_for(&alice_mgmt, "no chats", from_bot("no bridged chats"))
        .await;
    let log = std::fs::read_to_string(&env.bridge.log).expect("log");
    assert!(
        log.contains("sudo") && log.contains("delete-all-portals"),
        "admin actions are logged"
    );
}
