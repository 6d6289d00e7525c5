//! The bridge's Prometheus metrics: what it counts, and their text rendering. The binary serves
//! them at `GET /metrics` on the metrics listener.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub kind: String,
}

/// `matrix_to_interop` or `interop_to_matrix`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

/// Why a Matrix message was not bridged (the message-status reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    ])
}

/// All of the bridge's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub transactions: Counter,
    pub duplicate_transactions: Counter,
    pub events: Family<EventLabels, Counter>,
    pub errors: Counter,
    pub auth_failures: Counter,
    pub transaction_seconds: Histogram,
    /// Messages bridged, by direction.
    pub messages: Family<DirectionLabels, Counter>,
    /// Time the bridge took for one message, by direction (from the event to the other side's
    /// answer, Signal and the homeserver included).
    pub message_seconds: HistogramFamily<DirectionLabels>,
    /// Matrix messages that were not bridged, by reason.
    pub not_bridged: Family<ReasonLabels, Counter>,
    /// Inputs refused by a security check (an edit by someone else, a formatting bomb, media
    /// over the limit, a rate limit), by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Interop logins running, and how many of them are connected to the gateway.
    pub logins: LoginGauges,
}

/// How many interop logins run and how many are connected: what an admin watches after a
/// restart of the bridge or the gateway. The network side keeps them as its logins start, stop,
/// connect and lose their connection.
#[derive(Clone, Debug, Default)]
pub struct LoginGauges {
    pub running: Gauge,
    pub connected: Gauge,
}

impl LoginGauges {
    /// A login's connection went from `was` to `now`.
    pub fn connection(&self, was: bool, now: bool) {
        match (was, now) {
            (false, true) => {
                self.connected.inc();
            }
            (true, false) => {
                self.connected.dec();
            }
            _ => {}
        }
    }

    pub fn started(&self) {
        self.running.inc();
    }

    /// A login stopped; `connected` is whether it was connected then.
    pub fn stopped(&self, connected: bool) {
        self.running.dec();
        self.connection(connected, false);
    }
}

impl Metrics {
    /// Counts a bridged message and the time it took since `started`.
    pub fn message_bridged(&self, direction: &str, started: std::time::Instant) {
        let labels = DirectionLabels {
            direction: direction.to_owned(),
        };
        self.messages.get_or_create(&labels).inc();
        self.message_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts an input refused by a security check.
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mib");
        let transactions = Counter::default();
        let duplicate_transactions = Counter::default();
        let events = Family::<EventLabels, Counter>::default();
        let errors = Counter::default();
        let auth_failures = Counter::default();
        let transaction_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        let messages = Family::<DirectionLabels, Counter>::default();
        let message_seconds: HistogramFamily<DirectionLabels> =
            Family::new_with_constructor(latency_histogram);
        let not_bridged = Family::<ReasonLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let logins = LoginGauges::default();
        registry.register("logins", "Interop logins running", logins.running.clone());
        registry.register(
            "logins_connected",
            "Interop logins connected to the gateway",
            logins.connected.clone(),
        );
        registry.register(
            "refused",
            "Inputs refused by a security check, by reason",
            refused.clone(),
        );
        registry.register(
            "messages_bridged",
            "Messages bridged, by direction",
            messages.clone(),
        );
        registry.register(
            "message_seconds",
            "Time the bridge took for one message, by direction",
            message_seconds.clone(),
        );
        registry.register(
            "messages_not_bridged",
            "Matrix messages that were not bridged, by reason",
            not_bridged.clone(),
        );
        registry.register(
            "appservice_transactions",
            "Appservice transactions applied",
            transactions.clone(),
        );
        registry.register(
            "appservice_duplicate_transactions",
            "Retried appservice transactions that were already applied",
            duplicate_transactions.clone(),
        );
        registry.register(
            "appservice_events",
            "Events received from the homeserver, by kind",
            events.clone(),
        );
        registry.register(
            "errors",
            "Events or messages that failed to bridge",
            errors.clone(),
        );
        registry.register(
            "appservice_auth_failures",
            "Requests with a wrong hs_token",
            auth_failures.clone(),
        );
        registry.register(
            "appservice_transaction_seconds",
            "Time to record and acknowledge a transaction",
            transaction_seconds.clone(),
        );
        Self {
            registry: Arc::new(registry),
            transactions,
            duplicate_transactions,
            events,
            errors,
            auth_failures,
            transaction_seconds,
            messages,
            message_seconds,
            not_bridged,
            refused,
            logins,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
