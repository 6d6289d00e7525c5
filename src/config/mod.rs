//! The bridge configuration: loading (YAML file plus `MIB__SECTION__KEY` environment overrides),
//! validation that names the offending key, and the commented example written by `generate-config`.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path};

use serde::{Deserialize, Serialize};
use url::Url;

/// The fully commented example configuration, as written by `generate-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("example-config.yaml");

/// Prefix of environment overrides: `MIB__DATABASE__URI` sets `database.uri`.
pub const ENV_PREFIX: &str = "MIB";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub homeserver: HomeserverConfig,
    pub appservice: AppserviceConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub bridge: BridgeConfig,
    #[serde(default)]
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub interop: InteropConfig,
    #[serde(default)]
    pub vault: VaultConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub provisioning: ProvisioningConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
}

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

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseType {
    Sqlite,
    Postgres,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(rename = "type", default = "default_db_type")]
    pub kind: String,
    #[serde(default = "default_db_uri")]
    pub uri: String,
    #[serde(default = "default_max_conns")]
    pub max_connections: u32,
    #[serde(default = "default_min_conns")]
    pub min_connections: u32,
}

impl DatabaseConfig {
    /// The database kind; valid after [`Config::validate`].
    pub fn db_type(&self) -> DatabaseType {
        if self.kind == "postgres" {
            DatabaseType::Postgres
        } else {
            DatabaseType::Sqlite
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URI may hold a password.
        let uri = Url::parse(&self.uri)
            .map(|mut u| {
                if u.password().is_some() {
                    let _ = u.set_password(Some("redacted"));
                }
                u.to_string()
            })
            .unwrap_or_else(|_| "<unparsable>".to_owned());
        f.debug_struct("DatabaseConfig")
            .field("type", &self.kind)
            .field("uri", &uri)
            .finish()
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            kind: default_db_type(),
            uri: default_db_uri(),
            max_connections: default_max_conns(),
            min_connections: default_min_conns(),
        }
    }
}

/// Permission levels, each including the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PermissionLevel {
    None,
    Relay,
    Commands,
    User,
    Admin,
}

impl std::str::FromStr for PermissionLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "relay" => Ok(Self::Relay),
            "commands" => Ok(Self::Commands),
            "user" => Ok(Self::User),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown permission level `{other}` (use relay, commands, user or admin)"
            )),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    #[serde(default = "default_prefix")]
    pub command_prefix: String,
    #[serde(default = "default_permissions")]
    pub permissions: BTreeMap<String, String>,
    #[serde(default)]
    pub relay: RelayConfig,
    /// Whether leaving a group's portal room on Matrix also leaves the group on the network.
    #[serde(default)]
    pub bridge_matrix_leave: bool,
    /// The bot puts a read receipt on each Matrix message once it reached the network.
    #[serde(default)]
    pub delivery_receipts: bool,
    /// `com.beeper.message_send_status` events for each bridged (or refused) Matrix message.
    #[serde(default)]
    pub message_status_events: bool,
    /// A notice in the room when a Matrix message cannot be bridged.
    #[serde(default = "yes")]
    pub message_error_notices: bool,
    /// The largest file bridged in either direction, in bytes.
    #[serde(default = "default_max_media")]
    pub max_media_size: u64,
    /// A stranger's first message (or being added to a group by one) is held as a message
    /// request the user accepts or declines, instead of opening a room at once.
    #[serde(default = "yes")]
    pub message_requests: bool,
}

fn default_max_media() -> u64 {
    100 * 1024 * 1024
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            command_prefix: default_prefix(),
            permissions: default_permissions(),
            relay: RelayConfig::default(),
            bridge_matrix_leave: false,
            delivery_receipts: false,
            message_status_events: false,
            message_error_notices: true,
            max_media_size: default_max_media(),
            message_requests: true,
        }
    }
}

impl BridgeConfig {
    /// The permission level of `user_id`: the full id wins over its server name, which wins over `*`.
    pub fn permission_of(&self, user_id: &str) -> PermissionLevel {
        let domain = user_id.split_once(':').map(|(_, d)| d).unwrap_or_default();
        [user_id, domain, "*"]
            .iter()
            .find_map(|k| self.permissions.get(*k))
            .and_then(|l| l.parse().ok())
            .unwrap_or(PermissionLevel::None)
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "yes")]
    pub admin_only: bool,
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

fn yes() -> bool {
    true
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
fn default_db_type() -> String {
    "sqlite".into()
}
fn default_db_uri() -> String {
    "sqlite://matrix-interop-bridge.db".into()
}
fn default_max_conns() -> u32 {
    5
}
fn default_min_conns() -> u32 {
    1
}
fn default_prefix() -> String {
    "!interop".into()
}
fn default_permissions() -> BTreeMap<String, String> {
    BTreeMap::from([("*".to_owned(), "relay".to_owned())])
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

const PLACEHOLDER_TOKEN: &str = "This value is generated when generating the registration";

impl Config {
    /// Loads `path` with environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::load_unvalidated(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads without checking the tokens (for `generate-registration`, which creates them).
    pub fn load_unvalidated(path: &Path) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Yaml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        Ok(raw.try_deserialize()?)
    }

    /// Parses a YAML string (tests, and the example-config check).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml))
            .build()?;
        let cfg: Self = raw.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything that can be checked before start-up; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_except_tokens()?;
        for (key, token) in [
            ("appservice.as_token", &self.appservice.as_token),
            ("appservice.hs_token", &self.appservice.hs_token),
        ] {
            if token.is_empty() || token == PLACEHOLDER_TOKEN {
                return Err(invalid(
                    key,
                    "missing: run `generate-registration` to create the tokens",
                ));
            }
            if token.len() < 16 {
                return Err(invalid(key, "too short: use at least 16 random characters"));
            }
        }
        Ok(())
    }

    pub fn validate_except_tokens(&self) -> Result<(), ConfigError> {
        check_http_url("homeserver.address", &self.homeserver.address)?;
        if self.homeserver.domain.is_empty() || self.homeserver.domain.contains(['/', '@', ' ']) {
            return Err(invalid(
                "homeserver.domain",
                "must be a server name such as example.org",
            ));
        }
        check_http_url("appservice.address", &self.appservice.address)?;
        if self
            .appservice
            .hostname
            .parse::<std::net::IpAddr>()
            .is_err()
            && self.appservice.hostname != "localhost"
        {
            return Err(invalid(
                "appservice.hostname",
                "must be an IP address to listen on, e.g. 127.0.0.1",
            ));
        }
        if self.appservice.port == 0 {
            return Err(invalid(
                "appservice.port",
                "must be a port number between 1 and 65535",
            ));
        }
        if self.appservice.id.is_empty() {
            return Err(invalid("appservice.id", "must not be empty"));
        }
        if !is_localpart(&self.appservice.bot.username) {
            return Err(invalid(
                "appservice.bot.username",
                "must be a valid user localpart (a-z, 0-9, ._=-/)",
            ));
        }
        let tpl = &self.appservice.username_template;
        if tpl.matches("{id}").count() != 1 || !is_localpart(&tpl.replace("{id}", "x")) {
            return Err(invalid(
                "appservice.username_template",
                "must contain `{id}` exactly once and otherwise only localpart characters",
            ));
        }
        if self.appservice.max_body_bytes < 1024 {
            return Err(invalid(
                "appservice.max_body_bytes",
                "must be at least 1024",
            ));
        }
        match self.database.kind.as_str() {
            "sqlite" => {
                if !self.database.uri.starts_with("sqlite:") {
                    return Err(invalid(
                        "database.uri",
                        "type is sqlite, so the uri must start with sqlite://",
                    ));
                }
            }
            "postgres" => {
                if !self.database.uri.starts_with("postgres://")
                    && !self.database.uri.starts_with("postgresql://")
                {
                    return Err(invalid(
                        "database.uri",
                        "type is postgres, so the uri must start with postgres://",
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "database.type",
                    format!("unknown database type `{other}` (use sqlite or postgres)"),
                ));
            }
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.bridge.command_prefix.trim().is_empty() {
            return Err(invalid("bridge.command_prefix", "must not be empty"));
        }
        for (who, level) in &self.bridge.permissions {
            level
                .parse::<PermissionLevel>()
                .map_err(|e| invalid("bridge.permissions", format!("`{who}`: {e}")))?;
        }
        if self.encryption.require && !self.encryption.allow {
            return Err(invalid(
                "encryption.require",
                "needs encryption.allow to be true",
            ));
        }
        if self.encryption.default && !self.encryption.allow {
            return Err(invalid(
                "encryption.default",
                "needs encryption.allow to be true",
            ));
        }
        if !self.interop.gateway_address.contains(':') {
            return Err(invalid("interop.gateway_address", "must be host:port"));
        }
        self.interop.gateway_key()?;
        if self.metrics.enabled && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                "must be an address such as 127.0.0.1:8001",
            ));
        }
        let prefix = &self.provisioning.prefix;
        if !prefix.starts_with('/')
            || prefix.len() < 2
            || prefix.ends_with('/')
            || prefix.starts_with("/_matrix/app")
        {
            return Err(invalid(
                "provisioning.prefix",
                "must be a path such as /_matrix/provision (not / and not under /_matrix/app)",
            ));
        }
        if self.provisioning.enabled && self.provisioning.shared_secret.len() < 16 {
            return Err(invalid(
                "provisioning.shared_secret",
                "must be at least 16 characters when provisioning is enabled",
            ));
        }
        if !["text", "json"].contains(&self.logging.format.as_str()) {
            return Err(invalid("logging.format", "must be text or json"));
        }
        if !["trace", "debug", "info", "warn", "error"].contains(&self.logging.level.as_str()) {
            return Err(invalid(
                "logging.level",
                "must be trace, debug, info, warn or error",
            ));
        }
        Ok(())
    }

    /// The bot's full user id.
    pub fn bot_mxid(&self) -> String {
        format!(
            "@{}:{}",
            self.appservice.bot.username, self.homeserver.domain
        )
    }

    /// The localpart regex of ghost users, for the registration namespace.
    pub fn ghost_regex(&self) -> String {
        let tpl = regex::escape(&self.appservice.username_template).replace(r"\{id\}", ".+");
        format!("@{}:{}", tpl, regex::escape(&self.homeserver.domain))
    }

    /// The address the appservice HTTP API binds to.
    pub fn listen_addr(&self) -> String {
        format!("{}:{}", self.appservice.hostname, self.appservice.port)
    }
}

fn check_http_url(key: &'static str, value: &str) -> Result<(), ConfigError> {
    match Url::parse(value) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(invalid(
            key,
            format!("`{value}` must be an http:// or https:// URL"),
        )),
        Err(e) => Err(invalid(key, format!("`{value}` is not a valid URL: {e}"))),
    }
}

fn is_localpart(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_with_tokens() -> String {
        EXAMPLE_CONFIG
            .replace(PLACEHOLDER_TOKEN, "0123456789abcdef0123456789abcdef")
            .replace(
                "gateway_public_key: \"\"",
                "gateway_public_key: \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
            )
    }

    #[test]
    fn example_config_parses_and_validates() {
        let cfg = Config::from_yaml(&example_with_tokens()).expect("example config is valid");
        assert_eq!(cfg.bot_mxid(), "@interopbot:example.org");
        assert_eq!(cfg.database.db_type(), DatabaseType::Sqlite);
    }

    #[test]
    fn example_without_tokens_names_the_token_key() {
        let err = Config::from_yaml(
            &example_with_tokens().replace("0123456789abcdef0123456789abcdef", PLACEHOLDER_TOKEN),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("appservice.as_token"), "{err}");
        let err = Config::from_yaml(EXAMPLE_CONFIG).unwrap_err().to_string();
        assert!(err.contains("interop.gateway_public_key"), "{err}");
    }

    fn err_for(from: &str, to: &str) -> String {
        let text = example_with_tokens().replace(from, to);
        Config::from_yaml(&text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(
            err_for("address: http://127.0.0.1:8008", "address: not a url")
                .contains("homeserver.address")
        );
        assert!(err_for("type: sqlite", "type: mysql").contains("database.type"));
        assert!(err_for("\"*\": relay", "\"*\": superuser").contains("bridge.permissions"));
        assert!(err_for("format: text", "format: xml").contains("logging.format"));
        assert!(
            err_for("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "c2hvcnQ=")
                .contains("interop.gateway_public_key")
        );
        assert!(
            err_for(
                "username_template: \"interop_{id}\"",
                "username_template: \"Interop\""
            )
            .contains("appservice.username_template")
        );
        // An unknown key is refused, with its name.
        assert!(err_for("    level: info", "    level: info\n    colour: true").contains("colour"));
    }

    #[test]
    fn permissions_resolve_most_specific_first() {
        let cfg = Config::from_yaml(&example_with_tokens()).expect("valid");
        assert_eq!(
            cfg.bridge.permission_of("@admin:example.org"),
            PermissionLevel::Admin
        );
        assert_eq!(
            cfg.bridge.permission_of("@bob:example.org"),
            PermissionLevel::User
        );
        assert_eq!(
            cfg.bridge.permission_of("@eve:elsewhere.net"),
            PermissionLevel::Relay
        );
        assert!(PermissionLevel::Relay < PermissionLevel::Commands);
    }

    #[test]
    fn ghost_regex_matches_ghosts_only() {
        let cfg = Config::from_yaml(&example_with_tokens()).expect("valid");
        let re = regex::Regex::new(&format!("^{}$", cfg.ghost_regex())).expect("regex");
        assert!(re.is_match("@interop_15551234567:example.org"));
        assert!(!re.is_match("@alice:example.org"));
        assert!(!re.is_match("@interop_1:example.org.evil"));
    }

    #[test]
    fn debug_redacts_secrets() {
        let cfg = Config::from_yaml(&example_with_tokens()).expect("valid");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("0123456789abcdef0123456789abcdef"));
    }
}
