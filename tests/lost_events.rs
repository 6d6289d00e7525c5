//! Events the homeserver stores but never sends. Synapse moves an appservice's stream position
//! past events before it stores them as a transaction; killed in between, it never sends them
//! (seen in the chaos test `synapse_restart_mid_stream`). Here Synapse sends to the bridge
//! through a proxy that answers one chosen transaction with 200 and drops it, which is what the
//! bridge sees in that case: a message that is in the room and never arrives.
//!
//! - after Synapse is killed and started again, the bridge catches up: the dropped message
//!   reaches the contact once, before the message sent after the restart;
//! - the same when the bridge is killed and started again instead.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::{Body, to_bytes},
    extract::{Request, State},
    response::Response,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{
    BridgeSetup, Synapse,
    interop::{CODE, TestGateway, random_account},
    node::NodeContact,
    portal::{login, start_chat},
};

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    /// A transaction whose body holds this text is answered 200 and dropped.
    drop_text: Arc<Mutex<Option<String>>>,
    dropped: Arc<AtomicUsize>,
}

async fn forward(State(p): State<Proxy>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let is_txn = parts.uri.path().contains("/transactions/");
    let drop_it = is_txn
        && p.drop_text
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(|t| String::from_utf8_lossy(&bytes).contains(t.as_str()));
    if drop_it {
        *p.drop_text.lock().expect("lock") = None;
        p.dropped.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .expect("response");
    }
    common::forward(&p.http, &p.upstream, &parts, bytes.to_vec()).await
}

async fn start_proxy(upstream: String) -> (Proxy, String) {
    let proxy = Proxy {
        upstream,
        http: reqwest::Client::new(),
        drop_text: Arc::default(),
        dropped: Arc::default(),
    };
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let port = common::free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (proxy, format!("http://127.0.0.1:{port}"))
}

/// The texts of the messages the contact has received, in order.
#[derive(Default)]
struct Received(Vec<String>);

impl Received {
    /// Adds what arrives within `quiet`.
    fn pump(&mut self, node: &mut NodeContact, quiet: Duration) {
        node.pump(quiet);
        let messages = node.take_events(|v| v["event"] == "message");
        self.0.extend(
            messages
                .iter()
                .filter_map(|m| m["content"]["text"]["body"].as_str().map(str::to_owned)),
        );
    }

    /// Waits until every one of `texts` has arrived.
    fn wait(&mut self, node: &mut NodeContact, texts: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !texts.iter().all(|t| self.0.iter().any(|g| g == t)) && Instant::now() < deadline {
            self.pump(node, Duration::from_millis(500));
        }
    }

    fn assert_once_in_order(&self, expected: &[&str]) {
        let got = &self.0;
        for t in expected {
            assert_eq!(
                got.iter().filter(|g| g == t).count(),
                1,
                "{t:?} should have arrived once; the contact got {got:?}"
            );
        }
        let positions: Vec<usize> = expected
            .iter()
            .map(|t| got.iter().position(|g| g == t).expect("arrived"))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "out of order: expected {expected:?} in that order, the contact got {got:?}"
        );
    }
}

/// Sends `text` as `alice` and waits until the proxy dropped the transaction carrying it.
async fn send_and_lose(alice: &common::MatrixUser, room: &str, proxy: &Proxy, text: &str) {
    let before = proxy.dropped.load(Ordering::SeqCst);
    *proxy.drop_text.lock().expect("lock") = Some(text.to_owned());
    alice.send_text(room, text).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.dropped.load(Ordering::SeqCst) == before {
        assert!(
            Instant::now() < deadline,
            "the homeserver never sent {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_homeserver_never_sent_are_caught_up_once_and_in_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gw = TestGateway::start().await;
    let setup = BridgeSetup::write_full(
        tmp.path(),
        8008,
        &[("localhost", "user")],
        &gw.addr.address,
        &B64.encode(&gw.addr.public_key),
        "",
    );
    // The homeserver reaches the bridge only through the proxy.
    let (proxy, proxy_url) = start_proxy(format!("http://127.0.0.1:{}", setup.port)).await;
    let reg = std::fs::read_to_string(&setup.registration).expect("registration");
    let bridge_url = format!("http://127.0.0.1:{}", setup.port);
    assert!(reg.contains(&bridge_url), "{reg}");
    std::fs::write(&setup.registration, reg.replace(&bridge_url, &proxy_url)).expect("write");
    let mut synapse =
        Synapse::start_for_bridge(&tmp.path().join("hs"), &setup.config, &setup.registration).await;
    let mut bridge = setup.start().await;

    let alice = synapse.user("alice").await;
    let (mgmt, _) = login(&alice).await;
    let mut node = NodeContact::spawn();
    node.setup(
        gw.port,
        &B64.encode(&gw.addr.public_key),
        &random_account(),
        CODE,
    );
    let room = start_chat(&alice, &mgmt, &node.account).await;
    let mut got = Received::default();
    alice.send_text(&room, "warm-up").await;
    got.wait(&mut node, &["warm-up"]);

    // 1. The homeserver dies after "dropped-1" left the room's timeline but not its queue.
    send_and_lose(&alice, &room, &proxy, "dropped-1").await;
    synapse.restart(Duration::from_secs(3)).await;
    alice.send_text(&room, "after-homeserver-restart").await;
    got.wait(&mut node, &["dropped-1", "after-homeserver-restart"]);
    got.assert_once_in_order(&["warm-up", "dropped-1", "after-homeserver-restart"]);

    // 2. The bridge dies (kill -9) while the homeserver drops a transaction.
    send_and_lose(&alice, &room, &proxy, "dropped-2").await;
    bridge.kill();
    bridge = setup.start().await;
    alice.send_text(&room, "after-bridge-restart").await;
    got.wait(&mut node, &["dropped-2", "after-bridge-restart"]);
    // Nothing comes twice, however many catch-ups ran.
    got.pump(&mut node, Duration::from_secs(3));
    got.assert_once_in_order(&[
        "warm-up",
        "dropped-1",
        "after-homeserver-restart",
        "dropped-2",
        "after-bridge-restart",
    ]);
    drop(bridge);
}
