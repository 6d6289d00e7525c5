//! The bridge process: its configuration, start-up, samples of its memory and CPU, health.

use super::*;

/// The bridge's process: the tests' process guard (its log's last lines are printed when the
/// bench panics; it is killed when dropped).
pub(crate) type BridgeProc = common::Proc;

pub(crate) struct BridgeEndpoints {
    /// The registered appservice port (the bridge's, or the workers' balancer's).
    pub(crate) port: u16,
    pub(crate) base: String,
    pub(crate) metrics: String,
}

pub(crate) fn write_config(
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
            port,
            base: format!("http://127.0.0.1:{port}"),
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        },
    )
}

pub(crate) fn spawn_bridge(config: &Path, dir: &Path) -> BridgeProc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"));
    cmd.arg("-c")
        .arg(config)
        .env("MIB_VAULT_MASTER_KEY", VAULT_KEY)
        .env_remove("RUST_LOG");
    if sql_log_wanted() {
        cmd.env("RUST_LOG", "warn,sqlx::query=debug");
    }
    common::Proc::spawn("the bridge", cmd, dir.join("bridge.log"))
}

/// Memory, CPU and thread switches of a process, from /proc.
#[derive(Clone, Copy, Default)]
pub(crate) struct ProcSample {
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    pub(crate) cpu_secs: f64,
    /// Context switches of its threads (voluntary and not), summed over the threads alive now:
    /// a thread hand-off (a wake-up, a wait on a channel, a lock or I/O) is one or two. The
    /// bridge's threads live as long as it does (runtime workers, Signal shards, SQLite
    /// connections), so a difference over a run counts the run's.
    pub(crate) switches: u64,
    /// Read and write system calls of the whole process (`syscr` + `syscw` of /proc/PID/io:
    /// `read`, `write`, `pread64`, `pwrite64` and the like, SQLite's page reads and log writes
    /// among them; socket `recvfrom` and `sendto` are not counted there).
    pub(crate) rw_calls: u64,
}

impl ProcSample {
    /// Thread switches and read and write calls per message between `self` and the later
    /// sample `to`, over `n` messages.
    pub(crate) fn counts_per_msg(&self, to: &ProcSample, n: usize) -> (f64, f64) {
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / n.max(1) as f64;
        (
            per(self.switches, to.switches),
            per(self.rw_calls, to.rw_calls),
        )
    }
}

pub(crate) fn clock_ticks() -> f64 {
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

/// Memory and CPU of a process, or the sum over several (`pid` comma-separated).
pub(crate) fn sample(pid: &str, ticks: f64) -> ProcSample {
    pid.split(',').fold(ProcSample::default(), |acc, p| {
        let s = sample_one(p, ticks);
        ProcSample {
            rss_kib: acc.rss_kib + s.rss_kib,
            hwm_kib: acc.hwm_kib + s.hwm_kib,
            cpu_secs: acc.cpu_secs + s.cpu_secs,
            switches: acc.switches + s.switches,
            rw_calls: acc.rw_calls + s.rw_calls,
        }
    })
}

fn sample_one(pid: &str, ticks: f64) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
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
        rss_kib: proc_field(&status, "VmRSS:"),
        hwm_kib: proc_field(&status, "VmHWM:"),
        cpu_secs: (field(11) + field(12)) / ticks,
        switches: switches(pid),
        rw_calls: rw_calls(pid),
    }
}

/// The first number after `field` on one of `text`'s lines, 0 without one.
fn proc_field(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// [`ProcSample::switches`] of `pid`.
fn switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            proc_field(&status, "voluntary_ctxt_switches:")
                + proc_field(&status, "nonvoluntary_ctxt_switches:")
        })
        .sum()
}

/// [`ProcSample::rw_calls`] of `pid`.
fn rw_calls(pid: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    proc_field(&io, "syscr:") + proc_field(&io, "syscw:")
}

/// Waits until /health answers and the start-up checks reached the ping (stand-in) or /ready
/// answers (Synapse).
pub(crate) async fn wait_ready(
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
        assert!(bridge.is_running(), "the bridge exited at start-up");
        assert!(
            Instant::now() < deadline,
            "the bridge did not become ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bridge's error counters and the warnings in its log.
pub(crate) async fn print_bridge_health(
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
    log: &Path,
) {
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

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `--workers N`: the bridge's workers on one database, behind a balancer on the registered
/// address.
pub(crate) struct Workers {
    pub(crate) procs: Vec<BridgeProc>,
    /// Each worker's own base URL (for provisioning).
    pub(crate) bases: Vec<String>,
    metrics: Vec<u16>,
    _balancer: tokio::task::JoinHandle<()>,
}

pub(crate) async fn spawn_workers(
    config: &Path,
    dir: &Path,
    ends: &BridgeEndpoints,
    n: usize,
) -> Workers {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(config)
        .expect("config");
    std::io::Write::write_all(&mut f, b"workers:\n    enabled: true\n").expect("config");
    let (mut procs, mut bases, mut metrics) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (port, metrics_port) = (common::free_port(), common::free_port());
        let mut cmd =
            common::worker_command(config, VAULT_KEY, &format!("w{i}"), (port, metrics_port));
        cmd.env_remove("RUST_LOG");
        procs.push(common::Proc::spawn(
            "a bridge worker",
            cmd,
            dir.join(format!("bridge-w{i}.log")),
        ));
        bases.push(format!("http://127.0.0.1:{port}"));
        metrics.push(metrics_port);
    }
    let balancer = common::serve_balancer(ends.port, bases.clone()).await;
    Workers {
        procs,
        bases,
        metrics,
        _balancer: balancer,
    }
}

impl Workers {
    /// Waits until every worker accepts connections: the balancer answers as soon as one does,
    /// and the provisioning requests go to each worker directly.
    pub(crate) async fn wait_listening(&self) {
        let start = Instant::now();
        for base in &self.bases {
            let addr = base.trim_start_matches("http://");
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "a worker does not listen at {addr}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits until `logins` logins are connected over all the workers, and prints how they are
    /// spread.
    pub(crate) async fn wait_all_connected(&self, logins: usize) {
        let start = Instant::now();
        loop {
            let mut per = Vec::new();
            for m in &self.metrics {
                per.push(common::gauge(*m, "mib_logins_connected").await.unwrap_or(0));
            }
            if per.iter().sum::<u64>() as usize >= logins {
                println!(
                    "workers: {} logins connected, spread {per:?} (after {:.1} s)",
                    logins,
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "logins not all connected over the workers: {per:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// With `MIB_BENCH_SQL_LOG` set, the bridge logs every SQL statement it runs (sqlx's debug
/// events) and each run at full rate prints how many it took per message, statement by
/// statement. Logging costs time of its own: the rates of such a run are not its figures.
pub(crate) fn sql_log_wanted() -> bool {
    std::env::var_os("MIB_BENCH_SQL_LOG").is_some()
}

/// How far the bridge's log has grown (where the statements of the next run start).
pub(crate) fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// Prints the statements logged after byte `from` of `log`, per message of the run, most
/// frequent first.
pub(crate) fn print_statements(log: &Path, from: u64, messages: usize) {
    use std::io::{Read, Seek};
    let mut text = String::new();
    let Ok(mut f) = std::fs::File::open(log) else {
        return;
    };
    if f.seek(std::io::SeekFrom::Start(from)).is_err() || f.read_to_string(&mut text).is_err() {
        return;
    }
    let mut by_summary: std::collections::HashMap<String, usize> = Default::default();
    let mut total = 0;
    for line in text.lines().filter(|l| l.contains("sqlx::query")) {
        *by_summary.entry(statement_kind(line)).or_default() += 1;
        total += 1;
    }
    let per = |n: usize| n as f64 / messages.max(1) as f64;
    println!(
        "  SQL statements: {total} for {messages} messages, {:.2} per message",
        per(total)
    );
    let mut rows: Vec<_> = by_summary.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (summary, n) in rows.iter().take(20) {
        println!("    {:>6.2}  {summary}", per(*n));
    }
}

/// A logged statement as its verb and first table (`SELECT portal`, `INSERT vault_record`,
/// `COMMIT`), from its text when sqlx logged it whole, else from its summary.
fn statement_kind(line: &str) -> String {
    let field = |name: &str| {
        line.split_once(name)
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(v, _)| v.replace("\\n", " "))
            .filter(|v| !v.trim().is_empty())
    };
    let text = field("db.statement=\"")
        .or_else(|| field("summary=\""))
        .unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().collect();
    let verb = words.first().map_or("?".to_owned(), |w| w.to_uppercase());
    let table = words
        .windows(2)
        .find(|w| ["FROM", "INTO", "UPDATE"].contains(&w[0].to_uppercase().as_str()))
        .map(|w| w[1].trim_matches(|c: char| !c.is_alphanumeric() && c != '_'));
    match table {
        Some(t) => format!("{verb} {t}"),
        None => verb,
    }
}
