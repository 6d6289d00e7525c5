//! The interop wire protocol shared by the bridge's client and the reference gateway
//! (docs/interop-protocol.md): the protobuf types generated from the repository's `proto/`, the
//! Noise transport and its record framing.
//!
//! Both ends of a connection link this crate, so it holds the protocol and no policy: it must never
//! depend on the bridge's crates or the gateway, on a database, on HTTP, on Matrix or on Signal
//! (checked by `tests/architecture.rs`). It uses tokio's I/O traits but starts no runtime.

pub mod noise;

/// `proto/interop.proto`: stanzas between clients and the gateway.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/interop.v1.rs"));
}

/// `proto/content.proto`: the plaintext inside Signal encryption.
#[allow(clippy::all, missing_docs)]
pub mod content {
    include!(concat!(env!("OUT_DIR"), "/interop.content.v1.rs"));
}

/// Device id of every account (one device per account on this network).
pub const DEVICE_ID: u32 = 1;

/// Whether `s` is a valid account identifier: `+` and 8 to 15 digits.
pub fn is_valid_account(s: &str) -> bool {
    s.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids() {
        assert!(is_valid_account("+15551234567"));
        assert!(!is_valid_account("15551234567"));
        assert!(!is_valid_account("+1555"));
        assert!(!is_valid_account("+1555123456789012"));
        assert!(!is_valid_account("+1555abc4567"));
    }
}
