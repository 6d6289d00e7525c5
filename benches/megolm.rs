//! Megolm through the bridge's crypto machine (matrix-sdk-crypto's OlmMachine, as the bridge uses
//! it): `cargo bench --bench megolm`. Encrypts 200-byte messages for a room and decrypts them again
//! (the bridge's device holds the inbound session of its own outbound session).
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use matrix_sdk_crypto::{
    DecryptionSettings, EncryptionSettings, OlmMachine, TrustRequirement,
    types::events::room::encrypted::EncryptedEvent,
};
use ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId, serde::Raw};
use serde_json::{Value, json};

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    println!(
        "{name:<40} n={n:<6} median {:>7.1} µs  p99 {:>7.1} µs  ({:.0}/s)",
        samples[n / 2].as_secs_f64() * 1e6,
        samples[(n * 99 / 100).min(n - 1)].as_secs_f64() * 1e6,
        n as f64 / total.as_secs_f64()
    );
}

fn main() {
    let n: usize = if std::env::args().any(|a| a == "--quick") {
        500
    } else {
        5000
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let user: OwnedUserId = "@interopbot:bench".try_into().expect("user");
        let device: OwnedDeviceId = "BENCHDEVICE".into();
        let room: OwnedRoomId = "!room:bench".try_into().expect("room");
        let olm = OlmMachine::new(&user, &device).await;
        let none: Vec<&ruma::UserId> = Vec::new();
        // One session for the whole run (the bridge rotates after 100 messages, as clients do).
        let settings = EncryptionSettings { rotation_period_msgs: (n as u64) + 10, ..Default::default() };
        olm.share_room_key(&room, none.into_iter(), settings).await.expect("share");
        let body = "x".repeat(200);
        let content = Raw::new(&json!({"msgtype": "m.text", "body": body})).expect("raw").cast_unchecked();
        let mut enc = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let r = olm.encrypt_room_event_raw(&room, "m.room.message", &content).await.expect("encrypt");
            enc.push(t.elapsed());
            let c: Value = r.content.deserialize_as().expect("content");
            events.push(json!({"type": "m.room.encrypted", "sender": user, "event_id": format!("$e{i}"), "origin_server_ts": 1, "room_id": room, "content": c}));
        }
        let settings = DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted };
        let mut dec = Vec::with_capacity(n);
        for ev in &events {
            let raw: Raw<EncryptedEvent> = Raw::new(ev).expect("raw").cast_unchecked();
            let t = Instant::now();
            olm.decrypt_room_event(&raw, &room, &settings).await.expect("decrypt");
            dec.push(t.elapsed());
        }
        report("Megolm encrypt (OlmMachine, 200 B)", enc);
        report("Megolm decrypt (OlmMachine, 200 B)", dec);
    });
}
