//! The interop side's section of the configuration file, `interop` (the binary's `config`
//! gathers it with the other crates' sections).

use serde::{Deserialize, Serialize};

/// What is wrong with `interop.gateway_public_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub &'static str);

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InteropConfig {
    #[serde(default = "default_gateway")]
    pub gateway_address: String,
    #[serde(default)]
    pub gateway_public_key: String,
    /// How often (seconds) a contact whose client does classic X3DH (no Kyber prekeys) has its
    /// keys looked at again, to move to PQXDH once it can.
    #[serde(default = "default_x3dh_recheck")]
    pub x3dh_recheck_secs: u64,
}

impl InteropConfig {
    /// The gateway's pinned Noise public key.
    pub fn gateway_key(&self) -> Result<Vec<u8>, KeyError> {
        use base64::Engine;
        if self.gateway_public_key.is_empty() {
            return Err(KeyError(
                "missing: set it to the gateway's public key (`interop-gateway public-key --key-file ...` prints it)",
            ));
        }
        match base64::engine::general_purpose::STANDARD.decode(self.gateway_public_key.trim()) {
            Ok(k) if k.len() == 32 => Ok(k),
            _ => Err(KeyError("must be the base64 of a 32-byte key")),
        }
    }
}

impl Default for InteropConfig {
    fn default() -> Self {
        Self {
            gateway_address: default_gateway(),
            gateway_public_key: String::new(),
            x3dh_recheck_secs: default_x3dh_recheck(),
        }
    }
}

fn default_x3dh_recheck() -> u64 {
    crate::account::AccountOptions::default()
        .x3dh_recheck
        .as_secs()
}

impl InteropConfig {
    /// The accounts' behaviour this section sets.
    pub fn account_options(&self) -> crate::account::AccountOptions {
        crate::account::AccountOptions {
            x3dh_recheck: std::time::Duration::from_secs(self.x3dh_recheck_secs),
        }
    }
}

fn default_gateway() -> String {
    "127.0.0.1:29400".into()
}
