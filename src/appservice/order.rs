//! The order of the homeserver's transactions. Synapse numbers an appservice's transactions
//! 1, 2, 3, … and sends them one at a time, but it can leave one behind: when a transaction is
//! created while the appservice is marked down and its recoverer is just finishing, the
//! transaction is stored and never sent until the next outage (seen with Synapse 1.163). The
//! messages in it would arrive minutes or hours late, or never.
//!
//! So when a transaction arrives whose number skips one, the bridge refuses it once with a 503:
//! Synapse then marks the appservice down and its recoverer sends every stored transaction from
//! the oldest, the skipped one first. A gap that is not filled within [`MAX_GAP_WAIT`] (or
//! [`MAX_REFUSALS`] refusals) is let go, so a homeserver that numbers otherwise is never stalled.
//! Transaction ids that are not numbers are taken as they come.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long a gap is waited for.
const MAX_GAP_WAIT: Duration = Duration::from_secs(60);
/// How many times one gap makes the bridge refuse a transaction.
const MAX_REFUSALS: u32 = 5;
/// A number this far below the last one means the homeserver started counting again.
const RESTART_DISTANCE: u64 = 1000;

#[derive(Clone, Default)]
pub struct TxnOrder(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// The highest transaction number taken.
    last: Option<u64>,
    gap: Option<Gap>,
}

struct Gap {
    /// The first number that has not come.
    missing: u64,
    since: Instant,
    refusals: u32,
}

impl TxnOrder {
    /// Whether transaction `txn_id` may be taken now; `Err(n)` when transaction `n` should come
    /// first (answer with an error, so that the homeserver sends what it holds back).
    pub fn check(&self, txn_id: &str) -> Result<(), u64> {
        let Ok(n) = txn_id.parse::<u64>() else {
            return Ok(());
        };
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(last) = s.last else {
            return Ok(());
        };
        let missing = last.saturating_add(1);
        if n <= missing {
            return Ok(());
        }
        let gap = match &mut s.gap {
            Some(g) if g.missing == missing => g,
            other => other.insert(Gap {
                missing,
                since: Instant::now(),
                refusals: 0,
            }),
        };
        if gap.refusals < MAX_REFUSALS && gap.since.elapsed() < MAX_GAP_WAIT {
            gap.refusals += 1;
            tracing::warn!(
                txn_id,
                missing,
                "the homeserver skipped a transaction; asking it to send that one first"
            );
            return Err(missing);
        }
        tracing::warn!(
            txn_id,
            missing,
            "a skipped transaction did not come; going on without it"
        );
        s.gap = None;
        Ok(())
    }

    /// Transaction `txn_id` was taken (applied, or a repeat of one that was).
    pub fn taken(&self, txn_id: &str) {
        let Ok(n) = txn_id.parse::<u64>() else {
            return;
        };
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.last = Some(match s.last {
            Some(last) if n.saturating_add(RESTART_DISTANCE) < last => n,
            Some(last) => last.max(n),
            None => n,
        });
        if s.gap.as_ref().is_some_and(|g| n >= g.missing) {
            s.gap = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_number_is_asked_for_a_bounded_number_of_times() {
        let o = TxnOrder::default();
        assert_eq!(o.check("7"), Ok(()));
        o.taken("7");
        assert_eq!(o.check("8"), Ok(()));
        o.taken("8");
        // 9 was skipped: 10 is refused until 9 came.
        assert_eq!(o.check("10"), Err(9));
        assert_eq!(o.check("9"), Ok(()));
        o.taken("9");
        assert_eq!(o.check("10"), Ok(()));
        o.taken("10");
        // A gap that never fills is let go after a few refusals.
        for _ in 0..MAX_REFUSALS {
            assert_eq!(o.check("13"), Err(11));
        }
        assert_eq!(o.check("13"), Ok(()));
        o.taken("13");
        // Repeats, a restart of the numbering and ids that are no numbers are taken.
        assert_eq!(o.check("12"), Ok(()));
        o.taken("12");
        assert_eq!(o.check("14"), Ok(()));
        o.taken("5000");
        assert_eq!(o.check("1"), Ok(()));
        o.taken("1");
        assert_eq!(o.check("2"), Ok(()));
        assert_eq!(o.check("txn-abc"), Ok(()));
    }
}
