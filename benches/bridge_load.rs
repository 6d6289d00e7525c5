//! Bridge load generator (a bench binary): `cargo bench --bench bridge_load -- [flags]`.
//!
//! Drives M Matrix users and N interop contacts through the real bridge binary and an in-process
//! interop gateway, and reports messages/s and added latency (p50/p99) per direction, the bridge's
//! CPU use and its resident memory. The homeserver is a minimal stand-in (an axum server in this
//! process that answers every client-server call the bridge makes at once), so the figures are
//! the ceiling of the bridge itself (plus the gateway hop), not of a real homeserver.
//!
//! Set-up: the gateway and the stand-in homeserver run in this process; the bridge runs as its
//! own process (so its RSS and CPU can be read from /proc). Each Matrix user `@benchN:bench` logs
//! in through the provisioning API (its own interop account, dev code 123456) and opens a DM with
//! its contact through `POST v1/chats`. User i talks to contact `i % N` (N = M by default, so each
//! user has its own contact; with `--contacts N` below M a contact talks to several users). The
//! contacts are interop accounts of our own Rust client running in this process.
//!
//! Runs, each direction:
//! - warm-up: one message per pair (sets up the Signal sessions; not measured);
//! - max: K messages as fast as the bridge takes them. Matrix→interop pushes appservice
//!   transactions of 50 events, 4 in flight; interop→Matrix has every contact send its share with
//!   4 sends in flight. Throughput = messages / (first send → last arrival); the latency of this
//!   run is mostly queueing;
//! - paced: half the measured max rate for `--paced-secs` seconds (at most K messages), for the
//!   p50/p99 latency of a bridge under load but not saturated.
//!
//! Then a reference run: the contacts send K messages to each other in pairs, through the same
//! gateway and client but without the bridge: the ceiling of everything except the bridge on this
//! machine, to compare the bridge's rows with.
//!
//! Latency is end to end: Matrix→interop from the start of the transaction PUT to the contact's
//! client handing out the decrypted message; interop→Matrix from the contact's `send` call to the
//! stand-in homeserver receiving the ghost's `PUT .../send/m.room.message`. Both include the
//! Signal encrypt/decrypt at the ends and the gateway hop. Everything shares one machine: the
//! bench process (gateway, contacts, stand-in) competes with the bridge for the CPU, so the
//! bridge's own CPU time per message is printed too.
//!
//! Flags: `--users M` (default 20), `--contacts N` (default M), `--messages K` per direction
//! (default 5000), `--paced-secs S` (default 15), `--quick` (4 users, 200 messages, 3 s paced),
//! `--postgres URI` (the bridge's database in Postgres instead of SQLite; give an empty database
//! of its own, which the bridge migrates and the bench leaves as it is afterwards).
//! `--synapse`: the real system instead of the stand-in. A Synapse from the test venv (as the
//! end-to-end tests start it: SQLite, rate limits raised) with the bridge registered; the Matrix
//! users are real Synapse accounts that join their portals and send through the client-server
//! API, and read what arrives through `/sync` (one long-polling sync loop per user). Latency is
//! then from the user's `PUT .../send` to the contact, and from the contact's `send` to the
//! event showing up in the user's sync. Synapse shares the two cores with everything else.

// A bench binary's report is its standard output.
#![allow(clippy::print_stdout)]

/// The end-to-end harness (Synapse set-up, client-server API client) for `--synapse`.
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use matrix_interop_bridge::{
    interop::{AccountHandle, Event, GatewayAddr, GatewayConn, SignalRuntime, Target, account},
    store::testing,
    vault::{SecretKey, Vault, VaultStore},
    wire::{
        content::{DataMessage, Text, data_message::Body as D},
        noise::StaticKey,
    },
};
use mib_gateway::{CodeDelivery, Gateway, GatewayConfig};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinSet};

const DOMAIN: &str = "bench";
const CODE: &str = "123456";
const AS_TOKEN: &str = "bench-as-token-0123456789abcdef";
const HS_TOKEN: &str = "bench-hs-token-0123456789abcdef";
const PROV_SECRET: &str = "bench-provisioning-secret-0123456789";
/// base64 of the 32 bytes "0123456789abcdef0123456789abcdef".
const VAULT_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
/// Events per appservice transaction in the Matrix→interop runs.
const TXN_EVENTS: usize = 50;
/// Transactions in flight in the Matrix→interop max run.
const TXN_INFLIGHT: usize = 4;
/// Sends in flight per contact in the interop→Matrix max run.
const SEND_INFLIGHT: usize = 4;
/// A run fails when no message arrives for this long.
const STALL: Duration = Duration::from_secs(45);

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    users: usize,
    contacts: usize,
    messages: usize,
    paced_secs: f64,
    quick: bool,
    /// The bridge's database: `None` for SQLite in the temporary directory, or a Postgres URI.
    postgres: Option<String>,
    /// A real Synapse instead of the stand-in homeserver.
    synapse: bool,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = if quick {
        Opts {
            users: 4,
            contacts: 0,
            messages: 200,
            paced_secs: 3.0,
            quick,
            postgres: None,
            synapse: false,
        }
    } else {
        Opts {
            users: 20,
            contacts: 0,
            messages: 5000,
            paced_secs: 15.0,
            quick,
            postgres: None,
            synapse: false,
        }
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> f64 {
            it.next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| *v > 0.0)
                .unwrap_or_else(|| panic!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--users" => o.users = num("--users") as usize,
            "--contacts" => o.contacts = num("--contacts") as usize,
            "--messages" => o.messages = num("--messages") as usize,
            "--paced-secs" => o.paced_secs = num("--paced-secs"),
            "--postgres" => {
                let uri = it.next().filter(|u| u.starts_with("postgres"));
                o.postgres = Some(uri.expect("--postgres needs a postgres:// URI").clone());
            }
            "--synapse" => o.synapse = true,
            // `cargo bench` passes --bench; anything else is ignored too.
            _ => {}
        }
    }
    if o.contacts == 0 || o.contacts > o.users {
        o.contacts = o.users;
    }
    o.messages = o.messages.max(o.users);
    o
}

// ---------------------------------------------------------------------------------------------
// Send and arrival times of numbered messages. A message body is "bench <run> <seq>".

struct Track {
    name: String,
    sent: Vec<AtomicU64>,
    recv: Vec<AtomicU64>,
    received: AtomicUsize,
    dups: AtomicUsize,
}

impl Track {
    fn len(&self) -> usize {
        self.sent.len()
    }
}

struct Registry {
    epoch: Instant,
    tracks: RwLock<Vec<Arc<Track>>>,
    /// Message bodies that belong to no run (should stay 0).
    stray: AtomicUsize,
}

impl Registry {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            tracks: RwLock::new(Vec::new()),
            stray: AtomicUsize::new(0),
        })
    }

    /// Nanoseconds since the epoch, plus one (0 means "not yet").
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn track(&self, name: &str, n: usize) -> (usize, Arc<Track>) {
        let t = Arc::new(Track {
            name: name.to_owned(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            recv: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicUsize::new(0),
            dups: AtomicUsize::new(0),
        });
        let mut tracks = self.tracks.write().expect("tracks lock");
        tracks.push(t.clone());
        (tracks.len() - 1, t)
    }

    fn body(run: usize, seq: usize) -> String {
        format!("bench {run} {seq}")
    }

    fn mark_sent(&self, t: &Track, seq: usize) {
        t.sent[seq].store(self.now(), Ordering::Relaxed);
    }

    /// Records the arrival of a message body at its far end.
    fn arrived(&self, body: &str) {
        let now = self.now();
        let mut parts = body.split_whitespace();
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some("bench"), Some(r), Some(s)) => {
                r.parse::<usize>().ok().zip(s.parse::<usize>().ok())
            }
            _ => None,
        };
        let track = parsed.and_then(|(r, s)| {
            self.tracks
                .read()
                .expect("tracks lock")
                .get(r)
                .cloned()
                .map(|t| (t, s))
        });
        match track {
            Some((t, seq)) if seq < t.len() => {
                if t.recv[seq]
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    t.received.fetch_add(1, Ordering::Relaxed);
                } else {
                    t.dups.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in homeserver

#[derive(Default)]
struct HsState {
    rooms: AtomicU64,
    events: AtomicU64,
    /// Requests by route.
    routes: Mutex<BTreeMap<&'static str, u64>>,
    /// (user, txn) → event id, so a retried send gets the same answer (as from a homeserver).
    txns: Mutex<HashMap<(String, String), String>>,
    replayed_txns: AtomicU64,
    bad_auth: AtomicU64,
    /// Notices the bot sent (errors shown to users); the first few are kept.
    notices: Mutex<Vec<String>>,
    notice_count: AtomicU64,
}

struct Hs {
    state: HsState,
    reg: Arc<Registry>,
}

fn pct_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matrix_error(status: StatusCode, errcode: &str, msg: &str) -> Response {
    (status, Json(json!({"errcode": errcode, "error": msg}))).into_response()
}

async fn hs_handler(
    State(hs): State<Arc<Hs>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let segs: Vec<String> = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(pct_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let user_id = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "user_id")
            .map(|(_, v)| v.into_owned())
    });
    let st = &hs.state;
    let route: &'static str = match (method.as_str(), s.as_slice()) {
        ("GET", ["_matrix", "client", "versions"]) => "versions",
        ("POST", ["_matrix", "client", "v3", "register"]) => "register",
        ("PUT", ["_matrix", "client", "v3", "profile", ..]) => "profile",
        ("POST", ["_matrix", "client", "v1", "appservice", _, "ping"]) => "ping",
        ("GET", ["_matrix", "client", "v3", "capabilities"]) => "capabilities",
        ("POST", ["_matrix", "client", "v3", "createRoom"]) => "createRoom",
        ("POST", ["_matrix", "client", "v3", "rooms", _, "join"])
        | ("POST", ["_matrix", "client", "v3", "join", _]) => "join",
        ("PUT", ["_matrix", "client", "v3", "rooms", _, "send", ..]) => "send",
        ("GET", ["_matrix", "client", "v3", "rooms", _, "joined_members"]) => "joined_members",
        _ => "other",
    };
    *st.routes
        .lock()
        .expect("routes lock")
        .entry(route)
        .or_default() += 1;
    if route != "versions" {
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok());
        if auth != Some(format!("Bearer {AS_TOKEN}").as_str()) {
            st.bad_auth.fetch_add(1, Ordering::Relaxed);
            return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad as_token");
        }
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let out = match (route, s.as_slice()) {
        ("versions", _) => json!({"versions": ["v1.11", "v1.12"]}),
        ("register", _) => {
            let local = parsed["username"].as_str().unwrap_or("anonymous");
            json!({"user_id": format!("@{local}:{DOMAIN}")})
        }
        ("ping", _) => json!({"duration_ms": 1}),
        ("capabilities", _) => {
            json!({"capabilities": {"m.room_versions": {"default": "12", "available": {"12": "stable"}}}})
        }
        ("createRoom", _) => {
            let n = st.rooms.fetch_add(1, Ordering::Relaxed);
            json!({"room_id": format!("!benchroom{n}:{DOMAIN}")})
        }
        ("join", [.., room, "join"]) | ("join", [.., "join", room]) => json!({"room_id": room}),
        ("send", [_, _, _, _, _room, _, _ty, txn]) => {
            let sender = user_id.clone().unwrap_or_default();
            let key = (sender.clone(), (*txn).to_owned());
            let (event_id, replay) = {
                let mut txns = st.txns.lock().expect("txns lock");
                match txns.get(&key) {
                    Some(e) => (e.clone(), true),
                    None => {
                        let e = format!("$benchev{}", st.events.fetch_add(1, Ordering::Relaxed));
                        txns.insert(key, e.clone());
                        (e, false)
                    }
                }
            };
            if replay {
                st.replayed_txns.fetch_add(1, Ordering::Relaxed);
            } else {
                let text = parsed["body"].as_str().unwrap_or_default();
                if parsed["msgtype"] == "m.notice" {
                    st.notice_count.fetch_add(1, Ordering::Relaxed);
                    let mut n = st.notices.lock().expect("notices lock");
                    if n.len() < 5 {
                        n.push(format!("{sender}: {text}"));
                    }
                } else {
                    hs.reg.arrived(text);
                }
            }
            json!({"event_id": event_id})
        }
        ("joined_members", _) => json!({"joined": {}}),
        _ => json!({}),
    };
    Json(out).into_response()
}

async fn start_homeserver(reg: Arc<Registry>) -> (Arc<Hs>, u16) {
    let hs = Arc::new(Hs {
        state: HsState::default(),
        reg,
    });
    let app = Router::new().fallback(hs_handler).with_state(hs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in homeserver");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (hs, port)
}

// ---------------------------------------------------------------------------------------------
// The bridge process

struct BridgeProc {
    child: Child,
    log: PathBuf,
}

impl BridgeProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BridgeProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of the bridge log ({}) ----\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct BridgeEndpoints {
    base: String,
    metrics: String,
}

fn write_config(
    dir: &Path,
    hs_url: &str,
    domain: &str,
    gw: &GatewayAddr,
    postgres: Option<&str>,
) -> (PathBuf, BridgeEndpoints) {
    use base64::Engine;
    let database = match postgres {
        Some(uri) => format!("database:\n    type: postgres\n    uri: \"{uri}\"\n"),
        None => format!(
            "database:\n    type: sqlite\n    uri: sqlite://{}\n",
            dir.join("bridge.db").display()
        ),
    };
    let port = common::free_port();
    let metrics_port = common::free_port();
    let key = base64::engine::general_purpose::STANDARD.encode(&gw.public_key);
    let text = format!(
        "homeserver:\n    address: {hs_url}\n    domain: {domain}\n\
         appservice:\n    address: http://127.0.0.1:{port}\n    hostname: 127.0.0.1\n    port: {port}\n    id: bench\n\
         \x20   as_token: {AS_TOKEN}\n    hs_token: {HS_TOKEN}\n\
         {database}\
         bridge:\n    permissions:\n        \"*\": user\n\
         interop:\n    gateway_address: {gw_addr}\n    gateway_public_key: \"{key}\"\n\
         provisioning:\n    enabled: true\n    prefix: /_matrix/provision\n    shared_secret: {PROV_SECRET}\n\
         metrics:\n    enabled: true\n    listen: 127.0.0.1:{metrics_port}\n\
         logging:\n    level: warn\n",
        gw_addr = gw.address,
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).expect("write bridge config");
    (
        path,
        BridgeEndpoints {
            base: format!("http://127.0.0.1:{port}"),
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        },
    )
}

fn spawn_bridge(config: &Path, dir: &Path) -> BridgeProc {
    let log = dir.join("bridge.log");
    let out = std::fs::File::create(&log).expect("bridge log");
    let err = out.try_clone().expect("clone log handle");
    let child = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"))
        .arg("-c")
        .arg(config)
        .env("MIB_VAULT_MASTER_KEY", VAULT_KEY)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start the bridge binary");
    BridgeProc { child, log }
}

/// Memory and CPU of a process, from /proc.
#[derive(Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_secs: f64,
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0)
}

fn sample(pid: &str, ticks: f64) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ProcSample {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu_secs: (field(11) + field(12)) / ticks,
    }
}

// ---------------------------------------------------------------------------------------------
// Contacts: interop accounts of our own client, in this process

struct Contact {
    account: String,
    handle: AccountHandle,
    _dir: tempfile::TempDir,
}

fn text(body: String) -> DataMessage {
    DataMessage {
        body: Some(D::Text(Text {
            body,
            formats: vec![],
        })),
        reply_to: None,
    }
}

/// Registers `account` at the gateway, starts its client, and feeds its messages to `reg`.
async fn start_contact(
    rt: &SignalRuntime,
    gw: &GatewayAddr,
    account: String,
    reg: Arc<Registry>,
    undecryptable: Arc<AtomicUsize>,
) -> Contact {
    let (store, dir) = testing::sqlite().await;
    let db: Arc<dyn VaultStore> = Arc::new(store);
    let vault = Vault::open(SecretKey::random(), db.clone())
        .await
        .expect("contact vault");
    let (conn, _pushes) = GatewayConn::connect(gw)
        .await
        .expect("connect to the gateway");
    conn.request_code(&account).await.expect("request code");
    let secret = conn.verify(&account, CODE).await.expect("verify");
    let owner = format!("@contact-{}:{DOMAIN}", account.trim_start_matches('+'));
    account::save_credentials(&vault, &db, &owner, &account, &secret)
        .await
        .expect("save credentials");
    let (tx, mut events) = mpsc::unbounded_channel();
    let handle = account::spawn_account(rt, &owner, gw.clone(), vault, db, tx)
        .await
        .expect("spawn contact");
    // Wait until it is connected (and has uploaded its prekeys).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Connected { .. })) => break,
            Ok(Some(_)) => {}
            Ok(None) => panic!("contact {account} stopped before connecting"),
            Err(_) => panic!("contact {account} did not connect in 60 s"),
        }
    }
    // Acks go through their own task, so receiving never waits on the account's command queue
    // (the account waits on this channel while it hands out events).
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u64>();
    let acker = handle.clone();
    tokio::spawn(async move {
        while let Some(id) = ack_rx.recv().await {
            acker.ack(id).await;
        }
    });
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Some(id) = ev.envelope_id() {
                let _ = ack_tx.send(id);
            }
            match ev {
                Event::Message {
                    data:
                        DataMessage {
                            body: Some(D::Text(t)),
                            ..
                        },
                    ..
                } => reg.arrived(&t.body),
                Event::Undecryptable { .. } => {
                    undecryptable.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    });
    Contact {
        account,
        handle,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------------
// The world

struct World {
    reg: Arc<Registry>,
    http: reqwest::Client,
    bridge_base: String,
    /// Matrix user ids, their interop accounts, and their portal rooms (index = user).
    users: Vec<String>,
    user_accounts: Vec<String>,
    rooms: Vec<String>,
    contacts: Vec<Contact>,
    txn_counter: AtomicU64,
    /// With `--synapse`: each user's client session (index = user); empty with the stand-in.
    clients: Vec<common::MatrixUser>,
    /// Sync loops that finished their first (initial) sync.
    synced: AtomicUsize,
    /// Sync responses whose timeline was cut short (messages would be missing).
    sync_limited: AtomicUsize,
}

impl World {
    fn contact_of(&self, user: usize) -> usize {
        user % self.contacts.len()
    }

    async fn provision(&self, path: &str, user: &str, body: Value) -> Value {
        let url = format!(
            "{}/_matrix/provision/v1/{path}?user_id={}",
            self.bridge_base,
            urlencode(user)
        );
        let resp = self
            .http
            .post(url)
            .bearer_auth(PROV_SECRET)
            .json(&body)
            .send()
            .await
            .expect("provisioning request");
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "provisioning {path} for {user}: {status} {v}"
        );
        v
    }

    fn event(&self, run: usize, seq: usize) -> Value {
        let u = seq % self.users.len();
        json!({
            "type": "m.room.message",
            "room_id": self.rooms[u],
            "sender": self.users[u],
            "event_id": format!("$bench-{run}-{seq}"),
            "origin_server_ts": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "content": {"msgtype": "m.text", "body": Registry::body(run, seq)},
        })
    }

    /// Pushes one appservice transaction with the given messages; marks them sent first.
    async fn push(self: Arc<Self>, track: Arc<Track>, run: usize, seqs: Vec<usize>) {
        let events: Vec<Value> = seqs.iter().map(|&s| self.event(run, s)).collect();
        let txn = self.txn_counter.fetch_add(1, Ordering::Relaxed);
        let url = format!(
            "{}/_matrix/app/v1/transactions/bench-{txn}",
            self.bridge_base
        );
        for &s in &seqs {
            self.reg.mark_sent(&track, s);
        }
        let resp = self
            .http
            .put(url)
            .bearer_auth(HS_TOKEN)
            .json(&json!({"events": events}))
            .send()
            .await
            .expect("push transaction");
        assert!(
            resp.status().is_success(),
            "transaction refused: {}",
            resp.status()
        );
    }

    /// With `--synapse`: user `seq % M` sends message `seq` through the client-server API.
    async fn client_send(self: Arc<Self>, track: Arc<Track>, run: usize, seq: usize) {
        let u = seq % self.users.len();
        let c = &self.clients[u];
        let txn = self.txn_counter.fetch_add(1, Ordering::Relaxed);
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/bench-{txn}",
            urlencode(&self.rooms[u])
        );
        self.reg.mark_sent(&track, seq);
        let body = json!({"msgtype": "m.text", "body": Registry::body(run, seq)});
        let (status, v) = c.call(reqwest::Method::PUT, &path, Some(body)).await;
        assert_eq!(status, 200, "{} cannot send: {v}", c.user_id);
    }

    /// Sends Matrix→interop message `seq`: a transaction to the bridge (stand-in), or a client
    /// send through Synapse.
    async fn matrix_send(self: Arc<Self>, track: Arc<Track>, run: usize, seqs: Vec<usize>) {
        if self.clients.is_empty() {
            self.push(track, run, seqs).await;
        } else {
            for seq in seqs {
                self.clone().client_send(track.clone(), run, seq).await;
            }
        }
    }

    /// One interop message from the contact of `seq`'s user to that user.
    /// Who sends `seq` in an interop-side run (a contact index), and to which account: the
    /// contact of the seq's user, to that user; in the reference run, a contact to its partner.
    fn interop_send(&self, dir: Dir, seq: usize) -> (usize, String) {
        if dir == Dir::Reference {
            let n = self.contacts.len();
            let c = seq % n;
            let partner = if c ^ 1 < n { c ^ 1 } else { c - 1 };
            (c, self.contacts[partner].account.clone())
        } else {
            let u = seq % self.users.len();
            (self.contact_of(u), self.user_accounts[u].clone())
        }
    }

    /// One interop message from a contact (see [`World::interop_send`]).
    async fn contact_send(self: Arc<Self>, track: Arc<Track>, dir: Dir, run: usize, seq: usize) {
        let (sender, to) = self.interop_send(dir, seq);
        let c = &self.contacts[sender];
        self.reg.mark_sent(&track, seq);
        c.handle
            .send(
                Target::Account(to),
                uuid::Uuid::new_v4().to_string(),
                text(Registry::body(run, seq)),
            )
            .await
            .unwrap_or_else(|e| panic!("contact {} cannot send: {e}", c.account));
    }
}

/// With `--synapse`: user `u`'s sync loop; every bench message from someone else in its rooms
/// is an arrival. The initial sync only sets the starting point.
async fn sync_loop(world: Arc<World>, u: usize) {
    let c = &world.clients[u];
    let filter = json!({
        "room": {
            "timeline": {"limit": 1000, "types": ["m.room.message"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
        "presence": {"types": []},
        "account_data": {"types": []},
    });
    let filter = urlencode(&filter.to_string());
    let mut since = String::new();
    loop {
        let path = if since.is_empty() {
            format!("/_matrix/client/v3/sync?timeout=0&filter={filter}")
        } else {
            format!("/_matrix/client/v3/sync?timeout=30000&filter={filter}&since={since}")
        };
        // Not `MatrixUser::call`: a sync that fails (Synapse going down at the end) is retried.
        let resp = c
            .http
            .get(format!("{}{path}", c.base))
            .bearer_auth(&c.token)
            .send()
            .await;
        let b: Value = match resp {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if since.is_empty() {
            world.synced.fetch_add(1, Ordering::Relaxed);
        } else if let Some(rooms) = b["rooms"]["join"].as_object() {
            for r in rooms.values() {
                if r["timeline"]["limited"] == true {
                    world.sync_limited.fetch_add(1, Ordering::Relaxed);
                }
                for e in r["timeline"]["events"].as_array().into_iter().flatten() {
                    if e["sender"] != c.user_id.as_str()
                        && let Some(body) = e["content"]["body"].as_str()
                    {
                        world.reg.arrived(body);
                    }
                }
            }
        }
        since = b["next_batch"].as_str().unwrap_or_default().to_owned();
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Waits until every message of `track` arrived; panics when nothing arrives for `STALL`.
async fn wait_done(track: &Track, bridge: &mut BridgeProc) {
    let mut last = usize::MAX;
    let mut since = Instant::now();
    loop {
        let got = track.received.load(Ordering::Relaxed);
        if got >= track.len() {
            return;
        }
        if got != last {
            last = got;
            since = Instant::now();
        }
        assert!(bridge.alive(), "the bridge exited during {}", track.name);
        assert!(
            since.elapsed() < STALL,
            "{}: {got} of {} messages arrived, then nothing for {} s",
            track.name,
            track.len(),
            STALL.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Runs

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    MatrixToInterop,
    InteropToMatrix,
    /// Contacts to contacts through the gateway, without the bridge: the ceiling of everything
    /// but the bridge on this machine.
    Reference,
}

impl Dir {
    fn label(self) -> &'static str {
        match self {
            Dir::MatrixToInterop => "Matrix → interop",
            Dir::InteropToMatrix => "interop → Matrix",
            Dir::Reference => "interop → interop",
        }
    }
}

struct RunResult {
    dir: Dir,
    kind: String,
    n: usize,
    secs: f64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    bridge_cpu_pct: f64,
    bridge_cpu_us_per_msg: f64,
    bench_cpu_pct: f64,
    dups: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summarize(
    dir: Dir,
    kind: String,
    t: &Track,
    cpu: (ProcSample, ProcSample),
    me: (ProcSample, ProcSample),
) -> RunResult {
    let mut lat = Vec::with_capacity(t.len());
    let (mut first, mut last) = (u64::MAX, 0u64);
    for i in 0..t.len() {
        let (s, r) = (
            t.sent[i].load(Ordering::Relaxed),
            t.recv[i].load(Ordering::Relaxed),
        );
        first = first.min(s);
        last = last.max(r);
        lat.push(r.saturating_sub(s) as f64 / 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let secs = (last.saturating_sub(first)) as f64 / 1e9;
    let n = t.len();
    let bridge_cpu = cpu.1.cpu_secs - cpu.0.cpu_secs;
    let bench_cpu = me.1.cpu_secs - me.0.cpu_secs;
    RunResult {
        dir,
        kind,
        n,
        secs,
        rate: n as f64 / secs.max(1e-9),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        bridge_cpu_pct: 100.0 * bridge_cpu / secs.max(1e-9),
        bridge_cpu_us_per_msg: 1e6 * bridge_cpu / n as f64,
        bench_cpu_pct: 100.0 * bench_cpu / secs.max(1e-9),
        dups: t.dups.load(Ordering::Relaxed),
    }
}

/// Sends `n` messages in `dir` at full speed (`rate` = None) or paced at `rate` per second.
async fn run(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    dir: Dir,
    name: &str,
    n: usize,
    rate: Option<f64>,
) -> Arc<Track> {
    let (run, track) = world.reg.track(name, n);
    let mut tasks: JoinSet<()> = JoinSet::new();
    match (dir, rate) {
        (Dir::MatrixToInterop, None) if world.clients.is_empty() => {
            let seqs: Vec<usize> = (0..n).collect();
            for chunk in seqs.chunks(TXN_EVENTS) {
                tasks.spawn(world.clone().push(track.clone(), run, chunk.to_vec()));
                if tasks.len() >= TXN_INFLIGHT
                    && let Some(r) = tasks.join_next().await
                {
                    r.expect("push task");
                }
            }
        }
        (_, None) => {
            // Each contact (or, Matrix→interop through Synapse, each user) sends its share,
            // SEND_INFLIGHT at a time.
            let senders = if dir == Dir::MatrixToInterop {
                world.users.len()
            } else {
                world.contacts.len()
            };
            let mut shares: Vec<Vec<usize>> = vec![Vec::new(); senders];
            for seq in 0..n {
                let who = if dir == Dir::MatrixToInterop {
                    seq % senders
                } else {
                    world.interop_send(dir, seq).0
                };
                shares[who].push(seq);
            }
            for share in shares {
                let (w, t) = (world.clone(), track.clone());
                tasks.spawn(async move {
                    let mut inflight = JoinSet::new();
                    for seq in share {
                        if dir == Dir::MatrixToInterop {
                            inflight.spawn(w.clone().client_send(t.clone(), run, seq));
                        } else {
                            inflight.spawn(w.clone().contact_send(t.clone(), dir, run, seq));
                        }
                        if inflight.len() >= SEND_INFLIGHT
                            && let Some(r) = inflight.join_next().await
                        {
                            r.expect("send task");
                        }
                    }
                    while let Some(r) = inflight.join_next().await {
                        r.expect("send task");
                    }
                });
            }
        }
        (_, Some(rate)) => {
            let start = Instant::now();
            let mut next = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while next < n {
                tick.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
                if due > next {
                    match dir {
                        Dir::MatrixToInterop => {
                            let seqs: Vec<usize> = (next..due).collect();
                            let chunk = if world.clients.is_empty() {
                                TXN_EVENTS
                            } else {
                                1
                            };
                            for c in seqs.chunks(chunk) {
                                tasks.spawn(world.clone().matrix_send(
                                    track.clone(),
                                    run,
                                    c.to_vec(),
                                ));
                            }
                        }
                        Dir::InteropToMatrix | Dir::Reference => {
                            for seq in next..due {
                                tasks.spawn(world.clone().contact_send(
                                    track.clone(),
                                    dir,
                                    run,
                                    seq,
                                ));
                            }
                        }
                    }
                    next = due;
                }
                while let Some(r) = tasks.try_join_next() {
                    r.expect("send task");
                }
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("send task");
    }
    wait_done(&track, bridge).await;
    track
}

// ---------------------------------------------------------------------------------------------

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The reference gateway, in-process, with its rate limits out of the way; the sender stops it.
async fn start_gateway(dir: &Path) -> (GatewayAddr, tokio::sync::watch::Sender<bool>) {
    let key = StaticKey::generate();
    let mut gcfg = GatewayConfig::new(
        key.clone(),
        format!("sqlite://{}", dir.join("gateway.db").display()),
        dir.join("blobs"),
    );
    gcfg.codes = CodeDelivery::DevFixed(CODE.into());
    gcfg.limits.registrations_per_source = u32::MAX;
    gcfg.rate_per_sec = 1e9;
    gcfg.rate_capacity = 1e9;
    let gw = Gateway::open(gcfg).await.expect("gateway");
    let gl = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    let gaddr = GatewayAddr {
        address: gl.local_addr().expect("addr").to_string(),
        public_key: key.public.clone(),
    };
    let (gw_stop, gw_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(gw.serve(gl, gw_rx));

    (gaddr, gw_stop)
}

/// Waits until /health answers and the start-up checks reached the ping (stand-in) or /ready
/// answers (Synapse).
async fn wait_ready(
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
    hs: Option<&Arc<Hs>>,
    bridge: &mut BridgeProc,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let healthy = http
            .get(format!("{}/health", ends.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let pinged = match &hs {
            Some(hs) => {
                hs.state
                    .routes
                    .lock()
                    .expect("routes lock")
                    .get("ping")
                    .copied()
                    .unwrap_or(0)
                    > 0
            }
            None => http
                .get(format!("{}/ready", ends.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
        };
        if healthy && pinged {
            break;
        }
        assert!(bridge.alive(), "the bridge exited at start-up");
        assert!(
            Instant::now() < deadline,
            "the bridge did not become ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The measured runs: a warm-up each way, then per direction a run at full speed and one paced
/// at half that rate, then the reference without the bridge. Returns the results, the bridge's
/// memory after each direction, and its sample after the warm-up.
async fn measure(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    opts: &Opts,
    pid: &str,
    ticks: f64,
) -> (Vec<RunResult>, Vec<(Dir, ProcSample)>, ProcSample) {
    // Warm-up: one message per pair each way (Signal sessions), not measured.
    run(
        world,
        bridge,
        Dir::MatrixToInterop,
        "warm-up Matrix→interop",
        opts.users,
        None,
    )
    .await;
    run(
        world,
        bridge,
        Dir::InteropToMatrix,
        "warm-up interop→Matrix",
        opts.users,
        None,
    )
    .await;
    let warm = sample(pid, ticks);

    let me = || sample("self", ticks);
    let mut results = Vec::new();
    let mut rss_after = Vec::new();
    for dir in [Dir::MatrixToInterop, Dir::InteropToMatrix] {
        let (b0, m0) = (sample(pid, ticks), me());
        let t = run(
            world,
            bridge,
            dir,
            &format!("max {}", dir.label()),
            opts.messages,
            None,
        )
        .await;
        let max = summarize(dir, "max".into(), &t, (b0, sample(pid, ticks)), (m0, me()));
        let rate = (max.rate / 2.0).max(1.0);
        let n =
            ((rate * opts.paced_secs) as usize).clamp(opts.users.min(opts.messages), opts.messages);
        results.push(max);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (b0, m0) = (sample(pid, ticks), me());
        let t = run(
            world,
            bridge,
            dir,
            &format!("paced {}", dir.label()),
            n,
            Some(rate),
        )
        .await;
        results.push(summarize(
            dir,
            format!("paced {rate:.0}/s"),
            &t,
            (b0, sample(pid, ticks)),
            (m0, me()),
        ));
        rss_after.push((dir, sample(pid, ticks)));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Reference: the same client and gateway without the bridge (contacts in pairs).
    if opts.contacts >= 2 {
        let dir = Dir::Reference;
        run(world, bridge, dir, "warm-up reference", opts.contacts, None).await;
        let (b0, m0) = (sample(pid, ticks), me());
        let t = run(world, bridge, dir, "reference max", opts.messages, None).await;
        results.push(summarize(
            dir,
            "max, no bridge".into(),
            &t,
            (b0, sample(pid, ticks)),
            (m0, me()),
        ));
    }

    (results, rss_after, warm)
}

/// The results table: rate, latency and CPU per run.
fn print_table(results: &[RunResult]) {
    println!();
    println!(
        "{:<17} {:<14} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9}",
        "direction",
        "run",
        "msgs",
        "time s",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "bridge",
        "bridge",
        "bench"
    );
    println!(
        "{:<17} {:<14} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9}",
        "", "", "", "", "", "", "", "", "CPU %", "CPU µs/msg", "CPU %"
    );
    for r in results {
        println!(
            "{:<17} {:<14} {:>6} {:>7.2} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>10.0} {:>9.0}{}",
            r.dir.label(),
            r.kind,
            r.n,
            r.secs,
            r.rate,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.bridge_cpu_pct,
            r.bridge_cpu_us_per_msg,
            r.bench_cpu_pct,
            if r.dups > 0 {
                format!("  ({} duplicates)", r.dups)
            } else {
                String::new()
            }
        );
    }
}

/// The bridge's error counters and the warnings in its log.
async fn print_bridge_health(http: &reqwest::Client, ends: &BridgeEndpoints, log: &Path) {
    if let Ok(r) = http.get(&ends.metrics).send().await {
        let text = r.text().await.unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.starts_with("mib_errors")
                        || l.starts_with("mib_appservice_transactions")
                        || l.starts_with("mib_appservice_duplicate"))
            })
            .collect();
        println!("bridge metrics: {}", lines.join(", "));
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let warns: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!("bridge log: {} warning/error lines", warns.len());
    for l in warns.iter().take(5) {
        println!("  {}", l.chars().take(300).collect::<String>());
    }
}

async fn bench(opts: Opts) {
    let ticks = clock_ticks();
    let t0 = Instant::now();
    let reg = Registry::new();
    let tmp = tempfile::tempdir().expect("temp dir");

    let (gaddr, _gw_stop) = start_gateway(tmp.path()).await;

    let domain = if opts.synapse { "localhost" } else { DOMAIN };
    let pg = opts.postgres.as_deref();
    let (hs, synapse, config, ends) = if opts.synapse {
        let placeholder = common::HS_PLACEHOLDER;
        let (config, ends) = write_config(tmp.path(), placeholder, domain, &gaddr, pg);
        let registration = tmp.path().join("registration.yaml");
        let out = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"))
            .args(["generate-registration", "-c"])
            .arg(&config)
            .arg("-o")
            .arg(&registration)
            .output()
            .expect("generate-registration");
        assert!(out.status.success(), "generate-registration failed");
        let synapse =
            common::Synapse::start_for_bridge(&tmp.path().join("hs"), &config, &registration).await;
        (None, Some(synapse), config, ends)
    } else {
        let (hs, hs_port) = start_homeserver(reg.clone()).await;
        let url = format!("http://127.0.0.1:{hs_port}");
        let (config, ends) = write_config(tmp.path(), &url, domain, &gaddr, pg);
        (Some(hs), None, config, ends)
    };
    let mut bridge = spawn_bridge(&config, tmp.path());
    let pid = bridge.pid().to_string();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("http client");

    wait_ready(&http, &ends, hs.as_ref(), &mut bridge).await;
    let t_ready = t0.elapsed();
    let started = sample(&pid, ticks);

    // Contacts.
    let signal_rt = SignalRuntime::start(2);
    let undecryptable = Arc::new(AtomicUsize::new(0));
    let contacts: Vec<Contact> = futures::stream::iter((0..opts.contacts).map(|i| {
        start_contact(
            &signal_rt,
            &gaddr,
            format!("+1555200{i:04}"),
            reg.clone(),
            undecryptable.clone(),
        )
    }))
    .buffered(4)
    .collect()
    .await;
    let t_contacts = t0.elapsed();

    let users: Vec<String> = (0..opts.users)
        .map(|i| format!("@bench{i}:{domain}"))
        .collect();
    let mut clients = Vec::new();
    if let Some(synapse) = &synapse {
        for i in 0..opts.users {
            clients.push(synapse.user(&format!("bench{i}")).await);
        }
    }
    let user_accounts: Vec<String> = (0..opts.users).map(|i| format!("+1555100{i:04}")).collect();
    let mut world = World {
        reg: reg.clone(),
        http: http.clone(),
        bridge_base: ends.base.clone(),
        users,
        user_accounts,
        rooms: Vec::new(),
        contacts,
        txn_counter: AtomicU64::new(0),
        clients,
        synced: AtomicUsize::new(0),
        sync_limited: AtomicUsize::new(0),
    };

    // Logins through the provisioning API.
    let w = &world;
    futures::stream::iter((0..opts.users).map(|i| async move {
        w.provision(
            "login/start",
            &w.users[i],
            json!({"identifier": w.user_accounts[i]}),
        )
        .await;
        w.provision("login/verify", &w.users[i], json!({"code": CODE}))
            .await;
    }))
    .buffer_unordered(4)
    .collect::<Vec<()>>()
    .await;
    let t_logins = t0.elapsed();

    // One DM portal per user, with its contact.
    let rooms: Vec<String> = futures::stream::iter((0..opts.users).map(|i| async move {
        let contact = &w.contacts[w.contact_of(i)].account;
        let v = w
            .provision("chats", &w.users[i], json!({"contact": contact}))
            .await;
        v["chat"]["room_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no room in {v}"))
            .to_owned()
    }))
    .buffered(4)
    .collect()
    .await;
    world.rooms = rooms;
    // Through Synapse, each user joins its portal and reads it through its own sync loop.
    for (c, room) in world.clients.iter().zip(&world.rooms) {
        c.join(room).await;
    }
    let world = Arc::new(world);
    for u in 0..world.clients.len() {
        tokio::spawn(sync_loop(world.clone(), u));
    }
    while world.synced.load(Ordering::Relaxed) < world.clients.len() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_portals = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = sample(&pid, ticks);

    println!(
        "bridge_load: {} Matrix users, {} interop contacts, {} messages per direction{}; homeserver {}; bridge database {} (bridge pid {pid})",
        opts.users,
        opts.contacts,
        opts.messages,
        if opts.quick { " (--quick)" } else { "" },
        if opts.synapse { "Synapse" } else { "stand-in" },
        if opts.postgres.is_some() {
            "Postgres"
        } else {
            "SQLite"
        }
    );
    println!(
        "set-up: bridge ready {:.1} s, contacts registered {:.1} s, logins {:.1} s, portals {:.1} s (cumulative)",
        t_ready.as_secs_f64(),
        t_contacts.as_secs_f64(),
        t_logins.as_secs_f64(),
        t_portals.as_secs_f64()
    );

    let synapse_pid = synapse.as_ref().map(|s| s.proc.pid().to_string());
    let synapse_start = synapse_pid.as_deref().map(|p| sample(p, ticks));
    let (results, rss_after, warm) = measure(&world, &mut bridge, &opts, &pid, ticks).await;
    let end = sample(&pid, ticks);
    let me = || sample("self", ticks);
    print_table(&results);
    println!();
    print!(
        "bridge RSS: after start-up {:.1} MiB, idle after {} logins and portals {:.1} MiB, after warm-up {:.1} MiB",
        mib(started.rss_kib),
        opts.users,
        mib(idle.rss_kib),
        mib(warm.rss_kib)
    );
    for (dir, s) in &rss_after {
        print!(", after {} {:.1} MiB", dir.label(), mib(s.rss_kib));
    }
    println!("; peak (VmHWM) {:.1} MiB", mib(end.hwm_kib));
    println!(
        "bridge CPU: {:.1} s in all ({:.1} s during set-up); bench process (gateway, contacts, stand-in): {:.1} s",
        end.cpu_secs,
        idle.cpu_secs,
        me().cpu_secs
    );

    if let (Some(p), Some(s0)) = (&synapse_pid, &synapse_start) {
        let s1 = sample(p, ticks);
        println!(
            "Synapse: {:.1} s CPU during the runs, RSS {:.1} MiB at the end; {} sync responses cut short (limited)",
            s1.cpu_secs - s0.cpu_secs,
            mib(s1.rss_kib),
            world.sync_limited.load(Ordering::Relaxed)
        );
    }
    println!(
        "anomalies: {} stray bodies, {} undecryptable at contacts",
        reg.stray.load(Ordering::Relaxed),
        undecryptable.load(Ordering::Relaxed)
    );
    if let Some(hs) = &hs {
        stand_in_report(hs);
    }
    print_bridge_health(&http, &ends, &bridge.log).await;
    bridge.stop();
    drop(world);
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
}

/// What the stand-in homeserver saw.
fn stand_in_report(hs: &Hs) {
    let st = &hs.state;
    let routes: Vec<String> = st
        .routes
        .lock()
        .expect("routes lock")
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("stand-in homeserver requests: {}", routes.join(", "));
    println!(
        "stand-in anomalies: {} replayed send txns, {} bad as_token, {} bot notices",
        st.replayed_txns.load(Ordering::Relaxed),
        st.bad_auth.load(Ordering::Relaxed),
        st.notice_count.load(Ordering::Relaxed),
    );
    for n in st.notices.lock().expect("notices lock").iter() {
        println!("  notice: {n}");
    }
}

fn main() {
    let opts = parse_opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(opts));
    rt.shutdown_timeout(Duration::from_secs(2));
}
