//! The runs: one direction at a time, at full speed or paced; their results and table.

use super::*;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Dir {
    MatrixToInterop,
    InteropToMatrix,
    /// Contacts to contacts through the gateway, without the bridge: the ceiling of everything
    /// but the bridge on this machine.
    Reference,
    /// With `--synapse`, the baseline: ghosts sending through a bare appservice, no bridge.
    BareToMatrix,
    /// With `--synapse`, the baseline: users sending to a bare appservice, no bridge.
    MatrixToBare,
}

impl Dir {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Dir::MatrixToInterop => "Matrix → interop",
            Dir::InteropToMatrix => "interop → Matrix",
            Dir::Reference => "interop → interop",
            Dir::BareToMatrix => "bare AS → Matrix",
            Dir::MatrixToBare => "Matrix → bare AS",
        }
    }
}

pub(crate) struct RunResult {
    pub(crate) dir: Dir,
    pub(crate) kind: String,
    pub(crate) n: usize,
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) bridge_cpu_pct: f64,
    pub(crate) bridge_cpu_us_per_msg: f64,
    /// The bridge's thread switches per message ([`ProcSample::switches`]).
    pub(crate) bridge_switches_per_msg: f64,
    /// The bridge's read and write calls per message ([`ProcSample::rw_calls`]).
    pub(crate) bridge_rw_calls_per_msg: f64,
    pub(crate) bench_cpu_pct: f64,
    /// With `--gateway-process`: the gateway's own CPU per message.
    pub(crate) gateway_cpu_us_per_msg: Option<f64>,
    pub(crate) dups: usize,
    pub(crate) resends: usize,
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub(crate) fn summarize(
    dir: Dir,
    kind: String,
    t: &Track,
    cpu: (ProcSample, ProcSample),
    me: (Side, Side),
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
    // `MIB_BENCH_LATENCY_DIR=D`: each run's messages as `sent_ms latency_ms` lines, in the
    // order sent, to D/<direction> <run>.txt (to see when the slow ones were sent).
    if let Some(dir_out) = std::env::var_os("MIB_BENCH_LATENCY_DIR") {
        let mut rows: Vec<(u64, f64)> = (0..t.len())
            .map(|i| (t.sent[i].load(Ordering::Relaxed), lat[i]))
            .collect();
        rows.sort_by_key(|r| r.0);
        let text: String = rows
            .iter()
            .map(|(s, l)| format!("{:.3} {l:.3}\n", s.saturating_sub(first) as f64 / 1e6))
            .collect();
        let name = format!("{} {kind}.txt", dir.label()).replace('/', " per ");
        let file = std::path::Path::new(&dir_out).join(name);
        if let Err(e) = std::fs::write(&file, text) {
            eprintln!("cannot write {}: {e}", file.display());
        }
    }
    lat.sort_by(f64::total_cmp);
    let secs = (last.saturating_sub(first)) as f64 / 1e9;
    let n = t.len();
    let bridge_cpu = cpu.1.cpu_secs - cpu.0.cpu_secs;
    let bench_cpu = me.1.bench.cpu_secs - me.0.bench.cpu_secs;
    let (switches, rw_calls) = cpu.0.counts_per_msg(&cpu.1, n);
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
        bridge_switches_per_msg: switches,
        bridge_rw_calls_per_msg: rw_calls,
        bench_cpu_pct: 100.0 * bench_cpu / secs.max(1e-9),
        gateway_cpu_us_per_msg: gateway_us_per_msg(&me.0, &me.1, n),
        dups: t.dups.load(Ordering::Relaxed),
        resends: t.resends.load(Ordering::Relaxed),
    }
}

/// Sends `n` messages in `dir` at full speed (`rate` = None) or paced at `rate` per second, and
/// waits until all have arrived. The wait for arrivals starts with the first send, so that
/// sends that stop being taken are reported as a stall too.
pub(crate) async fn run(
    world: &Arc<World>,
    bridge: Option<&mut BridgeProc>,
    dir: Dir,
    name: &str,
    n: usize,
    rate: Option<f64>,
) -> Arc<Track> {
    let (run, track) = world.reg.track(name, n);
    // Progress on standard error, for a profiler started on one run (`scripts/profile-run.sh`).
    eprintln!("run started: {name}");
    let mut sending = tokio::spawn(send_into(world.clone(), dir, run, track.clone(), rate));
    wait_done(world, &track, bridge, Some(&mut sending)).await;
    eprintln!("run ended: {name}");
    track
}

/// Sends `n` messages in `dir` (see [`run`]); returns once every send was taken, not once the
/// messages arrived.
pub(crate) async fn send(
    world: &Arc<World>,
    dir: Dir,
    name: &str,
    n: usize,
    rate: Option<f64>,
) -> Arc<Track> {
    let (run, track) = world.reg.track(name, n);
    send_into(world.clone(), dir, run, track.clone(), rate).await;
    track
}

/// Sends the messages of `track` (run number `run`); see [`send`].
async fn send_into(world: Arc<World>, dir: Dir, run: usize, track: Arc<Track>, rate: Option<f64>) {
    let world = &world;
    let n = track.len();
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
            // Each contact (or, through Synapse, each user or each room's ghost) sends its
            // share, SEND_INFLIGHT at a time; a bare appservice's ghost one at a time, as a
            // bridge keeping its room's order does.
            let by_room = matches!(
                dir,
                Dir::MatrixToInterop | Dir::MatrixToBare | Dir::BareToMatrix
            );
            let senders = if by_room {
                world.chats()
            } else {
                world.contacts.len()
            };
            let inflight_max = if dir == Dir::BareToMatrix {
                1
            } else {
                SEND_INFLIGHT
            };
            let mut shares: Vec<Vec<usize>> = vec![Vec::new(); senders];
            for seq in 0..n {
                let who = if by_room {
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
                        match dir {
                            Dir::MatrixToInterop | Dir::MatrixToBare => {
                                inflight.spawn(w.clone().client_send(t.clone(), run, seq))
                            }
                            Dir::BareToMatrix => {
                                inflight.spawn(w.clone().ghost_send(t.clone(), run, seq))
                            }
                            _ => inflight.spawn(w.clone().contact_send(t.clone(), dir, run, seq)),
                        };
                        if inflight.len() >= inflight_max
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
                        Dir::MatrixToInterop | Dir::MatrixToBare => {
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
                        Dir::BareToMatrix => {
                            for seq in next..due {
                                tasks.spawn(world.clone().ghost_send(track.clone(), run, seq));
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
}

/// The measured runs: a warm-up each way, then per direction a run at full speed and one paced
/// at half that rate, then the reference without the bridge. Returns the results, the bridge's
/// memory after each direction, and its sample after the warm-up.
/// Waits until the bridge and this process have finished the last run's work (a run ends when
/// the last message arrived; acks, message-map writes and receipts follow), so that a paced
/// run's first messages do not queue behind it: until neither used more than a tenth of a core
/// for 100 ms, at most 5 s. (With `--gateway-process`, this process and the gateway's together.)
pub(crate) async fn settle(pid: &str, ticks: f64) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = || (sample(pid, ticks).cpu_secs, side(ticks).cpu_secs());
    let mut last = cpu();
    for _ in 0..47 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = cpu();
        if now.0 - last.0 <= 0.01 && now.1 - last.1 <= 0.01 {
            return;
        }
        last = now;
    }
}

pub(crate) async fn measure(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    opts: &Opts,
    pid: &str,
    ticks: f64,
) -> (Vec<RunResult>, Vec<(Dir, ProcSample)>, ProcSample) {
    // Warm-up: one message per pair each way (Signal sessions), not measured.
    run(
        world,
        Some(&mut *bridge),
        Dir::MatrixToInterop,
        "warm-up Matrix→interop",
        opts.chats(),
        None,
    )
    .await;
    run(
        world,
        Some(&mut *bridge),
        Dir::InteropToMatrix,
        "warm-up interop→Matrix",
        opts.chats(),
        None,
    )
    .await;
    let warm = sample(pid, ticks);

    let me = || side(ticks);
    let mut results = Vec::new();
    let mut rss_after = Vec::new();
    for dir in [Dir::MatrixToInterop, Dir::InteropToMatrix] {
        let (b0, m0) = (sample(pid, ticks), me());
        let logged = log_len(&bridge.log);
        let t = run(
            world,
            Some(&mut *bridge),
            dir,
            &format!("max {}", dir.label()),
            opts.messages,
            None,
        )
        .await;
        if sql_log_wanted() {
            print_statements(&bridge.log, logged, opts.messages);
        }
        let max = summarize(dir, "max".into(), &t, (b0, sample(pid, ticks)), (m0, me()));
        let rate = opts.paced_rate.unwrap_or((max.rate / 2.0).max(1.0));
        let n = ((rate * opts.paced_secs) as usize)
            .clamp(opts.chats().min(opts.messages), opts.messages);
        results.push(max);
        settle(pid, ticks).await;
        let name = format!("paced {}", dir.label());
        results.push(paced(world, bridge, dir, &name, n, rate, (pid, ticks)).await);
        rss_after.push((dir, sample(pid, ticks)));
        settle(pid, ticks).await;
    }

    // Reference: the same client and gateway without the bridge (contacts in pairs).
    if opts.contacts >= 2 {
        let dir = Dir::Reference;
        run(
            world,
            Some(&mut *bridge),
            dir,
            "warm-up reference",
            opts.contacts,
            None,
        )
        .await;
        let (b0, m0) = (sample(pid, ticks), me());
        let t = run(
            world,
            Some(&mut *bridge),
            dir,
            "reference max",
            opts.messages,
            None,
        )
        .await;
        results.push(summarize(
            dir,
            "max, no bridge".into(),
            &t,
            (b0, sample(pid, ticks)),
            (m0, me()),
        ));
        // The same path paced at each of the bridge runs' rates: the latency without the
        // bridge, which the bridge's paced runs are compared with ("added" below the table).
        let mut rates: Vec<f64> = results
            .iter()
            .filter(|r| r.kind.starts_with("paced"))
            .map(|r| r.rate)
            .collect();
        rates.dedup_by(|a, b| (*a - *b).abs() < 0.05 * *b);
        for rate in rates {
            settle(pid, ticks).await;
            let n = ((rate * opts.paced_secs) as usize).clamp(opts.contacts, opts.messages);
            let name = "reference paced";
            results.push(paced(world, bridge, dir, name, n, rate, (pid, ticks)).await);
        }
    }

    (results, rss_after, warm)
}

/// One paced run of `n` messages at `rate` and its result.
async fn paced(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    dir: Dir,
    name: &str,
    n: usize,
    rate: f64,
    (pid, ticks): (&str, f64),
) -> RunResult {
    let me = || side(ticks);
    let (b0, m0) = (sample(pid, ticks), me());
    let t = run(world, Some(bridge), dir, name, n, Some(rate)).await;
    summarize(
        dir,
        format!("paced {rate:.0}/s"),
        &t,
        (b0, sample(pid, ticks)),
        (m0, me()),
    )
}

/// The latency the bridge adds: each paced bridge run's percentiles less those of the paced run
/// without the bridge (contact to contact through the same gateway, at the same rate).
pub(crate) fn print_added_latency(results: &[RunResult]) {
    let paced = |r: &&RunResult| r.kind.starts_with("paced");
    let references: Vec<&RunResult> = results
        .iter()
        .filter(paced)
        .filter(|r| r.dir == Dir::Reference)
        .collect();
    for r in results
        .iter()
        .filter(paced)
        .filter(|r| r.dir != Dir::Reference)
    {
        // The reference run nearest in rate (one was run at each bridge run's rate).
        let Some(reference) = references
            .iter()
            .min_by(|a, b| (a.rate - r.rate).abs().total_cmp(&(b.rate - r.rate).abs()))
        else {
            return;
        };
        println!(
            "added by the bridge {} at {:.0}/s (against interop → interop at {:.0}/s): p50 {:+.1} ms, p99 {:+.1} ms",
            r.dir.label(),
            r.rate,
            reference.rate,
            r.p50_ms - reference.p50_ms,
            r.p99_ms - reference.p99_ms
        );
    }
}

/// The results table: rate, latency and CPU per run.
pub(crate) fn print_table(results: &[RunResult]) {
    println!();
    println!(
        "{:<17} {:<14} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>10}",
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
        "bridge",
        "bridge",
        "bench",
        "gateway"
    );
    println!(
        "{:<17} {:<14} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>10}",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "CPU %",
        "CPU µs/msg",
        "switch/msg",
        "r+w /msg",
        "CPU %",
        "CPU µs/msg"
    );
    for r in results {
        println!(
            "{:<17} {:<14} {:>6} {:>7.2} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>10.0} {:>9.1} {:>9.1} {:>9.0} {:>10}{}",
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
            r.bridge_switches_per_msg,
            r.bridge_rw_calls_per_msg,
            r.bench_cpu_pct,
            r.gateway_cpu_us_per_msg
                .map_or_else(|| "-".to_owned(), |us| format!("{us:.0}")),
            match (r.dups, r.resends) {
                (0, 0) => String::new(),
                (d, 0) => format!("  ({d} duplicates)"),
                (0, s) => format!("  ({s} sent again)"),
                (d, s) => format!("  ({d} duplicates, {s} sent again)"),
            }
        );
    }
}
