//! Validation before start-up: every check names the key it is about.

use std::net::SocketAddr;

use url::Url;

use super::{
    Config, ConfigError, CryptoStoreKind, DatabaseType, PLACEHOLDER_TOKEN, PermissionLevel, invalid,
};

impl Config {
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
        self.check_homeserver_and_appservice()?;
        self.check_database()?;
        self.check_workers()?;
        self.check_bridge()?;
        self.check_interop()?;
        self.check_http_apis()?;
        self.check_logging()
    }

    /// The homeserver and how it reaches the appservice.
    fn check_homeserver_and_appservice(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// The database type and its URI.
    fn check_database(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Bridge behaviour and encryption.
    fn check_bridge(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Several workers need a database they can share.
    fn check_workers(&self) -> Result<(), ConfigError> {
        if !self.workers.enabled {
            return Ok(());
        }
        if self.database.db_type() != DatabaseType::Postgres {
            return Err(invalid(
                "workers.enabled",
                "several workers need database.type postgres (SQLite is one process's)",
            ));
        }
        if self.encryption.allow && self.encryption.store != CryptoStoreKind::Database {
            return Err(invalid(
                "workers.enabled",
                "several workers share their Matrix devices through the database: encryption.store must be database",
            ));
        }
        if self.encryption.allow && self.encryption.msc4350 {
            return Err(invalid(
                "workers.enabled",
                "several workers do not support encryption.msc4350 (ghost devices are the default)",
            ));
        }
        Ok(())
    }

    /// The gateway to connect to.
    fn check_interop(&self) -> Result<(), ConfigError> {
        if !self.interop.gateway_address.contains(':') {
            return Err(invalid("interop.gateway_address", "must be host:port"));
        }
        self.interop.gateway_key()?;
        Ok(())
    }

    /// Metrics and provisioning listeners.
    fn check_http_apis(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Log format and level.
    fn check_logging(&self) -> Result<(), ConfigError> {
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
