//! With `--synapse`: the baseline. The same messages go between the same Matrix users and rooms
//! of the same Synapse, through a bare appservice in this process instead of the bridge:
//! interop→Matrix, the rooms' ghosts send with the appservice token, one message at a time per
//! room (as a bridge that keeps a room's order must); Matrix→interop, the users send as in the
//! bridge's run and the bare appservice takes Synapse's transactions on the bridge's registered
//! address and does nothing with them but note the arrivals. The bridge's rate over the
//! baseline's is how much of Synapse's pace the bridge keeps.
//!
//! Synapse's pace drifts over a run (its database grows, its background updates come and go),
//! so the interop→Matrix baseline runs both before and after the bridge's runs and the bridge
//! is compared with their mean. (Matrix→interop's needs the bridge stopped: it runs after.)

use super::*;

/// Each user's room's ghost (index = user): the member that is neither the user nor the bot.
pub(crate) async fn ghosts(world: &World) -> Vec<String> {
    let mut out = Vec::new();
    for (c, room) in world.clients.iter().zip(&world.rooms) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/joined_members",
            common::urlencode(room)
        );
        let (status, v) = c.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "joined_members of {room}: {v}");
        let ghost = v["joined"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
            .find(|m| *m != c.user_id.as_str() && !m.starts_with("@interopbot:"))
            .unwrap_or_else(|| panic!("no ghost in {room}: {v}"))
            .clone();
        out.push(ghost);
    }
    out
}

/// The appservice token of the registration Synapse was given.
pub(crate) fn registered_as_token(registration: &Path) -> String {
    let text = std::fs::read_to_string(registration).expect("the registration");
    let reg: serde_yaml::Value = serde_yaml::from_str(&text).expect("the registration's YAML");
    reg["as_token"]
        .as_str()
        .expect("the registration's as_token")
        .to_owned()
}

/// The bare appservice on `port` (the bridge's, which must be stopped): every `m.room.message`
/// Synapse pushes is an arrival; nothing else happens.
async fn serve_bare_appservice(port: u16, reg: Arc<Registry>) -> tokio::task::JoinHandle<()> {
    use axum::{Json, Router, routing::put};
    let txn = move |Json(body): Json<Value>| {
        let reg = reg.clone();
        async move {
            for e in body["events"].as_array().into_iter().flatten() {
                if e["type"] == "m.room.message"
                    && let Some(text) = e["content"]["body"].as_str()
                {
                    reg.arrived(text);
                }
            }
            Json(json!({}))
        }
    };
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(txn))
        .fallback(|| async { Json(json!({})) });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the bare appservice on the bridge's port");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// The baseline's two runs at full speed, `opts.messages` each: the ghosts sending while the
/// bridge still runs (it ignores its own ghosts' messages, as in its own run), then, with the
/// bridge stopped, the users sending to the bare appservice.
pub(crate) async fn measure_baseline(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    opts: &Opts,
    bridge_port: u16,
    ticks: f64,
) -> Vec<RunResult> {
    let to_matrix = max_run(world, Dir::BareToMatrix, opts, ticks, "after").await;
    bridge.stop();
    let server = serve_bare_appservice(bridge_port, world.reg.clone()).await;
    let from_matrix = max_run(world, Dir::MatrixToBare, opts, ticks, "after").await;
    server.abort();
    vec![to_matrix, from_matrix]
}

/// The interop→Matrix baseline before the bridge's runs (the bridge running, as after them).
pub(crate) async fn baseline_before(world: &Arc<World>, opts: &Opts, ticks: f64) -> RunResult {
    max_run(world, Dir::BareToMatrix, opts, ticks, "before").await
}

/// A warm-up (one message per room) and a run at full speed in `dir`, without the bridge.
async fn max_run(world: &Arc<World>, dir: Dir, opts: &Opts, ticks: f64, when: &str) -> RunResult {
    let me = || side(ticks);
    let none = (ProcSample::default(), ProcSample::default());
    let name = dir.label();
    run(
        world,
        None,
        dir,
        &format!("warm-up {name}"),
        opts.users,
        None,
    )
    .await;
    let m0 = me();
    let t = run(
        world,
        None,
        dir,
        &format!("max {name}"),
        opts.messages,
        None,
    )
    .await;
    summarize(dir, format!("max, {when}"), &t, none, (m0, me()))
}

/// Each direction's bridge rate next to the baseline's (the mean of its runs).
pub(crate) fn print_ratios(bridge: &[RunResult], baseline: &[RunResult]) {
    for (ours, bare) in [
        (Dir::MatrixToInterop, Dir::MatrixToBare),
        (Dir::InteropToMatrix, Dir::BareToMatrix),
    ] {
        let rate = |rs: &[RunResult], d: Dir| {
            let rates: Vec<f64> = rs
                .iter()
                .filter(|r| r.dir == d && r.kind.starts_with("max"))
                .map(|r| r.rate)
                .collect();
            (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
        };
        if let (Some(a), Some(b)) = (rate(bridge, ours), rate(baseline, bare)) {
            println!(
                "{}: the bridge {a:.0} msgs/s, a bare appservice {b:.0} msgs/s: {:.0} % of the baseline",
                ours.label(),
                100.0 * a / b
            );
        }
    }
}

/// `--rounds R`: R rounds of a bare appservice's interop→Matrix max run and then the bridge's,
/// each with the bridge's rate as a share of the bare one's, and the median share. Alternating
/// within one bench puts both under the same drift of Synapse's pace.
pub(crate) async fn alternate(
    world: &Arc<World>,
    bridge: &mut BridgeProc,
    opts: &Opts,
    pid: &str,
    ticks: f64,
) {
    let mut shares = Vec::new();
    println!();
    for round in 1..=opts.rounds {
        settle(pid, ticks).await;
        let bare = max_run(world, Dir::BareToMatrix, opts, ticks, "round").await;
        settle(pid, ticks).await;
        let (b0, m0) = (sample(pid, ticks), side(ticks));
        let t = run(
            world,
            Some(&mut *bridge),
            Dir::InteropToMatrix,
            &format!("round {round} {}", Dir::InteropToMatrix.label()),
            opts.messages,
            None,
        )
        .await;
        let ours = summarize(
            Dir::InteropToMatrix,
            "round".into(),
            &t,
            (b0, sample(pid, ticks)),
            (m0, side(ticks)),
        );
        let share = 100.0 * ours.rate / bare.rate;
        println!(
            "round {round}, interop → Matrix: a bare appservice {:.0} msgs/s, the bridge {:.0} msgs/s: {share:.0} %",
            bare.rate, ours.rate
        );
        shares.push(share);
    }
    shares.sort_by(f64::total_cmp);
    let mid = shares.len() / 2;
    let median = match shares.len() {
        0 => None,
        n if n % 2 == 1 => Some(shares[mid]),
        _ => Some((shares[mid - 1] + shares[mid]) / 2.0),
    };
    if let Some(median) = median {
        println!(
            "interop → Matrix over {} rounds: the bridge at {median:.0} % of a bare appservice (median)",
            shares.len()
        );
    }
}
