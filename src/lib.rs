//! matrix-interop-bridge: a Matrix application service that bridges Matrix users to a
//! Signal-protocol interop network (docs/architecture.md: two sides around one core).
//!
//! - [`appservice`] and [`matrix`]: the Matrix side (inbound HTTP API, outbound client, Megolm).
//! - [`bridge`]: the core, the crate `mib-core` (commands, portals, ghosts, logins, its own
//!   message model in [`bridge::model`]); it links no protobuf, SQL, HTTP or Signal crate.
//! - [`interop`]: the network side (gateway connection, Signal sessions, content mapping).
//! - [`store`] and [`vault`]: persistence (`mib-store`) and envelope encryption of secrets at rest
//!   (`mib-vault`).
//!
//! The wire protocol is the crate `mib-wire`, re-exported as [`wire`]. This crate must never
//! link the reference gateway (`mib-gateway`); `tests/architecture.rs` checks it, and the rules
//! for the crates this one is still to be split into.

pub mod config;
pub mod registration;

/// The Matrix side (its own crate, `mib-matrix`): the homeserver client and Megolm at
/// [`matrix`], the appservice API and the inbound queue at [`appservice`].
pub use mib_matrix::{self as matrix, appservice};

/// The interop side (its own crate, `mib-interop`): gateway connections, Signal sessions,
/// content mapping.
pub use mib_interop as interop;

/// Persistence (its own crate, `mib-store`): sqlx, migrations, every store trait's implementation.
pub use mib_store as store;

/// Encryption at rest (its own crate, `mib-vault`): master key, per-owner data keys, sealed
/// records.
pub use mib_vault as vault;

/// The bridge core (its own crate, `mib-core`): kept at this path for the sides and the binary.
pub use mib_core as bridge;

/// The core's metrics (kept at this path for the sides and the binary).
pub use bridge::metrics;

/// The interop wire protocol (its own crate, shared with the reference gateway).
pub use mib_wire as wire;

/// Helpers for this package's tests and benches (the feature `testing`; production builds do not
/// contain them).
#[cfg(feature = "testing")]
pub mod testing {
    use std::sync::Arc;

    use crate::{interop::signal_store::SignalStore, vault::VaultStore};

    /// A vault-backed Signal store for `owner` on a temporary SQLite database, which lives as long
    /// as the returned directory.
    pub async fn signal_store(owner: &str) -> (SignalStore, tempfile::TempDir) {
        let (sql, dir) = crate::store::testing::sqlite().await;
        let db: Arc<dyn VaultStore> = Arc::new(sql);
        (
            crate::interop::signal_store::testing::store(owner, db).await,
            dir,
        )
    }
}
