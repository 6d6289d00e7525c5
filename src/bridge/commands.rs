//! Bot commands: parsing, permission checks, help, and the commands themselves.
//! In the management room commands need no prefix; elsewhere they start with `command_prefix`.

use std::collections::HashMap;

use tokio::sync::Mutex;

use super::Bridge;
use crate::config::PermissionLevel;

/// What the bot answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub body: String,
    pub html: String,
}

impl CommandOutcome {
    fn text(body: impl Into<String>) -> Self {
        let body = body.into();
        let html = html_escape(&body).replace('\n', "<br>");
        Self { body, html }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A command the bot knows.
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
    pub level: PermissionLevel,
    /// Whether this build implements it yet.
    pub available: bool,
}

pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec { name: "help", args: "", help: "Show this list.", level: PermissionLevel::Commands, available: true },
    CommandSpec { name: "ping", args: "", help: "Check that the bot answers.", level: PermissionLevel::Commands, available: true },
    CommandSpec { name: "version", args: "", help: "Show the bridge version.", level: PermissionLevel::Commands, available: true },
    CommandSpec { name: "whoami", args: "", help: "Show your Matrix id, permission level and logins.", level: PermissionLevel::Commands, available: true },
    CommandSpec { name: "cancel", args: "", help: "Cancel the command in progress (e.g. a login).", level: PermissionLevel::Commands, available: true },
    CommandSpec { name: "login", args: "<identifier>", help: "Log in to the interop network with a phone-style identifier.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "logout", args: "", help: "Log out and destroy your keys on the bridge.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "list-logins", args: "", help: "List your interop logins.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "start-chat", args: "<contact>", help: "Open a chat with an interop contact.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "list-chats", args: "", help: "List your bridged chats.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "sync", args: "", help: "Resync contacts, groups and portals.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "set-relay", args: "", help: "Relay messages of users without a login through your login in this room.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "unset-relay", args: "", help: "Stop relaying in this room.", level: PermissionLevel::User, available: false },
    CommandSpec { name: "delete-portal", args: "", help: "Remove this portal room and forget the chat.", level: PermissionLevel::User, available: false },
];

pub fn find(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Multi-step commands waiting for the user's next message (e.g. a login code).
#[derive(Default)]
pub struct CommandState {
    pending: Mutex<HashMap<String, &'static str>>,
}

impl Bridge {
    /// Runs one command line (without prefix) for `sender` in `room_id`.
    pub async fn run_command(&self, room_id: &str, sender: &str, line: &str) -> CommandOutcome {
        let _ = room_id;
        let level = self.permission_of(sender);
        let mut words = line.split_whitespace();
        let Some(name) = words.next().map(str::to_lowercase) else {
            return CommandOutcome::text("Send `help` for the list of commands.");
        };
        let Some(spec) = find(&name) else {
            return CommandOutcome::text(format!("Unknown command `{name}`. Send `help` for the list of commands."));
        };
        if level < spec.level {
            return CommandOutcome::text(format!(
                "You are not allowed to run `{name}`: it needs the `{:?}` permission level.",
                spec.level
            ));
        }
        let args: Vec<&str> = words.collect();
        if !spec.args.is_empty() && !spec.args.starts_with('[') && args.is_empty() {
            return CommandOutcome::text(format!("Usage: `{} {}`: {}", spec.name, spec.args, spec.help));
        }
        if spec.args.is_empty() && !args.is_empty() {
            return CommandOutcome::text(format!("`{}` takes no arguments. Usage: `{}`", spec.name, spec.name));
        }
        if !spec.available {
            return CommandOutcome::text(format!(
                "`{name}` is not available in this version of the bridge yet (the interop login and portals are still being built)."
            ));
        }
        match spec.name {
            "help" => self.help(level),
            "ping" => CommandOutcome::text("Pong! The bridge is running."),
            "version" => CommandOutcome::text(format!(
                "matrix-interop-bridge {} (AGPL-3.0-or-later)",
                env!("CARGO_PKG_VERSION")
            )),
            "whoami" => CommandOutcome::text(format!(
                "You are {sender}, with permission level `{}`. You have no interop login.",
                format!("{level:?}").to_lowercase()
            )),
            "cancel" => match self.commands.pending.lock().await.remove(sender) {
                Some(what) => CommandOutcome::text(format!("Cancelled `{what}`.")),
                None => CommandOutcome::text("Nothing to cancel."),
            },
            other => CommandOutcome::text(format!("`{other}` is not available yet.")),
        }
    }

    fn help(&self, level: PermissionLevel) -> CommandOutcome {
        let prefix = &self.settings.bridge.command_prefix;
        let mut body = format!(
            "Commands (no prefix needed in your management room; elsewhere start with `{prefix}`):\n"
        );
        let mut html = format!(
            "<p>Commands (no prefix needed in your management room; elsewhere start with <code>{}</code>):</p><ul>",
            html_escape(prefix)
        );
        for c in COMMANDS.iter().filter(|c| level >= c.level) {
            let usage = if c.args.is_empty() { c.name.to_owned() } else { format!("{} {}", c.name, c.args) };
            let note = if c.available { "" } else { " (not available yet)" };
            body.push_str(&format!("- {usage}: {}{note}\n", c.help));
            html.push_str(&format!("<li><code>{}</code>: {}{note}</li>", html_escape(&usage), html_escape(c.help)));
        }
        html.push_str("</ul>");
        CommandOutcome { body: body.trim_end().to_owned(), html }
    }
}
