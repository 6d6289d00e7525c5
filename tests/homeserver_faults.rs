//! A homeserver that fails for a while: the bridge talks to Synapse through a proxy that answers
//! 500, or 429 with `retry_after_ms`, for a time, and 413 for one particular message. Transient
//! failures are retried until they pass (nothing lost, doubled or reordered); the permanent one is
//! reported in the room and does not hold up the messages after it.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
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
    BridgeSetup, MatrixUser, Synapse,
    interop::{CODE, TestGateway, random_account},
    node::NodeContact,
    portal::{BOT, by, ghost_of, login, start_chat},
};
use serde_json::Value;

const PASS: u8 = 0;
const FAIL_500: u8 = 1;
const RATE_LIMIT: u8 = 2;
/// Each send's first try is applied by Synapse under another transaction id (as if Synapse
/// had forgotten the id, which it does for users without a device when it restarts) and the
/// answer is lost (502).
const LOSE_REPLY: u8 = 3;
/// A message with this text is refused by the proxy with 413, always.
const TOO_LARGE: &str = "REFUSED-AS-TOO-LARGE";

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    mode: Arc<AtomicU8>,
    /// Sends answered with a failure.
    failed: Arc<AtomicUsize>,
    /// Sends already tried once (for `LOSE_REPLY`).
    tried: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

async fn forward(State(p): State<Proxy>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, 256 * 1024 * 1024).await.unwrap_or_default();
    let is_send = parts.method == axum::http::Method::PUT && parts.uri.path().contains("/send/");
    let answer = |status: u16, body: &str| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("response")
    };
    if is_send {
        if bytes
            .windows(TOO_LARGE.len())
            .any(|w| w == TOO_LARGE.as_bytes())
        {
            p.failed.fetch_add(1, Ordering::SeqCst);
            return answer(
                413,
                r#"{"errcode":"M_TOO_LARGE","error":"event too large"}"#,
            );
        }
        match p.mode.load(Ordering::SeqCst) {
            FAIL_500 => {
                p.failed.fetch_add(1, Ordering::SeqCst);
                return answer(500, r#"{"errcode":"M_UNKNOWN","error":"internal error"}"#);
            }
            RATE_LIMIT => {
                p.failed.fetch_add(1, Ordering::SeqCst);
                return answer(
                    429,
                    r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":300}"#,
                );
            }
            LOSE_REPLY => {
                let path = parts.uri.path().to_owned();
                let first = p.tried.lock().expect("lock").insert(path.clone());
                if first {
                    let query = parts
                        .uri
                        .query()
                        .map(|q| format!("?{q}"))
                        .unwrap_or_default();
                    let mut rb = p.http.request(
                        parts.method.clone(),
                        format!("{}{path}-forgotten{query}", p.upstream),
                    );
                    for (k, v) in &parts.headers {
                        if k != "host" && k != "content-length" {
                            rb = rb.header(k, v);
                        }
                    }
                    let applied = rb.body(bytes.to_vec()).send().await;
                    assert!(
                        applied.is_ok_and(|r| r.status().is_success()),
                        "the first try reached Synapse"
                    );
                    p.failed.fetch_add(1, Ordering::SeqCst);
                    return answer(502, r#"{"errcode":"M_UNKNOWN","error":"bad gateway"}"#);
                }
            }
            _ => {}
        }
    }
    common::forward(&p.http, &p.upstream, &parts, bytes.to_vec()).await
}

async fn start_proxy(upstream: &str) -> (Proxy, String) {
    let proxy = Proxy {
        upstream: upstream.to_owned(),
        http: reqwest::Client::new(),
        mode: Arc::default(),
        failed: Arc::default(),
        tried: Arc::default(),
    };
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (proxy, url)
}

/// The ghost's message bodies in `room`, oldest first.
async fn bodies(user: &MatrixUser, room: &str, ghost: &str) -> Vec<String> {
    user.messages(room)
        .await
        .iter()
        .filter(|e| e["sender"] == ghost && e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until every one of `expected` is in the room (or the deadline passes); returns what is
/// there.
async fn wait_all(user: &MatrixUser, room: &str, ghost: &str, expected: &[String]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = bodies(user, room, ghost).await;
        if expected.iter().all(|e| got.contains(e)) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Row {
    scenario: &'static str,
    sent: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
}

fn row(scenario: &'static str, expected: &[String], got: &[String]) -> Row {
    let ours: Vec<&String> = got.iter().filter(|g| expected.contains(g)).collect();
    let mut seen = std::collections::HashSet::new();
    let duplicated = ours.iter().filter(|g| !seen.insert(**g)).count();
    let lost = expected.iter().filter(|e| !got.contains(e)).count();
    let positions: Vec<usize> = expected
        .iter()
        .filter_map(|e| got.iter().position(|g| g == e))
        .collect();
    let out_of_order = positions.windows(2).filter(|w| w[0] > w[1]).count();
    Row {
        scenario,
        sent: expected.len(),
        delivered: seen.len(),
        lost,
        duplicated,
        out_of_order,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_homeserver_loses_and_doubles_nothing() {
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
    let synapse =
        Synapse::start_for_bridge(&tmp.path().join("hs"), &setup.config, &setup.registration).await;
    // The bridge reaches the homeserver only through the proxy.
    let (proxy, proxy_url) = start_proxy(&synapse.url).await;
    let config = std::fs::read_to_string(&setup.config).expect("config");
    std::fs::write(&setup.config, config.replace(&synapse.url, &proxy_url)).expect("config");
    let _bridge = setup.start().await;

    let alice = synapse.user("alice").await;
    let (mgmt, my_account) = login(&alice).await;
    let mut node = NodeContact::spawn();
    node.setup(
        gw.port,
        &B64.encode(&gw.addr.public_key),
        &random_account(),
        CODE,
    );
    let ghost = ghost_of(&node.account);
    let room = start_chat(&alice, &mgmt, &node.account).await;
    let send = |node: &mut NodeContact, text: &str| {
        node.call(serde_json::json!({"cmd": "send", "to": my_account, "content": text}));
    };

    let mut rows = Vec::new();
    for (scenario, mode, tag) in [
        ("homeserver answers 500 for 3 s", FAIL_500, "fail500"),
        (
            "homeserver answers 429 (300 ms) for 3 s",
            RATE_LIMIT,
            "ratelimit",
        ),
        (
            "homeserver applies a send, loses the answer and forgets its id",
            LOSE_REPLY,
            "lostreply",
        ),
    ] {
        let failed_before = proxy.failed.load(Ordering::SeqCst);
        proxy.mode.store(mode, Ordering::SeqCst);
        let expected: Vec<String> = (0..5).map(|i| format!("{tag}-{i}")).collect();
        for text in &expected {
            send(&mut node, text);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            proxy.failed.load(Ordering::SeqCst) > failed_before,
            "{scenario}: the bridge did not meet the fault"
        );
        proxy.mode.store(PASS, Ordering::SeqCst);
        let got = wait_all(&alice, &room, &ghost, &expected).await;
        rows.push(row(scenario, &expected, &got));
    }

    // A message the homeserver refuses for good (413) is reported, not retried forever, and the
    // ones after it go through.
    let expected = vec!["before-413".to_owned(), "after-413".to_owned()];
    send(&mut node, "before-413");
    send(&mut node, &format!("{TOO_LARGE} a very long message"));
    send(&mut node, "after-413");
    let got = wait_all(&alice, &room, &ghost, &expected).await;
    rows.push(row(
        "homeserver answers 413 for one message",
        &expected,
        &got,
    ));
    alice
        .wait_for(
            &room,
            "a notice about the refused message",
            by(BOT, |e: &Value| {
                e["content"]["body"].as_str().is_some_and(|b| {
                    b.contains("could not be bridged") && b.contains("M_TOO_LARGE")
                })
            }),
        )
        .await;

    eprintln!("\nscenario | sent | delivered | lost | duplicated | out of order");
    for r in &rows {
        eprintln!(
            "{} | {} | {} | {} | {} | {}",
            r.scenario, r.sent, r.delivered, r.lost, r.duplicated, r.out_of_order
        );
    }
    for r in &rows {
        assert_eq!(
            (r.delivered, r.lost, r.duplicated, r.out_of_order),
            (r.sent, 0, 0, 0),
            "{}",
            r.scenario
        );
    }
}
