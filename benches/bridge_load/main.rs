//! Bridge load generator (a bench binary): `cargo bench --bench bridge_load -- [flags]`.
//!
//! Its parts: `track` (send and arrival times), `standin` (the stand-in homeserver), `bridge`
//! (the bridge process, its configuration and samples of it), `world` (contacts, users, portals)
//! and `runs` (the measured runs and the table). The gateway, the contacts' registration, the
//! process guard and Synapse are the end-to-end tests' own helpers (`tests/common`), not copies.
//!
//! Drives M Matrix users and N interop contacts through the real bridge binary and an in-process
//! interop gateway, and reports messages/s and added latency (p50/p99) per direction, the bridge's
//! CPU use and its resident memory. The homeserver is a minimal stand-in (an axum server in this
//! process that answers every client-server call the bridge makes at once), so the figures are
//! the ceiling of the bridge itself (plus the gateway hop), not of a real homeserver.
//!
//! Set-up: the gateway (unless `--gateway-process`) and the stand-in homeserver run in this
//! process; the bridge runs as its own process (so its RSS and CPU can be read from /proc). Each
//! Matrix user `@benchN:bench` logs in through the provisioning API (its own interop account,
//! dev code 123456) and opens a DM with its contact through `POST v1/chats`. User i talks to
//! contact `i % N` (N = M by default, so each user has its own contact; with `--contacts N` below
//! M a contact talks to several users). The contacts are interop accounts of our own Rust client
//! running in this process.
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
//! Last (stand-in only), two runs with one side offline, each nearest to the bridge's own
//! ceiling in one direction here. Contacts offline: the contacts' clients stop, the users send
//! K messages, and the run lasts until the gateway has stored them all; then the contacts come
//! back and must receive each one (see `restarts::offline_contacts`). The backlog run: the
//! bridge is stopped, the contacts send K messages the gateway keeps, and the bridge starts
//! again and delivers them with the contacts idle (see `restarts::backlog`).
//! Below the table, the floor: the Signal work of a message (encrypt or decrypt, and its vault
//! commit) on its own, one task, no bridge (see `floor`), next to which the bridge's CPU per
//! message shows how much of it is the bridge's own work.
//!
//! Latency is end to end: Matrix→interop from the start of the transaction PUT to the contact's
//! client handing out the decrypted message; interop→Matrix from the contact's `send` call to the
//! stand-in homeserver receiving the ghost's `PUT .../send/m.room.message`. Both include the
//! Signal encrypt/decrypt at the ends and the gateway hop. Everything shares one machine: the
//! bench process (gateway, contacts, stand-in) competes with the bridge for the CPU, so the
//! bridge's own CPU time per message is printed too.
//!
//! Flags: `--users M` (default 20), `--contacts N` (default M), `--chats-per-user C` (default 1:
//! each user opens C DM portals, each with a contact of its own, so M×C chats and contacts; the
//! stand-in only), `--messages K` per direction
//! (default 5000), `--paced-secs S` (default 15), `--paced-rate R` (messages/s of the paced runs,
//! to compare latency at one load across versions; default half the max rate), `--quick` (4 users, 200 messages, 3 s paced),
//! `--postgres URI` (the bridge's database in Postgres instead of SQLite; give an empty database
//! of its own, which the bridge migrates and the bench leaves as it is afterwards).
//! `--synapse`: the real system instead of the stand-in. A Synapse from the test venv (as the
//! end-to-end tests start it: SQLite, rate limits raised) with the bridge registered; the Matrix
//! users are real Synapse accounts that join their portals and send through the client-server
//! API, and read what arrives through `/sync` (one long-polling sync loop per user). Latency is
//! then from the user's `PUT .../send` to the contact, and from the contact's `send` to the
//! event showing up in the user's sync. Synapse shares the two cores with everything else;
//! `MIB_SYNAPSE_CPUS=0 taskset -c 1 bridge_load --synapse` gives it a core of its own (the
//! bridge, the gateway and the contacts share the other), which tells a bridge that holds
//! Synapse up from one that only takes CPU it would have used. `--rounds R` (with `--synapse`):
//! then R rounds of the bridge's interop→Matrix max run and the bare appservice's, alternately,
//! each with its ratio, and their median.
//! With `--synapse` a baseline comes before and after the bridge's runs: the same messages
//! through a bare appservice in this process instead of the bridge (see `baseline`), and the
//! bridge's rate as a share of their mean. Synapse keeps its data in SQLite, or in PostgreSQL when `MIB_SYNAPSE_DATABASE`
//! names an empty database (`postgres://USER@HOST:PORT/DB`), as a production server would.
//! `--gateway-process`: the gateway as the `interop-gateway` binary (SQLite, its rate limits
//! raised on its command line) instead of in this process, so that its CPU per message is read
//! on its own ("gateway CPU µs/msg" in the table, and in the one-side-offline runs) and its
//! SQLite does not share a page cache with the contacts' stores; a stall report then has no
//! list of the gateway's connections. `MIB_GATEWAY_BIN=PATH` then runs that build of the
//! gateway, to compare two in alternate runs.
//! `--workers N` (with `--postgres`): N bridge processes on the one database behind a
//! round-robin balancer (docs/scaling.md); user i logs in through worker i mod N, and the
//! bridge's CPU and memory figures are the workers' sums.
//! `MIB_BENCH_SQL_LOG=1` in the environment: the bridge logs each SQL statement, and each max run
//! prints the statements per message by verb and table (the rates of such a run are slowed by
//! the logging; take them from a run without it). `MIB_BENCH_LATENCY_DIR=D`: each run's
//! messages, as sent time and latency in ms, to a file per run in D.
//! A run where nothing arrives for 45 s (counted from its first send) fails after a stall
//! report on standard error: the gateway's connections with envelopes in flight or stanzas
//! queued and what their delivery waits for, each contact's actor and connection, and the
//! gateway's TCP connections with bytes queued; `MIB_BENCH_STALL_STACKS=F` adds every thread's
//! stack (by gdb) in the file F.

// A bench binary's report is its standard output.
#![allow(clippy::print_stdout)]

/// The end-to-end tests' helpers: the in-process gateway, registered contacts, the process guard,
/// and for `--synapse` the Synapse set-up and client-server API client.
#[path = "../../tests/common/mod.rs"]
mod common;

mod baseline;
mod bridge;
mod floor;
mod restarts;
mod runs;
mod standin;
mod track;
mod world;

use baseline::*;
use bridge::*;
use restarts::*;
use runs::*;
use standin::*;
use track::*;
use world::*;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
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
use common::interop::CODE;
use futures::StreamExt;
use matrix_interop_bridge::interop::{AccountHandle, Event, GatewayAddr, SignalRuntime, Target};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinSet};

const DOMAIN: &str = "bench";
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
    /// DM portals per user, each with a contact of its own (stand-in only).
    chats_per_user: usize,
    contacts: usize,
    messages: usize,
    paced_secs: f64,
    /// The paced runs' rate (messages/s); by default half the max run's.
    paced_rate: Option<f64>,
    quick: bool,
    /// The bridge's database: `None` for SQLite in the temporary directory, or a Postgres URI.
    postgres: Option<String>,
    /// A real Synapse instead of the stand-in homeserver.
    synapse: bool,
    /// Restart the gateway, then the bridge, and time until every login is connected again.
    restarts: bool,
    /// Skip the message runs (set-up, memory and restarts only).
    no_runs: bool,
    /// Bridge processes on one PostgreSQL database (1: a single bridge).
    workers: usize,
    /// With `--synapse`: rounds of the bridge's and the bare appservice's interop→Matrix runs,
    /// alternately, after the others.
    rounds: usize,
    /// The gateway as the `interop-gateway` binary, not in this process: its CPU is then
    /// reported on its own ("gateway CPU µs/msg").
    gateway_process: bool,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = if quick {
        Opts {
            users: 4,
            chats_per_user: 1,
            contacts: 0,
            messages: 200,
            paced_secs: 3.0,
            paced_rate: None,
            quick,
            postgres: None,
            synapse: false,
            restarts: false,
            no_runs: false,
            workers: 1,
            rounds: 0,
            gateway_process: false,
        }
    } else {
        Opts {
            users: 20,
            chats_per_user: 1,
            contacts: 0,
            messages: 5000,
            paced_secs: 15.0,
            paced_rate: None,
            quick,
            postgres: None,
            synapse: false,
            restarts: false,
            no_runs: false,
            workers: 1,
            rounds: 0,
            gateway_process: false,
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
            "--chats-per-user" => o.chats_per_user = num("--chats-per-user") as usize,
            "--messages" => o.messages = num("--messages") as usize,
            "--paced-secs" => o.paced_secs = num("--paced-secs"),
            "--paced-rate" => o.paced_rate = Some(num("--paced-rate")),
            "--postgres" => {
                let uri = it.next().filter(|u| u.starts_with("postgres"));
                o.postgres = Some(uri.expect("--postgres needs a postgres:// URI").clone());
            }
            "--synapse" => o.synapse = true,
            "--restarts" => o.restarts = true,
            "--no-runs" => o.no_runs = true,
            "--workers" => o.workers = num("--workers") as usize,
            "--rounds" => o.rounds = num("--rounds") as usize,
            "--gateway-process" => o.gateway_process = true,
            // `cargo bench` passes --bench; anything else is ignored too.
            _ => {}
        }
    }
    if o.chats_per_user > 1 {
        // Every chat of a user needs a contact of its own: one DM per pair.
        assert!(!o.synapse, "--chats-per-user goes with the stand-in only");
        o.contacts = o.chats();
    } else if o.contacts == 0 || o.contacts > o.users {
        o.contacts = o.users;
    }
    o.messages = o.messages.max(o.chats());
    assert!(
        o.workers == 1 || (o.postgres.is_some() && !o.restarts),
        "--workers needs --postgres, and does not go with --restarts"
    );
    o
}

// ---------------------------------------------------------------------------------------------

impl Opts {
    fn chats(&self) -> usize {
        self.users * self.chats_per_user
    }
}

/// The reference gateway's settings here: its rate limits out of the way.
fn gateway_limits(cfg: &mut mib_gateway::GatewayConfig) {
    cfg.limits.registrations_per_source = u32::MAX;
    cfg.rate_per_sec = 1e9;
    cfg.rate_capacity = 1e9;
}

/// The reference gateway: in this process (the tests' own), or with `--gateway-process` as the
/// `interop-gateway` binary, whose CPU is then measured apart from this process's.
pub(crate) enum BenchGateway {
    InProcess(common::interop::TestGateway),
    Process(common::GatewayProc),
}

impl BenchGateway {
    async fn start(own_process: bool, dir: &Path) -> Self {
        let gateway = if own_process {
            // The same limits as `gateway_limits`, on its command line.
            let registrations = u32::MAX.to_string();
            let args = ["--rate", "1e9", "--registrations-per-hour", &registrations];
            Self::Process(common::GatewayProc::start_with(&dir.join("gateway"), &args).await)
        } else {
            Self::InProcess(common::interop::TestGateway::start_with(gateway_limits).await)
        };
        gateway.watch();
        gateway
    }

    fn addr(&self) -> GatewayAddr {
        match self {
            Self::InProcess(g) => g.addr.clone(),
            Self::Process(g) => g.addr(),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Self::InProcess(g) => g.port,
            Self::Process(g) => g.port,
        }
    }

    /// Makes this gateway the one [`side`] measures and a stall report describes.
    fn watch(&self) {
        *GATEWAY.lock().unwrap_or_else(|p| p.into_inner()) = Some(Watched {
            in_process: match self {
                Self::InProcess(g) => Some(g.gateway.clone()),
                Self::Process(_) => None,
            },
            port: self.port(),
            pid: match self {
                Self::InProcess(_) => None,
                Self::Process(g) => Some(g.proc.pid().to_string()),
            },
        });
    }

    fn stop(&mut self) {
        match self {
            Self::InProcess(g) => g.stop(),
            Self::Process(g) => g.proc.stop(),
        }
    }

    /// Starts a stopped gateway again on the same port with the same key and state.
    async fn start_again(self) -> Self {
        let gateway = match self {
            Self::InProcess(g) => {
                let port = g.port;
                Self::InProcess(
                    common::interop::TestGateway::restart_with(g, port, gateway_limits).await,
                )
            }
            Self::Process(mut g) => {
                g.start_again().await;
                Self::Process(g)
            }
        };
        gateway.watch();
        gateway
    }
}

/// The running gateway: for the report of a run that stalled (`world::stall_report`), and for
/// its CPU when it is a process of its own ([`side`]).
pub(crate) struct Watched {
    pub(crate) in_process: Option<mib_gateway::Gateway>,
    pub(crate) port: u16,
    pub(crate) pid: Option<String>,
}

pub(crate) static GATEWAY: Mutex<Option<Watched>> = Mutex::new(None);

/// The CPU besides the bridge's: this process (the contacts, the stand-in, and the gateway when
/// it runs here), and the gateway when it runs as a process of its own.
#[derive(Clone, Copy, Default)]
pub(crate) struct Side {
    pub(crate) bench: ProcSample,
    pub(crate) gateway: Option<ProcSample>,
}

impl Side {
    /// CPU seconds of both.
    pub(crate) fn cpu_secs(&self) -> f64 {
        self.bench.cpu_secs + self.gateway.map_or(0.0, |g| g.cpu_secs)
    }
}

pub(crate) fn side(ticks: f64) -> Side {
    let pid = GATEWAY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|w| w.pid.clone());
    Side {
        bench: sample("self", ticks),
        gateway: pid.map(|p| sample(&p, ticks)),
    }
}

/// The CPU per message besides the bridge's, in the one-side-offline runs (the contacts idle):
/// this process's, and the gateway's when it is a process of its own.
pub(crate) fn others_per_msg(from: &Side, to: &Side, n: usize) -> String {
    let here = 1e6 * (to.bench.cpu_secs - from.bench.cpu_secs) / n.max(1) as f64;
    match gateway_us_per_msg(from, to, n) {
        None => format!("this process (gateway, stand-in) {here:.0} µs"),
        Some(gateway) => {
            format!("this process (stand-in) {here:.0} µs, the gateway {gateway:.0} µs")
        }
    }
}

/// The gateway's CPU per message between two samples, when it is a process of its own.
pub(crate) fn gateway_us_per_msg(from: &Side, to: &Side, n: usize) -> Option<f64> {
    let (a, b) = (from.gateway?, to.gateway?);
    Some(1e6 * (b.cpu_secs - a.cpu_secs) / n.max(1) as f64)
}

/// `--restarts`: the gateway goes away for 2 s and comes back, then the bridge is stopped and
/// started again; each time, how long until every login is connected again.
async fn restarts(
    mut gateway: BenchGateway,
    bridge: &mut BridgeProc,
    setup: (&Path, &Path, &Option<Arc<Hs>>),
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
    logins: usize,
    ticks: f64,
) -> BenchGateway {
    let (config, dir, hs) = setup;
    gateway.stop();
    let t = Instant::now();
    while login_gauges(http, ends).await.is_some_and(|(_, c)| c > 0) && t.elapsed() < STALL {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "gateway stopped: every login saw it after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gateway = gateway.start_again().await;
    let back = wait_connected(http, ends, logins, Instant::now()).await;
    back.print("gateway restart (down 2 s)", logins);

    bridge.stop();
    let t = Instant::now();
    *bridge = spawn_bridge(config, dir);
    wait_ready(http, ends, hs.as_ref(), bridge).await;
    let ready = t.elapsed();
    let back = wait_connected(http, ends, logins, t).await;
    let s = sample(&bridge.pid().to_string(), ticks);
    println!(
        "bridge restart: ready after {:.1} s; RSS {:.1} MiB once connected",
        ready.as_secs_f64(),
        mib(s.rss_kib)
    );
    back.print("bridge restart", logins);
    gateway
}

/// Every user logs in through the provisioning API, then opens its DM portals (one per chat, each
/// with the chat's contact); returns the portals' rooms (index = chat) and when the logins were
/// done (since `t0`).
async fn log_in_and_open_portals(
    world: &World,
    users: usize,
    t0: Instant,
) -> (Vec<String>, Duration) {
    let w = world;
    futures::stream::iter((0..users).map(|i| async move {
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
    let rooms: Vec<String> = futures::stream::iter((0..w.chats()).map(|chat| async move {
        let contact = &w.contacts[w.contact_of_chat(chat)].account;
        let user = &w.users[w.user_of_chat(chat)];
        let v = w
            .provision("chats", user, json!({"contact": contact}))
            .await;
        v["chat"]["room_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no room in {v}"))
            .to_owned()
    }))
    .buffered(4)
    .collect()
    .await;
    (rooms, t_logins)
}

/// The homeserver the bridge talks to: the stand-in in this process, or a Synapse from the test
/// venv with the bridge registered; and the bridge's configuration for it.
async fn homeserver(
    opts: &Opts,
    dir: &Path,
    reg: &Arc<Registry>,
    gateway: &GatewayAddr,
) -> (
    Option<Arc<Hs>>,
    Option<common::Synapse>,
    std::path::PathBuf,
    BridgeEndpoints,
) {
    let pg = opts.postgres.as_deref();
    if opts.synapse {
        let placeholder = common::HS_PLACEHOLDER;
        let (config, ends) = write_config(dir, placeholder, "localhost", gateway, pg);
        let registration = dir.join("registration.yaml");
        let out = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"))
            .args(["generate-registration", "-c"])
            .arg(&config)
            .arg("-o")
            .arg(&registration)
            .output()
            .expect("generate-registration");
        assert!(out.status.success(), "generate-registration failed");
        let synapse =
            common::Synapse::start_for_bridge(&dir.join("hs"), &config, &registration).await;
        (None, Some(synapse), config, ends)
    } else {
        let (hs, hs_port) = start_homeserver(reg.clone()).await;
        let url = format!("http://127.0.0.1:{hs_port}");
        let (config, ends) = write_config(dir, &url, DOMAIN, gateway, pg);
        (Some(hs), None, config, ends)
    }
}

/// The first line of the report: what runs against what.
fn print_header(opts: &Opts, pid: &str) {
    println!(
        "bridge_load: {} Matrix users with {} DM portals each, {} interop contacts, {} messages per direction{}; homeserver {}; bridge database {} (bridge pid {pid})",
        opts.users,
        opts.chats_per_user,
        opts.contacts,
        opts.messages,
        if opts.quick { " (--quick)" } else { "" },
        match (opts.synapse, std::env::var("MIB_SYNAPSE_DATABASE").is_ok()) {
            (true, true) => "Synapse on PostgreSQL",
            (true, false) => "Synapse on SQLite",
            _ => "stand-in",
        },
        if opts.postgres.is_some() {
            "Postgres"
        } else {
            "SQLite"
        }
    );
}

async fn bench(opts: Opts) {
    let ticks = clock_ticks();
    let t0 = Instant::now();
    let reg = Registry::new();
    let tmp = tempfile::tempdir().expect("temp dir");

    let mut gateway = BenchGateway::start(opts.gateway_process, tmp.path()).await;
    let gaddr = gateway.addr();

    let domain = if opts.synapse { "localhost" } else { DOMAIN };
    let (hs, synapse, config, ends) = homeserver(&opts, tmp.path(), &reg, &gaddr).await;
    let (mut bridge, workers) = if opts.workers > 1 {
        let mut w = spawn_workers(&config, tmp.path(), &ends, opts.workers).await;
        (w.procs.remove(0), Some(w))
    } else {
        (spawn_bridge(&config, tmp.path()), None)
    };
    // Several workers: their pids, comma-separated (`sample` adds them up).
    let mut pid = std::iter::once(bridge.pid().to_string())
        .chain(
            workers
                .iter()
                .flat_map(|w| w.procs.iter().map(|p| p.pid().to_string())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("http client");

    wait_ready(&http, &ends, hs.as_ref(), &mut bridge).await;
    if let Some(w) = &workers {
        w.wait_listening().await;
    }
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
        provisioning_bases: match &workers {
            Some(w) => w.bases.clone(),
            None => vec![ends.base.clone()],
        },
        users,
        user_accounts,
        chats_per_user: opts.chats_per_user,
        rooms: Vec::new(),
        contacts,
        txn_counter: AtomicU64::new(0),
        clients,
        synced: AtomicUsize::new(0),
        sync_limited: AtomicUsize::new(0),
        ghosts: Vec::new(),
        as_token: AS_TOKEN.to_owned(),
    };

    let (rooms, t_logins) = log_in_and_open_portals(&world, opts.users, t0).await;
    if let Some(w) = &workers {
        w.wait_all_connected(opts.users).await;
    }
    world.rooms = rooms;
    // Through Synapse, each user joins its portal and reads it through its own sync loop.
    for (c, room) in world.clients.iter().zip(&world.rooms) {
        c.join(room).await;
    }
    if synapse.is_some() {
        world.ghosts = ghosts(&world).await;
        world.as_token = registered_as_token(&tmp.path().join("registration.yaml"));
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

    print_header(&opts, &pid);
    println!(
        "set-up: bridge ready {:.1} s, contacts registered {:.1} s, logins {:.1} s, portals {:.1} s (cumulative)",
        t_ready.as_secs_f64(),
        t_contacts.as_secs_f64(),
        t_logins.as_secs_f64(),
        t_portals.as_secs_f64()
    );

    let synapse_pid = synapse.as_ref().map(|s| s.proc.pid().to_string());
    let synapse_start = synapse_pid.as_deref().map(|p| sample(p, ticks));
    if opts.restarts {
        let setup = (config.as_path(), tmp.path(), &hs);
        gateway = restarts(gateway, &mut bridge, setup, &http, &ends, opts.users, ticks).await;
        pid = bridge.pid().to_string();
        println!("(the bridge's CPU figures below count from its restart)");
    }
    let compare = synapse.is_some() && !opts.no_runs && opts.workers <= 1;
    let before = match compare {
        true => Some(baseline_before(&world, &opts, ticks).await),
        false => None,
    };
    let (results, rss_after, warm) = if opts.no_runs {
        (Vec::new(), Vec::new(), sample(&pid, ticks))
    } else {
        measure(&world, &mut bridge, &opts, &pid, ticks).await
    };
    let end = sample(&pid, ticks);
    print_table(&results);
    print_added_latency(&results);
    if !opts.no_runs {
        floor::measure_floor(500).await.print();
    }
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
    let others = side(ticks);
    println!(
        "bridge CPU: {:.1} s in all ({:.1} s during set-up); {}",
        end.cpu_secs,
        idle.cpu_secs,
        match others.gateway {
            None => format!(
                "bench process (gateway, contacts, stand-in): {:.1} s",
                others.bench.cpu_secs
            ),
            Some(g) => format!(
                "bench process (contacts, stand-in): {:.1} s; gateway process: {:.1} s",
                others.bench.cpu_secs, g.cpu_secs
            ),
        }
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
    if hs.is_some() && !opts.no_runs && opts.workers <= 1 {
        // Last, as it restarts the bridge (the figures above are the first process's).
        println!();
        settle(&pid, ticks).await;
        let contacts = (&signal_rt, &gaddr);
        let (n, pid) = (opts.messages, pid.as_str());
        offline_contacts(&world, &mut bridge, &ends, contacts, n, (pid, ticks)).await;
        settle(pid, ticks).await;
        let setup = (config.as_path(), tmp.path(), &hs);
        backlog(&world, &mut bridge, setup, &ends, opts.messages, ticks).await;
    }
    if compare && opts.rounds > 0 {
        alternate(&world, &mut bridge, &opts, &pid, ticks).await;
    }
    if compare {
        let mut baseline: Vec<RunResult> = before.into_iter().collect();
        baseline.extend(measure_baseline(&world, &mut bridge, &opts, ends.port, ticks).await);
        println!();
        println!("baseline: the same messages through a bare appservice, no bridge");
        print_table(&baseline);
        print_ratios(&results, &baseline);
    }
    bridge.stop();
    gateway.stop();
    drop(world);
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
}

/// The allocator of the bridge and the gateway (`mib-alloc`), so that the gateway in this process
/// runs as the `interop-gateway` program does, and the contacts and the stand-in take less of the
/// CPU that the bridge shares with them (glibc's allocator took 8 to 15 % of the gateway's).
#[global_allocator]
static ALLOCATOR: mib_alloc::Allocator = mib_alloc::Allocator;

fn main() {
    mib_alloc::with_settings();
    let opts = parse_opts();
    // Warnings of the gateway and the contacts in this process (a request that got no answer in
    // time, a slow one) go to stderr; `RUST_LOG` picks other levels.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(opts));
    rt.shutdown_timeout(Duration::from_secs(2));
}
