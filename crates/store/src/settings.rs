//! The `database` section of the configuration: which database, where, and how many connections.

use std::fmt;

use serde::{Deserialize, Serialize};
use url::Url;

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
    /// The database kind (anything but `postgres` is SQLite; the configuration's validation
    /// refuses other names).
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
