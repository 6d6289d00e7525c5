//! The provisioning API end to end: a real Synapse, the bridge, the gateway and a contact on the
//! official libsignal, driven over HTTP with the shared secret instead of through the bot.

mod common;

use common::{env::BridgeEnv, interop::CODE, interop::random_account, urlencode};
use serde_json::{Value, json};

const SECRET: &str = "provisioning-secret-for-the-tests";

struct Prov {
    http: reqwest::Client,
    base: String,
}

impl Prov {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        user: Option<&str>,
        secret: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut url = format!("{}/_matrix/provision/v1/{path}", self.base);
        if let Some(u) = user {
            url = format!("{url}?user_id={}", urlencode(u));
        }
        let mut req = self.http.request(method, url);
        if let Some(s) = secret {
            req = req.bearer_auth(s);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("provisioning request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, user: &str, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            path,
            Some(user),
            Some(SECRET),
            Some(body),
        )
        .await
    }

    async fn get(&self, path: &str, user: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(user), Some(SECRET), None)
            .await
    }

    /// A GET whose path has a query string already (`user_id` is added to it).
    async fn get_q(&self, path_and_query: &str, user: &str) -> (u16, Value) {
        let url = format!(
            "{}/_matrix/provision/v1/{path_and_query}&user_id={}",
            self.base,
            urlencode(user)
        );
        let resp = self
            .http
            .get(url)
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("provisioning request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_logs_in_and_opens_chats() {
    let env = BridgeEnv::start(&format!(
        "provisioning:\n    enabled: true\n    prefix: /_matrix/provision\n    shared_secret: {SECRET}\n"
    ))
    .await;
    let prov = Prov {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{}", env.setup.port),
    };
    let alice = env.synapse.user("alice").await;
    let me = alice.user_id.as_str();

    // The secret is required and checked; the user must be named.
    let (s, b) = prov
        .call(reqwest::Method::GET, "logins", Some(me), None, None)
        .await;
    assert_eq!((s, b["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let (s, b) = prov
        .call(
            reqwest::Method::GET,
            "logins",
            Some(me),
            Some("not-the-secret"),
            None,
        )
        .await;
    assert_eq!((s, b["errcode"].as_str()), (403, Some("M_UNKNOWN_TOKEN")));
    let (s, _) = prov
        .call(reqwest::Method::GET, "logins", None, Some(SECRET), None)
        .await;
    assert_eq!(s, 400, "user_id is required");

    // Login in two steps; a wrong code can be followed by the right one.
    let (s, b) = prov.get("logins", me).await;
    assert_eq!((s, b["logins"].clone()), (200, json!([])));
    let (s, _) = prov
        .post("login/start", me, json!({"identifier": "not a number"}))
        .await;
    assert_eq!(s, 400);
    let account = random_account();
    let (s, b) = prov
        .post("login/start", me, json!({"identifier": account}))
        .await;
    assert_eq!((s, b["next_step"].as_str()), (200, Some("code")), "{b}");
    let (s, b) = prov
        .post("login/verify", me, json!({"code": "000000"}))
        .await;
    assert_eq!(s, 400, "wrong code: {b}");
    let (s, b) = prov.post("login/verify", me, json!({"code": CODE})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["login"]["identifier"], json!(account));
    let (_, b) = prov.get("logins", me).await;
    assert_eq!(b["logins"][0]["identifier"], json!(account), "{b}");
    let (s, _) = prov
        .post("login/start", me, json!({"identifier": random_account()}))
        .await;
    assert_eq!(s, 409, "already logged in");

    // Chats: an unknown contact is refused; a real one gets a portal the user is invited to.
    let (s, _) = prov
        .post("chats", me, json!({"contact": random_account()}))
        .await;
    assert_eq!(s, 404);
    let mut node = env.node();
    node.call(json!({"cmd": "set_profile", "name": "Nora Search"}));
    let (s, b) = prov
        .post("chats", me, json!({"contact": node.account}))
        .await;
    assert_eq!(s, 200, "{b}");
    let room = b["chat"]["room_id"].as_str().expect("room").to_owned();
    let invited = alice.wait_invite(&[]).await;
    assert_eq!(invited, room);
    let (_, b) = prov.get("chats", me).await;
    assert_eq!(b["chats"][0]["chat_id"], json!(node.account), "{b}");
    assert_eq!(b["chats"][0]["kind"], "dm");

    // Contacts: the people with a chat, by the name their profile gives; found by any part of
    // the name or the number; a chat opened by name is the same chat.
    let ghost = format!(
        "@interop_{}:{}",
        node.account.trim_start_matches('+'),
        env.synapse.server_name
    );
    let (s, b) = prov.get("contacts", me).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["contacts"],
        json!([{"account": node.account, "name": "Nora Search", "mxid": ghost, "room_id": room}])
    );
    let search = |q: &str| format!("search?query={}", urlencode(q));
    for q in ["nora", "SEARCH", &node.account[node.account.len() - 4..]] {
        let (s, b) = prov.get_q(&search(q), me).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["results"][0]["account"], json!(node.account), "{q}: {b}");
    }
    let (_, b) = prov.get_q(&search("nobody by that name"), me).await;
    assert_eq!(b["results"], json!([]));
    let (_, b) = prov.get_q(&search(&random_account()), me).await;
    assert_eq!(
        b["results"],
        json!([]),
        "a number not on the network is not found"
    );
    let (s, b) = prov
        .post("chats", me, json!({"contact": "nora search"}))
        .await;
    assert_eq!(
        (s, b["chat"]["room_id"].as_str()),
        (200, Some(room.as_str())),
        "{b}"
    );
    let (s, _) = prov
        .post("chats", me, json!({"contact": "nobody by that name"}))
        .await;
    assert_eq!(s, 404);

    // The homeserver's third-party look-ups reach the bridge: a number on the network is its
    // ghost, a name finds the contact, the ghost maps back to its number, and a number not on
    // the network is nobody.
    let (s, b) = alice
        .call(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/thirdparty/user/interop?phone={}",
                urlencode(&node.account)
            ),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!([{"userid": ghost, "protocol": "interop", "fields": {"phone": node.account}}])
    );
    let (_, b) = alice
        .call(
            reqwest::Method::GET,
            "/_matrix/client/v3/thirdparty/user/interop?name=nora",
            None,
        )
        .await;
    assert_eq!(b[0]["userid"], json!(ghost), "{b}");
    let (_, b) = alice
        .call(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/thirdparty/user/interop?phone={}",
                urlencode(&random_account())
            ),
            None,
        )
        .await;
    assert_eq!(b, json!([]));
    let (s, b) = alice
        .call(
            reqwest::Method::GET,
            &format!(
                "/_matrix/client/v3/thirdparty/user/interop?userid={}",
                urlencode(&ghost)
            ),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b[0]["fields"]["phone"], json!(node.account), "{b}");

    // Logout ends the login; a second logout says so.
    let (s, _) = prov.post("logout", me, json!({})).await;
    assert_eq!(s, 200);
    let (_, b) = prov.get("logins", me).await;
    assert_eq!(b["logins"], json!([]));
    let (s, _) = prov.post("logout", me, json!({})).await;
    assert_eq!(s, 404);
}
