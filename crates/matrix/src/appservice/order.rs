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
//! Transaction ids that are not numbers are taken as they come. Synapse starts counting again
//! after a restart (from its highest stored transaction), so a number that comes again with
//! another body begins a new count.

use mib_core::store::TxnStore;
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long a gap is waited for.
const MAX_GAP_WAIT: Duration = Duration::from_secs(60);
/// How many times one gap makes the bridge refuse a transaction.
const MAX_REFUSALS: u32 = 5;
/// How many numbers of the current numbering are remembered.
const REMEMBERED: usize = 4096;

#[derive(Clone, Default)]
pub struct TxnOrder(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// The numbers taken since the homeserver last started counting (Synapse starts again
    /// after a restart, from its highest stored transaction; a number seen again with another
    /// body begins a new count).
    taken: BTreeSet<u64>,
    /// Ranges of numbers given up on (they never came): a late one among them is no gap.
    abandoned: std::collections::VecDeque<(u64, u64)>,
    gap: Option<Gap>,
}

impl State {
    fn abandoned(&self, n: u64) -> bool {
        self.abandoned.iter().any(|(a, b)| (*a..=*b).contains(&n))
    }

    /// The highest number below `n` that was taken or given up on.
    fn below(&self, n: u64) -> Option<u64> {
        let taken = self.taken.range(..n).next_back().copied();
        let given_up = self
            .abandoned
            .iter()
            .filter(|(a, _)| *a < n)
            .map(|(_, b)| (*b).min(n - 1))
            .max();
        taken.max(given_up)
    }
}

struct Gap {
    /// The first number that has not come.
    missing: u64,
    since: Instant,
    refusals: u32,
}

/// How far back a worker of several looks for transactions the others took.
const SHARED_LOOKBACK: u64 = 256;

impl TxnOrder {
    /// With several workers, each takes only the transactions the balancer gives it: before
    /// checking `txn_id`, the numbers below it (down to the first one this worker has not seen
    /// taken, at most [`SHARED_LOOKBACK`]) that the others recorded count as taken.
    pub async fn learn_from(&self, txn_id: &str, store: &dyn TxnStore) {
        let Ok(n) = txn_id.parse::<u64>() else {
            return;
        };
        let ids: Vec<String> = {
            let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let from = match s.below(n) {
                Some(b) if b + 1 >= n => return,
                Some(b) => (b + 1).max(n.saturating_sub(SHARED_LOOKBACK)),
                None => n.saturating_sub(SHARED_LOOKBACK),
            };
            (from..n).map(|i| i.to_string()).collect()
        };
        match store.recorded_transactions(&ids).await {
            Ok(found) => {
                for id in found {
                    self.taken(&id, false);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the transactions other workers took"),
        }
    }

    /// Whether transaction `txn_id` may be taken now; `Err(n)` when transaction `n` should come
    /// first (answer with an error, so that the homeserver sends what it holds back).
    pub fn check(&self, txn_id: &str) -> Result<(), u64> {
        let Ok(n) = txn_id.parse::<u64>() else {
            return Ok(());
        };
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The number below it that was taken last: none (the first, or older than all we
        // know: late or counted anew) or the one just before it means no gap.
        if s.taken.contains(&n) || s.abandoned(n) {
            return Ok(());
        }
        let Some(below) = s.below(n) else {
            return Ok(());
        };
        if below + 1 == n {
            return Ok(());
        }
        let missing = below + 1;
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
        s.abandoned.push_back((missing, n - 1));
        if s.abandoned.len() > 64 {
            s.abandoned.pop_front();
        }
        Ok(())
    }

    /// Transaction `txn_id` was taken: `fresh` when it was applied now, not a repeat of one
    /// applied before.
    pub fn taken(&self, txn_id: &str, fresh: bool) {
        let Ok(n) = txn_id.parse::<u64>() else {
            return;
        };
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if fresh && s.taken.contains(&n) {
            // A number seen before, with another body: the homeserver counts anew.
            s.taken.clear();
            s.abandoned.clear();
        }
        s.taken.insert(n);
        while s.taken.len() > REMEMBERED {
            s.taken.pop_first();
        }
        if s.gap.as_ref().is_some_and(|g| g.missing == n) {
            s.gap = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(o: &TxnOrder, id: &str) {
        assert_eq!(o.check(id), Ok(()), "{id}");
        o.taken(id, true);
    }

    #[test]
    fn a_skipped_number_is_asked_for_a_bounded_number_of_times() {
        let o = TxnOrder::default();
        take(&o, "7");
        take(&o, "8");
        // 9 was skipped: 10 is refused until 9 came.
        assert_eq!(o.check("10"), Err(9));
        take(&o, "9");
        take(&o, "10");
        // A gap that never fills is let go after a few refusals.
        for _ in 0..MAX_REFUSALS {
            assert_eq!(o.check("13"), Err(11));
        }
        take(&o, "13");
        // A late one and a repeat are taken.
        take(&o, "12");
        assert_eq!(o.check("13"), Ok(()));
        o.taken("13", false);
        take(&o, "14");
        assert_eq!(o.check("txn-abc"), Ok(()));
    }

    /// With several workers: the transactions the others recorded are no gap; one nobody
    /// recorded still is.
    #[tokio::test]
    async fn the_transactions_other_workers_took_count() {
        let (db, _dir) = mib_store::testing::sqlite().await;
        let (o, alone) = (TxnOrder::default(), TxnOrder::default());
        take(&o, "7");
        take(&alone, "7");
        for id in ["8", "9"] {
            db.apply_transaction(id, id.as_bytes(), &[])
                .await
                .expect("another worker");
        }
        assert_eq!(alone.check("10"), Err(8), "without the database, a gap");
        o.learn_from("10", &db).await;
        take(&o, "10");
        o.learn_from("12", &db).await;
        assert_eq!(o.check("12"), Err(11), "11 was skipped by the homeserver");
    }

    #[test]
    fn a_gap_after_the_homeserver_counts_anew_is_noticed() {
        let o = TxnOrder::default();
        for n in 30..=40 {
            take(&o, &n.to_string());
        }
        // Synapse restarted and counts from 18 again (new bodies): taken as a new count.
        for n in 18..=21 {
            take(&o, &n.to_string());
        }
        // 22 is held back: 23 waits for it, although 22 and 23 were seen in the old count.
        assert_eq!(o.check("23"), Err(22));
        take(&o, "22");
        take(&o, "23");
    }
}
