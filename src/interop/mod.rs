//! The interop side: connections to the gateway, Signal sessions and sender keys, and one actor
//! per logged-in account (docs/interop-protocol.md).

pub mod account;
pub mod conn;
pub mod connector;
pub mod convert;
pub mod keys;
pub mod media;
pub mod runtime;
pub mod signal_store;

pub use account::{AccountHandle, Event, Target};
pub use conn::{GatewayAddr, GatewayConn, InteropError};
pub use runtime::SignalRuntime;
