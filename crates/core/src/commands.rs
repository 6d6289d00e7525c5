//! Bot commands: parsing, permission checks, help, and the commands themselves.
//! In the management room commands need no prefix; elsewhere they start with `command_prefix`.

use super::contacts::{Contact, Resolved};
use super::settings::PermissionLevel;
use super::types::PortalKind;
use super::{
    Bridge, BridgeError,
    network::{NetError, NetTarget},
    store::StoreError,
};

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

/// One line per contact: its name, its number, and its chat's room when it has one.
fn contact_lines(cs: &[Contact]) -> String {
    cs.iter()
        .map(|c| {
            let who = if c.name == c.account {
                c.account.clone()
            } else {
                format!("{} ({})", c.name, c.account)
            };
            match &c.room_id {
                Some(r) => format!("- {who}: https://matrix.to/#/{r}"),
                None => format!("- {who}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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
    CommandSpec {
        name: "help",
        args: "",
        help: "Show this list.",
        level: PermissionLevel::Commands,
        available: true,
    },
    CommandSpec {
        name: "ping",
        args: "",
        help: "Check that the bot answers.",
        level: PermissionLevel::Commands,
        available: true,
    },
    CommandSpec {
        name: "version",
        args: "",
        help: "Show the bridge version.",
        level: PermissionLevel::Commands,
        available: true,
    },
    CommandSpec {
        name: "whoami",
        args: "",
        help: "Show your Matrix id, permission level and logins.",
        level: PermissionLevel::Commands,
        available: true,
    },
    CommandSpec {
        name: "cancel",
        args: "",
        help: "Cancel the command in progress (e.g. a login).",
        level: PermissionLevel::Commands,
        available: true,
    },
    CommandSpec {
        name: "login",
        args: "<identifier>",
        help: "Log in to the interop network with a phone-style identifier.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "logout",
        args: "",
        help: "Log out and destroy your keys on the bridge.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "list-logins",
        args: "",
        help: "List your interop logins.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "start-chat",
        args: "<number or contact's name>",
        help: "Open a chat with someone on the interop network.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "list-contacts",
        args: "",
        help: "List your contacts: the people you have a chat with.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "search",
        args: "<name or number>",
        help: "Search your contacts by name or number; a full number is also looked up on the network.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "list-requests",
        args: "",
        help: "List message requests: chats from people you have no chat with yet.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "accept",
        args: "<contact or group>",
        help: "Accept a message request: open the chat and bridge its messages.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "decline",
        args: "<contact or group>",
        help: "Decline a message request: its messages are dropped, and so are later ones.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "list-chats",
        args: "",
        help: "List your bridged chats.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "sync",
        args: "",
        help: "Resync contacts, groups and portals.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "set-relay",
        args: "",
        help: "Relay messages of users without a login through your login in this room.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "unset-relay",
        args: "",
        help: "Stop relaying in this room.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "disappearing-timer",
        args: "[off|30s|5m|1h|1d|1w]",
        help: "In a portal: show, set or turn off its disappearing-message timer (messages disappear that long after they are sent, on both sides).",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "sync-portal",
        args: "",
        help: "In a portal: refresh its name, avatar and members (or the contact's profile) from the network.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "set-management-room",
        args: "",
        help: "Make this room your management room, where commands need no prefix.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "delete-all-portals",
        args: "",
        help: "Delete every portal of the bridge, after you confirm (admins, in the management room).",
        level: PermissionLevel::Admin,
        available: true,
    },
    CommandSpec {
        name: "sudo",
        args: "<user id> <command>",
        help: "Run a command as another Matrix user (admins; logged).",
        level: PermissionLevel::Admin,
        available: true,
    },
    CommandSpec {
        name: "delete-portal",
        args: "",
        help: "Remove this portal room and forget the chat.",
        level: PermissionLevel::User,
        available: true,
    },
    CommandSpec {
        name: "create-group",
        args: "<name> <contact>...",
        help: "Create an interop group with these contacts and open its portal.",
        level: PermissionLevel::User,
        available: true,
    },
];

pub fn find(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// A multi-step command waiting for the user's next message; kept in the store (JSON), so that
/// any worker, and a restarted bridge, continues it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Pending {
    /// `login` sent a code to this account; the next message is the code.
    LoginCode { account: String },
    /// `delete-all-portals` waits for `confirm`.
    DeleteAllPortals,
}

impl Pending {
    fn name(&self) -> &'static str {
        match self {
            Pending::LoginCode { .. } => "login",
            Pending::DeleteAllPortals => "delete-all-portals",
        }
    }
}

impl Bridge {
    /// Runs one command line (without prefix) for `sender` in `room_id`.
    pub async fn run_command(&self, room_id: &str, sender: &str, line: &str) -> CommandOutcome {
        let level = self.permission_of(sender);
        let mut words = line.split_whitespace();
        let Some(name) = words.next().map(str::to_lowercase) else {
            return CommandOutcome::text("Send `help` for the list of commands.");
        };
        let Some(spec) = find(&name) else {
            return CommandOutcome::text(format!(
                "Unknown command `{name}`. Send `help` for the list of commands."
            ));
        };
        if level < spec.level {
            return CommandOutcome::text(format!(
                "You are not allowed to run `{name}`: it needs the `{:?}` permission level.",
                spec.level
            ));
        }
        let args: Vec<&str> = words.collect();
        if !spec.args.is_empty() && !spec.args.starts_with('[') && args.is_empty() {
            return CommandOutcome::text(format!(
                "Usage: `{} {}`: {}",
                spec.name, spec.args, spec.help
            ));
        }
        if spec.args.is_empty() && !args.is_empty() {
            return CommandOutcome::text(format!(
                "`{}` takes no arguments. Usage: `{}`",
                spec.name, spec.name
            ));
        }
        if !spec.available {
            return CommandOutcome::text(format!(
                "`{name}` is not available in this version of the bridge yet (the interop login and portals are still being built)."
            ));
        }
        let arg = args.join(" ");
        match spec.name {
            "help" => self.help(level),
            "login" => self.cmd_login(sender, &arg).await,
            "logout" => self.cmd_logout(sender).await,
            "list-logins" => self.cmd_list_logins(sender).await,
            "start-chat" => self.cmd_start_chat(sender, &arg).await,
            "list-chats" => self.cmd_list_chats(sender).await,
            // Contacts' numbers are personal: only in the user's own management room.
            "list-contacts" | "search" if !self.is_management_room(room_id, sender).await => {
                CommandOutcome::text(format!(
                    "Send `{}` in your management room (your DM with the bot).",
                    spec.name
                ))
            }
            "list-contacts" => self.cmd_list_contacts(sender).await,
            "search" => self.cmd_search(sender, &arg).await,
            // Requests name strangers' numbers: only in the user's own management room.
            "list-requests" if !self.is_management_room(room_id, sender).await => {
                CommandOutcome::text(
                    "Send `list-requests` in your management room (your DM with the bot).",
                )
            }
            "list-requests" => self.cmd_list_requests(sender).await,
            "accept" => self.cmd_accept(sender, &arg).await,
            "decline" => self.cmd_decline(sender, &arg).await,
            "sync" => self.cmd_sync(sender).await,
            "set-relay" => self.cmd_relay(room_id, sender, level, true).await,
            "unset-relay" => self.cmd_relay(room_id, sender, level, false).await,
            "delete-portal" => self.cmd_delete_portal(room_id, sender, level).await,
            "sync-portal" => self.cmd_sync_portal(room_id, sender, level).await,
            "disappearing-timer" => {
                self.cmd_disappearing_timer(room_id, sender, level, &args.join(" "))
                    .await
            }
            "set-management-room" => self.cmd_set_management_room(room_id, sender).await,
            "delete-all-portals" if !self.is_management_room(room_id, sender).await => {
                CommandOutcome::text(
                    "Send `delete-all-portals` in your management room (your DM with the bot).",
                )
            }
            "delete-all-portals" => self.cmd_delete_all_portals(sender).await,
            "sudo" => self.cmd_sudo(room_id, sender, &args).await,
            "create-group" => self.cmd_create_group(sender, &args).await,
            "ping" => CommandOutcome::text("Pong! The bridge is running."),
            "version" => CommandOutcome::text(format!(
                "matrix-interop-bridge {} (AGPL-3.0-or-later)",
                env!("CARGO_PKG_VERSION")
            )),
            "whoami" => {
                let login = match self.portals.login(sender).await {
                    Ok(Some(a)) => {
                        let state = match self.network.account(sender) {
                            Some(acc) if acc.is_connected() => "connected",
                            Some(_) => "connecting",
                            None => "not connected",
                        };
                        format!("You are logged in as {a} ({state}).")
                    }
                    Ok(None) => "You have no interop login.".to_owned(),
                    Err(e) => format!("Your login could not be read: {e}"),
                };
                CommandOutcome::text(format!(
                    "You are {sender}, with permission level `{}`. {login}",
                    format!("{level:?}").to_lowercase()
                ))
            }
            "cancel" => match self.take_pending(sender).await {
                Ok(Some(what)) => CommandOutcome::text(format!("Cancelled `{}`.", what.name())),
                Ok(None) => CommandOutcome::text("Nothing to cancel."),
                Err(e) => CommandOutcome::text(format!("Cannot cancel now: {e}")),
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
            let usage = if c.args.is_empty() {
                c.name.to_owned()
            } else {
                format!("{} {}", c.name, c.args)
            };
            let note = if c.available {
                ""
            } else {
                " (not available yet)"
            };
            body.push_str(&format!("- {usage}: {}{note}\n", c.help));
            html.push_str(&format!(
                "<li><code>{}</code>: {}{note}</li>",
                html_escape(&usage),
                html_escape(c.help)
            ));
        }
        html.push_str("</ul>");
        CommandOutcome {
            body: body.trim_end().to_owned(),
            html,
        }
    }
}

impl Bridge {
    /// The multi-step command waiting for `mxid`'s next message.
    pub(crate) async fn pending(&self, mxid: &str) -> Result<Option<Pending>, BridgeError> {
        let Some(text) = self.users.pending_command(mxid).await? else {
            return Ok(None);
        };
        // One this version cannot read (written by another) is dropped: the user starts again.
        Ok(serde_json::from_str(&text).ok())
    }

    pub(crate) async fn set_pending(&self, mxid: &str, p: &Pending) -> Result<(), BridgeError> {
        let text =
            serde_json::to_string(p).map_err(|e| BridgeError::Store(StoreError::failed(e)))?;
        Ok(self.users.set_pending_command(mxid, Some(&text)).await?)
    }

    /// Clears the command waiting for `mxid`; returns it.
    pub(crate) async fn take_pending(&self, mxid: &str) -> Result<Option<Pending>, BridgeError> {
        let p = self.pending(mxid).await?;
        self.users.set_pending_command(mxid, None).await?;
        Ok(p)
    }

    /// Feeds the user's message to a command waiting for it; `None` when nothing waits.
    pub(crate) async fn continue_pending(
        &self,
        _room_id: &str,
        sender: &str,
        text: &str,
    ) -> Option<CommandOutcome> {
        let pending = match self.pending(sender).await {
            Ok(p) => p?,
            Err(e) => {
                tracing::warn!(user = sender, error = %e, "cannot read a command in progress");
                return None;
            }
        };
        if text.eq_ignore_ascii_case("cancel") {
            let _ = self.take_pending(sender).await;
            return Some(CommandOutcome::text(format!(
                "Cancelled `{}`.",
                pending.name()
            )));
        }
        match pending {
            Pending::DeleteAllPortals => {
                if !text.eq_ignore_ascii_case("confirm") {
                    return Some(CommandOutcome::text(
                        "Send `confirm` to delete every portal, or `cancel`.",
                    ));
                }
                let _ = self.take_pending(sender).await;
                Some(self.delete_all_portals(sender).await)
            }
            Pending::LoginCode { account } => {
                let code: String = text
                    .chars()
                    .filter(|c| !c.is_whitespace() && *c != '-')
                    .collect();
                if code.is_empty() || !code.chars().all(|c| c.is_ascii_digit()) {
                    return Some(CommandOutcome::text(
                        "Send the code you received (digits only), or `cancel`.",
                    ));
                }
                if let Err(e) = self.claim_login(sender).await {
                    return Some(CommandOutcome::text(format!("Cannot log in now: {e}")));
                }
                let verified = self
                    .network
                    .verify_and_connect(sender, &account, &code)
                    .await;
                if verified.is_err() {
                    // Not logged in after all: the lease taken for it goes.
                    self.release_login(sender).await;
                }
                Some(match verified {
                    Ok(_) => {
                        let _ = self.take_pending(sender).await;
                        if let Err(e) = self.portals.set_login(sender, &account).await {
                            return Some(CommandOutcome::text(format!(
                                "Logged in, but the login could not be saved: {e}"
                            )));
                        }
                        if let Err(e) = self.ensure_space(sender).await {
                            tracing::warn!(error = %e, "cannot make a personal space");
                        }
                        let incoming = if self.settings.bridge.message_requests {
                            "Chats you start, and people you accept, appear as rooms; someone new who writes to you first shows up here as a message request (`list-requests`)."
                        } else {
                            "Incoming chats will appear as rooms."
                        };
                        CommandOutcome::text(format!(
                            "Logged in as {account}. {incoming} Start a chat with `start-chat <identifier>`."
                        ))
                    }
                    Err(NetError::BadCode) => CommandOutcome::text(
                        "That code is wrong. Send the right code, or `cancel`.",
                    ),
                    Err(NetError::CodeExpired) => {
                        let _ = self.take_pending(sender).await;
                        CommandOutcome::text(format!(
                            "The code expired. Send `login {account}` to get a new one."
                        ))
                    }
                    Err(e) => {
                        CommandOutcome::text(format!("Login failed: {e}. Try again, or `cancel`."))
                    }
                })
            }
        }
    }

    async fn cmd_login(&self, sender: &str, account: &str) -> CommandOutcome {
        match self.portals.login(sender).await {
            Ok(Some(a)) => {
                return CommandOutcome::text(format!(
                    "You are already logged in as {a}. Send `logout` first."
                ));
            }
            Ok(None) => {}
            Err(e) => return CommandOutcome::text(format!("Cannot check your login: {e}")),
        }
        if !self.network.is_valid_account(account) {
            return CommandOutcome::text(
                "Usage: `login <identifier>`, e.g. `login +15551234567` (+ and 8 to 15 digits).",
            );
        }
        match self.network.request_code(account).await {
            Ok(()) => {
                let waiting = Pending::LoginCode {
                    account: account.to_owned(),
                };
                if let Err(e) = self.set_pending(sender, &waiting).await {
                    return CommandOutcome::text(format!("Cannot start the login: {e}"));
                }
                CommandOutcome::text(format!(
                    "A verification code was sent to {account}. Send it here (or `cancel`)."
                ))
            }
            Err(e) => {
                CommandOutcome::text(format!("Cannot start the login: {e}. Try again later."))
            }
        }
    }

    async fn cmd_logout(&self, sender: &str) -> CommandOutcome {
        let account = match self.portals.login(sender).await {
            Ok(Some(a)) => a,
            Ok(None) => return CommandOutcome::text("You are not logged in."),
            Err(e) => return CommandOutcome::text(format!("Cannot read your login: {e}")),
        };
        let portals = self.portals.portals_of(sender).await.unwrap_or_default();
        if let Err(e) = self.network.logout(sender).await {
            return CommandOutcome::text(format!("Logout failed: {e}"));
        }
        self.release_login(sender).await;
        let bot = self.matrix.bot_mxid().to_owned();
        for p in &portals {
            let room = p.room_id.as_ref().map(|r| r.as_str());
            let shared = match room {
                Some(room) => self
                    .portals
                    .portals_in_room(room)
                    .await
                    .map(|rows| rows.len() > 1)
                    .unwrap_or(false),
                None => false,
            };
            if let (true, Some(room)) = (shared, room) {
                // A shared group portal goes on for the others: only this user's part ends.
                let _ = self
                    .notice(
                        room,
                        &format!("{sender} logged out: their messages here are no longer bridged."),
                    )
                    .await;
                self.remove_from_space(sender, room).await;
                self.kick_from_shared(room, sender, "logged out of the bridge")
                    .await;
            } else if let Some(room) = room {
                let _ = self
                    .notice(
                        room,
                        "This chat is no longer bridged: its owner logged out.",
                    )
                    .await;
                if let Ok(members) = self.matrix.joined_members(room, &bot).await {
                    for m in members.iter().filter(|m| self.matrix.is_ghost(m)) {
                        let _ = self.matrix.leave(room, m).await;
                    }
                }
                let _ = self.matrix.leave(room, &bot).await;
                self.matrix.discard_room_key(room).await;
            }
            let _ = self.portals.delete_portal(sender, &p.chat_id).await;
        }
        self.close_space(sender).await;
        if let Err(e) = self.portals.delete_login(sender).await {
            return CommandOutcome::text(format!(
                "Logged out, but the login record could not be removed: {e}"
            ));
        }
        CommandOutcome::text(format!(
            "Logged out of {account}. Your keys on the bridge were destroyed and {} portal(s) closed.",
            portals.len()
        ))
    }

    async fn cmd_list_logins(&self, sender: &str) -> CommandOutcome {
        match self.portals.login(sender).await {
            Ok(Some(a)) => {
                let state = match self.network.account(sender) {
                    Some(acc) if acc.is_connected() => "connected",
                    Some(_) => "connecting",
                    None => "not connected",
                };
                CommandOutcome::text(format!("- {a} ({state})"))
            }
            Ok(None) => CommandOutcome::text("You have no logins. Send `login <identifier>`."),
            Err(e) => CommandOutcome::text(format!("Cannot read your logins: {e}")),
        }
    }

    async fn cmd_list_contacts(&self, sender: &str) -> CommandOutcome {
        if self.network.account(sender).is_none() {
            return CommandOutcome::text("You are not logged in. Send `login <identifier>` first.");
        }
        match self.contacts(sender).await {
            Ok(cs) if cs.is_empty() => CommandOutcome::text(
                "You have no contacts yet: start a chat with `start-chat <number>`.",
            ),
            Ok(cs) => CommandOutcome::text(contact_lines(&cs)),
            Err(e) => CommandOutcome::text(format!("Cannot list your contacts: {e}")),
        }
    }

    async fn cmd_search(&self, sender: &str, query: &str) -> CommandOutcome {
        if self.network.account(sender).is_none() {
            return CommandOutcome::text("You are not logged in. Send `login <identifier>` first.");
        }
        match self.search_contacts(sender, query).await {
            Ok(cs) if cs.is_empty() => CommandOutcome::text(format!(
                "Nothing found for `{query}`. A full number (+ and 8 to 15 digits) is looked up on the network too."
            )),
            Ok(cs) => CommandOutcome::text(format!(
                "{}\nStart a chat with `start-chat <number>`.",
                contact_lines(&cs)
            )),
            Err(e) => CommandOutcome::text(format!("Cannot search now: {e}")),
        }
    }

    async fn cmd_start_chat(&self, sender: &str, contact: &str) -> CommandOutcome {
        let Some(acc) = self.network.account(sender) else {
            return CommandOutcome::text("You are not logged in. Send `login <identifier>` first.");
        };
        let contact = match self.resolve_contact(sender, contact).await {
            Ok(Resolved::Account(a)) => a,
            Ok(Resolved::Unknown) => {
                return CommandOutcome::text(format!(
                    "No contact is named `{contact}`. Usage: `start-chat <number or contact's name>`, e.g. `start-chat +15551234567`."
                ));
            }
            Ok(Resolved::Ambiguous(cs)) => {
                return CommandOutcome::text(format!(
                    "`{contact}` names several contacts; give the number:\n{}",
                    contact_lines(&cs)
                ));
            }
            Err(e) => return CommandOutcome::text(format!("Cannot look up `{contact}`: {e}")),
        };
        let contact = contact.as_str();
        if contact == acc.account_id() {
            return CommandOutcome::text("That is your own identifier.");
        }
        match acc.profile(contact).await {
            Ok(None) => {
                return CommandOutcome::text(format!("{contact} is not on the interop network."));
            }
            Err(e) => return CommandOutcome::text(format!("Cannot look up {contact}: {e}")),
            Ok(Some(_)) => {}
        }
        match self
            .ensure_portal(sender, &acc, &NetTarget::Contact(contact.to_owned()), None)
            .await
        {
            Ok(p) => {
                // Opening the chat oneself answers its request: held messages come in, and a
                // refusal is forgotten.
                if let Err(e) = self.accept_request(sender, &acc, contact).await {
                    tracing::warn!(error = %e, "cannot bridge a request's held messages");
                }
                let room = p.room;
                let bot = self.matrix.bot_mxid().to_owned();
                let _ = self.matrix.invite(&room, &bot, sender).await;
                CommandOutcome::text(format!(
                    "Your chat with {contact}: https://matrix.to/#/{room}"
                ))
            }
            Err(e) => CommandOutcome::text(format!("Cannot open the chat: {e}")),
        }
    }

    async fn is_management_room(&self, room_id: &str, sender: &str) -> bool {
        matches!(self.users.management_room(sender).await, Ok(Some(r)) if r == room_id)
    }

    async fn cmd_list_requests(&self, sender: &str) -> CommandOutcome {
        match self.requests.requests(sender).await {
            Ok(rs) => {
                let open: Vec<String> = rs
                    .iter()
                    .filter(|r| r.is_open())
                    .map(|r| {
                        let who = if r.name.is_empty() {
                            r.from.clone()
                        } else {
                            format!("{} ({})", r.name, r.from)
                        };
                        let what = if r.group { "group" } else { "chat" };
                        format!("- {what} `{}` from {who}: {} message(s)", r.chat_id, r.held)
                    })
                    .collect();
                if open.is_empty() {
                    CommandOutcome::text("You have no message requests.")
                } else {
                    CommandOutcome::text(format!(
                        "Message requests (answer with `accept <id>` or `decline <id>`):\n{}",
                        open.join("\n")
                    ))
                }
            }
            Err(e) => CommandOutcome::text(format!("Cannot read your message requests: {e}")),
        }
    }

    async fn cmd_accept(&self, sender: &str, chat: &str) -> CommandOutcome {
        let Some(acc) = self.network.account(sender) else {
            return CommandOutcome::text("You are not logged in. Send `login <identifier>` first.");
        };
        match self.accept_request(sender, &acc, chat).await {
            Ok(Some((room, n))) => {
                let bot = self.matrix.bot_mxid().to_owned();
                let _ = self.matrix.invite(&room, &bot, sender).await;
                CommandOutcome::text(format!(
                    "Accepted; {n} message(s) bridged: https://matrix.to/#/{room}"
                ))
            }
            Ok(None) => CommandOutcome::text(format!(
                "There is no message request `{chat}`. Send `list-requests` to see them."
            )),
            Err(e) => CommandOutcome::text(format!(
                "Cannot accept it now ({e}); nothing was lost, try again later."
            )),
        }
    }

    async fn cmd_decline(&self, sender: &str, chat: &str) -> CommandOutcome {
        match self.decline_request(sender, chat).await {
            Ok(true) => CommandOutcome::text(format!(
                "Declined. Messages in `{chat}` are dropped from now on; `start-chat` opens it again."
            )),
            Ok(false) => CommandOutcome::text(format!(
                "There is no message request `{chat}`. Send `list-requests` to see them."
            )),
            Err(e) => CommandOutcome::text(format!("Cannot decline it now: {e}")),
        }
    }

    async fn cmd_list_chats(&self, sender: &str) -> CommandOutcome {
        match self.portals.portals_of(sender).await {
            Ok(ps) if ps.is_empty() => CommandOutcome::text("You have no bridged chats yet."),
            Ok(ps) => {
                let lines: Vec<String> = ps
                    .iter()
                    .map(|p| {
                        let what = if p.name.is_empty() {
                            p.chat_id.clone()
                        } else {
                            format!("{} ({})", p.name, p.chat_id)
                        };
                        format!(
                            "- {what}: https://matrix.to/#/{}",
                            p.room_id.as_ref().map(|r| r.as_str()).unwrap_or_default()
                        )
                    })
                    .collect();
                CommandOutcome::text(lines.join("\n"))
            }
            Err(e) => CommandOutcome::text(format!("Cannot list your chats: {e}")),
        }
    }

    async fn cmd_sync(&self, sender: &str) -> CommandOutcome {
        let Some(acc) = self.network.account(sender) else {
            return CommandOutcome::text("You are not logged in.");
        };
        let portals = self.portals.portals_of(sender).await.unwrap_or_default();
        let (mut contacts, mut groups, mut failed) = (0, 0, 0);
        for p in &portals {
            match self.refresh_portal(p, &acc).await {
                Ok(()) if p.kind == PortalKind::Dm => contacts += 1,
                Ok(()) => groups += 1,
                Err(e) => {
                    tracing::debug!(error = %e, chat = %p.chat_id, "sync of a chat failed");
                    failed += 1;
                }
            }
        }
        let mut text = format!("Synced {contacts} contact(s) and {groups} group(s).");
        if failed > 0 {
            text.push_str(&format!(
                " {failed} chat(s) could not be synced; try again later."
            ));
        }
        CommandOutcome::text(text)
    }

    async fn cmd_relay(
        &self,
        room_id: &str,
        sender: &str,
        level: PermissionLevel,
        on: bool,
    ) -> CommandOutcome {
        if !self.settings.bridge.relay.enabled {
            return CommandOutcome::text(
                "Relay mode is disabled in the bridge configuration (bridge.relay.enabled).",
            );
        }
        if self.settings.bridge.relay.admin_only && level < PermissionLevel::Admin {
            return CommandOutcome::text(
                "Only bridge admins may change the relay (bridge.relay.admin_only).",
            );
        }
        let Ok(Some(mut portal)) = self.portal_record_in(room_id, sender).await else {
            return CommandOutcome::text("Run this in a portal room.");
        };
        // Only the chat's owner (whose login it is) or an admin decides who speaks for others.
        if portal.receiver != sender && level < PermissionLevel::Admin {
            return CommandOutcome::text(
                "Only the owner of this portal or a bridge admin may change its relay.",
            );
        }
        if on {
            if self.network.account(sender).is_none() {
                return CommandOutcome::text("You need a login to relay for others.");
            }
            // The sender of a Matrix event: a valid user id.
            portal.relay = ruma::UserId::parse(sender).ok();
        } else {
            portal.relay = None;
        }
        match self.portals.save_portal(&portal).await {
            Ok(()) if on => CommandOutcome::text(
                "Messages of users without their own login now go out through your login.",
            ),
            Ok(()) => CommandOutcome::text("Relay removed from this room."),
            Err(e) => CommandOutcome::text(format!("Cannot save the relay: {e}")),
        }
    }

    /// The portal of `room_id` if `sender` owns it or is an admin; otherwise the answer.
    async fn portal_for(
        &self,
        room_id: &str,
        sender: &str,
        level: PermissionLevel,
        verb: &str,
    ) -> Result<super::types::Portal, CommandOutcome> {
        let Ok(Some(portal)) = self.portal_record_in(room_id, sender).await else {
            return Err(CommandOutcome::text(format!(
                "Run this in the portal room you want to {verb}."
            )));
        };
        if portal.receiver != sender && level < PermissionLevel::Admin {
            return Err(CommandOutcome::text(format!(
                "Only the owner of this chat or an admin can {verb} its portal."
            )));
        }
        Ok(portal)
    }

    async fn cmd_delete_portal(
        &self,
        room_id: &str,
        sender: &str,
        level: PermissionLevel,
    ) -> CommandOutcome {
        let portal = match self.portal_for(room_id, sender, level, "delete").await {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        if let Err(e) = self.close_portal(&portal, false).await {
            return CommandOutcome::text(format!("Cannot delete the portal: {e}"));
        }
        // The bot leaves after answering (see `after_command`).
        self.leave_after.lock().await.insert(room_id.to_owned());
        CommandOutcome::text("Portal deleted: this room is no longer bridged.")
    }

    /// Reads a portal's chat from the network again: the contact's profile, or the group's
    /// name, avatar and members.
    async fn refresh_portal(
        &self,
        portal: &super::types::Portal,
        acc: &std::sync::Arc<dyn super::network::NetAccount>,
    ) -> Result<(), BridgeError> {
        match portal.kind {
            PortalKind::Dm => {
                self.ghosts_seen.lock().await.remove(&portal.chat_id);
                self.ghost(&portal.chat_id, Some(acc)).await.map(|_| ())
            }
            PortalKind::Group => {
                let g = acc.group(&portal.chat_id).await?;
                for m in &g.members {
                    self.ghosts_seen.lock().await.remove(m);
                }
                self.on_group_update(portal.receiver.as_str(), acc, &g, &g.changed_by)
                    .await
            }
        }
    }

    async fn cmd_sync_portal(
        &self,
        room_id: &str,
        sender: &str,
        level: PermissionLevel,
    ) -> CommandOutcome {
        let portal = match self.portal_for(room_id, sender, level, "refresh").await {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        let Some(acc) = self.network.account(portal.receiver.as_str()) else {
            return CommandOutcome::text("The login of this chat is not running.");
        };
        match self.refresh_portal(&portal, &acc).await {
            Ok(()) => CommandOutcome::text("Portal refreshed from the network."),
            Err(e) => CommandOutcome::text(format!("Cannot refresh the portal: {e}")),
        }
    }

    /// Shows the portal's disappearing-message timer, or sets it on both sides: the contact
    /// (or group) hears of it from the owner's login, then the room.
    async fn cmd_disappearing_timer(
        &self,
        room_id: &str,
        sender: &str,
        level: PermissionLevel,
        args: &str,
    ) -> CommandOutcome {
        use super::portal::disappear::{describe_timer, parse_timer, timer_text};
        let portal = match self.portal_for(room_id, sender, level, "change").await {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        if args.trim().is_empty() {
            return match self.portals.disappear_timer(room_id).await {
                Ok(s) => {
                    CommandOutcome::text(format!("Disappearing messages: {}.", describe_timer(s)))
                }
                Err(e) => CommandOutcome::text(format!("Cannot read the timer: {e}")),
            };
        }
        let Some(seconds) = parse_timer(args) else {
            return CommandOutcome::text(
                "Give `off` or a time such as `30s`, `5m`, `1h`, `1d` or `1w` (at most a year).",
            );
        };
        let Some(acc) = self.network.account(portal.receiver.as_str()) else {
            return CommandOutcome::text("The login of this chat is not running.");
        };
        let Ok(Some(p)) = self.portal_in(room_id, portal.receiver.as_str()).await else {
            return CommandOutcome::text("This portal has no room.");
        };
        let change = super::model::Message {
            body: Some(super::model::Body::Timer(super::model::Timer { seconds })),
            reply_to: None,
            expire_timer: seconds,
        };
        let id = uuid::Uuid::new_v4().to_string();
        if let Err(e) = acc.send(p.target(), id, change).await {
            return CommandOutcome::text(format!("The network did not take the timer: {e}"));
        }
        match p.set_timer(seconds).await {
            Ok(()) => CommandOutcome::text(timer_text(sender, seconds)),
            Err(e) => CommandOutcome::text(format!(
                "The timer was sent, but the room could not be updated: {e}"
            )),
        }
    }

    async fn cmd_set_management_room(&self, room_id: &str, sender: &str) -> CommandOutcome {
        if matches!(self.portals.portal_by_room(room_id).await, Ok(Some(_))) {
            return CommandOutcome::text(
                "A portal cannot be your management room: its messages are bridged.",
            );
        }
        match self.users.set_management_room(sender, room_id).await {
            Ok(()) => CommandOutcome::text(
                "This room is now your management room: commands need no prefix here.",
            ),
            Err(e) => CommandOutcome::text(format!("Cannot set the management room: {e}")),
        }
    }

    async fn cmd_delete_all_portals(&self, sender: &str) -> CommandOutcome {
        let n = match self.all_portals().await {
            Ok(ps) => ps.len(),
            Err(e) => return CommandOutcome::text(format!("Cannot read the portals: {e}")),
        };
        if n == 0 {
            return CommandOutcome::text("There are no portals.");
        }
        if let Err(e) = self.set_pending(sender, &Pending::DeleteAllPortals).await {
            return CommandOutcome::text(format!("Cannot ask for confirmation now: {e}"));
        }
        CommandOutcome::text(format!(
            "This deletes all {n} portal(s) of every user: their rooms stop being bridged and the contacts' ghosts leave them. Send `confirm` to go on, or `cancel`."
        ))
    }

    async fn all_portals(&self) -> Result<Vec<super::types::Portal>, BridgeError> {
        let mut all = Vec::new();
        for (mxid, _) in self.portals.all_logins().await? {
            all.extend(self.portals.portals_of(&mxid).await?);
        }
        Ok(all)
    }

    /// Deletes every portal (confirmed by `admin`); the bot leaves their rooms.
    async fn delete_all_portals(&self, admin: &str) -> CommandOutcome {
        let portals = match self.all_portals().await {
            Ok(ps) => ps,
            Err(e) => return CommandOutcome::text(format!("Cannot read the portals: {e}")),
        };
        let (mut deleted, mut failed) = (0, 0);
        for p in &portals {
            match self.close_portal(p, true).await {
                Ok(()) => deleted += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, "cannot delete a portal");
                }
            }
        }
        tracing::info!(admin, deleted, failed, "delete-all-portals");
        if failed == 0 {
            CommandOutcome::text(format!("Deleted {deleted} portal(s)."))
        } else {
            CommandOutcome::text(format!(
                "Deleted {deleted} portal(s); {failed} could not be deleted now (see the log), run it again later."
            ))
        }
    }

    /// `sudo <user> <command>`: an admin runs a command as someone else, with that user's
    /// permission level. Logged with the admin, the user and the command's name (not its
    /// arguments, which may hold a code).
    async fn cmd_sudo(&self, room_id: &str, sender: &str, args: &[&str]) -> CommandOutcome {
        let (Some(user), Some(command)) = (args.first(), args.get(1)) else {
            return CommandOutcome::text("Usage: `sudo <user id> <command> [arguments]`.");
        };
        if !user.starts_with('@') || !user.contains(':') {
            return CommandOutcome::text(format!("`{user}` is not a Matrix user id."));
        }
        let name = command.to_lowercase();
        if name == "sudo" {
            return CommandOutcome::text("`sudo` cannot run `sudo`.");
        }
        if find(&name).is_none() {
            return CommandOutcome::text(format!("Unknown command `{name}`."));
        }
        tracing::info!(admin = sender, user = *user, command = %name, "sudo");
        let line = args[1..].join(" ");
        let outcome = Box::pin(self.run_command(room_id, user, &line)).await;
        CommandOutcome::text(format!("As {user}: {}", outcome.body))
    }

    async fn cmd_create_group(&self, sender: &str, args: &[&str]) -> CommandOutcome {
        let Some(acc) = self.network.account(sender) else {
            return CommandOutcome::text("You are not logged in.");
        };
        let (name, members): (Vec<&str>, Vec<&str>) =
            args.iter().partition(|a| !a.starts_with('+'));
        if members.is_empty() || members.iter().any(|m| !self.network.is_valid_account(m)) {
            return CommandOutcome::text(
                "Usage: `create-group <name> <+contact> [<+contact>...]`.",
            );
        }
        let name = name.join(" ");
        match acc
            .create_group(&name, members.iter().map(|m| m.to_string()).collect())
            .await
        {
            Ok(g) => match self
                .ensure_portal(sender, &acc, &NetTarget::Group(g.id.clone()), Some(&g))
                .await
            {
                Ok(p) => {
                    CommandOutcome::text(format!("Group created: https://matrix.to/#/{}", p.room))
                }
                Err(e) => CommandOutcome::text(format!(
                    "The group was created but its room could not be: {e}"
                )),
            },
            Err(e) => CommandOutcome::text(format!("Cannot create the group: {e}")),
        }
    }
}
