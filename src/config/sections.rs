//! The configuration's sections, each with its defaults (the example configuration documents
//! every key).

use serde::{Deserialize, Serialize};

use crate::bridge::settings::yes;
pub use crate::bridge::settings::{BridgeConfig, PermissionLevel, RelayConfig};
pub use crate::store::settings::{DatabaseConfig, DatabaseType};
pub use mib_interop::settings::InteropConfig;
pub use mib_matrix::settings::{
    AppserviceConfig, BotConfig, CryptoStoreKind, EncryptionConfig, HomeserverConfig,
    ProvisioningConfig,
};

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

/// Several bridge processes on one PostgreSQL database (docs/scaling.md).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    #[serde(default)]
    pub enabled: bool,
    /// This worker's name among the others (unique); empty: the host name and process id.
    #[serde(default)]
    pub id: String,
    /// Where the other workers reach this one's listener (the appservice and provisioning
    /// HTTP), e.g. `http://10.0.0.2:29320`: provisioning requests that need a user's running
    /// login are forwarded to its worker. Empty: `http://` and the appservice hostname and port
    /// (loopback when the hostname is a wildcard address).
    #[serde(default)]
    pub url: String,
}

impl WorkersConfig {
    /// [`Self::url`], or the one made from where the appservice listens.
    pub fn url_or(&self, hostname: &str, port: u16) -> String {
        if !self.url.is_empty() {
            return self.url.trim_end_matches('/').to_owned();
        }
        let host = match hostname {
            "" | "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
            h => h,
        };
        format!("http://{host}:{port}")
    }

    /// This worker's id: the configured one, else the host name and process id.
    pub fn worker_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "worker".to_owned());
        format!("{host}-{}", std::process::id())
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

fn default_master_env() -> String {
    "MIB_VAULT_MASTER_KEY".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:8001".into()
}
fn default_level() -> String {
    "info".into()
}
fn default_format() -> String {
    "text".into()
}
