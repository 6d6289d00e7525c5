//! Contacts: the people a login has a chat with, searching them by name or number, and finding
//! an account on the network (for `start-chat`, the provisioning API and the homeserver's
//! third-party look-ups).
//!
//! The interop network has no address book: a login's contacts are the people it has a direct
//! chat with, named as their ghosts are (their network profile, or their number).

use std::sync::Arc;

use super::{Bridge, BridgeError, network::NetAccount};

/// The most results a search gives.
pub const MAX_SEARCH_RESULTS: usize = 50;

/// One contact of a login.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Contact {
    /// The contact's account on the network.
    pub account: String,
    /// Its name as the ghost shows it (its number when it has none).
    pub name: String,
    /// Its ghost.
    pub mxid: String,
    /// The portal room of the direct chat with it, if there is one.
    pub room_id: Option<String>,
}

/// What a name given to `start-chat` (or a search) stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// One account.
    Account(String),
    /// Several contacts match: the user has to pick.
    Ambiguous(Vec<Contact>),
    /// Nothing matches.
    Unknown,
}

/// Folds a name for matching: trimmed, in lower case.
fn fold(s: &str) -> String {
    s.trim().to_lowercase()
}

/// The digits of a query that looks like a number (digits, `+`, spaces, `-`, `(`, `)`, `.`),
/// so `+1 555 123` finds `+1555123…`; `None` for anything else.
fn digits(s: &str) -> Option<String> {
    let t = s.trim();
    let looks_numeric = !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')' | '.'));
    let d: String = t.chars().filter(char::is_ascii_digit).collect();
    (looks_numeric && !d.is_empty()).then_some(d)
}

impl Contact {
    fn matches(&self, query: &str) -> bool {
        match digits(query) {
            Some(d) if self.account.contains(&d) => true,
            _ => fold(&self.name).contains(&fold(query)),
        }
    }
}

impl Bridge {
    /// The contacts of `mxid`'s login, sorted by name: everyone it has a direct chat with.
    pub async fn contacts(&self, mxid: &str) -> Result<Vec<Contact>, BridgeError> {
        let mut out: Vec<Contact> = self
            .portals
            .dm_contacts(mxid)
            .await?
            .into_iter()
            .map(|c| Contact {
                mxid: self.ghost_mxid(&c.account),
                name: if c.displayname.is_empty() {
                    c.account.clone()
                } else {
                    c.displayname
                },
                account: c.account,
                room_id: c.room_id,
            })
            .collect();
        out.sort_by(|a, b| {
            fold(&a.name)
                .cmp(&fold(&b.name))
                .then(a.account.cmp(&b.account))
        });
        Ok(out)
    }

    /// Searches `mxid`'s contacts by name (case-insensitive, any part) or number (any run of
    /// digits); a full account identifier that is not a contact yet is looked up on the network
    /// through the user's login (at the bounded rate of every look-up), and is found if it
    /// exists there. At most [`MAX_SEARCH_RESULTS`].
    pub async fn search_contacts(
        &self,
        mxid: &str,
        query: &str,
    ) -> Result<Vec<Contact>, BridgeError> {
        let query = query.trim();
        if query.is_empty() {
            return Ok(Vec::new());
        }
        let mut found: Vec<Contact> = self
            .contacts(mxid)
            .await?
            .into_iter()
            .filter(|c| c.matches(query))
            .take(MAX_SEARCH_RESULTS)
            .collect();
        let account = digits(query).map(|d| format!("+{d}"));
        if let Some(account) = account
            && self.network.is_valid_account(&account)
            && !found.iter().any(|c| c.account == account)
            && let Some(acc) = self.network.account(mxid)
            && acc.account_id() != account
            && let Some(ghost) = self.resolve_account(&account, Some(&acc)).await?
        {
            let name = self
                .portals
                .ghost_profile(&account)
                .await?
                .map(|g| g.displayname)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| account.clone());
            found.insert(
                0,
                Contact {
                    account,
                    name,
                    mxid: ghost,
                    room_id: None,
                },
            );
            found.truncate(MAX_SEARCH_RESULTS);
        }
        Ok(found)
    }

    /// What `start-chat <arg>` means: an account identifier as it is, or the one contact whose
    /// name is `arg` (case-insensitive; if none is named exactly so, the one whose name contains
    /// it).
    pub async fn resolve_contact(&self, mxid: &str, arg: &str) -> Result<Resolved, BridgeError> {
        let arg = arg.trim();
        if self.network.is_valid_account(arg) {
            return Ok(Resolved::Account(arg.to_owned()));
        }
        if let Some(d) = digits(arg) {
            let account = format!("+{d}");
            if self.network.is_valid_account(&account) {
                return Ok(Resolved::Account(account));
            }
        }
        let contacts = self.contacts(mxid).await?;
        let wanted = fold(arg);
        let exact: Vec<Contact> = contacts
            .iter()
            .filter(|c| fold(&c.name) == wanted)
            .cloned()
            .collect();
        let pick = if exact.is_empty() {
            contacts
                .into_iter()
                .filter(|c| c.matches(arg))
                .collect::<Vec<_>>()
        } else {
            exact
        };
        Ok(match pick.len() {
            0 => Resolved::Unknown,
            1 => Resolved::Account(pick[0].account.clone()),
            _ => Resolved::Ambiguous(pick),
        })
    }

    /// The homeserver's third-party user look-up (`GET /thirdparty/user/{protocol}`): a `phone`
    /// field is resolved to its ghost if the account exists on the network (asked through any
    /// connected login, at the bounded rate of every look-up); a `name` field finds the known
    /// contacts of this bridge named so. Returns (ghost, account) pairs.
    pub async fn third_party_users(
        &self,
        phone: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<(String, String)>, BridgeError> {
        let mut out = Vec::new();
        if let Some(phone) = phone
            && let Some(d) = digits(phone)
        {
            let account = format!("+{d}");
            if let Some(ghost) = self
                .resolve_account(&account, None::<&Arc<dyn NetAccount>>)
                .await?
            {
                out.push((ghost, account));
            }
        }
        if let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) {
            for account in self
                .portals
                .ghosts_named(name, MAX_SEARCH_RESULTS as u32)
                .await?
            {
                if !out.iter().any(|(_, a)| *a == account) {
                    out.push((self.ghost_mxid(&account), account));
                }
            }
        }
        Ok(out)
    }

    /// The homeserver's reverse look-up (`GET /thirdparty/user?userid=`): the account a ghost
    /// of this bridge stands for, if the bridge knows it.
    pub async fn third_party_of_ghost(&self, mxid: &str) -> Result<Option<String>, BridgeError> {
        let Some(account) = self.account_of_ghost(mxid) else {
            return Ok(None);
        };
        Ok(self.portals.ghost_profile(&account).await?.map(|_| account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(account: &str, name: &str) -> Contact {
        Contact {
            account: account.into(),
            name: name.into(),
            mxid: String::new(),
            room_id: None,
        }
    }

    #[test]
    fn names_match_in_any_case_and_numbers_by_their_digits() {
        let alice = c("+15551234567", "Alice Liddell");
        assert!(alice.matches("alice"));
        assert!(alice.matches("LIDDELL"));
        assert!(alice.matches("555 123"));
        assert!(alice.matches("+1 (555) 123-4567"));
        assert!(!alice.matches("bob"));
        assert!(!alice.matches("999"));
        // Digits find names with them too.
        assert!(c("+15550000000", "Room 101").matches("101"));
        assert!(c("+15550000000", "Room 101").matches("room 1"));
    }
}
