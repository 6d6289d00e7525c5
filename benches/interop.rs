#![allow(clippy::print_stdout)]
//! Interop benchmarks (a bench binary): `cargo bench --bench interop`.
//!
//! - vault AEAD on 2 KiB records;
//! - 1:1 Signal encrypt + decrypt through the vault-backed stores on SQLite, one message each
//!   way per round (every decrypt takes a DH ratchet step, as in a real chat);
//! - sender-key group encrypt + decrypt through the vault-backed stores;
//! - gateway relay: envelopes per second between two connected clients (store, push, ack);
//! - gateway backlog: `Send`s to an account that is away, while its queue grows to 9,000 (the
//!   cost of a `Send` must not grow with the queue it goes to).

use std::time::{Duration, Instant};

use libsignal_protocol::{
    create_sender_key_distribution_message, group_decrypt, group_encrypt,
    process_sender_key_distribution_message,
};
use matrix_interop_bridge::{
    interop::{
        GatewayConn,
        signal_store::testing::{addr, decrypt, encrypt, session_to},
    },
    testing::signal_store as store,
    vault::SecretKey,
    wire::{
        noise::StaticKey,
        pb::{self, stanza::Body},
    },
};
use mib_gateway::{CodeDelivery, Gateway, GatewayConfig, GatewayDb};

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    let med = samples[n / 2];
    let p99 = samples[(n * 99 / 100).min(n - 1)];
    let total: Duration = samples.iter().sum();
    println!(
        "{name:<48} n={n:<6} median {:>8.1} µs  p99 {:>8.1} µs  ({:.0}/s)",
        med.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        n as f64 / total.as_secs_f64()
    );
}

async fn bench_one_to_one(rounds: usize) {
    let (mut a, _da) = store("@a:bench").await;
    let (mut b, _db) = store("@b:bench").await;
    let (aa, ba) = (addr("+15550000001"), addr("+15550000002"));
    session_to(&mut a, &mut b, &ba).await;
    let pt = vec![b'x'; 200];
    let first = encrypt(&mut a, &ba, &pt).await;
    decrypt(&mut b, &aa, &first).await;
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // B answers A, then A answers B: each decrypt takes a DH ratchet step.
        let t = Instant::now();
        let c = encrypt(&mut b, &aa, &pt).await;
        enc.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(decrypt(&mut a, &ba, &c).await, pt);
        dec.push(t.elapsed());
        let t = Instant::now();
        let c = encrypt(&mut a, &ba, &pt).await;
        enc.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(decrypt(&mut b, &aa, &c).await, pt);
        dec.push(t.elapsed());
    }
    report("1:1 encrypt (vault, SQLite commit)", enc);
    report("1:1 decrypt with DH ratchet step (vault, SQLite)", dec);
}

async fn bench_group(n: usize) {
    let (mut a, _da) = store("@a:bench").await;
    let (mut b, _db) = store("@b:bench").await;
    let aa = addr("+15550000001");
    let dist = uuid::Uuid::new_v4();
    let skdm =
        create_sender_key_distribution_message(&aa, dist, &mut a.sender_keys, &mut rand::rng())
            .await
            .expect("skdm");
    a.commit(vec![]).await.expect("commit");
    process_sender_key_distribution_message(&aa, &skdm, &mut b.sender_keys)
        .await
        .expect("process");
    b.commit(vec![]).await.expect("commit");
    let pt = vec![b'g'; 200];
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let m = group_encrypt(&mut a.sender_keys, &aa, dist, &pt, &mut rand::rng())
            .await
            .expect("enc");
        a.commit(vec![]).await.expect("commit");
        enc.push(t.elapsed());
        let t = Instant::now();
        let out = group_decrypt(m.serialized(), &mut b.sender_keys, &aa)
            .await
            .expect("dec");
        b.commit(vec![]).await.expect("commit");
        dec.push(t.elapsed());
        assert_eq!(out, pt);
    }
    report("group encrypt (sender key, vault, SQLite)", enc);
    report("group decrypt (sender key, vault, SQLite)", dec);
}

fn bench_aead(n: usize) {
    let k = SecretKey::random();
    let data = vec![7u8; 2048];
    let mut seal = Vec::with_capacity(n);
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = k.seal(b"owner/kind/name", &data);
        seal.push(t.elapsed());
        let t = Instant::now();
        let _ = k.open(b"owner/kind/name", &s).expect("open");
        open.push(t.elapsed());
    }
    report("vault seal 2 KiB (XChaCha20-Poly1305)", seal);
    report("vault open 2 KiB", open);
}

async fn bench_gateway(n: usize) {
    let dir = tempfile::tempdir().expect("tmp");
    let key = StaticKey::generate();
    let mut cfg = GatewayConfig::new(
        key.clone(),
        format!("sqlite://{}", dir.path().join("gw.db").display()),
        dir.path().join("blobs"),
    );
    cfg.codes = CodeDelivery::DevFixed("123456".into());
    cfg.limits.registrations_per_source = u32::MAX;
    cfg.rate_per_sec = 1e9;
    cfg.rate_capacity = 1e9;
    let gw = Gateway::open(cfg).await.expect("gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(gw.serve(listener, rx));
    let ga = matrix_interop_bridge::interop::GatewayAddr {
        address,
        public_key: key.public.clone(),
    };
    let mut login = Vec::new();
    for acc in ["+15550000011", "+15550000012"] {
        let (c, p) = GatewayConn::connect(&ga).await.expect("connect");
        c.request_code(acc).await.expect("register");
        let secret = c.verify(acc, "123456").await.expect("verify");
        c.login(acc, &secret, 0).await.expect("login");
        login.push((c, p));
    }
    let (rx_conn, mut pushes) = login.pop().expect("b");
    let (tx_conn, _p) = login.pop().expect("a");
    let receiver = tokio::spawn(async move {
        let mut got = 0;
        let start = Instant::now();
        while got < n {
            match pushes.recv().await.map(|st| *st) {
                Some(pb::Stanza {
                    body: Some(Body::Envelope(e)),
                    ..
                }) => {
                    got += 1;
                    rx_conn
                        .send_unanswered(Body::Ack(pb::Ack {
                            envelope_ids: vec![e.id],
                        }))
                        .await
                        .expect("ack");
                }
                Some(_) => {}
                None => break,
            }
        }
        start.elapsed()
    });
    let start = Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..n {
        let c = tx_conn.clone();
        inflight.spawn(async move {
            let s = pb::Send {
                to: "+15550000012".into(),
                kind: pb::Kind::Message as i32,
                ciphertext: vec![1; 300],
                message_id: format!("m{i}"),
                ..Default::default()
            };
            c.request(Body::Send(s)).await.expect("send")
        });
        if inflight.len() >= 64 {
            inflight.join_next().await;
        }
    }
    while inflight.join_next().await.is_some() {}
    let sent = start.elapsed();
    let recv = receiver.await.expect("receiver");
    println!(
        "{:<48} n={n:<6} sent in {:.2} s ({:.0}/s), all delivered and acked in {:.2} s ({:.0} envelopes/s)",
        "gateway relay (store, push, ack; 64 in flight)",
        sent.as_secs_f64(),
        n as f64 / sent.as_secs_f64(),
        recv.as_secs_f64(),
        n as f64 / recv.as_secs_f64()
    );
}

/// Sends to one recipient that never acks, through the gateway's store (64 at once, as from many
/// connections); the rate per 1,000 while the queue grows.
async fn bench_gateway_backlog(n: usize) {
    let dir = tempfile::tempdir().expect("tmp");
    let uri = format!("sqlite://{}", dir.path().join("gw.db").display());
    let db = GatewayDb::open(&uri).await.expect("db");
    let mut rates = Vec::new();
    let mut i = 0;
    while i < n {
        let start = Instant::now();
        let mut inflight = tokio::task::JoinSet::new();
        for _ in 0..1000.min(n - i) {
            let db = db.clone();
            let id = format!("m{i}");
            i += 1;
            inflight.spawn(async move {
                let e = pb::Envelope {
                    from: "+15550000021".into(),
                    to: "+15550000022".into(),
                    kind: pb::Kind::Message as i32,
                    ciphertext: vec![1; 300],
                    message_id: id.clone(),
                    ..Default::default()
                };
                db.store_send("+15550000021", &id, vec![e], 10_000, false)
                    .await
                    .expect("store")
            });
            if inflight.len() >= 64 {
                inflight.join_next().await;
            }
        }
        while inflight.join_next().await.is_some() {}
        rates.push(1000.0 / start.elapsed().as_secs_f64());
    }
    let show: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "{:<48} n={n:<6} Sends/s per 1,000 as the queue grows: {}",
        "gateway backlog (store to an away account)",
        show.join(" ")
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 1 } else { 10 };
    bench_aead(2000 * scale);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        bench_one_to_one(100 * scale).await;
        bench_group(200 * scale).await;
    });
    rt.block_on(bench_gateway(500 * scale));
    rt.block_on(bench_gateway_backlog(if quick { 2000 } else { 9000 }));
}
