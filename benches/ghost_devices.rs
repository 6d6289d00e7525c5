//! What a device per ghost costs (docs/encryption.md, "A device per ghost"):
//! `cargo bench --bench ghost_devices [-- --quick]`.
//!
//! Runs matrix-sdk-crypto's `OlmMachine` on the bridge's database crypto store (SQLite, as by
//! default), with the homeserver's answers built in memory (no HTTP: round trips to the
//! homeserver come on top and are the same with or without ghost devices). Measures:
//! - creating a ghost device: store, Olm account, keys to upload, cross-signing identity;
//! - its rows and bytes in the database, and the memory of a loaded machine (RSS with 100 and
//!   1,000 loaded);
//! - one ghost message into a room with N = 1, 10, 100 member devices: the first one (Olm
//!   sessions claimed, room key shared with N devices) and the next ones with a warm session
//!   (the same calls the bridge makes per message: tracked users, missing sessions, share,
//!   encrypt).
#![allow(clippy::print_stdout)]

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use matrix_interop_bridge::{
    store::{SqlStore, crypto::DbCryptoStore, testing},
    vault::SecretKey,
};
use matrix_sdk_crypto::{
    EncryptionSettings, OlmMachine,
    types::requests::{AnyOutgoingRequest, ToDeviceRequest},
};
use ruma::{
    OwnedDeviceId, OwnedRoomId, OwnedUserId, UInt,
    api::client::{
        keys::{claim_keys, get_keys, upload_keys},
        to_device::send_event_to_device,
    },
    serde::Raw,
};
use serde_json::json;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let n = v.len();
    (ms(v[n / 2]), ms(v[(n * 99 / 100).min(n - 1)]))
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Answers every key upload the machine asks for (as the homeserver would).
async fn answer_uploads(olm: &OlmMachine) {
    for r in olm.outgoing_requests().await.expect("requests") {
        if let AnyOutgoingRequest::KeysUpload(up) = r.request() {
            let count = UInt::try_from(up.one_time_keys.len()).expect("count");
            let resp = upload_keys::v3::Response::new(BTreeMap::from([(
                ruma::OneTimeKeyAlgorithm::SignedCurve25519,
                count,
            )]));
            olm.mark_request_as_sent(r.request_id(), &resp)
                .await
                .expect("mark");
        }
    }
}

async fn open_ghost(db: &SqlStore, key: &SecretKey, n: usize) -> OlmMachine {
    let user: OwnedUserId = format!("@interop_{n}:bench").try_into().expect("user");
    let device: OwnedDeviceId = format!("MIBG{n:010}").into();
    let store = DbCryptoStore::new(db.clone(), key.clone(), &user, &device);
    OlmMachine::with_store(&user, &device, store, None)
        .await
        .expect("machine")
}

/// A ghost device as the bridge creates one: its store rows, account and cross-signing identity.
async fn create_ghost(db: &SqlStore, key: &SecretKey, n: usize) -> OlmMachine {
    let olm = open_ghost(db, key, n).await;
    answer_uploads(&olm).await;
    olm.bootstrap_cross_signing(false)
        .await
        .expect("cross-sign");
    olm
}

/// Room members' devices: their uploaded keys, as `/keys/query` and `/keys/claim` return them.
struct Members {
    users: Vec<OwnedUserId>,
    query: get_keys::v3::Response,
    claim: claim_keys::v3::Response,
}

async fn members(n: usize) -> Members {
    let mut users = Vec::new();
    let mut query = get_keys::v3::Response::new();
    let mut claim = claim_keys::v3::Response::new(BTreeMap::new());
    for i in 0..n {
        // Ten devices per user, as in a room of people with several clients each.
        let user: OwnedUserId = format!("@member{}:bench", i / 10).try_into().expect("user");
        let device: OwnedDeviceId = format!("DEV{i}").into();
        let m = OlmMachine::new(&user, &device).await;
        for r in m.outgoing_requests().await.expect("requests") {
            if let AnyOutgoingRequest::KeysUpload(up) = r.request() {
                let keys = up.device_keys.clone().expect("device keys");
                query
                    .device_keys
                    .entry(user.clone())
                    .or_default()
                    .insert(device.clone(), keys);
                let (id, otk) = up.one_time_keys.iter().next().expect("one-time key");
                claim
                    .one_time_keys
                    .entry(user.clone())
                    .or_default()
                    .insert(device.clone(), BTreeMap::from([(id.clone(), otk.clone())]));
            }
        }
        if !users.contains(&user) {
            users.push(user);
        }
    }
    Members {
        users,
        query,
        claim,
    }
}

async fn mark_to_device(olm: &OlmMachine, reqs: Vec<std::sync::Arc<ToDeviceRequest>>) -> usize {
    let n = reqs.len();
    for td in reqs {
        olm.mark_request_as_sent(&td.txn_id, &send_event_to_device::v3::Response::new())
            .await
            .expect("mark");
    }
    n
}

/// The bridge's per-message sequence (`Device::encrypt` without its HTTP round trips).
async fn send_one(
    olm: &OlmMachine,
    room: &OwnedRoomId,
    m: &Members,
    content: &Raw<ruma::events::AnyMessageLikeEventContent>,
) -> bool {
    let refs: Vec<&ruma::UserId> = m.users.iter().map(|u| &**u).collect();
    olm.update_tracked_users(refs.clone()).await.expect("track");
    for r in olm.outgoing_requests().await.expect("requests") {
        if let AnyOutgoingRequest::KeysQuery(_) = r.request() {
            olm.mark_request_as_sent(r.request_id(), &m.query)
                .await
                .expect("query");
        }
    }
    if let Some((txn, _claim)) = olm
        .get_missing_sessions(refs.clone().into_iter())
        .await
        .expect("missing")
    {
        olm.mark_request_as_sent(&txn, &m.claim)
            .await
            .expect("claim");
    }
    let shares = olm
        .share_room_key(room, refs.into_iter(), EncryptionSettings::default())
        .await
        .expect("share");
    let shared = mark_to_device(olm, shares).await > 0;
    olm.encrypt_room_event_raw(room, "m.room.message", content)
        .await
        .expect("encrypt");
    shared
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ghosts = if quick { 100 } else { 1000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (db, tmp) = testing::sqlite().await;
        let key = SecretKey::random();
        println!("ghost devices ({ghosts} ghosts, the database crypto store on SQLite, homeserver answers in memory)\n");

        // Creation, and what a ghost leaves on disk.
        let mut creation = Vec::new();
        for n in 0..ghosts {
            let t = Instant::now();
            let olm = create_ghost(&db, &key, n).await;
            creation.push(t.elapsed());
            drop(olm);
        }
        let (med, p99) = percentiles(creation);
        let disk = dir_bytes(tmp.path()) as f64 / ghosts as f64 / 1024.0;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM crypto_item")
            .fetch_one(db.pool())
            .await
            .expect("rows");
        println!("create a ghost device (store, account, keys, cross-signing): median {med:.1} ms  p99 {p99:.1} ms");
        println!(
            "per ghost in the database (no sessions yet): {:.1} rows, {disk:.1} KiB on disk",
            rows as f64 / ghosts as f64
        );

        // Memory of loaded machines: 100 active (the cache holds 128), then all of them.
        let base = rss_mib();
        let mut loaded = Vec::new();
        let mut open = Vec::new();
        for n in 0..ghosts.min(100) {
            let t = Instant::now();
            loaded.push(open_ghost(&db, &key, n).await);
            open.push(t.elapsed());
        }
        let (med, p99) = percentiles(open);
        let rss100 = rss_mib();
        println!("load a ghost device from its store: median {med:.1} ms  p99 {p99:.1} ms");
        println!(
            "RSS with 100 of {ghosts} ghosts loaded: {rss100:.1} MiB (+{:.1} MiB, {:.0} KiB per loaded machine)",
            rss100 - base,
            (rss100 - base) * 1024.0 / 100.0
        );
        for n in 100..ghosts {
            loaded.push(open_ghost(&db, &key, n).await);
        }
        let all = rss_mib();
        println!(
            "RSS with all {ghosts} loaded: {all:.1} MiB ({:.0} KiB per loaded machine)\n",
            (all - base) * 1024.0 / ghosts as f64
        );
        drop(loaded);

        // One ghost's messages into rooms with N member devices.
        let content: Raw<ruma::events::AnyMessageLikeEventContent> =
            Raw::new(&json!({"msgtype": "m.text", "body": "x".repeat(200)}))
                .expect("raw")
                .cast_unchecked();
        let per_room = if quick { 50 } else { 300 };
        println!(
            "{:>8} {:>16} {:>18} {:>18} {:>16}",
            "devices", "first message", "warm median", "warm p99", "rotation"
        );
        for (i, n) in [1usize, 10, 100].into_iter().enumerate() {
            let olm = open_ghost(&db, &key, i).await;
            let m = members(n).await;
            let room: OwnedRoomId = format!("!room{n}:bench").try_into().expect("room");
            let t = Instant::now();
            send_one(&olm, &room, &m, &content).await;
            let first = t.elapsed();
            let (mut warm, mut rotations) = (Vec::new(), Vec::new());
            for _ in 0..per_room {
                let t = Instant::now();
                let rotated = send_one(&olm, &room, &m, &content).await;
                if rotated { &mut rotations } else { &mut warm }.push(t.elapsed());
            }
            let (med, p99) = percentiles(warm);
            let rot = rotations.iter().map(|d| ms(*d)).sum::<f64>() / rotations.len().max(1) as f64;
            println!(
                "{n:>8} {:>13.2} ms {med:>15.3} ms {p99:>15.3} ms {rot:>13.2} ms",
                ms(first)
            );
        }
        println!("\nwarm = the per-message calls with the room key already shared; rotation = the new key");
        println!("shared with every device, once per 100 messages (Megolm's default, the same for any device)");
    });
}
