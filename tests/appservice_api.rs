//! The appservice HTTP API, driven through the router with `oneshot` (no sockets).

use std::sync::Arc;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use matrix_interop_bridge::{
    appservice::{AppState, Readiness, UserQuery, router},
    metrics::Metrics,
    store::{SqlStore, TxnStore, testing},
    vault::SecretKey,
};
use serde_json::{Value, json};
use tower::ServiceExt;

const HS_TOKEN: &str = "hs_token_for_tests_0123456789";

struct AlwaysReady;
#[async_trait::async_trait]
impl Readiness for AlwaysReady {
    async fn check(&self) -> Result<(), Vec<String>> {
        Ok(())
    }
}

struct OnlyBot;
#[async_trait::async_trait]
impl UserQuery for OnlyBot {
    async fn user_exists(&self, user_id: &str) -> bool {
        user_id == "@interopbot:example.org"
    }
}

async fn setup() -> (axum::Router, SqlStore, tempfile::TempDir) {
    setup_with_key(SecretKey::random()).await
}

/// [`setup`] with the queue sealed under `key`, to read what was queued.
async fn setup_with_key(key: SecretKey) -> (axum::Router, SqlStore, tempfile::TempDir) {
    let (store, dir) = testing::sqlite().await;
    let state = AppState {
        hs_token: HS_TOKEN.into(),
        store: Arc::new(store.clone()),
        queue_key: key,
        notify: Default::default(),
        metrics: Metrics::new(),
        readiness: Arc::new(AlwaysReady),
        users: Arc::new(OnlyBot),
        protocol: "interop".into(),
        txn_order: Some(Default::default()),
        shared_txn_order: false,
        catch_up: None,
    };
    (router(state, 64 * 1024), store, dir)
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: impl Into<Body>,
) -> (u16, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(body.into()).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A transaction with one message whose event id is also its body.
fn one_message(id: &str) -> String {
    json!({"events": [{
        "type": "m.room.message", "room_id": "!r:example.org", "sender": "@alice:example.org",
        "event_id": id, "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": id}
    }]})
    .to_string()
}

fn txn_body(text: &str) -> String {
    json!({
        "events": [{
            "type": "m.room.message", "room_id": "!r:example.org", "sender": "@alice:example.org",
            "event_id": "$e1", "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": text}
        }],
        "de.sorunome.msc2409.ephemeral": [{"type": "m.typing", "room_id": "!r:example.org", "content": {"user_ids": []}}]
    })
    .to_string()
}

#[tokio::test]
async fn retried_transaction_has_no_second_effect() {
    let (app, store, _d) = setup().await;
    let uri = "/_matrix/app/v1/transactions/42";
    for _ in 0..3 {
        let (status, body) = call(&app, "PUT", uri, Some(HS_TOKEN), txn_body("hello")).await;
        assert_eq!((status, body), (200, json!({})));
    }
    // One message and one typing event (unstable spelling) queued, once.
    assert_eq!(store.queued_events(100).await.expect("queue").len(), 2);
}

#[tokio::test]
async fn tokens_are_checked() {
    let (app, store, _d) = setup().await;
    let uri = "/_matrix/app/v1/transactions/1";
    let (status, body) = call(&app, "PUT", uri, None, txn_body("x")).await;
    assert_eq!(status, 401);
    assert_eq!(body["errcode"], "M_UNAUTHORIZED");
    let (status, body) = call(&app, "PUT", uri, Some("wrong"), txn_body("x")).await;
    assert_eq!(status, 403);
    assert_eq!(body["errcode"], "M_FORBIDDEN");
    // The deprecated query parameter works too.
    let (status, _) = call(
        &app,
        "PUT",
        &format!("{uri}?access_token={HS_TOKEN}"),
        None,
        txn_body("x"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &app,
        "GET",
        "/_matrix/app/v1/users/@interopbot:example.org",
        Some("nope"),
        "",
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(store.queued_events(100).await.expect("queue").len(), 2);
}

#[tokio::test]
async fn bad_bodies_get_matrix_errors() {
    let (app, store, _d) = setup().await;
    let uri = "/_matrix/app/v1/transactions/7";
    let (status, body) = call(&app, "PUT", uri, Some(HS_TOKEN), "{not json").await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_NOT_JSON"))
    );
    let (status, body) = call(&app, "PUT", uri, Some(HS_TOKEN), r#"{"events": 5}"#).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_BAD_JSON"))
    );
    let (status, body) = call(&app, "PUT", uri, Some(HS_TOKEN), "[1,2]").await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_BAD_JSON"))
    );
    let huge = format!(r#"{{"events": [], "pad": "{}"}}"#, "x".repeat(100 * 1024));
    let (status, body) = call(&app, "PUT", uri, Some(HS_TOKEN), huge).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (413, Some("M_TOO_LARGE"))
    );
    assert!(store.queued_events(100).await.expect("queue").is_empty());
    // Nothing was recorded, so the same id with a good body is still applied.
    let (status, _) = call(&app, "PUT", uri, Some(HS_TOKEN), txn_body("ok")).await;
    assert_eq!(status, 200);
    assert_eq!(store.queued_events(100).await.expect("queue").len(), 2);
}

#[tokio::test]
async fn queries_ping_and_unknown_routes() {
    let (app, _store, _d) = setup().await;
    let (s, _) = call(
        &app,
        "GET",
        "/_matrix/app/v1/users/@interopbot:example.org",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = call(
        &app,
        "GET",
        "/_matrix/app/v1/users/@nobody:example.org",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!((s, b["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (s, b) = call(
        &app,
        "GET",
        "/_matrix/app/v1/rooms/%23x:example.org",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!((s, b["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (s, b) = call(
        &app,
        "POST",
        "/_matrix/app/v1/ping",
        Some(HS_TOKEN),
        r#"{"transaction_id":"t"}"#,
    )
    .await;
    assert_eq!((s, b), (200, json!({})));
    let (s, b) = call(
        &app,
        "GET",
        "/_matrix/app/v1/thirdparty/protocol/interop",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!(s, 200);
    assert!(b["user_fields"].is_array());
    let (s, _) = call(
        &app,
        "GET",
        "/_matrix/app/v1/thirdparty/protocol/other",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!(s, 404);
    let (s, b) = call(
        &app,
        "GET",
        "/_matrix/app/v1/thirdparty/user/interop?phone=%2B1555",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!((s, b), (200, json!([])));
    let (s, b) = call(
        &app,
        "GET",
        "/_matrix/app/v1/thirdparty/location?alias=%23a:b",
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!((s, b), (200, json!([])));
    let (s, b) = call(&app, "GET", "/_matrix/app/v1/nonsense", Some(HS_TOKEN), "").await;
    assert_eq!((s, b["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")));
    let (s, b) = call(&app, "DELETE", "/_matrix/app/v1/ping", Some(HS_TOKEN), "").await;
    assert_eq!((s, b["errcode"].as_str()), (405, Some("M_UNRECOGNIZED")));
    let (s, b) = call(&app, "GET", "/health", None, "").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ok")));
    let (s, _) = call(&app, "GET", "/ready", None, "").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn queued_events_hold_no_plaintext() {
    let (app, store, dir) = setup().await;
    let secret = "a-very-distinctive-message-body-4711";
    let (s, _) = call(
        &app,
        "PUT",
        "/_matrix/app/v1/transactions/9",
        Some(HS_TOKEN),
        txn_body(secret),
    )
    .await;
    assert_eq!(s, 200);
    store.close().await;
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "plaintext found in the database files"
        );
    }
}

/// A transaction the homeserver delivers late (after a later one, as Synapse has done after a
/// retry) is accepted: its events are queued after those that arrived first, each once, and a
/// repeat of it changes nothing. The bridge handles events in arrival order (documented in
/// docs/architecture.md); nothing is lost or doubled.
#[tokio::test]
async fn a_late_transaction_is_queued_once_in_arrival_order() {
    let key = SecretKey::random();
    let (app, store, _dir) = setup_with_key(key.clone()).await;
    for (txn, event) in [("2", "$second"), ("1", "$first"), ("1", "$first")] {
        let uri = format!("/_matrix/app/v1/transactions/{txn}");
        let (status, _) = call(&app, "PUT", &uri, Some(HS_TOKEN), one_message(event)).await;
        assert_eq!(status, 200);
    }
    let queued: Vec<String> = store
        .queued_events(100)
        .await
        .expect("queue")
        .iter()
        .map(|e| {
            let plain = key
                .open(matrix_interop_bridge::appservice::QUEUE_AD, &e.sealed)
                .expect("open");
            let item: matrix_interop_bridge::appservice::QueueItem =
                serde_json::from_slice(&plain).expect("item");
            item.event["event_id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(queued, ["$second", "$first"]);
}

/// A full disk makes the bridge refuse the transaction with an error the homeserver retries
/// (500, nothing half-written); once there is room again the same transaction is taken, once.
#[tokio::test]
async fn a_full_disk_refuses_transactions_until_there_is_room() {
    let (app, store, _d) = setup().await;
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(store.pool())
        .await
        .expect("page count");
    // The database may not grow: as good as a full disk for SQLite.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA max_page_count = {pages}"
    )))
    .execute(store.pool())
    .await
    .expect("limit");
    let big = "x".repeat(4000);
    let events: Vec<Value> = (0..10)
        .map(|i| {
            json!({"type": "m.room.message", "room_id": "!r:example.org", "sender": "@alice:example.org",
                "event_id": format!("$big{i}"), "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": big}})
        })
        .collect();
    let body = json!({ "events": events }).to_string();
    let uri = "/_matrix/app/v1/transactions/full";
    let (status, answer) = call(&app, "PUT", uri, Some(HS_TOKEN), body.clone()).await;
    assert_eq!(status, 500, "{answer}");
    // Inside the bridge the same failure is one to wait out, not to give up on.
    let direct = store
        .apply_transaction(
            "direct",
            b"h",
            &[matrix_interop_bridge::store::QueuedEvent {
                room_id: Some("!r:example.org".into()),
                event_id: None,
                sealed: vec![0; 64 * 1024],
            }],
        )
        .await
        .expect_err("no room");
    assert!(direct.is_unavailable(), "{direct}");
    assert_eq!(answer["errcode"], "M_UNKNOWN", "{answer}");
    assert!(store.queued_events(100).await.expect("queue").is_empty());
    // Room again: the homeserver's retry is taken, and only once.
    sqlx::query("PRAGMA max_page_count = 1073741823")
        .execute(store.pool())
        .await
        .expect("unlimit");
    for _ in 0..2 {
        let (status, _) = call(&app, "PUT", uri, Some(HS_TOKEN), body.clone()).await;
        assert_eq!(status, 200);
    }
    assert_eq!(store.queued_events(100).await.expect("queue").len(), 10);
}

/// A transaction after a skipped number (Synapse can leave one behind, docs/architecture.md) is
/// refused with 503, so that the homeserver marks the bridge down and its recoverer sends the
/// skipped one first; then both are taken, in their order.
#[tokio::test]
async fn a_transaction_after_a_skipped_one_waits_for_it() {
    let (app, store, _d) = setup().await;
    let put = |txn: &'static str, event: &'static str| {
        let app = app.clone();
        let body = one_message(event);
        async move {
            call(
                &app,
                "PUT",
                &format!("/_matrix/app/v1/transactions/{txn}"),
                Some(HS_TOKEN),
                body,
            )
            .await
        }
    };
    assert_eq!(put("40", "$a").await.0, 200);
    let (status, answer) = put("42", "$c").await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(store.queued_events(100).await.expect("queue").len(), 1);
    // The recoverer sends what it held back, oldest first.
    assert_eq!(put("41", "$b").await.0, 200);
    assert_eq!(put("42", "$c").await.0, 200);
    assert_eq!(store.queued_events(100).await.expect("queue").len(), 3);
}
