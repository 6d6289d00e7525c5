//! Send and arrival times of numbered messages. A message body is "bench <run> <seq>".

use super::*;

pub(crate) struct Track {
    pub(crate) name: String,
    pub(crate) sent: Vec<AtomicU64>,
    pub(crate) recv: Vec<AtomicU64>,
    pub(crate) received: AtomicUsize,
    pub(crate) dups: AtomicUsize,
    /// Contacts' sends tried again after a transient failure.
    pub(crate) resends: AtomicUsize,
}

impl Track {
    pub(crate) fn len(&self) -> usize {
        self.sent.len()
    }
}

pub(crate) struct Registry {
    pub(crate) epoch: Instant,
    pub(crate) tracks: RwLock<Vec<Arc<Track>>>,
    /// Message bodies that belong to no run (should stay 0).
    pub(crate) stray: AtomicUsize,
}

impl Registry {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            tracks: RwLock::new(Vec::new()),
            stray: AtomicUsize::new(0),
        })
    }

    /// Nanoseconds since the epoch, plus one (0 means "not yet").
    pub(crate) fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    pub(crate) fn track(&self, name: &str, n: usize) -> (usize, Arc<Track>) {
        let t = Arc::new(Track {
            name: name.to_owned(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            recv: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicUsize::new(0),
            dups: AtomicUsize::new(0),
            resends: AtomicUsize::new(0),
        });
        let mut tracks = self.tracks.write().expect("tracks lock");
        tracks.push(t.clone());
        (tracks.len() - 1, t)
    }

    pub(crate) fn body(run: usize, seq: usize) -> String {
        format!("bench {run} {seq}")
    }

    pub(crate) fn mark_sent(&self, t: &Track, seq: usize) {
        t.sent[seq].store(self.now(), Ordering::Relaxed);
    }

    /// Records the arrival of a message body at its far end.
    pub(crate) fn arrived(&self, body: &str) {
        let now = self.now();
        let mut parts = body.split_whitespace();
        let parsed = match (parts.next(), parts.next(), parts.next()) {
            (Some("bench"), Some(r), Some(s)) => {
                r.parse::<usize>().ok().zip(s.parse::<usize>().ok())
            }
            _ => None,
        };
        let track = parsed.and_then(|(r, s)| {
            self.tracks
                .read()
                .expect("tracks lock")
                .get(r)
                .cloned()
                .map(|t| (t, s))
        });
        match track {
            Some((t, seq)) if seq < t.len() => {
                if t.recv[seq]
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    t.received.fetch_add(1, Ordering::Relaxed);
                } else {
                    t.dups.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
