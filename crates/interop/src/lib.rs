//! The bridge's interop side, its network connector: connections to the gateway, Signal
//! sessions and sender keys, media, one actor per logged-in account (docs/interop-protocol.md),
//! and the mapping of interop content to and from the core's message model ([`convert`]).
//!
//! It talks to the core through the core's `Network` trait and types only, and keeps its secrets
//! with the vault. It must never depend on the Matrix side, the store or the gateway, nor on an
//! HTTP or Matrix crate (ruma it links only through the core; `tests/architecture.rs` checks
//! it).

pub mod account;
pub mod conn;
pub mod connector;
pub mod convert;
pub mod keys;
pub mod media;
pub mod runtime;
pub mod settings;
pub mod signal_store;

pub use account::{AccountHandle, AccountOptions, Event, Target};
pub use conn::{GatewayAddr, GatewayConn, InteropError};
pub use runtime::SignalRuntime;
