//! matrix-interop-bridge: a Matrix application service that bridges Matrix users to a
//! Signal-protocol interop network (DESIGN: two connectors around one core).
//!
//! - [`appservice`] and [`matrix`]: the Matrix side (inbound HTTP API, outbound client).
//! - [`bridge`]: the core (commands, portals), free of HTTP, SQL and Signal types.
//! - [`store`] and [`vault`]: persistence, and envelope encryption of secrets at rest.

pub mod appservice;
pub mod bridge;
pub mod config;
pub mod interop;
pub mod matrix;
pub mod metrics;
pub mod registration;
pub mod store;
pub mod vault;

/// The interop wire protocol (its own crate, shared with the reference gateway).
pub use mib_wire as wire;
