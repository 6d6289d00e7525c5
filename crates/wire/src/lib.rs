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

impl pb::stanza::Body {
    /// The body's field name in `proto/interop.proto`, for logs: it names the kind of stanza and
    /// nothing of its contents (which may hold secrets).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Register(_) => "register",
            Self::Verify(_) => "verify",
            Self::Login(_) => "login",
            Self::UploadKeys(_) => "upload_keys",
            Self::FetchBundle(_) => "fetch_bundle",
            Self::Send(_) => "send",
            Self::Ack(_) => "ack",
            Self::SendReceipt(_) => "send_receipt",
            Self::SendTyping(_) => "send_typing",
            Self::SetPresence(_) => "set_presence",
            Self::CreateGroup(_) => "create_group",
            Self::UpdateGroup(_) => "update_group",
            Self::GetGroup(_) => "get_group",
            Self::BlobPut(_) => "blob_put",
            Self::BlobGet(_) => "blob_get",
            Self::Ping(_) => "ping",
            Self::GetProfile(_) => "get_profile",
            Self::SetProfile(_) => "set_profile",
            Self::KeyCounts(_) => "key_counts",
            Self::Ok(_) => "ok",
            Self::Error(_) => "error",
            Self::Registered(_) => "registered",
            Self::LoggedIn(_) => "logged_in",
            Self::Bundle(_) => "bundle",
            Self::Sent(_) => "sent",
            Self::Envelope(_) => "envelope",
            Self::Typing(_) => "typing",
            Self::Presence(_) => "presence",
            Self::Group(_) => "group",
            Self::BlobStored(_) => "blob_stored",
            Self::BlobData(_) => "blob_data",
            Self::Pong(_) => "pong",
            Self::PrekeysLow(_) => "prekeys_low",
            Self::Profile(_) => "profile",
            Self::KeyCountsResult(_) => "key_counts_result",
            Self::QueueDrained(_) => "queue_drained",
        }
    }
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
