//! Restarts at scale (`--restarts`): how long until every login is connected again after the
//! gateway restarts and after the bridge restarts, read from the bridge's `mib_logins_connected`
//! gauge, with the curve of connected logins over time.

use super::*;

/// The bridge's login gauges: (running, connected); `None` while it does not answer.
pub(crate) async fn login_gauges(
    http: &reqwest::Client,
    ends: &BridgeEndpoints,
) -> Option<(u64, u64)> {
    let text = http
        .get(&ends.metrics)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let gauge = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
    };
    Some((gauge("mib_logins")?, gauge("mib_logins_connected")?))
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
