//! The core's settings (the `bridge` section of the configuration): commands, permissions,
//! relaying and message behaviour. The configuration file is read elsewhere; these are only the
//! values and their defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// Each login gets a personal space holding its portals.
    #[serde(default = "yes")]
    pub personal_spaces: bool,
    /// A group that several logins of this bridge are in has one room, shared by them
    /// (otherwise each login has a room of its own for it). Off with several workers.
    #[serde(default = "yes")]
    pub shared_group_portals: bool,
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
            personal_spaces: true,
            shared_group_portals: true,
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

fn default_prefix() -> String {
    "!interop".into()
}
fn default_permissions() -> BTreeMap<String, String> {
    BTreeMap::from([("*".to_owned(), "relay".to_owned())])
}

/// `true`, as a serde default.
pub fn yes() -> bool {
    true
}
