//! Bad input from the network: decoders never panic, and a hostile peer loses only its own
//! connection with a clear error (the gateway keeps serving everyone else).

mod common;

use bytes::BytesMut;
use common::interop::TestGateway;
use matrix_interop_bridge::{
    bridge::msgconv,
    interop::GatewayConn,
    wire::{
        content::Content,
        noise::{self, StaticKey, next_record},
        pb::{self, ErrorCode, stanza::Body},
    },
};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::io::AsyncWriteExt;

#[test]
fn decoders_survive_random_and_mutated_input() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let valid = pb::Stanza {
        id: 7,
        body: Some(Body::Send(pb::Send {
            to: "+15550001111".into(),
            kind: 2,
            ciphertext: vec![1; 40],
            message_id: "m".into(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    for i in 0..20_000 {
        let mut data: Vec<u8> = if i % 2 == 0 {
            (0..rng.random_range(0..300))
                .map(|_| rng.random())
                .collect()
        } else {
            let mut v = valid.clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..v.len());
                v[at] = rng.random();
            }
            v
        };
        let _ = pb::Stanza::decode(&data[..]);
        let _ = Content::decode(&data[..]);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(rec)) = next_record(&mut buf) {
            let _ = pb::Stanza::decode(&rec[..]);
        }
        data.retain(|b| b.is_ascii());
        let html = String::from_utf8(data).expect("ascii");
        let t = msgconv::html_to_text(&html);
        let _ = msgconv::text_to_html(&t);
    }
}

async fn raw(
    gw: &TestGateway,
) -> (
    noise::SecureReader<tokio::io::ReadHalf<tokio::net::TcpStream>>,
    noise::SecureWriter<tokio::io::WriteHalf<tokio::net::TcpStream>>,
) {
    let tcp = tokio::net::TcpStream::connect(&gw.addr.address)
        .await
        .expect("tcp");
    noise::connect(tcp, &StaticKey::generate(), &gw.addr.public_key)
        .await
        .expect("handshake")
}

async fn expect_error_then_close(
    r: &mut noise::SecureReader<tokio::io::ReadHalf<tokio::net::TcpStream>>,
    code: ErrorCode,
) {
    let st = tokio::time::timeout(std::time::Duration::from_secs(5), r.read_stanza())
        .await
        .expect("answer")
        .expect("stanza");
    match st.body {
        Some(Body::Error(e)) => assert_eq!(e.code, code as i32, "{e:?}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), r.read_stanza())
        .await
        .expect("closed in time");
    assert!(next.is_err(), "the connection must be closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_lose_only_their_connection() {
    let gw = TestGateway::start().await;
    // A well-behaved client, connected before the hostile ones: it must outlive them all.
    let (bystander, _bystander_pushes) = GatewayConn::connect(&gw.addr).await.expect("connect");

    // Garbage instead of a handshake: that connection is closed, without an answer.
    let mut tcp = tokio::net::TcpStream::connect(&gw.addr.address)
        .await
        .expect("tcp");
    tcp.write_all(&[0, 3, 1, 2, 3, 0xff, 0xff])
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await
    .expect("the gateway must close a connection with a garbage handshake in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a garbage handshake must get no answer but a close: {read:?}"
    );
    // A wrong pinned key is refused on our side.
    let tcp2 = tokio::net::TcpStream::connect(&gw.addr.address)
        .await
        .expect("tcp");
    assert!(matches!(
        noise::connect(tcp2, &StaticKey::generate(), &StaticKey::generate().public).await,
        Err(noise::TransportError::KeyMismatch)
    ));

    // A record claiming to be larger than 1 MiB.
    let (mut r, mut w) = raw(&gw).await;
    w.write_record(&[])
        .await
        .expect("empty record is framed fine");
    w.flush().await.expect("flush");
    // An empty record is a stanza without a body (docs §4.4).
    expect_error_then_close(&mut r, ErrorCode::BadRequest).await;
    let (mut r, mut w) = raw(&gw).await;
    // Forge a length prefix of 2 MiB inside the encrypted stream: write a record whose first 4
    // bytes, as seen by the gateway, announce the oversized length.
    let mut huge = (2u32 * 1024 * 1024).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0u8; 16]);
    w.write_raw_stream(&huge).await.expect("write");
    w.flush().await.expect("flush");
    expect_error_then_close(&mut r, ErrorCode::TooLarge).await;

    // Bytes that are no stanza.
    let (mut r, mut w) = raw(&gw).await;
    w.write_record(&[0xff, 0xff, 0xff, 0x01])
        .await
        .expect("write");
    w.flush().await.expect("flush");
    expect_error_then_close(&mut r, ErrorCode::BadRequest).await;

    // A gateway-only stanza sent by a client.
    let (mut r, mut w) = raw(&gw).await;
    w.write_stanza(&pb::Stanza {
        id: 1,
        body: Some(Body::Envelope(pb::Envelope::default())),
    })
    .await
    .expect("write");
    w.flush().await.expect("flush");
    expect_error_then_close(&mut r, ErrorCode::BadRequest).await;

    // A request without an id.
    let (mut r, mut w) = raw(&gw).await;
    w.write_stanza(&pb::Stanza {
        id: 0,
        body: Some(Body::Ping(pb::Ping { nonce: 1 })),
    })
    .await
    .expect("write");
    w.flush().await.expect("flush");
    expect_error_then_close(&mut r, ErrorCode::BadRequest).await;

    // After all that, the gateway still serves well-behaved clients, old and new.
    assert!(matches!(
        bystander.request(Body::Ping(pb::Ping { nonce: 8 })).await,
        Ok(Body::Pong(pb::Pong { nonce: 8 }))
    ));
    let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    assert!(matches!(
        conn.request(Body::Ping(pb::Ping { nonce: 9 })).await,
        Ok(Body::Pong(pb::Pong { nonce: 9 }))
    ));
}

// ---- abuse: the reference gateway models a well-defended server ----------------------------

fn verify_body(account: &str, code: &str) -> Body {
    Body::Verify(pb::Verify {
        account: account.into(),
        code: code.into(),
    })
}

fn error_code(r: &Result<Body, matrix_interop_bridge::interop::InteropError>) -> Option<ErrorCode> {
    r.as_ref().err().and_then(|e| e.code())
}

/// The verification try budget holds across `Register`s and concurrent connections: no more than
/// 5 wrong codes are ever evaluated per window, and while locked even the right code is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_budget_holds_across_register_and_parallel_connections() {
    let gw = TestGateway::start_with(|c| c.limits.registrations_per_source = 1000).await;
    let account = common::interop::random_account();
    let mut wrong_evaluated = 0;
    let mut refused_locked = 0;
    for round in 0..20 {
        let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
        let _ = conn
            .request(Body::Register(pb::Register {
                account: account.clone(),
            }))
            .await;
        for i in 0..3 {
            let r = conn
                .request(verify_body(&account, &format!("9{round:02}{i:03}")))
                .await;
            match error_code(&r) {
                Some(ErrorCode::BadCode) => wrong_evaluated += 1,
                Some(ErrorCode::RateLimited) => refused_locked += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    // 50 wrong codes at once on 50 connections.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = gw.addr.clone();
        let account = account.clone();
        tasks.push(tokio::spawn(async move {
            let (conn, _p) = GatewayConn::connect(&addr).await.expect("connect");
            let r = conn
                .request(verify_body(&account, &format!("8{i:05}")))
                .await;
            error_code(&r)
        }));
    }
    for t in tasks {
        match t.await.expect("task") {
            Some(ErrorCode::BadCode) => wrong_evaluated += 1,
            Some(ErrorCode::RateLimited) => refused_locked += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(
        wrong_evaluated <= 5,
        "{wrong_evaluated} wrong codes were evaluated"
    );
    assert_eq!(wrong_evaluated + refused_locked, 110);
    // Locked: the right code is refused, and a new Register does not lift the lock.
    let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    let r = conn
        .request(verify_body(&account, common::interop::CODE))
        .await;
    assert_eq!(error_code(&r), Some(ErrorCode::RateLimited));
    let _ = conn
        .request(Body::Register(pb::Register {
            account: account.clone(),
        }))
        .await;
    let r = conn
        .request(verify_body(&account, common::interop::CODE))
        .await;
    assert_eq!(error_code(&r), Some(ErrorCode::RateLimited));
}

/// Each further lock-out of an account lasts twice as long as the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_lockouts_grow_exponentially() {
    let gw = TestGateway::start_with(|c| {
        c.limits.verify_lockout = std::time::Duration::from_millis(500);
        c.limits.verify_budget = 3;
    })
    .await;
    let account = common::interop::random_account();
    let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    let mut lockouts = Vec::new();
    for _ in 0..3 {
        conn.request_code(&account)
            .await
            .expect("register after the lock-out");
        for _ in 0..3 {
            let r = conn.request(verify_body(&account, "000001")).await;
            assert_eq!(error_code(&r), Some(ErrorCode::BadCode));
        }
        let retry = match conn
            .request(verify_body(&account, common::interop::CODE))
            .await
        {
            Err(matrix_interop_bridge::interop::InteropError::Gateway {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) => retry_after_ms,
            other => panic!("expected a lock-out, got {other:?}"),
        };
        lockouts.push(retry);
        tokio::time::sleep(std::time::Duration::from_millis(retry + 50)).await;
    }
    assert!(lockouts[0] <= 500, "{lockouts:?}");
    assert!(lockouts[1] > 500 && lockouts[1] <= 1000, "{lockouts:?}");
    assert!(lockouts[2] > 1000 && lockouts[2] <= 2000, "{lockouts:?}");
    // After the lock-out the right code works again.
    conn.request_code(&account).await.expect("register");
    conn.verify(&account, common::interop::CODE)
        .await
        .expect("verify");
}

/// A shared buffer the log is written to.
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Outside development mode a verification code reaches its delivery channel and never the log,
/// at any level; in development mode (codes to the log) the same capture does see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_codes_are_never_logged_outside_dev_mode() {
    let log = LogBuf::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .without_time()
        .with_ansi(false)
        .with_writer(log.clone())
        .init();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let gw = TestGateway::start_with(|c| c.codes = mib_gateway::CodeDelivery::Channel(tx)).await;
    let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    let mut codes = Vec::new();
    for _ in 0..3 {
        let account = common::interop::random_account();
        conn.request_code(&account).await.expect("register");
        let (_, code) = rx.recv().await.expect("code");
        let _ = conn.request(verify_body(&account, "000000")).await;
        conn.verify(&account, &code).await.expect("verify");
        codes.push(code.to_string());
    }
    let text = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
    assert!(!text.is_empty(), "the capture works");
    for code in &codes {
        assert!(!text.contains(code.as_str()), "code {code} in the log");
    }

    let dev = TestGateway::start_with(|c| c.codes = mib_gateway::CodeDelivery::DevLog).await;
    let (conn, _p) = GatewayConn::connect(&dev.addr).await.expect("connect");
    conn.request_code(&common::interop::random_account())
        .await
        .expect("register");
    let text = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
    assert!(text.contains("verification code (development mode)"));
}

/// A client that does not read is disconnected instead of having its stanzas buffered without
/// bound; its contacts see it go offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected() {
    let gw = TestGateway::start_with(|c| {
        c.limits.out_queue = 4;
        c.limits.slow_reader_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    // A reads everything; B logs in, says it is online, and then never reads again.
    let (a, mut a_pushes) = GatewayConn::connect(&gw.addr).await.expect("connect");
    let a_account = common::interop::random_account();
    a.request_code(&a_account).await.expect("register");
    let a_secret = a
        .verify(&a_account, common::interop::CODE)
        .await
        .expect("verify");
    a.login(&a_account, &a_secret, 0).await.expect("login");
    let (b, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    let b_account = common::interop::random_account();
    b.request_code(&b_account).await.expect("register");
    let b_secret = b
        .verify(&b_account, common::interop::CODE)
        .await
        .expect("verify");
    drop(b);
    let (mut r, mut w) = raw(&gw).await;
    for (id, body) in [
        (
            1,
            Body::Login(pb::Login {
                account: b_account.clone(),
                secret: b_secret,
                window: 0,
            }),
        ),
        (2, Body::SetPresence(pb::SetPresence { online: true })),
    ] {
        w.write_stanza(&pb::Stanza {
            id,
            body: Some(body),
        })
        .await
        .expect("write");
    }
    w.flush().await.expect("flush");
    // LoggedIn, QueueDrained, Ok: then B never reads again.
    for _ in 0..3 {
        r.read_stanza().await.expect("answer");
    }
    for i in 0..80 {
        let r = a
            .request(Body::Send(pb::Send {
                to: b_account.clone(),
                kind: pb::Kind::Message as i32,
                ciphertext: vec![0x42; 500 * 1024],
                message_id: format!("big{i}"),
                ..Default::default()
            }))
            .await;
        if r.is_err() {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = tokio::time::timeout_at(deadline, a_pushes.recv())
            .await
            .expect("B was not disconnected")
            .expect("A's connection");
        if let Some(Body::Presence(p)) = st.body
            && p.account == b_account
            && !p.online
        {
            break;
        }
    }
}
