//! Steps every portal test takes through the bot: logging in, accepting message requests,
//! opening chats, and matching what arrives.

use serde_json::Value;

use super::{
    MatrixUser,
    interop::{CODE, random_account},
};

pub const BOT: &str = "@interopbot:localhost";

pub fn from_bot(needle: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| e["sender"] == BOT && e["content"]["body"].as_str().unwrap_or("").contains(needle)
}

/// Logs `user` in through the bot; returns (management room, account).
pub async fn login(user: &MatrixUser) -> (String, String) {
    let mgmt = user.create_dm(BOT).await;
    user.wait_for(&mgmt, "welcome", from_bot("management room"))
        .await;
    let account = random_account();
    user.send_text(&mgmt, &format!("login {account}")).await;
    user.wait_for(&mgmt, "code prompt", from_bot("verification code was sent"))
        .await;
    user.send_text(&mgmt, "000000").await;
    user.wait_for(&mgmt, "wrong code", from_bot("code is wrong"))
        .await;
    user.send_text(&mgmt, CODE).await;
    user.wait_for(&mgmt, "logged in", from_bot("Logged in as"))
        .await;
    (mgmt, account)
}

/// Accepts the message request of `chat` (a contact or a group) that the bot announced.
pub async fn accept(user: &MatrixUser, mgmt: &str, chat: &str) {
    user.wait_for(mgmt, "message request", from_bot(&format!("accept {chat}")))
        .await;
    user.send_text(mgmt, &format!("accept {chat}")).await;
    user.wait_for(mgmt, "request accepted", from_bot("Accepted;"))
        .await;
}

/// Opens a DM portal with `contact` and joins it.
pub async fn start_chat(user: &MatrixUser, mgmt: &str, contact: &str) -> String {
    user.send_text(mgmt, &format!("start-chat {contact}")).await;
    let ev = user
        .wait_for(mgmt, "portal link", from_bot("Your chat with"))
        .await;
    let room = linked_room(&ev);
    user.join(&room).await;
    room
}

/// The room a bot notice links to (`…/#/!room:server` at the end of its body).
pub fn linked_room(notice: &serde_json::Value) -> String {
    let body = notice["content"]["body"].as_str().expect("body");
    body.rsplit("/#/").next().expect("room").to_owned()
}

/// The ghost of an interop account on the test homeserver.
pub fn ghost_of(account: &str) -> String {
    format!("@interop_{}:localhost", account.trim_start_matches('+'))
}

pub fn by<'a>(sender: &'a str, pred: impl Fn(&Value) -> bool + 'a) -> impl Fn(&Value) -> bool + 'a {
    move |e| e["sender"] == sender && pred(e)
}
