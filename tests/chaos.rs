//! The chaos suite: tries to break the delivery promise of docs/architecture.md (every message
//! reaches the other side exactly once, in order per chat) with a real Synapse, the reference
//! gateway run as the `interop-gateway` binary, the bridge binary and contacts on the official
//! libsignal (tests/peers/contact.js). The scenarios:
//!
//! - `two_way_streams_survive_kill_9` (SQLite) and `..._on_postgres` (a schema of its own on the
//!   shared test server): messages stream both ways through a DM and a group portal while the
//!   bridge is killed with SIGKILL (no shutdown code runs) at random moments, and the gateway
//!   once;
//! - `synapse_restart_mid_stream`: a two-way DM stream while Synapse is killed with SIGKILL and
//!   started again a few seconds later (same directory, database and port; access tokens stay
//!   valid);
//! - `postgres_outage_mid_stream`: a two-way DM stream with the bridge on a PostgreSQL cluster the
//!   test runs itself (initdb in its directory; the shared server is never touched), stopped with
//!   `pg_ctl stop -m immediate` for about 5 seconds and started again. It needs the PostgreSQL
//!   server binaries (`/usr/lib/postgresql/*/bin` or `PATH`) and fails without them;
//! - `backlog_drains_in_order`: a backlog sent while the bridge is down drains in order with the
//!   senders' timestamps;
//! - `three_workers_one_killed_mid_stream`: three workers (`workers.enabled`) on one PostgreSQL
//!   schema behind a round-robin balancer; the worker running the login is killed with SIGKILL
//!   during a two-way DM and group stream and stays dead; the others take over (the report says
//!   after how long).
//!
//! In the streams about one step in ten sends an image instead of a text (its caption carries the
//! number), so that a blow can land inside a media transfer.
//!
//! Each test prints a table to stderr (sent, delivered, lost, duplicated, out of order, mangled,
//! worst delay per chat and direction) and fails when a message was lost, duplicated, reordered
//! or mangled (an image that arrived as something else).
//!
//! The defaults are sized for CI (each test well under 4 minutes on 2 cores, the outage scenarios
//! under one). Knobs:
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `MIB_CHAOS_MESSAGES` | 100; 60 in the outage scenarios | N: messages per direction per chat in the two-way scenarios |
//! | `MIB_CHAOS_KILLS` | 3 | K: SIGKILLs (and restarts) of the bridge during the stream; the gateway is killed once more |
//! | `MIB_CHAOS_OUTAGES` | 1 | how many times Synapse, or the PostgreSQL cluster, goes down in the outage scenarios |
//! | `MIB_CHAOS_SEED` | random, printed | seed of the blow moments, downtimes, pauses and which messages are images |
//! | `MIB_CHAOS_BACKLOG` | 300 | M: messages the contact sends while the bridge is down in `backlog_drains_in_order` |
//! | `MIB_CHAOS_PACE_MS` | 300 | mean pause between two steps of one sender (each step sends to every chat of that sender) |
//!
//! A long run: `MIB_CHAOS_MESSAGES=2000 MIB_CHAOS_KILLS=20 MIB_CHAOS_OUTAGES=10 cargo nextest run
//! --test chaos`. `MIB_KEEP_TEST_DIRS=1` keeps the logs (one file per bridge, gateway and Synapse
//! run; `pg/postgres.log`) and databases. A failure is replayed (same schedule of blows, same
//! pauses) with the printed `MIB_CHAOS_SEED`.

mod common;

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{
    BridgeSetup, GatewayProc, MatrixUser, Proc, Synapse, WorkerSet, free_port,
    interop::{CODE, random_account},
    keep_log,
    node::{NodeContact, now_ms},
    pg::{drop_pg_schema, point_config_at_postgres, use_fresh_pg_schema},
    portal::{BOT, ghost_of, login, start_chat},
    urlencode,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------- knobs

struct Knobs {
    /// `MIB_CHAOS_MESSAGES`; each scenario has its own default.
    messages: Option<usize>,
    kills: usize,
    outages: usize,
    backlog: usize,
    pace_ms: u64,
    seed: u64,
}

impl Knobs {
    fn from_env() -> Self {
        fn num(name: &str, default: u64) -> u64 {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
                Err(_) => default,
            }
        }
        let seed = num("MIB_CHAOS_SEED", rand::random::<u64>() >> 12);
        Self {
            messages: std::env::var_os("MIB_CHAOS_MESSAGES")
                .map(|_| num("MIB_CHAOS_MESSAGES", 0) as usize),
            kills: num("MIB_CHAOS_KILLS", 3) as usize,
            outages: num("MIB_CHAOS_OUTAGES", 1) as usize,
            backlog: num("MIB_CHAOS_BACKLOG", 300) as usize,
            pace_ms: num("MIB_CHAOS_PACE_MS", 300),
            seed,
        }
    }
}

fn pause(rng: &mut StdRng, pace_ms: u64) -> Duration {
    Duration::from_millis(rng.random_range(0..=2 * pace_ms))
}

// ------------------------------------------------------------------------ the environment

#[derive(Clone, Copy)]
enum Db {
    Sqlite,
    /// A schema of its own on the shared test server (`MIB_TEST_PG_URL`), never stopped.
    Postgres,
    /// A PostgreSQL cluster of the test's own, which the test may stop.
    OwnPostgres,
}

enum Bridge {
    One(Proc),
    Workers(WorkerSet),
}

// Fields drop in order: processes first (the bridge before its database), the directory with
// their logs last.
struct ChaosEnv {
    /// The bridge, or the workers when there are several.
    bridge: Bridge,
    synapse: Synapse,
    gw: GatewayProc,
    pg: Option<PgCluster>,
    setup: BridgeSetup,
    bridge_runs: u32,
    pg_schema: Option<String>,
    _tmp: tempfile::TempDir,
}

impl ChaosEnv {
    async fn start(db: Db) -> Self {
        Self::start_with(db, 1).await
    }

    async fn start_with(db: Db, workers: usize) -> Self {
        let mut tmp = tempfile::tempdir().expect("tmp");
        if std::env::var_os("MIB_KEEP_TEST_DIRS").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("test files kept in {}", tmp.path().display());
        }
        let gw = GatewayProc::start(&tmp.path().join("gateway")).await;
        let setup = BridgeSetup::write_full(
            tmp.path(),
            8008,
            &[("*", "relay"), ("localhost", "user")],
            &format!("127.0.0.1:{}", gw.port),
            &gw.key_b64,
            "",
        );
        let (pg, pg_schema) = match db {
            Db::Sqlite => (None, None),
            Db::Postgres => (None, Some(use_fresh_pg_schema(&setup.config).await)),
            Db::OwnPostgres => {
                let pg = tokio::task::block_in_place(|| PgCluster::init(&tmp.path().join("pg")));
                let url = pg.ctl.url("postgres");
                let admin = sqlx::PgPool::connect(&url)
                    .await
                    .unwrap_or_else(|e| panic!("the test's own PostgreSQL at {url}: {e}"));
                sqlx::query("CREATE DATABASE chaos")
                    .execute(&admin)
                    .await
                    .expect("create database");
                admin.close().await;
                point_config_at_postgres(&setup.config, &pg.ctl.url("chaos"));
                (Some(pg), None)
            }
        };
        let synapse =
            Synapse::start_for_bridge(&tmp.path().join("hs"), &setup.config, &setup.registration)
                .await;
        // Workers once the config points at PostgreSQL (several are refused on SQLite).
        let bridge = if workers > 1 {
            Bridge::Workers(WorkerSet::start(&setup, workers).await)
        } else {
            Bridge::One(setup.start().await)
        };
        Self {
            bridge,
            synapse,
            gw,
            pg,
            setup,
            bridge_runs: 1,
            pg_schema,
            _tmp: tmp,
        }
    }

    /// A new contact on the official libsignal, registered with keys uploaded.
    fn node(&self) -> NodeContact {
        let mut n = NodeContact::spawn();
        n.setup(self.gw.port, &self.gw.key_b64, &random_account(), CODE);
        n
    }

    /// Starts the bridge again after a kill (same config and database); waits for /health.
    async fn start_bridge_again(&mut self) {
        let runs = self.bridge_runs;
        keep_log(&self.one().log, runs);
        self.bridge_runs += 1;
        self.bridge = Bridge::One(self.setup.start().await);
    }

    /// The one bridge (scenarios with one bridge process).
    fn one(&mut self) -> &mut Proc {
        match &mut self.bridge {
            Bridge::One(p) => p,
            Bridge::Workers(_) => panic!("one bridge process expected"),
        }
    }

    fn workers(&mut self) -> &mut WorkerSet {
        match &mut self.bridge {
            Bridge::Workers(w) => w,
            Bridge::One(_) => panic!("several workers expected"),
        }
    }

    fn all_running(&mut self) -> bool {
        match &mut self.bridge {
            Bridge::One(p) => p.is_running(),
            Bridge::Workers(w) => w.all_running(),
        }
    }

    /// Drops the PostgreSQL schema of a passed run (a failed one keeps it for inspection).
    async fn drop_pg_schema(&mut self) {
        if let Some(schema) = self.pg_schema.take() {
            match &mut self.bridge {
                Bridge::One(p) => p.kill(),
                Bridge::Workers(w) => w.kill_all(),
            }
            drop_pg_schema(&schema).await;
        }
    }
}

/// How to run the tools of a PostgreSQL cluster of the test's own.
#[derive(Clone)]
struct PgCtl {
    /// Where initdb, pg_ctl and postgres are.
    bin: PathBuf,
    /// The cluster's directory: `data/`, `postgres.log` and the server's socket.
    dir: PathBuf,
    port: u16,
    /// The user (uid, gid) the tools run as when the tests run as root, which PostgreSQL refuses.
    user: Option<(u32, u32)>,
}

impl PgCtl {
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.current_dir(&self.dir)
            .stdin(std::process::Stdio::null());
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.join(tool).display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\n---- postgres.log ----\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
        );
    }

    /// Starts the server and waits until it accepts connections (after an immediate stop, once it
    /// has recovered).
    fn start(&self) {
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                "data",
                "-l",
                "postgres.log",
                "-w",
                "-t",
                "120",
            ],
        );
    }

    /// Stops the server the hard way: every server process quits at once, without a checkpoint,
    /// and the next start recovers from the WAL, as after a crash.
    fn stop_immediately(&self) {
        self.run("pg_ctl", &["stop", "-D", "data", "-m", "immediate", "-w"]);
    }
}

/// A PostgreSQL cluster of the test's own: initdb in the test's directory (trust
/// authentication), a free loopback port, the socket in its directory. Unlike the shared test
/// server, which other tests use at the same time, it may be stopped. Stopped on drop.
struct PgCluster {
    ctl: PgCtl,
}

impl PgCluster {
    fn init(dir: &Path) -> Self {
        let bin = pg_bin_dir();
        let user = pg_user();
        std::fs::create_dir_all(dir).expect("pg dir");
        if let Some((uid, gid)) = user {
            // The test's directory is private to root; the server's user passes through it.
            use std::os::unix::fs::PermissionsExt;
            let parent = dir.parent().expect("parent");
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))
                .expect("chmod test dir");
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown pg dir");
        }
        let ctl = PgCtl {
            bin,
            dir: dir.into(),
            port: free_port(),
            user,
        };
        ctl.run(
            "initdb",
            &[
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        );
        // fsync off: the server is stopped, not the machine, so what it wrote is in the page cache.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nmax_connections = 50\nshared_buffers = 16MB\n",
            ctl.port,
            dir.display()
        );
        let mut text =
            std::fs::read_to_string(dir.join("data/postgresql.conf")).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(dir.join("data/postgresql.conf"), text).expect("postgresql.conf");
        ctl.start();
        Self { ctl }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .ctl
            .command("pg_ctl")
            .args(["stop", "-D", "data", "-m", "immediate"])
            .output();
    }
}

/// The directory with the PostgreSQL server binaries (initdb, pg_ctl, postgres): the newest
/// /usr/lib/postgresql/*/bin (Debian, Ubuntu), else one on PATH.
fn pg_bin_dir() -> PathBuf {
    const TOOLS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    let path = std::env::var_os("PATH").unwrap_or_default();
    versions
        .into_iter()
        .map(|(_, dir)| dir)
        .chain(std::env::split_paths(&path))
        .find(|dir| TOOLS.iter().all(|t| dir.join(t).is_file()))
        .unwrap_or_else(|| {
            panic!(
                "this test runs a PostgreSQL cluster of its own and needs the PostgreSQL server \
                 binaries ({}) in /usr/lib/postgresql/*/bin or on PATH; none were found. \
                 Install them (Debian/Ubuntu: apt-get install postgresql)",
                TOOLS.join(", ")
            )
        })
}

/// When the tests run as root, the user PostgreSQL runs as instead (`postgres`); None otherwise.
fn pg_user() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"]) != Some(0) {
        return None;
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => panic!(
            "the tests run as root, which PostgreSQL refuses: this test runs its cluster as the \
             user `postgres`, and there is none"
        ),
    }
}

// ------------------------------------------------------------------- Matrix-side helpers

async fn wait_body(user: &MatrixUser, room: &str, sender: &str, body: &str) {
    user.wait_for(room, body, |e| {
        e["sender"] == sender && e["content"]["body"] == body
    })
    .await;
}

/// When each event was first seen by a /sync long-poll of the user (ms since the epoch): the
/// arrival times of messages on Matrix, measured while the test does other things.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<String, u64>>>);

impl Arrivals {
    fn get(&self, event_id: &str) -> Option<u64> {
        self.0.lock().expect("lock").get(event_id).copied()
    }
}

struct SyncWatch {
    arrivals: Arrivals,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SyncWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn watch_arrivals(user: &MatrixUser) -> SyncWatch {
    let u = MatrixUser {
        http: user.http.clone(),
        base: user.base.clone(),
        token: user.token.clone(),
        user_id: user.user_id.clone(),
    };
    let arrivals = Arrivals::default();
    let seen = arrivals.clone();
    let filter = urlencode(
        &json!({
            "room": {"timeline": {"limit": 1000}, "state": {"types": []},
                     "ephemeral": {"types": []}, "account_data": {"types": []}},
            "presence": {"types": []}, "account_data": {"types": []}
        })
        .to_string(),
    );
    let task = tokio::spawn(async move {
        let mut since = String::new();
        loop {
            let path = if since.is_empty() {
                format!("/_matrix/client/v3/sync?timeout=0&filter={filter}")
            } else {
                format!(
                    "/_matrix/client/v3/sync?timeout=5000&filter={filter}&since={}",
                    urlencode(&since)
                )
            };
            // Synapse may be down for a while (`synapse_restart_mid_stream`): try again.
            let (status, b) = u
                .try_call(reqwest::Method::GET, &path, None)
                .await
                .unwrap_or((0, Value::Null));
            if status != 200 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let now = now_ms();
            if let Some(rooms) = b["rooms"]["join"].as_object() {
                let mut seen = seen.0.lock().expect("lock");
                for r in rooms.values() {
                    for ev in r["timeline"]["events"].as_array().into_iter().flatten() {
                        if let Some(id) = ev["event_id"].as_str() {
                            seen.entry(id.to_owned()).or_insert(now);
                        }
                    }
                }
            }
            since = b["next_batch"].as_str().unwrap_or_default().to_owned();
        }
    });
    SyncWatch { arrivals, task }
}

// -------------------------------------------------------------------- contact-side helpers

/// Makes sure the contact is connected and logged in (after the gateway was killed, say).
fn ensure_online(node: &mut NodeContact, port: u16, key: &str, deadline: Instant) {
    loop {
        let st = node.try_call(&mut json!({"cmd": "status"}));
        if st["connected"] == true && st["logged_in"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "contact {} could not get back online: {st}",
            node.account
        );
        let connected = st["connected"] == true
            || node.try_call(&mut json!({"cmd": "connect", "host": "127.0.0.1", "port": port, "server_key": key}))["ok"]
                == true;
        if !(connected && node.try_call(&mut json!({"cmd": "login"}))["ok"] == true) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Sends until the gateway took it; a retry keeps the message id, which the gateway
/// deduplicates, so an answer lost with a killed gateway does not send the message twice.
fn send_reliably(node: &mut NodeContact, cmd: &Value, port: u16, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = node.try_call(&mut cmd.clone());
        if r["ok"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "contact {} could not send {cmd}: {r}",
            node.account
        );
        ensure_online(node, port, key, deadline);
    }
}

/// Where a contact writes.
#[derive(Clone)]
enum Target {
    Dm(String),
    Group(String),
}

impl Target {
    fn cmd(&self, content: Value, timestamp: u64) -> Value {
        let id = uuid::Uuid::new_v4().to_string();
        match self {
            Target::Dm(to) => {
                json!({"cmd": "send", "to": to, "content": content, "message_id": id, "timestamp": timestamp})
            }
            Target::Group(g) => {
                json!({"cmd": "send_group", "group": g, "content": content, "message_id": id, "timestamp": timestamp})
            }
        }
    }
}

/// What one sender sent into one chat, by sequence number.
#[derive(Clone, Default)]
struct SentLog(HashMap<usize, Sent>);

#[derive(Clone, Copy)]
struct Sent {
    /// When (ms since the epoch).
    at_ms: u64,
    image: bool,
}

impl SentLog {
    fn insert(&mut self, seq: usize, at_ms: u64, image: bool) {
        self.0.insert(seq, Sent { at_ms, image });
    }

    fn get(&self, seq: usize) -> Option<Sent> {
        self.0.get(&seq).copied()
    }

    fn contains(&self, seq: usize) -> bool {
        self.0.contains_key(&seq)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn seqs(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.keys().copied()
    }

    fn images(&self) -> usize {
        self.0.values().filter(|s| s.image).count()
    }
}

/// One step in this many of a stream sends an image (captioned with its number) instead of a text.
const IMAGE_ONE_IN: u32 = 10;

/// A small image with a PNG signature.
fn png(seq: usize) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend((0..2000u32).map(|i| ((i as usize * 31 + seq) % 251) as u8));
    v
}

/// Uploads image `seq` captioned `label` until the gateway took it; returns its `media`.
fn upload_image_reliably(
    node: &mut NodeContact,
    label: &str,
    seq: usize,
    port: u16,
    key: &str,
) -> Value {
    let cmd = json!({
        "cmd": "upload_media", "bytes_b64": B64.encode(png(seq)), "mimetype": "image/png",
        "type": "IMAGE", "filename": format!("{label}.png"), "width": 40, "height": 30,
        "caption": {"body": label}
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = node.try_call(&mut cmd.clone());
        if r["ok"] == true {
            return r["media"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "contact {} could not upload {label}.png: {r}",
            node.account
        );
        ensure_online(node, port, key, deadline);
    }
}

struct ContactPlan {
    targets: Vec<(Target, String)>,
    n: usize,
    pace_ms: u64,
    seed: u64,
    port: u16,
    key: String,
}

/// One contact's stream: step i sends "<prefix>-i" to each target (as a text, or as the caption
/// of an image), then pauses.
fn contact_stream(mut node: NodeContact, plan: ContactPlan) -> (NodeContact, Vec<SentLog>) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut sent = vec![SentLog::default(); plan.targets.len()];
    for i in 0..plan.n {
        for (t, (target, prefix)) in plan.targets.iter().enumerate() {
            let label = format!("{prefix}-{i:04}");
            let image = rng.random_range(0..IMAGE_ONE_IN) == 0;
            let ts = now_ms();
            let content = if image {
                let media = upload_image_reliably(&mut node, &label, i, plan.port, &plan.key);
                json!({"media": media})
            } else {
                json!(label)
            };
            send_reliably(&mut node, &target.cmd(content, ts), plan.port, &plan.key);
            sent[t].insert(i, ts, image);
        }
        std::thread::sleep(pause(&mut rng, plan.pace_ms));
    }
    (node, sent)
}

/// Sends a message event until the homeserver took it: a homeserver that is down or starting
/// is waited for, and every retry reuses the transaction id, so a send whose answer was lost is
/// not doubled.
async fn send_on_matrix_reliably(user: &MatrixUser, room: &str, content: &Value) {
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}",
        uuid::Uuid::new_v4()
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match user
            .try_call(reqwest::Method::PUT, &path, Some(content.clone()))
            .await
        {
            Ok((200, _)) => return,
            Ok((s, b)) if (400..500).contains(&s) && s != 429 => {
                panic!("sending {content} to {room}: {s} {b}")
            }
            r => assert!(
                Instant::now() < deadline,
                "could not send {content} to {room}: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Uploads until the homeserver took it; returns the content URI.
async fn upload_on_matrix_reliably(user: &MatrixUser, data: &[u8], filename: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = user
            .http
            .post(format!(
                "{}/_matrix/media/v3/upload?filename={}",
                user.base,
                urlencode(filename)
            ))
            .bearer_auth(&user.token)
            .header("content-type", "image/png")
            .body(data.to_vec())
            .send()
            .await;
        let answer = match r {
            Ok(resp) => (resp.status().as_u16(), resp.json::<Value>().await.ok()),
            Err(e) => (0, Some(json!(e.to_string()))),
        };
        if let (200, Some(b)) = &answer
            && let Some(uri) = b["content_uri"].as_str()
        {
            return uri.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "could not upload {filename}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The Matrix user's stream: step i sends "<prefix>-i" into each room (as a text, or as the
/// caption of an image), then pauses.
async fn matrix_stream(
    user: &MatrixUser,
    targets: &[(String, String)],
    n: usize,
    pace_ms: u64,
    seed: u64,
    progress: &AtomicUsize,
) -> Vec<SentLog> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent = vec![SentLog::default(); targets.len()];
    for i in 0..n {
        for (t, (room, prefix)) in targets.iter().enumerate() {
            let label = format!("{prefix}-{i:04}");
            let image = rng.random_range(0..IMAGE_ONE_IN) == 0;
            let ts = now_ms();
            let content = if image {
                let data = png(i);
                let filename = format!("{label}.png");
                let mxc = upload_on_matrix_reliably(user, &data, &filename).await;
                json!({"msgtype": "m.image", "body": label, "filename": filename, "url": mxc,
                       "info": {"mimetype": "image/png", "size": data.len(), "w": 40, "h": 30}})
            } else {
                json!({"msgtype": "m.text", "body": label})
            };
            send_on_matrix_reliably(user, room, &content).await;
            sent[t].insert(i, ts, image);
        }
        progress.store(i + 1, Ordering::SeqCst);
        tokio::time::sleep(pause(&mut rng, pace_ms)).await;
    }
    sent
}

fn join_thread<T>(h: std::thread::JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

// ---------------------------------------------------------------------------- the chaos

#[derive(Debug, Clone, Copy)]
enum Blow {
    /// SIGKILL of the bridge.
    Bridge,
    /// SIGKILL of the gateway.
    Gateway,
    /// SIGKILL of Synapse.
    Synapse,
    /// `pg_ctl stop -m immediate` of the test's own PostgreSQL cluster.
    Postgres,
    /// SIGKILL of the worker running the user's login, one of several; it stays dead.
    Worker,
}

/// One blow of the chaos: when (once the Matrix stream has sent `after_step` steps, plus
/// `jitter`), what is killed, and for how long it stays down.
struct Strike {
    after_step: usize,
    jitter: Duration,
    blow: Blow,
    down: Duration,
}

/// K bridge kills and one gateway kill at random points of the stream (between 5 % and 90 % of
/// its N steps, at a random moment within a step), each down for a random 0 to 3 s.
fn chaos_plan(rng: &mut StdRng, kills: usize, n: usize, pace_ms: u64) -> Vec<Strike> {
    let mut plan: Vec<Strike> = (0..kills)
        .map(|_| Blow::Bridge)
        .chain([Blow::Gateway])
        .map(|blow| Strike {
            after_step: rng.random_range(n / 20..=(n * 9 / 10).max(n / 20)),
            jitter: Duration::from_millis(rng.random_range(0..=2 * pace_ms)),
            blow,
            down: Duration::from_millis(rng.random_range(0..=3000)),
        })
        .collect();
    plan.sort_by_key(|s| (s.after_step, s.jitter));
    plan
}

/// `outages` outages of `blow` at random points of the stream (between 20 % and 70 % of its N
/// steps, at a random moment within a step), each `down_ms` long (a random value in that range).
fn outage_plan(
    rng: &mut StdRng,
    blow: Blow,
    outages: usize,
    n: usize,
    pace_ms: u64,
    down_ms: std::ops::RangeInclusive<u64>,
) -> Vec<Strike> {
    let mut plan: Vec<Strike> = (0..outages)
        .map(|_| Strike {
            after_step: rng.random_range(n / 5..=(n * 7 / 10).max(n / 5)),
            jitter: Duration::from_millis(rng.random_range(0..=2 * pace_ms)),
            blow,
            down: Duration::from_millis(rng.random_range(down_ms.clone())),
        })
        .collect();
    plan.sort_by_key(|s| (s.after_step, s.jitter));
    plan
}

/// Carries out the plan while the Matrix stream reports its `progress`; returns what happened
/// when, for the report.
async fn run_chaos(
    env: &mut ChaosEnv,
    plan: &[Strike],
    progress: &AtomicUsize,
    t0: Instant,
) -> Vec<String> {
    let mut log = Vec::new();
    for s in plan {
        while progress.load(Ordering::SeqCst) < s.after_step {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(s.jitter).await;
        let (killed_at, killed_ms) = (t0.elapsed(), now_ms());
        let pid = match s.blow {
            Blow::Bridge => {
                let pid = env.one().pid();
                env.one().kill();
                tokio::time::sleep(s.down).await;
                env.start_bridge_again().await;
                pid
            }
            Blow::Gateway => {
                let pid = env.gw.proc.pid();
                env.gw.proc.kill();
                tokio::time::sleep(s.down).await;
                env.gw.start_again().await;
                pid
            }
            Blow::Synapse => {
                let pid = env.synapse.proc.pid();
                env.synapse.restart(s.down).await;
                pid
            }
            Blow::Worker => {
                let (pid, id) = env.workers().kill_login_worker().await;
                let took = env
                    .workers()
                    .wait_login_taken_over(Duration::from_secs(60))
                    .await;
                log.push(format!(
                    "worker {id} (pid {pid}) killed; its login was running again in worker {} after {:.1}s",
                    took.0,
                    took.1.as_secs_f64()
                ));
                pid
            }
            Blow::Postgres => {
                // pg_ctl waits for the server; off the runtime's threads, so that the Matrix
                // stream goes on meanwhile.
                let ctl = env
                    .pg
                    .as_ref()
                    .expect("a PostgreSQL cluster of the test's own")
                    .ctl
                    .clone();
                let c = ctl.clone();
                tokio::task::spawn_blocking(move || c.stop_immediately())
                    .await
                    .expect("pg_ctl stop");
                tokio::time::sleep(s.down).await;
                tokio::task::spawn_blocking(move || ctl.start())
                    .await
                    .expect("pg_ctl start");
                0
            }
        };
        let what = match s.blow {
            Blow::Postgres => "pg_ctl stop -m immediate of PostgreSQL".to_owned(),
            b => format!("SIGKILL {b:?} (pid {pid})"),
        };
        log.push(format!(
            "t+{:.1}s ({}) {what} after step {}, down {:.1}s, back at t+{:.1}s",
            killed_at.as_secs_f64(),
            clock(killed_ms),
            s.after_step,
            s.down.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        ));
        // A bridge that died of the outage gets no restart: it is reported.
        if !matches!(s.blow, Blow::Bridge | Blow::Worker) && !env.all_running() {
            log.push(format!(
                "the bridge (pid {}) exited during the outage of {:?}",
                env.one().pid(),
                s.blow
            ));
        }
    }
    log
}

// --------------------------------------------------------------------------- accounting

/// One arrival of a numbered message: its sequence number and when it arrived.
#[derive(Clone, Copy)]
struct Seen {
    seq: usize,
    at_ms: u64,
    /// An image with its file (a Matrix event with a URL, a network message with a blob).
    image: bool,
}

struct Row {
    scenario: &'static str,
    chat: &'static str,
    direction: String,
    sent: usize,
    /// How many of the messages sent were images.
    images: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
    unexpected: usize,
    /// Arrived, but not as sent: an image as something else, or the other way round.
    mangled: usize,
    worst_delay_ms: u64,
    /// Which messages went wrong, for the report.
    details: Vec<String>,
}

/// A time of day in UTC with milliseconds, as in the logs of the bridge and the gateway.
fn clock(ms: u64) -> String {
    let d = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        d / 3_600_000,
        d / 60_000 % 60,
        d / 1000 % 60,
        d % 1000
    )
}

impl Row {
    fn new(
        scenario: &'static str,
        chat: &'static str,
        direction: &str,
        prefix: &str,
        sent: &SentLog,
        seen: &[Seen],
    ) -> Self {
        let name = |seq: usize| {
            let at = sent.get(seq).map_or(String::new(), |t| {
                let what = if t.image { "an image" } else { "a text" };
                format!(" ({what}, sent {})", clock(t.at_ms))
            });
            format!("{chat} {direction}: {prefix}-{seq:04}{at}")
        };
        let mut details = Vec::new();
        let mut count: HashMap<usize, usize> = HashMap::new();
        let mut highest: Option<usize> = None;
        let (mut out_of_order, mut mangled, mut worst) = (0, 0, 0);
        for s in seen {
            let c = count.entry(s.seq).or_default();
            *c += 1;
            if *c > 1 {
                details.push(format!(
                    "{} arrived again at {}",
                    name(s.seq),
                    clock(s.at_ms)
                ));
                continue;
            }
            if let Some(h) = highest.filter(|h| s.seq < *h) {
                out_of_order += 1;
                details.push(format!(
                    "{} arrived after {prefix}-{h:04}, at {}",
                    name(s.seq),
                    clock(s.at_ms)
                ));
            }
            highest = highest.max(Some(s.seq));
            if let Some(t) = sent.get(s.seq) {
                worst = worst.max(s.at_ms.saturating_sub(t.at_ms));
                if t.image != s.image {
                    mangled += 1;
                    let got = if s.image { "an image" } else { "no image" };
                    details.push(format!("{} arrived as {got}", name(s.seq)));
                }
            }
        }
        let delivered = count.keys().filter(|k| sent.contains(**k)).count();
        let mut lost: Vec<usize> = sent.seqs().filter(|k| !count.contains_key(k)).collect();
        lost.sort_unstable();
        details.extend(
            lost.iter()
                .map(|&seq| format!("{} never arrived", name(seq))),
        );
        let mut unexpected: Vec<usize> = count
            .keys()
            .filter(|k| !sent.contains(**k))
            .copied()
            .collect();
        unexpected.sort_unstable();
        details.extend(
            unexpected
                .iter()
                .map(|&seq| format!("{} was never sent", name(seq))),
        );
        Self {
            scenario,
            chat,
            direction: direction.to_owned(),
            sent: sent.len(),
            images: sent.images(),
            delivered,
            lost: sent.len() - delivered,
            duplicated: seen.len() - count.len(),
            out_of_order,
            unexpected: count.len() - delivered,
            mangled,
            worst_delay_ms: worst,
            details,
        }
    }

    fn complete(&self) -> bool {
        self.lost == 0
    }

    fn bad(&self) -> bool {
        self.lost + self.duplicated + self.out_of_order + self.unexpected + self.mangled > 0
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = format!(
        "{:<42} {:<6} {:<10} {:>5} {:>9} {:>5} {:>10} {:>12} {:>10} {:>7} {:>11}\n",
        "scenario",
        "chat",
        "direction",
        "sent",
        "delivered",
        "lost",
        "duplicated",
        "out of order",
        "unexpected",
        "mangled",
        "worst delay"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{:<42} {:<6} {:<10} {:>5} {:>9} {:>5} {:>10} {:>12} {:>10} {:>7} {:>9.1} s",
            r.scenario,
            r.chat,
            r.direction,
            r.sent,
            r.delivered,
            r.lost,
            r.duplicated,
            r.out_of_order,
            r.unexpected,
            r.mangled,
            r.worst_delay_ms as f64 / 1000.0
        );
    }
    t
}

/// The sequence number of a body "<prefix>-<digits>".
fn seq_of(body: &str, prefix: &str) -> Option<usize> {
    let rest = body.strip_prefix(prefix)?.strip_prefix('-')?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// A numbered stream as it arrived on Matrix: messages of `sender` in `events`, in timeline order.
fn seen_on_matrix(
    events: &[Value],
    sender: &str,
    prefix: &str,
    arrivals: &Arrivals,
    now: u64,
) -> Vec<Seen> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message" && e["sender"] == sender)
        .filter_map(|e| {
            let seq = seq_of(e["content"]["body"].as_str()?, prefix)?;
            let at_ms = e["event_id"]
                .as_str()
                .and_then(|id| arrivals.get(id))
                .unwrap_or(now);
            let image = e["content"]["msgtype"] == "m.image" && e["content"]["url"].is_string();
            Some(Seen { seq, at_ms, image })
        })
        .collect()
}

/// A numbered stream (texts, and images by their caption) as it arrived at a contact (redeliveries the agent reports again after a
/// reconnect are the agent's, not new messages, and are skipped).
fn seen_by_contact(node: &NodeContact, prefix: &str) -> Vec<Seen> {
    node.backlog
        .iter()
        .filter(|v| v["event"] == "message" && v["redelivered"] != true)
        .filter_map(|v| {
            let media = &v["content"]["media"];
            let body = v["content"]["text"]["body"]
                .as_str()
                .or(media["caption"]["body"].as_str())?;
            Some(Seen {
                seq: seq_of(body, prefix)?,
                at_ms: v["rx_ms"].as_u64().unwrap_or(0),
                image: media["type"] == "IMAGE"
                    && media["blob"].as_str().is_some_and(|b| !b.is_empty()),
            })
        })
        .collect()
}

/// Events at a contact that point at trouble (undecryptable or duplicated ciphertexts, agent errors).
fn contact_troubles(node: &NodeContact) -> Vec<String> {
    node.backlog
        .iter()
        .filter(|v| {
            matches!(
                v["event"].as_str(),
                Some("decrypt_error" | "duplicate" | "agent_error")
            )
        })
        .map(|v| format!("contact {}: {v}", node.account))
        .collect()
}

/// Appservice transactions Synapse still holds unsent at the end of a run: their events never
/// reached the bridge. Synapse stores a transaction without sending it while it counts the
/// appservice as down, for its recoverer to send; one stored just as the recoverer finishes
/// stays behind until the next recovery (synapse/appservice/scheduler.py, `send` and
/// `_Recoverer.retry`).
async fn unsent_appservice_txns(hs_dir: &Path, rooms: &[&[Value]]) -> Vec<String> {
    let url = format!(
        "sqlite://{}?mode=ro",
        hs_dir.join("homeserver.db").display()
    );
    let rows: Result<Vec<(i64, String)>, sqlx::Error> = async {
        let pool = sqlx::SqlitePool::connect(&url).await?;
        let rows = sqlx::query_as(
            "SELECT txn_id, event_ids FROM application_services_txns ORDER BY txn_id",
        )
        .fetch_all(&pool)
        .await;
        pool.close().await;
        rows
    }
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            return vec![format!(
                "cannot read Synapse's appservice transactions: {e}"
            )];
        }
    };
    let body_of = |id: &str| {
        rooms
            .iter()
            .flat_map(|r| r.iter())
            .find(|e| e["event_id"] == id)
            .and_then(|e| e["content"]["body"].as_str())
            .unwrap_or("?")
            .to_owned()
    };
    rows.into_iter()
        .map(|(txn, ids)| {
            let ids: Vec<String> = serde_json::from_str(&ids).unwrap_or_default();
            let events: Vec<String> = ids
                .iter()
                .map(|id| format!("{} ({id})", body_of(id)))
                .collect();
            format!(
                "Synapse still holds appservice transaction {txn} unsent; the bridge never got: {}",
                events.join(", ")
            )
        })
        .collect()
}

/// Envelopes the gateway still holds for the bridge's login `me` at the end of a run: the bridge
/// never acked them, so the gateway pushes them again only after the bridge's next login
/// (interop-protocol.md §7). Each is named by the message sent with its timestamp, from `sent`
/// (the senders' logs by prefix).
async fn unacked_envelopes(gw_dir: &Path, me: &str, sent: &[(&str, &SentLog)]) -> Vec<String> {
    let url = format!("sqlite://{}?mode=ro", gw_dir.join("gateway.db").display());
    let rows: Result<Vec<(i64, String, i64)>, sqlx::Error> = async {
        let pool = sqlx::SqlitePool::connect(&url).await?;
        let rows = sqlx::query_as(
            "SELECT id, sender, timestamp FROM envelope WHERE recipient = $1 ORDER BY id",
        )
        .bind(me)
        .fetch_all(&pool)
        .await;
        pool.close().await;
        rows
    }
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return vec![format!("cannot read the gateway's envelopes: {e}")],
    };
    rows.into_iter()
        .map(|(id, sender, ts)| {
            let what: Vec<String> = sent
                .iter()
                .flat_map(|(prefix, log)| {
                    log.0
                        .iter()
                        .filter(move |(_, s)| s.at_ms as i64 == ts)
                        .map(move |(seq, _)| format!("{prefix}-{seq:04}"))
                })
                .collect();
            format!(
                "the gateway still holds envelope {id} from {sender} (sent {}) unacked: {}",
                clock(ts as u64),
                if what.is_empty() {
                    "not a numbered message".to_owned()
                } else {
                    what.join(" or ")
                }
            )
        })
        .collect()
}

/// Notices of the bot in the portal rooms (a message that could not be bridged, say).
fn bot_notices(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["sender"] == BOT && e["type"] == "m.room.message")
        .map(|e| format!("bot notice: {}", e["content"]["body"]))
        .collect()
}

// ------------------------------------------------------------------- two-way scenarios

/// A two-way scenario: where the streams go, on which database, and what is broken meanwhile.
struct Scenario {
    name: &'static str,
    db: Db,
    /// A group portal with a second contact, besides the DM.
    group: bool,
    /// N when `MIB_CHAOS_MESSAGES` is not set.
    default_messages: usize,
    /// The blows, from the seeded generator, the knobs and N.
    plan: fn(&mut StdRng, &Knobs, usize) -> Vec<Strike>,
    /// Bridge processes (workers on one PostgreSQL database behind a balancer when more than 1).
    workers: usize,
}

async fn two_way_streams(sc: Scenario) {
    let scenario = sc.name;
    let k = Knobs::from_env();
    let n = k.messages.unwrap_or(sc.default_messages);
    eprintln!(
        "chaos {scenario}: MIB_CHAOS_SEED={} MIB_CHAOS_MESSAGES={n} MIB_CHAOS_KILLS={} MIB_CHAOS_OUTAGES={} MIB_CHAOS_PACE_MS={}",
        k.seed, k.kills, k.outages, k.pace_ms
    );
    let test_start = Instant::now();
    let mut env = ChaosEnv::start_with(sc.db, sc.workers).await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, me) = login(&alice).await;
    let mut a = env.node();
    let ghost_a = ghost_of(&a.account);
    let dm = start_chat(&alice, &mgmt, &a.account).await;
    // The group: (contact B, group id, room).
    let mut grp = if sc.group {
        let b = env.node();
        let g = a.call(json!({"cmd": "create_group", "name": "Chaos", "members": [me, b.account]}));
        let gid = g["group"]["id"].as_str().expect("group id").to_owned();
        // A contact alice already has a chat with adds her to a group: no message request, the
        // portal opens at once.
        let room = alice.wait_invite(&[&mgmt, &dm]).await;
        alice.join(&room).await;
        Some((b, gid, room))
    } else {
        None
    };
    let ghost_b = grp.as_ref().map(|(b, ..)| ghost_of(&b.account));

    // Warm-up: every path once, so that sessions and sender keys exist before the chaos.
    a.call(json!({"cmd": "send", "to": me, "content": "warmup-dm-a"}));
    wait_body(&alice, &dm, &ghost_a, "warmup-dm-a").await;
    alice.send_text(&dm, "warmup-dm-m").await;
    a.event("warm-up DM", |v| {
        v["content"]["text"]["body"] == "warmup-dm-m"
    });
    if let Some((b, gid, room)) = &mut grp {
        a.call(json!({"cmd": "send_group", "group": gid, "content": "warmup-grp-a"}));
        wait_body(&alice, room, &ghost_a, "warmup-grp-a").await;
        b.call(json!({"cmd": "send_group", "group": gid, "content": "warmup-grp-b"}));
        wait_body(&alice, room, &ghost_of(&b.account), "warmup-grp-b").await;
        alice.send_text(room, "warmup-grp-m").await;
        for c in [&mut a, b] {
            c.event("warm-up group", |v| {
                v["content"]["text"]["body"] == "warmup-grp-m"
            });
        }
    }
    let setup_time = test_start.elapsed();
    eprintln!(
        "chaos {scenario}: set up in {:.1}s; streaming",
        setup_time.as_secs_f64()
    );

    // The streams and the chaos, all at once.
    let watch = watch_arrivals(&alice);
    let mut rng = StdRng::seed_from_u64(k.seed);
    let plan = (sc.plan)(&mut rng, &k, n);
    let progress = AtomicUsize::new(0);
    let (port, key) = (env.gw.port, env.gw.key_b64.clone());
    let t0 = Instant::now();
    let contact_plan = |targets: Vec<(Target, String)>, seed: u64| ContactPlan {
        targets,
        n,
        pace_ms: k.pace_ms,
        seed,
        port,
        key: key.clone(),
    };
    let mut a_targets = vec![(Target::Dm(me.clone()), "dm-a2m".to_owned())];
    let mut m_targets = vec![(dm.clone(), "dm-m2a".to_owned())];
    let mut thread_b = None;
    let mut group_room = None;
    if let Some((b, gid, room)) = grp {
        a_targets.push((Target::Group(gid.clone()), "grp-a2m".to_owned()));
        m_targets.push((room.clone(), "grp-m2x".to_owned()));
        let plan_b = contact_plan(
            vec![(Target::Group(gid), "grp-b2m".to_owned())],
            k.seed.wrapping_add(2),
        );
        thread_b = Some(std::thread::spawn(move || contact_stream(b, plan_b)));
        group_room = Some(room);
    }
    let plan_a = contact_plan(a_targets, k.seed.wrapping_add(1));
    let thread_a = std::thread::spawn(move || contact_stream(a, plan_a));
    let (m_sent, chaos_log) = tokio::join!(
        matrix_stream(
            &alice,
            &m_targets,
            n,
            k.pace_ms,
            k.seed.wrapping_add(3),
            &progress
        ),
        run_chaos(&mut env, &plan, &progress, t0)
    );
    let (mut a, a_sent) = tokio::task::spawn_blocking(move || join_thread(thread_a))
        .await
        .expect("join A");
    let (mut b, b_sent) = match thread_b {
        Some(t) => {
            let (b, sent) = tokio::task::spawn_blocking(move || join_thread(t))
                .await
                .expect("join B");
            (Some(b), sent)
        }
        None => (None, Vec::new()),
    };
    let stream_time = t0.elapsed();
    eprintln!(
        "chaos {scenario}: streams done in {:.1}s; waiting for delivery",
        stream_time.as_secs_f64()
    );

    // Wait until everything arrived and nothing more comes (a late duplicate), or the deadline.
    let deadline =
        Instant::now() + Duration::from_secs(120).max(Duration::from_millis(n as u64 * 600));
    let quiet = Duration::from_secs(3);
    let mut last_change = (0usize, Instant::now());
    let compute =
        |dm_events: &[Value], group_events: &[Value], a: &NodeContact, b: Option<&NodeContact>| {
            let now = now_ms();
            let arr = &watch.arrivals;
            let mut rows = vec![
                Row::new(
                    scenario,
                    "dm",
                    "matrix->A",
                    "dm-m2a",
                    &m_sent[0],
                    &seen_by_contact(a, "dm-m2a"),
                ),
                Row::new(
                    scenario,
                    "dm",
                    "A->matrix",
                    "dm-a2m",
                    &a_sent[0],
                    &seen_on_matrix(dm_events, &ghost_a, "dm-a2m", arr, now),
                ),
            ];
            if let (Some(b), Some(ghost_b)) = (b, &ghost_b) {
                rows.extend([
                    Row::new(
                        scenario,
                        "group",
                        "matrix->A",
                        "grp-m2x",
                        &m_sent[1],
                        &seen_by_contact(a, "grp-m2x"),
                    ),
                    Row::new(
                        scenario,
                        "group",
                        "matrix->B",
                        "grp-m2x",
                        &m_sent[1],
                        &seen_by_contact(b, "grp-m2x"),
                    ),
                    Row::new(
                        scenario,
                        "group",
                        "A->matrix",
                        "grp-a2m",
                        &a_sent[1],
                        &seen_on_matrix(group_events, &ghost_a, "grp-a2m", arr, now),
                    ),
                    Row::new(
                        scenario,
                        "group",
                        "B->matrix",
                        "grp-b2m",
                        &b_sent[0],
                        &seen_on_matrix(group_events, ghost_b, "grp-b2m", arr, now),
                    ),
                ]);
            }
            rows
        };
    let (rows, dm_events, group_events) = loop {
        let d = Instant::now() + Duration::from_secs(120);
        tokio::task::block_in_place(|| {
            for c in std::iter::once(&mut a).chain(b.as_mut()) {
                ensure_online(c, port, &key, d);
                c.pump(Duration::from_millis(100));
            }
        });
        let dm_events = alice.all_messages(&dm).await;
        let group_events = match &group_room {
            Some(room) => alice.all_messages(room).await,
            None => Vec::new(),
        };
        let rows = compute(&dm_events, &group_events, &a, b.as_ref());
        let arrived: usize = rows.iter().map(|r| r.delivered + r.duplicated).sum();
        if arrived != last_change.0 {
            last_change = (arrived, Instant::now());
        }
        let done = rows.iter().all(Row::complete) && last_change.1.elapsed() >= quiet;
        if done || Instant::now() > deadline {
            break (rows, dm_events, group_events);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let drain_time = t0.elapsed() - stream_time;

    let t = table(&rows);
    let mut notes: Vec<String> = chaos_log;
    let images: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {} {}", r.chat, r.direction, r.images))
        .collect();
    notes.push(format!(
        "images among the messages sent: {}",
        images.join(", ")
    ));
    notes.extend(rows.iter().flat_map(|r| r.details.iter().cloned()));
    notes.extend(unsent_appservice_txns(&env.synapse.dir, &[&dm_events, &group_events]).await);
    let mut to_me = vec![("dm-a2m", &a_sent[0])];
    if b.is_some() {
        to_me.extend([("grp-a2m", &a_sent[1]), ("grp-b2m", &b_sent[0])]);
    }
    notes.extend(unacked_envelopes(&env.gw.dir, &me, &to_me).await);
    for c in std::iter::once(&a).chain(b.as_ref()) {
        notes.extend(contact_troubles(c));
    }
    notes.extend(bot_notices(&dm_events));
    notes.extend(bot_notices(&group_events));
    if !env.all_running() {
        notes.push("the bridge (a worker) is not running at the end of the run".to_owned());
    }
    eprintln!(
        "\nchaos {scenario} (MIB_CHAOS_SEED={}; setup {:.1}s, streams {:.1}s, drain {:.1}s)\n{t}{}\n",
        k.seed,
        setup_time.as_secs_f64(),
        stream_time.as_secs_f64(),
        drain_time.as_secs_f64(),
        notes.join("\n")
    );
    let bad = rows.iter().any(Row::bad);
    if !bad {
        env.drop_pg_schema().await;
    }
    assert!(
        !bad,
        "messages were lost, duplicated, reordered or mangled (replay with MIB_CHAOS_SEED={}):\n{t}{}",
        k.seed,
        notes.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_way_streams_survive_kill_9() {
    two_way_streams(Scenario {
        name: "two_way_streams_survive_kill_9",
        db: Db::Sqlite,
        group: true,
        default_messages: 100,
        plan: |rng, k, n| chaos_plan(rng, k.kills, n, k.pace_ms),
        workers: 1,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_way_streams_survive_kill_9_on_postgres() {
    two_way_streams(Scenario {
        name: "two_way_streams_survive_kill_9_on_postgres",
        db: Db::Postgres,
        group: true,
        default_messages: 100,
        plan: |rng, k, n| chaos_plan(rng, k.kills, n, k.pace_ms),
        workers: 1,
    })
    .await;
}

/// Synapse is killed with SIGKILL during a two-way DM stream and started again a few seconds
/// later in the same directory: same port, same database, so the users' access tokens, the
/// rooms and the appservice transactions it had not sent yet survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_restart_mid_stream() {
    two_way_streams(Scenario {
        name: "synapse_restart_mid_stream",
        db: Db::Sqlite,
        group: false,
        default_messages: 60,
        plan: |rng, k, n| outage_plan(rng, Blow::Synapse, k.outages, n, k.pace_ms, 2000..=5000),
        workers: 1,
    })
    .await;
}

/// The bridge's PostgreSQL (a cluster of the test's own) stops at once (`pg_ctl stop -m
/// immediate`) during a two-way DM stream and comes back about 5 seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_mid_stream() {
    two_way_streams(Scenario {
        name: "postgres_outage_mid_stream",
        db: Db::OwnPostgres,
        group: false,
        default_messages: 60,
        plan: |rng, k, n| outage_plan(rng, Blow::Postgres, k.outages, n, k.pace_ms, 4000..=6000),
        workers: 1,
    })
    .await;
}

/// Three workers share one PostgreSQL database behind a round-robin balancer (each takes
/// appservice transactions); the one running the user's login is killed with SIGKILL during a
/// two-way stream through a DM and a group and stays dead. The others take its login and its
/// rooms over (the log says after how long), and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_one_killed_mid_stream() {
    two_way_streams(Scenario {
        name: "three_workers_one_killed_mid_stream",
        db: Db::Postgres,
        group: true,
        default_messages: 60,
        plan: |rng, k, n| outage_plan(rng, Blow::Worker, 1, n, k.pace_ms, 0..=0),
        workers: 3,
    })
    .await;
}

// ------------------------------------------------------------------------ scenario 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_in_order() {
    const SCENARIO: &str = "backlog_drains_in_order";
    let k = Knobs::from_env();
    let m = k.backlog;
    eprintln!(
        "chaos {SCENARIO}: MIB_CHAOS_SEED={} MIB_CHAOS_BACKLOG={m}",
        k.seed
    );
    let test_start = Instant::now();
    let mut env = ChaosEnv::start(Db::Sqlite).await;
    let alice = env.synapse.user("alice").await;
    let (mgmt, me) = login(&alice).await;
    let mut a = env.node();
    let ghost_a = ghost_of(&a.account);
    let dm = start_chat(&alice, &mgmt, &a.account).await;
    a.call(json!({"cmd": "send", "to": me, "content": "warmup-a"}));
    wait_body(&alice, &dm, &ghost_a, "warmup-a").await;
    alice.send_text(&dm, "warmup-m").await;
    a.event("warm-up", |v| v["content"]["text"]["body"] == "warmup-m");
    let watch = watch_arrivals(&alice);

    // The bridge dies; the contact writes M messages, about one in ten an image.
    env.one().kill();
    let mut rng = StdRng::seed_from_u64(k.seed);
    let mut sent = SentLog::default();
    let mut images = 0;
    let sending = Instant::now();
    for i in 0..m {
        let label = format!("bl-{i:04}");
        let ts = now_ms();
        let image = rng.random_range(0..IMAGE_ONE_IN) == 0;
        let content = if image {
            images += 1;
            let (port, key) = (env.gw.port, env.gw.key_b64.clone());
            json!({"media": upload_image_reliably(&mut a, &label, i, port, &key)})
        } else {
            json!(label)
        };
        a.call(Target::Dm(me.clone()).cmd(content, ts));
        sent.insert(i, ts, image);
    }
    let send_time = sending.elapsed();

    // The bridge comes back and drains the backlog.
    let restart = Instant::now();
    let restart_ms = now_ms();
    env.start_bridge_again().await;
    let deadline =
        Instant::now() + Duration::from_secs(120).max(Duration::from_millis(m as u64 * 500));
    let quiet = Duration::from_secs(3);
    let mut last_change = (0usize, Instant::now());
    let mut drained_after = None;
    let (row, events) = loop {
        let events = alice.all_messages(&dm).await;
        let seen = seen_on_matrix(&events, &ghost_a, "bl", &watch.arrivals, now_ms());
        let row = Row::new(SCENARIO, "dm", "A->matrix", "bl", &sent, &seen);
        if row.complete() && drained_after.is_none() {
            drained_after = Some(restart.elapsed());
        }
        if seen.len() != last_change.0 {
            last_change = (seen.len(), Instant::now());
        }
        if (row.complete() && last_change.1.elapsed() >= quiet) || Instant::now() > deadline {
            break (row, events);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // The drain rate, from the first to the last arrival seen by /sync, and from the restart.
    let arrival_times: Vec<u64> = events
        .iter()
        .filter(|e| e["sender"] == json!(ghost_a))
        .filter(|e| seq_of(e["content"]["body"].as_str().unwrap_or(""), "bl").is_some())
        .filter_map(|e| watch.arrivals.get(e["event_id"].as_str()?))
        .collect();
    let first = arrival_times.iter().min().copied().unwrap_or(restart_ms);
    let last = arrival_times.iter().max().copied().unwrap_or(first);
    let rate_between = if last > first {
        (arrival_times.len().saturating_sub(1)) as f64 / ((last - first) as f64 / 1000.0)
    } else {
        0.0
    };
    let rate_overall = drained_after.map_or(0.0, |d| m as f64 / d.as_secs_f64());

    // Each message carries the contact's send time, not the time it was bridged, and images are
    // images.
    let mut skewed = Vec::new();
    let mut worst_skew = 0i64;
    let mut malformed = Vec::new();
    for e in events.iter().filter(|e| e["sender"] == json!(ghost_a)) {
        let Some(seq) = seq_of(e["content"]["body"].as_str().unwrap_or(""), "bl") else {
            continue;
        };
        let Some(sent) = sent.get(seq) else {
            continue;
        };
        let skew = e["origin_server_ts"].as_i64().unwrap_or(0) - sent.at_ms as i64;
        worst_skew = worst_skew.max(skew.abs());
        if skew.abs() > 2000 {
            skewed.push(seq);
        }
        if e["content"]["msgtype"] == "m.image" && !e["content"]["url"].is_string() {
            malformed.push(format!("bl-{seq:04}: image without url"));
        }
    }
    let image_events = events
        .iter()
        .filter(|e| e["sender"] == json!(ghost_a) && e["content"]["msgtype"] == "m.image")
        .count();
    if image_events != images {
        malformed.push(format!(
            "{images} images sent, {image_events} m.image events arrived"
        ));
    }

    let t = table(std::slice::from_ref(&row));
    let mut notes = vec![
        format!(
            "backlog of {m} ({images} images) sent in {:.1}s while the bridge was down",
            send_time.as_secs_f64()
        ),
        match drained_after {
            Some(d) => format!(
                "drained {m} in {:.1}s after the restart began: {rate_overall:.1} msgs/s (bridge start included); \
                 {rate_between:.1} msgs/s from the first to the last arrival",
                d.as_secs_f64()
            ),
            None => "the backlog did not drain before the deadline".to_owned(),
        },
        format!(
            "origin_server_ts vs the contact's send time: worst {:.1}s off; {} of {} more than 2 s off{}",
            worst_skew as f64 / 1000.0,
            skewed.len(),
            row.delivered,
            skewed
                .first()
                .map_or(String::new(), |s| format!(" (first: bl-{s:04})"))
        ),
    ];
    notes.extend(row.details.iter().cloned());
    notes.extend(malformed.iter().cloned());
    notes.extend(contact_troubles(&a));
    notes.extend(bot_notices(&events));
    eprintln!(
        "\nchaos {SCENARIO} (MIB_CHAOS_SEED={}; total {:.1}s)\n{t}{}\n",
        k.seed,
        test_start.elapsed().as_secs_f64(),
        notes.join("\n")
    );
    assert!(
        !row.bad() && malformed.is_empty(),
        "the backlog was not delivered once each and in order (MIB_CHAOS_SEED={}):\n{t}{}",
        k.seed,
        notes.join("\n")
    );
    // Timestamp massaging: the bridge sends with the appservice `ts` parameter.
    assert!(
        skewed.is_empty(),
        "bridged messages carry the bridging time, not the contact's send time:\n{}",
        notes.join("\n")
    );
}
