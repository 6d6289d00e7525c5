//! The configuration's sections, each with its defaults (the example configuration documents
//! every key).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::bridge::settings::yes;
pub use crate::bridge::settings::{BridgeConfig, PermissionLevel, RelayConfig};
pub use crate::store::settings::{DatabaseConfig, DatabaseType};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    pub address: String,
    pub domain: String,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    pub address: String,
    #[serde(default = "default_hostname")]
    pub hostname: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_id")]
    pub id: String,
    #[serde(default)]
    pub bot: BotConfig,
    #[serde(default)]
    pub as_token: String,
    #[serde(default)]
    pub hs_token: String,
    #[serde(default = "default_username_template")]
    pub username_template: String,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

impl fmt::Debug for AppserviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppserviceConfig")
            .field("address", &self.address)
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("id", &self.id)
            .field("bot", &self.bot)
            .field("as_token", &"<redacted>")
            .field("hs_token", &"<redacted>")
            .field("username_template", &self.username_template)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    #[serde(default = "default_bot_username")]
    pub username: String,
    #[serde(default = "default_bot_displayname")]
    pub displayname: String,
    #[serde(default)]
    pub avatar: String,
}

impl Default for BotConfig {
    fn default() -> Self {
        Self {
            username: default_bot_username(),
            displayname: default_bot_displayname(),
            avatar: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    #[serde(default)]
    pub allow: bool,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub require: bool,
    #[serde(default = "yes")]
    pub appservice: bool,
    #[serde(default = "yes")]
    pub msc4190: bool,
    #[serde(default = "yes")]
    pub self_sign: bool,
    /// Each ghost that sends into an encrypted room gets its own cross-signed device.
    #[serde(default = "yes")]
    pub ghost_devices: bool,
    /// How many ghost devices stay loaded in memory.
    #[serde(default = "default_ghost_device_cache")]
    pub ghost_device_cache: usize,
    /// Where the crypto state of the bridge's devices lives.
    #[serde(default)]
    pub store: CryptoStoreKind,
    /// MSC4350 (unstable): ghosts get keyless devices naming the bot's device as impersonator,
    /// instead of devices of their own.
    #[serde(default)]
    pub msc4350: bool,
}

/// Where the crypto state of the bridge's Matrix devices lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CryptoStoreKind {
    /// In the bridge's database, sealed with the vault: no local state.
    #[default]
    Database,
    /// In local SQLite stores next to the database (earlier versions; for rolling back).
    Directory,
}

fn default_ghost_device_cache() -> usize {
    128
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            allow: false,
            default: false,
            require: false,
            appservice: true,
            msc4190: true,
            self_sign: true,
            ghost_devices: true,
            ghost_device_cache: default_ghost_device_cache(),
            store: CryptoStoreKind::Database,
            msc4350: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InteropConfig {
    #[serde(default = "default_gateway")]
    pub gateway_address: String,
    #[serde(default)]
    pub gateway_public_key: String,
}

impl InteropConfig {
    /// The gateway's pinned Noise public key.
    pub fn gateway_key(&self) -> Result<Vec<u8>, ConfigError> {
        use base64::Engine;
        if self.gateway_public_key.is_empty() {
            return Err(invalid(
                "interop.gateway_public_key",
                "missing: set it to the gateway's public key (`interop-gateway public-key --key-file ...` prints it)",
            ));
        }
        match base64::engine::general_purpose::STANDARD.decode(self.gateway_public_key.trim()) {
            Ok(k) if k.len() == 32 => Ok(k),
            _ => Err(invalid(
                "interop.gateway_public_key",
                "must be the base64 of a 32-byte key",
            )),
        }
    }
}

impl Default for InteropConfig {
    fn default() -> Self {
        Self {
            gateway_address: default_gateway(),
            gateway_public_key: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    #[serde(default)]
    pub master_key_file: String,
    #[serde(default = "default_master_env")]
    pub master_key_env: String,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            master_key_file: String::new(),
            master_key_env: default_master_env(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_metrics_listen(),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_prov_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub shared_secret: String,
}

impl fmt::Debug for ProvisioningConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningConfig")
            .field("enabled", &self.enabled)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            prefix: default_prov_prefix(),
            shared_secret: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default = "default_format")]
    pub format: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: default_format(),
        }
    }
}

fn default_hostname() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    29340
}
fn default_id() -> String {
    "interop".into()
}
fn default_bot_username() -> String {
    "interopbot".into()
}
fn default_bot_displayname() -> String {
    "Interop bridge bot".into()
}
fn default_username_template() -> String {
    "interop_{id}".into()
}
fn default_max_body() -> usize {
    10 * 1024 * 1024
}
fn default_gateway() -> String {
    "127.0.0.1:29400".into()
}
fn default_master_env() -> String {
    "MIB_VAULT_MASTER_KEY".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:8001".into()
}
fn default_prov_prefix() -> String {
    "/_matrix/provision".into()
}
fn default_level() -> String {
    "info".into()
}
fn default_format() -> String {
    "text".into()
}
