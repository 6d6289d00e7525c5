//! Drives a Node test contact (tests/peers/contact.js, official libsignal) over JSON lines.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::repo;

pub struct NodeContact {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    /// Events seen while waiting for replies, in order.
    pub backlog: Vec<Value>,
    next_req: u64,
    pub account: String,
}

impl NodeContact {
    pub fn spawn() -> Self {
        let peers = repo().join("tests/peers");
        assert!(
            peers
                .join("node_modules/@signalapp/libsignal-client")
                .exists(),
            "tests/peers/node_modules is missing: run scripts/test.sh (it runs npm ci)"
        );
        Self::spawn_program("node", &[&peers.join("contact.js").to_string_lossy()])
    }

    /// A contact on official libsignal 0.72.1, the last release line that still does classic
    /// X3DH (`set_kyber` turns its Kyber prekeys off and on).
    pub fn spawn_x3dh() -> Self {
        let peers = repo().join("tests/peers");
        assert!(
            peers.join("node_modules/libsignal-client-x3dh").exists(),
            "tests/peers/node_modules is missing libsignal 0.72.1: run scripts/test.sh (it runs npm ci)"
        );
        Self::spawn_with_env(
            "node",
            &[&peers.join("contact.js").to_string_lossy()],
            &[("MIB_CONTACT_LIBSIGNAL", "x3dh")],
        )
    }

    /// Any JSON-lines agent (the E2EE Matrix client is a Python one).
    pub fn spawn_program(program: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(program, args, &[])
    }

    fn spawn_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node contact");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                    // When the line arrived (ms since the epoch), for delay measurements.
                    if v.get("event").is_some() {
                        v["rx_ms"] = json!(now_ms());
                    }
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            backlog: Vec::new(),
            next_req: 1,
            account: String::new(),
        }
    }

    /// Runs a command and returns its reply; panics on `ok: false`.
    pub fn call(&mut self, mut cmd: Value) -> Value {
        let r = self.try_call(&mut cmd);
        assert_eq!(r["ok"], true, "node command {cmd} failed: {r}");
        r
    }

    pub fn try_call(&mut self, cmd: &mut Value) -> Value {
        let req = self.next_req;
        self.next_req += 1;
        cmd["req"] = json!(req);
        writeln!(self.stdin, "{cmd}").expect("write to node");
        self.stdin.flush().expect("flush");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("node did not answer {cmd}"));
            // Replies carry our `req` (and may have an `event` field of their own).
            if v["req"] == json!(req) {
                return v;
            }
            if v.get("event").is_some() {
                self.backlog.push(v);
            }
        }
    }

    /// Waits for an event matching `pred` (looking at the backlog first).
    pub fn event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for node event {what}; backlog: {:#?}",
                        self.backlog
                    )
                });
            if v.get("event").is_some() {
                if pred(&v) {
                    return v;
                }
                self.backlog.push(v);
            }
        }
    }

    /// Takes the events in the backlog that match `pred`, oldest first.
    pub fn take_events(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (taken, kept) = std::mem::take(&mut self.backlog)
            .into_iter()
            .partition(pred);
        self.backlog = kept;
        taken
    }

    /// Moves the event lines that arrive within `wait` into the backlog; never panics.
    pub fn pump(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Ok(v) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if v.get("event").is_some() {
                self.backlog.push(v);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }

    /// Connects, registers with `code`, logs in and uploads keys.
    pub fn setup(&mut self, port: u16, server_key_b64: &str, account: &str, code: &str) {
        self.call(json!({"cmd": "connect", "host": "127.0.0.1", "port": port, "server_key": server_key_b64}));
        self.call(json!({"cmd": "register", "account": account, "code": code}));
        self.call(json!({"cmd": "login"}));
        self.call(json!({"cmd": "upload_keys", "one_time": 20, "kyber": 20}));
        self.account = account.to_owned();
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Drop for NodeContact {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
