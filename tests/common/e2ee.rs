//! Encrypted Matrix clients for the end-to-end tests: matrix-nio (`tests/peers/e2ee_client.py`)
//! and matrix-js-sdk (`tests/peers/js_e2ee_client.js`), both driven by the same JSON lines.

use serde_json::{Value, json};

use super::{
    Synapse, env::BridgeEnv, interop::CODE, interop::random_account, node::NodeContact, venv,
};

pub const BOT: &str = "@interopbot:localhost";

/// The bridge config section that turns encryption on, as an admin would.
pub const ENCRYPTION: &str = "encryption:\n    allow: true\n    default: true\n    appservice: true\n    msc4190: true\n    self_sign: true\n";

fn spawn(program: &str, script: &str) -> NodeContact {
    let script = super::repo().join("tests/peers").join(script);
    let script = script.to_string_lossy();
    let mut args = vec![&*script];
    if std::env::var_os("MIB_VERBOSE_AGENTS").is_some() {
        args.push("--verbose");
    }
    NodeContact::spawn_program(program, &args)
}

/// A matrix-nio client logged in as `user` with its own device.
pub fn nio(env: &BridgeEnv, user: &str, device: &str) -> NodeContact {
    let mut c = spawn(&format!("{}/bin/python", venv()), "e2ee_client.py");
    env.synapse.register(user);
    c.call(json!({"cmd": "login", "homeserver": env.synapse.url, "user": user, "password": "test-password-1", "device_id": device}));
    c
}

/// A matrix-js-sdk client logged in as `user`, its device cross-signed by its user, in the given
/// isolation mode (`exclude_insecure`: only cross-signed devices, or `all_devices`).
pub fn js(synapse: &Synapse, user: &str, device: &str, isolation: &str) -> NodeContact {
    let mut c = spawn("node", "js_e2ee_client.js");
    synapse.register(user);
    c.call(
        json!({"cmd": "login", "homeserver": synapse.url, "user": user,
                  "password": "test-password-1", "device_id": device, "isolation": isolation}),
    );
    c
}

/// Waits (45 s at most) for an event matching `filter` (the `wait_event` arguments).
pub fn wait_for(c: &mut NodeContact, mut filter: Value) -> Value {
    filter["cmd"] = json!("wait_event");
    filter["timeout"] = json!(45);
    c.call(filter)["event"].clone()
}

pub fn wait(c: &mut NodeContact, room: &str, sender: &str, body_contains: &str) -> Value {
    wait_for(
        c,
        json!({"room_id": room, "sender": sender, "body_contains": body_contains}),
    )
}

/// Logs `user` in through an encrypted DM with the bot; returns (management room, account,
/// the bot's welcome event).
pub fn encrypted_login(user: &mut NodeContact) -> (String, String, Value) {
    let mgmt = user
        .call(json!({"cmd": "create_room", "invite": [BOT], "encrypted": true, "is_direct": true}))
        ["room_id"]
        .as_str()
        .expect("room")
        .to_owned();
    let welcome = wait(user, &mgmt, BOT, "management room");
    let account = random_account();
    user.call(json!({"cmd": "send_text", "room_id": mgmt, "body": format!("login {account}")}));
    wait(user, &mgmt, BOT, "verification code was sent");
    user.call(json!({"cmd": "send_text", "room_id": mgmt, "body": CODE}));
    wait(user, &mgmt, BOT, "Logged in as");
    (mgmt, account, welcome)
}

/// `start-chat` with a contact in the management room; joins the portal and returns its id.
pub fn start_chat(user: &mut NodeContact, mgmt: &str, contact: &str) -> String {
    user.call(
        json!({"cmd": "send_text", "room_id": mgmt, "body": format!("start-chat {contact}")}),
    );
    let link = wait(user, mgmt, BOT, "Your chat with");
    let room = super::portal::linked_room(&link);
    user.call(json!({"cmd": "join", "room_id": room}));
    room
}
