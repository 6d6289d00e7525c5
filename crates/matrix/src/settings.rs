//! The Matrix side's sections of the configuration file: `homeserver`, `appservice`,
//! `encryption` and `provisioning` (the binary's `config` gathers them with the other crates'
//! sections; the example configuration documents every key).

use std::fmt;

use mib_core::settings::yes;
use serde::{Deserialize, Serialize};

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
fn default_prov_prefix() -> String {
    "/_matrix/provision".into()
}
