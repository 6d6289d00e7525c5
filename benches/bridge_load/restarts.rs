//! Restarts at scale (`--restarts`): how long until every login is connected again after the
//! gateway restarts and after the bridge restarts, read from the bridge's `mib_logins_connected`
//! gauge, with the curve of connected logins over time.

use super::*;

/// The bridge's metrics page; `None` while it does not answer.
async fn metrics(http: &reqwest::Client, ends: &BridgeEndpoints) -> Option<String> {
    http.get(&ends.metrics).send().await.ok()?.text().await.ok()
}

/// The value of the metric whose line starts with `name` (labels included) and a space.
fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
}

/// The bridge's login gauges: (running, connected); `None` while it does not answer.
pub(crate) async fn login_gauges(
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
) -> Option<(u64, u64)> {
    let text = metrics(http, ends).await?;
    Some((
        metric_value(&text, "mib_logins")?,
        metric_value(&text, "mib_logins_connected")?,
    ))
}

/// The messages the bridge has bridged in `direction` since it started (its
/// `mib_messages_bridged_total`); `None` while it does not answer.
pub(crate) async fn bridged(
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
    direction: &str,
) -> Option<u64> {
    let text = metrics(http, ends).await?;
    let name = format!("mib_messages_bridged_total{{direction=\"{direction}\"}}");
    Some(metric_value(&text, &name).unwrap_or(0))
}

/// Connected logins over time after something restarted at `since`.
pub(crate) struct Recovery {
    /// Until all `want` logins were connected (`None`: not within the limit).
    pub(crate) all_after: Option<Duration>,
    /// (seconds since the restart, connected logins), one sample a second.
    pub(crate) curve: Vec<(f64, u64)>,
}

impl Recovery {
    pub(crate) fn print(&self, what: &str, want: usize) {
        let curve: Vec<String> = self
            .curve
            .iter()
            .map(|(t, n)| format!("{t:.0} s {n}"))
            .collect();
        match self.all_after {
            Some(d) => println!(
                "{what}: all {want} logins connected after {:.1} s (connected: {})",
                d.as_secs_f64(),
                curve.join(", ")
            ),
            None => println!(
                "{what}: NOT all {want} logins connected within {} s (connected: {})",
                RECOVERY_LIMIT.as_secs(),
                curve.join(", ")
            ),
        }
    }
}

/// How long a recovery is waited for.
const RECOVERY_LIMIT: Duration = Duration::from_secs(180);

/// Waits until `want` logins are connected, sampling the gauge every 100 ms.
pub(crate) async fn wait_connected(
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
    want: usize,
    since: Instant,
) -> Recovery {
    let mut curve = Vec::new();
    let mut next_point = 1.0;
    loop {
        let connected = login_gauges(http, ends).await.map_or(0, |(_, c)| c);
        let t = since.elapsed();
        if connected as usize >= want {
            curve.push((t.as_secs_f64(), connected));
            return Recovery {
                all_after: Some(t),
                curve,
            };
        }
        if t.as_secs_f64() >= next_point {
            curve.push((next_point, connected));
            next_point += 1.0;
        }
        if t > RECOVERY_LIMIT {
            return Recovery {
                all_after: None,
                curve,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The backlog run (stand-in only): with the bridge stopped, the contacts send `n` messages,
/// which the gateway keeps for the bridge's logins; then the bridge starts again and delivers
/// them. Here the contacts are idle while the bridge works, where in the other runs their own
/// Signal work shares the two cores with it: this is the nearest the bench comes to the bridge's
/// own interop→Matrix ceiling on this machine.
pub(crate) async fn backlog(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    setup: (&Path, &Path, &Option<Arc<Hs>>),
    ends: &BridgeEndpoints,
    n: usize,
    ticks: f64,
) {
    let (config, dir, hs) = setup;
    bridge.stop();
    let sent = Instant::now();
    let track = send(
        world,
        Dir::InteropToMatrix,
        "backlog interop→Matrix",
        n,
        None,
    )
    .await;
    let send_secs = sent.elapsed().as_secs_f64();
    let restart = world.reg.now();
    let me0 = side(ticks);
    eprintln!("run started: backlog delivery");
    *bridge = spawn_bridge(config, dir);
    let pid = bridge.pid().to_string();
    wait_ready(&world.http, ends, hs.as_ref(), bridge).await;
    let ready = world.reg.now();
    wait_done(world, &track, Some(&mut *bridge), None).await;
    let cpu = sample(&pid, ticks);
    let others = others_per_msg(&me0, &side(ticks), n);
    let recv: Vec<u64> = track
        .recv
        .iter()
        .map(|r| r.load(Ordering::Relaxed))
        .collect();
    let first = recv.iter().copied().min().unwrap_or(restart);
    let last = recv.iter().copied().max().unwrap_or(restart);
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    println!(
        "backlog: {n} interop→Matrix messages sent while the bridge was stopped (the contacts \
         sent {:.0}/s); after its restart it answered at {:.2} s, the first arrived at {:.2} s, \
         all at {:.2} s: {:.0} msgs/s from the first arrival; the new bridge process used {:.0} µs \
         of CPU per message, start-up included, and {others}; \
         RSS {:.1} MiB, peak {:.1} MiB{}",
        n as f64 / send_secs.max(1e-9),
        secs(restart, ready),
        secs(restart, first),
        secs(restart, last),
        n as f64 / secs(first, last).max(1e-9),
        1e6 * cpu.cpu_secs / n as f64,
        mib(cpu.rss_kib),
        mib(cpu.hwm_kib),
        match track.dups.load(Ordering::Relaxed) {
            0 => String::new(),
            d => format!(" ({d} duplicates)"),
        }
    );
}

/// Matrix → interop with every contact offline (stand-in only): the contacts' clients stop, the
/// users send `n` messages as in the max run, and the run lasts until the gateway has stored
/// all of them (the bridge counts each bridged once the gateway answered that it stored it);
/// then the contacts come back and must receive every one. Without the contacts'
/// decryption on the machine, the load besides the bridge is the stand-in and the gateway
/// storing envelopes, so this comes nearest to the bridge's own Matrix → interop ceiling here
/// (as the backlog run does for interop → Matrix).
pub(crate) async fn offline_contacts(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    ends: &BridgeEndpoints,
    (rt, gw): (&SignalRuntime, &GatewayAddr),
    n: usize,
    (pid, ticks): (&str, f64),
) {
    let name = "offline contacts Matrix→interop";
    for c in &world.contacts {
        c.go_offline().await;
    }
    // Sent: the bridge counts a message bridged once the gateway answered that it stored it.
    let sent = || bridged(&world.http, ends, "matrix_to_interop");
    let Some(stored0) = sent().await else {
        panic!("{name}: the bridge's metrics have no count of messages bridged");
    };
    let (b0, m0) = (sample(pid, ticks), side(ticks));
    let t0 = Instant::now();
    eprintln!("run started: {name}");
    let track = send(world, Dir::MatrixToInterop, name, n, None).await;
    let (mut last, mut since) = (stored0, Instant::now());
    loop {
        let stored = sent().await.unwrap_or(last);
        if stored >= stored0 + n as u64 {
            break;
        }
        if stored != last {
            (last, since) = (stored, Instant::now());
        }
        assert!(bridge.is_running(), "the bridge exited during {name}");
        if since.elapsed() >= STALL {
            stall_report(world).await;
            panic!(
                "{name}: the bridge had {} of {n} messages stored at the gateway, then no more \
                 for {} s",
                stored - stored0,
                STALL.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("run ended: {name}");
    let (b1, m1) = (sample(pid, ticks), side(ticks));
    let back = Instant::now();
    for c in &world.contacts {
        c.come_back(rt, gw).await;
    }
    wait_done(world, &track, Some(bridge), None).await;
    let bridge_cpu = b1.cpu_secs - b0.cpu_secs;
    let (switches, rw_calls) = b0.counts_per_msg(&b1, n);
    println!(
        "contacts offline: {n} Matrix→interop messages stored at the gateway in {secs:.2} s: \
         {:.0} msgs/s; the bridge used {:.0} µs of CPU per message ({:.0} % CPU, {:.1} thread \
         switches and {:.1} read and write calls per message), {}; the contacts, back, had every \
         one {:.2} s later{}",
        n as f64 / secs.max(1e-9),
        1e6 * bridge_cpu / n as f64,
        100.0 * bridge_cpu / secs.max(1e-9),
        switches,
        rw_calls,
        others_per_msg(&m0, &m1, n),
        back.elapsed().as_secs_f64(),
        match track.dups.load(Ordering::Relaxed) {
            0 => String::new(),
            d => format!(" ({d} duplicates)"),
        }
    );
}
