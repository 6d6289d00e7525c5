//! The bridge configuration: loading (YAML file plus `MIB__SECTION__KEY` environment overrides),
//! validation that names the offending key, and the commented example written by `generate-config`.

use std::path::Path;

use serde::{Deserialize, Serialize};

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

impl From<mib_interop::settings::KeyError> for ConfigError {
    fn from(e: mib_interop::settings::KeyError) -> Self {
        invalid("interop.gateway_public_key", e.0)
    }
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
    pub workers: WorkersConfig,
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

mod sections;
mod validate;

pub use sections::*;

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
