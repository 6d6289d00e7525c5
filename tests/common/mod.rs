//! The end-to-end harness: a real Synapse on a free loopback port with the bridge registered,
//! the bridge binary, and a small client-server API client for test users. Every process is
//! killed when its guard drops, also when a test fails.

#![allow(dead_code)]

pub mod alloc;
pub mod e2ee;
pub mod env;
pub mod interop;
pub mod node;
pub mod pg;
pub mod portal;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The reference gateway's binary (`interop-gateway`, crate `mib-gateway`), built when a run
/// of only this package's tests did not build it.
///
/// `MIB_GATEWAY_BIN=PATH` in the environment runs that binary instead, unbuilt (a bench that
/// compares two builds of the gateway).
pub fn gateway_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("MIB_GATEWAY_BIN") {
            return bin.into();
        }
        // target/<profile>/deps/<test> → target/<profile>/interop-gateway
        let exe = std::env::current_exe().expect("test executable");
        let bin = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target directory")
            .join("interop-gateway");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "mib-gateway",
            "--bin",
            "interop-gateway",
        ]);
        if bin.parent().is_some_and(|p| p.ends_with("release")) {
            build.arg("--release");
        }
        let status = build.current_dir(repo()).status().expect("cargo build");
        assert!(status.success(), "building interop-gateway failed");
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
    .clone()
}

/// A free loopback port for a process a test starts (Synapse, the bridge, its metrics).
///
/// Picked at random below the kernel's ephemeral range (32768 and up on Linux), not with
/// `bind(0)`: a port from `bind(0)` is an ephemeral one, which any outgoing connection on the
/// machine may take before the child process binds it (tests run in parallel).
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Renames `log` to `<stem>.<run>.log` so that the next run of the process writes a new file and
/// every run's lines stay available.
pub fn keep_log(log: &Path, run: u32) {
    let stem = log
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("process");
    let _ = std::fs::rename(log, log.with_file_name(format!("{stem}.{run}.log")));
}

/// The reference gateway as its own process (the `interop-gateway` binary): one that can be
/// killed with SIGKILL, or whose CPU can be measured apart from the process that drives it.
pub struct GatewayProc {
    pub proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
    /// The gateway's Noise public key, base64, as the bridge's config takes it.
    pub key_b64: String,
    /// Further `run` arguments, given again at each start.
    args: Vec<String>,
    runs: u32,
}

impl GatewayProc {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[]).await
    }

    /// Starts a gateway with state in `dir` and `args` added to its `run` command line.
    pub async fn start_with(dir: &Path, args: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("gateway dir");
        let out = Command::new(gateway_bin())
            .arg("generate-key")
            .arg("--out")
            .arg(dir.join("gateway.key"))
            .output()
            .expect("interop-gateway generate-key");
        assert!(
            out.status.success(),
            "generate-key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key_b64 = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let port = free_port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut gw = Self {
            proc: Self::spawn(dir, port, &args),
            dir: dir.into(),
            port,
            key_b64,
            args,
            runs: 1,
        };
        gw.wait_ready().await;
        gw
    }

    fn spawn(dir: &Path, port: u16, args: &[String]) -> Proc {
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--key-file")
            .arg(dir.join("gateway.key"))
            .arg("--database")
            .arg(format!("sqlite://{}", dir.join("gateway.db").display()))
            .arg("--blob-dir")
            .arg(dir.join("blobs"))
            .arg("--dev-code")
            .arg(interop::CODE)
            .arg("--max-blob-bytes")
            .arg((2 * 1024 * 1024).to_string())
            .args(args);
        Proc::spawn("gateway", cmd, dir.join("gateway.log"))
    }

    /// Waits for the line the gateway logs once it listens with its database open.
    async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.proc.log).unwrap_or_default();
            if log.contains("interop gateway running") {
                return;
            }
            assert!(
                self.proc.is_running(),
                "the gateway exited:\n{}",
                self.proc.log_tail()
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the gateway did not start:\n{}",
                self.proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the gateway again on the same port with the same key and state.
    pub async fn start_again(&mut self) {
        keep_log(&self.proc.log, self.runs);
        self.runs += 1;
        self.proc = Self::spawn(&self.dir, self.port, &self.args);
        self.wait_ready().await;
    }

    /// Where the bridge's and the contacts' clients reach it.
    pub fn addr(&self) -> matrix_interop_bridge::interop::GatewayAddr {
        use base64::Engine;
        let public_key = base64::engine::general_purpose::STANDARD
            .decode(&self.key_b64)
            .expect("the public key generate-key printed");
        matrix_interop_bridge::interop::GatewayAddr {
            address: format!("127.0.0.1:{}", self.port),
            public_key,
        }
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name, child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(400)..].join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash or the OOM killer would: no shutdown code runs.
    pub fn kill(&mut self) {
        // `Child::kill` sends SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(&mut self) {
        #[cfg(unix)]
        {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !self.is_running() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn venv() -> String {
    std::env::var("MIB_SYNAPSE_VENV").unwrap_or_else(|_| {
        let out = Command::new(repo().join("scripts/ensure-synapse.sh"))
            .output()
            .expect("run ensure-synapse.sh");
        assert!(
            out.status.success(),
            "ensure-synapse.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned()
    })
}

/// The homeserver address a bridge config is written with before Synapse's port is known.
pub const HS_PLACEHOLDER: &str = "http://127.0.0.1:8008";

pub struct Synapse {
    pub url: String,
    pub server_name: String,
    pub shared_secret: String,
    pub proc: Proc,
    pub dir: PathBuf,
    venv: String,
    /// How many times this Synapse was started (see [`Synapse::start_again`]).
    runs: u32,
}

impl Synapse {
    /// Writes a config for `dir` with `registration` and starts Synapse; waits until it answers.
    ///
    /// The port is free when picked, but Synapse takes seconds to import before it binds it, and
    /// a process of a test running beside may bind it meanwhile: Synapse then exits at once
    /// ("Address already in use") and is started again on another port.
    pub async fn start(dir: &Path, registration: &Path) -> Self {
        let venv = venv();
        let mut attempt = 1;
        loop {
            let port = free_port();
            let out = Command::new(repo().join("scripts/synapse-config.sh"))
                .arg(dir)
                .arg(port.to_string())
                .arg(registration)
                .arg("localhost")
                .env("MIB_SYNAPSE_VENV", &venv)
                .output()
                .expect("synapse-config.sh");
            assert!(
                out.status.success(),
                "synapse-config.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let field = |k: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .unwrap_or_else(|| panic!("synapse-config.sh printed no {k}"))
                    .to_owned()
            };
            let url = field("base_url").trim_end_matches('/').to_owned();
            let mut s = Self {
                url,
                server_name: field("server_name"),
                shared_secret: field("shared_secret"),
                proc: Self::spawn(dir, &venv),
                dir: dir.into(),
                venv: venv.clone(),
                runs: 1,
            };
            let versions = format!("{}/_matrix/client/versions", s.url);
            if answers(&versions, Duration::from_secs(60), &mut s.proc).await {
                return s;
            }
            let log = std::fs::read_to_string(&s.proc.log).unwrap_or_default();
            assert!(
                log.contains("Address already in use") && attempt < 5,
                "Synapse exited before it answered\n{}",
                s.proc.log_tail()
            );
            let _ = std::fs::rename(
                &s.proc.log,
                dir.join(format!("synapse.port-taken-{attempt}.out")),
            );
            attempt += 1;
        }
    }

    /// Runs scripts/start-synapse.sh, which execs Synapse: the child process is Synapse itself.
    fn spawn(dir: &Path, venv: &str) -> Proc {
        let mut cmd = Command::new(repo().join("scripts/start-synapse.sh"));
        cmd.arg(dir).env("MIB_SYNAPSE_VENV", venv);
        Proc::spawn("synapse", cmd, dir.join("synapse.out"))
    }

    async fn wait_ready(&mut self) {
        wait_http(
            &format!("{}/_matrix/client/versions", self.url),
            Duration::from_secs(60),
            &mut self.proc,
        )
        .await;
    }

    /// Kills Synapse with SIGKILL, as a crash or the OOM killer would: no shutdown code runs.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts Synapse again after [`kill`](Self::kill): same directory, so the same config,
    /// port, signing key and database (users, access tokens, rooms, appservice transactions);
    /// waits until it answers. The previous run's output is kept as `synapse.N.out`
    /// (homeserver.log is appended to).
    pub async fn start_again(&mut self) {
        self.proc.kill();
        let _ = std::fs::rename(
            self.dir.join("synapse.out"),
            self.dir.join(format!("synapse.{}.out", self.runs)),
        );
        self.runs += 1;
        self.proc = Self::spawn(&self.dir, &self.venv);
        self.wait_ready().await;
    }

    /// [`kill`](Self::kill), `down` without a homeserver, then [`start_again`](Self::start_again).
    pub async fn restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.start_again().await;
    }

    /// Starts Synapse in `dir` with the bridge's `registration`, then points the bridge `config`
    /// (written with [`HS_PLACEHOLDER`] as the homeserver address) at it.
    pub async fn start_for_bridge(dir: &Path, config: &Path, registration: &Path) -> Self {
        let synapse = Self::start(dir, registration).await;
        let text = std::fs::read_to_string(config).expect("read config");
        std::fs::write(config, text.replace(HS_PLACEHOLDER, &synapse.url)).expect("write config");
        synapse
    }

    /// Registers a user with the test password (an existing one is fine).
    pub fn register(&self, localpart: &str) {
        let out = Command::new(repo().join("scripts/register-user.sh"))
            .args([&self.url, &self.shared_secret, localpart, "test-password-1"])
            .output()
            .expect("register-user.sh");
        assert!(
            out.status.success(),
            "register-user.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Registers (or reuses) a user and logs in.
    pub async fn user(&self, localpart: &str) -> MatrixUser {
        self.register(localpart);
        let http = reqwest::Client::new();
        let resp: Value = http
            .post(format!("{}/_matrix/client/v3/login", self.url))
            .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": "test-password-1"}))
            .send()
            .await
            .expect("login")
            .json()
            .await
            .expect("login json");
        MatrixUser {
            http,
            base: self.url.clone(),
            token: resp["access_token"]
                .as_str()
                .expect("access token")
                .to_owned(),
            user_id: resp["user_id"].as_str().expect("user id").to_owned(),
        }
    }
}

/// Waits until `url` answers with a success, `timeout` at most; `false` as soon as `proc` has
/// exited (its log says why).
pub async fn answers(url: &str, timeout: Duration, proc: &mut Proc) -> bool {
    let start = Instant::now();
    // A request that never gets an answer (a process that took the port and speaks something
    // else) must not outlast `timeout`.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return true;
        }
        if !proc.is_running() {
            return false;
        }
        assert!(
            start.elapsed() < timeout,
            "{url} did not answer in {timeout:?}\n{}",
            proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `url` answers with a success; fails with `proc`'s log if it does not in
/// `timeout`, or if `proc` exits first.
pub async fn wait_http(url: &str, timeout: Duration, proc: &mut Proc) {
    assert!(
        answers(url, timeout, proc).await,
        "{} exited before {url} answered\n{}",
        proc.name,
        proc.log_tail()
    );
}

/// A logged-in Matrix user on the test homeserver.
pub struct MatrixUser {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
    pub user_id: String,
}

impl MatrixUser {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.try_call(method, path, body).await.expect("request")
    }

    /// As [`call`](Self::call), with an unreachable homeserver (stopped, restarting) an error
    /// instead of a panic.
    pub async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Creates a DM with `invitee` and returns the room id.
    pub async fn create_dm(&self, invitee: &str) -> String {
        let (s, b) = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(json!({"invite": [invitee], "is_direct": true, "preset": "trusted_private_chat"})),
            )
            .await;
        assert_eq!(s, 200, "createRoom: {b}");
        b["room_id"].as_str().expect("room id").to_owned()
    }

    pub async fn send_text(&self, room: &str, text: &str) -> String {
        let txn = uuid::Uuid::new_v4();
        let (s, b) = self
            .call(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
                Some(json!({"msgtype": "m.text", "body": text})),
            )
            .await;
        assert_eq!(s, 200, "send: {b}");
        b["event_id"].as_str().expect("event id").to_owned()
    }

    pub async fn messages(&self, room: &str) -> Vec<Value> {
        let (s, b) = self
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"),
                None,
            )
            .await;
        assert_eq!(s, 200, "messages: {b}");
        let mut events = b["chunk"].as_array().cloned().unwrap_or_default();
        events.reverse();
        events
    }

    /// Every event of `room`'s timeline, oldest first (paginates past the 100 of `messages`).
    pub async fn all_messages(&self, room: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let mut from = String::new();
        loop {
            let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1000");
            if !from.is_empty() {
                path.push_str(&format!("&from={}", urlencode(&from)));
            }
            let (s, b) = self.call(reqwest::Method::GET, &path, None).await;
            assert_eq!(s, 200, "messages: {b}");
            let chunk = b["chunk"].as_array().cloned().unwrap_or_default();
            let done = chunk.is_empty();
            events.extend(chunk);
            match b["end"].as_str() {
                Some(end) if !done => from = end.to_owned(),
                _ => break,
            }
        }
        events.reverse();
        events
    }

    /// Waits for an event in `room` matching `pred`, from oldest to newest.
    pub async fn wait_for(&self, room: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(ev) = self.messages(room).await.into_iter().find(|e| pred(e)) {
                return ev;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what} in {room}: {:#?}",
                self.messages(room).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn join(&self, room: &str) {
        let (s, b) = self
            .call(
                reqwest::Method::POST,
                &format!("/_matrix/client/v3/rooms/{room}/join"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200, "join: {b}");
    }

    /// Sends any message-like event; returns the event id.
    pub async fn send(&self, room: &str, event_type: &str, content: Value) -> String {
        let txn = uuid::Uuid::new_v4();
        let (s, b) = self
            .call(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{room}/send/{event_type}/{txn}"),
                Some(content),
            )
            .await;
        assert_eq!(s, 200, "send: {b}");
        b["event_id"].as_str().expect("event id").to_owned()
    }

    pub async fn redact(&self, room: &str, event_id: &str) {
        let txn = uuid::Uuid::new_v4();
        let (s, b) = self
            .call(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{room}/redact/{event_id}/{txn}"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200, "redact: {b}");
    }

    pub async fn read_receipt(&self, room: &str, event_id: &str) {
        let (s, b) = self
            .call(
                reqwest::Method::POST,
                &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{event_id}"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200, "receipt: {b}");
    }

    pub async fn typing(&self, room: &str, typing: bool) {
        let (s, b) = self
            .call(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{room}/typing/{}", self.user_id),
                Some(json!({"typing": typing, "timeout": 20000})),
            )
            .await;
        assert_eq!(s, 200, "typing: {b}");
    }

    pub async fn upload(&self, data: Vec<u8>, mimetype: &str) -> String {
        let resp = self
            .http
            .post(format!(
                "{}/_matrix/media/v3/upload?filename=file",
                self.base
            ))
            .bearer_auth(&self.token)
            .header("content-type", mimetype)
            .body(data)
            .send()
            .await
            .expect("upload");
        let b: Value = resp.json().await.expect("upload json");
        b["content_uri"].as_str().expect("content uri").to_owned()
    }

    pub async fn download(&self, mxc: &str) -> Vec<u8> {
        let path = mxc.strip_prefix("mxc://").expect("mxc");
        let resp = self
            .http
            .get(format!(
                "{}/_matrix/client/v1/media/download/{path}",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("download");
        assert!(
            resp.status().is_success(),
            "download {mxc}: {}",
            resp.status()
        );
        resp.bytes().await.expect("bytes").to_vec()
    }

    /// The room's ephemeral events (receipts, typing): an initial sync, then one incremental sync
    /// (typing notifications only show up in the latter).
    pub async fn ephemeral(&self, room: &str) -> Vec<Value> {
        // Synapse answers a sync identical to a recent one from a cache (for minutes), which would
        // hide new typing notifications: every call uses a filter of its own.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let limit = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let filter = json!({"room": {"rooms": [room], "timeline": {"limit": limit}, "ephemeral": {"types": ["m.receipt", "m.typing"]}}});
        let filter = urlencode(&filter.to_string());
        let (s, b) = self
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/sync?timeout=0&filter={filter}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "sync: {b}");
        let mut out = b["rooms"]["join"][room]["ephemeral"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let since = b["next_batch"].as_str().unwrap_or_default().to_owned();
        let (s, b) = self
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/sync?timeout=500&since={since}&filter={filter}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "sync: {b}");
        out.extend(
            b["rooms"]["join"][room]["ephemeral"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        out
    }

    /// Waits for the first invite to a room (not a space) other than `except`; returns its id.
    /// Uses sync tokens: Synapse answers identical initial syncs from a cache.
    pub async fn wait_invite(&self, except: &[&str]) -> String {
        self.wait_invite_of(except, false).await
    }

    /// Waits for an invite to a space (the login's personal space); returns its id.
    pub async fn wait_space_invite(&self) -> String {
        self.wait_invite_of(&[], true).await
    }

    async fn wait_invite_of(&self, except: &[&str], space: bool) -> String {
        let start = Instant::now();
        let mut since = String::new();
        loop {
            let path = if since.is_empty() {
                "/_matrix/client/v3/sync?timeout=0".to_owned()
            } else {
                format!("/_matrix/client/v3/sync?timeout=1000&since={since}")
            };
            let (_, b) = self.call(reqwest::Method::GET, &path, None).await;
            let is_space = |invite: &Value| {
                invite["invite_state"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["type"] == "m.room.create" && e["content"]["type"] == "m.space")
            };
            if let Some(inv) = b["rooms"]["invite"].as_object()
                && let Some(room) = inv
                    .iter()
                    .find(|(r, i)| !except.contains(&r.as_str()) && is_space(i) == space)
                    .map(|(r, _)| r)
            {
                return room.clone();
            }
            since = b["next_batch"].as_str().unwrap_or_default().to_owned();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no invite arrived: {}",
                b["rooms"]
            );
        }
    }

    pub async fn joined_members(&self, room: &str) -> Vec<String> {
        let (_, b) = self
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/rooms/{room}/joined_members"),
                None,
            )
            .await;
        b["joined"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// The command of one bridge worker of several (`workers.enabled` in `config`): its own
/// appservice and metrics ports and its id, set through the environment.
pub fn worker_command(config: &Path, vault_key: &str, id: &str, ports: (u16, u16)) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"));
    cmd.arg("-c")
        .arg(config)
        .env("MIB_VAULT_MASTER_KEY", vault_key)
        .env("MIB__APPSERVICE__PORT", ports.0.to_string())
        .env("MIB__METRICS__LISTEN", format!("127.0.0.1:{}", ports.1))
        .env("MIB__WORKERS__ID", id);
    cmd
}

/// A bridge config for tests: SQLite in `dir`, the given homeserver, listening on a free port.
pub struct BridgeSetup {
    pub config: PathBuf,
    pub registration: PathBuf,
    pub port: u16,
    pub dir: PathBuf,
}

impl BridgeSetup {
    /// Writes config.yaml (with `extra` appended to the bridge section's permissions) and the registration.
    pub fn write(dir: &Path, hs_url_placeholder_port: u16, permissions: &[(&str, &str)]) -> Self {
        Self::write_with_gateway(
            dir,
            hs_url_placeholder_port,
            permissions,
            "127.0.0.1:9",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
    }

    pub fn write_with_gateway(
        dir: &Path,
        hs_url_placeholder_port: u16,
        permissions: &[(&str, &str)],
        gateway: &str,
        gateway_key: &str,
    ) -> Self {
        Self::write_full(
            dir,
            hs_url_placeholder_port,
            permissions,
            gateway,
            gateway_key,
            "",
        )
    }

    /// As [`write_with_gateway`](Self::write_with_gateway), with more top-level sections appended.
    pub fn write_full(
        dir: &Path,
        hs_url_placeholder_port: u16,
        permissions: &[(&str, &str)],
        gateway: &str,
        gateway_key: &str,
        extra_sections: &str,
    ) -> Self {
        let port = free_port();
        let metrics_port = free_port();
        let perms: String = permissions
            .iter()
            .map(|(k, v)| format!("        \"{k}\": {v}\n"))
            .collect();
        let config = dir.join("config.yaml");
        let text = format!(
            "homeserver:\n    address: http://127.0.0.1:{hs_url_placeholder_port}\n    domain: localhost\n\
             appservice:\n    address: http://127.0.0.1:{port}\n    hostname: 127.0.0.1\n    port: {port}\n    id: interop-test\n    as_token: x\n    hs_token: x\n\
             database:\n    type: sqlite\n    uri: sqlite://{db}\n\
             bridge:\n    permissions:\n{perms}\
             interop:\n    gateway_address: {gateway}\n    gateway_public_key: \"{gateway_key}\"\n\
             metrics:\n    listen: 127.0.0.1:{metrics_port}\n\
             logging:\n    level: debug\n{extra_sections}",
            db = dir.join("bridge.db").display(),
        );
        std::fs::write(&config, text).expect("write config");
        let registration = dir.join("registration.yaml");
        let out = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"))
            .arg("generate-registration")
            .arg("-c")
            .arg(&config)
            .arg("-o")
            .arg(&registration)
            .output()
            .expect("generate-registration");
        assert!(
            out.status.success(),
            "generate-registration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            config,
            registration,
            port,
            dir: dir.into(),
        }
    }

    pub async fn start(&self) -> Proc {
        self.start_in(None).await
    }

    /// Starts one worker of several (`workers.enabled` in the config): its own appservice and
    /// metrics ports and id, through the environment; waits for its /health.
    pub async fn start_worker(&self, id: &str, port: u16, metrics_port: u16) -> Proc {
        let cmd = worker_command(
            &self.config,
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            id,
            (port, metrics_port),
        );
        let mut proc = Proc::spawn("bridge", cmd, self.dir.join(format!("bridge-{id}.log")));
        wait_http(
            &format!("http://127.0.0.1:{port}/health"),
            Duration::from_secs(30),
            &mut proc,
        )
        .await;
        proc
    }

    /// Starts the bridge with `workdir` as its working directory (the test's own by default).
    pub async fn start_in(&self, workdir: Option<&Path>) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"));
        if let Some(dir) = workdir {
            cmd.current_dir(dir);
        }
        cmd.arg("-c").arg(&self.config).env(
            "MIB_VAULT_MASTER_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        );
        let mut proc = Proc::spawn("bridge", cmd, self.dir.join("bridge.log"));
        wait_http(
            &format!("http://127.0.0.1:{}/health", self.port),
            Duration::from_secs(30),
            &mut proc,
        )
        .await;
        proc
    }
}

/// Sends on a request a test's proxy took, to `upstream`, and gives back the answer (502 when
/// `upstream` cannot be reached, as a reverse proxy would).
pub async fn forward(
    http: &reqwest::Client,
    upstream: &str,
    parts: &http::request::Parts,
    body: Vec<u8>,
) -> axum::response::Response {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut rb = http.request(parts.method.clone(), format!("{upstream}{path}"));
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" {
            rb = rb.header(k, v);
        }
    }
    let mut b = axum::response::Response::builder();
    match rb.body(body).send().await {
        Ok(resp) => {
            b = b.status(resp.status().as_u16());
            for (k, v) in resp.headers() {
                if k != "content-length" && k != "transfer-encoding" {
                    b = b.header(k, v);
                }
            }
            let body = resp.bytes().await.unwrap_or_default();
            b.body(axum::body::Body::from(body)).expect("response")
        }
        Err(e) => b
            .status(502)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(
                json!({"errcode": "M_UNKNOWN", "error": e.to_string()}).to_string(),
            ))
            .expect("response"),
    }
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A round-robin HTTP load balancer for the tests' workers, as an admin's haproxy or nginx
/// would be: each request goes to the next upstream, and to the one after it when that one
/// cannot be reached (a worker that died); a request that reached an upstream which failed while
/// answering gets a 502 back, as from a reverse proxy.
pub async fn serve_balancer(port: u16, upstreams: Vec<String>) -> tokio::task::JoinHandle<()> {
    use axum::{extract::State, response::Response};
    #[derive(Clone)]
    struct Lb {
        http: reqwest::Client,
        upstreams: Arc<Vec<String>>,
        next: Arc<std::sync::atomic::AtomicUsize>,
    }
    async fn balance(State(lb): State<Lb>, req: axum::extract::Request) -> Response {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024 * 1024).await else {
            return Response::builder()
                .status(400)
                .body(axum::body::Body::empty())
                .expect("response");
        };
        let start = lb.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = lb.upstreams.len();
        for i in 0..n {
            let upstream = &lb.upstreams[(start + i) % n];
            // A quick probe first, so that a dead upstream is skipped rather than answered 502.
            let addr = upstream.trim_start_matches("http://");
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                continue;
            }
            return forward(&lb.http, upstream, &parts, bytes.to_vec()).await;
        }
        Response::builder()
            .status(502)
            .body(axum::body::Body::from("no upstream"))
            .expect("response")
    }
    let lb = Lb {
        http: reqwest::Client::new(),
        upstreams: Arc::new(upstreams),
        next: Arc::default(),
    };
    let app = axum::Router::new().fallback(balance).with_state(lb);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("balancer port");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// One bridge worker of several (see [`WorkerSet`]).
pub struct Worker {
    pub proc: Proc,
    pub id: String,
    /// Its own appservice port (the balancer's upstream).
    pub port: u16,
    pub metrics: u16,
}

/// A gauge from a bridge's /metrics (`None` when it does not answer).
pub async fn gauge(metrics_port: u16, name: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Several bridge workers on one database (`setup`'s config must point at PostgreSQL), behind a
/// round-robin balancer on the registered port.
pub struct WorkerSet {
    pub live: Vec<Worker>,
    /// Killed on purpose; kept for their logs.
    pub dead: Vec<Worker>,
    _balancer: tokio::task::JoinHandle<()>,
}

impl WorkerSet {
    pub async fn start(setup: &BridgeSetup, n: usize) -> Self {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&setup.config)
            .expect("config");
        std::io::Write::write_all(&mut f, b"workers:\n    enabled: true\n").expect("config");
        let mut live = Vec::new();
        let mut upstreams = Vec::new();
        for i in 0..n {
            let (port, metrics) = (free_port(), free_port());
            let id = format!("w{i}");
            live.push(Worker {
                proc: setup.start_worker(&id, port, metrics).await,
                id,
                port,
                metrics,
            });
            upstreams.push(format!("http://127.0.0.1:{port}"));
        }
        Self {
            live,
            dead: Vec::new(),
            _balancer: serve_balancer(setup.port, upstreams).await,
        }
    }

    /// Kills the worker running a login (the first found) with SIGKILL; returns its pid and id.
    pub async fn kill_login_worker(&mut self) -> (u32, String) {
        for i in 0..self.live.len() {
            if gauge(self.live[i].metrics, "mib_logins").await.unwrap_or(0) > 0 {
                let mut w = self.live.remove(i);
                let pid = w.proc.pid();
                w.proc.kill();
                let id = w.id.clone();
                self.dead.push(w);
                return (pid, id);
            }
        }
        panic!("no worker runs a login");
    }

    /// Waits until a live worker has a login connected; returns which and how long it took.
    pub async fn wait_login_taken_over(&self, limit: Duration) -> (String, Duration) {
        let start = Instant::now();
        loop {
            for w in &self.live {
                if gauge(w.metrics, "mib_logins_connected").await.unwrap_or(0) > 0 {
                    return (w.id.clone(), start.elapsed());
                }
            }
            assert!(
                start.elapsed() < limit,
                "no worker took the login over within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every worker not killed on purpose is running.
    pub fn all_running(&mut self) -> bool {
        self.live.iter_mut().all(|w| w.proc.is_running())
    }

    pub fn kill_all(&mut self) {
        for w in &mut self.live {
            w.proc.kill();
        }
    }
}
