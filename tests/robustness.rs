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

    // Garbage instead of a handshake.
    let mut tcp = tokio::net::TcpStream::connect(&gw.addr.address)
        .await
        .expect("tcp");
    tcp.write_all(&[0, 3, 1, 2, 3, 0xff, 0xff])
        .await
        .expect("write");
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
    let _ = r.read_stanza().await; // BAD_REQUEST for the empty stanza, then closed
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

    // After all that, the gateway still serves well-behaved clients.
    let (conn, _p) = GatewayConn::connect(&gw.addr).await.expect("connect");
    assert!(matches!(
        conn.request(Body::Ping(pb::Ping { nonce: 9 })).await,
        Ok(Body::Pong(pb::Pong { nonce: 9 }))
    ));
}
