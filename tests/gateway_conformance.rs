//! The reference gateway against docs/interop-protocol.md: one test per normative statement (each
//! MUST / MUST NOT / "→ ERROR_CODE"), named after the section that makes it. A client author should
//! be able to read this file next to the document and find every rule exercised.

mod common;

use std::time::Duration;

use common::interop::{CODE, TestGateway, random_account};
use libsignal_protocol::{GenericSignedPreKey, IdentityKeyPair, KeyPair, KyberPreKeyRecord, kem};
use matrix_interop_bridge::{
    interop::{GatewayConn, InteropError},
    wire::{
        noise::{self, SecureReader, SecureWriter, StaticKey},
        pb::{self, ErrorCode, stanza::Body},
    },
};
use mib_gateway::{CodeDelivery, GatewayConfig};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::mpsc,
};

type Pushes = mpsc::Receiver<Box<pb::Stanza>>;

const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for a push that must not come.
const QUIET: Duration = Duration::from_millis(600);

// ---- helpers -------------------------------------------------------------------------------

struct Client {
    conn: GatewayConn,
    pushes: Pushes,
    account: String,
    secret: Vec<u8>,
}

async fn connect(gw: &TestGateway) -> (GatewayConn, Pushes) {
    GatewayConn::connect(&gw.addr).await.expect("connect")
}

async fn register(conn: &GatewayConn, account: &str) -> Vec<u8> {
    conn.request_code(account).await.expect("register");
    conn.verify(account, CODE).await.expect("verify")
}

/// A new account, logged in, its (empty) queue drained.
async fn client(gw: &TestGateway) -> Client {
    let (conn, pushes) = connect(gw).await;
    let account = random_account();
    let secret = register(&conn, &account).await;
    login(gw, account, secret, conn, pushes).await
}

async fn login(
    _gw: &TestGateway,
    account: String,
    secret: Vec<u8>,
    conn: GatewayConn,
    mut pushes: Pushes,
) -> Client {
    conn.login(&account, &secret, 0).await.expect("login");
    expect_push(&mut pushes, |b| matches!(b, Body::QueueDrained(_))).await;
    Client {
        conn,
        pushes,
        account,
        secret,
    }
}

/// The same account on a new connection (the old one gets `CONFLICT`).
async fn again(gw: &TestGateway, c: &Client) -> Client {
    let (conn, pushes) = connect(gw).await;
    login(gw, c.account.clone(), c.secret.clone(), conn, pushes).await
}

fn code(r: Result<Body, InteropError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a gateway error: {e}")),
        Ok(b) => panic!("expected an error, got {b:?}"),
    }
}

fn gateway_error(r: Result<Body, InteropError>) -> (ErrorCode, u64) {
    match r {
        Err(InteropError::Gateway {
            code,
            retry_after_ms,
            ..
        }) => (code, retry_after_ms),
        other => panic!("expected a gateway error, got {other:?}"),
    }
}

async fn expect_push(p: &mut Pushes, pred: impl Fn(&Body) -> bool) -> Body {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = tokio::time::timeout_at(deadline, p.recv())
            .await
            .expect("timed out waiting for a push")
            .expect("connection closed");
        assert_eq!(st.id, 0, "pushes carry id 0");
        let body = st.body.expect("body");
        if pred(&body) {
            return body;
        }
    }
}

/// Whether no push matching `pred` arrives within `QUIET`.
async fn no_push(p: &mut Pushes, pred: impl Fn(&Body) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, p.recv()).await {
            Err(_) | Ok(None) => return true,
            Ok(Some(st)) => {
                if st.body.as_ref().is_some_and(&pred) {
                    return false;
                }
            }
        }
    }
}

fn send(to: &str, kind: pb::Kind, message_id: &str) -> Body {
    Body::Send(pb::Send {
        to: to.into(),
        group: String::new(),
        kind: kind as i32,
        ciphertext: vec![7; 16],
        message_id: message_id.into(),
        timestamp: 1_767_225_600_000,
    })
}

fn group_send(group: &str, message_id: &str) -> Body {
    Body::Send(pb::Send {
        group: group.into(),
        kind: pb::Kind::Group as i32,
        ciphertext: vec![7; 16],
        message_id: message_id.into(),
        ..Default::default()
    })
}

async fn create_group(c: &Client, members: &[&str]) -> pb::Group {
    match c
        .conn
        .request(Body::CreateGroup(pb::CreateGroup {
            name: "g".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }))
        .await
        .expect("create group")
    {
        Body::Group(g) => g,
        other => panic!("{other:?}"),
    }
}

fn receipt(to: &str) -> Body {
    Body::SendReceipt(pb::SendReceipt {
        to: to.into(),
        receipt: Some(pb::Receipt {
            r#type: pb::ReceiptType::Delivered as i32,
            message_ids: vec!["m".into()],
            group: String::new(),
        }),
    })
}

/// A valid key upload for a new identity.
fn keys(one_time: u32, kyber: u32) -> (pb::UploadKeys, IdentityKeyPair) {
    let mut rng = rand::rng();
    let ik = IdentityKeyPair::generate(&mut rng);
    let signed = KeyPair::generate(&mut rng);
    let sig = ik
        .private_key()
        .calculate_signature(&signed.public_key.serialize(), &mut rng)
        .expect("sign");
    let kyber_key = |id: u32| {
        let rec = KyberPreKeyRecord::generate(kem::KeyType::Kyber1024, id.into(), ik.private_key())
            .expect("kyber");
        pb::SignedKey {
            id,
            public_key: rec.public_key().expect("pk").serialize().to_vec(),
            signature: rec.signature().expect("sig").to_vec(),
        }
    };
    let up = pb::UploadKeys {
        identity_key: ik.identity_key().serialize().to_vec(),
        registration_id: 4711,
        signed_prekey: Some(pb::SignedKey {
            id: 1,
            public_key: signed.public_key.serialize().to_vec(),
            signature: sig.to_vec(),
        }),
        kyber_last_resort: Some(kyber_key(100_000)),
        one_time_prekeys: (1..=one_time)
            .map(|id| pb::PreKey {
                id,
                public_key: KeyPair::generate(&mut rng).public_key.serialize().to_vec(),
            })
            .collect(),
        kyber_prekeys: (1..=kyber).map(kyber_key).collect(),
    };
    (up, ik)
}

fn counts(b: Body) -> (u32, u32) {
    match b {
        Body::KeyCountsResult(k) => (k.one_time_prekeys, k.kyber_prekeys),
        other => panic!("{other:?}"),
    }
}

/// A connection below `GatewayConn`, to send what a well-behaved client would not.
struct Raw {
    r: SecureReader<ReadHalf<TcpStream>>,
    w: SecureWriter<WriteHalf<TcpStream>>,
}

async fn raw(gw: &TestGateway) -> Raw {
    let tcp = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    let (r, w) = noise::connect(tcp, &StaticKey::generate(), &gw.addr.public_key)
        .await
        .expect("handshake");
    Raw { r, w }
}

impl Raw {
    async fn send(&mut self, id: u64, body: Option<Body>) {
        self.w
            .write_stanza(&pb::Stanza { id, body })
            .await
            .expect("write");
        self.w.flush().await.expect("flush");
    }

    async fn recv(&mut self) -> pb::Stanza {
        tokio::time::timeout(WAIT, self.r.read_stanza())
            .await
            .expect("an answer in time")
            .expect("a stanza")
    }

    /// Reads until the gateway closes the connection; false if it stays open.
    async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.r.read_stanza()).await {
                Err(_) => return false,
                Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The error `want` for request `id`, then the gateway closes the connection.
    async fn expect_error_and_close(&mut self, id: u64, want: ErrorCode) {
        self.expect_error(id, want).await;
        assert!(self.closed().await, "still open after {want:?}");
    }

    async fn expect_error(&mut self, id: u64, want: ErrorCode) {
        let st = self.recv().await;
        assert_eq!(st.id, id);
        match st.body {
            Some(Body::Error(e)) => assert_eq!(e.code, want as i32, "{e:?}"),
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
}

/// A raw connection of a new account, registered and logged in (requests 1 to 3), its empty
/// queue drained.
async fn raw_logged_in(gw: &TestGateway) -> Raw {
    let mut c = raw(gw).await;
    let account = random_account();
    c.send(
        1,
        Some(Body::Register(pb::Register {
            account: account.clone(),
        })),
    )
    .await;
    c.recv().await;
    c.send(
        2,
        Some(Body::Verify(pb::Verify {
            account: account.clone(),
            code: CODE.into(),
        })),
    )
    .await;
    let Some(Body::Registered(r)) = c.recv().await.body else {
        panic!("registered")
    };
    c.send(
        3,
        Some(Body::Login(pb::Login {
            account,
            secret: r.secret,
            window: 0,
        })),
    )
    .await;
    c.recv().await; // LoggedIn
    c.recv().await; // QueueDrained
    c
}

/// Whether the gateway closes a plain TCP connection (reads EOF or reset) within `within`.
async fn tcp_closed(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

// ---- §1 Conventions ------------------------------------------------------------------------

#[tokio::test]
async fn s1_malformed_account_in_any_field_is_bad_request() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    for bad in [
        "4915550001111",
        "+1234567",
        "+1234567890123456",
        "+12345678a",
        "",
    ] {
        let r = c
            .conn
            .request(Body::Register(pb::Register {
                account: bad.into(),
            }))
            .await;
        assert_eq!(code(r), ErrorCode::BadRequest, "Register {bad}");
        let r = c
            .conn
            .request(Body::FetchBundle(pb::FetchBundle {
                account: bad.into(),
            }))
            .await;
        assert_eq!(code(r), ErrorCode::BadRequest, "FetchBundle {bad}");
        let r = c
            .conn
            .request(Body::GetProfile(pb::GetProfile {
                account: bad.into(),
            }))
            .await;
        assert_eq!(code(r), ErrorCode::BadRequest, "GetProfile {bad}");
        let r = c.conn.request(receipt(bad)).await;
        assert_eq!(code(r), ErrorCode::BadRequest, "SendReceipt {bad}");
    }
}

// ---- §2 Transport --------------------------------------------------------------------------

#[tokio::test]
async fn s2_frame_of_length_zero_closes_the_connection() {
    let gw = TestGateway::start().await;
    let mut tcp = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    tcp.write_all(&[0, 0]).await.expect("write");
    assert!(tcp_closed(&mut tcp, WAIT).await);
}

#[tokio::test]
async fn s2_handshake_message_of_wrong_length_closes_the_connection() {
    let gw = TestGateway::start().await;
    let mut tcp = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    let mut frame = vec![0, 31];
    frame.extend_from_slice(&[1u8; 31]);
    tcp.write_all(&frame).await.expect("write");
    assert!(tcp_closed(&mut tcp, WAIT).await);
}

#[tokio::test]
async fn s2_handshake_must_complete_within_the_deadline() {
    let gw = TestGateway::start_with(|c| c.limits.handshake_timeout = Duration::from_secs(1)).await;
    let mut tcp = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    // Message 1 and then nothing: the gateway answers with message 2 and waits for message 3.
    let mut frame = vec![0, 32];
    frame.extend_from_slice(&[9u8; 32]);
    tcp.write_all(&frame).await.expect("write");
    let started = std::time::Instant::now();
    assert!(tcp_closed(&mut tcp, Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(800));
}

/// Handshakes in progress are bounded: a connection beyond the bound waits its turn and is served
/// as soon as one ends, within its own deadline.
#[tokio::test]
async fn s2_handshakes_beyond_the_bound_wait_their_turn() {
    let gw = TestGateway::start_with(|c| c.limits.concurrent_handshakes = 1).await;
    // A client that opens a connection and says nothing holds the only permit.
    let silent = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = gw.addr.clone();
    let mut second = tokio::spawn(async move { GatewayConn::connect(&addr).await.map(|_| ()) });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "a second handshake ran beside the first"
    );
    drop(silent);
    tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("served once the first connection went away")
        .expect("task")
        .expect("connected");
}

#[tokio::test]
async fn s2_a_client_must_not_talk_to_a_gateway_with_another_key() {
    let gw = TestGateway::start().await;
    let tcp = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    let r = noise::connect(tcp, &StaticKey::generate(), &StaticKey::generate().public).await;
    assert!(matches!(r, Err(noise::TransportError::KeyMismatch)));
}

/// Runs the XX handshake by hand (to misbehave after it); `payload3` goes into message 3.
async fn handshake_by_hand(gw: &TestGateway, payload3: &[u8]) -> TcpStream {
    let params: snow::params::NoiseParams =
        "Noise_XX_25519_ChaChaPoly_BLAKE2b".parse().expect("params");
    let builder = snow::Builder::new(params.clone());
    let key = builder.generate_keypair().expect("key");
    let mut hs = snow::Builder::new(params)
        .local_private_key(&key.private)
        .prologue(b"interop/1")
        .build_initiator()
        .expect("initiator");
    let mut tcp = TcpStream::connect(&gw.addr.address).await.expect("tcp");
    let mut buf = vec![0u8; 65535];
    let frame = |n: usize, b: &[u8]| {
        let mut v = (n as u16).to_be_bytes().to_vec();
        v.extend_from_slice(&b[..n]);
        v
    };
    let n = hs.write_message(&[], &mut buf).expect("m1");
    tcp.write_all(&frame(n, &buf)).await.expect("write");
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await.expect("len");
    let mut m2 = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut m2).await.expect("m2");
    let mut payload = vec![0u8; 65535];
    hs.read_message(&m2, &mut payload).expect("read m2");
    assert_eq!(hs.get_remote_static(), Some(&gw.addr.public_key[..]));
    let n = hs.write_message(payload3, &mut buf).expect("m3");
    tcp.write_all(&frame(n, &buf)).await.expect("write");
    tcp
}

#[tokio::test]
async fn s2_a_non_empty_handshake_payload_is_rejected_by_closing() {
    let gw = TestGateway::start().await;
    let mut tcp = handshake_by_hand(&gw, b"hello").await;
    assert!(tcp_closed(&mut tcp, WAIT).await);
}

#[tokio::test]
async fn s2_a_transport_message_with_a_bad_tag_closes_at_once_without_an_answer() {
    let gw = TestGateway::start().await;
    let mut tcp = handshake_by_hand(&gw, &[]).await;
    let mut junk = vec![0, 40];
    junk.extend_from_slice(&[0x5a; 40]);
    tcp.write_all(&junk).await.expect("write");
    let mut got = Vec::new();
    let r = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "closed in time");
    assert!(got.is_empty(), "nothing is sent before closing");
}

// ---- §3 Records ----------------------------------------------------------------------------

#[tokio::test]
async fn s3_record_over_1_mib_gets_too_large_with_id_0_and_close() {
    let gw = TestGateway::start().await;
    let mut c = raw(&gw).await;
    let mut huge = (1_048_577u32).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0u8; 32]);
    c.w.write_raw_stream(&huge).await.expect("write");
    c.w.flush().await.expect("flush");
    c.expect_error_and_close(0, ErrorCode::TooLarge).await;
}

#[tokio::test]
async fn s3_records_may_share_and_span_transport_messages() {
    use prost::Message;
    let gw = TestGateway::start().await;
    let mut c = raw(&gw).await;
    // Two records in one transport message, then one record split over two.
    let rec = |id: u64| {
        let b = pb::Stanza {
            id,
            body: Some(Body::Ping(pb::Ping { nonce: id })),
        }
        .encode_to_vec();
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&b);
        v
    };
    let mut two = rec(1);
    two.extend(rec(2));
    c.w.write_raw_stream(&two).await.expect("write");
    let third = rec(3);
    c.w.write_raw_stream(&third[..3]).await.expect("write");
    c.w.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.w.write_raw_stream(&third[3..]).await.expect("write");
    c.w.flush().await.expect("flush");
    for id in 1..=3 {
        let st = c.recv().await;
        assert_eq!(st.id, id);
        assert_eq!(st.body, Some(Body::Pong(pb::Pong { nonce: id })));
    }
}

// ---- §4 Stanzas ----------------------------------------------------------------------------

#[tokio::test]
async fn s4_1_pipelined_requests_are_answered_once_each_in_order() {
    let gw = TestGateway::start().await;
    let mut c = raw(&gw).await;
    for id in [5u64, 3, 9, 4] {
        c.w.write_stanza(&pb::Stanza {
            id,
            body: Some(Body::Ping(pb::Ping { nonce: id * 10 })),
        })
        .await
        .expect("write");
    }
    c.w.flush().await.expect("flush");
    for id in [5u64, 3, 9, 4] {
        let st = c.recv().await;
        assert_eq!(st.id, id);
        assert_eq!(st.body, Some(Body::Pong(pb::Pong { nonce: id * 10 })));
    }
    assert!(
        tokio::time::timeout(QUIET, c.r.read_stanza())
            .await
            .is_err(),
        "exactly one answer per request"
    );
}

/// `Send`s pipelined on one connection go into the store together, but they are stored in the
/// order they came and answered in that order, also around other requests and refused `Send`s:
/// the gateway answers each request after all that came before it.
#[tokio::test]
async fn s4_1_pipelined_sends_are_stored_and_answered_in_order() {
    let gw = TestGateway::start().await;
    let mut bob = client(&gw).await;
    let mut c = raw_logged_in(&gw).await;
    // 40 sends, a ping, a send to nobody, one more send and a repeat, all written at once.
    let mut requests = Vec::new();
    for i in 0..40u64 {
        requests.push((
            10 + i,
            send(&bob.account, pb::Kind::Message, &format!("m{i}")),
        ));
    }
    requests.push((60, Body::Ping(pb::Ping { nonce: 60 })));
    requests.push((61, send("+15559999999", pb::Kind::Message, "nobody")));
    requests.push((62, send(&bob.account, pb::Kind::Message, "m40")));
    requests.push((63, send(&bob.account, pb::Kind::Message, "m0")));
    for (id, body) in &requests {
        c.w.write_stanza(&pb::Stanza {
            id: *id,
            body: Some(body.clone()),
        })
        .await
        .expect("write");
    }
    c.w.flush().await.expect("flush");
    let mut first_m0 = None;
    for (id, _) in &requests {
        let st = c.recv().await;
        assert_eq!(st.id, *id, "answers in request order");
        match (id, st.body) {
            (60, Some(Body::Pong(p))) => assert_eq!(p.nonce, 60),
            (61, Some(Body::Error(e))) => assert_eq!(e.code, ErrorCode::NotFound as i32),
            (63, Some(Body::Sent(s))) => {
                // A repeat of m0, answered as the first.
                assert_eq!(Some(s.server_timestamp), first_m0);
            }
            (_, Some(Body::Sent(s))) => {
                if s.message_id == "m0" {
                    first_m0 = Some(s.server_timestamp);
                }
                assert_eq!(s.recipients, 1);
            }
            (_, other) => panic!("request {id}: {other:?}"),
        }
    }
    // Stored in the order sent: bob gets m0..m40, each once.
    let mut got = Vec::new();
    while got.len() < 41 {
        if let Body::Envelope(e) =
            expect_push(&mut bob.pushes, |b| matches!(b, Body::Envelope(_))).await
        {
            got.push(e.message_id);
        }
    }
    let want: Vec<String> = (0..=40).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    assert!(
        no_push(&mut bob.pushes, |b| matches!(b, Body::Envelope(_))).await,
        "nothing more"
    );
}

#[tokio::test]
async fn s4_3_requests_before_login_get_unauthorized() {
    let gw = TestGateway::start().await;
    let other = client(&gw).await;
    let (conn, _p) = connect(&gw).await;
    let requests = [
        Body::KeyCounts(pb::KeyCounts {}),
        Body::FetchBundle(pb::FetchBundle {
            account: other.account.clone(),
        }),
        send(&other.account, pb::Kind::Message, "m1"),
        Body::Ack(pb::Ack {
            envelope_ids: vec![1],
        }),
        Body::SetPresence(pb::SetPresence { online: true }),
        Body::GetProfile(pb::GetProfile {
            account: other.account.clone(),
        }),
        Body::CreateGroup(pb::CreateGroup::default()),
        Body::BlobGet(pb::BlobGet::default()),
    ];
    for r in requests {
        assert_eq!(code(conn.request(r).await), ErrorCode::Unauthorized);
    }
    // Not processed: nothing reached the other account.
    let mut other = other;
    assert!(no_push(&mut other.pushes, |b| matches!(b, Body::Envelope(_))).await);
    // Register, Verify, Login and Ping are allowed.
    assert!(matches!(
        conn.request(Body::Ping(pb::Ping { nonce: 1 })).await,
        Ok(Body::Pong(_))
    ));
}

#[tokio::test]
async fn s4_3_second_login_on_a_logged_in_connection_is_bad_request() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let r = c
        .conn
        .request(Body::Login(pb::Login {
            account: c.account.clone(),
            secret: c.secret.clone(),
            window: 0,
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    // Register and Ping remain allowed after login.
    assert!(
        c.conn
            .request(Body::Ping(pb::Ping { nonce: 2 }))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn s4_4_undecodable_record_is_bad_request_with_id_0_and_close() {
    let gw = TestGateway::start().await;
    let mut c = raw(&gw).await;
    c.w.write_record(&[0xff, 0xff, 0xff, 0x01])
        .await
        .expect("write");
    c.w.flush().await.expect("flush");
    c.expect_error_and_close(0, ErrorCode::BadRequest).await;
}

/// A fresh connection that sends the one stanza `id` with `body` gets `BadRequest` for it, and
/// is closed.
async fn one_stanza_is_bad_request_and_close(id: u64, body: Option<Body>) {
    let gw = TestGateway::start().await;
    let mut c = raw(&gw).await;
    c.send(id, body).await;
    c.expect_error_and_close(id, ErrorCode::BadRequest).await;
}

#[tokio::test]
async fn s4_4_stanza_without_body_is_bad_request_and_close() {
    one_stanza_is_bad_request_and_close(4, None).await;
}

#[tokio::test]
async fn s4_4_gateway_to_client_body_from_a_client_is_bad_request_and_close() {
    one_stanza_is_bad_request_and_close(6, Some(Body::Pong(pb::Pong { nonce: 1 }))).await;
}

#[tokio::test]
async fn s4_4_request_other_than_ack_with_id_0_is_bad_request_and_close() {
    one_stanza_is_bad_request_and_close(0, Some(Body::Ping(pb::Ping { nonce: 1 }))).await;
}

#[tokio::test]
async fn s4_4_invalid_field_values_keep_the_connection_open() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let r = c
        .conn
        .request(Body::FetchBundle(pb::FetchBundle {
            account: "nope".into(),
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    assert!(
        c.conn
            .request(Body::Ping(pb::Ping { nonce: 1 }))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn s4_5_ping_is_answered_with_pong_of_the_same_nonce_and_id() {
    let gw = TestGateway::start().await;
    let mut c = raw(&gw).await;
    c.send(77, Some(Body::Ping(pb::Ping { nonce: 0xdead })))
        .await;
    let st = c.recv().await;
    assert_eq!(st.id, 77);
    assert_eq!(st.body, Some(Body::Pong(pb::Pong { nonce: 0xdead })));
}

#[tokio::test]
async fn s4_5_gateway_closes_a_connection_without_stanzas() {
    let gw = TestGateway::start_with(|c| c.idle_timeout = Duration::from_secs(1)).await;
    let mut c = raw(&gw).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn s4_6_empty_bucket_gets_rate_limited_with_retry_after_and_no_effect() {
    let gw = TestGateway::start_with(|c| {
        c.rate_capacity = 3.0;
        c.rate_per_sec = 1.0;
    })
    .await;
    let mut c = raw(&gw).await;
    for id in 1..=4u64 {
        c.w.write_stanza(&pb::Stanza {
            id,
            body: Some(Body::Ping(pb::Ping { nonce: id })),
        })
        .await
        .expect("write");
    }
    c.w.flush().await.expect("flush");
    for id in 1..=3 {
        assert!(matches!(c.recv().await.body, Some(Body::Pong(_))), "{id}");
    }
    let st = c.recv().await;
    assert_eq!(st.id, 4);
    match st.body {
        Some(Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::RateLimited as i32);
            assert!(e.retry_after_ms >= 1);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s4_6_rate_limited_id_0_ack_is_pushed_with_id_0_and_keeps_the_connection() {
    let gw = TestGateway::start_with(|c| {
        c.rate_capacity = 1.0;
        c.rate_per_sec = 0.5;
    })
    .await;
    let mut c = raw(&gw).await;
    let account = random_account();
    c.send(1, Some(Body::Register(pb::Register { account })))
        .await;
    // Bucket of 1: the Register took it; the id-0 Ack finds it empty.
    c.send(0, Some(Body::Ack(pb::Ack::default()))).await;
    assert!(matches!(c.recv().await.body, Some(Body::Ok(_))));
    let st = c.recv().await;
    assert_eq!(st.id, 0);
    assert!(matches!(st.body, Some(Body::Error(e)) if e.code == ErrorCode::RateLimited as i32));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    c.send(2, Some(Body::Ping(pb::Ping { nonce: 1 }))).await;
    assert!(matches!(c.recv().await.body, Some(Body::Pong(_))));
}

// ---- §5 Errors -----------------------------------------------------------------------------

#[tokio::test]
async fn s5_retry_after_is_set_only_with_rate_limited() {
    let gw = TestGateway::start().await;
    let (conn, _p) = connect(&gw).await;
    let (c, retry) = gateway_error(conn.request(Body::KeyCounts(pb::KeyCounts {})).await);
    assert_eq!(c, ErrorCode::Unauthorized);
    assert_eq!(retry, 0);
}

// ---- §6 Accounts ---------------------------------------------------------------------------

#[tokio::test]
async fn s6_1_register_is_ok_for_new_and_existing_accounts() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (conn, _p) = connect(&gw).await;
    assert!(conn.request_code(&c.account).await.is_ok());
    assert!(conn.request_code(&random_account()).await.is_ok());
}

#[tokio::test]
async fn s6_1_dev_mode_must_not_listen_beyond_loopback() {
    let mut cfg = GatewayConfig::new(
        StaticKey::generate(),
        "sqlite::memory:".into(),
        std::env::temp_dir(),
    );
    let any: std::net::SocketAddr = "0.0.0.0:29400".parse().expect("addr");
    let local: std::net::SocketAddr = "127.0.0.1:29400".parse().expect("addr");
    for dev in [CodeDelivery::DevLog, CodeDelivery::DevFixed(CODE.into())] {
        cfg.codes = dev;
        assert!(cfg.check_listen_addr(any).is_err());
        assert!(cfg.check_listen_addr(local).is_ok());
    }
    cfg.codes = CodeDelivery::Channel(mpsc::channel(1).0);
    assert!(cfg.check_listen_addr(any).is_ok());

    // The server itself refuses to serve such a listener.
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = GatewayConfig::new(
        StaticKey::generate(),
        format!("sqlite://{}", dir.path().join("g.db").display()),
        dir.path().join("blobs"),
    );
    cfg.codes = CodeDelivery::DevFixed(CODE.into());
    let gw = mib_gateway::Gateway::open(cfg).await.expect("open");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::time::timeout(WAIT, gw.serve(listener, rx))
        .await
        .expect("serve returns at once instead of serving");
}

#[tokio::test]
async fn s6_1_registrations_before_login_are_limited_per_source() {
    let gw = TestGateway::start_with(|c| c.limits.registrations_per_source = 3).await;
    for _ in 0..3 {
        let (conn, _p) = connect(&gw).await;
        conn.request_code(&random_account())
            .await
            .expect("within the limit");
    }
    let (conn, _p) = connect(&gw).await;
    let (c, retry) = gateway_error(
        conn.request(Body::Register(pb::Register {
            account: random_account(),
        }))
        .await,
    );
    assert_eq!(c, ErrorCode::RateLimited);
    assert!(retry >= 1);
}

#[tokio::test]
async fn s6_1_codes_are_not_logged_outside_dev_mode() {
    // Codes go to the delivery channel; the log is checked in tests/robustness.rs, which owns
    // the process-wide log subscriber.
    let (tx, mut rx) = mpsc::channel(4);
    let gw = TestGateway::start_with(|c| c.codes = CodeDelivery::Channel(tx)).await;
    let (conn, _p) = connect(&gw).await;
    let account = random_account();
    conn.request_code(&account).await.expect("register");
    let (to, code_sent) = rx.recv().await.expect("a code");
    assert_eq!(to, account);
    assert_eq!(code_sent.len(), 6);
    conn.verify(&account, &code_sent)
        .await
        .expect("the delivered code works");
}

#[tokio::test]
async fn s6_2_verify_without_a_pending_code_is_bad_code() {
    let gw = TestGateway::start().await;
    let (conn, _p) = connect(&gw).await;
    let r = conn
        .request(Body::Verify(pb::Verify {
            account: random_account(),
            code: CODE.into(),
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadCode);
}

#[tokio::test]
async fn s6_2_an_expired_code_is_code_expired_and_dropped() {
    let gw = TestGateway::start_with(|c| c.limits.code_ttl = Duration::from_millis(300)).await;
    let (conn, _p) = connect(&gw).await;
    let account = random_account();
    conn.request_code(&account).await.expect("register");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let verify = || {
        conn.request(Body::Verify(pb::Verify {
            account: account.clone(),
            code: CODE.into(),
        }))
    };
    assert_eq!(code(verify().await), ErrorCode::CodeExpired);
    assert_eq!(
        code(verify().await),
        ErrorCode::BadCode,
        "the code was dropped"
    );
}

#[tokio::test]
async fn s6_2_a_code_is_consumed_by_its_use() {
    let gw = TestGateway::start().await;
    let (conn, _p) = connect(&gw).await;
    let account = random_account();
    register(&conn, &account).await;
    let r = conn
        .request(Body::Verify(pb::Verify {
            account,
            code: CODE.into(),
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadCode);
}

#[tokio::test]
async fn s6_2_wrong_codes_exhaust_the_budget_and_lock_even_the_right_code() {
    let gw = TestGateway::start().await;
    let (conn, _p) = connect(&gw).await;
    let account = random_account();
    conn.request_code(&account).await.expect("register");
    for _ in 0..5 {
        let r = conn
            .request(Body::Verify(pb::Verify {
                account: account.clone(),
                code: "000001".into(),
            }))
            .await;
        assert_eq!(code(r), ErrorCode::BadCode);
    }
    let (c, retry) = gateway_error(
        conn.request(Body::Verify(pb::Verify {
            account: account.clone(),
            code: CODE.into(),
        }))
        .await,
    );
    assert_eq!(c, ErrorCode::RateLimited);
    assert!(retry > 60_000, "locked for minutes, got {retry} ms");
    // Register does not lift it.
    let (c, _) = gateway_error(
        conn.request(Body::Register(pb::Register {
            account: account.clone(),
        }))
        .await,
    );
    assert_eq!(c, ErrorCode::RateLimited);
}

#[tokio::test]
async fn s6_2_reregistration_closes_old_sessions_with_unauthorized_and_keeps_the_queue() {
    let gw = TestGateway::start().await;
    let mut old = client(&gw).await;
    let sender = client(&gw).await;
    sender
        .conn
        .request(send(&old.account, pb::Kind::Message, "kept"))
        .await
        .expect("send");
    expect_push(&mut old.pushes, |b| matches!(b, Body::Envelope(_))).await;
    let (conn, pushes) = connect(&gw).await;
    let secret = register(&conn, &old.account).await;
    let e = expect_push(&mut old.pushes, |b| matches!(b, Body::Error(_))).await;
    assert!(matches!(e, Body::Error(e) if e.code == ErrorCode::Unauthorized as i32));
    assert!(
        tokio::time::timeout(WAIT, old.pushes.recv())
            .await
            .expect("closed in time")
            .is_none()
    );
    // The old secret stops working; the new one sees the unacked envelope again.
    let (c2, _p2) = connect(&gw).await;
    assert_eq!(
        code(
            c2.request(Body::Login(pb::Login {
                account: old.account.clone(),
                secret: old.secret.clone(),
                window: 0,
            }))
            .await
        ),
        ErrorCode::Unauthorized
    );
    let logged = conn.login(&old.account, &secret, 0).await.expect("login");
    assert_eq!(logged.queued, 1);
    drop(pushes);
}

#[tokio::test]
async fn s6_3_unknown_account_or_wrong_secret_is_unauthorized() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (conn, _p) = connect(&gw).await;
    for (account, secret) in [
        (random_account(), vec![0u8; 32]),
        (c.account.clone(), vec![1u8; 32]),
    ] {
        let r = conn
            .request(Body::Login(pb::Login {
                account,
                secret,
                window: 0,
            }))
            .await;
        assert_eq!(code(r), ErrorCode::Unauthorized);
    }
}

#[tokio::test]
async fn s6_3_logged_in_reports_queue_and_one_time_key_counts() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let (b, secret) = offline_account(&gw).await;
    queue_messages(&a, &b, 2).await;
    let (conn, _p) = connect(&gw).await;
    conn.login(&b, &secret, 0).await.expect("login");
    let (up, _) = keys(3, 2);
    conn.request(Body::UploadKeys(up)).await.expect("upload");
    let (conn2, _p2) = connect(&gw).await;
    let logged = conn2.login(&b, &secret, 0).await.expect("login");
    assert_eq!(
        (
            logged.account.as_str(),
            logged.queued,
            logged.one_time_prekeys,
            logged.kyber_prekeys
        ),
        (b.as_str(), 2, 3, 2),
        "the last-resort key is not counted"
    );
}

#[tokio::test]
async fn s6_3_a_newer_login_sends_conflict_to_the_older_connection_and_closes_it() {
    let gw = TestGateway::start().await;
    let mut first = client(&gw).await;
    let _second = again(&gw, &first).await;
    let e = expect_push(&mut first.pushes, |b| matches!(b, Body::Error(_))).await;
    assert!(matches!(e, Body::Error(e) if e.code == ErrorCode::Conflict as i32));
    assert!(
        tokio::time::timeout(WAIT, first.pushes.recv())
            .await
            .expect("closed in time")
            .is_none()
    );
}

// ---- §7 Envelopes --------------------------------------------------------------------------

/// `n` messages from `from` to `to`, stored while `to` is offline.
async fn queue_messages(from: &Client, to: &str, n: usize) {
    for i in 0..n {
        from.conn
            .request(send(to, pb::Kind::Message, &format!("q{i}")))
            .await
            .expect("send");
    }
}

async fn offline_account(gw: &TestGateway) -> (String, Vec<u8>) {
    let (conn, _p) = connect(gw).await;
    let account = random_account();
    let secret = register(&conn, &account).await;
    (account, secret)
}

#[tokio::test]
async fn s7_queue_is_pushed_in_storage_order_then_queue_drained_once() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let (b, secret) = offline_account(&gw).await;
    queue_messages(&a, &b, 3).await;
    let (conn, mut pushes) = connect(&gw).await;
    let logged = conn.login(&b, &secret, 0).await.expect("login");
    assert_eq!(logged.queued, 3);
    let mut last = 0;
    for i in 0..3 {
        match expect_push(&mut pushes, |_| true).await {
            Body::Envelope(e) => {
                assert!(e.id > last, "increasing ids");
                last = e.id;
                assert_eq!(e.message_id, format!("q{i}"));
                assert_eq!(
                    (e.from.as_str(), e.to.as_str()),
                    (a.account.as_str(), b.as_str())
                );
                assert_eq!(e.timestamp, 1_767_225_600_000, "the sender's timestamp");
                assert!(e.group.is_empty() && e.receipt.is_none());
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        expect_push(&mut pushes, |_| true).await,
        Body::QueueDrained(pb::QueueDrained { delivered: 3 })
    ));
    // Later envelopes are pushed as they are stored; no second QueueDrained.
    a.conn
        .request(send(&b, pb::Kind::Message, "later"))
        .await
        .expect("send");
    assert!(matches!(
        expect_push(&mut pushes, |_| true).await,
        Body::Envelope(_)
    ));
    assert!(no_push(&mut pushes, |b| matches!(b, Body::QueueDrained(_))).await);
}

#[tokio::test]
async fn s7_a_window_keeps_at_most_that_many_envelopes_unacked() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let (b, secret) = offline_account(&gw).await;
    queue_messages(&a, &b, 5).await;
    let (conn, mut pushes) = connect(&gw).await;
    let logged = conn.login(&b, &secret, 2).await.expect("login");
    assert_eq!(logged.queued, 5);
    let mut ids = Vec::new();
    for _ in 0..2 {
        match expect_push(&mut pushes, |_| true).await {
            Body::Envelope(e) => ids.push(e.id),
            other => panic!("{other:?}"),
        }
    }
    // Two in flight: nothing more until an ack.
    assert!(no_push(&mut pushes, |b| matches!(b, Body::Envelope(_))).await);
    // The gateway's report of its connections says so (what a stalled delivery is read from).
    let state = |all: Vec<mib_gateway::ConnectionState>| {
        all.into_iter()
            .find(|c| c.account == b)
            .expect("b's connection is listed")
    };
    let waiting = state(gw.gateway.connections().await);
    assert_eq!(
        (waiting.pushed, waiting.in_flight, waiting.window),
        (2, 2, 2),
        "{waiting}"
    );
    assert_eq!(waiting.delivery, "waiting for acks (window full)");
    // Acking an id that is not in flight frees nothing.
    conn.request(Body::Ack(pb::Ack {
        envelope_ids: vec![ids[1] + 1000],
    }))
    .await
    .expect("ack");
    assert!(no_push(&mut pushes, |b| matches!(b, Body::Envelope(_))).await);
    conn.request(Body::Ack(pb::Ack {
        envelope_ids: vec![ids[0]],
    }))
    .await
    .expect("ack");
    match expect_push(&mut pushes, |_| true).await {
        Body::Envelope(e) => assert_eq!(e.message_id, "q2"),
        other => panic!("{other:?}"),
    }
    assert!(no_push(&mut pushes, |b| matches!(b, Body::Envelope(_))).await);
    // Acking the rest lets the queue drain, in order.
    let mut seen = vec!["q0".to_owned(), "q1".to_owned(), "q2".to_owned()];
    let mut in_flight = vec![ids[1]];
    while seen.len() < 5 {
        conn.request(Body::Ack(pb::Ack {
            envelope_ids: std::mem::take(&mut in_flight),
        }))
        .await
        .expect("ack");
        match expect_push(&mut pushes, |b| matches!(b, Body::Envelope(_))).await {
            Body::Envelope(e) => {
                in_flight.push(e.id);
                seen.push(e.message_id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, ["q0", "q1", "q2", "q3", "q4"]);
    // In flight at the end: q2 (never acked here) and q4.
    let done = state(gw.gateway.connections().await);
    assert_eq!((done.pushed, done.in_flight), (5, 2), "{done}");
}

#[tokio::test]
async fn s7_envelope_timestamp_is_the_senders_even_when_zero() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let Body::Send(mut s) = send(&b.account, pb::Kind::Message, "t0") else {
        unreachable!()
    };
    s.timestamp = 0;
    a.conn.request(Body::Send(s)).await.expect("send");
    match expect_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await {
        Body::Envelope(e) => {
            assert_eq!(e.timestamp, 0);
            assert!(e.server_timestamp > 0);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s7_unacked_envelopes_are_redelivered_after_the_next_login_only() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    queue_messages(&a, &b.account, 2).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        if let Body::Envelope(e) =
            expect_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await
        {
            ids.push(e.id);
        }
    }
    assert!(no_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await);
    b.conn
        .request(Body::Ack(pb::Ack {
            envelope_ids: vec![ids[0], 999_999_999],
        }))
        .await
        .expect("ack answers Ok, unknown ids ignored");
    drop(b.conn);
    let (conn, mut pushes) = connect(&gw).await;
    let logged = conn.login(&b.account, &b.secret, 0).await.expect("login");
    assert_eq!(logged.queued, 1);
    match expect_push(&mut pushes, |b| matches!(b, Body::Envelope(_))).await {
        Body::Envelope(e) => assert_eq!(e.id, ids[1]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s7_ack_of_someone_elses_envelope_is_ignored() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    queue_messages(&a, &b.account, 1).await;
    let Body::Envelope(e) = expect_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await
    else {
        unreachable!()
    };
    a.conn
        .request(Body::Ack(pb::Ack {
            envelope_ids: vec![e.id],
        }))
        .await
        .expect("ok");
    let (conn, _p) = connect(&gw).await;
    assert_eq!(
        conn.login(&b.account, &b.secret, 0)
            .await
            .expect("login")
            .queued,
        1
    );
}

#[tokio::test]
async fn s7_ack_with_id_0_gets_no_answer() {
    let gw = TestGateway::start().await;
    let mut c = raw_logged_in(&gw).await;
    c.send(
        0,
        Some(Body::Ack(pb::Ack {
            envelope_ids: vec![1],
        })),
    )
    .await;
    c.send(4, Some(Body::Ping(pb::Ping { nonce: 4 }))).await;
    let st = c.recv().await;
    assert_eq!(st.id, 4, "the id-0 Ack was not answered");
}

#[tokio::test]
async fn s7_an_ack_over_the_batch_limit_is_bad_request_and_acks_nothing() {
    let gw = TestGateway::start_with(|c| c.limits.ack_max_ids = 3).await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    queue_messages(&a, &b.account, 1).await;
    let Body::Envelope(e) = expect_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await
    else {
        unreachable!()
    };
    let r = b
        .conn
        .request(Body::Ack(pb::Ack {
            envelope_ids: vec![e.id, 1, 2, 3],
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    let (conn, _p) = connect(&gw).await;
    assert_eq!(
        conn.login(&b.account, &b.secret, 0)
            .await
            .expect("login")
            .queued,
        1
    );
}

#[tokio::test]
async fn s7_envelopes_expire_after_the_configured_lifetime() {
    let gw = TestGateway::start_with(|c| c.limits.envelope_ttl = Duration::from_secs(1)).await;
    let a = client(&gw).await;
    let (b, secret) = offline_account(&gw).await;
    queue_messages(&a, &b, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (conn, mut pushes) = connect(&gw).await;
    assert_eq!(conn.login(&b, &secret, 0).await.expect("login").queued, 0);
    assert!(matches!(
        expect_push(&mut pushes, |_| true).await,
        Body::QueueDrained(pb::QueueDrained { delivered: 0 })
    ));
}

// ---- §8 Key directory ----------------------------------------------------------------------

#[tokio::test]
async fn s8_1_bad_identity_key_or_registration_id_is_bad_request() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (mut up, _) = keys(1, 1);
    up.identity_key[0] = 0x06;
    assert_eq!(
        code(c.conn.request(Body::UploadKeys(up)).await),
        ErrorCode::BadRequest
    );
    for reg in [0, 16384] {
        let (mut up, _) = keys(1, 1);
        up.registration_id = reg;
        assert_eq!(
            code(c.conn.request(Body::UploadKeys(up)).await),
            ErrorCode::BadRequest
        );
    }
}

#[tokio::test]
async fn s8_1_sizes_are_checked_before_signatures_and_nothing_is_stored() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (mut up, _) = keys(2, 1);
    up.signed_prekey.as_mut().expect("signed").signature = vec![0; 64];
    up.one_time_prekeys[1].public_key.pop();
    match c.conn.request(Body::UploadKeys(up.clone())).await {
        Err(InteropError::Gateway { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert_ne!(message, "bad signature", "the size check comes first");
        }
        other => panic!("{other:?}"),
    }
    up.one_time_prekeys.pop();
    match c.conn.request(Body::UploadKeys(up)).await {
        Err(InteropError::Gateway { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert_eq!(message, "bad signature");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        counts(
            c.conn
                .request(Body::KeyCounts(pb::KeyCounts {}))
                .await
                .expect("counts")
        ),
        (0, 0)
    );
}

#[tokio::test]
async fn s8_1_first_upload_without_signed_key_or_with_kyber_but_no_last_resort_is_bad_request() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (mut up, _) = keys(1, 0);
    up.signed_prekey = None;
    assert_eq!(
        code(c.conn.request(Body::UploadKeys(up)).await),
        ErrorCode::BadRequest
    );
    let (mut up, _) = keys(1, 2);
    up.kyber_last_resort = None;
    assert_eq!(
        code(c.conn.request(Body::UploadKeys(up)).await),
        ErrorCode::BadRequest
    );
}

/// An X3DH-era client uploads no Kyber keys at all: accepted, and its bundles carry no Kyber
/// prekey; nobody is pushed about missing Kyber keys.
#[tokio::test]
async fn s8_1_an_account_without_kyber_keys_has_bundles_without_one() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let (mut up, _) = keys(20, 0);
    up.kyber_last_resort = None;
    assert_eq!(
        counts(b.conn.request(Body::UploadKeys(up)).await.expect("upload")),
        (20, 0)
    );
    let bundle = match a
        .conn
        .request(Body::FetchBundle(pb::FetchBundle {
            account: b.account.clone(),
        }))
        .await
        .expect("bundle")
    {
        Body::Bundle(bundle) => bundle,
        other => panic!("{other:?}"),
    };
    assert!(bundle.kyber_prekey.is_none());
    assert!(bundle.one_time_prekey.is_some() && bundle.signed_prekey.is_some());
    assert!(
        tokio::time::timeout(QUIET, b.pushes.recv()).await.is_err(),
        "19 one-time EC keys are enough: no PrekeysLow for Kyber keys it never had"
    );
}

#[tokio::test]
async fn s8_1_more_than_1000_one_time_keys_is_bad_request_counting_replaced_ids_once() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (up, _) = keys(1000, 0);
    let again_up = up.clone();
    assert_eq!(
        counts(c.conn.request(Body::UploadKeys(up)).await.expect("upload")),
        (1000, 0)
    );
    // The same ids again replace the stored keys: still 1000.
    assert_eq!(
        counts(
            c.conn
                .request(Body::UploadKeys(again_up.clone()))
                .await
                .expect("re-upload")
        ),
        (1000, 0)
    );
    let mut more = again_up;
    more.one_time_prekeys = vec![pb::PreKey {
        id: 5000,
        public_key: more.one_time_prekeys[0].public_key.clone(),
    }];
    assert_eq!(
        code(c.conn.request(Body::UploadKeys(more)).await),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn s8_1_a_new_identity_key_drops_every_stored_prekey() {
    let gw = TestGateway::start().await;
    let c = client(&gw).await;
    let (up, _) = keys(5, 5);
    c.conn.request(Body::UploadKeys(up)).await.expect("upload");
    let (up, _) = keys(1, 0);
    assert_eq!(
        counts(c.conn.request(Body::UploadKeys(up)).await.expect("upload")),
        (1, 0)
    );
}

#[tokio::test]
async fn s8_2_unknown_account_or_no_keys_is_not_found() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    for account in [random_account(), b.account.clone()] {
        let r = a
            .conn
            .request(Body::FetchBundle(pb::FetchBundle { account }))
            .await;
        assert_eq!(code(r), ErrorCode::NotFound);
    }
}

#[tokio::test]
async fn s8_2_bundle_takes_the_oldest_one_time_keys_and_keeps_the_last_resort() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let (up, _) = keys(1, 1);
    let last_resort = up.kyber_last_resort.clone().expect("lr");
    b.conn.request(Body::UploadKeys(up)).await.expect("upload");
    let fetch = || {
        a.conn.request(Body::FetchBundle(pb::FetchBundle {
            account: b.account.clone(),
        }))
    };
    let Body::Bundle(first) = fetch().await.expect("bundle") else {
        panic!()
    };
    assert_eq!(first.device_id, 1);
    assert_eq!(first.registration_id, 4711);
    assert_eq!(first.one_time_prekey.map(|k| k.id), Some(1));
    assert_eq!(first.kyber_prekey.as_ref().map(|k| k.id), Some(1));
    // Below 10 after every fetch: the owner hears of it each time.
    expect_push(&mut b.pushes, |b| matches!(b, Body::PrekeysLow(_))).await;
    let Body::Bundle(second) = fetch().await.expect("bundle") else {
        panic!()
    };
    assert!(second.one_time_prekey.is_none());
    assert_eq!(second.kyber_prekey, Some(last_resort.clone()));
    let Body::Bundle(third) = fetch().await.expect("bundle") else {
        panic!()
    };
    assert_eq!(
        third.kyber_prekey,
        Some(last_resort),
        "the last-resort key is kept"
    );
    match expect_push(&mut b.pushes, |b| matches!(b, Body::PrekeysLow(_))).await {
        Body::PrekeysLow(l) => assert_eq!((l.one_time_prekeys, l.kyber_prekeys), (0, 0)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s8_2_bundle_fetches_of_one_account_are_rate_limited() {
    let gw = TestGateway::start_with(|c| c.limits.bundle_fetches_per_target = 3).await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let c = client(&gw).await;
    let (up, _) = keys(10, 10);
    b.conn.request(Body::UploadKeys(up)).await.expect("upload");
    let fetch = |who: &Client| {
        let conn = who.conn.clone();
        let account = b.account.clone();
        async move {
            conn.request(Body::FetchBundle(pb::FetchBundle { account }))
                .await
        }
    };
    for _ in 0..3 {
        fetch(&a).await.expect("within the limit");
    }
    // The fourth fetch by the same client is refused and consumes no key.
    let (e, retry) = gateway_error(fetch(&a).await);
    assert_eq!(e, ErrorCode::RateLimited);
    assert!(retry >= 1);
    assert_eq!(
        counts(
            b.conn
                .request(Body::KeyCounts(pb::KeyCounts {}))
                .await
                .expect("counts")
        ),
        (7, 7)
    );
    // Another client still starts its session with b: one client cannot lock b away.
    fetch(&c)
        .await
        .expect("another fetcher is not limited by the first");
}

// ---- §9 Sending ----------------------------------------------------------------------------

#[tokio::test]
async fn s9_common_checks_are_bad_request() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let base = |f: &dyn Fn(&mut pb::Send)| {
        let Body::Send(mut s) = send(&b.account, pb::Kind::Message, "m") else {
            unreachable!()
        };
        f(&mut s);
        Body::Send(s)
    };
    let cases: Vec<Body> = vec![
        base(&|s: &mut pb::Send| s.kind = pb::Kind::Receipt as i32),
        base(&|s: &mut pb::Send| s.kind = 0),
        base(&|s: &mut pb::Send| s.ciphertext.clear()),
        base(&|s: &mut pb::Send| s.message_id.clear()),
        base(&|s: &mut pb::Send| s.message_id = "x".repeat(129)),
    ];
    for c in cases {
        assert_eq!(code(a.conn.request(c).await), ErrorCode::BadRequest);
    }
    a.conn
        .request(base(&|s: &mut pb::Send| s.message_id = "x".repeat(128)))
        .await
        .expect("128 bytes are fine");
}

#[tokio::test]
async fn s9_message_to_self_or_a_malformed_account_is_bad_request() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    for to in [a.account.as_str(), "+12", ""] {
        assert_eq!(
            code(a.conn.request(send(to, pb::Kind::Prekey, "m")).await),
            ErrorCode::BadRequest
        );
    }
}

#[tokio::test]
async fn s9_message_with_group_is_refused() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    for kind in [pb::Kind::Message, pb::Kind::Prekey] {
        let Body::Send(mut s) = send(&b.account, kind, "mg") else {
            unreachable!()
        };
        s.group = g.id.clone();
        assert_eq!(
            code(a.conn.request(Body::Send(s)).await),
            ErrorCode::BadRequest
        );
    }
    assert!(no_push(&mut b.pushes, |b| matches!(b, Body::Envelope(e) if e.kind == pb::Kind::Message as i32 || e.kind == pb::Kind::Prekey as i32)).await);
}

#[tokio::test]
async fn s9_group_send_with_to_or_without_group_is_refused() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    let Body::Send(mut s) = group_send(&g.id, "g1") else {
        unreachable!()
    };
    s.to = b.account.clone();
    assert_eq!(
        code(a.conn.request(Body::Send(s)).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.conn.request(group_send("", "g2")).await),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn s9_unknown_recipient_is_not_found() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    assert_eq!(
        code(
            a.conn
                .request(send(&random_account(), pb::Kind::Message, "m"))
                .await
        ),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn s9_group_send_to_unknown_group_or_by_non_member() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let outsider = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    assert_eq!(
        code(a.conn.request(group_send(&"0".repeat(32), "g")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(outsider.conn.request(group_send(&g.id, "g")).await),
        ErrorCode::NotMember
    );
}

#[tokio::test]
async fn s9_group_send_stores_one_envelope_per_other_member() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let c = client(&gw).await;
    let g = create_group(&a, &[&b.account, &c.account]).await;
    let Ok(Body::Sent(sent)) = a.conn.request(group_send(&g.id, "g1")).await else {
        panic!("sent")
    };
    assert_eq!(sent.recipients, 2);
    match expect_push(
        &mut b.pushes,
        |b| matches!(b, Body::Envelope(e) if e.kind == pb::Kind::Group as i32),
    )
    .await
    {
        Body::Envelope(e) => {
            assert_eq!(e.group, g.id);
            assert_eq!(e.to, b.account);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s9_send_is_idempotent_per_sender_and_message_id() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let Ok(Body::Sent(first)) = a
        .conn
        .request(send(&b.account, pb::Kind::Message, "same"))
        .await
    else {
        panic!()
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let Body::Send(mut s) = send(&b.account, pb::Kind::Prekey, "same") else {
        unreachable!()
    };
    s.ciphertext = vec![1; 99];
    let Ok(Body::Sent(second)) = a.conn.request(Body::Send(s)).await else {
        panic!()
    };
    assert_eq!(first, second);
    expect_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await;
    assert!(no_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await);
    // The checks still apply first.
    assert_eq!(
        code(
            a.conn
                .request(send(&a.account, pb::Kind::Message, "same"))
                .await
        ),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn s9_send_to_a_full_queue_is_queue_full_and_group_fanout_skips_it() {
    let gw = TestGateway::start_with(|c| c.limits.queue_max = 2).await;
    let a = client(&gw).await;
    let c = client(&gw).await;
    let (b, _secret) = offline_account(&gw).await;
    queue_messages(&a, &b, 2).await;
    assert_eq!(
        code(a.conn.request(send(&b, pb::Kind::Message, "over")).await),
        ErrorCode::QueueFull
    );
    assert_eq!(
        code(c.conn.request(receipt(&b)).await),
        ErrorCode::QueueFull
    );
    // The refused message id is not remembered: a later resend is a new send.
    let g = create_group(&c, &[&a.account, &b]).await;
    let Ok(Body::Sent(sent)) = c.conn.request(group_send(&g.id, "g")).await else {
        panic!()
    };
    assert_eq!(sent.recipients, 1, "only the member with room in its queue");
}

// ---- §10 Receipts, typing, presence --------------------------------------------------------

#[tokio::test]
async fn s10_1_receipt_checks() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let with = |f: &dyn Fn(&mut pb::Receipt)| {
        let Body::SendReceipt(mut r) = receipt(&b.account) else {
            unreachable!()
        };
        f(r.receipt.as_mut().expect("receipt"));
        Body::SendReceipt(r)
    };
    for bad in [
        with(&|r: &mut pb::Receipt| r.r#type = 0),
        with(&|r: &mut pb::Receipt| r.message_ids.clear()),
        with(&|r: &mut pb::Receipt| r.message_ids = vec!["m".into(); 1001]),
    ] {
        assert_eq!(code(a.conn.request(bad).await), ErrorCode::BadRequest);
    }
    assert_eq!(
        code(a.conn.request(receipt(&random_account())).await),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn s10_1_receipt_envelope_has_empty_group_message_id_and_ciphertext() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let Body::SendReceipt(mut r) = receipt(&b.account) else {
        unreachable!()
    };
    r.receipt.as_mut().expect("receipt").group = "ab".repeat(16);
    a.conn.request(Body::SendReceipt(r)).await.expect("receipt");
    match expect_push(&mut b.pushes, |b| matches!(b, Body::Envelope(_))).await {
        Body::Envelope(e) => {
            assert_eq!(e.kind, pb::Kind::Receipt as i32);
            assert!(
                e.group.is_empty(),
                "envelope group is for GROUP and GROUP_UPDATE only"
            );
            assert!(e.message_id.is_empty() && e.ciphertext.is_empty());
            assert_eq!(e.timestamp, e.server_timestamp);
            assert_eq!(e.receipt.expect("receipt").group, "ab".repeat(16));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s10_2_typing_needs_exactly_one_target() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    for (to, group) in [
        (b.account.clone(), g.id.clone()),
        (String::new(), String::new()),
    ] {
        let r = a
            .conn
            .request(Body::SendTyping(pb::SendTyping {
                to,
                group,
                typing: true,
            }))
            .await;
        assert_eq!(code(r), ErrorCode::BadRequest);
    }
    let outsider = client(&gw).await;
    let r = outsider
        .conn
        .request(Body::SendTyping(pb::SendTyping {
            to: String::new(),
            group: g.id.clone(),
            typing: true,
        }))
        .await;
    assert_eq!(code(r), ErrorCode::NotMember);
    let r = a
        .conn
        .request(Body::SendTyping(pb::SendTyping {
            to: random_account(),
            group: String::new(),
            typing: true,
        }))
        .await;
    assert_eq!(code(r), ErrorCode::NotFound);
}

#[tokio::test]
async fn s10_2_typing_reaches_connected_members_and_is_never_stored() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    a.conn
        .request(Body::SendTyping(pb::SendTyping {
            to: String::new(),
            group: g.id.clone(),
            typing: true,
        }))
        .await
        .expect("typing");
    match expect_push(&mut b.pushes, |b| matches!(b, Body::Typing(_))).await {
        Body::Typing(t) => assert_eq!(
            (t.from, t.group, t.typing),
            (a.account.clone(), g.id.clone(), true)
        ),
        other => panic!("{other:?}"),
    }
    let (b_account, b_secret) = (b.account.clone(), b.secret.clone());
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.conn
        .request(Body::SendTyping(pb::SendTyping {
            to: b_account.clone(),
            group: String::new(),
            typing: true,
        }))
        .await
        .expect("typing to an offline account is Ok");
    let (conn, mut pushes) = connect(&gw).await;
    conn.login(&b_account, &b_secret, 0).await.expect("login");
    assert!(no_push(&mut pushes, |b| matches!(b, Body::Typing(_))).await);
}

async fn presence(p: &mut Pushes, of: &str) -> bool {
    match expect_push(p, |b| matches!(b, Body::Presence(x) if x.account == of)).await {
        Body::Presence(x) => x.online,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn s10_3_a_login_does_not_make_an_account_online() {
    let gw = TestGateway::start().await;
    let (a_account, a_secret) = offline_account(&gw).await;
    let mut b = client(&gw).await;
    b.conn
        .request(send(&a_account, pb::Kind::Message, "m"))
        .await
        .expect("send");
    let (conn, _pushes) = connect(&gw).await;
    conn.login(&a_account, &a_secret, 0).await.expect("login");
    assert!(no_push(&mut b.pushes, |x| matches!(x, Body::Presence(_))).await);
    conn.request(Body::SetPresence(pb::SetPresence { online: true }))
        .await
        .expect("online");
    assert!(presence(&mut b.pushes, &a_account).await);
}

#[tokio::test]
async fn s10_3_repeating_the_current_presence_pushes_nothing() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    a.conn
        .request(send(&b.account, pb::Kind::Message, "m"))
        .await
        .expect("send");
    let online = |v| Body::SetPresence(pb::SetPresence { online: v });
    a.conn.request(online(true)).await.expect("online");
    assert!(presence(&mut b.pushes, &a.account).await);
    a.conn.request(online(true)).await.expect("online again");
    assert!(no_push(&mut b.pushes, |x| matches!(x, Body::Presence(_))).await);
    a.conn.request(online(false)).await.expect("offline");
    assert!(!presence(&mut b.pushes, &a.account).await);
    a.conn.request(online(false)).await.expect("offline again");
    assert!(no_push(&mut b.pushes, |x| matches!(x, Body::Presence(_))).await);
}

#[tokio::test]
async fn s10_3_presence_reaches_accounts_that_exchanged_any_envelope_and_closing_makes_offline() {
    let gw = TestGateway::start().await;
    let (a_account, a_secret) = offline_account(&gw).await;
    let mut b = client(&gw).await;
    let mut c = client(&gw).await;
    let mut stranger = client(&gw).await;
    // Only a receipt (b) or a group update (c) was ever exchanged with a: both count.
    b.conn.request(receipt(&a_account)).await.expect("receipt");
    create_group(&c, &[&a_account]).await;
    // a on a connection of its own, which it then closes.
    let mut a = raw(&gw).await;
    a.send(
        1,
        Some(Body::Login(pb::Login {
            account: a_account.clone(),
            secret: a_secret,
            window: 0,
        })),
    )
    .await;
    a.send(2, Some(Body::SetPresence(pb::SetPresence { online: true })))
        .await;
    assert!(presence(&mut b.pushes, &a_account).await);
    assert!(presence(&mut c.pushes, &a_account).await);
    a.w.shutdown().await;
    drop(a);
    assert!(
        !presence(&mut b.pushes, &a_account).await,
        "closing makes it offline"
    );
    assert!(no_push(&mut stranger.pushes, |x| matches!(x, Body::Presence(_))).await);
}

// ---- §11 Profiles --------------------------------------------------------------------------

#[tokio::test]
async fn s11_name_limit_counts_bytes_not_characters() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let set = |name: String| {
        a.conn.request(Body::SetProfile(pb::SetProfile {
            name,
            avatar_blob: String::new(),
        }))
    };
    // 200 characters, 400 bytes.
    assert_eq!(code(set("é".repeat(200)).await), ErrorCode::BadRequest);
    assert_eq!(code(set("a".repeat(257)).await), ErrorCode::BadRequest);
    set("é".repeat(128)).await.expect("256 bytes are fine");
    let Ok(Body::Profile(p)) = a
        .conn
        .request(Body::GetProfile(pb::GetProfile {
            account: a.account.clone(),
        }))
        .await
    else {
        panic!()
    };
    assert_eq!(p.name, "é".repeat(128));
}

#[tokio::test]
async fn s11_get_profile_of_unknown_is_not_found_and_unset_is_empty() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    assert_eq!(
        code(
            a.conn
                .request(Body::GetProfile(pb::GetProfile {
                    account: random_account()
                }))
                .await
        ),
        ErrorCode::NotFound
    );
    let Ok(Body::Profile(p)) = a
        .conn
        .request(Body::GetProfile(pb::GetProfile {
            account: b.account.clone(),
        }))
        .await
    else {
        panic!()
    };
    assert_eq!(
        (p.account, p.name, p.avatar_blob),
        (b.account, String::new(), String::new())
    );
}

// ---- §12 Groups ----------------------------------------------------------------------------

#[tokio::test]
async fn s12_create_group_refuses_malformed_before_unknown_members() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let r = a
        .conn
        .request(Body::CreateGroup(pb::CreateGroup {
            name: "g".into(),
            members: vec![random_account(), "bad".into()],
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    let r = a
        .conn
        .request(Body::CreateGroup(pb::CreateGroup {
            name: "g".into(),
            members: vec![random_account()],
        }))
        .await;
    assert_eq!(code(r), ErrorCode::NotFound);
}

#[tokio::test]
async fn s12_group_name_limit_counts_bytes() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let r = a
        .conn
        .request(Body::CreateGroup(pb::CreateGroup {
            name: "ü".repeat(129),
            members: vec![],
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    let g = create_group(&a, &[]).await;
    let r = a
        .conn
        .request(Body::UpdateGroup(pb::UpdateGroup {
            group: g.id,
            name: Some("ü".repeat(129)),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
}

#[tokio::test]
async fn s12_group_members_are_listed_plus_creator_and_others_get_an_update() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let g = create_group(&a, &[&b.account, &b.account]).await;
    assert_eq!(g.id.len(), 32);
    assert!(
        g.id.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    );
    let mut want = vec![a.account.clone(), b.account.clone()];
    want.sort();
    assert_eq!(g.members, want);
    assert_eq!((g.revision, g.changed_by.as_str()), (1, a.account.as_str()));
    match expect_push(&mut b.pushes, |x| matches!(x, Body::Envelope(_))).await {
        Body::Envelope(e) => {
            assert_eq!(e.kind, pb::Kind::GroupUpdate as i32);
            assert_eq!(
                (e.from.as_str(), e.group.as_str()),
                (a.account.as_str(), g.id.as_str())
            );
            assert_eq!(e.group_update, Some(g));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s12_get_group_reports_who_changed_it_last() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    let Ok(Body::Group(got)) = b
        .conn
        .request(Body::GetGroup(pb::GetGroup {
            group: g.id.clone(),
        }))
        .await
    else {
        panic!()
    };
    assert_eq!(got, g);
    b.conn
        .request(Body::UpdateGroup(pb::UpdateGroup {
            group: g.id.clone(),
            name: Some("renamed".into()),
            ..Default::default()
        }))
        .await
        .expect("update");
    let Ok(Body::Group(got)) = a
        .conn
        .request(Body::GetGroup(pb::GetGroup {
            group: g.id.clone(),
        }))
        .await
    else {
        panic!()
    };
    assert_eq!(
        (got.changed_by, got.revision, got.name),
        (b.account.clone(), 2, "renamed".into())
    );
}

#[tokio::test]
async fn s12_update_group_checks_in_order() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let outsider = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    let upd = |add: Vec<String>, remove: Vec<String>| {
        Body::UpdateGroup(pb::UpdateGroup {
            group: g.id.clone(),
            add,
            remove,
            ..Default::default()
        })
    };
    let r = a
        .conn
        .request(Body::UpdateGroup(pb::UpdateGroup {
            group: "f".repeat(32),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(r), ErrorCode::NotFound);
    assert_eq!(
        code(outsider.conn.request(upd(vec![], vec![])).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(
            a.conn
                .request(upd(vec![random_account()], vec!["bad".into()]))
                .await
        ),
        ErrorCode::BadRequest,
        "malformed accounts are refused before unknown ones"
    );
    assert_eq!(
        code(a.conn.request(upd(vec![random_account()], vec![])).await),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn s12_removed_members_learn_of_it_and_a_group_without_members_is_not_member() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    let g = create_group(&a, &[&b.account]).await;
    expect_push(&mut b.pushes, |x| matches!(x, Body::Envelope(_))).await;
    let Ok(Body::Group(after)) = a
        .conn
        .request(Body::UpdateGroup(pb::UpdateGroup {
            group: g.id.clone(),
            remove: vec![b.account.clone()],
            ..Default::default()
        }))
        .await
    else {
        panic!()
    };
    assert_eq!(after.revision, 2);
    match expect_push(&mut b.pushes, |x| matches!(x, Body::Envelope(_))).await {
        Body::Envelope(e) => assert_eq!(
            e.group_update.expect("update").members,
            vec![a.account.clone()]
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code(
            b.conn
                .request(Body::GetGroup(pb::GetGroup {
                    group: g.id.clone()
                }))
                .await
        ),
        ErrorCode::NotMember
    );
    a.conn
        .request(Body::UpdateGroup(pb::UpdateGroup {
            group: g.id.clone(),
            remove: vec![a.account.clone()],
            ..Default::default()
        }))
        .await
        .expect("leave");
    assert_eq!(
        code(
            a.conn
                .request(Body::GetGroup(pb::GetGroup {
                    group: g.id.clone()
                }))
                .await
        ),
        ErrorCode::NotMember
    );
}

#[tokio::test]
async fn s12_group_size_is_capped() {
    let gw = TestGateway::start_with(|c| c.limits.group_max_members = 3).await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let c = client(&gw).await;
    let d = client(&gw).await;
    let r = a
        .conn
        .request(Body::CreateGroup(pb::CreateGroup {
            name: "g".into(),
            members: vec![b.account.clone(), c.account.clone(), d.account.clone()],
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
    let g = create_group(&a, &[&b.account, &c.account]).await;
    let r = a
        .conn
        .request(Body::UpdateGroup(pb::UpdateGroup {
            group: g.id,
            add: vec![d.account.clone()],
            ..Default::default()
        }))
        .await;
    assert_eq!(code(r), ErrorCode::BadRequest);
}

// ---- §13 Media -----------------------------------------------------------------------------

fn put(upload: &str, offset: u64, data: Vec<u8>, last: bool, sha256: Vec<u8>) -> Body {
    Body::BlobPut(pb::BlobPut {
        upload: upload.into(),
        offset,
        data,
        last,
        sha256,
    })
}

#[tokio::test]
async fn s13_2_upload_rules() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let chunk = vec![5u8; 1000];
    assert_eq!(
        code(
            a.conn
                .request(put("u", 10, chunk.clone(), false, vec![]))
                .await
        ),
        ErrorCode::BadRequest,
        "unknown upload with offset != 0"
    );
    assert_eq!(
        code(
            a.conn
                .request(put("u", 0, vec![0; 512 * 1024 + 1], false, vec![]))
                .await
        ),
        ErrorCode::BadRequest,
        "chunk over 512 KiB"
    );
    assert_eq!(
        code(a.conn.request(put("u", 0, vec![], false, vec![])).await),
        ErrorCode::BadRequest,
        "an empty chunk that is not last"
    );
    a.conn
        .request(put("u", 0, chunk.clone(), false, vec![]))
        .await
        .expect("first");
    assert_eq!(
        code(
            a.conn
                .request(put("u", 5, chunk.clone(), false, vec![]))
                .await
        ),
        ErrorCode::BadRequest,
        "wrong offset"
    );
    // The upload was kept: the right chunk goes on.
    let whole: Vec<u8> = [chunk.clone(), chunk.clone()].concat();
    let sha = Sha256::digest(&whole).to_vec();
    assert_eq!(
        code(
            a.conn
                .request(put("u", 1000, chunk.clone(), true, vec![1; 5]))
                .await
        ),
        ErrorCode::BadRequest,
        "a last chunk without a 32-byte hash"
    );
    let Ok(Body::BlobStored(stored)) = a
        .conn
        .request(put("u", 1000, chunk.clone(), true, sha))
        .await
    else {
        panic!("the chunk could be resent with its hash")
    };
    assert_eq!(stored.size, 2000);
    assert_eq!(stored.blob.len(), 32);
    // A hash mismatch discards the upload.
    a.conn
        .request(put("v", 0, chunk.clone(), false, vec![]))
        .await
        .expect("first");
    assert_eq!(
        code(
            a.conn
                .request(put("v", 1000, chunk.clone(), true, vec![0; 32]))
                .await
        ),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(a.conn.request(put("v", 1000, chunk, false, vec![])).await),
        ErrorCode::BadRequest,
        "discarded"
    );
}

#[tokio::test]
async fn s13_2_an_upload_over_the_size_limit_is_too_large_and_discarded() {
    let gw = TestGateway::start_with(|c| c.max_blob_bytes = 1500).await;
    let a = client(&gw).await;
    a.conn
        .request(put("u", 0, vec![1; 1000], false, vec![]))
        .await
        .expect("first");
    assert_eq!(
        code(
            a.conn
                .request(put("u", 1000, vec![1; 1000], false, vec![]))
                .await
        ),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(
            a.conn
                .request(put("u", 1000, vec![1; 100], false, vec![]))
                .await
        ),
        ErrorCode::BadRequest,
        "discarded"
    );
}

async fn upload(c: &Client, data: Vec<u8>) -> String {
    let sha = Sha256::digest(&data).to_vec();
    match c
        .conn
        .request(put("x", 0, data, true, sha))
        .await
        .expect("upload")
    {
        Body::BlobStored(s) => s.blob,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn s13_3_download_rules() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let b = client(&gw).await;
    let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let blob = upload(&a, data.clone()).await;
    let get = |offset: u64, length: u32| {
        b.conn.request(Body::BlobGet(pb::BlobGet {
            blob: blob.clone(),
            offset,
            length,
        }))
    };
    let Ok(Body::BlobData(d)) = get(1000, 500).await else {
        panic!()
    };
    assert_eq!(
        (d.offset, d.total_size, d.data),
        (1000, 3000, data[1000..1500].to_vec())
    );
    let Ok(Body::BlobData(d)) = get(2900, 0).await else {
        panic!()
    };
    assert_eq!(
        d.data,
        data[2900..].to_vec(),
        "length 0 means 512 KiB, clipped at the end"
    );
    let Ok(Body::BlobData(d)) = get(3000, 10).await else {
        panic!()
    };
    assert!(d.data.is_empty());
    assert_eq!(code(get(3001, 10).await), ErrorCode::BadRequest);
    assert_eq!(code(get(0, 512 * 1024 + 1).await), ErrorCode::BadRequest);
    let r = b
        .conn
        .request(Body::BlobGet(pb::BlobGet {
            blob: "0".repeat(32),
            offset: 0,
            length: 0,
        }))
        .await;
    assert_eq!(code(r), ErrorCode::NotFound);
}

#[tokio::test]
async fn s13_3_blobs_expire_after_the_configured_lifetime() {
    let gw = TestGateway::start_with(|c| c.limits.blob_ttl = Duration::from_secs(1)).await;
    let a = client(&gw).await;
    let blob = upload(&a, vec![1; 100]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = a
        .conn
        .request(Body::BlobGet(pb::BlobGet {
            blob: blob.clone(),
            offset: 0,
            length: 0,
        }))
        .await;
    assert_eq!(code(r), ErrorCode::NotFound);
    // The sweep removes the file as well.
    let path = gw.dir.path().join("blobs").join(&blob);
    let deadline = std::time::Instant::now() + WAIT;
    while path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "blob file not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- Beyond the document: how the reference gateway delivers -------------------------------

/// A logged-in account that has read its whole queue is handed what is stored for it from then
/// on, and reads nothing: of envelopes sent one at a time, only the first, which follows on
/// from nothing the gateway knows of since it started, is read (a read per envelope was most
/// of the database's work with many accounts each getting a little).
#[tokio::test]
async fn a_caught_up_login_is_handed_its_envelopes_not_read() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    // Settled: B's loop has read its empty queue and waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = gw.gateway.delivery_reads();
    const N: u64 = 20;
    for i in 0..N {
        a.conn
            .request(send(&b.account, pb::Kind::Message, &format!("one{i}")))
            .await
            .expect("send");
        expect_push(&mut b.pushes, |x| matches!(x, Body::Envelope(_))).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reads = gw.gateway.delivery_reads() - before;
    assert!(
        reads <= 1,
        "{reads} delivery reads for {N} envelopes sent one at a time"
    );
}

/// A login with a few envelopes waiting reads its queue once: the read that finds them finds
/// too that nothing else waits (a read of the queue at login, one to find it empty and one for
/// what came since were three reads a login, a backlog's every reconnection).
#[tokio::test]
async fn a_login_with_a_few_envelopes_waiting_reads_its_queue_once() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let (b, secret) = offline_account(&gw).await;
    queue_messages(&a, &b, 5).await;
    let before = gw.gateway.delivery_reads();
    let (_conn, mut pushes, queue, delivered) = login_drained(&gw, &b, &secret).await;
    assert_eq!((delivered, queue.len()), (5, 5));
    // What is stored from then on is handed over.
    a.conn
        .request(send(&b, pb::Kind::Message, "later"))
        .await
        .expect("send");
    expect_push(&mut pushes, |x| matches!(x, Body::Envelope(_))).await;
    let reads = gw.gateway.delivery_reads() - before;
    assert_eq!(
        reads, 1,
        "delivery reads for a login and one envelope after it"
    );
}

/// Logs `account` in on a new connection and collects what it is pushed up to
/// `QueueDrained`: the connection and its pushes, those envelopes, and the push's `delivered`.
async fn login_drained(
    gw: &TestGateway,
    account: &str,
    secret: &[u8],
) -> (GatewayConn, Pushes, Vec<pb::Envelope>, u32) {
    let (conn, mut pushes) = connect(gw).await;
    conn.login(account, secret, 0).await.expect("login");
    let mut queue = Vec::new();
    loop {
        match expect_push(&mut pushes, |b| {
            matches!(b, Body::Envelope(_) | Body::QueueDrained(_))
        })
        .await
        {
            Body::Envelope(e) => queue.push(e),
            Body::QueueDrained(d) => return (conn, pushes, queue, d.delivered),
            _ => unreachable!(),
        }
    }
}

/// What a login is handed as it is stored is what it reads from its queue after a reconnect,
/// field for field: a message, a receipt, a group update (stored apart from the group commit)
/// and a group message.
#[tokio::test]
async fn envelopes_pushed_as_stored_are_those_pushed_from_the_queue() {
    let gw = TestGateway::start().await;
    let a = client(&gw).await;
    let mut b = client(&gw).await;
    a.conn
        .request(send(&b.account, pb::Kind::Message, "m1"))
        .await
        .expect("send");
    a.conn.request(receipt(&b.account)).await.expect("receipt");
    let g = create_group(&a, &[&b.account]).await;
    a.conn
        .request(group_send(&g.id, "g1"))
        .await
        .expect("group send");
    let mut live = Vec::new();
    while live.len() < 4 {
        if let Body::Envelope(e) =
            expect_push(&mut b.pushes, |x| matches!(x, Body::Envelope(_))).await
        {
            live.push(e);
        }
    }
    let kinds: Vec<i32> = live.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            pb::Kind::Message as i32,
            pb::Kind::Receipt as i32,
            pb::Kind::GroupUpdate as i32,
            pb::Kind::Group as i32
        ]
    );
    let (_conn, _pushes, queue, _) = login_drained(&gw, &b.account, &b.secret).await;
    assert_eq!(queue, live);
}

/// Whatever reaches a login's delivery by hand-over or by read (many senders at once, group
/// updates stored apart in between, more handed over than a login's inbox holds while its
/// window is full), it gets every envelope once, in the order of its queue.
#[tokio::test]
async fn a_login_gets_every_envelope_once_in_order_under_many_senders() {
    let gw = TestGateway::start_with(|c| {
        c.rate_capacity = 1e6;
        c.rate_per_sec = 1e6;
    })
    .await;
    let b = client(&gw).await;
    // A small window, acked only as envelopes arrive: the loop waits on it while more is
    // handed over.
    let (conn, mut pushes) = connect(&gw).await;
    conn.login(&b.account, &b.secret, 8).await.expect("login");
    expect_push(&mut pushes, |x| matches!(x, Body::QueueDrained(_))).await;
    let mut senders = Vec::new();
    for _ in 0..4 {
        senders.push(client(&gw).await);
    }
    const EACH: usize = 150;
    let mut tasks = tokio::task::JoinSet::new();
    for (s, sender) in senders.into_iter().enumerate() {
        let to = b.account.clone();
        tasks.spawn(async move {
            let mut answers = Vec::new();
            for i in 0..EACH {
                if s == 0 && i % 50 == 25 {
                    // A group update for `to`, stored apart from the group commit.
                    create_group(&sender, &[&to]).await;
                }
                let id = format!("s{s}m{i}");
                answers.push(
                    sender
                        .conn
                        .submit(send(&to, pb::Kind::Message, &id))
                        .await
                        .expect("submit"),
                );
            }
            for a in answers {
                a.wait().await.expect("sent");
            }
            sender
        });
    }
    let want = 4 * EACH + 3;
    let reads = gw.gateway.delivery_reads();
    let mut got: Vec<pb::Envelope> = Vec::new();
    while got.len() < want {
        let Body::Envelope(e) = expect_push(&mut pushes, |x| matches!(x, Body::Envelope(_))).await
        else {
            unreachable!()
        };
        conn.request(Body::Ack(pb::Ack {
            envelope_ids: vec![e.id],
        }))
        .await
        .expect("ack");
        got.push(e);
    }
    while tasks.join_next().await.is_some() {}
    // Both ways were taken: most envelopes handed over, some read (the first, which follows
    // on from nothing known, and after group updates and overflows).
    let reads = gw.gateway.delivery_reads() - reads;
    assert!(
        (1..want as u64 / 2).contains(&reads),
        "{reads} delivery reads for {want} envelopes"
    );
    assert!(
        got.windows(2).all(|w| w[0].id < w[1].id),
        "pushed out of the queue's order"
    );
    let messages: std::collections::BTreeSet<&str> = got
        .iter()
        .filter(|e| e.kind == pb::Kind::Message as i32)
        .map(|e| e.message_id.as_str())
        .collect();
    assert_eq!(messages.len(), 4 * EACH, "a message lost or pushed twice");
    assert!(
        no_push(&mut pushes, |x| matches!(x, Body::Envelope(_))).await,
        "an envelope pushed twice"
    );
}

/// A sender that goes away right after its `Send`s (before their answers) leaves no envelope
/// undelivered: every envelope stored reaches the recipient without another wake.
#[tokio::test]
async fn a_sender_that_goes_away_leaves_no_stored_envelope_unannounced() {
    let gw = TestGateway::start().await;
    let mut b = client(&gw).await;
    let mut a = raw_logged_in(&gw).await;
    const N: u64 = 50;
    for i in 0..N {
        a.w.write_stanza(&pb::Stanza {
            id: 10 + i,
            body: Some(send(&b.account, pb::Kind::Message, &format!("gone{i}"))),
        })
        .await
        .expect("write");
    }
    a.w.flush().await.expect("flush");
    drop(a);
    let db = format!(
        "sqlite://{}?mode=ro",
        gw.dir.path().join("gateway.db").display()
    );
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .expect("the gateway's database");
    let count = async |db: &mut sqlx::SqliteConnection| -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM envelope WHERE recipient = ?")
            .bind(&b.account)
            .fetch_one(db)
            .await
            .expect("count")
    };
    // The gateway is done with the sender's stanzas once what it stored stays the same.
    let mut stored = -1;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count(&mut db).await;
        if now == stored {
            break;
        }
        stored = now;
    }
    assert!(stored > 0, "the gateway stored none of the sends");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut received = 0;
    while received < stored {
        match tokio::time::timeout_at(deadline, b.pushes.recv()).await {
            Ok(Some(st)) if matches!(st.body, Some(Body::Envelope(_))) => received += 1,
            Ok(Some(_)) => {}
            _ => panic!("{stored} envelopes stored, {received} delivered"),
        }
    }
}

/// The gateway runs with mimalloc committing memory as it is used and returning freed memory at
/// once (`mib-alloc`; with mimalloc's defaults it held three times the memory at start): started
/// without those settings, it starts itself again with them.
#[test]
fn the_gateway_runs_with_the_allocators_settings() {
    let out = std::process::Command::new(common::gateway_bin())
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
        .env_remove("MIMALLOC_PURGE_DELAY")
        .output()
        .expect("run the gateway");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(
        common::alloc::settings(&text),
        (Some("0".into()), Some("0".into())),
        "{text}"
    );
}
